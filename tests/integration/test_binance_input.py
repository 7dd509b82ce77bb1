"""feed-binance input checks end to end: implausible frames sent by the simulator
ahead of a real recording, and implausible rows already in the database at start,
through python-binance, the collector and PostgreSQL."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from feeds.sim.binance import SimulatorThread

from binance_harness import CollectorThread, q, recording_frames, settings_for, stream_counts, wait_until
from conftest import shared_file
from test_binance_collector import assert_recording_stored

pytestmark = pytest.mark.integration

RECORDING = "binance-usdm-2021-07-22.frames"
YEAR_33658_MS = 10 ** 15
YEAR_2100_MS = 4_102_444_800_000


def first_of(frames, stream):
    return next(d for s, d in frames if s == stream)


def bad_frames(frames) -> list[tuple[str, dict]]:
    """Implausible variants of each stream's first real frame (ids, times, prices, types)."""
    bt = {s: first_of(frames, f"{s}@bookTicker") for s in ("sushiusdt", "akrousdt", "ctkusdt", "keepusdt")}
    ag = {s: first_of(frames, f"{s}@aggTrade") for s in ("sushiusdt", "akrousdt", "ctkusdt", "keepusdt")}
    kl = {s: first_of(frames, f"{s}@kline_1m") for s in ("sushiusdt", "ctkusdt")}
    far_kline = dict(kl["ctkusdt"], E=YEAR_2100_MS + 1000,
                     k=dict(kl["ctkusdt"]["k"], t=YEAR_2100_MS, T=YEAR_2100_MS + 59_999, x=True))
    return [
        ("sushiusdt@bookTicker", dict(bt["sushiusdt"], u=2 ** 63)),                      # beyond bigint
        ("akrousdt@bookTicker", dict(bt["akrousdt"], u=bt["akrousdt"]["u"] + 10 ** 12)),  # far ahead
        ("sushiusdt@aggTrade", dict(ag["sushiusdt"], a=ag["sushiusdt"]["a"] + 10 ** 12)),
        ("ctkusdt@aggTrade", dict(ag["ctkusdt"], E=YEAR_33658_MS, T=YEAR_33658_MS)),       # year 33658
        ("keepusdt@aggTrade", dict(ag["keepusdt"], E=0)),                                 # 1970
        ("keepusdt@bookTicker", dict(bt["keepusdt"], b="-" + bt["keepusdt"]["b"])),       # negative price
        ("ctkusdt@bookTicker", dict(bt["ctkusdt"], a="1e400")),
        ("akrousdt@aggTrade", dict(ag["akrousdt"], p="9" * 100)),                         # 100 digits
        ("sushiusdt@bookTicker", dict(bt["sushiusdt"], b="\u0667.\u0666\u0661\u0661\u0660")),  # non-ASCII digits
        ("sushiusdt@kline_1m", dict(kl["sushiusdt"], k=dict(kl["sushiusdt"]["k"], s=["SUSHIUSDT"]))),
        ("ctkusdt@kline_1m", far_kline),                                                 # closed, in 2100
    ]


def recording_with_bad_frames_first(src: Path, dst: Path, bad: list[tuple[str, dict]]) -> None:
    lines = src.read_text().splitlines()
    i = next(j for j, line in enumerate(lines) if line.partition(": ")[2].startswith('{"stream"'))
    t0 = float(lines[i].partition(": ")[0])
    injected = [f"{t0 - 0.001:.6f}: " + json.dumps({"stream": s, "data": d}, separators=(",", ":"),
                                                   ensure_ascii=False) for s, d in bad]
    dst.write_text("\n".join(lines[:i] + injected + lines[i:]) + "\n")


def total_rows(db) -> int:
    return q(db, "select (select count(*) from binance_agg_trade) + (select count(*) from binance_book_ticker) + "
                 "(select count(*) from binance_kline)")[0][0]


