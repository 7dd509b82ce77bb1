"""Health score 0-100 of one feed, from measured values (pure: no I/O).

The score is the sum of five parts, each computed from a :class:`Measures`
by a rule simple enough to check by hand:

=============  ======  ==========================================================
part           points  measured by
=============  ======  ==========================================================
running        0-30    the unit runs when it should; minus restarts in the last hour
compliance     0-20    running exactly when expected (session hours)
errors         0-25    (malformed + rejected rows + venue errors) / messages
freshness      0-15    age of the last message vs the streams' freshness bound
performance    0-10    lag p99 vs target (5) and rate vs the usual rate (5)
=============  ======  ==========================================================

Each part is rounded half up to an integer; ``total`` is their sum.
A feed that is correctly stopped outside its session (and did not restart in
the last hour) scores 100.  Thresholds and scales are in :class:`Params`
(defaults: :data:`DEFAULT_PARAMS`); :func:`alerting` compares a score with a
configured threshold.

The caller gathers the measures (systemd ``ActiveState`` / ``NRestarts``, the
``feed_heartbeat`` row and its ``detail``, the venue's calendar session) and
calls :func:`score`; ``feedctl status``, the page and the API show
:attr:`Score.total`, :attr:`Score.parts` and :attr:`Score.reasons`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

#: Maximum points of each part, in display order.
MAX_POINTS: dict[str, int] = {
    "running": 30,
    "compliance": 20,
    "errors": 25,
    "freshness": 15,
    "performance": 10,
}


@dataclass(frozen=True, slots=True)
class Measures:
    """The measured inputs of one feed's score.

    Counts (``messages``, ``malformed``, ``rejected_rows``, ``spooled_rows``,
    ``errors``) are over the same window (e.g. the last status window or the
    last 5 minutes); ``rate`` and ``usual_rate`` are messages per second.
    ``None`` means "not measured / unknown".
    """

    #: bool: systemd ActiveState == "active" (or a oneshot whose last run succeeded).
    unit_active: bool
    #: bool: the unit should run now (Binance always; Kite during NSE session
    #: hours; IBKR during NYSE hours).
    expected_running: bool
    #: bool: the venue's session is open now (data is expected to flow).
    in_session: bool
    #: int, count: automatic restarts in the last hour (NRestarts delta).
    restarts_last_hour: int = 0
    #: bool: systemd has the unit failed (ActiveState == "failed"), in or out of its hours.
    unit_failed: bool = False
    #: float seconds | None: now - feed_heartbeat.updated_at; None = no heartbeat row.
    heartbeat_age_s: float | None = None
    #: float seconds: the unit's heartbeat (status) interval; a heartbeat older
    #: than ``Params.stale_intervals`` of these counts as "not running".
    heartbeat_interval_s: float = 10.0
    #: int, count: messages received in the window.
    messages: int = 0
    #: int, count: malformed / implausible inputs skipped in the window.
    malformed: int = 0
    #: int, rows: rows the sink rejected in the window (sum over tables).
    rejected_rows: int = 0
    #: int, rows: rows written to the disk spool (not to PostgreSQL) in the window.
    spooled_rows: int = 0
    #: int, rows: rows held, not yet stored (informational: not scored).
    pending: int = 0
    #: int, count: venue errors in the window (IB errors, reconnects, resubscriptions...).
    errors: int = 0
    #: float seconds | None: age of the newest message of any stream; None = none yet.
    last_message_age_s: float | None = None
    #: float seconds > 0: freshness bound of the feed's streams.
    expected_max_age_s: float = 60.0
    #: float milliseconds | None: p99 of commit time minus venue event time.
    lag_p99_ms: float | None = None
    #: float milliseconds > 0: the lag p99 target.
    lag_target_ms: float = 2000.0
    #: float messages/second | None: current message rate.
    rate: float | None = None
    #: float messages/second | None: the usual rate at this time of day; None = unknown.
    usual_rate: float | None = None


@dataclass(frozen=True, slots=True)
class Params:
    """Scales of the score (all documented in the README section)."""

    #: points off the running part per restart in the last hour.
    restart_penalty: int = 10
    #: heartbeat older than this many heartbeat intervals = not running (when expected).
    stale_intervals: float = 3.0
    #: error ratio at which the errors part reaches 0 (0.01 = 1 %).
    error_ratio_zero: float = 0.01
    #: age / bound (freshness) and lag / target (performance) at which the part reaches 0.
    zero_factor: float = 10.0
    #: rate below this fraction of the usual rate scores 0 for the rate half.
    rate_drop: float = 0.5


DEFAULT_PARAMS = Params()


@dataclass(frozen=True, slots=True)
class Score:
    """``total``: int 0-100 (sum of ``parts``); ``parts``: ``{name: int}`` with
    the names and maxima of :data:`MAX_POINTS`; ``reasons``: short texts, one
    per cause of lost points (empty when total == 100)."""

    total: int
    parts: dict[str, int]
    reasons: list[str] = field(default_factory=list)

    @property
    def running(self) -> int:
        return self.parts["running"]

    @property
    def compliance(self) -> int:
        return self.parts["compliance"]

    @property
    def errors(self) -> int:
        return self.parts["errors"]

    @property
    def freshness(self) -> int:
        return self.parts["freshness"]

    @property
    def performance(self) -> int:
        return self.parts["performance"]

    def as_dict(self) -> dict:
        """JSON-ready ``{"total": int, "parts": {...}, "reasons": [...]}`` (for the API)."""
        return {"total": self.total, "parts": dict(self.parts), "reasons": list(self.reasons)}


def _round(x: float) -> int:
    """Round half up (deterministic, unlike round()'s half-to-even)."""
    return int(x + 0.5)


def _decay(value: float, bound: float, zero_factor: float) -> float:
    """1.0 while ``value <= bound``, falling linearly to 0.0 at
    ``zero_factor * bound``, 0.0 beyond."""
    if value <= bound:
        return 1.0
    span = (zero_factor - 1.0) * bound
    if span <= 0:
        return 0.0
    return max(0.0, 1.0 - (value - bound) / span)


def heartbeat_stale(m: Measures, p: Params = DEFAULT_PARAMS) -> bool:
    """True when there is no heartbeat or it is older than
    ``p.stale_intervals * m.heartbeat_interval_s`` seconds."""
    return m.heartbeat_age_s is None or m.heartbeat_age_s > p.stale_intervals * m.heartbeat_interval_s


def is_running(m: Measures, p: Params = DEFAULT_PARAMS) -> bool:
    """Running as the score sees it: the unit is active and, when it is
    expected to run, its heartbeat is not stale (a hung process whose
    heartbeat stopped counts as not running)."""
    return m.unit_active and not (m.expected_running and heartbeat_stale(m, p))


def score(m: Measures, p: Params = DEFAULT_PARAMS) -> Score:
    """The :class:`Score` of the feed measured by ``m`` (scales from ``p``)."""
    reasons: list[str] = []
    running = is_running(m, p)
    restarts = max(0, m.restarts_last_hour)

    # running (0-30)
    if m.unit_failed:
        run_pts = 0
        reasons.append("failed (systemd)")
    elif m.expected_running and not running:
        run_pts = 0
        reasons.append("not running (heartbeat stale)" if m.unit_active else "not running")
    else:
        run_pts = max(0, MAX_POINTS["running"] - p.restart_penalty * restarts)
        if run_pts < MAX_POINTS["running"]:
            reasons.append(f"{restarts} restart(s) in the last hour")

    # compliance (0-20)
    if running == m.expected_running:
        comp_pts = MAX_POINTS["compliance"]
    else:
        comp_pts = 0
        reasons.append("running outside its hours" if running else "stopped during its hours")

    # errors (0-25); a stopped unit has no window to judge
    err_pts = MAX_POINTS["errors"]
    if running:
        bad = max(0, m.malformed) + max(0, m.rejected_rows) + max(0, m.errors)
        ratio = bad / max(1, m.messages)
        err_pts = _round(MAX_POINTS["errors"] * (1.0 - min(1.0, ratio / p.error_ratio_zero)))
        if err_pts < MAX_POINTS["errors"]:
            what = ", ".join(f"{n} {k}" for k, n in (("malformed", m.malformed),
                                                       ("rejected", m.rejected_rows),
                                                       ("errors", m.errors)) if n > 0)
            reasons.append(f"error ratio {ratio:.2%} ({what} / {max(0, m.messages)} messages)")

    # freshness (0-15): judged during the session only
    fresh_pts = MAX_POINTS["freshness"]
    if m.in_session:
        age = m.last_message_age_s
        if age is None:
            fresh_pts = 0
            reasons.append("no message during the session")
        else:
            fresh_pts = _round(MAX_POINTS["freshness"] * _decay(age, m.expected_max_age_s, p.zero_factor))
            if fresh_pts < MAX_POINTS["freshness"]:
                reasons.append(f"last message {age:.0f}s old (bound {m.expected_max_age_s:.0f}s)")

    # performance (0-10): lag half + rate half; unknown = full; a stopped unit is not judged
    half = MAX_POINTS["performance"] / 2
    lag_pts = rate_pts = half
    if running:
        if m.spooled_rows > 0:
            lag_pts = 0.0
            reasons.append(f"spooling ({m.spooled_rows} rows not reaching PostgreSQL)")
        elif m.lag_p99_ms is not None:
            lag_pts = half * _decay(m.lag_p99_ms, m.lag_target_ms, p.zero_factor)
            if _round(lag_pts) < half:
                reasons.append(f"lag p99 {m.lag_p99_ms:.0f}ms (target {m.lag_target_ms:.0f}ms)")
        if (m.rate is not None and m.usual_rate is not None and m.usual_rate > 0
                and m.rate < p.rate_drop * m.usual_rate):
            rate_pts = 0.0
            reasons.append(f"rate {m.rate:.1f}/s below {p.rate_drop:.0%} of usual {m.usual_rate:.1f}/s")
    perf_pts = _round(lag_pts + rate_pts)

    parts = {"running": run_pts, "compliance": comp_pts, "errors": err_pts,
             "freshness": fresh_pts, "performance": perf_pts}
    return Score(total=sum(parts.values()), parts=parts, reasons=reasons)


def alerting(s: Score, threshold: int) -> bool:
    """True when the score is under the configured alert ``threshold`` (0-100)."""
    return s.total < threshold


# -- a collector's own view --------------------------------------------------------------------------

#: Collector figures counted as venue errors (IB's error messages, reconnections).
ERROR_FIGURES = ("ib errors", "reconnects")

#: Health states of a process that collects (the venue's session is open for it).
COLLECTING = ("running", "degraded", "spooling")


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative counters of one collector process at ``at``
    (``time.monotonic()`` seconds): ``messages``, ``malformed``,
    ``rejected`` rows, ``spooled`` rows and venue ``errors``
    (:data:`ERROR_FIGURES`)."""
    at: float
    messages: int = 0
    malformed: int = 0
    rejected: int = 0
    spooled: int = 0
    errors: int = 0


def process_counters(health, sink=None) -> Counters:
    """The :class:`Counters` of a running process now, from its
    :class:`feeds.health.Health` and :class:`feeds.sink.Sink` (or None).
    Safe from any thread (it reads copies)."""
    figures = dict(health.figures)
    rejected = spooled = 0
    if sink is not None:
        rejected = sum(t.rejected for t in list(sink.stats.tables.values()))
        spooled = sink.stats.spooled_rows
    return Counters(at=time.monotonic(), messages=sum(s.count for s in list(health.streams.values())),
                    malformed=health.malformed, rejected=rejected, spooled=spooled,
                    errors=int(sum(v for k, v in figures.items() if k in ERROR_FIGURES
                                   and isinstance(v, (int, float)))))


def process_score(health, sink=None, since: Counters | None = None, *,
                  heartbeat_interval_s: float = 10.0) -> tuple[Score, Counters]:
    """The score a running collector gives itself, and the counters it was
    computed from (pass them back as ``since`` to score the next window).

    The process's own view: the unit is active and expected to run (it
    runs), in session while its health state is one of :data:`COLLECTING`,
    with no restart known and a fresh heartbeat (it answers itself); the
    counts are those since ``since`` (None: since the process started);
    spooled rows count only while the sink is spooling; the freshness bound
    is the watchdog's ``flow_timeout``.  ``feedctl check`` scores the same
    feed from outside (systemd, heartbeat rows, calendars)."""
    now = process_counters(health, sink)
    base = since or Counters(at=now.at)
    spooling = sink is not None and bool(sink.spooling)
    span = now.at - base.at
    m = Measures(
        unit_active=True, expected_running=True, in_session=health.state in COLLECTING,
        heartbeat_age_s=0.0, heartbeat_interval_s=heartbeat_interval_s,
        messages=max(0, now.messages - base.messages), malformed=max(0, now.malformed - base.malformed),
        rejected_rows=max(0, now.rejected - base.rejected),
        spooled_rows=max(0, now.spooled - base.spooled) if spooling else 0,
        pending=int(sink.pending) if sink is not None else 0,
        errors=max(0, now.errors - base.errors),
        last_message_age_s=health.last_message_age(), expected_max_age_s=health.flow_timeout,
        lag_p99_ms=health.lag_total.percentile(99),
        rate=(now.messages - base.messages) / span if since is not None and span > 0 else None)
    return score(m), now
