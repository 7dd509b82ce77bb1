"""Pacing profiles (strict, documented, auto) on simulated time, against three models of IB's servers:
strict pacing for every bar size, the documented rules, and a soft throttle."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import heapq
import itertools
import math

import pytest

from feeds.ibkr.pacing import (AUTO, DOCUMENTED, MAX_OPEN, STRICT, LearnedPacing, PacingLimiter, auto_start,
                               bar_seconds, is_query_cancelled, is_small_bar, max_in_window, plan_time)
from feeds.sim.tws_pacing import HistoricalPacer

T0 = dt.datetime(2026, 3, 2, 22, 0, tzinfo=dt.timezone.utc)
PACING = "Historical Market Data Service error message:Historical data request pacing violation"
CANCELLED = "Historical Market Data Service error message:API historical data query cancelled: 7"


class SimTime:
    """A simulated clock for many coroutines: time moves only when every one of them waits."""

    def __init__(self):
        self.t = 1000.0
        self.wall0 = T0
        self._timers: list = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.t

    def wall(self) -> dt.datetime:
        return self.wall0 + dt.timedelta(seconds=self.t - 1000.0)

    async def sleep(self, d: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.t + max(0.0, d), next(self._seq), fut))
        await fut

    def run(self, coro):
        async def main():
            task = asyncio.ensure_future(coro)
            while not task.done():
                for _ in range(30):
                    await asyncio.sleep(0)
                if task.done():
                    break
                if not self._timers:
                    raise AssertionError("deadlock: every coroutine waits and no timer is set")
                when, _, fut = heapq.heappop(self._timers)
                self.t = max(self.t, when)
                if not fut.done():
                    fut.set_result(None)
            return task.result()
        return asyncio.run(main())


class Server:
    """A model of IB's historical-data service.

    ``strict``: the small-bar rules for every bar size; ``documented``: the small-bar rules for bars
    of 30 s or less, for larger bars only the identical-request and 50-open rules; ``throttle``: as
    documented, but answers slow down once more than ``soft`` requests were read in the last
    ``span`` seconds, and past ``hard`` a request is refused with a pacing violation."""

    def __init__(self, st: SimTime, model: str, answer: float = 1.0, soft: int = 20, hard: int = 40,
                 span: float = 10.0):
        self.st, self.model, self.answer = st, model, answer
        self.small = HistoricalPacer(clock=st.clock)
        self.large = HistoricalPacer(clock=st.clock, max_requests=10 ** 9, burst_requests=10 ** 9)
        self.soft, self.hard, self.span = soft, hard, span
        self.read: list[float] = []        # accepted requests: read times
        self.refused: list[float] = []
        self.open = 0

    def request(self, ident, ckey, bar: str) -> tuple[int, str, float]:
        """(error code or 0, text, seconds until the answer)."""
        now = self.st.t
        pacer = self.small if self.model == "strict" or is_small_bar(bar) else self.large
        recent = sum(1 for t in self.read if now - t < self.span)
        if self.model == "throttle" and recent >= self.hard:
            rule = "throttle"
        else:
            rule = pacer.check(ident, ckey, open_now=self.open)
        if rule is not None:
            self.refused.append(now)
            return 162, PACING, 0.05
        self.read.append(now)
        answer = self.answer
        if self.model == "throttle" and recent >= self.soft:
            answer += 0.5 * (recent - self.soft + 1)
        return 0, "", answer


def backfill(st: SimTime, lim: PacingLimiter, server: Server, n: int, bar: str = "1 min", contracts: int = 50,
             workers: int | None = None, attempts: int = 10):
    """Fetch n distinct requests over `contracts` contracts with the limiter's worth of workers;
    a refused request goes back to the queue.  Returns (sends, answers): lists of (time, index)."""
    queue = list(range(n))
    sends, answers = [], []

    async def worker():
        while queue:
            i = queue.pop(0)
            ckey = ("con%d" % (i % contracts), "SMART", "TRADES")
            ticket = await lim.acquire(("req", i), ckey, 1, bar_size=bar)
            sends.append((st.t, i))
            server.open += 1
            code, text, after = server.request(("req", i), ckey, bar)
            await st.sleep(after)
            server.open -= 1
            lim.finish(ticket, code, text)
            if code:
                queue.append(i)
            else:
                answers.append((st.t, i))

    async def main():
        await asyncio.gather(*(worker() for _ in range(workers or lim.max_in_flight)))
    st.run(main())
    return sends, answers


def make(st: SimTime, **kw) -> PacingLimiter:
    kw.setdefault("keep_history", True)
    return PacingLimiter(clock=st.clock, sleep=st.sleep, wall_clock=st.wall, bar_size="1 min", **kw)


# ------------------------------------------------------------------ strict: today's behaviour

def test_strict_profile_is_the_limiter_as_it_was():
    st1, st2 = SimTime(), SimTime()
    old = PacingLimiter(clock=st1.clock, sleep=st1.sleep, keep_history=True)
    new = make(st2, profile=STRICT)
    backfill(st1, old, Server(st1, "strict"), 150, workers=4)
    backfill(st2, new, Server(st2, "strict"), 150, workers=4)
    assert old.history == new.history
    h = new.history
    assert h[60] - h[0] >= new.window and max_in_window(h, 600.0) == 60
    assert new.status().in_force == STRICT and new.learned is None


# ------------------------------------------------------------------ documented

def test_documented_one_minute_bars_go_concurrency_at_a_time():
    st = SimTime()
    lim = make(st, profile=DOCUMENTED, concurrency=4)
    server = Server(st, "documented", answer=1.0)
    sends, answers = backfill(st, lim, server, 200, workers=8)     # the limiter, not the workers, holds back
    assert server.refused == [] and len(answers) == 200
    times = sorted(t for t, _ in sends)
    # four in flight, each answered in 1 s: 200 requests in 50 s, no ten-minute wait
    assert times[-1] - times[0] == pytest.approx(49.0)
    assert max_in_window(times, 0.999) == 4
    assert lim.waited > 0 and lim.concurrency == 4 and lim.learned is None


def test_documented_keeps_the_small_bar_rules_for_30_second_bars():
    st = SimTime()
    lim = make(st, profile=DOCUMENTED, concurrency=4)
    server = Server(st, "documented", answer=0.5)
    sends, _ = backfill(st, lim, server, 90, bar="30 secs")
    times = sorted(t for t, _ in sends)
    assert server.refused == []
    assert times[60] - times[0] >= lim.window and max_in_window(times, 600.0) == 60


def test_documented_keeps_the_identical_request_rule_for_large_bars():
    st = SimTime()
    lim = make(st, profile=DOCUMENTED, concurrency=4)

    async def main():
        a = await lim.acquire(("same",), ("c",), 1)
        lim.finish(a)
        b = await lim.acquire(("other",), ("c",), 1)
        t_other = st.t
        lim.finish(b)
        await lim.acquire(("same",), ("c",), 1)
        return t_other
    t_other = st.run(main())
    assert t_other == 1000.0
    assert st.t - 1000.0 == pytest.approx(lim.identical_window)


def test_documented_open_limit_is_the_concurrency():
    st = SimTime()
    lim = make(st, profile=DOCUMENTED, concurrency=3)
    tickets = [lim._record(("i", i), ("k",), 1, st.t) for i in range(3)]
    assert math.isinf(lim.delay(("n",), ("k",), 1))
    lim.release(tickets[0])
    assert lim.delay(("n",), ("k",), 1) == 0          # 6 for one contract in 2 s: a large-bar request may go
    assert lim.max_in_flight == 3 and lim.open_limit == 3


# ------------------------------------------------------------------ auto against the three models

def test_auto_against_documented_model_grows_and_learns_its_ceiling():
    st = SimTime()
    learned = []
    lim = make(st, profile=AUTO, concurrency=4, max_concurrency=12, on_learn=learned.append)
    server = Server(st, "documented", answer=1.0)
    sends, answers = backfill(st, lim, server, 1000)
    assert server.refused == [] and len(answers) == 1000 and lim.violations == 0
    assert lim.concurrency == 12 and lim.in_force == DOCUMENTED
    assert [(x.profile, x.concurrency) for x in learned] == [(DOCUMENTED, 12)] and "ceiling" in learned[0].why
    assert st.wall0 < learned[0].at <= st.wall()
    # the first request beyond the small-bar rules went alone: the next ones waited for its answer
    ordered = sorted(sends)
    probe = ordered[60][1]
    probe_answer = {i: t for t, i in answers}[probe]
    assert all(t >= probe_answer for t, _ in ordered[61:])
    assert ordered[59][0] < probe_answer
    # much faster than strict: 1000 requests under strict need 16 windows
    st2 = SimTime()
    strict = make(st2, profile=STRICT)
    s_sends, _ = backfill(st2, strict, Server(st2, "strict"), 1000, workers=4)
    t_auto = max(t for t, _ in sends) - min(t for t, _ in sends)
    t_strict = max(t for t, _ in s_sends) - min(t for t, _ in s_sends)
    assert t_strict >= 16 * strict.window and t_auto * 5 < t_strict


def test_auto_against_strict_model_one_violation_then_strict():
    st = SimTime()
    learned = []
    lim = make(st, profile=AUTO, concurrency=8, max_concurrency=16, relearn=86400.0, on_learn=learned.append)
    server = Server(st, "strict", answer=0.5)
    sends, answers = backfill(st, lim, server, 300)
    assert len(answers) == 300
    assert len(server.refused) == 1 and lim.violations == 1            # the lone probe, nothing else
    assert lim.in_force == STRICT
    assert [x.profile for x in learned] == [STRICT] and "pacing violation" in learned[0].why
    assert max_in_window(server.read, 600.0) <= 60
    # after the violation the limiter waits for the window: the probe was the 61st request
    refused_at = server.refused[0]
    after = sorted(t for t, _ in sends if t > refused_at)
    assert after[0] - min(t for t, _ in sends) >= lim.window


def test_auto_against_soft_throttle_halves_then_strict():
    st = SimTime()
    learned = []
    lim = make(st, profile=AUTO, concurrency=8, max_concurrency=8, slow_answer=2.0, relearn=86400.0,
               on_learn=learned.append)
    server = Server(st, "throttle", answer=0.2, soft=30, hard=200, span=10.0)
    sends, answers = backfill(st, lim, server, 400)
    assert len(answers) == 400 and server.refused == []
    assert [x.profile for x in learned] == [DOCUMENTED, STRICT]
    assert learned[0].concurrency == 4 and "answer took" in learned[0].why     # 8 halved
    assert lim.in_force == STRICT and lim.violations == 0


def test_auto_against_throttle_with_a_hard_limit_at_most_one_violation():
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=4, max_concurrency=16, slow_answer=2.0, relearn=86400.0)
    server = Server(st, "throttle", answer=0.2, soft=40, hard=70, span=60.0)
    sends, answers = backfill(st, lim, server, 300)
    assert len(answers) == 300
    assert len(server.refused) <= 1 and lim.in_force == STRICT
    fell_back = 1000.0 + (lim.learned.at - st.wall0).total_seconds()
    assert max_in_window([t for t in server.read if t > fell_back], 600.0) <= 60


def test_a_probe_ib_accepted_inside_its_own_window_proves_nothing():
    # The first 60 requests come one every 10.2 s, each answered in 0.1 s: in the limiter's window
    # (padded, counted from the answers) the 61st is beyond the small-bar rules, yet IB's window (600 s
    # from each arrival) has let the first request go, so IB accepts it.  That acceptance must not
    # count as "IB does not apply the rules to one-minute bars": the next request beyond them still goes
    # alone, and the burst that follows is refused once at most, then strict.
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=4, max_concurrency=16, relearn=86400.0)
    server = Server(st, "strict", answer=0.1)
    sends, answers = [], []

    async def one(i: int) -> None:
        ckey = ("con%d" % (i % 50), "SMART", "TRADES")
        while True:
            ticket = await lim.acquire(("req", i), ckey, 1, bar_size="1 min")
            sends.append((st.t, i))
            server.open += 1
            code, text, after = server.request(("req", i), ckey, "1 min")
            await st.sleep(after)
            server.open -= 1
            lim.finish(ticket, code, text)
            if not code:
                answers.append((st.t, i))
                return

    async def main():
        for i in range(60):
            await st.sleep(1000.0 + 10.2 * i - st.t)
            await one(i)
        await asyncio.gather(*(one(i) for i in range(60, 160)))
    st.run(main())
    assert len(answers) == 160
    assert len(server.refused) <= 1 and lim.violations == len(server.refused)
    assert max_in_window(server.read, 600.0) <= 60
    assert lim.in_force == STRICT


def test_a_probe_proves_only_with_60_sent_inside_ibs_own_window():
    # the same start with the first 60 sent at once: the 61st, IB's window full of them, is a real probe;
    # its prompt answer shows the rules do not apply and auto goes on as documented
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=4, max_concurrency=16)
    server = Server(st, "documented", answer=0.1)
    sends, answers = backfill(st, lim, server, 300)
    assert server.refused == [] and len(answers) == 300 and lim.in_force == DOCUMENTED
    assert lim._confirmed


def test_slow_answer_is_scaled_like_ibs_windows():
    # a simulator scaled by 0.01 delays its answers by 0.01 of IB's: 10 s become 0.1 s
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=4, slow_answer=10.0, scale=0.01)

    async def one(after: float):
        t = await lim.acquire(("r", st.t, after), ("c", after), 1)
        await st.sleep(after)
        lim.finish(t)
    st.run(one(0.099))
    assert lim.concurrency == 4 and lim.learned is None
    st.run(one(0.101))
    assert lim.concurrency == 2 and "answer took" in lim.learned.why


def test_an_open_request_older_than_every_window_still_counts_when_answered():
    st = SimTime()
    lim = make(st, profile=STRICT, scale=0.01)          # windows of about 6 s

    async def main():
        slow = await lim.acquire(("slow",), ("c0",), 1)
        await st.sleep(100.0)                           # unanswered for many windows
        for i in range(59):
            lim.finish(await lim.acquire(("r", i), ("c%d" % i,), 1))
        lim.finish(slow)                                # answered now: it counts from now on
        return st.t
    answered = st.run(main())
    # 60 counted in the window (the slow one among them): the 61st waits
    assert lim.delay(("x",), ("cx",), 1) > 0
    assert lim.delay(("x",), ("cx",), 1, now=answered + lim.window) == 0


def test_query_cancelled_halves_then_strict_and_old_answers_do_not_count_twice(caplog):
    caplog.set_level("INFO", logger="feeds.ibkr.pacing")
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=8, max_concurrency=16)

    async def main():
        return [await lim.acquire(("r", i), ("c%d" % i,), 1) for i in range(8)]
    tickets = st.run(main())
    assert is_query_cancelled(162, CANCELLED) and not is_query_cancelled(162, PACING)
    for t in tickets[2:]:
        lim.finish(t)
    lim.finish(tickets[0], 162, CANCELLED)
    assert (lim.in_force, lim.concurrency, lim.learned.why) == (DOCUMENTED, 4, "query cancelled (error 162)")
    lim.finish(tickets[1], 162, CANCELLED)            # sent before the change: already counted
    assert (lim.in_force, lim.concurrency) == (DOCUMENTED, 4)
    fresh = st.run(lim.acquire(("r", 99), ("c99",), 1))
    lim.finish(fresh, 162, CANCELLED)
    assert (lim.in_force, lim.learned.profile) == (STRICT, STRICT)
    assert lim.violations == 0
    # each learning is one line naming the requests sent by then (what tells later requests from earlier)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pacing auto: ")]
    assert said == ["pacing auto: documented with 4 in flight (query cancelled (error 162)) after 8 requests sent; "
                    f"not probing again for {lim.relearn:g}s",
                    "pacing auto: strict with 4 in flight (query cancelled (error 162)) after 9 requests sent; "
                    f"not probing again for {lim.relearn:g}s"]


def test_slow_answer_threshold():
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=4, slow_answer=5.0)

    async def one(after: float):
        t = await lim.acquire(("r", st.t, after), ("c", after), 1)
        await st.sleep(after)
        lim.finish(t)
    st.run(one(5.0))                                  # exactly the threshold: prompt
    assert lim.concurrency == 4 and lim.learned is None
    st.run(one(5.01))
    assert lim.concurrency == 2 and lim.learned.profile == DOCUMENTED
    assert lim.status().answer is not None


# ------------------------------------------------------------------ learned state and relearn

def test_learned_state_round_trip_and_errors():
    s = LearnedPacing(DOCUMENTED, 6, T0, "ceiling")
    d = s.to_dict()
    assert d == {"profile": "documented", "concurrency": 6, "at": "2026-03-02T22:00:00+00:00", "why": "ceiling"}
    assert LearnedPacing.from_dict(d) == s
    assert LearnedPacing.from_dict({**d, "at": T0}) == s
    with pytest.raises(ValueError):
        LearnedPacing.from_dict({**d, "profile": "auto"})
    with pytest.raises(ValueError):
        LearnedPacing.from_dict({**d, "concurrency": 51})
    with pytest.raises(ValueError):
        LearnedPacing.from_dict({**d, "at": "yesterday"})
    with pytest.raises(ValueError):
        LearnedPacing.from_dict({"profile": "strict"})
    with pytest.raises(ValueError):
        LearnedPacing(STRICT, 4, dt.datetime(2026, 3, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.concurrency = 7


def test_auto_start_uses_what_was_learned_while_younger_than_relearn():
    s = LearnedPacing(STRICT, 2, T0, "pacing violation (error 162)")
    assert auto_start(4, s, 3600, T0 + dt.timedelta(seconds=3599)) == (STRICT, 2)
    assert auto_start(4, s, 3600, T0 + dt.timedelta(seconds=3600)) == (DOCUMENTED, 4)
    assert auto_start(4, None, 3600, T0) == (DOCUMENTED, 4)


def test_fresh_learned_strict_is_not_probed_stale_one_is():
    # a restart within relearn: strict from the start, the 61st request waits a window, no violation
    st = SimTime()
    st.wall0 = T0 + dt.timedelta(hours=1)
    lim = make(st, profile=AUTO, relearn=2 * 3600.0, learned=LearnedPacing(STRICT, 4, T0, "pacing violation"))
    server = Server(st, "strict", answer=0.2)
    sends, _ = backfill(st, lim, server, 90)
    times = sorted(t for t, _ in sends)
    assert server.refused == [] and lim.in_force == STRICT
    assert times[60] - times[0] >= lim.window
    # the same learning, older than relearn: documented again (a lone probe, refused once, then strict)
    st2 = SimTime()
    st2.wall0 = T0 + dt.timedelta(hours=3)
    lim2 = make(st2, profile=AUTO, relearn=2 * 3600.0, learned=LearnedPacing(STRICT, 4, T0, "pacing violation"))
    assert lim2.in_force == DOCUMENTED
    server2 = Server(st2, "strict", answer=0.2)
    backfill(st2, lim2, server2, 90)
    assert len(server2.refused) == 1 and lim2.in_force == STRICT and lim2.learned.at > T0


def test_within_a_run_strict_probes_again_after_relearn():
    st = SimTime()
    lim = make(st, profile=AUTO, relearn=600.0)

    async def main():
        t = await lim.acquire(("a",), ("a",), 1)
        lim.finish(t, 162, PACING)
        assert lim.in_force == STRICT
        await st.sleep(599.0)
        t = await lim.acquire(("b",), ("b",), 1)
        assert lim.in_force == STRICT
        lim.finish(t)
        await st.sleep(2.0)
        t = await lim.acquire(("c",), ("c",), 1)
        lim.finish(t)
    st.run(main())
    assert lim.in_force == DOCUMENTED and lim.concurrency == 4


def test_no_growth_within_relearn_growth_after():
    def run(age_hours: float) -> int:
        st = SimTime()
        st.wall0 = T0 + dt.timedelta(hours=age_hours)
        lim = make(st, profile=AUTO, concurrency=2, max_concurrency=10, relearn=24 * 3600.0,
                   learned=LearnedPacing(DOCUMENTED, 6, T0, "answer took 12.0s"))
        backfill(st, lim, Server(st, "documented", answer=1.0), 120)
        return lim.concurrency
    assert run(1) == 6             # held where it was learned
    assert run(25) > 2             # probing again from the configured start


# ------------------------------------------------------------------ figures

def test_status_figures():
    st = SimTime()
    lim = make(st, profile=AUTO, concurrency=4, max_concurrency=8)
    assert lim.status().rate == 0 and lim.status().in_flight == 0

    async def main():
        tickets = [await lim.acquire(("r", i), ("c%d" % i,), 1) for i in range(3)]
        await st.sleep(3.0)
        lim.finish(tickets[0])
        return tickets
    st.run(main())
    s = lim.status()
    assert (s.profile, s.in_force, s.concurrency, s.in_flight) == (AUTO, DOCUMENTED, 4, 2)
    assert s.rate == pytest.approx(3 / 0.05)          # 3 requests in 3 s: 60 per minute
    assert s.line() == "pacing auto (documented), 2/4 in flight, 60.0 requests/min"
    assert make(SimTime()).status().line() == "pacing strict, 0/4 in flight, 0.0 requests/min"


def test_plan_time_per_profile():
    one_year = [("1 min", 252)] * 3                   # 756 requests
    w = 600 * 1.01 + 0.5
    assert plan_time(STRICT, one_year) == pytest.approx(12 * w)
    assert plan_time(DOCUMENTED, one_year, concurrency=4, answer=1.0) == pytest.approx(755 // 4)
    assert plan_time(AUTO, one_year, concurrency=8, answer=2.0) == pytest.approx(2 * (755 // 8))
    assert plan_time(DOCUMENTED, [("30 secs", 121)]) == pytest.approx(2 * w)       # small bars: the rules
    mixed = [("30 secs", 61), ("1 hour", 8)]
    assert plan_time(DOCUMENTED, mixed, concurrency=4, answer=1.0) == pytest.approx(w)
    assert plan_time(STRICT, mixed) == pytest.approx(w)
    assert plan_time(DOCUMENTED, [("1 min", 0)]) == 0 and plan_time(STRICT, []) == 0
    assert plan_time(STRICT, [("1 min", 121)], scale=0.01) == pytest.approx(2 * w * 0.01)
    assert plan_time(DOCUMENTED, [("1 min", 200)], concurrency=80, answer=1.0) == 3   # capped at 50 in flight
    for bad in (dict(profile="fast"), dict(concurrency=0), dict(answer=-1)):
        with pytest.raises(ValueError):
            plan_time(**{"profile": DOCUMENTED, "requests": one_year, **bad})
    with pytest.raises(ValueError):
        plan_time(DOCUMENTED, [("1 minute", 3)])


def test_limiter_plan_and_estimate_follow_the_profile():
    st = SimTime()
    doc = make(st, profile=DOCUMENTED, concurrency=4)
    assert doc.plan_duration([252, 252, 252]) == pytest.approx(755 // 4)
    assert doc.estimate(9) == pytest.approx(2.0) and doc.estimate(0) == 0
    strict = make(st, profile=STRICT)
    assert strict.plan_duration([252, 252, 252]) == pytest.approx(12 * strict.window)
    small = PacingLimiter(clock=st.clock, sleep=st.sleep, profile=DOCUMENTED, bar_size="5 secs")
    assert small.plan_duration([121]) == pytest.approx(2 * small.window)


def test_bar_sizes_and_settings_checked():
    assert bar_seconds("30 secs") == 30 and bar_seconds("1 min") == 60 and bar_seconds("2 hours") == 7200
    assert bar_seconds("1 day") == 86400 and bar_seconds("1 month") == 30 * 86400
    assert is_small_bar("30 secs") and not is_small_bar("1 min") and is_small_bar(None)
    for bad in ("", "1 minute", "0 mins", "min"):
        with pytest.raises(ValueError):
            bar_seconds(bad)
    for kw in (dict(profile="fast"), dict(concurrency=0), dict(concurrency=51), dict(max_concurrency=51),
               dict(profile=AUTO, concurrency=20, max_concurrency=10), dict(slow_answer=0), dict(relearn=-1),
               dict(bar_size="1 minute")):
        with pytest.raises(ValueError):
            PacingLimiter(**kw)
    assert PacingLimiter(profile=AUTO, max_concurrency=MAX_OPEN).max_in_flight == MAX_OPEN
