"""feed-binance end to end: the simulator, the real python-binance, the collector, PostgreSQL."""
from __future__ import annotations

import time

import pytest

from feeds.sim.binance import SimulatorThread

from binance_harness import CollectorThread, q, recording_frames, settings_for, stream_counts, wait_until
from conftest import shared_file

pytestmark = pytest.mark.integration


def rows_stored(dsn) -> int:
    return q(dsn, "select (select count(*) from binance_agg_trade) + (select count(*) from binance_book_ticker) + "
                  "(select count(*) from binance_kline)")[0][0]


def sent_frames_all_received(sim, c) -> bool:
    """True once the collector has taken in every frame the simulator handed to a connection:
    per stream, messages seen by the collector >= frames sent (a stream nobody subscribed has none)."""
    for name, v in sim.stats()["streams"].items():
        if v["sent"] and (name not in c.collector.routes or c.health.stream(name).count < v["sent"]):
            return False
    return True


def assert_recording_stored(dsn, frames):
    want = stream_counts(frames)
    got = {
        "aggTrade": q(dsn, "select count(*) from binance_agg_trade")[0][0],
        "bookTicker": q(dsn, "select count(*) from binance_book_ticker")[0][0],
        "kline_closed": q(dsn, "select count(*) from binance_kline")[0][0],
    }
    assert got == {k: want.get(k, 0) for k in got}
    # values equal the recorded strings exactly
    aggs = {(r[0], r[1]): r[2:] for r in q(dsn, "select symbol, agg_id, price::text, qty::text, first_trade_id, "
                                                "last_trade_id, (extract(epoch from trade_time)*1000)::bigint, "
                                                "is_buyer_maker, (extract(epoch from event_time)*1000)::bigint "
                                                "from binance_agg_trade")}
    books = {(r[0], r[1]): r[2:] for r in q(dsn, "select symbol, update_id, bid_price::text, bid_qty::text, "
                                                 "ask_price::text, ask_qty::text, "
                                                 "(extract(epoch from transaction_time)*1000)::bigint, "
                                                 "(extract(epoch from event_time)*1000)::bigint "
                                                 "from binance_book_ticker")}
    klines = {(r[0], r[1]): r[2:] for r in q(dsn, "select symbol, (extract(epoch from open_time)*1000)::bigint, "
                                                  "open::text, high::text, low::text, close::text, volume::text, "
                                                  "trade_count, quote_volume::text from binance_kline")}
    n = 0
    for stream, d in frames:
        if d["e"] == "aggTrade":
            assert aggs[(d["s"], d["a"])] == (d["p"], d["q"], d["f"], d["l"], d["T"], d["m"], d["E"])
            n += 1
        elif d["e"] == "bookTicker":
            assert books[(d["s"], d["u"])] == (d["b"], d["B"], d["a"], d["A"], d["T"], d["E"])
            n += 1
        elif d["e"] == "kline" and d["k"]["x"]:
            k = d["k"]
            assert klines[(k["s"], k["t"])] == (k["o"], k["h"], k["l"], k["c"], k["v"], k["n"], k["q"])
            n += 1
    assert n == sum(got.values())
    dup = q(dsn, "select (select count(*) - count(distinct (symbol, agg_id)) from binance_agg_trade), "
                 "(select count(*) - count(distinct (symbol, update_id)) from binance_book_ticker)")[0]
    assert dup == (0, 0)


@pytest.mark.parametrize("recording", ["binance-usdm-2021-07-22.frames", "binance-usdm-2021-04-05.frames"])
def test_real_recording_replayed_into_postgres_exactly(db, tmp_path, recording):
    path = shared_file("binance", recording)
    frames = recording_frames(path)
    with SimulatorThread(replay=[path], speed=0, replay_wait=2.0) as sim:
        syms = sorted({d["s"] for _, d in frames})
        # subscribe what the recording holds (the simulator would derive the rest, e.g. klines)
        kinds = [k for k in ("aggTrade", "bookTicker", "kline") if any(f"@{k}" in s for s, _ in frames)]
        with CollectorThread(db, tmp_path, settings_for(sim, symbols=syms, streams=kinds)) as c:
            wait_until(lambda: sim.stats()["replay_finished"], 180, what="replay end")
            want = sum(stream_counts(frames).values())
            wait_until(lambda: rows_stored(db) >= want, 120, what="rows")
            # nothing more can arrive: every frame sent was taken in (leaving the block flushes the rest)
            wait_until(lambda: sent_frames_all_received(sim, c), 120, what="every sent frame received")
        st = sim.stats()
    assert st["unsent_total"] == sum(v["unsent"] for k, v in st["streams"].items() if "depth" in k)
    assert_recording_stored(db, frames)
    assert c.health.malformed == 0


