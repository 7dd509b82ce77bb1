"""Properties of candle building (feeds.candles), over generated trades:

* any arrival order of the same trades within the lateness gives the same candles (open = earliest
  exchange time, close = latest, ties by value);
* volume is conserved;
* high >= max(open, close) and low <= min(open, close);
* a trade later than the lateness never changes a candle;
* 5 and 15 minute candles equal the one-minute ones rolled up.

The sessions open at an odd time (hh:01:30) and close at hh:50:00, so that every interval has a
first and a last candle cut at a session edge.
"""
from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.candles import MINUTE_NS, CandleBuilder, rollup

S = 1_000_000_000
HOUR = 3600 * S
BASE = 1_704_067_200 * S            # 2024-01-01 00:00 UTC
GRACE_S, LATENESS_S = 2.0, 10.0
LATENESS = int(LATENESS_S * S)
INTERVALS = (1, 5, 15)


class HourlySessions:
    """One session an hour, [hh:01:30, hh:50:00)."""

    def window(self, ts_ns: int) -> tuple[int, int] | None:
        h = ts_ns - ts_ns % HOUR
        o, c = h + 90 * S, h + 50 * MINUTE_NS
        return (o, c) if o <= ts_ns < c else None


SESSIONS = HourlySessions()


def minute_end(ts: int) -> int:
    o, c = SESSIONS.window(ts)
    return min(o + (ts - o) // MINUTE_NS * MINUTE_NS + MINUTE_NS, c)


# trades over the first 70 minutes (two sessions and the gap between), on a 100 ms grid so that
# equal exchange times happen; sizes may be 0 (Kite's cumulative differences can be)
trade_st = st.tuples(st.sampled_from(["A", "B", "C"]),
                     st.integers(0, 70 * 600).map(lambda k: BASE + k * 100_000_000),
                     st.integers(1, 20),
                     st.integers(0, 9))
trades_st = st.lists(trade_st, min_size=1, max_size=60)


def fields(c):
    return (c.key, c.interval_min, c.start_ns, c.end_ns, c.open, c.high, c.low, c.close, c.volume, c.ticks)


def latest(outputs) -> dict:
    """The last write of each candle: (key, interval, start) -> Candle."""
    got = {}
    for c in outputs:
        k = (c.key, c.interval_min, c.start_ns)
        assert k not in got or c.revision == got[k].revision + 1, "revisions are consecutive"
        got[k] = c
    return got


def batch(trades) -> dict:
    """Every trade at once, then a timer far in the future."""
    b = CandleBuilder(SESSIONS, INTERVALS, grace_s=GRACE_S, lateness_s=LATENESS_S)
    for t in trades:
        b.trade(*t)
    out = b.due(BASE + 100 * HOUR)
    assert all(c.revision == 0 for c in out)
    return latest(out)


def timed(trades_and_delays, clock_each_trade: bool = False, arrival_time: bool = False):
    """Trades arriving at exchange time + delay, with the timer driven as a collector drives it
    (``due()`` at each ``next_due_ns()``; with ``clock_each_trade`` also at each arrival; with
    ``arrival_time`` each trade carries its arrival time, ``now_ns``).  Returns (outputs with the
    due time of each, per trade whether it was applied)."""
    b = CandleBuilder(SESSIONS, INTERVALS, grace_s=GRACE_S, lateness_s=LATENESS_S)
    arrivals = sorted(((t[1] + d, i) for i, (t, d) in enumerate(trades_and_delays)))
    outputs, applied = [], {}
    for arrival, i in arrivals:
        while (n := b.next_due_ns()) is not None and n <= arrival:
            outputs += [(n, c) for c in b.due(n)]
        if clock_each_trade:
            outputs += [(arrival, c) for c in b.due(arrival)]
        applied[i] = b.trade(*trades_and_delays[i][0], now_ns=arrival if arrival_time else None)
    while (n := b.next_due_ns()) is not None:
        outputs += [(n, c) for c in b.due(n)]
    return outputs, applied


def in_session(trades):
    return [t for t in trades if SESSIONS.window(t[1]) is not None]


@settings(deadline=None, max_examples=150)
@given(trades_st, st.randoms(use_true_random=False))
def test_any_order_gives_the_same_candles(trades, rnd):
    shuffled = list(trades)
    rnd.shuffle(shuffled)
    a, b = batch(trades), batch(shuffled)
    assert {k: fields(c) for k, c in a.items()} == {k: fields(c) for k, c in b.items()}
    for key in "ABC":                                       # open = earliest time, close = latest
        mine = sorted((t for t in in_session(trades) if t[0] == key), key=lambda t: (t[1], t[2]))
        for c in (c for c in a.values() if c.key == key):
            inside = [t for t in mine if c.start_ns <= t[1] < c.end_ns]
            assert c.open == inside[0][2] and c.close == inside[-1][2] and c.ticks == len(inside)


@settings(deadline=None, max_examples=150)
@given(st.lists(st.tuples(trade_st, st.integers(0, LATENESS - 1)), min_size=1, max_size=60))
def test_arrivals_late_within_the_lateness_give_the_same_candles(trades_and_delays):
    trades = [t for t, _ in trades_and_delays]
    outputs, applied = timed(trades_and_delays)
    assert all(applied[i] == (SESSIONS.window(t[1]) is not None) for i, t in enumerate(trades))
    got = latest(c for _, c in outputs)
    assert {k: fields(c) for k, c in got.items()} == {k: fields(c) for k, c in batch(trades).items()}


@settings(deadline=None, max_examples=150)
@given(trades_st)
def test_volume_is_conserved_and_high_low_bound_open_close(trades):
    got = batch(trades)
    sizes = sum(t[3] for t in in_session(trades))
    for n in INTERVALS:
        mine = [c for c in got.values() if c.interval_min == n]
        assert sum(c.volume for c in mine) == sizes
        assert sum(c.ticks for c in mine) == len(in_session(trades))
    for c in got.values():
        assert c.high >= max(c.open, c.close) and c.low <= min(c.open, c.close)
        assert c.ticks >= 1 and c.start_ns < c.end_ns and c.final


@settings(deadline=None, max_examples=150)
@given(st.lists(st.tuples(trade_st, st.integers(0, 3 * LATENESS)), min_size=1, max_size=60), st.booleans())
def test_a_trade_later_than_the_lateness_never_changes_a_candle(trades_and_delays, due_each_trade):
    outputs, applied = timed(trades_and_delays, clock_each_trade=due_each_trade, arrival_time=not due_each_trade)
    for i, (t, delay) in enumerate(trades_and_delays):
        if SESSIONS.window(t[1]) is not None:
            assert applied[i] == (t[1] + delay < minute_end(t[1]) + LATENESS)
    for when, c in outputs:                               # written again only inside its window
        if c.revision:
            assert when < c.end_ns + LATENESS
    kept = [t for i, (t, _) in enumerate(trades_and_delays) if applied[i]]
    got = latest(c for _, c in outputs)
    assert {k: fields(c) for k, c in got.items()} == {k: fields(c) for k, c in batch(kept).items()}


@settings(deadline=None, max_examples=150)
@given(st.lists(st.tuples(trade_st, st.integers(0, LATENESS - 1)), min_size=1, max_size=60))
def test_larger_candles_equal_the_one_minute_ones_rolled_up(trades_and_delays):
    outputs, _ = timed(trades_and_delays)
    got = latest(c for _, c in outputs)
    ones = [c for c in got.values() if c.interval_min == 1]
    by_interval = defaultdict(list)
    for c in got.values():
        by_interval[c.interval_min].append(c)
    for n in (5, 15):
        mine = sorted(by_interval[n], key=lambda c: (c.start_ns, c.key))
        expect = sorted(rollup(ones, SESSIONS, n), key=lambda c: (c.start_ns, c.key))
        assert [fields(c) for c in mine] == [fields(c) for c in expect]
        for c in mine:
            o, cl = SESSIONS.window(c.start_ns)
            assert o <= c.start_ns < c.end_ns <= cl
            assert (c.start_ns - o) % (n * MINUTE_NS) == 0            # aligned to the open
