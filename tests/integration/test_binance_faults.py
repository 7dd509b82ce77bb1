"""feed-binance when storage goes wrong: a spool bigger than the unit's memory,
an event time PostgreSQL can hold but no partition can, a table locked for 30 s."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

import feeds
from feeds.binance import adapter as A
from feeds.sim.binance import SimulatorThread
from feeds.sink import Spool

from binance_harness import CollectorThread, q, settings_for, wait_until
from conftest import ROOT

pytestmark = pytest.mark.integration

#: MemoryMax= of feed-binance.service
UNIT_MEMORY_MAX = 400 << 20
LIB = str(Path(feeds.__file__).resolve().parents[1])


def stored(dsn) -> int:
    return q(dsn, "select (select count(*) from binance_agg_trade) + (select count(*) from binance_book_ticker)")[0][0]


def duplicates(dsn) -> tuple:
    return tuple(q(dsn, "select (select count(*) - count(distinct (symbol, agg_id)) from binance_agg_trade), "
                        "(select count(*) - count(distinct (symbol, update_id)) from binance_book_ticker)")[0])


def write_config(tmp_path, sim, **sink) -> Path:
    cfg = tmp_path / "binance.toml"
    extra = "".join(f"{k} = {v!r}\n" for k, v in sink.items())
    cfg.write_text(f"""
[binance]
rest_url = "{sim.http_url}"
ws_url = "{sim.ws_url}"
streams = ["aggTrade", "bookTicker"]
[sink]
spool_dir = "{tmp_path}/spool"
{extra}""")
    return cfg


def feed_binance(cfg: Path, dsn: str, unit: str, cgroup: Path | None = None) -> subprocess.Popen:
    """bin/feed-binance as the unit runs it, optionally inside ``cgroup``."""
    cmd = [sys.executable, str(ROOT / "bin" / "feed-binance"), "--config", str(cfg), "--unit", unit]
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$0" "$@"', *cmd]
    env = dict(os.environ, FEEDS_DSN=dsn, PYTHONPATH=LIB)
    env.pop("STATE_DIRECTORY", None)
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def stop(p: subprocess.Popen, sim, db: str, extra: int) -> tuple[int, str]:
    """Freeze the venue, read what it sent, wait until ``sent + extra`` rows
    are stored (frames still in the socket at SIGTERM are never read), then
    SIGTERM the collector; returns (frames sent, stderr)."""
    sim.call(sim.sim.fault_stall_all, 600)
    time.sleep(0.5)
    sent = sim.stats()["sent_total"]
    wait_until(lambda: p.poll() is not None or stored(db) >= sent + extra, 60, what=f"{sent + extra} rows stored")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    return sent, err


# ------------------------------------------------------------------ a spool bigger than MemoryMax
@pytest.fixture
def memory_cgroup():
    """A cgroup-v1 memory cgroup limited to feed-binance's MemoryMax (400 MiB)."""
    base = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    if base is None or not (base / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup-v1 memory controller for this process (/sys/fs/cgroup/memory)")
    cg = base / f"feeds-test-{uuid.uuid4().hex[:8]}"
    try:
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(UNIT_MEMORY_MAX))
    except OSError as e:
        if cg.exists():
            cg.rmdir()
        pytest.skip(f"cannot create a memory cgroup under {base}: {e}")
    try:
        yield cg
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def oom_kills(cg: Path) -> int:
    for line in (cg / "memory.oom_control").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill":
            return int(v)
    return 0


def build_spool(directory: Path, rows: int) -> dict[str, int]:
    """A spool of ``rows`` aggTrade and bookTicker rows (half each) as the
    adapter makes them, for symbols the simulator does not serve; appended in
    batches of 100,000 rows as an outage under load leaves them."""
    sp = Spool(directory)
    t0 = (int(time.time()) - 6 * 3600) * 1000
    recv = A.now_text()
    syms = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
    counts = {"binance_agg_trade": 0, "binance_book_ticker": 0}
    i = 0
    while i < rows:
        agg, book = [], []
        for j in range(i, min(rows, i + 100_000)):
            s = syms[j % 4]
            t = t0 + j // 10
            if j % 2 == 0:
                agg.append(A.agg_trade_row(
                    {"e": "aggTrade", "E": t + 3, "a": 5_000_000 + j, "s": s, "p": f"{29000 + j % 9973}.{j % 100:02d}",
                     "q": f"{j % 50}.{j % 1000:03d}", "f": 9_000_000 + 3 * j, "l": 9_000_000 + 3 * j + 2, "T": t,
                     "m": j % 3 == 0}, recv))
            else:
                book.append(A.book_ticker_row(
                    {"e": "bookTicker", "u": 7_000_000_000 + j, "s": s, "b": f"{29000 + j % 9973}.{j % 100:02d}",
                     "B": f"{j % 70}.{j % 1000:03d}", "a": f"{29001 + j % 9973}.{j % 100:02d}",
                     "A": f"{j % 30}.{j % 1000:03d}", "T": t, "E": t + 1}, recv))
        sp.append({"binance_agg_trade": agg, "binance_book_ticker": book})
        counts["binance_agg_trade"] += len(agg)
        counts["binance_book_ticker"] += len(book)
        i += 100_000
    sp._close()
    return counts