def test_postgres_outage_of_30s_mid_replay_loses_and_duplicates_nothing(pg, db, tmp_path):
    path = shared_file("binance", "binance-usdm-2021-04-05.frames")
    frames = recording_frames(path)
    syms = sorted({d["s"] for _, d in frames})
    with SimulatorThread(replay=[path], speed=2.5, replay_wait=2.0) as sim:
        s = settings_for(sim, symbols=syms, streams=["aggTrade", "bookTicker"])
        with CollectorThread(db, tmp_path, s) as c:
            wait_until(lambda: q(db, "select count(*) from binance_book_ticker")[0][0] > 300, 60, what="first rows")
            pg.stop("fast")
            try:
                t = time.monotonic()
                wait_until(lambda: c.sink.spooling and c.sink.stats.spooled_rows > 200, 60, what="spooling")
                assert list(tmp_path.glob("spool-*.bin"))
                # the watchdog keeps being fed while rows are spooled to disk (PostgreSQL is down)
                pings = c.health.pings
                wait_until(lambda: c.health.pings > pings, 120, what="watchdog ping while spooling")
                assert c.sink.spooling
                # the outage lasts 30 s (the scenario, not a check)
                time.sleep(max(0.0, 30 - (time.monotonic() - t)))
            finally:
                pg.start()
            wait_until(lambda: sim.stats()["replay_finished"], 180, what="replay end")
            wait_until(lambda: not c.sink.spooling and not list(tmp_path.glob("spool-*.bin")), 120,
                       what="replay of spool")
            want = sum(stream_counts(frames).values())
            wait_until(lambda: c.sink.stats.replayed_rows == c.sink.stats.spooled_rows, 120, what="spool replayed")
            wait_until(lambda: rows_stored(db) >= want, 120, what="rows")
            wait_until(lambda: sent_frames_all_received(sim, c), 120, what="every sent frame received")
        assert c.sink.stats.replayed_rows == c.sink.stats.spooled_rows > 0
    assert_recording_stored(db, frames)


def contiguous(db) -> list:
    return q(db, "select symbol, min(agg_id), max(agg_id), count(*), count(distinct agg_id) "
                 "from binance_agg_trade group by symbol order by symbol")


def all_contiguous(db, symbols: int) -> bool:
    rows = contiguous(db)
    return len(rows) == symbols and all(n == nd == hi - lo + 1 for sym, lo, hi, n, nd in rows)


def test_dropped_connection_reconnects_and_agg_gap_is_filled_from_rest(db, tmp_path):
    with SimulatorThread(symbols=4, rate=400, seed=7) as sim:
        with CollectorThread(db, tmp_path, settings_for(sim)) as c:
            wait_until(lambda: q(db, "select count(*) from binance_agg_trade")[0][0] > 200, 60, what="first rows")
            total = sim.stats()["connections_total"]
            dropped = sim.call(sim.sim.fault_drop)
            assert dropped >= 2
            # the collector connects again before ids are skipped on the live stream
            wait_until(lambda: sim.stats()["connections_total"] >= total + dropped, 60, what="reconnect")
            sim.call(sim.sim.fault_skip, "SYM0001USDT", 25)       # and ids skipped on the live stream
            wait_until(lambda: c.collector.counters["gaps"] >= 1 and c.collector.counters["gap_trades_filled"] > 0,
                       60, what="gap fill")
            n = q(db, "select count(*) from binance_agg_trade")[0][0]
            wait_until(lambda: q(db, "select count(*) from binance_agg_trade")[0][0] > n + 200, 60, what="more rows")
            wait_until(lambda: not c.collector.gaps_open and all_contiguous(db, 4), 60, what="gap closed in the table")
        assert c.collector.counters["reconnects"] + c.collector.counters["rollovers"] >= 1 or \
            sim.stats()["connections_total"] >= 4
    rows = contiguous(db)
    assert len(rows) == 4
    for sym, lo, hi, n, nd in rows:
        assert n == nd == hi - lo + 1, (sym, lo, hi, n)
    assert q(db, "select count(*) from binance_agg_trade where event_time is null")[0][0] > 0   # some came from REST
    assert q(db, "select count(*) from binance_agg_gap")[0][0] == 0


