"""The history backfill planner and session status, shared by every venue.

Used by ``feed-backfill`` (IBKR, :mod:`feeds.ibkr.backfill`) and
``feed-dhan-backfill`` (Dhan, :mod:`feeds.dhan.history`).  What is the
venue's own (contract resolution, requests, their errors, the bar checks)
stays in the venue's package; what is here is the same for every venue:

* **Unit of work**: one exchange session (:class:`feeds.calendars.Session`)
  of one instrument, recorded in a per-venue status table
  (``ibkr_session_status``, ``dhan_session_status``: same columns but the
  venue's instrument id) through :class:`StatusStore`.  A session's bars and
  its status row commit in one transaction, so a killed run resumes from
  the table and no finished session is requested again.
* **Plan** (:func:`plan_sessions`, :func:`plan_range`, :func:`fetch_order`):
  the days of the exchange calendar from the last finished session (its
  close + ``settle`` passed, or ``--to``) back to the earliest wanted date,
  newest first; weekdays without a session are recorded HOLIDAY without a
  request; sessions with a final status are skipped, ERROR ones too unless
  ``--retry-failed``.  Jobs are fetched newest date first, then higher
  priority, then symbol, so the nightly top-up lands first.
* **Statuses** (:data:`STATUSES`, :func:`session_status`):

  ========== ==========================================================
  PENDING    planned, or a transient failure (rate limit, connection,
             timeout): fetched by every run
  COMPLETE   the venue answered and every bar passed the checks, with as
             many one-minute bars as the calendar has minutes
  EARLY_CLOSE the same on an early-close session
  THIN       the same, with fewer bars than the calendar's minutes
             (minutes without a trade have no bar); final.  Venues that
             keep such sessions COMPLETE with a ``thin:`` note (IBKR, whose
             table predates this status) pass ``thin_status=None``
  HOLIDAY    a day of the exchange's week without a session: no request
  PARTIAL    answered before the session settled: fetched again
  ERROR      the venue refused the request (its text kept), no bar at all
             for a session the calendar has, or a bar failed a check:
             fetched again only with ``--retry-failed``
  ========== ==========================================================

* **Command line** pieces (:func:`parse_date`, :func:`parse_symbols`,
  :func:`format_status`, :func:`fmt_duration`) for ``--from/--to/--date``,
  ``--symbols`` and ``--status``.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .calendars import ExchangeCalendar, Session

__all__ = ["STATUSES", "DONE_STATUSES", "Selection", "SessionPlan", "StatusRow", "StatusStore", "plan_sessions",
           "plan_range", "fetch_order", "session_status", "fmt_duration", "parse_date", "parse_symbols",
           "format_status", "calendar_days"]

STATUSES = ("PENDING", "COMPLETE", "EARLY_CLOSE", "THIN", "HOLIDAY", "PARTIAL", "ERROR")
#: Statuses a run never requests again.
DONE_STATUSES = frozenset({"COMPLETE", "EARLY_CLOSE", "THIN", "HOLIDAY"})
#: Statuses that hold bars.
STORED_STATUSES = ("COMPLETE", "EARLY_CLOSE", "THIN", "PARTIAL")


@dataclass
class Selection:
    """What to fetch: ``symbols`` (None = all), ``first``/``last`` (dates,
    None = the venue's earliest / the last finished session),
    ``retry_failed``, ``priority_only``."""

    symbols: Sequence[str] | None = None
    first: dt.date | None = None
    last: dt.date | None = None
    retry_failed: bool = False
    priority_only: bool = False

    @property
    def explicit(self) -> bool:
        return self.first is not None


@dataclass(frozen=True)
class StatusRow:
    """One status row (the fields a plan needs)."""

    symbol: str
    day: dt.date
    status: str
    attempts: int
    error: str | None


@dataclass
class SessionPlan:
    """One instrument's sessions between ``first`` and ``last``:
    ``sessions`` to request (newest first), ``holidays`` to record, counts
    of sessions already done and of ERROR ones skipped."""

    sessions: list[Session] = field(default_factory=list)
    holidays: list[dt.date] = field(default_factory=list)
    done: int = 0
    skipped_errors: int = 0


def calendar_days(cal: ExchangeCalendar, first: dt.date, last: dt.date) -> list[tuple[dt.date, Session | None]]:
    """Every day in ``[first, last]``, newest first, that is a day of the
    exchange's week or has a session (a Saturday session such as XNSE
    2024-01-20 is included), with its session (None on a holiday)."""
    out = []
    day = last
    while day >= first:
        s = cal.session(day)
        if s is not None or cal.is_trading_week_day(day):
            out.append((day, s))
        day -= dt.timedelta(days=1)
    return out


def plan_range(cal: ExchangeCalendar, now: dt.datetime, settle: dt.timedelta, sel: Selection,
               earliest: Iterable[dt.date | None] = ()) -> tuple[dt.date | None, dt.date | None]:
    """``(first, last)`` dates to plan: ``last`` = ``sel.last`` or the last
    finished session (close + ``settle`` before ``now``); ``first`` = the
    latest of ``sel.first`` and the ``earliest`` candidates (None when
    none is given)."""
    last = sel.last
    if last is None:
        lf = cal.last_finished(now, settle)
        last = lf.day if lf else None
    opts = [d for d in (sel.first, *earliest) if d is not None]
    return (max(opts) if opts else None), last


def plan_sessions(cal: ExchangeCalendar, symbol: str, first: dt.date, last: dt.date,
                  statuses: dict[tuple[str, dt.date], StatusRow], *, now: dt.datetime, retry_failed: bool = False,
                  finished: Iterable[tuple[str, dt.date]] = (), include_errors: bool = False) -> SessionPlan:
    """The sessions of ``symbol`` in ``[first, last]`` to fetch (newest
    first) and the holidays to record, given the stored ``statuses``
    (``{(symbol, day): StatusRow}``).  Sessions not yet opened at ``now``
    are left out; so are those in ``finished`` (done by this run).
    ``include_errors`` plans ERROR sessions even without ``retry_failed``
    (the instrument itself is in error and the error goes on them)."""
    out = SessionPlan()
    done = set(finished)
    for day, session in (calendar_days(cal, first, last) if first <= last else []):
        st = statuses.get((symbol, day))
        if session is None:
            if st is None or st.status != "HOLIDAY":
                out.holidays.append(day)
            continue
        if not session.started(now):
            continue
        if st is not None and st.status in DONE_STATUSES:
            out.done += 1
            continue
        if st is not None and st.status == "ERROR" and not retry_failed and not include_errors:
            out.skipped_errors += 1
            continue
        if (symbol, day) in done:
            continue
        out.sessions.append(session)
    return out


def fetch_order(day: dt.date, priority: int, symbol: str) -> tuple:
    """Sort key of a job: newest date first, then higher priority, then symbol."""
    return (-day.toordinal(), -priority, symbol)


class CheckResult(Protocol):
    """What :func:`session_status` reads of a venue's session check."""

    failure: str | None
    dropped: list
    expected: int
    note: str

    @property
    def actual(self) -> int: ...


