"""One limiter for IB's historical-data pacing rules.

Source: TWS API reference, "Historical Data Limitations".  A pacing
violation (error 162 "Historical Market Data Service error
message:Historical data request pacing violation") occurs when a client:

* makes an identical historical request within 15 seconds;
* makes six or more requests for the same contract, exchange and tick type
  (whatToShow) within two seconds;
* makes more than 60 requests within any ten-minute period;
* has more than 50 historical requests open at once.

A BID_ASK request counts twice.  :class:`PacingLimiter` delays each request
until every rule allows it, and never longer: the caller sends as soon as
:meth:`PacingLimiter.acquire` returns.  To absorb the difference between our
clock and IB's (network and scheduling jitter) each window is lengthened by
``margin`` (a fraction, default 1 %) plus ``slack`` seconds (default 0.5 s);
both are multiplied by ``scale`` like the windows, so the limiter and a
simulator scaled the same way (``scale=0.01``: ten minutes become 6 s) keep
the same proportions.  With the defaults the limiter uses 60 requests per
606.5 s, 98.9 % of the allowed rate.

A request counts from its answer time once answered (see
:class:`PacingLimiter`).  When IB still reports a violation, :meth:`PacingLimiter.violation` pauses
every new request: 15 s (scaled) the first time, doubling after each further
violation without a success in between, at most one window.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

__all__ = ["PacingRules", "PacingLimiter", "utilisation", "max_in_window", "PACING_TEXT", "is_pacing_violation"]

#: Text IB sends with error 162 for a pacing violation.
PACING_TEXT = "pacing violation"


def is_pacing_violation(code: int, text: str) -> bool:
    """True for error 162 whose text reports a pacing violation."""
    return code == 162 and PACING_TEXT in text.lower()


@dataclass(frozen=True)
class PacingRules:
    """IB's limits (unscaled seconds)."""

    max_requests: int = 60          # in any `window`
    window: float = 600.0
    identical_window: float = 15.0
    burst_requests: int = 6         # this many for one contract/exchange/tick type ...
    burst_window: float = 2.0       # ... within this is a violation
    max_open: int = 50
    bid_ask_weight: int = 2


class _Entry:
    """One counted request: time ``t`` (send time, moved to the answer time
    on release), weight and keys."""

    __slots__ = ("t", "w", "ident", "ckey")

    def __init__(self, t: float, w: int, ident: Hashable | None, ckey: Hashable | None):
        self.t, self.w, self.ident, self.ckey = t, w, ident, ckey


