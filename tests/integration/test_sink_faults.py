"""The sink under faults: a full disk, damaged spool records, rows that cannot
be stored, a table locked beyond lock_timeout, a backend that stops answering."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from feeds import db as feeds_db
from feeds.binance import adapter as A
from feeds.sink import Sink, Spool

pytestmark = pytest.mark.integration

#: an hour ago, whole seconds (epoch ms): recent enough for any plausibility window
T0_MS = (int(time.time()) - 3600) * 1000
#: what the adapter renders for an event time of 10**15 ms: PostgreSQL accepts
#: it as timestamptz, but no daily partition can be made for it
YEAR_33658 = "33658-09-27 01:46:40.000+00:00"


def agg_row(i: int, symbol: str = "BTCUSDT") -> tuple:
    """A binance_agg_trade row as the adapter makes it from an aggTrade message."""
    t = T0_MS + i
    d = {"e": "aggTrade", "E": t + 2, "a": i, "s": symbol, "p": f"{30000 + i % 977}.{i % 10}0",
         "q": f"0.{i % 997 + 1:03d}", "f": 2 * i, "l": 2 * i + 1, "T": t, "m": i % 3 == 0}
    return A.agg_trade_row(d, A.now_text())


def book_row(i: int, symbol: str = "ETHUSDT") -> tuple:
    """A binance_book_ticker row as the adapter makes it from a bookTicker message."""
    t = T0_MS + i
    d = {"e": "bookTicker", "u": 10_000_000 + i, "s": symbol, "b": f"{2000 + i % 300}.01", "B": f"{i % 50 + 1}.125",
         "a": f"{2000 + i % 300}.02", "A": f"{i % 40 + 1}.500", "T": t, "E": t + 1}
    return A.book_ticker_row(d, A.now_text())


def q(dsn, sql, params=()):
    with psycopg.connect(dsn) as c:
        return c.execute(sql, params).fetchall()


def agg_count(dsn):
    return tuple(q(dsn, "SELECT count(*), count(DISTINCT agg_id) FROM binance_agg_trade")[0])


def agg_ids(dsn) -> set[int]:
    return {r[0] for r in q(dsn, "SELECT agg_id FROM binance_agg_trade")}


def wait_for(pred, timeout=20.0, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return False


def reason(sink) -> str:
    return sink.status_reason() or ""


class Producer(threading.Thread):
    """Adds rows one by one, as a collector's event loop does (add() may block)."""

    def __init__(self, sink, table, rows):
        super().__init__(daemon=True)
        self.sink, self.table, self.rows = sink, table, rows
        self.added = 0
        self.error = None

    def run(self):
        try:
            for r in self.rows:
                self.sink.add(self.table, r)
                self.added += 1
        except BaseException as e:
            self.error = e


def spool_intact(directory) -> int:
    """Rows in the spool segments of ``directory``; asserts no damaged byte."""
    sp = Spool(directory)
    rows = 0
    for seg in sp.segments():
        n, bad = sp.inspect(seg)
        assert bad == [], f"{seg.name}: damaged spans {bad}"
        rows += n
    return rows