def session_status(chk: CheckResult, session: Session, now: dt.datetime, settle: dt.timedelta,
                   thin_status: str | None = "THIN") -> tuple[str, str | None, str]:
    """The status of a fetched session from its check: ``(status, error,
    note)``.

    ERROR when a bar failed a check or no bar fell inside the session;
    PARTIAL when the session had not settled at ``now`` (the missing minutes
    may still come: no "thin" verdict yet); otherwise EARLY_CLOSE on an
    early close, ``thin_status`` when fewer bars than minutes came
    (None: COMPLETE/EARLY_CLOSE, the note says thin), else COMPLETE."""
    note = chk.note
    if chk.failure is not None:
        return "ERROR", f"check failed: {chk.failure}", note
    if not chk.actual:
        return "ERROR", (f"no bar inside the session ({len(chk.dropped)} outside)" if chk.dropped
                         else "empty answer"), note
    if not session.settled(now, settle):
        note = "; ".join([f"fetched before the session settled ({chk.actual} of {chk.expected} bars)"]
                         + [n for n in note.split("; ") if n and not n.startswith("thin:")])
        return "PARTIAL", None, note
    if thin_status is not None and chk.actual < chk.expected:
        return thin_status, None, note
    return ("EARLY_CLOSE" if session.early_close else "COMPLETE"), None, note


