"""IB historical-data pacing rules, as the TWS API simulator enforces them.

Source: TWS API reference, "Historical Data Limitations".  A pacing
violation occurs when any of these is broken:

* ``identical_15s``: an identical historical request (same contract,
  endDateTime, duration, bar size, whatToShow, useRTH, formatDate) within
  15 seconds;
* ``same_contract_2s``: six or more requests for the same contract, exchange
  and tick type (whatToShow) within two seconds;
* ``max_60_per_10min``: more than 60 requests within any ten-minute period;
* ``max_50_open``: more than 50 historical requests open at the same time.

A BID_ASK request counts twice in the counting rules.  Only requests that
were accepted are remembered: a request refused for pacing does not count
against later ones.  All windows are multiplied by ``scale`` (``0.01`` makes
the ten-minute window 6 s, 15 s 0.15 s and 2 s 0.02 s) so tests run fast.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["HistoricalPacer", "PACING_RULES"]

#: Rule names, in the order they are checked.
PACING_RULES = ("identical_15s", "same_contract_2s", "max_60_per_10min", "max_50_open")


class HistoricalPacer:
    """Decides whether one historical request breaks IB's pacing rules.

    ``clock`` returns seconds (monotonic); ``scale`` multiplies every time
    window.  :meth:`check` returns the name of the first rule broken (see
    :data:`PACING_RULES`) or ``None``, in which case the request is recorded
    as accepted.  ``violations`` counts refusals by rule.  Not thread-safe:
    use it from one event loop.
    """

    def __init__(
        self,
        scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_requests: int = 60,
        window: float = 600.0,
        identical_window: float = 15.0,
        burst_requests: int = 6,
        burst_window: float = 2.0,
        max_open: int = 50,
    ) -> None:
        if scale <= 0:
            raise ValueError("pacing scale must be > 0")
        self.scale = scale
        self.clock = clock
        self.max_requests = max_requests
        self.window = window * scale
        self.identical_window = identical_window * scale
        self.burst_requests = burst_requests
        self.burst_window = burst_window * scale
        self.max_open = max_open
        self._all: deque[tuple[float, int]] = deque()  # (time, weight)
        self._all_weight = 0
        self._identical: dict[Hashable, float] = {}
        self._burst: dict[Hashable, deque[tuple[float, int]]] = {}
        self.violations: dict[str, int] = {r: 0 for r in PACING_RULES}
        self.accepted = 0

    def _prune(self, now: float) -> None:
        while self._all and now - self._all[0][0] >= self.window:
            self._all_weight -= self._all.popleft()[1]
        if len(self._identical) > 4096:
            self._identical = {k: t for k, t in self._identical.items() if now - t < self.identical_window}
        if len(self._burst) > 4096:
            self._burst = {k: q for k, q in self._burst.items() if q and now - q[-1][0] < self.burst_window}

    def check(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1, open_now: int = 0) -> str | None:
        """Check one request; ``weight`` is 2 for BID_ASK; ``open_now`` is
        the number of historical requests currently open.  Returns the rule
        broken or ``None`` (then the request is recorded)."""
        now = self.clock()
        self._prune(now)
        rule = None
        last = self._identical.get(identical_key)
        burst = self._burst.get(contract_key)
        if burst is not None:
            while burst and now - burst[0][0] >= self.burst_window:
                burst.popleft()
        if last is not None and now - last < self.identical_window:
            rule = "identical_15s"
        elif burst is not None and sum(w for _, w in burst) + weight >= self.burst_requests:
            rule = "same_contract_2s"
        elif self._all_weight + weight > self.max_requests:
            rule = "max_60_per_10min"
        elif open_now + 1 > self.max_open:
            rule = "max_50_open"
        if rule is not None:
            self.violations[rule] += 1
            return rule
        self._identical[identical_key] = now
        if burst is None:
            burst = self._burst[contract_key] = deque()
        burst.append((now, weight))
        self._all.append((now, weight))
        self._all_weight += weight
        self.accepted += 1
        return None
