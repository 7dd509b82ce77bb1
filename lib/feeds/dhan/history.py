"""Dhan one-minute history: plan, fetch, check, store; adjustments and reconciliation.

Venue documents: DhanHQ v2 "Historical Data" (intraday charts, one request
spans at most 90 days), "Rate Limit"; NSE circulars for the sessions (the
XNSE calendar of :mod:`feeds.calendars`, with its Saturday and Muhurat
sessions).

Unit of work: one XNSE session of one instrument, as in the IBKR backfill;
the planner, the statuses and the status table's access are the shared
ones (:mod:`feeds.backfill`): sessions from the last finished one back to
``backfill.earliest`` (or ``dhan.history_years`` back), newest first, then
priority, then symbol; HOLIDAY rows for weekdays without a session; final
sessions never requested again, ERROR ones only with ``--retry-failed``.

Requests: one intraday charts request (interval ``"1"``) covers the
planned sessions of one instrument that fall within
``dhan.history_days_per_request`` calendar days (``fromDate`` the oldest
session's open, ``toDate`` the newest session's close, ``YYYY-MM-DD
HH:MM:SS`` IST).  The answer is split by IST date; each planned session's
candles are checked (:func:`check_session`) and get their own status; the
sessions of one answer are committed with their status rows in one
transaction (:meth:`DhanStore.commit_sessions`, one commit per request, in
the background so that a slow commit never delays the next request), so a
kill leaves whole sessions only.  A regular NSE session has 375 one-minute candles (09:15 to
15:29 IST, labelled by their start); a special session its own number
(Muhurat 18:00-19:00: 60).  Fewer candles: THIN (minutes without a trade);
none: ERROR; candles outside the session are dropped and noted; candles on
a day the calendar has no session are counted (``off_calendar``) and
logged: the calendar may lack a session.

Adjustments (:func:`compare`): when a session with stored candles is
fetched again (``--refetch``, or the reconciliation), the new candles are
compared with the stored ones (rolled up to the new interval when it is
longer than a minute, :func:`rollup`).  Equal: nothing to do.  A
consistent factor ``f`` (every price of the new answer within a tick of
stored / f, every volume within rounding of stored * f; a 1:1 bonus gives
f = 2): a ``dhan_adjustment`` row (factor, the date found, the stored and
fetched first close as evidence) and, for one-minute candles, the new
answer stored as the next ``version`` of the session in ``dhan_bar`` with
its ``adjustment_id``; the earlier version is kept.  Any other difference
is recorded as kind ``revision`` the same way.  Nothing is overwritten.

Reconciliation (:meth:`DhanBackfill.reconcile`): after the session, the
live one-minute candles of ``dhan_candle`` (feed-dhan) are compared minute
by minute with Dhan's own candles of the same session (the ones just
stored by the backfill, else fetched within the rate limit), priority
instruments first; counts per instrument in ``dhan_reconciliation``.
Without the table ``dhan_candle`` it is skipped with one line.

Errors: see :mod:`feeds.dhan.rest`.  An expired or invalid token stops the
run (:class:`TokenExpired`, exit 77); refused requests make their sessions
ERROR with Dhan's code and text; rate limit answers back off and retry;
transient failures leave the sessions PENDING for the next run.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import ClassVar

from .. import backfill as B
from ..backfill import (BackfillRun, Plan, Selection, SessionCheck, SessionPlan, StatusStore, fetch_order,
                        fmt_duration, plan_range, plan_sessions, session_status)
from ..calendars import ExchangeCalendar, Session
from . import rest as R
from .instruments import Instrument, InstrumentLine, InstrumentList, InstrumentsError

log = logging.getLogger(__name__)

__all__ = ["Settings", "SessionCheck", "check_session", "split_by_day", "rollup", "Comparison", "compare",
           "DhanStore", "DhanBackfill", "RunSummary", "Plan", "InstrumentPlan", "TokenExpired", "BAR_COLUMNS",
           "request_chunks"]

BAR_COLUMNS = ("exchange_segment", "security_id", "symbol", "bar_start", "version", "open", "high", "low", "close",
               "volume", "oi", "adjustment_id")
_LOCK_KEY = 0x666565647344  # "feedsD"
MAX_AHEAD = dt.timedelta(minutes=5)


class TokenExpired(Exception):
    """The access token is missing, invalid or expired (exit 77)."""


@dataclass
class Settings:
    """Run settings (``dhan.*`` and ``backfill.*`` of dhan.toml).  Times in
    seconds unless said otherwise."""

    api_url: str = "https://api.dhan.co"
    client_id: str = ""
    token_file: str = ""
    requests_per_second: float = 5.0
    requests_per_day: int = 100_000
    days_per_request: int = 90
    history_years: float = 5.0
    earliest: dt.date | None = None
    request_timeout: float = 60.0
    max_attempts: int = 4
    settle: dt.timedelta = dt.timedelta(minutes=30)
    status_interval: float = 30.0
    rate_scale: float = 1.0
    calendar: str = "XNSE"
    extra_sessions: dict = field(default_factory=dict)
    extra_holidays: Sequence[dt.date] = ()
    reconcile: bool = True
    concurrency: int = 0          # 0: 2 * requests per second + 2


# ------------------------------------------------------------------------------------------- pure pieces


def _hm(t: dt.datetime, tz) -> str:
    return t.astimezone(tz).strftime("%H:%M")


def check_session(inst: Instrument, session: Session, candles: Sequence[R.Candle], now: dt.datetime | None = None,
                  version: int = 0, adjustment_id: int | None = None) -> SessionCheck:
    """Check Dhan's one-minute candles of one session (oldest first) and
    build the rows to store.  A candle not on a whole minute, out of order
    or repeated, with a price not positive, a high below the open or close,
    a low above them, a negative volume, or in the future fails the whole
    session (``failure``); candles outside the session are dropped and
    noted; fewer candles than minutes are noted ``thin:``.  Never raises."""
    latest = (now or dt.datetime.now(dt.timezone.utc)) + MAX_AHEAD
    out = SessionCheck(expected=session.expected_bars)
    tz = session.tz
    prev = None
    for c in candles:
        t = c.start
        where = f"candle {session.day} {_hm(t, tz)}"
        if t.second or t.microsecond:
            return out.fail(f"{where}:{t.second:02d}: not on a whole minute")
        if prev is not None and t <= prev:
            return out.fail(f"{where}: {'duplicate candle' if t == prev else 'not after the previous candle'}")
        prev = t
        if not (c.open > 0 and c.high > 0 and c.low > 0 and c.close > 0):
            return out.fail(f"{where}: price not positive (O {c.open} H {c.high} L {c.low} C {c.close})")
        if c.high < max(c.open, c.close):
            return out.fail(f"{where}: high {c.high} < max(open {c.open}, close {c.close})")
        if c.low > min(c.open, c.close):
            return out.fail(f"{where}: low {c.low} > min(open {c.open}, close {c.close})")
        if c.volume < 0:
            return out.fail(f"{where}: negative volume {c.volume}")
        if t > latest:
            return out.fail(f"{where}: in the future")
        if not session.contains(t):
            out.dropped.append(t)
            continue
        out.rows.append((inst.segment, inst.security_id, inst.symbol, t, version, c.open, c.high, c.low, c.close,
                         c.volume, c.oi, adjustment_id))
    return out.finish(session, 3, "candle", "a candle")


def split_by_day(candles: Sequence[R.Candle], tz) -> dict[dt.date, list[R.Candle]]:
    """Candles grouped by their local date in ``tz`` (order kept)."""
    out: dict[dt.date, list[R.Candle]] = {}
    for c in candles:
        out.setdefault(c.start.astimezone(tz).date(), []).append(c)
    return out


def rollup(candles: Sequence[R.Candle], minutes: int, session: Session) -> list[R.Candle]:
    """One-minute candles of a session rolled up to ``minutes`` on the grid
    of the session open (09:15, 09:30, ... IST): first open, highest high,
    lowest low, last close, summed volume.  Candles outside the session are
    left out."""
    if minutes == 1:
        return [c for c in candles if session.contains(c.start)]
    step = dt.timedelta(minutes=minutes)
    groups: dict[dt.datetime, list[R.Candle]] = {}
    for c in candles:
        if not session.contains(c.start):
            continue
        k = session.open + step * ((c.start - session.open) // step)
        groups.setdefault(k, []).append(c)
    return [R.Candle(k, g[0].open, max(x.high for x in g), min(x.low for x in g), g[-1].close,
                     sum((x.volume for x in g), Decimal(0)), g[-1].oi) for k, g in sorted(groups.items())]


@dataclass
class Comparison:
    """Outcome of :func:`compare`: ``kind`` ``same``, ``factor`` (a
    consistent adjustment: fetched prices = stored / ``price_factor``,
    fetched volume = stored * ``volume_factor``) or ``revision`` (another
    difference); ``compared`` candles on both sides; first closes as
    evidence; ``detail``."""

    kind: str
    compared: int
    price_factor: Decimal | None = None
    volume_factor: Decimal | None = None
    stored_first_close: Decimal | None = None
    fetched_first_close: Decimal | None = None
    detail: str = ""


def _fits(stored: Sequence[R.Candle], fetched: Sequence[R.Candle], f: Fraction, tick: Decimal) -> bool:
    fp = Decimal(f.numerator) / Decimal(f.denominator)
    for s, n in zip(stored, fetched, strict=True):
        for a, b in ((s.open, n.open), (s.high, n.high), (s.low, n.low), (s.close, n.close)):
            if abs(b * fp - a) > tick * fp:
                return False
        # volume: stored * f, within the rounding of one share per stored unit
        if abs(n.volume - s.volume * fp) > fp:
            return False
    return True


def compare(stored: Sequence[R.Candle], fetched: Sequence[R.Candle], tick: Decimal = Decimal("0.05"),
            max_denominator: int = 20, tolerant: bool = False) -> Comparison:
    """Compare stored candles with the same minutes fetched again (both at
    the same interval; only starts present on both sides count).  The
    factor is the median of stored close / fetched close snapped to a
    fraction with a denominator up to ``max_denominator`` (1:1 bonus 2,
    1:2 split... 3/2, ...), accepted only when every candle fits it (see
    :class:`Comparison`).  ``tolerant``: candles equal within a tick (and
    volume within 1) count as ``same``: for candles rolled up from one-minute
    candles that Dhan adjusted (rounded to the tick) one by one."""
    fmap = {c.start: c for c in fetched}
    pairs = [(s, fmap[s.start]) for s in stored if s.start in fmap]
    if not pairs:
        return Comparison("same", 0, detail="no common candle")
    ss, ff = [p[0] for p in pairs], [p[1] for p in pairs]
    first = dict(stored_first_close=ss[0].close, fetched_first_close=ff[0].close)
    if all((a.open, a.high, a.low, a.close, a.volume) == (b.open, b.high, b.low, b.close, b.volume)
           for a, b in pairs):
        return Comparison("same", len(pairs), **first)
    if tolerant and _fits(ss, ff, Fraction(1), tick):
        return Comparison("same", len(pairs), detail="equal within a tick", **first)
    ratio = statistics.median(float(a.close / b.close) for a, b in pairs if b.close > 0)
    f = Fraction(ratio).limit_denominator(max_denominator)
    if f > 0 and f != 1 and _fits(ss, ff, f, tick):
        fd = Decimal(f.numerator) / Decimal(f.denominator)
        return Comparison("factor", len(pairs), fd, fd, detail=f"prices / {f}, volume * {f} on {len(pairs)} candles",
                          **first)
    diff = [a.start for a, b in pairs if (a.open, a.high, a.low, a.close, a.volume)
            != (b.open, b.high, b.low, b.close, b.volume)]
    return Comparison("revision", len(pairs), detail=f"{len(diff)} of {len(pairs)} candles differ without a "
                      f"consistent factor (median close ratio {ratio:.6g})", **first)


def request_chunks(sessions: Sequence[Session], days: int) -> list[list[Session]]:
    """Sessions (newest first) cut into runs spanning at most ``days``
    calendar days each (newest first inside): the shared planner
    (:func:`feeds.backfill.request_chunks`) with Dhan's rule, a request's
    span in calendar days (:func:`feeds.backfill.calendar_span`) and any
    sessions within it together."""
    return B.request_chunks(sessions, days, B.calendar_span)


# ------------------------------------------------------------------------------------------- database


class DhanStore(StatusStore):
    """Database access of feed-dhan-backfill (tables of ``sql/0009_dhan.sql``).
    Status and run log: :class:`feeds.backfill.StatusStore`.  Not thread-safe."""

    status_table = "dhan_session_status"
    run_table = "dhan_backfill_run"
    key_column = "instrument"
    id_column = "security_id"
    lock_key = _LOCK_KEY
    application_name = "feed-dhan-backfill"

    _COPY = "COPY dhan_bar ({}) FROM STDIN".format(", ".join(BAR_COLUMNS))

    def save_instruments(self, insts: Sequence[Instrument]) -> None:
        """Upsert the resolved instruments into ``dhan_instrument``."""
        if not insts:
            return
        with self.c.transaction():
            with self.c.cursor() as cur:
                cur.executemany(
                    """INSERT INTO dhan_instrument AS d (exchange_segment, security_id, symbol, instrument, tick_size,
                           lot_size, updated_at) VALUES (%s, %s, %s, %s, %s, %s, now())
                       ON CONFLICT (exchange_segment, security_id) DO UPDATE SET symbol = EXCLUDED.symbol,
                           instrument = EXCLUDED.instrument, tick_size = EXCLUDED.tick_size,
                           lot_size = EXCLUDED.lot_size, updated_at = now()""",
                    [(i.segment, i.security_id, i.symbol, i.instrument, i.tick, i.lot) for i in insts])

    def requests_today(self) -> int:
        """Requests counted by today's runs (IST date), for the daily budget."""
        r = self.c.execute("""SELECT coalesce(sum(requests), 0) FROM dhan_backfill_run
                               WHERE (started_at AT TIME ZONE 'Asia/Kolkata')::date
                                     = (now() AT TIME ZONE 'Asia/Kolkata')::date""").fetchone()
        return int(r[0])

    def commit_session(self, inst: Instrument, session: Session, status: str, rows: Sequence[tuple],
                       first, last, error: str | None, note: str | None,
                       requested_at: dt.datetime | None = None) -> None:
        """Replace the session's version-0 candles with ``rows`` and write its
        status, in one transaction (adjusted versions are never touched)."""
        self.commit_sessions(inst, [(session, status, rows, first, last, error, note)], requested_at)

    def commit_sessions(self, inst: Instrument, items: Sequence[tuple], requested_at: dt.datetime | None = None) -> None:
        """:meth:`commit_session` for the sessions of one answer, ``(session,
        status, rows, first, last, error, note)`` each, in one transaction (one
        commit per request rather than per session: a kill still leaves whole
        sessions only).  Each status row counts one attempt and records
        ``requested_at`` (when the request was sent)."""
        with self.c.transaction():
            for session, status, rows, first, last, error, note in items:
                self.c.execute("""DELETE FROM dhan_bar WHERE exchange_segment = %s AND security_id = %s
                                    AND version = 0 AND bar_start >= %s AND bar_start < %s""",
                               (inst.segment, inst.security_id, session.open, session.close))
                self._copy(rows)
                self.write_status(inst.key, inst.security_id, session, status, len(rows), first, last, error, note,
                                  attempts=1)
            if requested_at is not None:
                self.c.execute(f"""UPDATE {self.status_table} SET requested_at = %s
                                    WHERE instrument = %s AND session_date = ANY(%s)""",
                               (requested_at, inst.key, [it[0].day for it in items]))

    def _copy(self, rows: Sequence[tuple]) -> None:
        if rows:
            with self.c.cursor().copy(self._COPY) as cp:
                for r in rows:
                    cp.write_row(r)

    def stored_session(self, inst: Instrument, session: Session) -> tuple[int, list[R.Candle]]:
        """``(version, candles)`` of the newest stored version of the session
        (``(-1, [])`` when nothing is stored)."""
        rows = self.c.execute(
            """SELECT version, bar_start, open, high, low, close, volume, oi FROM dhan_bar
                WHERE exchange_segment = %s AND security_id = %s AND bar_start >= %s AND bar_start < %s
                  AND version = (SELECT max(version) FROM dhan_bar WHERE exchange_segment = %s AND security_id = %s
                                    AND bar_start >= %s AND bar_start < %s)
                ORDER BY bar_start""",
            (inst.segment, inst.security_id, session.open, session.close) * 2).fetchall()
        if not rows:
            return -1, []
        return rows[0][0], [R.Candle(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]

    def session_statuses(self, key: str, days: Sequence[dt.date]) -> dict[dt.date, str]:
        rows = self.c.execute(f"SELECT session_date, status FROM {self.status_table} "
                              "WHERE instrument = %s AND session_date = ANY(%s)", (key, list(days))).fetchall()
        return {r[0]: r[1] for r in rows}

    def record_adjustment(self, inst: Instrument, session: Session, cmp: Comparison, interval: int,
                          stored_version: int, new_rows: Sequence[tuple] | None) -> int:
        """Record an adjustment (or revision) and, with ``new_rows`` (one-minute
        candles built with version ``stored_version + 1``), store them with
        its id; the status row's note says so.  One transaction.  Returns the
        adjustment id (an adjustment already recorded for the same stored
        version and interval is returned, not recorded twice)."""
        with self.c.transaction():
            got = self.c.execute(
                """INSERT INTO dhan_adjustment (exchange_segment, security_id, symbol, session_date, kind,
                       price_factor, volume_factor, interval_minutes, candles_compared, stored_first_close,
                       fetched_first_close, stored_version, new_version, detail)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (exchange_segment, security_id, session_date, interval_minutes, stored_version)
                   DO NOTHING RETURNING adjustment_id""",
                (inst.segment, inst.security_id, inst.symbol, session.day, cmp.kind, cmp.price_factor,
                 cmp.volume_factor, interval, cmp.compared, cmp.stored_first_close, cmp.fetched_first_close,
                 stored_version, stored_version + 1 if new_rows else None, cmp.detail)).fetchone()
            if got is None:
                return int(self.c.execute(
                    """SELECT adjustment_id FROM dhan_adjustment WHERE exchange_segment = %s AND security_id = %s
                          AND session_date = %s AND interval_minutes = %s AND stored_version = %s""",
                    (inst.segment, inst.security_id, session.day, interval, stored_version)).fetchone()[0])
            adj = int(got[0])
            if new_rows:
                self._copy([r[:4] + (stored_version + 1,) + r[5:11] + (adj,) for r in new_rows])
            what = (f"adjusted: prices / {cmp.price_factor.normalize()}, volume * {cmp.volume_factor.normalize()}"
                    if cmp.kind == "factor" else "revised")
            self.c.execute(
                f"""UPDATE {self.status_table} SET note = concat_ws('; ', note, %s::text), updated_at = now()
                     WHERE instrument = %s AND session_date = %s""",
                (f"{what} (found {dt.date.today()}, adjustment {adj}"
                 + (f", version {stored_version + 1}" if new_rows else "") + ")", inst.key, session.day))
        return adj

    # ----------------------------------------------------------------- reconciliation
    def live_table(self) -> set[str] | None:
        """The columns of ``dhan_candle`` (None when the table does not exist yet)."""
        rows = self.c.execute("""SELECT column_name FROM information_schema.columns
                                  WHERE table_schema = current_schema() AND table_name = 'dhan_candle'""").fetchall()
        return {r[0] for r in rows} or None

    def live_candles(self, inst: Instrument, session: Session, cols: set[str]) -> list[R.Candle]:
        """The newest row of every live one-minute candle of the session in
        ``dhan_candle`` (interval_min 1; source 'live' when the table has the
        column; the exchange segment when it has it)."""
        where = ["security_id = %s", "interval_min = 1", "bar_start >= %s", "bar_start < %s"]
        args: list = [inst.security_id, session.open, session.close]
        if "exchange_segment" in cols:
            where.append("exchange_segment = %s")
            args.append(inst.segment)
        if "source" in cols:
            where.append("source = 'live'")
        order = "bar_start, recorded_at DESC" if "recorded_at" in cols else "bar_start"
        rows = self.c.execute(
            f"""SELECT DISTINCT ON (bar_start) bar_start, open, high, low, close, coalesce(volume, 0)
                  FROM dhan_candle WHERE {' AND '.join(where)} ORDER BY {order}""", args).fetchall()
        return [R.Candle(*r) for r in rows]

    def write_reconciliation(self, inst: Instrument, day: dt.date, compared: int, differing: int, missing_live: int,
                             missing_dhan: int, detail: str) -> None:
        self.c.execute(
            """INSERT INTO dhan_reconciliation AS r (exchange_segment, security_id, symbol, session_date,
                   interval_minutes, minutes_compared, minutes_differing, missing_live, missing_dhan, detail)
               VALUES (%s, %s, %s, %s, 1, %s, %s, %s, %s, %s)
               ON CONFLICT (exchange_segment, security_id, session_date, interval_minutes) DO UPDATE SET
                   minutes_compared = EXCLUDED.minutes_compared, minutes_differing = EXCLUDED.minutes_differing,
                   missing_live = EXCLUDED.missing_live, missing_dhan = EXCLUDED.missing_dhan,
                   detail = EXCLUDED.detail, checked_at = now(), symbol = EXCLUDED.symbol""",
            (inst.segment, inst.security_id, inst.symbol, day, compared, differing, missing_live, missing_dhan,
             detail or None))


# ------------------------------------------------------------------------------------------- the run


@dataclass
class InstrumentPlan(SessionPlan):
    """The plan for one instrument (:class:`feeds.backfill.SessionPlan`:
    the date range, sessions to fetch, holidays to record, counts, ``error``
    for an unresolvable instrument) with its line, the instrument and the
    requests (:func:`request_chunks`)."""

    line: InstrumentLine
    inst: Instrument | None
    chunks: list[list[Session]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return 0 if self.error else len(self.chunks)


@dataclass
class _Job:
    inst: Instrument
    sessions: list[Session]      # newest first

    @property
    def order(self) -> tuple:
        return fetch_order(self.sessions[0].day, self.inst.priority, self.inst.key)


@dataclass
class RunSummary(B.RunSummary):
    """Counters of one run (also written to ``dhan_backfill_run``)."""

    line_statuses: ClassVar[tuple[str, ...]] = ("COMPLETE", "EARLY_CLOSE", "THIN", "PARTIAL", "ERROR")

    rate_limited: int = 0
    adjustments: int = 0
    revisions: int = 0
    off_calendar: int = 0
    malformed: int = 0
    reconciled: int = 0
    instrument_errors: dict[str, str] = field(default_factory=dict)
    token_expired: bool = False
    budget_used: bool = False

    def venue_parts(self) -> list[str]:
        parts = [f"{self.errors} Dhan errors", f"{self.rate_limited} rate-limit answers",
                 f"{self.adjustments} adjustments"]
        if self.revisions:
            parts.append(f"{self.revisions} revisions")
        if self.off_calendar:
            parts.append(f"{self.off_calendar} candles on days without a session")
        if self.malformed:
            parts.append(f"{self.malformed} malformed entries skipped")
        if self.reconciled:
            parts.append(f"{self.reconciled} instruments reconciled")
        return parts

    def ending(self) -> str:
        return "stopped" if self.stopped else "stopped (daily request budget used)" if self.budget_used else "finished"


def _ist(t: dt.datetime) -> str:
    return t.astimezone(R.IST).strftime("%Y-%m-%d %H:%M:%S")


class DhanBackfill(BackfillRun):
    """One feed-dhan-backfill run (the run log, the lock and the end of a
    run: :class:`feeds.backfill.BackfillRun`).

    Args:
        settings: :class:`Settings`.
        lines: the instruments file's lines.
        store: :class:`DhanStore` (used from one worker thread only).
        instruments: Dhan's instrument list (:class:`InstrumentList`), used to resolve ``lines``.
        rest: a :class:`feeds.dhan.rest.DhanRest` (default: one built from the settings, the token
            read from ``settings.token_file`` before each request).
        notifier: object with ``notify(str)`` (default: the process's sd_notify).
        now: returns the current time (aware; default UTC wall clock).

    :meth:`run` fetches; :meth:`plan` only plans.
    """

    log = log
    program = "feed-dhan-backfill"
    lock_error = RuntimeError
    db_thread = "dhan-backfill-db"

    def __init__(self, settings: Settings, lines: Sequence[InstrumentLine], store: DhanStore,
                 instruments: InstrumentList, *, rest: R.DhanRest | None = None, notifier=None,
                 now: Callable[[], dt.datetime] | None = None):
        super().__init__(store, RunSummary(), notifier, now)
        self.s = settings
        self.lines = list(lines)
        self.cal = ExchangeCalendar(settings.calendar, extra_sessions=settings.extra_sessions,
                                    extra_holidays=settings.extra_holidays)
        self.resolved: dict[str, Instrument] = {}
        self.unresolved: dict[str, str] = {}
        for ln in self.lines:
            try:
                self.resolved[ln.key] = instruments.resolve(ln)
            except InstrumentsError as e:
                self.unresolved[ln.key] = str(e)
        self.concurrency = settings.concurrency or (2 * math.ceil(settings.requests_per_second) + 2)
        if rest is None:
            lim = R.data_limiter(settings.requests_per_second, max_open=self.concurrency, scale=settings.rate_scale)
            rest = R.DhanRest(settings.api_url, settings.client_id, self._token, limiter=lim,
                              budget=R.DailyBudget(settings.requests_per_day), timeout=settings.request_timeout,
                              max_attempts=settings.max_attempts)
        self.rest = rest
        self._queue: list[_Job] = []
        self.refetch = False

    def _token(self) -> str:
        return R.read_token(self.s.token_file)[0]

    def selected(self, sel: Selection) -> list[InstrumentLine]:
        """The lines a selection names (``symbols`` match SEGMENT:SYMBOL or SYMBOL), priority ones only
        with ``priority_only``; priority first, then the file's order."""
        want = {s.upper() for s in sel.symbols} if sel.symbols else None
        out = [ln for ln in self.lines
               if (want is None or ln.key in want or ln.symbol in want) and (ln.priority > 0 or not sel.priority_only)]
        return sorted(out, key=lambda ln: (-ln.priority, ln.line))

    # ---------------------------------------------------------------- plan
    def _earliest(self, today: dt.date) -> dt.date:
        if self.s.earliest is not None:
            return self.s.earliest
        return today - dt.timedelta(days=round(self.s.history_years * 365.25))

    async def plan(self, sel: Selection, refetch: bool = False) -> Plan:
        """Build the plan from the status table (writes nothing).  With
        ``refetch`` the sessions already stored are planned again (for the
        adjustment check), holidays excepted."""
        now = self.now()
        today = now.astimezone(self.cal.tz).date()
        plans = []
        for ln in self.selected(sel):
            inst = self.resolved.get(ln.key)
            first, last = plan_range(self.cal, now, self.s.settle, sel, [self._earliest(today)])
            ip = InstrumentPlan(ln, inst, first=first, last=last, error=self.unresolved.get(ln.key))
            if last is None or first is None or first > last:
                plans.append(ip)
                continue
            if ip.error is not None:
                # the error goes on the explicit range, else on the newest session
                ip.first = first = sel.first if sel.first is not None else last
            statuses = await self._db(self.store.statuses, [ln.key], first, last)
            if refetch:
                statuses = {k: v for k, v in statuses.items() if v.status == "HOLIDAY"}
            plan_sessions(self.cal, ln.key, first, last, statuses, now=now, retry_failed=sel.retry_failed,
                          finished=self._finished, include_errors=ip.error is not None, out=ip)
            ip.chunks = request_chunks(ip.sessions, self.s.days_per_request)
            plans.append(ip)
        plan = Plan(plans)
        rate = self.rest.limiter.max_requests / self.rest.limiter.window
        plan.duration = plan.requests / rate if rate > 0 else math.inf
        return plan

    async def _apply_plan(self, plan: Plan) -> None:
        sm = self.summary
        holidays = [(p.line.key, p.inst.security_id if p.inst else None, d) for p in plan.items
                    for d in p.holidays]
        await self._db(self.store.mark_holidays, holidays)
        sm.holidays += len(holidays)
        jobs, pending = [], []
        for p in plan.items:
            if p.error is not None:
                sm.instrument_errors[p.line.key] = p.error
                for s in p.sessions:
                    await self._db(self.store.record_error, p.line.key, None, s, "ERROR", p.error)
                    self._finish(p.line.key, s.day, "ERROR")
                    sm.planned += 1
                continue
            assert p.inst is not None
            for chunk in p.chunks:
                jobs.append(_Job(p.inst, chunk))
                pending += [(p.inst.key, p.inst.security_id, s) for s in chunk]
        await self._db(self.store.mark_pending, pending)
        jobs.sort(key=lambda j: j.order)
        self._queue = jobs
        self._planned.update((k, s.day) for k, _, s in pending)
        sm.planned += len(pending)
        self._total = sm.planned

    # ---------------------------------------------------------------- run
    async def run(self, sel: Selection, arguments: str = "", refetch: bool = False) -> RunSummary:
        """Fetch every selected session not yet final (with ``refetch``:
        every stored one again, for adjustments), then reconcile (when
        ``settings.reconcile``).  Returns the summary; raises
        :class:`TokenExpired` (after writing the summary) when the token is
        missing, invalid or expired, and ``RuntimeError`` when another run
        holds the lock."""
        self.refetch = refetch
        await self._begin(arguments, self.s.client_id)
        await self._guarded(self._fetch_all(sel, refetch), "feed-dhan-backfill failed")
        sm = self.summary
        if sm.token_expired:
            raise TokenExpired(sm.failed)
        return sm

    async def _fetch_all(self, sel: Selection, refetch: bool) -> None:
        sm = self.summary
        used = await self._db(self.store.requests_today)
        self.rest.budget.used = max(self.rest.budget.used, used)
        await self._db(self.store.save_instruments, list(self.resolved.values()))
        for key, err in self.unresolved.items():
            log.error("%s", err)
        plan = await self.plan(sel, refetch)
        await self._apply_plan(plan)
        log.info("plan: %d sessions to fetch for %d instruments in %d requests, %d holidays recorded; the rate "
                 "limit implies %s", len(self._planned), len(plan.items), plan.requests, sm.holidays,
                 fmt_duration(plan.duration))
        self.notifier.notify(f"STATUS=fetching {len(self._planned)} sessions in {plan.requests} requests")
        await self._run_workers()
        if self.s.reconcile and not sm.token_expired and not sm.budget_used:
            await self.reconcile(sel)

    def settle(self) -> None:
        sm = self.summary
        if sm.token_expired and sm.failed is None:
            sm.failed = "the access token is invalid or expired"
        elif sm.failed is None and sm.left_pending and not (sm.stopped or sm.budget_used):
            sm.failed = f"{sm.left_pending} sessions left PENDING"
        sm.requests, sm.rate_limited = self.rest.requests, self.rest.rate_limited
        sm.errors, sm.malformed = self.rest.errors, sm.malformed + self.rest.malformed

    async def disconnect(self) -> None:
        await self.rest.close()

    def run_counts(self, final: bool = False) -> dict:
        counts = super().run_counts(final)
        if final:
            counts.update(pacing_violations=self.summary.rate_limited, adjustments=self.summary.adjustments)
        else:   # the summary takes the client's counters at the end
            counts.update(requests=self.rest.requests, errors=self.rest.errors)
        return counts

    async def _run_workers(self) -> None:
        """``concurrency`` workers take jobs in order; each answer's sessions are
        committed by the database thread in the background (at most
        ``2 * concurrency`` answers waiting), so a slow commit never holds the
        next request back.  A failed commit stops the run (raised here)."""
        queue = self._queue
        self._halt = asyncio.Event()
        self._slots = asyncio.Semaphore(2 * self.concurrency)
        self._commits: set[asyncio.Future] = set()

        async def worker():
            while queue and not self._halt.is_set():
                job = queue.pop(0)
                if not await self._fetch(job):
                    self._halt.set()
        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            results = await asyncio.gather(*self._commits, return_exceptions=True) if self._commits else []
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _fetch(self, job: _Job) -> bool:
        """One request and its sessions; False when the run must stop (token, budget)."""
        inst, sessions = job.inst, job.sessions
        first, last = sessions[-1], sessions[0]
        sent_at = self.now()
        try:
            candles, bad = await self.rest.intraday(inst.security_id, inst.segment, inst.instrument,
                                                    _ist(first.open), _ist(last.close))
        except R.TokenError as e:
            self.summary.token_expired = True
            log.error("%s: %s: stopping (renew it with feed-dhan-token)", inst.key, e)
            for s in sessions:
                await self._db(self.store.record_error, inst.key, inst.security_id, s, "PENDING", str(e), 1)
            return False
        except R.BudgetExhausted as e:
            self.summary.budget_used = True
            log.warning("%s; the next run goes on", e)
            return False
        except R.InputError as e:
            log.error("%s %s..%s: Dhan refused the request: %s", inst.key, first.day, last.day, e)
            for s in sessions:
                await self._db(self.store.record_error, inst.key, inst.security_id, s, "ERROR", f"Dhan {e}", 1)
                self._finish(inst.key, s.day, "ERROR")
            return True
        except R.DhanError as e:
            log.warning("%s %s..%s: %s; stays PENDING", inst.key, first.day, last.day, e)
            for s in sessions:
                await self._db(self.store.record_error, inst.key, inst.security_id, s, "PENDING", f"Dhan {e}", 1)
            return True
        self.summary.malformed += bad
        by_day = split_by_day(candles, self.cal.tz)
        wanted = {s.day for s in sessions}
        for day, cs in by_day.items():
            if day not in wanted and self.cal.session(day) is None:
                self.summary.off_calendar += len(cs)
                log.info("%s %s: %d candles on a day the %s calendar has no session", inst.key, day, len(cs),
                         self.cal.name)
        todo = sorted(sessions, key=lambda s: s.day)
        if self.refetch:
            rest = []
            for s in todo:
                version, stored = await self._db(self.store.stored_session, inst, s)
                if stored:
                    await self._check_adjustment(inst, s, stored, version, by_day.get(s.day, []), 1)
                    self._finish(inst.key, s.day, "REFETCHED")
                else:
                    rest.append(s)
            todo = rest
        if not todo:
            return True
        now = self.now()
        items = []
        for s in todo:
            chk = check_session(inst, s, by_day.get(s.day, []), now)
            status, error, note = session_status(chk, s, now, self.s.settle, thin_status="THIN")
            items.append((s, status, chk, error, note))
        await self._slots.acquire()
        t = asyncio.ensure_future(self._commit(inst, items, sent_at))
        self._commits.add(t)
        return True

    async def _commit(self, inst: Instrument, items: list[tuple], sent_at: dt.datetime) -> None:
        """Store one answer's checked sessions (background task of :meth:`_run_workers`)."""
        try:
            await self._db(self.store.commit_sessions, inst,
                           [(s, status, chk.rows, chk.first, chk.last, error, note)
                            for s, status, chk, error, note in items], sent_at)
        except BaseException:
            self._halt.set()
            raise
        finally:
            self._slots.release()
        for s, status, chk, error, note in items:
            self.summary.bars += chk.actual
            if status == "ERROR":
                log.error("%s %s: %s", inst.key, s.day, error)
            elif note:
                log.log(logging.DEBUG if status == "THIN" else logging.INFO, "%s %s: %s %d/%d bars: %s", inst.key,
                        s.day, status, chk.actual, chk.expected, note)
            self._finish(inst.key, s.day, status)

    async def _check_adjustment(self, inst: Instrument, session: Session, stored: list[R.Candle], version: int,
                                fetched: list[R.Candle], interval: int) -> Comparison:
        """Compare a session fetched again with the stored version; record an
        adjustment or revision (one-minute answers stored as the next version)."""
        base = rollup(stored, interval, session)
        new = [c for c in fetched if session.contains(c.start)]
        cmp = compare(base, new, inst.tick, tolerant=interval > 1)
        if cmp.kind == "same":
            return cmp
        rows = None
        if interval == 1:
            chk = check_session(inst, session, new, self.now(), version=version + 1)
            rows = chk.rows if chk.failure is None else None
        adj = await self._db(self.store.record_adjustment, inst, session, cmp, interval, version, rows)
        if cmp.kind == "factor":
            self.summary.adjustments += 1
            log.warning("%s %s: Dhan's history is adjusted (%s): recorded as adjustment %d, both versions kept",
                        inst.key, session.day, cmp.detail, adj)
        else:
            self.summary.revisions += 1
            log.warning("%s %s: Dhan's candles changed (%s): recorded as revision %d, both versions kept",
                        inst.key, session.day, cmp.detail, adj)
        return cmp

    async def compare_interval(self, inst: Instrument, session: Session, interval: int) -> Comparison:
        """Fetch one session again at ``interval`` minutes and compare it with
        the stored one-minute candles rolled up (see :func:`compare`);
        records the adjustment.  Raises :class:`feeds.dhan.rest.DhanError`."""
        version, stored = await self._db(self.store.stored_session, inst, session)
        if not stored:
            return Comparison("same", 0, detail="nothing stored")
        candles, _ = await self.rest.intraday(inst.security_id, inst.segment, inst.instrument, _ist(session.open),
                                              _ist(session.close), interval=str(interval))
        return await self._check_adjustment(inst, session, stored, version, candles, interval)

    # ---------------------------------------------------------------- reconciliation
    async def reconcile(self, sel: Selection) -> int:
        """Compare the live one-minute candles of the last finished session
        (or ``sel.last``) with Dhan's, priority instruments first; returns
        the instruments reconciled (0 when ``dhan_candle`` does not exist)."""
        cols = await self._db(self.store.live_table)
        if cols is None:
            log.info("reconciliation skipped: no table dhan_candle (live candles) yet")
            return 0
        day = sel.last
        if day is None:
            lf = self.cal.last_finished(self.now(), self.s.settle)
            day = lf.day if lf else None
        session = self.cal.session(day) if day else None
        if session is None:
            return 0
        n = 0
        for ln in self.selected(sel):
            inst = self.resolved.get(ln.key)
            if inst is None:
                continue
            live = await self._db(self.store.live_candles, inst, session, cols)
            if not live:
                continue
            _v, dhan = await self._db(self.store.stored_session, inst, session)
            if not dhan:
                try:
                    got, _ = await self.rest.intraday(inst.security_id, inst.segment, inst.instrument,
                                                      _ist(session.open), _ist(session.close))
                except (R.DhanError, R.BudgetExhausted) as e:
                    log.warning("reconciliation of %s %s: %s", inst.key, session.day, e)
                    if isinstance(e, R.TokenError):
                        break
                    continue
                dhan = [c for c in got if session.contains(c.start)]
            d = {c.start: c for c in dhan}
            lv = {c.start: c for c in live}
            both = sorted(set(d) & set(lv))
            diffs = []
            for t in both:
                a, b = lv[t], d[t]
                for name in ("open", "high", "low", "close", "volume"):
                    if getattr(a, name) != getattr(b, name):
                        diffs.append(f"{_hm(t, R.IST)} {name} {getattr(a, name)}/{getattr(b, name)}")
                        break
            missing_live, missing_dhan = len(set(d) - set(lv)), len(set(lv) - set(d))
            await self._db(self.store.write_reconciliation, inst, session.day, len(both), len(diffs), missing_live,
                           missing_dhan, "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else ""))
            n += 1
            log.info("reconciled %s %s: %d minutes compared, %d differ, %d missing live, %d missing at Dhan",
                     inst.key, session.day, len(both), len(diffs), missing_live, missing_dhan)
        self.summary.reconciled = n
        return n

    # ---------------------------------------------------------------- progress
    def progress_line(self) -> str:
        """``progress: sessions 120/2500 (4%), requests 24, bars 45,000, errors 0, rate-limit answers 0, ETA 1m35s``."""
        sm = self.summary
        total = max(self._total, 1)
        left = len(self._queue)
        rate = self.rest.limiter.max_requests / self.rest.limiter.window
        eta = left / rate if rate > 0 else math.inf
        return (f"progress: sessions {sm.done}/{self._total} ({100 * sm.done // total}%), requests "
                f"{self.rest.requests}, bars {sm.bars:,}, errors {self.rest.errors}, rate-limit answers "
                f"{self.rest.rate_limited}, adjustments {sm.adjustments}, ETA {fmt_duration(eta)}")

    def figures(self) -> dict[str, int]:
        sm = self.summary
        return {"sessions": self._total, "done": sm.done, "requests": self.rest.requests, "bars": sm.bars,
                "errors": self.rest.errors, "rate limited": self.rest.rate_limited, "adjustments": sm.adjustments}