# ------------------------------------------------------------------------ command line


_REL = re.compile(r"^(\d{1,5})d$")


def parse_date(value: str | None, option: str, today: dt.date) -> dt.date | None:
    """``YYYY-MM-DD`` or ``Nd`` (N days before ``today``); None stays None.
    Raises ``click.BadParameter`` naming ``option``."""
    import click

    if value is None:
        return None
    m = _REL.match(value.strip())
    if m:
        return today - dt.timedelta(days=int(m.group(1)))
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f"expected YYYY-MM-DD or a number of days back such as 30d, got {value!r}",
                                 param_hint=option) from None


def parse_symbols(first: str | None, extra: tuple[str, ...]) -> list[str] | None:
    """``--symbols A B`` / ``--symbols A,B`` (upper-cased); None when not given.
    Raises ``click.UsageError``/``BadParameter``."""
    import click

    if first is None:
        if extra:
            raise click.UsageError(f"unexpected argument(s) {' '.join(extra)} (symbols follow --symbols)")
        return None
    out = [s.strip().upper() for v in (first, *extra) for s in v.split(",") if s.strip()]
    if not out:
        raise click.BadParameter("no symbol given", param_hint="--symbols")
    return out


def fmt_duration(seconds: float) -> str:
    """``1h02m``, ``4m10s``, ``12s`` (``?`` for infinity)."""
    if seconds is None or math.isinf(seconds) or math.isnan(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"


def format_status(rows: list[dict], errors: list[tuple], last_run: tuple | None, width: int = 10) -> str:
    """The ``--status`` table (rows of :meth:`StatusStore.summary`), the
    latest errors and the last run."""
    cols = ("COMPLETE", "EARLY_CLOSE", "thin", "PARTIAL", "ERROR", "PENDING", "HOLIDAY")
    out = [f"{'symbol':<{width}} " + " ".join(f"{c.lower():>11}" for c in cols)
           + f" {'first':>10} {'last':>10} {'bars':>12}"]
    for r in rows:
        out.append(f"{r['symbol']:<{width}} " + " ".join(f"{r[c]:>11}" for c in cols)
                   + f" {str(r['first'] or '-'):>10} {str(r['last'] or '-'):>10} {r['bars']:>12,}")
    if not rows:
        out.append("(no sessions recorded yet)")
    if errors:
        out.append("latest errors:")
        out += [f"  {sym} {day}: {err}" for sym, day, err in errors]
    if last_run:
        run_id, started, finished, state, requests, bars, errs, _summary = last_run
        out.append(f"last run {run_id}: {state}, started {started:%Y-%m-%d %H:%M:%S %Z}"
                   + (f", finished {finished:%H:%M:%S}" if finished else "")
                   + f"; {requests} requests, {bars:,} bars, {errs} errors")
    return "\n".join(out)


# ------------------------------------------------------------------------ the status table


class StatusStore:
    """The status table and run log of one venue's backfill, on one
    PostgreSQL connection (not thread-safe: use from one thread).

    A subclass names its tables: ``status_table`` (columns: the key
    ``key_column`` text, ``session_date``, the venue id ``id_column``,
    ``status``, ``session_open``, ``session_close``, ``expected_bars``,
    ``actual_bars``, ``first_bar``, ``last_bar``, ``error``, ``note``,
    ``attempts``, ``requested_at``, ``updated_at``), ``run_table`` (see
    ``ibkr_backfill_run``), ``lock_key`` (the advisory lock making the run
    the only one) and ``application_name``.  Methods raise
    ``psycopg.Error`` when the database fails.
    """

    status_table = ""
    run_table = ""
    key_column = "symbol"
    id_column = ""
    lock_key = 0
    application_name = "feed-backfill"

    def __init__(self, dsn: str, connect_timeout: int = 10):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.conn = None
        t, k, i = self.status_table, self.key_column, self.id_column
        self._upsert = f"""
INSERT INTO {t} AS s ({k}, session_date, {i}, status, session_open, session_close,
    expected_bars, actual_bars, first_bar, last_bar, error, note, attempts, updated_at)
VALUES (%(symbol)s, %(day)s, %(id)s, %(status)s, %(open)s, %(close)s, %(expected)s, %(actual)s,
    %(first)s, %(last)s, %(error)s, %(note)s, %(attempts)s, now())
ON CONFLICT ({k}, session_date) DO UPDATE SET
    {i} = COALESCE(EXCLUDED.{i}, s.{i}), status = EXCLUDED.status,
    session_open = EXCLUDED.session_open, session_close = EXCLUDED.session_close,
    expected_bars = EXCLUDED.expected_bars, actual_bars = EXCLUDED.actual_bars,
    first_bar = EXCLUDED.first_bar, last_bar = EXCLUDED.last_bar,
    error = COALESCE(EXCLUDED.error, s.error), note = EXCLUDED.note,
    attempts = s.attempts + EXCLUDED.attempts, updated_at = now()
"""

    def connect(self):
        """Open the connection (:func:`feeds.db.connect`: autocommit,
        transactions are explicit; statements limited to 60 s, lock waits to
        10 s).  Idempotent; returns self."""
        from .db import connect

        if self.conn is None or self.conn.closed:
            # A session's delete, COPY and status upsert take well under a second; the limits only
            # keep a stuck server or a held lock from stalling the run forever.
            self.conn = connect(self.dsn, application_name=self.application_name, statement_timeout=60.0,
                                lock_timeout=10.0, connect_timeout=self.connect_timeout)
        return self

    def close(self) -> None:
        """Close the connection (which also releases the advisory lock)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @property
    def c(self):
        """The open connection (reconnects when it was closed)."""
        if self.conn is None or self.conn.closed:
            self.connect()
        assert self.conn is not None
        return self.conn

    def try_lock(self) -> bool:
        """Take the advisory lock that makes this the only running backfill
        of the venue; False when another session holds it (this session may
        take it again: the lock counts)."""
        return bool(self.c.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,)).fetchone()[0])

    # ------------------------------------------------------------- run log
    def start_run(self, arguments: str, client_id=None) -> int:
        """Insert a run row (state running); runs left ``running`` by a
        killed process are marked ``interrupted`` first.  Returns run_id."""
        with self.c.transaction():
            self.c.execute(f"""UPDATE {self.run_table} SET state = 'interrupted'
                                WHERE state = 'running' AND finished_at IS NULL""")
            row = self.c.execute(
                f"""INSERT INTO {self.run_table} (host, pid, client_id, arguments)
                    VALUES (%s, %s, %s, %s) RETURNING run_id""",
                (socket.gethostname(), os.getpid(), client_id, arguments)).fetchone()
        return int(row[0])

    def update_run(self, run_id: int, *, finished: bool = False, state: str | None = None, **counts) -> None:
        """Update counters (sessions_planned, sessions_done, requests,
        bars_stored, errors, pacing_violations, reconnects, summary,
        client_id); ``finished`` sets finished_at."""
        sets, vals = [], []
        for k, v in counts.items():
            sets.append(f"{k} = %s")
            vals.append(v)
        if state:
            sets.append("state = %s")
            vals.append(state)
        if finished:
            sets.append("finished_at = now()")
        if not sets:
            return
        self.c.execute(f"UPDATE {self.run_table} SET {', '.join(sets)} WHERE run_id = %s", (*vals, run_id))

    def last_run(self) -> tuple | None:
        """(run_id, started_at, finished_at, state, requests, bars_stored, errors, summary) of the newest run."""
        return self.c.execute(f"""SELECT run_id, started_at, finished_at, state, requests, bars_stored, errors,
                                         summary FROM {self.run_table} ORDER BY run_id DESC LIMIT 1""").fetchone()

    # -------------------------------------------------------------- status
    def statuses(self, symbols: Iterable[str], first: dt.date, last: dt.date) -> dict[tuple[str, dt.date], StatusRow]:
        """Existing status rows of ``symbols`` between ``first`` and ``last``."""
        k = self.key_column
        rows = self.c.execute(
            f"""SELECT {k}, session_date, status, attempts, error FROM {self.status_table}
                 WHERE {k} = ANY(%s) AND session_date BETWEEN %s AND %s""",
            (list(symbols), first, last)).fetchall()
        return {(r[0], r[1]): StatusRow(*r) for r in rows}

    def mark_pending(self, items: Sequence[tuple[str, object, Session]]) -> int:
        """Insert PENDING rows for planned sessions that have none yet
        (``(symbol, venue id, session)``); returns the rows inserted."""
        if not items:
            return 0
        with self.c.transaction():
            with self.c.cursor() as cur:
                cur.executemany(
                    f"""INSERT INTO {self.status_table} ({self.key_column}, session_date, {self.id_column}, status,
                            session_open, session_close, expected_bars)
                        VALUES (%s, %s, %s, 'PENDING', %s, %s, %s) ON CONFLICT DO NOTHING""",
                    [(sym, s.day, vid, s.open, s.close, s.expected_bars) for sym, vid, s in items])
                return cur.rowcount if cur.rowcount >= 0 else 0

    def mark_holidays(self, items: Sequence[tuple[str, object, dt.date]]) -> None:
        """Record HOLIDAY rows (``(symbol, venue id, day)``); no bars, no request."""
        if not items:
            return
        with self.c.transaction():
            with self.c.cursor() as cur:
                cur.executemany(
                    f"""INSERT INTO {self.status_table} AS s ({self.key_column}, {self.id_column}, session_date,
                            status, note)
                        VALUES (%s, %s, %s, 'HOLIDAY', 'exchange calendar: no session')
                        ON CONFLICT ({self.key_column}, session_date) DO UPDATE SET status = 'HOLIDAY',
                            note = EXCLUDED.note, updated_at = now()
                        WHERE s.status <> 'HOLIDAY'""",
                    list(items))

    def write_status(self, symbol: str, venue_id, session: Session, status: str, actual: int,
                     first: dt.datetime | None, last: dt.datetime | None, error: str | None, note: str | None,
                     attempts: int = 0) -> None:
        """Upsert a fetched session's status row (inside the caller's
        transaction, with its bars)."""
        self.c.execute(self._upsert, dict(symbol=symbol, day=session.day, id=venue_id, status=status,
                                          open=session.open, close=session.close,
                                          expected=session.expected_bars, actual=actual, first=first,
                                          last=last, error=error, note=note or None, attempts=attempts))

    def record_error(self, symbol: str, venue_id, session: Session, status: str, error: str,
                     attempts: int = 0) -> None:
        """Record an error against a session without touching its bars:
        ``status`` PENDING (transient, will be retried) or ERROR.  A final
        status (COMPLETE, EARLY_CLOSE, THIN, HOLIDAY) is left as it is."""
        k, i = self.key_column, self.id_column
        self.c.execute(
            f"""INSERT INTO {self.status_table} AS s ({k}, session_date, {i}, status, session_open,
                    session_close, expected_bars, error, attempts)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT ({k}, session_date) DO UPDATE SET status = EXCLUDED.status,
                    {i} = COALESCE(EXCLUDED.{i}, s.{i}), error = EXCLUDED.error,
                    expected_bars = EXCLUDED.expected_bars,
                    attempts = s.attempts + EXCLUDED.attempts, updated_at = now()
                WHERE s.status NOT IN ('COMPLETE', 'EARLY_CLOSE', 'THIN', 'HOLIDAY')""",
            (symbol, session.day, venue_id, status, session.open, session.close, session.expected_bars, error,
             attempts))

    def note_request(self, symbol: str, venue_id, session: Session) -> None:
        """Count a request about to be sent for the session and remember
        when (``requested_at``)."""
        self.note_requests([(symbol, venue_id, session)])

    def note_requests(self, items: Sequence[tuple[str, object, Session]]) -> None:
        """:meth:`note_request` for several sessions (one request may span many)."""
        if not items:
            return
        k, i = self.key_column, self.id_column
        with self.c.transaction():
            with self.c.cursor() as cur:
                cur.executemany(
                    f"""INSERT INTO {self.status_table} AS s ({k}, session_date, {i}, status, session_open,
                            session_close, expected_bars, attempts, requested_at)
                        VALUES (%s, %s, %s, 'PENDING', %s, %s, %s, 1, now())
                        ON CONFLICT ({k}, session_date) DO UPDATE SET attempts = s.attempts + 1,
                            requested_at = now()""",
                    [(sym, s.day, vid, s.open, s.close, s.expected_bars) for sym, vid, s in items])

    def recent_requests(self, seconds: float) -> list[tuple[str, dt.date, float]]:
        """Requests sent in the last ``seconds`` (by any run):
        ``(symbol, session_date, age in seconds)``, oldest first."""
        return [(r[0], r[1], float(r[2])) for r in self.c.execute(
            f"""SELECT {self.key_column}, session_date, extract(epoch FROM now() - requested_at)
                  FROM {self.status_table}
                 WHERE requested_at > now() - make_interval(secs => %s) ORDER BY requested_at""",
            (seconds,)).fetchall()]

    # -------------------------------------------------------------- status report
    def summary(self, symbols: Sequence[str] | None = None) -> list[dict]:
        """Per-symbol counts by status (``thin``: THIN rows and COMPLETE or
        EARLY_CLOSE ones with fewer bars than expected), first/last session
        and bars stored (for ``--status``), sorted by symbol."""
        k = self.key_column
        where = f"WHERE {k} = ANY(%(s)s)" if symbols else ""
        rows = self.c.execute(f"""
            SELECT {k},
                   count(*) FILTER (WHERE status = 'COMPLETE'),
                   count(*) FILTER (WHERE status = 'EARLY_CLOSE'),
                   count(*) FILTER (WHERE status = 'HOLIDAY'),
                   count(*) FILTER (WHERE status = 'PARTIAL'),
                   count(*) FILTER (WHERE status = 'ERROR'),
                   count(*) FILTER (WHERE status = 'PENDING'),
                   count(*) FILTER (WHERE status = 'THIN' OR
                                    (status IN ('COMPLETE', 'EARLY_CLOSE') AND actual_bars < expected_bars)),
                   min(session_date) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'THIN', 'PARTIAL')),
                   max(session_date) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'THIN', 'PARTIAL')),
                   coalesce(sum(actual_bars), 0),
                   max(updated_at)
              FROM {self.status_table} {where} GROUP BY {k} ORDER BY {k}""",
                              {"s": list(symbols or [])}).fetchall()
        keys = ("symbol", "COMPLETE", "EARLY_CLOSE", "HOLIDAY", "PARTIAL", "ERROR", "PENDING", "thin",
                "first", "last", "bars", "updated")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def last_errors(self, symbols: Sequence[str] | None = None, limit: int = 10) -> list[tuple]:
        """The newest ERROR rows: (symbol, session_date, error)."""
        k = self.key_column
        where = f"AND {k} = ANY(%(s)s)" if symbols else ""
        return self.c.execute(f"""SELECT {k}, session_date, error FROM {self.status_table}
                                   WHERE status = 'ERROR' {where}
                                   ORDER BY session_date DESC, {k} LIMIT %(n)s""",
                              {"s": list(symbols or []), "n": limit}).fetchall()
