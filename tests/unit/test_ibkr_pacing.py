"""The pacing limiter against IB's rules, on a fake clock, checked by the simulator's own pacer."""
from __future__ import annotations

import asyncio
import math

import pytest

from feeds.ibkr.pacing import (MAX_OPEN, MAX_REQUESTS, STRICT, WINDOW, PacingLimiter, PacingRules, is_pacing_violation,
                               is_query_cancelled, max_in_window, utilisation)
from feeds.sim.tws_pacing import HistoricalPacer


class FakeTime:
    def __init__(self):
        self.t = 1000.0

    def clock(self) -> float:
        return self.t

    async def sleep(self, d: float) -> None:
        self.t += d
        await asyncio.sleep(0)


def limiter(ft: FakeTime, **kw) -> PacingLimiter:
    kw.setdefault("keep_history", True)
    return PacingLimiter(clock=ft.clock, sleep=ft.sleep, **kw)


def drive(lim: PacingLimiter, ft: FakeTime, requests, pacer: HistoricalPacer | None = None, answer=0.0):
    """Acquire each (identical_key, contract_key, weight) in order; each answer takes `answer` s."""
    refused = []

    async def main():
        for ident, ckey, w in requests:
            ticket = await lim.acquire(ident, ckey, w)
            if pacer is not None:
                rule = pacer.check(ident, ckey, weight=w)
                if rule:
                    refused.append(rule)
            ft.t += answer
            lim.release(ticket)
    asyncio.run(main())
    return refused


def test_sixty_per_ten_minutes_then_waits_one_window():
    ft = FakeTime()
    lim = limiter(ft)
    pacer = HistoricalPacer(clock=ft.clock)
    reqs = [(("c", i), ("c%d" % (i % 20),), 1) for i in range(150)]
    assert drive(lim, ft, reqs, pacer) == []
    h = lim.history
    assert h[59] == h[0]                             # the first 60 go at once (3 per contract, 5 allowed per 2 s)
    assert h[60] - h[0] == pytest.approx(lim.window)  # the 61st waits for the first to leave the window
    assert lim.window == pytest.approx(600 * 1.01 + 0.5)
    assert max_in_window(h, 600.0) == 60
    assert utilisation(h, 600.0) == pytest.approx(600 / lim.window)   # 98.9 %