def test_implausible_frames_before_a_real_recording_are_malformed_and_every_real_frame_is_stored(db, tmp_path):
    src = shared_file("binance", RECORDING)
    frames = recording_frames(src)
    bad = bad_frames(frames)
    path = tmp_path / "with-bad-frames.frames"
    recording_with_bad_frames_first(src, path, bad)
    syms = sorted({d["s"] for _, d in frames})
    want = sum(stream_counts(frames).values())
    with SimulatorThread(replay=[path], speed=0, replay_wait=2.0) as sim:
        s = settings_for(sim, symbols=syms, streams=["aggTrade", "bookTicker", "kline"])
        with CollectorThread(db, tmp_path / "spool", s) as c:
            wait_until(lambda: sim.stats()["replay_finished"], 90, what="replay end")
            wait_until(lambda: total_rows(db) >= want, 30, what="rows")
            wait_until(lambda: c.health.malformed >= len(bad), 10, what="malformed counted")
            time.sleep(1.0)
    # every real frame stored exactly as sent; none of the bad ones
    assert_recording_stored(db, frames)
    assert c.health.malformed == len(bad)
    assert c.collector.counters["duplicates_skipped"] == 0
    assert c.collector.counters["reconnects"] == 0 and c.collector.counters["gaps"] == 0
    assert q(db, "select count(*) from binance_agg_trade where event_time < '2019-09-01' "
                 "or trade_time > now() + interval '1 day' or event_time > now() + interval '1 day'")[0][0] == 0
    assert q(db, "select count(*) from binance_kline where open_time > now()")[0][0] == 0


def test_restart_with_implausible_rows_in_the_database_does_not_make_later_frames_duplicates(db, tmp_path):
    """Rows an older version stored from bad frames: an aggTrade id 10**12 ahead (stamped now),
    aggTrade and kline rows stamped in the future.  The next start reads its resume state
    from these tables; the real frames that follow must all be stored."""
    src = shared_file("binance", RECORDING)
    frames = recording_frames(src)
    last_a = {}
    for s, d in frames:
        if d["e"] == "aggTrade":
            last_a[d["s"]] = d["a"]
    poison_agg = [("SUSHIUSDT", last_a["SUSHIUSDT"] + 10 ** 12, "now()"),
                  ("CTKUSDT", last_a["CTKUSDT"] + 10, "now() + interval '30 days'"),
                  ("AKROUSDT", 2 ** 62, "now() + interval '300 years'")]
    import psycopg
    with psycopg.connect(db, autocommit=True) as conn:
        for days in (0, 30):
            conn.execute("SELECT feeds_ensure_day_partitions('binance_agg_trade'::regclass, "
                         "(now() + make_interval(days => %s))::date, 1)", (days,))
        conn.execute("SELECT feeds_ensure_day_partitions('binance_agg_trade'::regclass, "
                     "(now() + interval '300 years')::date, 1)")
        for sym, a, t in poison_agg:
            conn.execute(f"INSERT INTO binance_agg_trade (symbol, agg_id, price, qty, first_trade_id, last_trade_id, "
                         f"trade_time, is_buyer_maker, event_time, recv_time) "
                         f"VALUES (%s, %s, 1, 1, 1, 1, {t}, true, {t}, now())", (sym, a))
        conn.execute("INSERT INTO binance_kline (symbol, interval, open_time, close_time, open, high, low, close, "
                     "volume, trade_count, quote_volume, taker_buy_volume, taker_buy_quote_volume, recv_time, source) "
                     "VALUES ('SUSHIUSDT', '1m', date_trunc('minute', now()) + interval '30 days', "
                     "date_trunc('minute', now()) + interval '30 days 59.999 seconds', 1, 1, 1, 1, 1, 1, 1, 1, 1, "
                     "now(), 'ws')")
    syms = sorted({d["s"] for _, d in frames})
    want = sum(stream_counts(frames).values()) + len(poison_agg) + 1
    with SimulatorThread(replay=[src], speed=0, replay_wait=2.0) as sim:
        s = settings_for(sim, symbols=syms, streams=["aggTrade", "bookTicker", "kline"])
        with CollectorThread(db, tmp_path / "spool", s) as c:
            wait_until(lambda: sim.stats()["replay_finished"], 90, what="replay end")
            wait_until(lambda: total_rows(db) >= want, 30, what="rows")
            time.sleep(1.0)
    assert c.collector.counters["duplicates_skipped"] == 0
    assert c.collector.counters["id_jumps_accepted"] == 1          # SUSHIUSDT: from the bad id back to the real ones
    assert c.health.malformed == 0
    # the bad rows are still there (the collector never deletes); without them the tables hold the recording
    with psycopg.connect(db, autocommit=True) as conn:
        for sym, a, _ in poison_agg:
            assert conn.execute("DELETE FROM binance_agg_trade WHERE symbol = %s AND agg_id = %s",
                                (sym, a)).rowcount == 1
        assert conn.execute("DELETE FROM binance_kline WHERE open_time > now()").rowcount == 1
    assert_recording_stored(db, frames)