def test_spool_larger_than_the_unit_memory_is_replayed_within_memory_max(db, tmp_path, memory_cgroup):
    spooled = build_spool(tmp_path / "spool", 600_000)
    assert sum(p.stat().st_size for p in (tmp_path / "spool").glob("spool-*.bin")) > 64 << 20
    with SimulatorThread(symbols=4, rate=500, seed=21, streams=["aggTrade", "bookTicker"]) as sim:
        cfg = write_config(tmp_path, sim)
        p = feed_binance(cfg, db, "feed-binance-memory-test", memory_cgroup)
        try:
            wait_until(lambda: p.poll() is not None or not list((tmp_path / "spool").glob("spool-*.bin")), 300,
                       what="spool replayed")
            assert p.poll() is None, "feed-binance exited while replaying its spool"
            n = stored(db)
            wait_until(lambda: stored(db) > n + 200, 30, what="live rows after the replay")
            sent, err = stop(p, sim, db, sum(spooled.values()))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        peak = int((memory_cgroup / "memory.max_usage_in_bytes").read_text())
        killed = oom_kills(memory_cgroup)
    assert killed == 0, f"OOM-killed (peak {peak >> 20} MiB)"
    assert p.returncode == 0, err[-3000:]
    assert q(db, "select count(*) from binance_agg_trade where left(symbol, 3) <> 'SYM'")[0][0] == \
        spooled["binance_agg_trade"]
    assert q(db, "select count(*) from binance_book_ticker where left(symbol, 3) <> 'SYM'")[0][0] == \
        spooled["binance_book_ticker"]
    assert stored(db) == sent + sum(spooled.values())
    assert duplicates(db) == (0, 0)
    assert not list((tmp_path / "spool").glob("spool-*"))


# ------------------------------------------------------------------ an event time of the year 33658
def _far_future_book_ticker(sim) -> tuple[str, int]:
    """Send one bookTicker whose times are 10**15 ms (the year 33658) on a
    subscribed generated symbol, in its update-id order; runs in the
    simulator's loop."""
    g = next(g for g in sim._gen if g.book_slot is not None and g.book_slot.conns)
    g.u += 1
    t = 10 ** 15
    data = (f'{{"e":"bookTicker","u":{g.u},"s":"{g.S}","b":"100.10","B":"1.000","a":"100.20","A":"2.000",'
            f'"T":{t},"E":{t}}}').encode()
    sim._deliver(g.book_slot, data, sim._loop.time())
    return g.S, g.u


def test_event_time_of_year_33658_neither_stops_feed_binance_nor_loses_other_rows(db, tmp_path):
    with SimulatorThread(symbols=3, rate=600, seed=33, streams=["aggTrade", "bookTicker"]) as sim:
        cfg = write_config(tmp_path, sim, flush_interval=0.2)
        p = feed_binance(cfg, db, "feed-binance-33658-test")
        try:
            wait_until(lambda: stored(db) > 300, 30, what="first rows")
            sym, u = sim.call(_far_future_book_ticker, sim.sim)
            n = stored(db)
            wait_until(lambda: p.poll() is not None or stored(db) > n + 600, 30, what="rows after the bad frame")
            assert p.poll() is None, "feed-binance exited after the bad frame"
            sent, err = stop(p, sim, db, -1)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, err[-3000:]
    assert stored(db) == sent - 1
    assert q(db, "select count(*) from binance_book_ticker where symbol = %s and update_id = %s", (sym, u))[0][0] == 0
    rejects = tmp_path / "spool" / "rejects.jsonl"
    by_sink = [line for line in rejects.read_text().splitlines() if str(u) in line] if rejects.exists() else []
    # refused either by the adapter (implausible time, counted as malformed) or by the sink (rejects.jsonl)
    assert len(by_sink) == 1 or ("malformed" in err.lower() and not by_sink), err[-3000:]
    assert "0 lost" in err


# ------------------------------------------------------------------ a table locked for 30 s
def test_table_locked_for_30s_rows_spooled_meanwhile_then_stored_none_lost_none_duplicated(db, tmp_path):
    with SimulatorThread(symbols=4, rate=1000, seed=17, streams=["aggTrade", "bookTicker"]) as sim:
        s = settings_for(sim, streams=["aggTrade", "bookTicker"])
        with CollectorThread(db, tmp_path, s) as c:
            wait_until(lambda: q(db, "select count(*) from binance_agg_trade")[0][0] > 300, 30, what="first rows")
            locker = psycopg.connect(db)
            try:
                locker.execute("LOCK TABLE binance_agg_trade IN ACCESS EXCLUSIVE MODE")
                t = time.monotonic()
                wait_until(lambda: c.sink.spooling and c.sink.stats.spooled_rows > 500, 25, what="spooling")
                assert list(tmp_path.glob("spool-*.bin"))
                assert "lock timeout" in (c.sink.status_reason() or "")
                time.sleep(max(0.0, 30 - (time.monotonic() - t)))
                # storage kept making progress (the spool) all along: the watchdog stays fed
                assert time.monotonic() - c.sink.last_progress < 10
                assert c.sink.pending < c.sink.max_pending
            finally:
                locker.rollback()
                locker.close()
            wait_until(lambda: not c.sink.spooling and not list(tmp_path.glob("spool-*.bin")), 60,
                       what="replay of the spool")
            sim.call(sim.sim.fault_stall_all, 600)
            time.sleep(0.5)
            sent = sim.stats()["sent_total"]
            wait_until(lambda: stored(db) >= sent, 30, what="every row stored")
        assert c.sink.stats.replayed_rows == c.sink.stats.spooled_rows > 0
        assert c.sink.outcome().lost == 0
    assert stored(db) == sent
    assert duplicates(db) == (0, 0)