def test_scaled_limiter_never_violates_scaled_simulator_rules():
    ft = FakeTime()
    lim = limiter(ft, scale=0.01)
    pacer = HistoricalPacer(scale=0.01, clock=ft.clock)
    # three contracts, some identical repeats, some BID_ASK (counted twice)
    reqs = []
    for i in range(200):
        c = i % 3
        what = "BID_ASK" if i % 7 == 0 else "TRADES"
        ident = ("con%d" % c, "SMART", "end%d" % (i // 3 % 40), what)   # repeats every 120 requests
        reqs.append((ident, ("con%d" % c, "SMART", what), lim.weight_for(what)))
    assert drive(lim, ft, reqs, pacer, answer=0.001) == []
    assert pacer.accepted == 200 and all(v == 0 for v in pacer.violations.values())


def test_same_contract_five_per_two_seconds():
    ft = FakeTime()
    lim = limiter(ft)
    pacer = HistoricalPacer(clock=ft.clock)
    reqs = [(("AAPL", i), ("AAPL", "SMART", "TRADES"), 1) for i in range(12)]
    assert drive(lim, ft, reqs, pacer) == []
    h = lim.history
    assert h[4] == h[0] and h[5] - h[0] == pytest.approx(lim.burst_window)   # 6th waits ~2 s
    assert lim.burst_window == pytest.approx(2 * 1.01 + 0.5)


def test_bid_ask_counts_twice():
    ft = FakeTime()
    lim = limiter(ft)
    reqs = [(("X", i), ("X%d" % i,), 2) for i in range(31)]
    drive(lim, ft, reqs)
    h = lim.history
    assert h[29] == h[0] and h[30] - h[0] == pytest.approx(lim.window)   # 30 BID_ASK fill the window


def test_identical_request_waits_fifteen_seconds():
    ft = FakeTime()
    lim = limiter(ft)
    drive(lim, ft, [(("same",), ("a",), 1), (("other",), ("b",), 1), (("same",), ("a",), 1)])
    h = lim.history
    assert h[1] == h[0] and h[2] - h[0] == pytest.approx(15 * 1.01 + 0.5)


def test_open_requests_limit():
    ft = FakeTime()
    lim = limiter(ft)
    tickets = [lim._record(("i", i), ("k", i), 1, ft.t) for i in range(50)]   # 50 open, none answered
    assert math.isinf(lim.delay(("n",), ("n",), 1))
    lim.release(tickets[0])
    assert lim.open_requests == 49
    ft.t += lim.window
    assert lim.delay(("n",), ("n",), 1) == 0


def test_a_request_counts_from_its_answer():
    """A server busy with earlier requests reads a request late; counting it
    from its answer keeps the next window's requests far enough apart."""
    ft = FakeTime()
    lim = limiter(ft, scale=0.01)
    pacer = HistoricalPacer(scale=0.01, clock=ft.clock)

    async def batch(first: int, n: int, late: float) -> None:
        tickets = [await lim.acquire(("x", i), ("c%d" % i,), 1) for i in range(first, first + n)]
        ft.t += late                      # the server reads (and answers) them this much later
        for i, ticket in zip(range(first, first + n), tickets, strict=True):
            assert pacer.check(("x", i), ("c%d" % i,)) is None
            lim.release(ticket)

    async def main():
        t0 = ft.t
        await batch(0, 40, 0.5)
        await batch(40, 20, 0.5)
        await lim.acquire(("y",), ("d",), 1)
        return t0
    t0 = asyncio.run(main())
    assert ft.t == pytest.approx(t0 + 0.5 + lim.window)   # first answers + one window, not first sends
    assert pacer.check(("y",), ("d",)) is None            # the server's window has moved on by then


def test_violation_back_off_doubles_and_resets():
    ft = FakeTime()
    lim = limiter(ft, scale=0.1)
    assert lim.violation() == pytest.approx(1.5)
    assert lim.violation() == pytest.approx(3.0)
    assert lim.delay(("a",), ("a",), 1) == pytest.approx(3.0)
    for _ in range(10):
        lim.violation()
    assert lim.violation() == pytest.approx(lim.window)      # capped at one window
    lim.success()
    assert lim.violation() == pytest.approx(1.5)
    assert lim.violations == 14


def test_seed_counts_an_earlier_runs_requests():
    ft = FakeTime()
    lim = limiter(ft)
    # a killed run sent 60 requests 100 s ago, one of them identical to ours 5 s ago
    lim.seed([(100.0, ("old", i), ("c",), 1) for i in range(59)] + [(5.0, ("mine",), ("m",), 1)])
    assert lim.delay(("new",), ("n",), 1) == pytest.approx(lim.window - 100.0)
    assert lim.delay(("mine",), ("m",), 1) == pytest.approx(lim.window - 100.0)
    lim2 = limiter(FakeTime())
    lim2.seed([(5.0, ("mine",), ("m",), 1)])
    assert lim2.delay(("mine",), ("m",), 1) == pytest.approx(lim2.identical_window - 5.0)


def test_estimate_and_plan_duration():
    ft = FakeTime()
    lim = limiter(ft)
    w = lim.window
    assert lim.estimate(0) == 0 and lim.estimate(60) == 0
    assert lim.estimate(61) == pytest.approx(w) and lim.estimate(121) == pytest.approx(2 * w)
    drive(lim, ft, [(("x", i), ("c%d" % (i % 30),), 1) for i in range(60)])
    assert lim.estimate(1) == pytest.approx(w - (ft.t - lim.history[0]))
    assert lim.plan_duration([0]) == 0
    assert lim.plan_duration([252, 252, 252]) == pytest.approx(12 * w)        # 756 requests
    assert lim.plan_duration([4]) == 0                                         # one burst
    assert lim.plan_duration([10]) == pytest.approx(lim.burst_window)          # 6th must wait 2 s


def test_utilisation_measure():
    assert utilisation([0.0], 6.0) == 1.0
    assert utilisation([i * 0.001 for i in range(60)], 6.0) == 1.0               # no wait needed
    times = [0.0] * 60 + [6.0] * 60 + [12.0]
    assert utilisation(times, 6.0) == pytest.approx(1.0)
    assert utilisation([0.0] * 60 + [12.0], 6.0) == pytest.approx(0.5)
    spread = [i * 0.02 for i in range(60)]                                    # a burst spread over 1.2 s
    assert utilisation(spread + [t + 6.6 for t in spread], 6.0) == pytest.approx(6.0 / 6.6)
    assert max_in_window([0, 1, 2, 6, 7], 6) == 3


def test_pacing_text_recognised():
    hmds = "Historical Market Data Service error message:"
    assert is_pacing_violation(162, hmds + "Historical data request pacing violation")
    assert not is_pacing_violation(162, "Historical Market Data Service error message:HMDS query returned no data: X")
    assert not is_pacing_violation(200, "pacing violation")


def test_query_cancelled_recognised():
    hmds = "Historical Market Data Service error message:"
    assert is_query_cancelled(162, hmds + "API historical data query cancelled: 12")
    assert not is_query_cancelled(162, hmds + "Historical data request pacing violation")
    assert not is_query_cancelled(366, "query cancelled")


def test_default_limiter_is_the_strict_profile_with_ibs_limits():
    lim = PacingLimiter()
    assert lim.profile == STRICT and lim.status().in_force == STRICT
    assert (lim.max_requests, lim.max_open, lim.open_limit) == (MAX_REQUESTS, MAX_OPEN, MAX_OPEN)
    assert PacingRules().window == WINDOW == 600.0
