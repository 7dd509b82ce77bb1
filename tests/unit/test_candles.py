"""Candle building (feeds.candles): alignment to the session open, session edges, early closes and
holidays, the grace timer, late trades (revision and drop), shutdown, process start, history seeding,
cumulative volume, quiet instruments, LTP-only and index instruments."""
from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from feeds.calendars import calendar
from feeds.candles import (MINUTE_NS, Candle, CandleBuilder, always, calendar_sessions, rollup)

NY = ZoneInfo("America/New_York")
IST = ZoneInfo("Asia/Kolkata")
S = 1_000_000_000


def at(tz, y, mo, d, h, mi, sec=0.0) -> int:
    """Epoch ns of a local wall-clock time."""
    whole = int(sec)
    t = dt.datetime(y, mo, d, h, mi, whole, tzinfo=tz)
    return int(t.timestamp()) * S + round((sec - whole) * S)


def ny(h, mi, sec=0.0, day=(2026, 6, 1)) -> int:
    return at(NY, *day, h, mi, sec)


def ist(h, mi, sec=0.0, day=(2026, 6, 1)) -> int:
    return at(IST, *day, h, mi, sec)


def local(ns: int, tz=NY) -> str:
    return dt.datetime.fromtimestamp(ns // S, tz).strftime("%H:%M")


def spans(candles, interval, tz=NY) -> list[str]:
    return [f"{local(c.start_ns, tz)}-{local(c.end_ns, tz)}" for c in candles if c.interval_min == interval]


@pytest.fixture(scope="module")
def xnys():
    return calendar_sessions(calendar("XNYS"))


@pytest.fixture(scope="module")
def xnse():
    return calendar_sessions(calendar("XNSE"))


def drain(b: CandleBuilder) -> list[Candle]:
    """Everything the builder still has to write, closed by a timer far in the future."""
    return b.due(b.next_due_ns() + 30 * 24 * 3600 * S) if b.next_due_ns() is not None else []


# ------------------------------------------------------------------------------------ alignment

def test_new_york_candles_align_to_0930_not_to_the_first_trade_or_process_start(xnys):
    b = CandleBuilder(xnys, (1, 5, 15), since_ns=ny(9, 31, 17))
    for t, p in [(ny(9, 31, 30), 10), (ny(9, 34, 59.5), 11), (ny(9, 35, 0), 12), (ny(9, 44, 0), 13),
                 (ny(9, 45, 1), 14)]:
        assert b.trade("AAPL", t, p, 100)
    out = drain(b)
    assert spans(out, 1) == ["09:31-09:32", "09:34-09:35", "09:35-09:36", "09:44-09:45", "09:45-09:46"]
    assert spans(out, 5) == ["09:30-09:35", "09:35-09:40", "09:40-09:45", "09:45-09:50"]
    assert spans(out, 15) == ["09:30-09:45", "09:45-10:00"]
    first = {c.interval_min: c for c in out if c.start_ns <= ny(9, 31, 30)}
    assert not any(c.final for c in first.values())         # began before the process started
    assert all(c.final for c in out if c.start_ns >= ny(9, 31, 17))
    m15 = [c for c in out if c.interval_min == 15][0]
    assert (m15.open, m15.high, m15.low, m15.close, m15.volume, m15.ticks) == (10, 13, 10, 13, 400, 4)


def test_india_candles_align_to_0915_and_the_last_hour_is_cut_at_1530(xnse):
    b = CandleBuilder(xnse, (1, 60))
    minutes = [ist(9, 15, 0.5)] + [ist(h, 20) for h in range(10, 16)] + [ist(15, 29, 59)]
    for i, t in enumerate(minutes):
        assert b.trade(408065, t, 100 + i, 1)
    assert not b.trade(408065, ist(9, 14, 59), 99, 1)     # pre-open: no candle
    assert not b.trade(408065, ist(15, 30, 0), 99, 1)     # the close is exclusive
    out = drain(b)
    assert spans(out, 60, IST) == ["09:15-10:15", "10:15-11:15", "11:15-12:15", "12:15-13:15", "13:15-14:15",
                                   "14:15-15:15", "15:15-15:30"]
    assert spans(out, 1, IST)[0] == "09:15-09:16" and spans(out, 1, IST)[-1] == "15:29-15:30"
    assert b.stats["outside_session"] == 2
    last = [c for c in out if c.interval_min == 60][-1]
    assert (last.open, last.close, last.ticks) == (106, 107, 2)


def test_early_close_cuts_the_last_candle_and_a_holiday_has_none(xnys):
    day = (2026, 11, 27)                                   # the day after Thanksgiving: 09:30-13:00
    b = CandleBuilder(xnys, (1, 5, 60))
    assert b.trade("SPY", ny(12, 59, 30, day), 600, 5)
    assert not b.trade("SPY", ny(13, 0, 0, day), 601, 5)
    assert not b.trade("SPY", ny(13, 5, 0, day), 601, 5)
    assert not b.trade("SPY", ny(11, 0, 0, (2026, 11, 26)), 601, 5)    # Thanksgiving: no session
    out = drain(b)
    assert spans(out, 60) == ["12:30-13:00"]
    assert spans(out, 5) == ["12:55-13:00"] and spans(out, 1) == ["12:59-13:00"]
    assert b.stats["outside_session"] == 3


def test_extended_hours_are_cut_at_their_edges_but_aligned_to_the_regular_open():
    sessions = calendar_sessions(calendar("XNYS"), pre_ns=30 * MINUTE_NS, post_ns=15 * MINUTE_NS)
    b = CandleBuilder(sessions, (1, 60))
    for t in (ny(9, 10), ny(9, 40), ny(16, 10)):
        assert b.trade("AAPL", t, 1, 1)
    assert not b.trade("AAPL", ny(8, 59, 59), 1, 1) and not b.trade("AAPL", ny(16, 15), 1, 1)
    assert spans(drain(b), 60) == ["09:00-09:30", "09:30-10:30", "15:30-16:15"]


def test_always_is_one_utc_day_and_crosses_midnight():
    midnight = int(dt.datetime(2024, 7, 2, tzinfo=dt.timezone.utc).timestamp()) * S
    b = CandleBuilder(always(), (1, 15))
    b.trade("ESU4", midnight - 30 * S, 1, 1)
    b.trade("ESU4", midnight + 30 * S, 2, 1)
    out = drain(b)
    assert [(c.interval_min, c.start_ns - midnight, c.end_ns - midnight) for c in out] == [
        (1, -MINUTE_NS, 0), (15, -15 * MINUTE_NS, 0), (1, 0, MINUTE_NS), (15, 0, 15 * MINUTE_NS)]


# ------------------------------------------------------------------------------------ the timer

def test_grace_timer_closes_candles_not_the_next_trade(xnys):
    b = CandleBuilder(xnys, (1, 5), grace_s=2.0, lateness_s=10.0)
    assert b.next_due_ns() is None
    b.trade("AAPL", ny(9, 30, 10), 100, 1)
    assert b.next_due_ns() == ny(9, 31, 2)
    assert b.due(ny(9, 31, 1.999)) == []
    b.trade("AAPL", ny(9, 31, 0.5), 101, 1)                # the next minute's trade closes nothing
    assert b.due(ny(9, 31, 1.999)) == []
    out = b.due(ny(9, 31, 2))
    assert [(c.interval_min, c.start_ns, c.close, c.final, c.revision) for c in out] == [
        (1, ny(9, 30), 100, True, 0)]
    assert b.due(ny(9, 31, 3)) == []                        # each candle once
    assert b.next_due_ns() == ny(9, 31, 10)                 # its revision window ends
    assert b.due(ny(9, 31, 10)) == []
    assert b.next_due_ns() == ny(9, 32, 2)
    assert [c.start_ns for c in b.due(ny(9, 32, 2))] == [ny(9, 31)]
    assert [(c.interval_min, c.start_ns, c.ticks) for c in b.due(ny(9, 35, 2))] == [(5, ny(9, 30), 2)]


def test_late_trade_within_lateness_revises_the_minute_and_the_closed_larger_candles(xnys):
    b = CandleBuilder(xnys, (1, 5, 15), grace_s=2.0, lateness_s=90.0)
    b.trade("AAPL", ny(9, 30, 10), 100, 1)
    b.trade("AAPL", ny(9, 34, 30), 101, 1)
    out = b.due(ny(9, 35, 2))
    assert [(c.interval_min, local(c.start_ns), c.high) for c in out] == [(1, "09:30", 100), (1, "09:34", 101),
                                                                          (5, "09:30", 101)]
    assert b.trade("AAPL", ny(9, 34, 59.9), 105, 3)           # arrives at 09:35:05
    assert b.trade("AAPL", ny(9, 33, 20), 90, 2)              # a minute without a candle yet
    assert not b.trade("AAPL", ny(9, 32, 20), 90, 2)          # ended 09:33, + 90 s < 09:35:02: too late
    assert b.next_due_ns() <= ny(9, 35, 5)
    out = b.due(ny(9, 35, 5))
    got = {(c.interval_min, local(c.start_ns)): c for c in out}
    assert set(got) == {(1, "09:33"), (1, "09:34"), (5, "09:30")}
    assert (got[1, "09:34"].revision, got[1, "09:34"].close, got[1, "09:34"].volume) == (1, 105, 4)
    assert (got[1, "09:33"].revision, got[1, "09:33"].open) == (0, 90)       # its first write
    m5 = got[5, "09:30"]
    assert (m5.revision, m5.open, m5.high, m5.low, m5.close, m5.volume, m5.ticks) == (1, 100, 105, 90, 105, 7, 4)
    assert b.stats["late_revised"] == 2 and b.stats["revisions"] == 2 and b.stats["late_dropped"] == 1
    assert b.due(ny(9, 35, 6)) == []
    out = b.due(ny(9, 45, 2))
    m15 = [c for c in out if c.interval_min == 15]
    assert [(c.revision, c.high, c.low, c.volume, c.ticks) for c in m15] == [(0, 105, 90, 7, 4)]


def test_trade_later_than_lateness_is_dropped_counted_and_logged_once_a_minute(xnys, caplog):
    b = CandleBuilder(xnys, (1, 5), grace_s=2.0, lateness_s=10.0)
    b.trade("AAPL", ny(9, 30, 10), 100, 1)
    first = b.due(ny(9, 31, 2))
    b.due(ny(9, 31, 10))                                      # the revision window is over
    with caplog.at_level(logging.WARNING, logger="feeds.candles"):
        assert not b.trade("AAPL", ny(9, 30, 50), 200, 1)
        assert not b.trade("AAPL", ny(9, 30, 51), 200, 1)
        assert not b.trade("MSFT", ny(10, 0, 0, (2026, 5, 29)), 200, 1)   # long gone, other key
        lines = [r.getMessage() for r in caplog.records if r.name == "feeds.candles"]
        assert len(lines) == 1 and "1 late trade(s) dropped" in lines[0]
        b.due(ny(9, 32, 9))                                   # less than a minute later: quiet
        assert len(caplog.records) == 1
        b.due(ny(9, 32, 10))                                  # a minute later: the count since
        lines = [r.getMessage() for r in caplog.records if r.name == "feeds.candles"]
        assert len(lines) == 2 and "2 late trade(s) dropped" in lines[1]
    assert b.stats["late_dropped"] == 3 and b.stats["ticks"] == 1
    out = drain(b)
    assert [(c.interval_min, c.high, c.ticks, c.revision) for c in out] == [(5, 100, 1, 0)]
    assert first[0].high == 100


def test_the_arrival_time_judges_lateness_between_timer_calls(xnys):
    b = CandleBuilder(xnys, (1,), grace_s=2.0, lateness_s=10.0, volume="cumulative")
    assert b.cumulative(408065, ny(10, 0, 30), 10, 100)
    b.due(ny(10, 1, 3))
    assert b.cumulative(408065, ny(10, 0, 59), 11, 110, now_ns=ny(10, 1, 5))      # 5 s late: revises
    assert not b.cumulative(408065, ny(10, 0, 58), 12, 120, now_ns=ny(10, 1, 30))  # 30 s late: dropped
    assert not b.trade(408065, ny(9, 59, 58), 12, now_ns=ny(10, 1, 30))            # a minute never seen
    assert b.cumulative(408065, ny(10, 1, 31), 13, 130, now_ns=ny(10, 1, 31))      # carries the dropped volume
    out = b.due(ny(10, 1, 31)) + drain(b)
    assert [(local(c.start_ns), c.revision, c.close, c.volume) for c in out] == [
        ("10:00", 1, 11, 110), ("10:01", 0, 13, 20)]
    assert b.stats["late_dropped"] == 2


def test_late_trades_never_counted_twice_and_revisions_are_batched(xnys):
    b = CandleBuilder(xnys, (1,), grace_s=1.0, lateness_s=30.0)
    b.trade("X", ny(9, 30, 1), 10, 1)
    b.due(ny(9, 31, 1))
    for i in range(5):
        assert b.trade("X", ny(9, 30, 2 + i), 10 + i, 1)
    out = b.due(ny(9, 31, 5))
    assert [(c.revision, c.ticks, c.volume, c.close) for c in out] == [(1, 6, 6, 14)]
    b.trade("X", ny(9, 30, 59), 9, 1)
    assert [(c.revision, c.ticks, c.low) for c in b.due(ny(9, 31, 20))] == [(2, 7, 9)]
    assert b.stats["ticks"] == 7


# ------------------------------------------------------------------------------------ shutdown, start

def test_close_all_writes_open_candles_of_every_interval_not_final(xnys):
    b = CandleBuilder(xnys, (1, 5, 15))
    b.trade("AAPL", ny(9, 30, 10), 100, 1)
    b.trade("AAPL", ny(9, 31, 10), 102, 2)
    assert [c.start_ns for c in b.due(ny(9, 31, 30))] == [ny(9, 30)]
    out = b.close_all()
    assert [(c.interval_min, local(c.start_ns), c.final, c.ticks) for c in out] == [
        (1, "09:31", False, 1), (5, "09:30", False, 2), (15, "09:30", False, 2)]
    assert b.close_all() == [] and b.next_due_ns() is None


def test_trades_from_before_the_process_start_are_late_not_old_candles(xnys):
    b = CandleBuilder(xnys, (1,), since_ns=ny(11, 0, 30), lateness_s=10.0)
    assert not b.trade("AAPL", ny(10, 30, 5), 99, 1)          # a snapshot of an old trade
    assert b.trade("AAPL", ny(11, 0, 40), 100, 1)
    out = drain(b)
    assert [(local(c.start_ns), c.final) for c in out] == [("11:00", False)]


# ------------------------------------------------------------------------------------ history

def bar(start, o, h, l, c, v=10, n=2):
    return (start, o, h, l, c, v, n)


def test_seed_fills_missed_minutes_and_the_larger_candles_roll_them_up(xnys):
    since = ny(9, 42, 30)
    b = CandleBuilder(xnys, (1, 5, 15), since_ns=since)
    hist = [bar(ny(9, 30 + i), 100 + i, 101 + i, 99 + i, 100 + i) for i in range(12) if i != 7]   # no 09:37 trades
    seeded = b.seed("AAPL", hist)
    assert [c.source for c in seeded] == ["history"] * 13 and all(c.final and c.revision == 0 for c in seeded)
    assert spans(seeded, 5) == ["09:30-09:35", "09:35-09:40"]       # complete, history only
    m5 = [c for c in seeded if c.interval_min == 5]
    assert (m5[1].open, m5[1].high, m5[1].low, m5[1].close, m5[1].volume, m5[1].ticks) == (105, 110, 104, 109, 40, 8)
    assert b.stats["history_bars"] == 11
    assert not b.trade("AAPL", ny(9, 41, 30), 1, 1)              # a seeded minute: history has it
    for t, p in [(ny(9, 42, 40), 120), (ny(9, 43, 10), 121), (ny(9, 44, 10), 119)]:
        assert b.trade("AAPL", t, p, 5)
    live = drain(b)
    assert [(c.interval_min, local(c.start_ns), c.final, c.source) for c in live] == [
        (1, "09:42", False, "live"), (1, "09:43", True, "live"), (1, "09:44", True, "live"),
        (5, "09:40", False, "live"), (15, "09:30", False, "live")]
    ones = [c for c in seeded + live if c.interval_min == 1]
    for n in (5, 15):
        expect = rollup(ones, xnys, n)
        got = sorted((c for c in seeded + live if c.interval_min == n), key=lambda c: c.start_ns)
        assert [(c.start_ns, c.end_ns, c.open, c.high, c.low, c.close, c.volume, c.ticks) for c in got] == \
            [(c.start_ns, c.end_ns, c.open, c.high, c.low, c.close, c.volume, c.ticks) for c in expect]


def test_history_up_to_the_start_makes_larger_candles_complete(xnys):
    b = CandleBuilder(xnys, (1, 5), since_ns=ny(9, 32))
    seeded = b.seed("AAPL", [bar(ny(9, 30), 1, 2, 1, 2), bar(ny(9, 31), 2, 3, 2, 3)], until_ns=ny(9, 32))
    assert spans(seeded, 1) == ["09:30-09:31", "09:31-09:32"] and spans(seeded, 5) == []
    b.trade("AAPL", ny(9, 32, 1), 4, 1)
    out = drain(b)
    m5 = [c for c in out if c.interval_min == 5][0]
    assert (m5.final, m5.source, m5.open, m5.close, m5.volume, m5.ticks) == (True, "live", 1, 4, 21, 5)


@pytest.mark.parametrize("closed_first", [False, True])
def test_history_completes_the_minute_the_process_started_in(xnys, closed_first):
    b = CandleBuilder(xnys, (1, 5), since_ns=ny(9, 32, 30))
    b.trade("AAPL", ny(9, 32, 40), 50, 1)
    b.trade("AAPL", ny(9, 33, 10), 51, 1)
    first = b.due(ny(9, 33, 2)) if closed_first else []
    assert [(c.start_ns, c.final) for c in first] == ([(ny(9, 32), False)] if closed_first else [])
    seeded = b.seed("AAPL", [bar(ny(9, 31), 40, 41, 39, 40), bar(ny(9, 32), 45, 52, 44, 50, 30, 9)],
                    until_ns=ny(9, 33))
    assert b.stats["history_replaced"] == 1
    assert not b.trade("AAPL", ny(9, 32, 50), 99, 1)                # history has the minute now
    out = seeded + drain(b)
    m32 = [c for c in out if c.interval_min == 1 and c.start_ns == ny(9, 32)]
    assert [(c.source, c.final, c.revision, c.high, c.volume, c.ticks) for c in m32] == [
        ("history", True, 1 if closed_first else 0, 52, 30, 9)]
    m5 = [c for c in out if c.interval_min == 5]
    assert [(c.final, c.open, c.high, c.low, c.close, c.volume, c.ticks) for c in m5] == [
        (True, 40, 52, 39, 51, 41, 12)]
    assert b.stats["ticks"] == 2


def test_seed_skips_minutes_with_a_live_candle_and_revises_a_closed_larger_one(xnys):
    b = CandleBuilder(xnys, (1, 5), lateness_s=600)
    b.trade("AAPL", ny(9, 31, 5), 50, 1)
    b.trade("AAPL", ny(9, 33, 5), 50, 1)
    out = b.due(ny(9, 35, 2))
    assert spans(out, 5) == ["09:30-09:35"]
    seeded = b.seed("AAPL", [bar(ny(9, 31), 1, 1, 1, 1), bar(ny(9, 32), 60, 70, 40, 45, 7, 3)])
    assert spans(seeded, 1) == ["09:32-09:33"] and b.stats["history_skipped"] == 1
    rev = b.due(ny(9, 35, 3))
    assert [(c.interval_min, c.revision, c.high, c.low, c.volume, c.ticks, c.source) for c in rev] == [
        (5, 1, 70, 40, 9, 5, "live")]


def test_rollup_is_aligned_and_cut_like_the_builder(xnse):
    day = (2026, 6, 1)
    ones = [Candle("NIFTY", 1, ist(15, m, day=day), ist(15, m + 1, day=day), 10 + m, 20 + m, 5 + m, 11 + m, None,
                   1, True, 0, "history") for m in (14, 15, 29)]
    got = rollup(ones, xnse, 15)
    assert [(local(c.start_ns, IST), local(c.end_ns, IST), c.open, c.high, c.low, c.close, c.volume, c.source)
            for c in got] == [("15:00", "15:15", 24, 34, 19, 25, None, "history"),
                              ("15:15", "15:30", 25, 49, 20, 40, None, "history")]
    with pytest.raises(ValueError, match="outside every session"):
        rollup([Candle("X", 1, ist(8, 0), ist(8, 1), 1, 1, 1, 1, 1, 1, True, 0, "live")], xnse, 5)


# ------------------------------------------------------------------------------------ volume

def test_cumulative_volume_from_zero_at_the_open_a_decrease_is_counted_not_subtracted(xnse):
    b = CandleBuilder(xnse, (1, 5), volume="cumulative")
    for t, p, cum in [(ist(9, 15, 5), 100, 100), (ist(9, 15, 30), 101, 150), (ist(9, 16, 10), 102, 140),
                      (ist(9, 16, 20), 103, 160)]:
        assert b.cumulative(408065, t, p, cum)
    assert b.cumulative(408065, ist(9, 15, 5, (2026, 6, 2)), 104, 30)     # next day: reset at the open
    out = drain(b)
    assert [(c.interval_min, local(c.start_ns, IST), c.volume, c.ticks) for c in out] == [
        (1, "09:15", 150, 2), (1, "09:16", 10, 2), (5, "09:15", 160, 4), (1, "09:15", 30, 1), (5, "09:15", 30, 1)]
    assert b.stats["volume_reset"] == 1


def test_cumulative_volume_started_inside_the_session_takes_the_first_value_as_baseline(xnse):
    b = CandleBuilder(xnse, (1,), volume="cumulative", since_ns=ist(10, 0, 30))
    assert not b.cumulative(256265, ist(9, 59, 0), 100, 4_000)    # old snapshot: late, but a baseline
    assert b.cumulative(256265, ist(10, 0, 40), 100, 5_000)
    assert b.cumulative(256265, ist(10, 1, 10), 101, 5_100)
    out = drain(b)
    assert [(local(c.start_ns, IST), c.volume, c.final) for c in out] == [("10:00", 1_000, False),
                                                                          ("10:01", 100, True)]


def test_ltp_only_and_index_instruments_have_no_volume(xnse):
    b = CandleBuilder(xnse, (1, 5), volume="cumulative")
    assert b.cumulative(256265, ist(9, 20, 1), 24_000, None)         # LTP mode: no volume_traded
    assert b.cumulative(256265, ist(9, 21, 1), 24_010, None)
    n = CandleBuilder(xnse, (1,), volume="none")
    assert n.trade("NIFTY 50", ist(9, 20, 1), 24_000, 7)
    s = CandleBuilder(xnse, (1,))
    assert s.trade("NIFTY 50", ist(9, 20, 1), 24_000)                 # index: no size
    assert [c.volume for c in drain(b)] == [None, None, None]
    assert [c.volume for c in drain(n)] == [None] and [c.volume for c in drain(s)] == [None]


def test_instrument_that_does_not_trade_for_minutes_has_no_candles_for_them(xnys):
    b = CandleBuilder(xnys, (1, 5))
    b.trade("A", ny(9, 30, 1), 1, 1)
    b.trade("B", ny(9, 31, 1), 1, 1)
    b.trade("B", ny(9, 33, 1), 1, 1)
    b.trade("A", ny(9, 36, 1), 2, 1)
    out = b.due(ny(9, 40, 5))
    assert sorted((c.key, c.interval_min, local(c.start_ns)) for c in out) == [
        ("A", 1, "09:30"), ("A", 1, "09:36"), ("A", 5, "09:30"), ("A", 5, "09:35"),
        ("B", 1, "09:31"), ("B", 1, "09:33"), ("B", 5, "09:30")]


# ------------------------------------------------------------------------------------ misc

def test_batch_entry_point_equals_single_trades(xnys):
    trades = [("AAPL" if i % 3 else "MSFT", ny(9, 30) + i * 7 * S + (i % 5) * 1000, 100 + (i * 37) % 11, i % 4)
              for i in range(300)]
    one, many = CandleBuilder(xnys), CandleBuilder(xnys)
    for t in trades:
        one.trade(*t)
    assert many.trades(reversed(trades)) == 300
    key = lambda c: (c.key, c.interval_min, c.start_ns)  # noqa: E731
    assert sorted(drain(one), key=key) == sorted(drain(many), key=key)


def test_ties_at_the_same_time_open_low_and_close_high(xnys):
    b = CandleBuilder(xnys, (1,))
    t = ny(9, 30, 5)
    for p in (7, 3, 9, 5):
        b.trade("X", t, p, 1)
    c = drain(b)[0]
    assert (c.open, c.high, c.low, c.close) == (3, 9, 3, 9)


def test_candle_decimal_converts_without_binary_float_surprises():
    c = Candle(1, 1, 0, MINUTE_NS, 157370, 157400, 157000, 157005, 12, 3, True, 0, "live")
    d = c.decimal(scale=2)
    assert (d.open, d.high, d.low, d.close, d.volume) == (Decimal("1573.70"), Decimal("1574.00"),
                                                          Decimal("1570.00"), Decimal("1570.05"), Decimal(12))
    f = Candle("X", 1, 0, MINUTE_NS, 0.1, 0.3, 0.1, 0.2, None, 1, True, 0, "live").decimal()
    assert (f.open, f.high, f.close, f.volume) == (Decimal("0.1"), Decimal("0.3"), Decimal("0.2"), None)


@pytest.mark.parametrize("kw", [dict(intervals_min=()), dict(intervals_min=(0, 5)), dict(volume="vwap"),
                                dict(grace_s=-1)])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        CandleBuilder(always(), **kw)


def test_bucket_start_is_the_builders_own_grid_anchored_at_the_regular_open():
    extended = calendar_sessions(calendar("XNYS"), pre_ns=int(5.5 * 3600) * S, post_ns=4 * 3600 * S)
    b = CandleBuilder(extended, (1, 5, 15))
    # pre-market, extended hours: aligned to 09:30, not to the 04:00 start of the window
    assert b.bucket_start(ny(7, 59, 30), 15) == ny(7, 45)
    assert b.bucket_start(ny(7, 59), 5) == ny(7, 55)
    assert b.bucket_start(ny(7, 59, 59), 1) == ny(7, 59)
    assert b.bucket_start(ny(4, 0), 15) == ny(4, 0)          # the window's first bucket
    assert b.bucket_start(ny(21, 0), 15) is None              # after the post-market: no session


def test_an_early_sessions_pre_market_from_the_evening_before_is_aligned_to_its_own_open():
    from datetime import date, time
    from feeds.calendars import ExchangeCalendar
    cal = ExchangeCalendar("XNYS", extra_sessions={date(2026, 12, 1): (time(0, 38), time(2, 8))})
    b = CandleBuilder(calendar_sessions(cal, pre_ns=int(5.5 * 3600) * S, post_ns=4 * 3600 * S), (1, 15))
    # 00:59 New York: the pre-market began at 19:08 on Nov 30, inside that day's post-market hours
    assert b.bucket_start(ny(0, 59, day=(2026, 12, 1)), 15) == ny(0, 53, day=(2026, 12, 1))
