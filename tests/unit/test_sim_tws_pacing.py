"""The TWS simulator's pacing models (strict, documented, throttle) on a fake clock."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from feeds.sim.tws_pacing import (
    PACING_MODELS,
    PACING_RULES,
    THROTTLE_RULE,
    HistoricalPacer,
    bar_seconds,
)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def pacer(model: str, clock: Clock, **kw) -> HistoricalPacer:
    return HistoricalPacer(clock=clock, model=model, **kw)


def spread(p: HistoricalPacer, clock: Clock, n: int, bar: str = "1 min", start: int = 0, step: float = 1.0,
           weight: int = 1) -> list[str | None]:
    """``n`` requests for distinct contracts, ``step`` s apart; the rules returned."""
    out = []
    for i in range(start, start + n):
        out.append(p.decide(("id", i, bar), ("c", i), weight=weight, bar_size=bar, contract=f"C{i}").rule)
        clock.t += step
    return out


def test_bar_seconds_and_models():
    assert [bar_seconds(b) for b in ("1 secs", "30 secs", "1 min", "2 mins", "1 hour", "1 day", "1W")] == \
        [1, 30, 60, 120, 3600, 86400, 604800]
    with pytest.raises(ValueError):
        bar_seconds("7 fortnights")
    assert PACING_MODELS[0] == "strict"
    with pytest.raises(ValueError, match="pacing model"):
        HistoricalPacer(model="lenient")
    with pytest.raises(ValueError, match="throttle_limit"):
        HistoricalPacer(model="throttle", throttle_free=10, throttle_limit=5)
    assert HistoricalPacer().violations == {r: 0 for r in PACING_RULES}
    assert HistoricalPacer(model="throttle").rules == PACING_RULES + (THROTTLE_RULE,)


@pytest.mark.parametrize("bar", ["1 min", "30 secs", "1 day"])
def test_strict_sixty_in_ten_minutes_for_every_bar_size(bar):
    clock = Clock()
    p = pacer("strict", clock)
    assert spread(p, clock, 60, bar) == [None] * 60               # 1000 .. 1059
    clock.t = 1599.999
    assert spread(p, clock, 1, bar, start=60, step=0) == ["max_60_per_10min"]   # the 61st
    clock.t = 1600.0                                             # the first leaves the window
    assert spread(p, clock, 1, bar, start=61, step=0) == [None]
    assert spread(p, clock, 1, bar, start=62, step=0) == ["max_60_per_10min"]
    assert p.violations == {"identical_15s": 0, "same_contract_2s": 0, "max_60_per_10min": 2, "max_50_open": 0}
    assert p.accepted == 61


def test_strict_refusals_do_not_count_against_later_requests():
    clock = Clock()
    p = pacer("strict", clock)
    spread(p, clock, 60, step=0.0)                                # all at 1000.0
    for i in range(100):                                          # refused, not remembered
        assert p.check(("again", i), ("x", i)) == "max_60_per_10min"
    clock.t = 1600.0                                              # all 60 leave the window at once
    assert spread(p, clock, 60, start=1000, step=0.0) == [None] * 60
    assert p.violations["max_60_per_10min"] == 100 and p.accepted == 120


def test_strict_bid_ask_counts_twice():
    clock = Clock()
    p = pacer("strict", clock)
    spread(p, clock, 59)
    assert p.check("ba", "k1", weight=2) == "max_60_per_10min"    # 59 + 2 > 60
    assert p.check("tr", "k1", weight=1) is None                  # 59 + 1 = 60
    q = pacer("strict", clock)
    spread(q, clock, 30, weight=2)                                # 30 BID_ASK = 60
    assert q.check("more", "k2") == "max_60_per_10min"


def test_strict_sixth_request_for_one_contract_within_two_seconds():
    clock = Clock(0.0)
    p = pacer("strict", clock, scale=0.01)                        # 2 s -> 0.02 s
    key = ("AAPL", "SMART", "TRADES")
    for i in range(5):
        assert p.check(("r", i), key) is None
        clock.t += 0.003                                          # 0.0 .. 0.012
    assert p.check(("r", 5), key) == "same_contract_2s"            # the sixth within 0.02 s
    assert p.check(("r", 5), ("AAPL", "SMART", "MIDPOINT")) is None   # another whatToShow
    clock.t = 0.0201                                              # the first is 0.02 s old
    assert p.check(("r", 6), key) is None
    # BID_ASK counts twice here too: 2 + 2 + 1 = 5, a sixth unit is refused
    clock.t = 10.0
    bid_ask = ("AAPL", "SMART", "BID_ASK")
    assert [p.check(("b", i), bid_ask, weight=w) for i, w in enumerate((2, 2, 1))] == [None] * 3
    assert p.check(("b", 3), bid_ask, weight=1) == "same_contract_2s"


def test_strict_identical_and_open_rules():
    clock = Clock(0.0)
    p = pacer("strict", clock)
    assert p.check("same", "k") is None
    clock.t = 14.99
    assert p.check("same", "k") == "identical_15s"
    clock.t = 15.0
    assert p.check("same", "k") is None
    assert p.check("other", "k2", open_now=49) is None
    assert p.check("other2", "k3", open_now=50) == "max_50_open"


def test_documented_one_minute_bars_have_no_window_and_no_burst_rule():
    clock = Clock()
    p = pacer("documented", clock)
    key = ("AAPL", "SMART", "TRADES")
    # 200 distinct one-minute requests for one contract at one instant: all accepted
    assert [p.check(("d", i), key, bar_size="1 min") for i in range(200)] == [None] * 200
    assert p.check(("d", 0), key, bar_size="1 min") == "identical_15s"
    assert p.check(("d", 999), key, bar_size="1 min", open_now=50) == "max_50_open"
    assert p.check(("d", 998), key, bar_size="1 hour", open_now=49) is None
    assert p.violations == {"identical_15s": 1, "same_contract_2s": 0, "max_60_per_10min": 0, "max_50_open": 1}
    assert all(r.delay == 0.0 for r in p.history)


def test_documented_small_bars_keep_every_rule_and_one_minute_bars_are_not_counted():
    clock = Clock()
    p = pacer("documented", clock)
    assert spread(p, clock, 100, "1 min", step=0.0) == [None] * 100   # not in the small-bar window
    assert spread(p, clock, 60, "30 secs") == [None] * 60
    assert spread(p, clock, 1, "30 secs", start=60) == ["max_60_per_10min"]   # the 61st small bar
    assert spread(p, clock, 1, "1 min", start=200) == [None]                  # a 1-minute bar still goes
    assert spread(p, clock, 1, "5 secs", start=61) == ["max_60_per_10min"]
    key = ("MSFT", "SMART", "TRADES")
    q = pacer("documented", Clock())
    assert [q.check(("s", i), key, bar_size="30 secs") for i in range(6)] == [None] * 5 + ["same_contract_2s"]
    assert [q.check(("m", i), key, bar_size="1 min") for i in range(6)] == [None] * 6


def test_throttle_delay_grows_beyond_the_free_allowance_then_refuses():
    clock = Clock()
    p = pacer("throttle", clock, throttle_free=10, throttle_step=0.5, throttle_limit=20, throttle_max_delay=30.0)
    recs = []
    for i in range(21):
        recs.append(p.decide(("t", i), ("AAPL", "SMART", "TRADES"), bar_size="1 min", contract="AAPL",
                             what="TRADES"))
        clock.t += 0.001                                          # far above any hard rule
    assert [r.rule for r in recs[:20]] == [None] * 20
    assert [r.delay for r in recs[:10]] == [0.0] * 10
    assert [r.delay for r in recs[10:20]] == pytest.approx([0.5 * k for k in range(1, 11)])
    assert [r.in_window for r in recs] == list(range(21))
    assert recs[20].rule == THROTTLE_RULE and recs[20].delay == 0.0   # the 21st in the window
    assert p.violations[THROTTLE_RULE] == 1 and p.violations["max_60_per_10min"] == 0
    first = recs[0]
    assert (first.t, first.bar_size, first.contract, first.what, first.weight) == \
        (1000.0, "1 min", "AAPL", "TRADES", 1)
    s = p.summary()
    assert (s["requests"], s["accepted"], s["refused"], s["delayed"]) == (21, 20, 1, 10)
    assert s["delay_max"] == pytest.approx(5.0) and s["delay_total"] == pytest.approx(27.5)


def test_throttle_refusals_not_counted_and_the_window_slides():
    clock = Clock(0.0)
    p = pacer("throttle", clock, scale=0.01, throttle_free=2, throttle_step=1.0, throttle_limit=4)
    # scaled: window 6 s, step 0.01 s
    assert spread(p, clock, 4, step=1.0) == [None] * 4            # at 0, 1, 2, 3
    assert [r.delay for r in p.history] == pytest.approx([0.0, 0.0, 0.01, 0.02])
    clock.t = 5.999
    assert spread(p, clock, 50, start=100, step=0.0) == [THROTTLE_RULE] * 50   # refused, not remembered
    clock.t = 6.0                                                  # the request at 0 leaves the window
    rec = p.decide(("late", 0), ("c", 999), bar_size="1 min")
    assert rec.rule is None and rec.in_window == 3 and rec.delay == pytest.approx(0.02)
    assert p.decide(("late", 1), ("c", 998), bar_size="1 min").rule == THROTTLE_RULE


def test_throttle_delay_is_capped_bid_ask_counts_twice_and_hard_rules_stay():
    clock = Clock()
    p = pacer("throttle", clock, throttle_free=0, throttle_step=1.0, throttle_max_delay=3.0, throttle_limit=100)
    delays = [p.decide(("t", i), ("c", i), bar_size="1 min").delay for i in range(5)]
    assert delays == [1.0, 2.0, 3.0, 3.0, 3.0]
    q = pacer("throttle", clock, throttle_free=1, throttle_step=1.0, throttle_limit=4)
    assert q.decide("a", "k", weight=2, bar_size="1 min").delay == 1.0        # 2 - 1
    assert q.decide("b", "k", weight=2, bar_size="1 min").delay == 3.0        # 4 - 1
    assert q.decide("c", "k", weight=1, bar_size="1 min").rule == THROTTLE_RULE  # 4 + 1 > 4
    assert q.decide("b", "k", bar_size="1 min").rule == "identical_15s"
    r = pacer("throttle", clock, throttle_limit=100)
    assert r.decide("d", "k", bar_size="1 min", open_now=49).rule is None
    assert r.decide("e", "k", bar_size="1 min", open_now=50).rule == "max_50_open"


def test_throttle_small_bars_follow_the_documented_rules():
    clock = Clock()
    p = pacer("throttle", clock, throttle_free=5, throttle_limit=10)
    assert spread(p, clock, 60, "30 secs") == [None] * 60
    assert all(r.delay == 0.0 for r in p.history)                 # small bars are not throttled
    assert spread(p, clock, 1, "30 secs", start=60) == ["max_60_per_10min"]
    assert spread(p, clock, 10, "1 min", start=100) == [None] * 10   # own window, own count
    assert spread(p, clock, 1, "1 min", start=200) == [THROTTLE_RULE]


def test_history_is_bounded_and_parameters_are_scaled():
    clock = Clock()
    p = pacer("throttle", clock, scale=0.01, keep=5)
    spread(p, clock, 8)
    assert len(p.history) == 5 and p.history[0].contract == "C3"
    assert p.summary()["requests"] == p.summary()["accepted"] == 8      # counted beyond the history kept
    params = p.parameters()
    assert params["model"] == "throttle" and params["window"] == pytest.approx(6.0)
    assert params["throttle_window"] == pytest.approx(6.0) and params["throttle_step"] == pytest.approx(0.005)
    assert params["throttle_max_delay"] == pytest.approx(0.3) and params["throttle_limit"] == 120
    assert "throttle_step" not in pacer("strict", clock).parameters()


def test_ibs_numbers_come_from_the_limiters_module():
    """The simulator's IB rules are feeds.ibkr.pacing's constants (the one place): changing one there
    changes the simulator; the throttle's own numbers stay the simulator's."""
    code = (
        "import feeds.ibkr.pacing as P\n"
        "P.MAX_REQUESTS, P.WINDOW, P.IDENTICAL_WINDOW, P.BURST_REQUESTS, P.BURST_WINDOW = 7, 70.0, 1.5, 3, 0.5\n"
        "P.MAX_OPEN, P.BID_ASK_WEIGHT, P.SMALL_BAR_MAX = 9, 3, 5.0\n"
        "import feeds.sim.tws_pacing as T\n"
        "p = T.HistoricalPacer(model='throttle').parameters()\n"
        "print(p['max_requests'], p['window'], p['identical_window'], p['burst_requests'], p['burst_window'],\n"
        "      p['max_open'], T.BID_ASK_WEIGHT, T.SMALL_BAR_SECONDS, p['throttle_window'], p['throttle_free'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.stdout.split() == ["7", "70.0", "1.5", "3", "0.5", "9", "3", "5", "600.0", "60"], r.stderr[-2000:]


def test_the_simulator_weighs_bid_ask_with_ibs_weight():
    from feeds.ibkr import pacing as P
    from feeds.sim import tws

    assert tws.BID_ASK_WEIGHT is P.BID_ASK_WEIGHT
    p = HistoricalPacer()
    assert (p.max_requests, p.window, p.identical_window, p.burst_requests, p.burst_window, p.max_open) == (
        P.MAX_REQUESTS, P.WINDOW, P.IDENTICAL_WINDOW, P.BURST_REQUESTS, P.BURST_WINDOW, P.MAX_OPEN)
