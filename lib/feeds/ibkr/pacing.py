"""One limiter for IB's historical-data pacing rules, with three profiles.

Source: TWS API reference, "Historical Data Limitations".  At most 50
historical requests may be open at once.  Under "Pacing Violations for
Small Bars (30 secs or less)" the page lists what causes a pacing
violation (error 162 "Historical Market Data Service error
message:Historical data request pacing violation"):

* an identical historical request within 15 seconds;
* six or more requests for the same contract, exchange and tick type
  (whatToShow) within two seconds;
* more than 60 requests within any ten-minute period;

and a BID_ASK request counts twice.  For larger bars the page names only the
50-open limit.  Every one of these limits is a named constant below; this
module is the one place for them.

Profiles (:data:`PROFILES`):

* ``strict``: the small-bar rules for every request, whatever its bar size
  (the behaviour of :class:`PacingLimiter` without a profile);
* ``documented``: the page as written: the small-bar rules for bars of
  30 s or less; for larger bars only the identical-request rule and
  ``concurrency`` requests in flight (at most 50);
* ``auto``: starts as ``documented`` (or from what was learned, see
  :class:`LearnedPacing`), lets the number in flight grow while IB answers
  promptly and falls back on the first sign of pacing (see
  :class:`PacingLimiter`).

:class:`PacingLimiter` delays each request until every rule of the profile
in force allows it, and never longer: the caller sends as soon as
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

For ``--dry-run``: :func:`plan_time` (the time a plan implies under a
profile, pure); for ``--status`` and ``STATUS=``: :meth:`PacingLimiter.status`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["PacingRules", "PacingLimiter", "utilisation", "max_in_window", "PACING_TEXT", "is_pacing_violation",
           "CANCELLED_TEXT", "is_query_cancelled", "STRICT", "DOCUMENTED", "AUTO", "PROFILES", "LearnedPacing",
           "PacingStatus", "auto_start", "plan_time", "bar_seconds", "is_small_bar", "MAX_OPEN", "SMALL_BAR_MAX",
           "MAX_REQUESTS", "WINDOW", "IDENTICAL_WINDOW", "BURST_REQUESTS", "BURST_WINDOW", "BID_ASK_WEIGHT",
           "PACING_ERROR", "MAX_DAYS_PER_REQUEST"]

# ------------------------------------------------------ IB's limits ("Historical Data Limitations")
#: Most historical requests open at once, for every bar size.
MAX_OPEN = 50
#: Bars of this many seconds or less are "small bars": the rules below apply to them.
SMALL_BAR_MAX = 30.0
#: More than this many requests ...
MAX_REQUESTS = 60
#: ... within this many seconds (ten minutes) is a violation.
WINDOW = 600.0
#: An identical request within this many seconds is a violation.
IDENTICAL_WINDOW = 15.0
#: This many requests for one contract, exchange and tick type ...
BURST_REQUESTS = 6
#: ... within this many seconds is a violation.
BURST_WINDOW = 2.0
#: A BID_ASK request counts this many times.
BID_ASK_WEIGHT = 2
#: The error code of a pacing violation (and of other historical-data errors).
PACING_ERROR = 162
#: Text IB sends with error 162 for a pacing violation.
PACING_TEXT = "pacing violation"
#: Text IB sends with error 162 when it cancels a historical query.
CANCELLED_TEXT = "query cancelled"
#: Most days ("N D") one request of one-minute bars may cover.  IB's API guide limits a request
#: to "no more than 2000 bars" (Historical Data Limitations): five regular NYSE sessions of 390
#: bars are 1950.  The current page's step-size table lists 1-minute bars under "1 D" and calls
#: its figures guidelines; requesting one session per request (the default) follows it exactly.
MAX_DAYS_PER_REQUEST = 5

# ------------------------------------------------------ profiles
STRICT, DOCUMENTED, AUTO = "strict", "documented", "auto"
#: Profile names, as ``ibkr.toml`` spells them.
PROFILES = (STRICT, DOCUMENTED, AUTO)
#: Requests in flight under ``documented`` and at the start of ``auto``.
DEFAULT_CONCURRENCY = 4
#: The most ``auto`` lets in flight.
DEFAULT_MAX_CONCURRENCY = 16
#: Seconds: an answer slower than this counts as throttling under ``auto``.
DEFAULT_SLOW_ANSWER = 10.0
#: Seconds after learning during which ``auto`` does not probe again (7 days).
DEFAULT_RELEARN = 7 * 86400.0
#: Seconds assumed for one answer (a one-day request of one-minute bars) until one was measured.
DEFAULT_ANSWER = 1.0

_UNIT_SECONDS = {"sec": 1.0, "secs": 1.0, "min": 60.0, "mins": 60.0, "hour": 3600.0, "hours": 3600.0,
                 "day": 86400.0, "days": 86400.0, "week": 7 * 86400.0, "weeks": 7 * 86400.0,
                 "month": 30 * 86400.0, "months": 30 * 86400.0}


def is_pacing_violation(code: int, text: str) -> bool:
    """True for error 162 whose text reports a pacing violation."""
    return code == PACING_ERROR and PACING_TEXT in text.lower()


def is_query_cancelled(code: int, text: str) -> bool:
    """True for error 162 whose text reports the query cancelled
    ("API historical data query cancelled: <reqId>")."""
    return code == PACING_ERROR and CANCELLED_TEXT in text.lower()


def bar_seconds(bar_size: str) -> float:
    """Seconds of one bar of an IB ``barSizeSetting`` ("1 secs", "30 secs",
    "1 min", "5 mins", "1 hour", "1 day", "1 week", "1 month"; a month
    counts 30 days).  Raises ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s+([a-z]+)\s*", bar_size.lower())
    if m is None or m.group(2) not in _UNIT_SECONDS or int(m.group(1)) <= 0:
        raise ValueError(f"unknown bar size {bar_size!r} (IB's barSizeSetting, e.g. '30 secs', '1 min')")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def is_small_bar(bar_size: str | None) -> bool:
    """True when IB's small-bar rules apply: bars of 30 s or less; also for
    ``None`` (bar size unknown: the small-bar rules are the safe side).
    Raises ValueError for an unknown bar size."""
    return bar_size is None or bar_seconds(bar_size) <= SMALL_BAR_MAX