class PacingLimiter:
    """Delays historical requests so that none breaks IB's pacing rules.

    ``scale`` multiplies every window (and the margins); ``clock`` is a
    monotonic clock in seconds; ``sleep`` an awaitable sleep (both
    replaceable in tests).  Use from one event loop.

    Per request: ``ticket = await acquire(identical_key, contract_key,
    weight)`` right before sending it, ``release(ticket)`` when its answer
    (or error) arrived.  ``identical_key`` identifies identical requests
    (contract, exchange, endDateTime, durationStr, barSizeSetting,
    whatToShow, useRTH, formatDate); ``contract_key`` is (contract,
    exchange, whatToShow); ``weight`` is 2 for BID_ASK (see
    :meth:`weight_for`).

    A request counts from the moment it is sent until its answer arrives,
    and from then on as if it had been sent when answered: the answer time
    is an upper bound of when IB read the request, so a server that reads a
    request late (busy with earlier ones) never sees two requests closer
    together than the limiter allowed.
    """

    def __init__(self, scale: float = 1.0, rules: PacingRules = PacingRules(), margin: float = 0.01,
                 slack: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, keep_history: bool = False):
        if scale <= 0:
            raise ValueError("pacing scale must be > 0")
        if margin < 0 or slack < 0:
            raise ValueError("margin and slack must be >= 0")
        self.scale = scale
        self.rules = rules
        self.clock = clock
        self.sleep = sleep
        pad = slack * scale

        def eff(w: float) -> float:
            return w * scale * (1.0 + margin) + pad

        self.window = eff(rules.window)
        self.identical_window = eff(rules.identical_window)
        self.burst_window = eff(rules.burst_window)
        self.burst_max = rules.burst_requests - 1          # "fewer than six"
        self.max_requests = rules.max_requests
        self.max_open = rules.max_open
        self.pause_base = rules.identical_window * scale
        self._longest = max(self.window, self.identical_window, self.burst_window)
        self._entries: list[_Entry] = []
        self._open = 0
        self._paused_until = 0.0
        self._strikes = 0
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()
        self.sent = 0
        self.violations = 0
        self.waited = 0.0
        self.history: list[float] | None = [] if keep_history else None

    # ----------------------------------------------------------- decisions
    def weight_for(self, what_to_show: str) -> int:
        """2 for BID_ASK, else 1."""
        return self.rules.bid_ask_weight if what_to_show.upper() == "BID_ASK" else 1

    def _prune(self, now: float) -> None:
        if self._entries and any(now - e.t >= self._longest for e in self._entries):
            self._entries = [e for e in self._entries if now - e.t < self._longest]

    @staticmethod
    def _free_at(entries: list[_Entry], weight: int, limit: int, window: float) -> float:
        """Earliest time at which ``weight`` more fits under ``limit`` in
        ``window`` given the entries (all inside the window)."""
        excess = sum(e.w for e in entries) + weight - limit
        if excess <= 0:
            return -math.inf
        for e in sorted(entries, key=lambda e: e.t):
            excess -= e.w
            if excess <= 0:
                return e.t + window
        return math.inf  # weight alone exceeds the limit

    def delay(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1,
              now: float | None = None) -> float:
        """Seconds to wait before this request may be sent (0 = now; ``inf``
        while the open-request limit is reached).  Pure: records nothing."""
        now = self.clock() if now is None else now
        self._prune(now)
        if self._open + 1 > self.max_open:
            return math.inf
        until = self._paused_until
        same = [e.t for e in self._entries if e.ident == identical_key and now - e.t < self.identical_window]
        if same:
            until = max(until, max(same) + self.identical_window)
        burst = [e for e in self._entries if e.ckey == contract_key and now - e.t < self.burst_window]
        if burst:
            until = max(until, self._free_at(burst, weight, self.burst_max, self.burst_window))
        inside = [e for e in self._entries if now - e.t < self.window]
        until = max(until, self._free_at(inside, weight, self.max_requests, self.window))
        return max(0.0, until - now)

    def _record(self, identical_key: Hashable, contract_key: Hashable, weight: int, now: float) -> _Entry:
        e = _Entry(now, weight, identical_key, contract_key)
        self._entries.append(e)
        self._open += 1
        self.sent += 1
        if self.history is not None:
            self.history.append(now)
        return e

    def seed(self, entries: Sequence[tuple[float, Hashable | None, Hashable | None, int]]) -> None:
        """Count requests sent before this process started (a killed or
        earlier run): ``(age_seconds, identical_key, contract_key, weight)``;
        keys may be None (the request then only counts in the ten-minute
        window).  Call before the first :meth:`acquire`."""
        now = self.clock()
        for age, ident, ckey, weight in entries:
            self._entries.append(_Entry(now - max(0.0, age), weight, ident, ckey))
        self._prune(now)

    # --------------------------------------------------------------- use
    async def acquire(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1) -> _Entry:
        """Wait until the request may be sent, then count it as sent and
        open; returns the ticket for :meth:`release`.  Callers are served in
        arrival order."""
        start = self.clock()
        async with self._lock:
            while True:
                d = self.delay(identical_key, contract_key, weight)
                if d <= 0:
                    break
                if math.isinf(d):
                    self._released.clear()
                    await self._released.wait()
                else:
                    await self.sleep(d)
            now = self.clock()
            ticket = self._record(identical_key, contract_key, weight, now)
        self.waited += now - start
        return ticket

    def release(self, ticket: _Entry | None = None) -> None:
        """The answer (or error) of one acquired request arrived: it no
        longer counts as open, and counts from now on in every window."""
        if ticket is not None:
            ticket.t = max(ticket.t, self.clock())
        if self._open > 0:
            self._open -= 1
        self._released.set()

    def success(self) -> None:
        """A request was answered: the violation back-off starts again at its base."""
        self._strikes = 0

    def violation(self) -> float:
        """IB reported a pacing violation: pause new requests; returns the pause (s)."""
        self.violations += 1
        pause = min(self.pause_base * (2 ** self._strikes), self.window)
        self._strikes += 1
        self._paused_until = max(self._paused_until, self.clock() + pause)
        return pause

    @property
    def open_requests(self) -> int:
        return self._open

    def estimate(self, n: int, now: float | None = None) -> float:
        """Seconds from ``now`` until the ``n``-th further request (weight 1)
        may be sent under the ten-minute rule, given what was sent already."""
        if n <= 0:
            return 0.0
        now = self.clock() if now is None else now
        self._prune(now)
        inside = [e for e in self._entries if now - e.t < self.window]
        used = sum(e.w for e in inside)
        slots = [now - self.window] * max(0, self.max_requests - used)
        for e in inside:
            slots.extend([e.t] * e.w)
        slots = sorted(slots)[: self.max_requests]
        k = n - 1
        at = slots[k % self.max_requests] + self.window * (k // self.max_requests + 1)
        return max(0.0, at - now, self._paused_until - now)

    def plan_duration(self, requests_per_contract: Sequence[int]) -> float:
        """Seconds the pacing rules imply for a fresh run sending these
        numbers of requests (one entry per contract): the ten-minute rule,
        or the two-second rule when one contract dominates."""
        total = sum(requests_per_contract)
        if total <= 0:
            return 0.0
        ten_min = self.window * ((total - 1) // self.max_requests)
        burst = max(self.burst_window * ((n - 1) // self.burst_max) for n in requests_per_contract if n > 0)
        return max(ten_min, burst)


def utilisation(times: Sequence[float], window: float, max_requests: int = 60) -> float:
    """How much of the allowed rate a sequence of send times used.

    The ten-minute rule allows request ``k`` no earlier than ``window``
    after request ``k - 60``; at the full allowed rate every such gap is
    exactly one window.  The result is the mean of ``window / (t[k] -
    t[k - 60])`` over every request that had a predecessor 60 back (1.0 when
    there are 60 requests or fewer: no wait was needed).  ``window`` is IB's
    window, scaled like the run; above 1.0 means the rule was broken.
    """
    ts = sorted(times)
    if len(ts) <= max_requests:
        return 1.0
    ratios = []
    for k in range(max_requests, len(ts)):
        gap = ts[k] - ts[k - max_requests]
        ratios.append(window / gap if gap > 0 else math.inf)
    return sum(ratios) / len(ratios)


def max_in_window(times: Sequence[float], window: float) -> int:
    """Largest number of send times inside any half-open interval of length ``window``."""
    ts = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while t - ts[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best