def test_malformed_frames_counted_and_skipped_run_goes_on(db, tmp_path):
    with SimulatorThread(symbols=2, rate=200, seed=3) as sim:
        with CollectorThread(db, tmp_path, settings_for(sim)) as c:
            wait_until(lambda: q(db, "select count(*) from binance_agg_trade")[0][0] > 50, 60, what="first rows")
            sent = sim.call(sim.sim.fault_malformed, 4)
            assert sent > 0
            wait_until(lambda: c.health.malformed >= sent, 60, what="malformed counted")
            n = q(db, "select count(*) from binance_agg_trade")[0][0]
            wait_until(lambda: q(db, "select count(*) from binance_agg_trade")[0][0] > n + 100, 60, what="rows after")
    for sym, lo, hi, n, nd in contiguous(db):
        assert n == nd == hi - lo + 1


def test_stalled_stream_detected_per_stream_and_connection_replaced(db, tmp_path):
    with SimulatorThread(symbols=2, rate=200, seed=5) as sim:
        s = settings_for(sim)
        s.stale_after = dict(s.stale_after, bookTicker=3.0)
        with CollectorThread(db, tmp_path, s) as c:
            wait_until(lambda: q(db, "select count(*) from binance_book_ticker")[0][0] > 50, 60, what="first rows")
            sim.call(sim.sim.fault_stall, "sym0000usdt@bookTicker", 120.0)
            wait_until(lambda: c.collector.counters["stale"] >= 1 and c.collector.counters["rollovers"] >= 1,
                       120, what="stale stream replaced")
    for sym, lo, hi, n, nd in contiguous(db):
        assert n == nd == hi - lo + 1


def test_rollover_new_connection_before_old_closes_no_gap_no_duplicate(db, tmp_path):
    with SimulatorThread(symbols=3, rate=600, seed=11) as sim:
        with CollectorThread(db, tmp_path, settings_for(sim, rollover_after=3.0)) as c:
            wait_until(lambda: c.collector.counters["rollovers"] >= 3, 60, what="rollovers")
        assert c.collector.counters["gaps"] == 0
        assert c.collector.counters["duplicates_skipped"] > 0      # the overlap was seen and de-duplicated
    for sym, lo, hi, n, nd in contiguous(db):
        assert n == nd == hi - lo + 1


def test_only_trading_perpetuals_from_exchange_info_and_split_by_category(db, tmp_path):
    with SimulatorThread(symbols=30, rate=300, seed=2) as sim:
        with CollectorThread(db, tmp_path, settings_for(sim, max_streams_per_connection=40)) as c:
            wait_until(lambda: c.health.ready, 60, what="READY")
            assert len(c.collector.symbols) == 30 and all(s.startswith("SYM") for s in c.collector.symbols)
            slots = c.collector.slots
            assert {s.category for s in slots} == {"market", "public"}
            assert all(len(s.streams) <= 40 for s in slots)
            assert all(("bookTicker" in n) == (s.category == "public") for s in slots for n in s.streams)
            assert len(c.collector.routes) == 30 * 5
            wait_until(lambda: any(m.startswith("STATUS=aggTrade") or "aggTrade" in m for m in c.notifier.sent
                                   if m.startswith("STATUS=")), 60, what="STATUS")
            assert "READY=1" in c.notifier.sent and "WATCHDOG=1" in c.notifier.sent