def _check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown pacing profile {profile!r} (one of {', '.join(PROFILES)})")
    return profile


@dataclass(frozen=True)
class PacingRules:
    """IB's limits (unscaled seconds)."""

    max_requests: int = MAX_REQUESTS     # in any `window`
    window: float = WINDOW
    identical_window: float = IDENTICAL_WINDOW
    burst_requests: int = BURST_REQUESTS  # this many for one contract/exchange/tick type ...
    burst_window: float = BURST_WINDOW    # ... within this is a violation
    max_open: int = MAX_OPEN
    bid_ask_weight: int = BID_ASK_WEIGHT


@dataclass(frozen=True)
class LearnedPacing:
    """What ``auto`` learned from IB's answers: ``profile`` in force
    ("strict" or "documented"), ``concurrency`` (requests in flight, 1-50),
    ``at`` (when, a UTC-aware datetime) and ``why`` (one line, for the log).

    :meth:`to_dict` gives ``{"profile", "concurrency", "at" (ISO 8601),
    "why"}``, JSON-safe (for a database row and a log line);
    :meth:`from_dict` reads it back (``at`` as ISO text or datetime) and
    raises ValueError on a bad profile, concurrency or time.
    """

    profile: str
    concurrency: int
    at: dt.datetime
    why: str = ""

    def __post_init__(self):
        if self.profile not in (STRICT, DOCUMENTED):
            raise ValueError(f"learned pacing profile must be {STRICT} or {DOCUMENTED}, not {self.profile!r}")
        if not 1 <= self.concurrency <= MAX_OPEN:
            raise ValueError(f"learned concurrency {self.concurrency} outside 1..{MAX_OPEN}")
        if self.at.tzinfo is None:
            raise ValueError("learned pacing time must be timezone-aware")

    def to_dict(self) -> dict:
        return {"profile": self.profile, "concurrency": self.concurrency, "at": self.at.isoformat(),
                "why": self.why}

    @classmethod
    def from_dict(cls, d: Mapping) -> LearnedPacing:
        try:
            at = d["at"]
            if isinstance(at, str):
                at = dt.datetime.fromisoformat(at)
            if not isinstance(at, dt.datetime):
                raise ValueError(f"learned pacing time {at!r} is not a time")
            return cls(str(d["profile"]), int(d["concurrency"]), at, str(d.get("why", "")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"learned pacing state {dict(d)!r} is incomplete: {e}") from None

    def age(self, now: dt.datetime) -> float:
        """Seconds since it was learned (negative if ``now`` is earlier)."""
        return (now - self.at).total_seconds()

    def fresh(self, now: dt.datetime, relearn: float) -> bool:
        """True while younger than ``relearn`` seconds: IB is not probed again."""
        return self.age(now) < relearn


def auto_start(concurrency: int, learned: LearnedPacing | None, relearn: float,
               now: dt.datetime) -> tuple[str, int]:
    """Where ``auto`` starts: ``(profile, concurrency)`` of ``learned`` while
    it is younger than ``relearn`` seconds, else ``("documented",
    concurrency)``."""
    if learned is not None and learned.fresh(now, relearn):
        return learned.profile, learned.concurrency
    return DOCUMENTED, concurrency


def _rate_bound_time(requests_per_contract: Sequence[int], window: float, max_requests: int,
                     burst_window: float, burst_max: int) -> float:
    """Seconds from the first to the last send of a fresh run under the
    ten-minute rule, or the two-second rule when one contract dominates."""
    counts = [n for n in requests_per_contract if n > 0]
    if not counts:
        return 0.0
    ten_min = window * ((sum(counts) - 1) // max_requests)
    burst = max(burst_window * ((n - 1) // burst_max) for n in counts)
    return max(ten_min, burst)


def _in_flight_time(n: int, concurrency: int, answer: float) -> float:
    """Seconds from the first to the last send of ``n`` requests with
    ``concurrency`` in flight, each answered in ``answer`` seconds."""
    return 0.0 if n <= 0 else answer * ((n - 1) // concurrency)


def plan_time(profile: str, requests: Sequence[tuple[str, int]], *, concurrency: int = DEFAULT_CONCURRENCY,
              answer: float = DEFAULT_ANSWER, scale: float = 1.0, margin: float = 0.01,
              slack: float = 0.5) -> float:
    """Seconds a fresh run needs, from its first request to its last, under
    ``profile`` (pure).

    ``requests``: one ``(bar_size, number_of_requests)`` per contract
    (``bar_size`` as IB's barSizeSetting, e.g. "1 min"); ``concurrency``:
    requests in flight (capped at 50); ``answer``: seconds IB takes per
    answer (an assumption: :data:`DEFAULT_ANSWER` or a measured mean);
    ``scale``, ``margin``, ``slack`` as for :class:`PacingLimiter`.
    ``strict`` puts every request under the small-bar rules; ``documented``
    only the small bars, the others go ``concurrency`` at a time; ``auto``
    counts as ``documented`` at ``concurrency`` (pass the profile and
    concurrency it starts from, see :func:`auto_start`; growth is not
    counted, so ``auto`` usually takes less).  Small-bar and larger
    requests proceed side by side: the longer of the two.  Raises
    ValueError for an unknown profile or bar size, ``concurrency < 1`` or
    ``answer < 0``.
    """
    _check_profile(profile)
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if answer < 0:
        raise ValueError("answer must be >= 0")
    small = [n for bar, n in requests if profile == STRICT or is_small_bar(bar)]
    large = sum(n for bar, n in requests if profile != STRICT and not is_small_bar(bar))

    def eff(w: float) -> float:
        return w * scale * (1.0 + margin) + slack * scale

    rate = _rate_bound_time(small, eff(WINDOW), MAX_REQUESTS, eff(BURST_WINDOW), BURST_REQUESTS - 1)
    return max(rate, _in_flight_time(large, min(concurrency, MAX_OPEN), answer))


@dataclass(frozen=True)
class PacingStatus:
    """The limiter's live figures: ``profile`` configured, ``in_force``
    ("strict" or "documented"), ``concurrency`` (requests allowed in flight
    now: the open limit, or the caller's workers if fewer), ``in_flight``
    (open now), ``rate`` (requests sent per minute over the last ``window``
    seconds, or since the first request if less),
    ``window`` (seconds, scaled), ``answer`` (mean answer time in seconds,
    None before the first answer), ``violations`` (reported by IB) and
    ``learned`` (the last :class:`LearnedPacing`, or None)."""

    profile: str
    in_force: str
    concurrency: int
    in_flight: int
    rate: float
    window: float
    answer: float | None
    violations: int
    learned: LearnedPacing | None

    def line(self) -> str:
        """``pacing auto (documented), 3/8 in flight, 41.2 requests/min``."""
        shown = self.profile if self.profile == self.in_force else f"{self.profile} ({self.in_force})"
        return f"pacing {shown}, {self.in_flight}/{self.concurrency} in flight, {self.rate:.1f} requests/min"


class _Entry:
    """One counted request: time ``t`` (send time, moved to the answer time
    on release), weight and keys; ``sent`` (send time), ``latency`` (seconds
    to its answer, once released), ``gen`` (the limiter's generation when
    sent), ``probe`` (sent beyond the small-bar rules to learn), ``own``
    (sent by this process, not seeded), ``ok`` (answered with data, not
    refused)."""

    __slots__ = ("t", "w", "ident", "ckey", "sent", "latency", "gen", "probe", "own", "ok")

    def __init__(self, t: float, w: int, ident: Hashable | None, ckey: Hashable | None, gen: int = 0,
                 own: bool = True):
        self.t, self.w, self.ident, self.ckey = t, w, ident, ckey
        self.sent, self.latency, self.gen, self.probe, self.own, self.ok = t, None, gen, False, own, False


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class PacingLimiter:
    """Delays historical requests so that none breaks IB's pacing rules
    ("Historical Data Limitations") as the profile in force reads them.

    ``scale`` multiplies every window (and the margins); ``clock`` is a
    monotonic clock in seconds; ``sleep`` an awaitable sleep; ``wall_clock``
    returns the UTC-aware time (for :class:`LearnedPacing`); all replaceable
    in tests.  Use from one event loop.

    Per request: ``ticket = await acquire(identical_key, contract_key,
    weight, bar_size)`` right before sending it; when its answer (or error)
    arrives ``finish(ticket, code, text)`` (or ``release(ticket)`` then
    ``success(ticket)`` / ``violation(ticket)`` / ``cancelled(ticket)``).
    ``identical_key`` identifies identical requests (contract, exchange,
    endDateTime, durationStr, barSizeSetting, whatToShow, useRTH,
    formatDate); ``contract_key`` is (contract, exchange, whatToShow);
    ``weight`` is 2 for BID_ASK (see :meth:`weight_for`); ``bar_size`` is
    IB's barSizeSetting (default: the limiter's ``bar_size``; None means
    the small-bar rules).

    A request counts from the moment it is sent until its answer arrives,
    and from then on as if it had been sent when answered: the answer time
    is an upper bound of when IB read the request, so a server that reads a
    request late (busy with earlier ones) never sees two requests closer
    together than the limiter allowed.

    Profiles (``profile``, see :data:`PROFILES`): ``strict`` (the default)
    applies the small-bar rules to every request and allows 50 open;
    ``documented`` applies them to bars of 30 s or less only, and allows
    ``concurrency`` open; ``auto`` starts from :func:`auto_start` (what was
    ``learned``, while younger than ``relearn`` seconds, else
    ``documented`` at ``concurrency``) and adapts:

    * growth: after ``concurrency`` prompt answers in a row (each within
      ``slow_answer`` seconds) one more request may be in flight, up to
      ``max_concurrency``; reaching it is learned ("ceiling");
    * a lone probe: until a request sent beyond the small-bar rules was
      answered promptly in this run, only one such request is open at a
      time, so IB refuses at most one if it applies those rules.  A probe
      proves that IB does not apply them only if IB's own window held 60
      requests before it: at least ``max_requests`` accepted requests of
      this run sent less than one (unpadded) window before the probe's
      answer.  A probe IB accepted with fewer (the limiter's window is
      padded and counts from the answers, so it fills before IB's) proves
      nothing: the next request beyond the rules is a lone probe again;
    * fall back: a pacing violation (error 162) switches to ``strict`` at
      once (the refusal shows IB counts these bars; fewer in flight would
      not change the count in ten minutes); a "query cancelled" answer or an
      answer slower than ``slow_answer`` halves the number in flight the
      first time and switches to ``strict`` the next time.  Answers to
      requests sent before the last change do not count again;
    * every fall back and the ceiling are learned (:attr:`learned`,
      ``on_learn(learned)`` is called, one log line naming the number of
      requests sent so far); for ``relearn`` seconds after, no growth and
      ``strict`` stays ``strict``; then ``strict`` becomes ``documented``
      at ``concurrency`` again and growth resumes.  ``slow_answer`` is
      seconds of IB's time, multiplied by ``scale`` like the windows (a
      simulator scaled by 0.01 slows its answers by 0.01 of IB's);
      ``relearn`` is seconds of wall clock, not scaled.

    Raises ValueError for a bad ``scale``, margins, profile or
    ``bar_size``, ``concurrency`` outside 1..50 (or above
    ``max_concurrency`` under ``auto``), ``max_concurrency`` outside
    1..50, ``slow_answer <= 0`` or ``relearn < 0``.
    """

    def __init__(self, scale: float = 1.0, rules: PacingRules = PacingRules(), margin: float = 0.01,
                 slack: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, keep_history: bool = False, *,
                 profile: str = STRICT, concurrency: int = DEFAULT_CONCURRENCY,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY, slow_answer: float = DEFAULT_SLOW_ANSWER,
                 relearn: float = DEFAULT_RELEARN, learned: LearnedPacing | None = None,
                 bar_size: str | None = None, wall_clock: Callable[[], dt.datetime] = _utc_now,
                 on_learn: Callable[[LearnedPacing], None] | None = None):
        if scale <= 0:
            raise ValueError("pacing scale must be > 0")
        if margin < 0 or slack < 0:
            raise ValueError("margin and slack must be >= 0")
        _check_profile(profile)
        if not 1 <= max_concurrency <= MAX_OPEN:
            raise ValueError(f"max_concurrency must be within 1..{MAX_OPEN}")
        if not 1 <= concurrency <= MAX_OPEN:
            raise ValueError(f"concurrency must be within 1..{MAX_OPEN}")
        if profile == AUTO and concurrency > max_concurrency:
            raise ValueError("concurrency must not exceed max_concurrency")
        if slow_answer <= 0:
            raise ValueError("slow_answer must be > 0")
        if relearn < 0:
            raise ValueError("relearn must be >= 0")
        if bar_size is not None:
            bar_seconds(bar_size)
        self.scale = scale
        self.rules = rules
        self.clock = clock
        self.sleep = sleep
        self.wall_clock = wall_clock
        pad = slack * scale

        def eff(w: float) -> float:
            return w * scale * (1.0 + margin) + pad

        self.window = eff(rules.window)
        self.ib_window = rules.window * scale              # IB's window as is, for what a probe proves
        self.identical_window = eff(rules.identical_window)
        self.burst_window = eff(rules.burst_window)
        self.burst_max = rules.burst_requests - 1          # "fewer than six"
        self.max_requests = rules.max_requests
        self.max_open = rules.max_open
        self.pause_base = rules.identical_window * scale
        self._longest = max(self.window, self.identical_window, self.burst_window)
        self._entries: list[_Entry] = []
        self._ident_last: dict[Hashable | None, float] = {}   # identical key -> its latest counted time
        self._prune_at = -math.inf
        self._open = 0
        self._paused_until = 0.0
        self._strikes = 0
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()
        self.sent = 0
        self.violations = 0
        self.waited = 0.0
        self.history: list[float] | None = [] if keep_history else None
        # profiles
        self.profile = profile
        self.bar_size = bar_size
        self.start_concurrency = concurrency
        self.max_concurrency = max_concurrency
        self.slow_answer = slow_answer
        self.slow_after = slow_answer * scale
        self.relearn = relearn
        self.on_learn = on_learn
        self.learned: LearnedPacing | None = learned
        self.answer_time: float | None = None   # mean answer time (s), exponentially weighted
        self._gen = 0
        self._prompt = 0          # prompt answers in a row at the current concurrency
        self._halved = False      # a soft signal already halved the number in flight
        self._confirmed = False   # a request beyond the small-bar rules was answered promptly
        self._probe: _Entry | None = None
        self._first_sent: float | None = None
        if profile == AUTO:
            self.in_force, self.concurrency = auto_start(concurrency, learned, relearn, wall_clock())
        else:
            self.in_force, self.concurrency = (STRICT if profile == STRICT else DOCUMENTED), concurrency

    def resume(self, learned: LearnedPacing | None) -> None:
        """Start from what an earlier run learned (call before the first
        :meth:`acquire`): under ``auto`` the profile in force and the
        number in flight become :func:`auto_start`'s; for every profile
        ``learned`` is kept (:attr:`learned`, in :meth:`status`)."""
        self.learned = learned
        if self.profile == AUTO:
            self.in_force, self.concurrency = auto_start(self.start_concurrency, learned, self.relearn,
                                                         self.wall_clock())

    # ----------------------------------------------------------- decisions
    def weight_for(self, what_to_show: str) -> int:
        """2 for BID_ASK, else 1."""
        return self.rules.bid_ask_weight if what_to_show.upper() == "BID_ASK" else 1

    @property
    def open_limit(self) -> int:
        """Requests that may be open at once now: 50 (``rules.max_open``)
        under the ``strict`` profile, else the concurrency in force."""
        return self.max_open if self.profile == STRICT else min(self.concurrency, self.max_open)

    @property
    def max_in_flight(self) -> int:
        """The most requests this limiter will ever let be open (workers
        the caller needs): ``max_concurrency`` under ``auto``, else
        ``concurrency``."""
        return self.max_concurrency if self.profile == AUTO else self.start_concurrency

    def _small_rules(self, bar_size: str | None) -> bool:
        """True when the small-bar rules apply to a request of this bar size."""
        if self.in_force == STRICT:
            return True
        return is_small_bar(bar_size if bar_size is not None else self.bar_size)

    def _prune(self, now: float, force: bool = False) -> None:
        """Forget what no window counts any more; at most every quarter of
        the longest window (every reader filters by time anyway), so that
        a high rate of requests costs no scan per request.  A request of
        this process still open is kept, however old: it counts from its
        answer once answered."""
        if now < self._prune_at and not force:
            return
        self._prune_at = now + 0.25 * self._longest
        self._entries = [e for e in self._entries if now - e.t < self._longest or (e.own and e.latency is None)]
        self._ident_last = {k: t for k, t in self._ident_last.items() if now - t < self.identical_window}

    def _count_ident(self, e: _Entry) -> None:
        last = self._ident_last.get(e.ident)
        if last is None or e.t > last:
            self._ident_last[e.ident] = e.t

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

    def _rate_until(self, contract_key: Hashable, weight: int, now: float) -> float:
        """When the two-second and ten-minute rules allow the request."""
        until = -math.inf
        burst = [e for e in self._entries if e.ckey == contract_key and now - e.t < self.burst_window]
        if burst:
            until = max(until, self._free_at(burst, weight, self.burst_max, self.burst_window))
        inside = [e for e in self._entries if now - e.t < self.window]
        return max(until, self._free_at(inside, weight, self.max_requests, self.window))

    def delay(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1,
              now: float | None = None, bar_size: str | None = None) -> float:
        """Seconds to wait before this request may be sent (0 = now; ``inf``
        while the open-request limit is reached, or while ``auto``'s lone
        probe is unanswered).  Pure: records nothing.  ``bar_size`` as in
        :meth:`acquire`."""
        now = self.clock() if now is None else now
        self._prune(now)
        if self._open + 1 > self.open_limit:
            return math.inf
        until = self._paused_until
        last = self._ident_last.get(identical_key)
        if last is not None and now - last < self.identical_window:
            until = max(until, last + self.identical_window)
        if self._small_rules(bar_size):
            until = max(until, self._rate_until(contract_key, weight, now))
        elif self._probe is not None and self._probing() and self._rate_until(contract_key, weight, now) > now:
            return math.inf
        return max(0.0, until - now)

    def _probing(self) -> bool:
        return self.profile == AUTO and self.in_force == DOCUMENTED and not self._confirmed

    def _record(self, identical_key: Hashable, contract_key: Hashable, weight: int, now: float) -> _Entry:
        e = _Entry(now, weight, identical_key, contract_key, self._gen)
        self._entries.append(e)
        self._count_ident(e)
        self._open += 1
        self.sent += 1
        if self._first_sent is None:
            self._first_sent = now
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
            e = _Entry(now - max(0.0, age), weight, ident, ckey, own=False)
            self._entries.append(e)
            self._count_ident(e)
        self._prune(now, force=True)

    # --------------------------------------------------------------- use
    async def acquire(self, identical_key: Hashable, contract_key: Hashable, weight: int = 1,
                      bar_size: str | None = None) -> _Entry:
        """Wait until the request may be sent, then count it as sent and
        open; returns the ticket for :meth:`release` / :meth:`finish`.
        Callers are served in arrival order.  ``bar_size``: IB's
        barSizeSetting of the request (default: the limiter's)."""
        start = self.clock()
        async with self._lock:
            while True:
                self._maybe_probe_again()
                d = self.delay(identical_key, contract_key, weight, bar_size=bar_size)
                if d <= 0:
                    break
                if math.isinf(d):
                    self._released.clear()
                    await self._released.wait()
                else:
                    await self.sleep(d)
            now = self.clock()
            beyond = (self._probing() and not self._small_rules(bar_size)
                      and self._rate_until(contract_key, weight, now) > now)
            ticket = self._record(identical_key, contract_key, weight, now)
            if beyond:
                ticket.probe = True
                self._probe = ticket
        self.waited += now - start
        return ticket

    def release(self, ticket: _Entry | None = None) -> None:
        """The answer (or error) of one acquired request arrived: it no
        longer counts as open, and counts from now on in every window."""
        if ticket is not None:
            now = self.clock()
            if ticket.latency is None:
                ticket.latency = max(0.0, now - ticket.sent)
            ticket.t = max(ticket.t, now)
            self._count_ident(ticket)
            if self._probe is ticket:
                self._probe = None
        if self._open > 0:
            self._open -= 1
        self._released.set()

    def success(self, ticket: _Entry | None = None) -> None:
        """A request was answered: the violation back-off starts again at
        its base.  With its ``ticket`` (released) ``auto`` judges the answer
        time: prompt answers let the number in flight grow, a slow one falls
        back."""
        self._strikes = 0
        if ticket is None or ticket.latency is None:
            return
        ticket.ok = True
        a = ticket.latency
        self.answer_time = a if self.answer_time is None else 0.8 * self.answer_time + 0.2 * a
        if self.profile != AUTO or ticket.gen != self._gen or self.in_force != DOCUMENTED:
            return
        if a > self.slow_after:
            self._fall(False, f"answer took {a / self.scale:.1f}s (slow_answer {self.slow_answer:g}s)")
            return
        if ticket.probe and not self._confirmed and self._proves(ticket):
            self._confirmed = True
            log.info("pacing auto: IB answered promptly beyond the small-bar rules; going on as documented")
        if self._held() or self.concurrency >= self.max_concurrency:
            return
        self._prompt += 1
        if self._prompt >= self.concurrency:
            self._prompt = 0
            self.concurrency += 1
            if self.concurrency >= self.max_concurrency:
                self._learn(DOCUMENTED, self.concurrency, f"ceiling: {self.concurrency} in flight answered promptly",
                            logging.INFO)

    def violation(self, ticket: _Entry | None = None) -> float:
        """IB reported a pacing violation: pause new requests; returns the
        pause (s).  Under ``auto`` the profile falls back to ``strict``."""
        self.violations += 1
        pause = min(self.pause_base * (2 ** self._strikes), self.window)
        self._strikes += 1
        self._paused_until = max(self._paused_until, self.clock() + pause)
        if self.profile == AUTO:
            self._fall(True, f"pacing violation (error {PACING_ERROR})")
        return pause

    def cancelled(self, ticket: _Entry | None = None) -> None:
        """IB answered "query cancelled" (error 162): under ``auto`` a sign of
        throttling (halve, then ``strict``); answers to requests sent before
        the last change do not count."""
        if self.profile == AUTO and (ticket is None or ticket.gen == self._gen):
            self._fall(False, f"query cancelled (error {PACING_ERROR})")

    def finish(self, ticket: _Entry, code: int = 0, text: str = "") -> float:
        """Release ``ticket`` and report its outcome in one call: ``code`` 0
        for an answer, else IB's error code and text.  Returns the pause
        (s) a pacing violation caused, else 0."""
        self.release(ticket)
        if code == 0:
            self.success(ticket)
        elif is_pacing_violation(code, text):
            return self.violation(ticket)
        elif is_query_cancelled(code, text):
            self.cancelled(ticket)
        return 0.0

    # ------------------------------------------------------------ auto
    def _proves(self, probe: _Entry) -> bool:
        """True when IB's own window held ``max_requests`` before ``probe``
        (answered now): so many accepted requests of this run were sent, before
        it, less than one unpadded window before its answer.  Each reached
        IB after it was sent and before the probe did, so IB counted them all
        when it read the probe."""
        since = probe.t - self.ib_window
        n = sum(e.w for e in self._entries
                if e.own and e.ok and e is not probe and since < e.sent <= probe.sent)
        return n >= self.max_requests

    def _held(self) -> bool:
        """True within ``relearn`` seconds of the last learning."""
        return self.learned is not None and self.learned.fresh(self.wall_clock(), self.relearn)

    def _fall(self, hard: bool, why: str) -> None:
        if self.in_force == STRICT:
            return
        if hard or self._halved:
            self.in_force = STRICT
            self.concurrency = min(self.concurrency, self.start_concurrency)
        else:
            self.concurrency = max(1, self.concurrency // 2)
            self._halved = True
        self._gen += 1
        self._prompt = 0
        self._probe = None
        self._learn(self.in_force, self.concurrency, why)

    def _learn(self, profile: str, concurrency: int, why: str, level: int = logging.WARNING) -> None:
        self.learned = LearnedPacing(profile, concurrency, self.wall_clock(), why)
        log.log(level, "pacing auto: %s with %d in flight (%s) after %d requests sent; not probing again for %gs",
                profile, concurrency, why, self.sent, self.relearn)
        if self.on_learn is not None:
            self.on_learn(self.learned)

    def _maybe_probe_again(self) -> None:
        """``auto`` in ``strict`` and the learning older than ``relearn``:
        back to ``documented`` at the starting concurrency."""
        if self.profile != AUTO or self.in_force != STRICT or self._held():
            return
        self.in_force, self.concurrency = DOCUMENTED, self.start_concurrency
        self._gen += 1
        self._prompt = 0
        self._halved = self._confirmed = False
        log.info("pacing auto: probing again as documented with %d in flight", self.concurrency)

    # --------------------------------------------------------- figures
    @property
    def open_requests(self) -> int:
        return self._open

    def status(self, now: float | None = None) -> PacingStatus:
        """The live figures (see :class:`PacingStatus`)."""
        now = self.clock() if now is None else now
        self._prune(now)
        span = self.window if self._first_sent is None else min(self.window, now - self._first_sent)
        n = sum(1 for e in self._entries if e.own and now - e.sent < self.window)
        rate = 60.0 * n / span if span > 0 else 0.0
        return PacingStatus(self.profile, self.in_force, min(self.open_limit, self.max_in_flight), self._open, rate,
                            self.window,
                            self.answer_time, self.violations, self.learned)

    def estimate(self, n: int, now: float | None = None) -> float:
        """Seconds from ``now`` until the ``n``-th further request (weight 1)
        may be sent under the ten-minute rule, given what was sent already;
        for larger bars under ``documented`` (and ``auto`` as documented):
        ``concurrency`` at a time, each answered in the mean answer time."""
        if n <= 0:
            return 0.0
        now = self.clock() if now is None else now
        if not self._small_rules(None):
            answer = self.answer_time if self.answer_time is not None else DEFAULT_ANSWER
            return max(_in_flight_time(n, self.open_limit, answer), self._paused_until - now)
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
        numbers of requests (one entry per contract) of the limiter's bar
        size: the ten-minute rule, or the two-second rule when one contract
        dominates; for larger bars under ``documented`` (and ``auto`` as
        documented) ``concurrency`` at a time (see :func:`plan_time`)."""
        if not self._small_rules(None):
            answer = self.answer_time if self.answer_time is not None else DEFAULT_ANSWER
            return _in_flight_time(sum(n for n in requests_per_contract if n > 0), self.open_limit, answer)
        return _rate_bound_time(requests_per_contract, self.window, self.max_requests, self.burst_window,
                                self.burst_max)


def utilisation(times: Sequence[float], window: float, max_requests: int = MAX_REQUESTS) -> float:
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
