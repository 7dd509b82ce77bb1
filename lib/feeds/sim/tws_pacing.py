"""IB historical-data pacing, as the TWS API simulator applies it: three models.

Source: TWS API reference, "Historical Data Limitations"
(interactivebrokers.github.io/tws-api/historical_limitations.html).  The page
limits every client to 50 simultaneous open historical requests, and lists
under "Pacing Violations for Small Bars (30 secs or less)" the rules whose
breach is answered with error 162 "Historical data request pacing
violation": an identical request within 15 seconds; six or more requests for
the same contract, exchange and tick type within two seconds; more than 60
requests within any ten minutes; a BID_ASK request counting twice.  For
larger bars the page names no hard window.  Users report that IB's servers
apply a "soft" limit instead: a burst of historical requests is answered
more and more slowly (half a second for the first few, then 5 to 20 s), and
heavy use still ends in the pacing error.  The ``throttle`` model follows
that report; its numbers are assumptions, every one a parameter.

The rules, by name (:data:`PACING_RULES`, :data:`THROTTLE_RULE`):

* ``identical_15s``: an identical request (same contract, endDateTime,
  duration, bar size, whatToShow, useRTH, formatDate) within 15 s;
* ``same_contract_2s``: six or more requests for one contract, exchange and
  whatToShow within 2 s;
* ``max_60_per_10min``: more than 60 requests within any ten minutes;
* ``max_50_open``: more than 50 historical requests open at once;
* ``throttle_rate`` (``throttle`` model only): more one-minute-or-larger
  requests in the throttle window than ``throttle_limit``.

The models (:data:`PACING_MODELS`), chosen with ``model=``:

* ``strict``: the small-bar rules for every bar size (all four rules, every
  request counted in every window);
* ``documented``: the page as written: bars of 30 s or less get the four
  rules; one-minute and larger bars the 50-open limit, and the identical
  request rule kept for them too (``identical_15s``, ``max_50_open``); they
  are not counted in the small-bar windows;
* ``throttle``: small bars as ``documented``; one-minute and larger bars get
  ``identical_15s``, ``max_50_open`` and a soft throttle: the answer to an
  accepted request is delayed by ``throttle_step`` seconds for every
  request (weighted) accepted in the last ``throttle_window`` seconds,
  itself included, beyond ``throttle_free``, at most ``throttle_max_delay``;
  a request that would take the window past ``throttle_limit`` is refused
  (``throttle_rate``).

A BID_ASK request counts twice in every counting rule.  Only accepted
requests are remembered: a refused request does not count against later
ones.  Every time (window, step, delay) is multiplied by ``scale`` (``0.01``
makes ten minutes 6 s, 15 s 0.15 s, 2 s 0.02 s); counts are not scaled.
IB's numbers (60 in 600 s, 15 s, 6 in 2 s, 50 open, BID_ASK counting
twice, small bars of 30 s or less) are those of :mod:`feeds.ibkr.pacing`,
the one place for them; the throttle's numbers are the simulator's own.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass

from ..ibkr.pacing import (BID_ASK_WEIGHT, BURST_REQUESTS, BURST_WINDOW, IDENTICAL_WINDOW, MAX_OPEN, MAX_REQUESTS,
                           SMALL_BAR_MAX, WINDOW)

__all__ = ["HistoricalPacer", "PacedRequest", "PACER_OPTIONS", "PACING_MODELS", "PACING_RULES",
           "THROTTLE_RULE", "SMALL_BAR_SECONDS", "BID_ASK_WEIGHT", "bar_seconds"]

#: Pacing models, the first being the default.
PACING_MODELS = ("strict", "documented", "throttle")
#: Rule names of the hard rules, in the order they are checked.
PACING_RULES = ("identical_15s", "same_contract_2s", "max_60_per_10min", "max_50_open")
#: Rule name of the ``throttle`` model's refusal threshold.
THROTTLE_RULE = "throttle_rate"
#: The numbers of the rules, by :class:`HistoricalPacer` argument name.
PACER_OPTIONS = frozenset({
    "max_requests", "window", "identical_window", "burst_requests", "burst_window", "max_open",
    "throttle_window", "throttle_free", "throttle_step", "throttle_max_delay", "throttle_limit",
})
#: Bars of this many seconds or fewer are IB's "small bars" (:data:`feeds.ibkr.pacing.SMALL_BAR_MAX`).
SMALL_BAR_SECONDS = int(SMALL_BAR_MAX)

_UNIT_SECONDS = {"sec": 1, "secs": 1, "min": 60, "mins": 60, "hour": 3600, "hours": 3600,
                 "day": 86400, "days": 86400}


def bar_seconds(bar_size: str) -> int:
    """Length in seconds of an IB ``barSizeSetting`` (``"30 secs"`` -> 30,
    ``"1 min"`` -> 60, ``"1W"`` -> 604800, ``"1M"`` -> 2592000).
    Raises ``ValueError`` for a text that is not a bar size."""
    text = bar_size.strip()
    if text in ("1W", "1 week"):
        return 7 * 86400
    if text in ("1M", "1 month"):
        return 30 * 86400
    n, _, unit = text.partition(" ")
    try:
        return int(n) * _UNIT_SECONDS[unit.strip().lower()]
    except (ValueError, KeyError):
        raise ValueError(f"not an IB bar size: {bar_size!r}") from None


@dataclass(frozen=True)
class PacedRequest:
    """What the pacer did with one historical request.

    ``t``: arrival, seconds on the pacer's clock; ``bar_size``, ``contract``
    (a label such as the symbol), ``what`` (whatToShow), ``weight`` (2 for
    BID_ASK); ``delay``: seconds the answer is held back by the throttle
    (0.0 when none or refused); ``rule``: the rule that refused it, or
    ``None`` when accepted; ``in_window``: weighted requests accepted in the
    window that governs this bar size just before this one arrived."""

    t: float
    bar_size: str
    contract: str
    what: str
    weight: int
    delay: float
    rule: str | None
    in_window: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Window:
    """Weighted arrival times within a sliding window of ``span`` seconds."""

    def __init__(self, span: float) -> None:
        self.span = span
        self.items: deque[tuple[float, int]] = deque()
        self.weight = 0

    def prune(self, now: float) -> int:
        while self.items and now - self.items[0][0] >= self.span:
            self.weight -= self.items.popleft()[1]
        return self.weight

    def add(self, now: float, weight: int) -> None:
        self.items.append((now, weight))
        self.weight += weight


class HistoricalPacer:
    """Decides whether one historical request breaks IB's pacing, and how
    long its answer is held back (see the module text for the models).

    ``model``: one of :data:`PACING_MODELS`; ``clock`` returns seconds
    (monotonic); ``scale`` multiplies every time.  The other arguments are
    the numbers of the rules (times in seconds before scaling):
    ``max_requests`` in ``window`` (60 in 600 s), ``identical_window``
    (15 s), ``burst_requests`` in ``burst_window`` (6 in 2 s), ``max_open``
    (50); for ``throttle``: ``throttle_window`` (600 s), ``throttle_free``
    (60 requests answered at once), ``throttle_step`` (0.5 s more per request
    beyond), ``throttle_max_delay`` (30 s), ``throttle_limit`` (120 requests:
    more are refused).  ``keep`` bounds :attr:`history` (oldest dropped).

    :meth:`decide` returns a :class:`PacedRequest`; :meth:`check` only its
    rule.  :attr:`violations` counts refusals by rule (:attr:`rules`: the
    model's rule names), :attr:`accepted` the accepted requests,
    :attr:`history` every decision, oldest first.  Raises ``ValueError``
    for an unknown model or a non-positive scale.  Not thread-safe: use it
    from one event loop.
    """

    def __init__(
        self,
        scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_requests: int = MAX_REQUESTS,
        window: float = WINDOW,
        identical_window: float = IDENTICAL_WINDOW,
        burst_requests: int = BURST_REQUESTS,
        burst_window: float = BURST_WINDOW,
        max_open: int = MAX_OPEN,
        model: str = "strict",
        throttle_window: float = 600.0,
        throttle_free: int = 60,
        throttle_step: float = 0.5,
        throttle_max_delay: float = 30.0,
        throttle_limit: int = 120,
        keep: int = 200_000,
    ) -> None:
        if scale <= 0:
            raise ValueError("pacing scale must be > 0")
        if model not in PACING_MODELS:
            raise ValueError(f"pacing model must be one of {', '.join(PACING_MODELS)}, not {model!r}")
        if throttle_limit < throttle_free:
            raise ValueError("throttle_limit must be >= throttle_free")
        self.model = model
        self.scale = scale
        self.clock = clock
        self.max_requests = max_requests
        self.window = window * scale
        self.identical_window = identical_window * scale
        self.burst_requests = burst_requests
        self.burst_window = burst_window * scale
        self.max_open = max_open
        self.throttle_window = throttle_window * scale
        self.throttle_free = throttle_free
        self.throttle_step = throttle_step * scale
        self.throttle_max_delay = throttle_max_delay * scale
        self.throttle_limit = throttle_limit
        self.rules = PACING_RULES + ((THROTTLE_RULE,) if model == "throttle" else ())
        self._small = _Window(self.window)            # counted by max_60_per_10min
        self._large = _Window(self.throttle_window)   # counted by the throttle
        self._identical: dict[Hashable, float] = {}
        self._burst: dict[Hashable, deque[tuple[float, int]]] = {}
        self.violations: dict[str, int] = {r: 0 for r in self.rules}
        self.accepted = 0
        self._delays = {"delayed": 0, "delay_total": 0.0, "delay_max": 0.0}
        self.history: deque[PacedRequest] = deque(maxlen=keep)

    def parameters(self) -> dict:
        """The model and its numbers as applied (times scaled, seconds)."""
        out = {"model": self.model, "scale": self.scale, "max_requests": self.max_requests,
               "window": self.window, "identical_window": self.identical_window,
               "burst_requests": self.burst_requests, "burst_window": self.burst_window,
               "max_open": self.max_open}
        if self.model == "throttle":
            out.update(throttle_window=self.throttle_window, throttle_free=self.throttle_free,
                       throttle_step=self.throttle_step, throttle_max_delay=self.throttle_max_delay,
                       throttle_limit=self.throttle_limit)
        return out

    def _prune(self, now: float) -> None:
        self._small.prune(now)
        self._large.prune(now)
        if len(self._identical) > 4096:
            self._identical = {k: t for k, t in self._identical.items() if now - t < self.identical_window}
        if len(self._burst) > 4096:
            self._burst = {k: q for k, q in self._burst.items() if q and now - q[-1][0] < self.burst_window}

    def _small_rules(self, bar_size: str) -> bool:
        """Whether the small-bar rules (burst, 60 in ten minutes) apply."""
        return self.model == "strict" or bar_seconds(bar_size) <= SMALL_BAR_SECONDS

    def decide(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1, open_now: int = 0,
               bar_size: str = "1 min", contract: str = "", what: str = "") -> PacedRequest:
        """Decide one request arriving now: ``identical_key`` identifies an
        identical request, ``contract_key`` the (contract, exchange,
        whatToShow) of the burst rule; ``weight`` is :data:`BID_ASK_WEIGHT` for BID_ASK;
        ``open_now`` the historical requests open before it; ``contract`` and
        ``what`` label the record only.  An accepted request is remembered.
        Returns the record (also appended to :attr:`history`)."""
        now = self.clock()
        self._prune(now)
        small = self._small_rules(bar_size)
        throttled = not small and self.model == "throttle"
        rule = None
        delay = 0.0
        in_window = self._small.weight if small else self._large.weight
        last = self._identical.get(identical_key)
        burst = self._burst.get(contract_key) if small else None
        if burst is not None:
            while burst and now - burst[0][0] >= self.burst_window:
                burst.popleft()
        if last is not None and now - last < self.identical_window:
            rule = "identical_15s"
        elif small and burst is not None and sum(w for _, w in burst) + weight >= self.burst_requests:
            rule = "same_contract_2s"
        elif small and self._small.weight + weight > self.max_requests:
            rule = "max_60_per_10min"
        elif throttled and self._large.weight + weight > self.throttle_limit:
            rule = THROTTLE_RULE
        elif open_now + 1 > self.max_open:
            rule = "max_50_open"
        if rule is not None:
            self.violations[rule] += 1
        else:
            self._identical[identical_key] = now
            if small:
                if burst is None:
                    burst = self._burst[contract_key] = deque()
                burst.append((now, weight))
                self._small.add(now, weight)
            else:
                self._large.add(now, weight)
                if throttled:
                    excess = self._large.weight - self.throttle_free
                    delay = min(self.throttle_max_delay, max(0, excess) * self.throttle_step)
                    if delay > 0:
                        d = self._delays
                        d["delayed"] += 1
                        d["delay_total"] += delay
                        d["delay_max"] = max(d["delay_max"], delay)
            self.accepted += 1
        rec = PacedRequest(now, bar_size, contract, what, weight, delay, rule, in_window)
        self.history.append(rec)
        return rec

    def check(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1, open_now: int = 0,
              bar_size: str = "1 min") -> str | None:
        """:meth:`decide`, returning only the rule broken or ``None`` (then
        the request is recorded as accepted)."""
        return self.decide(identical_key, contract_key, weight, open_now, bar_size).rule

    def summary(self) -> dict:
        """Counts since the start: ``requests``, ``accepted``, ``refused``,
        ``delayed`` (accepted with a delay), ``delay_total`` and ``delay_max``
        (seconds)."""
        refused = sum(self.violations.values())
        d = self._delays
        return {"requests": self.accepted + refused, "accepted": self.accepted, "refused": refused,
                "delayed": d["delayed"], "delay_total": round(d["delay_total"], 6), "delay_max": d["delay_max"]}
