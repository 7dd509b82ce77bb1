"""The pure core of ``feedctl check``: which alert conditions hold (no I/O).

The caller (``feedctl check``, run every minute by ``feed-check.timer``)
gathers the facts -- systemd's unit properties, the ``feed_heartbeat`` rows,
gaps, kline check rows, the Kite and Dhan tokens, backfill sessions in ERROR
(IBKR and Dhan), free disk space, pending migrations, usual rates -- into a
:class:`Facts`, and
calls :func:`evaluate` (or :func:`holding`).  The result's ``holding`` is
the ``{key: (title, body, severity)}`` mapping that
:meth:`feeds.ops.alerts.AlertState.update` takes; its ``memory`` is a small
JSON-ready dict the caller keeps (e.g. next to ``alerts.state_file``) and
passes back as :attr:`Facts.previous` on the next run, so that "the spool
grows", "new rows were rejected", rates and restarts in the last hour can be
judged between runs.

Conditions (key -> severity):

===============================  ========  ====================================================
key                              severity  holds when
===============================  ========  ====================================================
``stale:<unit>``                 critical  the venue's session is open (Binance and
                                           feed-indicators: always; Kite and Dhan: XNSE session;
                                           IBKR: XNYS session, from the calendars)
                                           and ``grace_s`` has passed since the open, and the unit
                                           is not active, or its heartbeat is older than
                                           ``stale_after_s`` (or missing), or its newest message is
                                           (the process is alive but receives nothing)
``rate:<unit>``                  warning   in session, a stream kind's rate (or the unit's total,
                                           kind ``all``) is below ``rate_drop`` x its usual rate
                                           for that time of day on two runs in a row; it clears
                                           once every such rate is back to twice that fraction
``spool:<unit>``                 warning / a spool holds data (warning) / grew since the last run or
                                 critical  the heartbeat's spooled rows grew (critical)
``rejected:<unit>:<table>``      warning   the sink rejected rows of ``table`` within the last
                                           ``hold_new_for_s`` seconds
``gap:<stream>:<symbol>``        warning   a gap that is not filled
``kline:<symbol>``               warning   a kline check mismatch not repaired
``token:kite``                   critical  the renewal (feed-kite-token) failed, or the token is
                                           missing or expires before the end of the next (or
                                           current) NSE session once that session is
                                           ``token_lead_s`` away
``token:dhan``                   critical  the same for Dhan's token (feed-dhan-token, feed-dhan)
``backfill-error:<symbol>``      warning   IBKR backfill sessions in ERROR (ibkr_session_status)
``backfill-error:dhan:<instr>``  warning   Dhan backfill sessions in ERROR (dhan_session_status;
                                           ``<instr>`` is ``SEGMENT:SYMBOL``, e.g. NSE_EQ:HDFCBANK)
``disk:<path>``                  warning / free space under ``disk_min_free`` percent (critical
                                 critical  under half of it)
``migrations``                   warning   migrations not applied
``health:<unit>``                warning   the feed's health score is under ``health_threshold``
===============================  ========  ====================================================

While ``stale:<unit>`` holds, that unit's ``rate:`` and ``health:`` are not
told: they would be the same failure told again.  Keys depend only on the
unit, stream, symbol, table or path, never on measured values, so a
condition keeps its key from one run to the next.
Bodies say what was measured and what to run; they never hold a secret
(no token, no URL, no DSN).

Every datetime is aware; durations are seconds; rates are messages per second.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..settings import ALERTS
from . import healthscore

#: The declared defaults of the alert settings (lib/feeds/settings.py), used when no file is read.
_ALERTS_DEFAULT = {s.key: s.default for s in ALERTS}

UTC = dt.timezone.utc

CRITICAL = "critical"
WARNING = "warning"

MEMORY_VERSION = 1

#: Holding conditions: ``{key: (title, body, severity)}``.
Holding = dict[str, tuple[str, str, str]]


# -- session rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRule:
    """When a unit must deliver data.

    ``kind``: ``"always"`` (Binance, feed-indicators), ``"calendar"`` (the
    session of exchange calendar ``calendar``: Kite and Dhan ``XNSE``, IBKR
    ``XNYS``) or ``"none"`` (a oneshot: no staleness rule); ``venue``: a
    name for messages; ``always_text``: for an ``"always"`` rule, why it
    must run now (one clause for messages).
    """
    kind: str
    calendar: str | None = None
    venue: str = ""
    always_text: str = ""


ALWAYS = SessionRule("always", None, "Binance USD-M futures", "Binance trades around the clock")
NSE = SessionRule("calendar", "XNSE", "NSE (Kite)")
NYSE = SessionRule("calendar", "XNYS", "NYSE (IBKR)")
NSE_DHAN = SessionRule("calendar", "XNSE", "NSE (Dhan)")
INDICATORS = SessionRule("always", None, "technical indicators",
                         "feed-indicators runs around the clock (it polls every venue's candles)")
NO_RULE = SessionRule("none")

#: Unit names (without ``.service``) and their rules: a unit matches a name
#: exactly or as its template's instance (``<name>@<instance>``).  Anything
#: else -- oneshots such as feed-backfill, feed-kite-token, feed-dhan-token,
#: feed-dhan-backfill, feed-maintain -- has :data:`NO_RULE`: a name
#: continued by ``-`` is another unit (feed-dhan-token is not feed-dhan).
VENUE_OF_UNIT: tuple[tuple[str, SessionRule], ...] = (
    ("feed-binance", ALWAYS),     # feed-binance.service, feed-binance@<name>.service
    ("feed-zerodha", NSE),
    ("feed-ibkr", NYSE),
    ("feed-dhan", NSE_DHAN),      # feed-dhan.service, feed-dhan@<name>.service; not feed-dhan-token
    ("feed-indicators", INDICATORS),
)


def unit_base(unit: str) -> str:
    """``feed-binance@eth.service`` -> ``feed-binance@eth`` (the name without ``.service``)."""
    return unit[:-len(".service")] if unit.endswith(".service") else unit


def rule_of_unit(unit: str) -> SessionRule:
    """The :class:`SessionRule` of systemd unit ``unit`` (with or without
    ``.service``): feed-binance and feed-indicators always, feed-zerodha and
    feed-dhan the XNSE session, feed-ibkr the XNYS session (each also as
    ``<name>@<instance>``), anything else (oneshots such as feed-backfill,
    feed-kite-token, feed-dhan-token, feed-dhan-backfill, feed-maintain)
    :data:`NO_RULE`."""
    base = unit_base(unit)
    for name, rule in VENUE_OF_UNIT:
        if base == name or base.startswith(name + "@"):
            return rule
    return NO_RULE


def current_session(now: dt.datetime, cal) -> Any | None:
    """The session of calendar ``cal`` (:class:`feeds.calendars.ExchangeCalendar`)
    that contains the aware ``now`` (``open <= now < close``), or None."""
    local = now.astimezone(cal.tz).date()
    for day in (local, local - dt.timedelta(days=1)):
        s = cal.session(day)
        if s is not None and s.contains(now):
            return s
    return None


def next_session(now: dt.datetime, cal, look_ahead_days: int = 14) -> Any | None:
    """The session containing ``now``, else the first one opening after it
    (within ``look_ahead_days``), else None."""
    s = current_session(now, cal)
    if s is not None:
        return s
    day = now.astimezone(cal.tz).date()
    for i in range(look_ahead_days + 1):
        s = cal.session(day + dt.timedelta(days=i))
        if s is not None and s.open > now:
            return s
    return None


# -- facts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitFacts:
    """systemd's view of one unit (``systemctl show -p ActiveState,SubState,Result,NRestarts``).

    ``active_state``: e.g. ``"active"``, ``"inactive"``, ``"failed"``,
    ``"activating"``; ``sub_state``: e.g. ``"running"``, ``"dead"``;
    ``result``: ``"success"``, ``"exit-code"``, ...; ``n_restarts``: int,
    systemd's NRestarts (cumulative since the unit was loaded).
    """
    active_state: str
    sub_state: str = ""
    result: str = "success"
    n_restarts: int = 0

    @property
    def active(self) -> bool:
        return self.active_state == "active"


@dataclass(frozen=True)
class Heartbeat:
    """One ``feed_heartbeat`` row: ``updated_at`` (aware), ``state``
    (starting | running | degraded | spooling | stopping), ``status`` (the
    STATUS= line), ``detail`` (the jsonb, see :meth:`feeds.health.Health.heartbeat`:
    ``messages``, ``malformed``, ``last_message_age`` (s at ``updated_at``),
    ``lag_ms_hist`` ({ms: count}), ``tables`` ({name: {stored, duplicates,
    rejected}}), ``spooled_rows``, ``replayed_rows``, ``pending``, and the
    collector's figures such as ``reconnects`` or ``ib errors``: all
    counters cumulative since ``started_at``); ``started_at`` (aware, the
    process's start; counters restart from 0 when it changes)."""
    updated_at: dt.datetime
    state: str = "running"
    status: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    started_at: dt.datetime | None = None


@dataclass(frozen=True)
class Spool:
    """The disk spool of ``unit`` at ``path``: ``files`` and ``bytes`` now
    (0 and 0 when it is empty or absent)."""
    unit: str
    path: str
    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Gap:
    """A gap found in a stream: ``stream`` (e.g. ``"binance_agg_trade"``),
    ``symbol``, ``first`` and ``last`` (ids or times, as found),
    ``filled`` (True once the fill stored it), ``detected_at`` (aware or None)."""
    stream: str
    symbol: str
    first: Any
    last: Any
    filled: bool
    detected_at: dt.datetime | None = None


@dataclass(frozen=True)
class KlineMismatch:
    """The newest ``binance_kline_check`` row of one minute: ``symbol``,
    ``open_time`` (aware), ``differs`` (e.g. ``"volume,trades"``),
    ``repaired`` (True / False after the fill; None while only ``found``),
    ``note``."""
    symbol: str
    open_time: dt.datetime
    differs: str
    repaired: bool | None
    note: str = ""


@dataclass(frozen=True)
class TokenFacts:
    """A venue's access token (Kite: :attr:`Facts.token`, Dhan:
    :attr:`Facts.dhan_token`): ``expires_at`` (aware, None when there is no
    usable token file), ``renewal_result`` (the renewal unit's systemd
    Result -- ``feed-kite-token.service``, ``feed-dhan-token.service`` --
    e.g. ``"success"`` / ``"exit-code"``; None = never run),
    ``renewal_active_state`` (its ActiveState; ``"activating"`` while it
    runs), ``problem`` (why a token that has not expired cannot be used, e.g.
    it belongs to another client id; None: no such reason)."""
    expires_at: dt.datetime | None
    renewal_result: str | None = "success"
    renewal_active_state: str = "inactive"
    problem: str | None = None


@dataclass(frozen=True)
class BackfillError:
    """A backfill session in ERROR: ``symbol`` (IBKR: the symbol; Dhan: the
    instrument ``SEGMENT:SYMBOL``), ``day`` (the session date), ``error``
    (the venue's code and text), ``venue``: ``"ibkr"`` (an
    ``ibkr_session_status`` row, feed-backfill) or ``"dhan"`` (a
    ``dhan_session_status`` row, feed-dhan-backfill)."""
    symbol: str
    day: dt.date
    error: str = ""
    venue: str = "ibkr"


@dataclass(frozen=True)
class Disk:
    """A file system to watch (the database's, each spool's): ``path``
    and ``free_fraction`` (0.0-1.0, free / size as ``df`` sees it for
    unprivileged users)."""
    path: str
    free_fraction: float


@dataclass(frozen=True)
class Facts:
    """What ``feedctl check`` measured at ``now`` (aware).

    ``units``: ``{unit: UnitFacts}`` for every installed, enabled feed unit
    (e.g. ``"feed-binance.service"``); a long-running feed absent here is
    not checked.  ``heartbeats``: ``{unit: Heartbeat}``.  ``spools``: every
    spool.  ``gaps``: gaps found recently (filled or not).
    ``kline_mismatches``: mismatches of the last window.  ``token``: the
    Kite token, None when Kite is not used; ``dhan_token``: Dhan's, None
    when Dhan is not used.  ``backfill_errors`` (IBKR and Dhan), ``disks``,
    ``pending_migrations`` (file names).  ``rates``: ``{(unit, kind): msg/s}``
    now; ``usual_rates``: ``{(unit, kind): msg/s}`` usual at this time of day
    (None: unknown); kind ``"all"`` is the unit's total, which is computed
    from the heartbeat's message counter when ``rates`` lacks it.
    ``previous``: the ``memory`` of the last :func:`evaluate` (None: first run).
    """
    now: dt.datetime
    units: Mapping[str, UnitFacts] = field(default_factory=dict)
    heartbeats: Mapping[str, Heartbeat] = field(default_factory=dict)
    spools: Iterable[Spool] = ()
    gaps: Iterable[Gap] = ()
    kline_mismatches: Iterable[KlineMismatch] = ()
    token: TokenFacts | None = None
    backfill_errors: Iterable[BackfillError] = ()
    dhan_token: TokenFacts | None = None
    disks: Iterable[Disk] = ()
    pending_migrations: Iterable[str] = ()
    rates: Mapping[tuple[str, str], float] = field(default_factory=dict)
    usual_rates: Mapping[tuple[str, str], float] | None = None
    previous: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Params:
    """Thresholds (seconds unless said otherwise).

    ``stale_after_s``: heartbeat age beyond which a feed in session is stale;
    ``grace_s``: after a session opens, time allowed to connect before
    staleness, rates and health count; ``heartbeat_interval_s``: the feeds'
    status interval (for the health score); ``expected_max_age_s``: the
    freshness bound of the health score; ``health_threshold``:
    ``alerts.health_threshold`` (0-100); ``disk_min_free``:
    ``alerts.disk_min_free`` (percent); ``rate_drop``: ``alerts.rate_drop``
    (fraction); ``rate_min_usual``: usual rates below this (msg/s) are not
    judged; ``hold_new_for_s``: how long "new rejected rows" / "the spool
    grew" keep holding after the last increase; ``kline_fill_wait_s``: a
    mismatch still unrepaired (``repaired`` None) this long after its minute
    holds; ``token_lead_s``: before a session opens, from when its token
    must be valid through its close; ``session_margin_s``: a calendar feed is
    expected to run from this long before the open to this long after the
    close (its timer starts it early, it stops a little after).
    """
    stale_after_s: float = 60.0
    grace_s: float = 120.0
    heartbeat_interval_s: float = 10.0
    expected_max_age_s: float = 60.0
    health_threshold: int = _ALERTS_DEFAULT["alerts.health_threshold"]
    disk_min_free: float = _ALERTS_DEFAULT["alerts.disk_min_free"]
    rate_drop: float = _ALERTS_DEFAULT["alerts.rate_drop"]
    rate_min_usual: float = 0.5
    hold_new_for_s: float = 3600.0
    kline_fill_wait_s: float = 600.0
    token_lead_s: float = 3600.0
    session_margin_s: float = 900.0
    health: healthscore.Params = healthscore.DEFAULT_PARAMS

    @classmethod
    def from_config(cls, cfg, **over) -> "Params":
        """From a loaded ``alerts.toml``: ``alerts.health_threshold``,
        ``alerts.disk_min_free``, ``alerts.rate_drop``; ``over``: other fields."""
        return cls(health_threshold=int(cfg["alerts.health_threshold"]),
                   disk_min_free=float(cfg["alerts.disk_min_free"]),
                   rate_drop=float(cfg["alerts.rate_drop"]), **over)


DEFAULT_PARAMS = Params()


@dataclass(frozen=True)
class Evaluation:
    """``holding``: ``{key: (title, body, severity)}`` for
    :meth:`AlertState.update`; ``memory``: JSON-ready dict to pass back as
    :attr:`Facts.previous`; ``scores``: ``{unit: healthscore.Score}`` of the
    long-running feeds (for ``feedctl status``)."""
    holding: Holding
    memory: dict
    scores: dict


# -- helpers -------------------------------------------------------------------------------------


def _aware(t: dt.datetime) -> dt.datetime:
    if not isinstance(t, dt.datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got {t!r}")
    return t


def utc_iso(t: dt.datetime | None) -> str | None:
    """``t`` as ISO 8601 in UTC to the second (``2026-12-01T04:30:00+00:00``); None stays None."""
    return None if t is None else t.astimezone(UTC).isoformat(timespec="seconds")


def parse_aware(s: Any) -> dt.datetime | None:
    """The aware datetime an ISO 8601 text gives; None for anything else (naive, malformed, not text)."""
    if not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _secs(s: float) -> str:
    s = max(0, int(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h {m}m"
    return f"{m}m {sec}s" if m else f"{sec}s"


def _utc(t: dt.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


ERROR_FIGURES = healthscore.ERROR_FIGURES


def _counters(hb: Heartbeat) -> dict:
    d = hb.detail or {}
    tables = d.get("tables") or {}
    return {
        "started_at": utc_iso(hb.started_at),
        "updated_at": utc_iso(hb.updated_at),
        "messages": _int(d.get("messages")),
        "malformed": _int(d.get("malformed")),
        "errors": sum(_int(d.get(k)) for k in ERROR_FIGURES),
        "spooled_rows": _int(d.get("spooled_rows")),
        "rejected": {str(n): _int((t or {}).get("rejected")) for n, t in tables.items()
                     if isinstance(t, Mapping)},
    }


def _lag_p99(hist: Any) -> float | None:
    if not isinstance(hist, Mapping) or not hist:
        return None
    pairs = sorted((_int(k), _int(v)) for k, v in hist.items())
    n = sum(c for _, c in pairs)
    if n <= 0:
        return None
    target, acc = n * 0.99, 0
    for ms, c in pairs:
        acc += c
        if acc >= target:
            return float(ms)
    return float(pairs[-1][0])


def _data_age(hb: Heartbeat, hb_age: float | None) -> float | None:
    """Seconds since the unit's newest message: the heartbeat's
    ``last_message_age`` plus the heartbeat's own age; None before the
    first message (or while it waits for its session)."""
    lma = (hb.detail or {}).get("last_message_age")
    if hb.state in ("starting", "waiting") or not isinstance(lma, (int, float)) or isinstance(lma, bool):
        return None
    return float(lma) + max(0.0, hb_age or 0.0)


def _low_rates(unit: str, rates: Mapping[tuple[str, str], float],
               usual: Mapping[tuple[str, str], float] | None, params: "Params") -> dict[str, tuple[float, float]]:
    """``{kind: (rate, usual)}`` of the unit's stream kinds (and ``all``)
    whose rate is under ``min(1, 2 * rate_drop)`` x a usual rate worth
    judging (at least ``rate_min_usual``)."""
    out = {}
    for (u, kind), us in sorted((usual or {}).items()):
        if u != unit or us is None or us < params.rate_min_usual:
            continue
        rate = rates.get((u, kind))
        if rate is not None and rate < min(1.0, 2 * params.rate_drop) * us:
            out[kind] = (rate, us)
    return out


@dataclass
class _Window:
    """Counters of one heartbeat since the previous run (same process) or
    since the process started."""
    messages: int
    malformed: int
    errors: int
    spooled_rows: int
    rejected: dict[str, int]     # new rejected rows per table
    rate: float | None           # msg/s between the two heartbeats, None = unknown


def _window(cur: dict, prev: Mapping | None) -> _Window:
    same = bool(prev) and prev.get("started_at") == cur["started_at"] and cur["started_at"] is not None
    base = prev if same else {}

    def d(k):
        return max(0, cur[k] - _int(base.get(k)))

    prev_rej = (base.get("rejected") or {}) if same else {}
    rejected = {t: max(0, n - _int(prev_rej.get(t))) for t, n in cur["rejected"].items()}
    rate = None
    if same:
        t0, t1 = parse_aware(prev.get("updated_at")), parse_aware(cur["updated_at"])
        if t0 is not None and t1 is not None and (t1 - t0).total_seconds() > 0:
            rate = d("messages") / (t1 - t0).total_seconds()
    return _Window(d("messages"), d("malformed"), d("errors"), d("spooled_rows"), rejected, rate)


def _restarts_last_hour(unit: UnitFacts | None, samples: list, now: dt.datetime) -> tuple[int, list]:
    """(restarts in the last hour, new samples [[iso, n], ...]) from NRestarts samples."""
    if unit is None:
        return 0, []
    keep = []
    for s in samples or []:
        try:
            t, n = parse_aware(s[0]), int(s[1])
        except (TypeError, ValueError, IndexError):
            continue
        if t is not None and (now - t).total_seconds() <= 3600 and n <= unit.n_restarts:
            keep.append([utc_iso(t), n])
    oldest = min((n for _, n in keep), default=unit.n_restarts)
    keep.append([utc_iso(now), unit.n_restarts])
    return max(0, unit.n_restarts - oldest), keep


# -- evaluation ----------------------------------------------------------------------------------



def _listing(items: list, line: Callable[[Any], str], limit: int = 10) -> str:
    """The first ``limit`` items, one indented line each, and how many more there are."""
    text = "\n".join("  " + line(x) for x in items[:limit])
    return text + (f"\n  ... and {len(items) - limit} more" if len(items) > limit else "")


def _token_problem(tk: TokenFacts, now: dt.datetime, get_cal, params: Params, renewal: str) -> str | None:
    """Why the token ``tk`` will not do for the next (or current) NSE
    session, or None: the last renewal (unit ``renewal``) failed and is not
    running again; or, once that session is ``token_lead_s`` away, there is
    no usable token or it expires before the session's close."""
    if tk.renewal_result not in (None, "success") and tk.renewal_active_state != "activating":
        return f"the last renewal ({renewal}.service) ended with result {tk.renewal_result}"
    s = next_session(now, get_cal("XNSE"))
    if s is None or now < s.open - dt.timedelta(seconds=params.token_lead_s):
        return None
    if tk.expires_at is None:
        return f"there is no usable token for the session {s.describe()}"
    if tk.problem:
        return f"the stored token cannot be used for the session {s.describe()}: {tk.problem}"
    if tk.expires_at < s.close:
        return f"the token expires {_utc(tk.expires_at)}, before the end of the session {s.describe()}"
    return None


def evaluate(facts: Facts, params: Params = DEFAULT_PARAMS,
             calendars: Mapping[str, Any] | Callable[[str], Any] | None = None) -> Evaluation:
    """Which conditions hold at ``facts.now`` (see the module's table).

    ``calendars``: ``{name: ExchangeCalendar}`` or a function name ->
    calendar; default :func:`feeds.calendars.calendar`.  Pure: reads only its
    arguments.  Raises ValueError for a naive ``facts.now``.
    """
    now = _aware(facts.now)
    if calendars is None:
        from ..calendars import calendar as get_cal
    elif callable(calendars) and not isinstance(calendars, Mapping):
        get_cal = calendars
    else:
        get_cal = calendars.__getitem__

    prev = facts.previous if isinstance(facts.previous, Mapping) \
        and facts.previous.get("version") == MEMORY_VERSION else {}
    prev_units: Mapping = prev.get("units") or {}
    prev_spools: Mapping = prev.get("spools") or {}
    out: Holding = {}
    memory: dict = {"version": MEMORY_VERSION, "at": utc_iso(now), "units": {}, "spools": {}}
    scores: dict = {}
    hold_for = dt.timedelta(seconds=params.hold_new_for_s)
    grace = dt.timedelta(seconds=params.grace_s)
    margin = dt.timedelta(seconds=params.session_margin_s)

    # per unit: counters, staleness, rejects, rates, health
    names = sorted(set(facts.units) | set(facts.heartbeats))
    windows: dict[str, _Window] = {}
    for unit in names:
        uf = facts.units.get(unit)
        hb = facts.heartbeats.get(unit)
        pu = prev_units.get(unit) or {}
        mem: dict = {}
        restarts, mem["restarts"] = _restarts_last_hour(uf, pu.get("restarts"), now)
        win = None
        if hb is not None:
            cur = _counters(hb)
            win = windows[unit] = _window(cur, pu.get("counters"))
            mem["counters"] = cur
            # rejected rows: new ones hold for hold_new_for_s
            rejected_at = {t: s for t, s in (pu.get("rejected_at") or {}).items() if isinstance(s, str)}
            for table, new in win.rejected.items():
                if new > 0:
                    rejected_at[table] = utc_iso(now)
            for table, stamp in sorted(rejected_at.items()):
                t = parse_aware(stamp)
                if t is None or now - t > hold_for:
                    continue
                total = cur["rejected"].get(table, 0)
                out[f"rejected:{unit}:{table}"] = (
                    f"feeds: {unit} rejected rows of {table}",
                    f"{unit} rejected {win.rejected.get(table, 0)} row(s) of {table} since the last check "
                    f"({total} since the process started {cur['started_at'] or '?'}); last new reject at "
                    f"{stamp}.\nRejected rows are kept in the sink's rejects.jsonl, not in PostgreSQL.\n"
                    f"What to do:\n  journalctl -u {unit} -e --grep reject\n"
                    f"  inspect the rejects.jsonl of {unit_base(unit)}'s spool directory, fix the cause, "
                    f"replay or discard them",
                    WARNING)
            mem["rejected_at"] = {t: s for t, s in rejected_at.items()
                                  if (p := parse_aware(s)) is not None and now - p <= hold_for}
        memory["units"][unit] = mem

        rule = rule_of_unit(unit)
        if rule.kind == "none" or uf is None:
            continue
        if rule.kind == "always":
            in_session = expected = True
            session = None
        else:
            cal = get_cal(rule.calendar)
            session = next_session(now, cal)
            in_session = session is not None and session.open + grace <= now < session.close
            # expected to run: in the session (after the grace); around it (margin) only when it
            # does run (its timer starts it a little early, it stops a little late)
            expected = in_session or (uf.active and session is not None
                                      and session.open - margin <= now < session.close + margin)
        age = (now - hb.updated_at).total_seconds() if hb is not None else None
        sess_txt = (rule.always_text or f"{rule.venue} runs around the clock") if rule.kind == "always" else \
            f"{rule.venue} session {session.describe()} is open"

        # staleness / not running
        if in_session:
            if not uf.active:
                out[f"stale:{unit}"] = (
                    f"feeds: {unit} is not running during its session",
                    f"{sess_txt}, but {unit} is {uf.active_state}"
                    f"{'/' + uf.sub_state if uf.sub_state else ''} (result {uf.result}, "
                    f"{uf.n_restarts} restart(s)).\nWhat to do:\n  systemctl status {unit}\n"
                    f"  journalctl -u {unit} -e\n  systemctl start {unit}",
                    CRITICAL)
            elif age is None or age > params.stale_after_s:
                seen = "no heartbeat row" if hb is None else \
                    f"last heartbeat {_secs(age)} ago ({utc_iso(hb.updated_at)}, state {hb.state}: {hb.status})"
                out[f"stale:{unit}"] = (
                    f"feeds: {unit} heartbeat stale",
                    f"{sess_txt}, and {unit} is active but its heartbeat is stale: {seen} "
                    f"(limit {params.stale_after_s:.0f}s). The process may be hung or unable to reach "
                    f"PostgreSQL.\nWhat to do:\n  feedctl status\n  journalctl -u {unit} -e\n"
                    f"  systemctl restart {unit}  (if it is hung)",
                    CRITICAL)
            elif (data_age := _data_age(hb, age)) is not None and data_age > params.stale_after_s:
                out[f"stale:{unit}"] = (
                    f"feeds: {unit} receives no data",
                    f"{sess_txt}, and {unit} is running (heartbeat {_secs(age)} ago, state {hb.state}) but "
                    f"its newest message is {_secs(data_age)} old (limit {params.stale_after_s:.0f}s): the "
                    f"venue's connection is silent or down.\nStatus: {hb.status}\nWhat to do:\n"
                    f"  feedctl status\n  journalctl -u {unit} -e --grep -i 'connect|silent|stale'",
                    CRITICAL)
        told_stale = f"stale:{unit}" in out

        # rates (in session only)
        unit_rates = dict(facts.rates)
        if win is not None and win.rate is not None and (unit, "all") not in unit_rates:
            unit_rates[(unit, "all")] = win.rate
        usual_all = None
        if facts.usual_rates is not None:
            usual_all = facts.usual_rates.get((unit, "all"))
        low = _low_rates(unit, unit_rates, facts.usual_rates, params) if in_session and uf.active else {}
        # two runs in a row below rate_drop start it; holding, it clears once every rate is back
        # above twice rate_drop (one noisy window neither starts nor ends it)
        was = bool(pu.get("rate_holding"))
        starts = {k: v for k, v in low.items() if v[0] < params.rate_drop * v[1]}
        keeps = {k: v for k, v in low.items() if v[0] < min(1.0, 2 * params.rate_drop) * v[1]}
        mem["rate_low_runs"] = (_int(pu.get("rate_low_runs")) + 1) if starts else 0
        holding_rate = bool(keeps) if was else (bool(starts) and mem["rate_low_runs"] >= 2)
        mem["rate_holding"] = holding_rate
        if holding_rate and not told_stale:
            shown = keeps if was else starts
            lines = "\n".join(f"  {kind}: {rate:.2f} msg/s now, usually {usual:.2f} msg/s"
                              for kind, (rate, usual) in sorted(shown.items()))
            out[f"rate:{unit}"] = (
                f"feeds: {unit} rate dropped",
                f"{unit} receives far less than usual at this time of day (alert under "
                f"{params.rate_drop:.0%} of usual):\n{lines}\n"
                f"Subscriptions may have been dropped or the venue is quiet.\nWhat to do:\n"
                f"  feedctl status\n  journalctl -u {unit} -e",
                WARNING)

        # health score
        d = (hb.detail if hb is not None else {}) or {}
        lma = d.get("last_message_age")
        m = healthscore.Measures(
            unit_active=uf.active, unit_failed=uf.active_state == "failed",
            expected_running=expected, in_session=in_session,
            restarts_last_hour=restarts, heartbeat_age_s=age,
            heartbeat_interval_s=params.heartbeat_interval_s,
            messages=win.messages if win else 0, malformed=win.malformed if win else 0,
            rejected_rows=sum(win.rejected.values()) if win else 0,
            spooled_rows=win.spooled_rows if win else 0, pending=_int(d.get("pending")),
            errors=win.errors if win else 0,
            last_message_age_s=(float(lma) + max(0.0, age or 0.0))
            if isinstance(lma, (int, float)) else None,
            expected_max_age_s=params.expected_max_age_s,
            lag_p99_ms=_lag_p99(d.get("lag_ms_hist")),
            rate=unit_rates.get((unit, "all")), usual_rate=usual_all)
        sc = scores[unit] = healthscore.score(m, params.health)
        if healthscore.alerting(sc, params.health_threshold) and not told_stale:
            parts = ", ".join(f"{k} {v}/{healthscore.MAX_POINTS[k]}" for k, v in sc.parts.items())
            reasons = "\n".join(f"  - {r}" for r in sc.reasons) or "  (none)"
            out[f"health:{unit}"] = (
                f"feeds: {unit} health {sc.total}/100",
                f"{unit} health score {sc.total}/100 is under the threshold {params.health_threshold} "
                f"({parts}).\nReasons:\n{reasons}\nWhat to do:\n  feedctl status\n"
                f"  journalctl -u {unit} -e",
                WARNING)

    # spools: exists (warning) or grows (critical)
    for sp in sorted(facts.spools, key=lambda s: (s.unit, s.path)):
        p = prev_spools.get(f"{sp.unit}|{sp.path}") or {}
        grew_at = parse_aware(p.get("grew_at"))
        grew_now = (bool(p) and sp.bytes > _int(p.get("bytes"))) or (
            sp.unit in windows and windows[sp.unit].spooled_rows > 0
            and "counters" in (prev_units.get(sp.unit) or {}))
        if grew_now:
            grew_at = now
        memory["spools"][f"{sp.unit}|{sp.path}"] = {"bytes": sp.bytes, "files": sp.files,
                                                     "grew_at": utc_iso(grew_at)}
        growing = grew_at is not None and now - grew_at <= dt.timedelta(seconds=max(params.stale_after_s, 120))
        if sp.bytes <= 0 and sp.files <= 0 and not growing:
            continue
        what = f"{sp.files} file(s), {sp.bytes} bytes"
        if growing:
            out[f"spool:{sp.unit}"] = (
                f"feeds: {sp.unit} is spooling to disk",
                f"The spool {sp.path} of {sp.unit} is growing ({what}; was "
                f"{_int(p.get('bytes'))} bytes at the last check): rows are not reaching PostgreSQL.\n"
                f"What to do:\n  journalctl -u {sp.unit} -e\n  check PostgreSQL: systemctl status postgresql\n"
                f"  df -h {sp.path}",
                CRITICAL)
        else:
            out[f"spool:{sp.unit}"] = (
                f"feeds: {sp.unit} has a spool",
                f"The spool {sp.path} of {sp.unit} holds {what} not yet replayed into PostgreSQL "
                f"(not growing).\nThe unit replays it when PostgreSQL accepts rows again.\n"
                f"What to do:\n  journalctl -u {sp.unit} -e\n  feedctl status",
                WARNING)

    # gaps
    open_gaps: dict[tuple[str, str], list[Gap]] = {}
    for g in facts.gaps:
        if not g.filled:
            open_gaps.setdefault((g.stream, g.symbol), []).append(g)
    for (stream, symbol), gs in sorted(open_gaps.items()):
        lines = _listing(gs, lambda g: f"{g.first} .. {g.last}"
                         + (f" (found {utc_iso(g.detected_at)})" if g.detected_at else ""))
        out[f"gap:{stream}:{symbol}"] = (
            f"feeds: unfilled gap in {stream} {symbol}",
            f"{len(gs)} gap(s) in {stream} for {symbol} are not filled:\n{lines}\n"
            f"What to do:\n  feedctl status\n  journalctl -u feed-binance.service -e --grep gap",
            WARNING)

    # kline check
    bad: dict[str, list[KlineMismatch]] = {}
    for k in facts.kline_mismatches:
        if k.repaired is True:
            continue
        if k.repaired is None and (now - k.open_time).total_seconds() < params.kline_fill_wait_s:
            continue
        bad.setdefault(k.symbol, []).append(k)
    for symbol, ks in sorted(bad.items()):
        ks.sort(key=lambda k: k.open_time)
        lines = _listing(ks, lambda k: f"{_utc(k.open_time)}: {k.differs}"
                         f"{' (not repaired)' if k.repaired is False else ' (not checked after fill)'}"
                         f"{' - ' + k.note if k.note else ''}")
        out[f"kline:{symbol}"] = (
            f"feeds: kline check mismatches for {symbol}",
            f"{len(ks)} minute(s) of {symbol} disagree with Binance's klines after the gap fill:\n"
            f"{lines}\nWhat to do:\n  feedctl kline-check --symbol {symbol} --since "
            f"{ks[0].open_time.astimezone(UTC).date()}",
            WARNING)

    # access tokens (Kite, Dhan)
    for key, tk, venue, renewal, feed_unit, todo in (
            ("token:kite", facts.token, "Kite", "feed-kite-token", "feed-zerodha",
             "systemctl start feed-kite-token.service  (or run feed-kite-token by hand)"),
            ("token:dhan", facts.dhan_token, "Dhan", "feed-dhan-token", "feed-dhan",
             "systemctl start feed-dhan-token.service\n  feed-dhan-token --check  (asks Dhan whether the "
             "stored token is valid)")):
        if tk is None:
            continue
        problem = _token_problem(tk, now, get_cal, params, renewal)
        if problem:
            exp = "no token file" if tk.expires_at is None else f"token expires {_utc(tk.expires_at)}"
            out[key] = (
                f"feeds: {venue} access token not renewed",
                f"{venue}: {problem} ({exp}). {feed_unit} cannot connect without a valid token.\n"
                f"What to do:\n  journalctl -u {renewal}.service -e\n  {todo}",
                CRITICAL)

    # backfill sessions in ERROR (IBKR: feed-backfill; Dhan: feed-dhan-backfill)
    errs: dict[tuple[str, str], list[BackfillError]] = {}
    for e in facts.backfill_errors:
        errs.setdefault((e.venue, e.symbol), []).append(e)
    for (venue, symbol), es in sorted(errs.items()):
        es.sort(key=lambda e: e.day)
        lines = _listing(es, lambda e: f"{e.day}: {e.error or '(no error text)'}")
        if venue == "dhan":
            out[f"backfill-error:dhan:{symbol}"] = (
                f"feeds: Dhan backfill of {symbol} failed",
                f"{len(es)} session(s) of {symbol} are in ERROR in dhan_session_status:\n{lines}\n"
                f"They are fetched again only on request.\nWhat to do:\n"
                f"  feed-dhan-backfill --status\n  journalctl -u feed-dhan-backfill.service -e\n"
                f"  feed-dhan-backfill --symbols {symbol} --retry-failed",
                WARNING)
            continue
        out[f"backfill-error:{symbol}"] = (
            f"feeds: IBKR backfill of {symbol} failed",
            f"{len(es)} session(s) of {symbol} are in ERROR in ibkr_session_status:\n{lines}\n"
            f"They are fetched again only on request.\nWhat to do:\n"
            f"  feed-backfill --status\n  feed-backfill --symbols {symbol} --retry-failed",
            WARNING)

    # disks
    for dk in sorted(facts.disks, key=lambda d: d.path):
        pct = 100.0 * dk.free_fraction
        if pct >= params.disk_min_free:
            continue
        out[f"disk:{dk.path}"] = (
            f"feeds: low disk space on {dk.path}",
            f"{dk.path} has {pct:.1f}% free (alert under {params.disk_min_free:g}%).\n"
            f"What to do:\n  df -h {dk.path}\n  du -xsh {dk.path}/* | sort -h | tail\n"
            f"  feed-maintain drops partitions older than the retention: systemctl start feed-maintain.service",
            CRITICAL if pct < params.disk_min_free / 2 else WARNING)

    # migrations
    pending = list(facts.pending_migrations)
    if pending:
        out["migrations"] = (
            "feeds: database migrations pending",
            f"{len(pending)} migration(s) not applied: {', '.join(pending)}.\n"
            f"What to do:\n  systemctl start feed-migrate.service\n  journalctl -u feed-migrate.service -e",
            WARNING)

    return Evaluation(holding=out, memory=memory, scores=scores)


def holding(facts: Facts, params: Params = DEFAULT_PARAMS,
            calendars: Mapping[str, Any] | Callable[[str], Any] | None = None) -> Holding:
    """``evaluate(facts, params, calendars).holding``: ``{key: (title, body, severity)}``."""
    return evaluate(facts, params, calendars).holding
