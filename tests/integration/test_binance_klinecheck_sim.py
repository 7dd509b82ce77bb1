"""The kline check end to end: the simulator, the real python-binance, the collector, PostgreSQL, feedctl."""
from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from feeds.binance.main import check_connection
from feeds.cli import feedctl
from feeds.sim.binance import SimulatorThread

from binance_harness import CollectorThread, q, recording_frames, settings_for, wait_until
from conftest import shared_file

pytestmark = pytest.mark.integration

KC_COUNTERS = ("kline_check_ok", "kline_check_mismatched", "kline_check_not_comparable")


def decided(c) -> int:
    return sum(c.collector.counters[k] for k in KC_COUNTERS)


@pytest.mark.parametrize("recording", ["binance-usdm-2021-07-22.frames", "binance-usdm-2021-04-05.frames"])
def test_kline_check_passes_on_the_real_recordings(db, tmp_path, recording):
    """07-22 holds Binance's own closed klines, but only of the minute in which
    the recording started (12:25, connection opened at 12:25:40): not
    comparable, never a mismatch.  04-05 holds no klines: the simulator derives
    them from the replayed trades, and the minute 12:37, whole inside the
    recording, is compared for every symbol."""
    path = shared_file("binance", recording)
    frames = recording_frames(path)
    syms = sorted({d["s"] for _, d in frames})
    with SimulatorThread(replay=[path], speed=0, replay_wait=2.0) as sim:
        s = settings_for(sim, symbols=syms, streams=["aggTrade", "bookTicker", "kline"])
        with CollectorThread(db, tmp_path, s) as c:
            wait_until(lambda: sim.stats()["replay_finished"], 180, what="replay end")
            n_klines = sum(v["sent"] for k, v in sim.stats()["streams"].items() if "@kline" in k)
            wait_until(lambda: all(c.health.stream(k).count >= v["sent"] for k, v in sim.stats()["streams"].items()
                                   if v["sent"] and k in c.collector.routes), 120, what="every sent frame received")

            def settled():
                closed = q(db, "select count(*) from binance_kline")[0][0]
                waiting = any(st.waiting for st in c.collector.kc.syms.values())
                return closed >= 1 and not waiting and decided(c) == closed
            wait_until(settled, 120, what="every closed kline decided")
            counters = {k: c.collector.counters[k] for k in KC_COUNTERS}
    assert n_klines > 0
    assert counters["kline_check_mismatched"] == 0
    assert q(db, "select count(*) from binance_kline_check")[0][0] == 0
    if recording == "binance-usdm-2021-07-22.frames":
        # Binance's own klines: each closes 12:25, which began before the connection
        assert q(db, "select count(*), count(*) filter (where source = 'ws') from binance_kline")[0] == (4, 4)
        assert counters == {"kline_check_ok": 0, "kline_check_mismatched": 0, "kline_check_not_comparable": 4}
    else:
        assert counters["kline_check_ok"] == len(syms) == 5
    assert c.health.malformed == 0


def test_a_dropped_aggtrade_makes_the_check_fire_and_the_fill_repairs_the_minute(db, tmp_path):
    sym = "SYM0001USDT"
    with SimulatorThread(symbols=2, rate=100, seed=9) as sim:
        with CollectorThread(db, tmp_path, settings_for(sim)) as c:
            wait_until(lambda: q(db, "select count(*) from binance_agg_trade where symbol = %s", (sym,))[0][0] > 20,
                       60, what="first rows")
            minute = sim.call(sim.sim.fault_skip_last, sym)
            # the minute after the fault's: every aggTrade of it arrives
            wait_until(lambda: c.collector.counters["kline_check_repaired"] >= 1, 240, what="a repaired minute")
            wait_until(lambda: c.collector.counters["kline_check_ok"] >= 1, 120, what="a whole minute agreeing")
            skipped = sim.stats()["agg_ids_skipped"]
        counters = dict(c.collector.counters)
    assert skipped == 1
    assert counters["kline_check_mismatched"] == counters["kline_check_repaired"] == 1
    assert counters["kline_check_not_repaired"] == 0
    rows = q(db, "select symbol, (extract(epoch from open_time) * 1000)::bigint, stage, differs, repaired, basis, "
                 "kline_trades, agg_trades, kline_volume = agg_volume from binance_kline_check order by checked_at")
    assert [(r[0], r[1], r[2]) for r in rows] == [(sym, minute, "found"), (sym, minute, "after_fill")]
    found, after = rows
    assert "trades" in found[3] and "volume" in found[3] and found[4] is None and found[5] == "stream"
    assert found[7] < found[6] and not found[8]
    assert after[3] == "" and after[4] is True and after[5] == "stored" and after[6] == after[7] and after[8]
    # the trade the stream never delivered is stored (from REST), ids contiguous
    lo, hi, n = q(db, "select min(agg_id), max(agg_id), count(*) from binance_agg_trade where symbol = %s",
                  (sym,))[0]
    assert n == hi - lo + 1
    # feedctl lists the minute and says it was repaired
    env = {"FEEDS_DSN": db}
    res = CliRunner().invoke(feedctl, ["kline-check", "--config", str(tmp_path / "none.toml"), "--json"], env=env)
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert [(x["symbol"], x["state"]) for x in listed] == [(sym, "repaired")]
    assert listed[0]["after_fill"]["repaired"] is True and "trades" in listed[0]["differs"]
    res = CliRunner().invoke(feedctl, ["kline-check", "--config", str(tmp_path / "none.toml"), "--symbol",
                                       sym.lower(), "--since", "1d"], env=env)
    assert res.exit_code == 0 and sym in res.output and "repaired" in res.output and "after the fill" in res.output
    res = CliRunner().invoke(feedctl, ["kline-check", "--config", str(tmp_path / "none.toml"), "--symbol",
                                       "SYM0000USDT"], env=env)
    assert res.exit_code == 0 and "no minute disagreed" in res.output


def test_test_connection_prints_the_plan_and_each_symbols_answer(tmp_path):
    with SimulatorThread(symbols=3, rate=50, seed=1) as sim:
        lines: list[str] = []
        rc = asyncio.run(check_connection(settings_for(sim), echo=lines.append))
        assert rc == 0, lines
        text = "\n".join(lines)
        assert "would subscribe 3 symbol(s) x 5 stream(s)" in text and "15 streams over 2 connection(s)" in text
        assert sum(1 for x in lines if x.startswith("ok   SYM")) == 3
        assert "ok   websocket /market" in text and "ok   websocket /public" in text
        lines.clear()
        rc = asyncio.run(check_connection(settings_for(sim, symbols=["SYM0000USDT", "NOPEUSDT"]), echo=lines.append))
        assert rc == 1
        assert any(x.startswith("FAIL NOPEUSDT") for x in lines) and any(x.startswith("ok   SYM0000USDT") for x in lines)