# ------------------------------------------------------------------ disk full
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs to spool into (root only); unmounted afterwards."""
    mnt = tmp_path / "spool"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "feeds-test-spool", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool: {(r.stderr or r.stdout).strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_holds_rows_in_memory_and_stores_them_once_space_or_the_database_returns(
        pg, db, small_tmpfs, caplog):
    caplog.set_level(logging.INFO, logger="feeds.sink")
    st = os.statvfs(small_tmpfs)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 600_000))     # ~600 kB left for the spool
    n = 40_000
    rows = [agg_row(i) for i in range(1, n + 1)]
    sink = Sink(db, small_tmpfs, A.TABLES, max_pending=3000, flush_interval=0.05, retry_interval=0.2,
                replay_rows=2000).start()
    producer = None
    try:
        sink.add_many("binance_agg_trade", rows[:100])
        assert sink.flush(10)
        pg.stop("fast")
        try:
            producer = Producer(sink, "binance_agg_trade", rows[100:])
            producer.start()
            # the disk fills: rows are held in memory, add() blocks
            assert wait_for(lambda: reason(sink).startswith("BACK-PRESSURE") and sink.pending >= 3000, 30), \
                reason(sink)
            assert "No space left on device" in reason(sink)
            assert producer.is_alive() and producer.error is None
            spooled = sink.stats.spooled_rows
            assert 0 < spooled == spool_intact(small_tmpfs)       # no partial record left behind
            # retries go on quietly: the journal does not repeat the failure
            t0 = time.time()
            time.sleep(4.0)
            t1 = time.time()
            repeated = [r for r in caplog.records if t0 <= r.created <= t1 and "No space left" in r.getMessage()]
            assert repeated == []
            # held, not growing: max_pending waiting besides the batch being retried
            assert producer.is_alive() and 3000 <= sink.outcome().pending <= 2 * 3000 + 1
            # space comes back, the database is still down: the held rows go to the spool
            filler.unlink()
            assert wait_for(lambda: sink.stats.spooled_rows > spooled + 3000, 30)
            assert reason(sink).startswith(("SPOOLING", "BACK-PRESSURE"))
            # the disk fills again
            assert wait_for(lambda: reason(sink).startswith("BACK-PRESSURE") and sink.pending >= 3000, 30), \
                reason(sink)
            assert spool_intact(small_tmpfs) == sink.stats.spooled_rows
        finally:
            pg.start()
        # the database returns while the disk is still full: rows go to it directly
        producer.join(60)
        assert not producer.is_alive() and producer.error is None
        assert sink.flush(30)
        assert wait_for(lambda: not Spool(small_tmpfs).segments() and sink.status_reason() is None, 60), reason(sink)
        assert sink.fatal is None
    finally:
        assert sink.close(30)
    assert agg_count(db) == (n, n)
    out = sink.outcome()
    assert (out.committed, out.rejected, out.lost, out.pending) == (n, 0, 0, 0)
    assert out.replayed == out.spooled > 0
    assert not list(small_tmpfs.glob("*.corrupt"))


def test_spool_max_bytes_turns_into_back_pressure_not_loss(pg, db, tmp_path):
    cap = 400_000
    n = 12_000
    rows = [agg_row(i) for i in range(1, n + 1)]
    sink = Sink(db, tmp_path, A.TABLES, spool_max_bytes=cap, max_pending=2000, flush_interval=0.05,
                retry_interval=0.2).start()
    try:
        sink.add_many("binance_agg_trade", rows[:100])
        assert sink.flush(10)
        pg.stop("fast")
        try:
            producer = Producer(sink, "binance_agg_trade", rows[100:])
            producer.start()
            assert wait_for(lambda: reason(sink).startswith("BACK-PRESSURE") and sink.pending >= 2000, 30), \
                reason(sink)
            assert "spool_max_bytes" in reason(sink)
            assert producer.is_alive()
            assert 0 < sum(p.stat().st_size for p in tmp_path.glob("spool-*.bin")) <= cap
        finally:
            pg.start()
        producer.join(60)
        assert not producer.is_alive() and producer.error is None
        assert sink.flush(30)
        assert wait_for(lambda: not Spool(tmp_path).segments() and sink.status_reason() is None, 60)
    finally:
        assert sink.close(30)
    assert agg_count(db) == (n, n)
    assert sink.outcome().lost == 0


# ------------------------------------------------------------------ damaged spool
def damaged_spool(directory, first_id: int) -> tuple[bytes, int]:
    """Three records of 1,000 aggTrades each (ids from ``first_id``), the
    middle one damaged.  Returns the damaged record's bytes and its segment."""
    sp = Spool(directory)
    ends = [0]
    for k in range(3):
        a = first_id + 1000 * k
        sp.append({"binance_agg_trade": [agg_row(i) for i in range(a, a + 1000)]})
        ends.append(sp.segments()[-1].stat().st_size)
    sp._close()
    seg = sp.segments()[-1]
    data = bytearray(seg.read_bytes())
    assert len(data) == ends[3]
    data[(ends[1] + ends[2]) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    return bytes(data[ends[1]:ends[2]]), seg


def test_damaged_record_mid_segment_is_quarantined_and_the_records_after_it_replayed(db, tmp_path):
    spool = tmp_path / "spool"
    damaged, _ = damaged_spool(spool, 1)
    sink = Sink(db, spool, A.TABLES).start()
    try:
        assert wait_for(lambda: not Spool(spool).segments(), 30)
        sink.add_many("binance_agg_trade", [agg_row(i) for i in range(5001, 5101)])   # and it goes on
        assert sink.flush(10)
    finally:
        assert sink.close()
    assert agg_ids(db) == set(range(1, 1001)) | set(range(2001, 3001)) | set(range(5001, 5101))
    kept = list(spool.glob("*.corrupt"))
    assert len(kept) == 1 and damaged in kept[0].read_bytes()


def test_quarantine_files_are_never_overwritten(db, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    earlier = spool / "spool-000000000001.corrupt"          # as an earlier run left one
    earlier.write_bytes(b"an earlier damaged segment")
    for round_, first in enumerate((1, 10_001), 1):
        # a segment carrying the same number (a spool restored from elsewhere)
        other = tmp_path / f"other{round_}"
        damaged, seg = damaged_spool(other, first)
        assert seg.name == "spool-000000000001.bin"
        os.rename(seg, spool / seg.name)
        sink = Sink(db, spool, A.TABLES).start()
        try:
            assert wait_for(lambda: not Spool(spool).segments(), 30)
        finally:
            assert sink.close()
        assert earlier.read_bytes() == b"an earlier damaged segment"
        kept = sorted(p for p in spool.glob("*.corrupt") if p != earlier)
        assert len(kept) == round_
        assert any(damaged in p.read_bytes() for p in kept)
    assert len(agg_ids(db)) == 4000


def test_spool_left_by_the_previous_format_is_still_replayed(db, tmp_path):
    """Segments of records ``uint32 length, uint32 crc32, pickle`` (no magic),
    as the sink wrote them before, with a torn tail."""
    import pickle
    import struct
    import zlib
    with open(tmp_path / "spool-000000000007.bin", "wb") as f:
        for a in (1, 501):
            body = pickle.dumps({"binance_agg_trade": [agg_row(i) for i in range(a, a + 500)]})
            f.write(struct.pack("!II", len(body), zlib.crc32(body)) + body)
        f.write(b"\x00\x00\x10\x00torn")
    sink = Sink(db, tmp_path, A.TABLES).start()
    try:
        assert wait_for(lambda: not Spool(tmp_path).segments(), 20)
    finally:
        assert sink.close()
    assert agg_count(db) == (1000, 1000)
    assert [p.name for p in tmp_path.glob("*.corrupt")] == ["spool-000000000007.1.corrupt"]


def test_spool_records_are_bounded_and_read_one_at_a_time(tmp_path):
    sp = Spool(tmp_path)
    sp.append({"binance_agg_trade": [agg_row(i) for i in range(1, 10_001)],
               "binance_book_ticker": [book_row(i) for i in range(1, 5_001)]})
    sp._close()
    sizes = {"binance_agg_trade": [], "binance_book_ticker": []}
    for seg in sp.segments():
        with sp.reader(seg) as rd:
            while (rec := rd.next()) is not None:
                assert len(rec) == 1
                for name, rows in rec.items():
                    sizes[name].append(len(rows))
    assert sum(sizes["binance_agg_trade"]) == 10_000 and sum(sizes["binance_book_ticker"]) == 5_000
    assert max(max(v) for v in sizes.values()) <= Spool.RECORD_ROWS < 10_000


# ------------------------------------------------------------------ rows that cannot be stored
def unstorable(first: int) -> tuple[list[tuple], dict[int, str]]:
    """200 aggTrade rows from id ``first``; seven of them cannot be stored."""
    rows = [agg_row(i) for i in range(first, first + 200)]
    bad = {}

    def spoil(k, make, why):
        i = first + k
        rows[k] = make(list(rows[k]))
        bad[i] = why
    spoil(10, lambda r: tuple(r[:6] + ["year 33658"] + r[7:]), "PostgreSQL refuses the time")
    spoil(30, lambda r: tuple(r[:6] + [YEAR_33658] + r[7:8] + [YEAR_33658] + r[9:]), "no partition possible")
    spoil(50, lambda r: tuple(r[:2] + [object()] + r[3:]), "psycopg cannot adapt the value")
    spoil(70, lambda r: tuple(r[:-1]), "one column short")
    spoil(90, lambda r: tuple(r + ["extra"]), "one column too many")
    spoil(110, lambda r: tuple([r[0] + "\ud800"] + r[1:]), "text that cannot be encoded")
    spoil(130, lambda r: tuple(r[:4] + [2 ** 70] + r[5:]), "beyond bigint")
    return rows, bad


def rejected_ids(path) -> list[int]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert rec["table"] == "binance_agg_trade" and rec["error"]
        out.append(int(rec["row"][1]))
    return out


def test_rows_that_cannot_be_stored_are_rejected_and_the_rest_of_the_batch_stored(db, tmp_path):
    rows, bad = unstorable(1)
    sink = Sink(db, tmp_path, A.TABLES, retry_interval=0.2).start()
    try:
        sink.add_many("binance_agg_trade", rows)
        assert sink.flush(60)
        assert sink.fatal is None
        sink.add_many("binance_agg_trade", [agg_row(i) for i in range(1001, 1101)])   # the writer lives on
        assert sink.flush(10)
    finally:
        assert sink.close()
    assert agg_ids(db) == (set(range(1, 201)) - set(bad)) | set(range(1001, 1101))
    assert sorted(rejected_ids(tmp_path / "rejects.jsonl")) == sorted(bad)
    assert sink.stats.tables["binance_agg_trade"].rejected == len(bad)
    out = sink.outcome()
    assert (out.committed, out.rejected, out.spooled, out.lost) == (300 - len(bad), len(bad), 0, 0)
    assert out.line() == "293 committed, 0 spooled, 7 rejected, 0 lost"


def test_unstorable_rows_in_the_spool_are_rejected_at_replay_and_the_rest_replayed(db, tmp_path):
    rows, bad = unstorable(1)
    sp = Spool(tmp_path)
    sp.append({"binance_agg_trade": rows[:100]})
    sp.append({"binance_agg_trade": rows[100:]})
    sp._close()
    for attempt in range(2):        # a second start finds nothing left to trip over
        sink = Sink(db, tmp_path, A.TABLES, retry_interval=0.2).start()
        try:
            assert wait_for(lambda: not Spool(tmp_path).segments(), 30)
            sink.add_many("binance_agg_trade", [agg_row(i) for i in range(1001 + attempt * 100, 1101 + attempt * 100)])
            assert sink.flush(10)
            assert sink.fatal is None
        finally:
            assert sink.close()
    assert agg_ids(db) == (set(range(1, 201)) - set(bad)) | set(range(1001, 1201))
    assert sorted(rejected_ids(tmp_path / "rejects.jsonl")) == sorted(bad)
    assert not list(tmp_path.glob("*.corrupt"))


def test_an_unexpected_error_in_a_write_cycle_keeps_the_rows(db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES, retry_interval=0.2)
    real_write = sink._write
    calls = []

    def failing_once(batch, safe=False):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("something nobody expected")
        return real_write(batch, safe)
    sink._write = failing_once
    sink.start()
    try:
        sink.add_many("binance_agg_trade", [agg_row(i) for i in range(1, 501)])
        assert sink.flush(20)
        assert sink.fatal is None
    finally:
        assert sink.close()
    assert len(calls) >= 2
    assert agg_count(db) == (500, 500)
    assert sink.outcome().lost == 0


# ------------------------------------------------------------------ a database that hangs
def test_sessions_carry_statement_and_lock_timeouts(db):
    with feeds_db.connect(db, application_name="feeds-test", statement_timeout=7, lock_timeout=3) as c:
        assert c.execute("SHOW statement_timeout").fetchone()[0] == "7s"
        assert c.execute("SHOW lock_timeout").fetchone()[0] == "3s"
        assert c.execute("SHOW application_name").fetchone()[0] == "feeds-test"
        assert c.autocommit


def test_a_lock_held_beyond_lock_timeout_is_an_outage_rows_spooled_then_stored(db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES, lock_timeout=0.5, statement_timeout=5.0, retry_interval=0.3,
                flush_interval=0.05).start()
    try:
        sink.add_many("binance_agg_trade", [agg_row(i) for i in range(1, 101)])
        assert sink.flush(10)
        locker = psycopg.connect(db)
        try:
            locker.execute("LOCK TABLE binance_agg_trade IN ACCESS EXCLUSIVE MODE")
            for i in range(101, 3001):
                sink.add("binance_agg_trade", agg_row(i))
                if i % 500 == 0:
                    time.sleep(0.2)
            assert sink.flush(20)                       # spooled: nothing waits in memory
            assert sink.spooling and sink.stats.spooled_rows > 0
            assert "lock timeout" in reason(sink) and reason(sink).startswith("SPOOLING")
            assert Spool(tmp_path).segments()
        finally:
            locker.rollback()
            locker.close()
        assert wait_for(lambda: not Spool(tmp_path).segments() and not sink.spooling, 30)
    finally:
        assert sink.close()
    assert agg_count(db) == (3000, 3000)
    assert sink.stats.replayed_rows == sink.stats.spooled_rows > 0


def test_a_backend_that_stops_answering_is_cut_off_and_the_rows_stored(db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES, statement_timeout=1.0, lock_timeout=0.5, retry_interval=0.3,
                flush_interval=0.05).start()
    try:
        sink.add_many("binance_agg_trade", [agg_row(i) for i in range(1, 101)])
        assert sink.flush(10)
        (pid,), = q(db, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name = 'feeds-sink'")
        os.kill(pid, signal.SIGSTOP)        # the server process of the sink's session hangs
        try:
            sink.add_many("binance_agg_trade", [agg_row(i) for i in range(101, 1101)])
            assert wait_for(lambda: agg_count(db) == (1100, 1100), 45, interval=0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        assert sink.close()
    assert sink.outcome().lost == 0


def test_the_directory_is_fsynced_after_a_segment_is_created(tmp_path, monkeypatch):
    """A new segment's directory entry is made durable: after the first
    append of each segment the spool directory itself is fsync'd."""
    import stat
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    sp = Spool(tmp_path)
    sp.append({"binance_agg_trade": [agg_row(1)]})
    assert "dir" in synced and "file" in synced
    before = synced.count("dir")
    sp.append({"binance_agg_trade": [agg_row(2)]})      # same segment: no new directory entry
    assert synced.count("dir") == before
    sp._close()
