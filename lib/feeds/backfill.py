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
* **Plan** (:func:`plan_sessions`, :func:`plan_range`, :func:`fetch_order`,
  :func:`request_chunks`): the days of the exchange calendar from the last finished session (its
  close + ``settle`` passed, or ``--to``) back to the earliest wanted date,
  newest first; weekdays without a session are recorded HOLIDAY without a
  request; sessions with a final status are skipped, ERROR ones too unless
  ``--retry-failed``; the sessions left are grouped into requests by the
  venue's rule (how a request's span is measured, which sessions may
  share one).  Jobs are fetched newest date first, then higher
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

* **Checks** (:class:`SessionCheck`): what a venue's ``check_session``
  returns (the rows to store, the first failure, bars dropped, the note of
  thin minutes), and :func:`session_status` reads.
* **The run** (:class:`BackfillRun`, :class:`RunSummary`): the database on
  one worker thread, the lock, the run log row (started, progress, the
  final counters and the ``summary:`` line), a signal or a failure ending
  the run with every committed session kept.  The venue's run does its
  requests in between.
* **Command line** (:func:`backfill_command`, :func:`selection_from_options`,
  :func:`apply_overrides`, :func:`print_status`, :func:`database_exit`,
  :class:`BackfillJob`, :func:`run_job`; :func:`parse_date`,
  :func:`parse_symbols`, :func:`format_status`, :func:`fmt_duration`): the
  options every backfill has (``--symbols``, ``--from/--to/--date``,
  ``--dry-run``, ``--retry-failed``, ``--priority-only``, ``--status``,
  ``--status-interval``, ``--unit``), the run as a service with its lock,
  heartbeat and node_exporter textfile, and the exit statuses 0, 1 and 75
  (:data:`EX_TEMPFAIL`: another run holds the lock).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import math
import os
import re
import shlex
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

from .config import EX_TEMPFAIL  # noqa: F401  (the venues' backfills import it from here)
from .calendars import ExchangeCalendar, Session

__all__ = ["STATUSES", "DONE_STATUSES", "Selection", "SessionPlan", "Plan", "StatusRow", "StatusStore",
           "SessionCheck", "RunSummary", "BackfillRun", "BackfillJob", "plan_sessions", "plan_range", "fetch_order",
           "session_status", "request_chunks", "calendar_span", "fmt_duration", "parse_date", "parse_symbols",
           "format_status", "calendar_days",
           "backfill_command", "selection_from_options", "apply_overrides", "print_status", "database_exit",
           "run_job", "EX_TEMPFAIL"]

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
    """One instrument's sessions between ``first`` and ``last``
    (:func:`plan_sessions`): ``sessions`` to request (newest first),
    ``holidays`` to record, counts of sessions already done and of ERROR
    ones skipped; ``error`` for an instrument the venue could not resolve
    (its sessions get the error, no request is sent).  Every field is a
    keyword: a venue's plan of one instrument (:class:`feeds.ibkr.backfill.ContractPlan`,
    :class:`feeds.dhan.history.InstrumentPlan`) puts its own fields first."""

    first: dt.date | None = field(default=None, kw_only=True)
    last: dt.date | None = field(default=None, kw_only=True)
    sessions: list[Session] = field(default_factory=list, kw_only=True)
    holidays: list[dt.date] = field(default_factory=list, kw_only=True)
    done: int = field(default=0, kw_only=True)
    skipped_errors: int = field(default=0, kw_only=True)
    error: str | None = field(default=None, kw_only=True)

    @property
    def requests(self) -> int:
        """Requests the plan sends: one a session, none for an instrument in error."""
        return 0 if self.error else len(self.sessions)


@dataclass
class Plan:
    """A run's plan: every selected instrument's :class:`SessionPlan` and the
    time the venue's request limits imply (``duration``, seconds)."""

    items: list[SessionPlan]
    duration: float = 0.0

    @property
    def requests(self) -> int:
        return sum(p.requests for p in self.items)

    @property
    def sessions(self) -> int:
        """Sessions to fetch (instruments in error left out)."""
        return sum(len(p.sessions) for p in self.items if not p.error)


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
                  finished: Iterable[tuple[str, dt.date]] = (), include_errors: bool = False,
                  out: SessionPlan | None = None) -> SessionPlan:
    """The sessions of ``symbol`` in ``[first, last]`` to fetch (newest
    first) and the holidays to record, given the stored ``statuses``
    (``{(symbol, day): StatusRow}``), added to ``out`` (default a new
    :class:`SessionPlan`), which is returned.  Sessions not yet opened at
    ``now`` are left out; so are those in ``finished`` (done by this run).
    ``include_errors`` plans ERROR sessions even without ``retry_failed``
    (the instrument itself is in error and the error goes on them)."""
    out = SessionPlan() if out is None else out
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


def calendar_span(newest: Session, oldest: Session) -> int:
    """Calendar days from ``oldest``'s date to ``newest``'s, both included."""
    return (newest.day - oldest.day).days + 1


def request_chunks(sessions: Sequence[Session], days: int, span: Callable[[Session, Session], int] = calendar_span,
                   adjacent: Callable[[Session, Session], bool] | None = None) -> list[list[Session]]:
    """Sessions to fetch (newest first) cut into requests, newest first,
    newest first inside; every session in exactly one request.

    The venue's rule: a session joins the request being built when
    ``span(newest of the request, the session)`` is at most ``days`` and,
    with ``adjacent``, ``adjacent(the session, the oldest of the request
    so far)`` (older first) is true; otherwise it starts the next request.  ``days`` 1
    with :func:`calendar_span`: one session a request."""
    out: list[list[Session]] = []
    for s in sessions:
        if out and span(out[-1][0], s) <= days and (adjacent is None or adjacent(s, out[-1][-1])):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def fetch_order(day: dt.date, priority: int, symbol: str) -> tuple:
    """Sort key of a job: newest date first, then higher priority, then symbol."""
    return (-day.toordinal(), -priority, symbol)


@dataclass
class SessionCheck:
    """The check of one fetched session: built by the venue's
    ``check_session`` (:func:`feeds.ibkr.bars.check_session`,
    :func:`feeds.dhan.history.check_session`), read by :func:`session_status`.

    ``rows``: tuples in the venue's bar-table column order, ready to store
    (empty when ``failure`` is set); ``first``/``last``: bar starts (UTC) of
    the stored rows; ``failure``: the first failed check (the session is
    ERROR); ``dropped``: starts of bars outside the session; ``expected``:
    the session's minutes; ``note``: the reasons stored with the session
    (thin minutes, dropped bars).
    """

    rows: list[tuple] = field(default_factory=list)
    first: dt.datetime | None = None
    last: dt.datetime | None = None
    failure: str | None = None
    dropped: list[dt.datetime] = field(default_factory=list)
    expected: int = 0
    note: str = ""

    @property
    def actual(self) -> int:
        return len(self.rows)

    def fail(self, reason: str) -> SessionCheck:
        """The whole answer is unusable: ``failure`` = ``reason``, no rows; returns self."""
        self.failure = reason
        self.rows = []
        self.first = self.last = None
        return self

    def finish(self, session: Session, start: int, bar: str, missing: str) -> SessionCheck:
        """After the last bar: ``first``/``last`` from column ``start`` of the
        rows, and the note: ``thin: N of M minutes without <missing> (first
        HH:MM)`` when minutes have no row, ``K <bar>(s) outside the session
        dropped (HH:MM, ...)`` when bars were dropped (times in the
        exchange's zone).  Returns self."""
        rows, tz = self.rows, session.tz
        if rows:
            self.first, self.last = rows[0][start], rows[-1][start]
        notes = []
        gaps = self.expected - len(rows)
        if rows and gaps > 0:
            have = {r[start] for r in rows}
            gap = next((session.open + dt.timedelta(minutes=i) for i in range(self.expected)
                        if session.open + dt.timedelta(minutes=i) not in have), None)
            notes.append(f"thin: {gaps} of {self.expected} minutes without {missing}"
                         + (f" (first {_hm(gap, tz)})" if gap else ""))
        if self.dropped:
            notes.append(f"{len(self.dropped)} {bar}(s) outside the session dropped ("
                         + ", ".join(_hm(t, tz) for t in self.dropped[:5])
                         + (", ..." if len(self.dropped) > 5 else "") + ")")
        self.note = "; ".join(notes)
        return self


def _hm(t: dt.datetime, tz) -> str:
    return t.astimezone(tz).strftime("%H:%M")


def session_status(chk: SessionCheck, session: Session, now: dt.datetime, settle: dt.timedelta,
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


# ------------------------------------------------------------------------ the run


@dataclass
class RunSummary:
    """Counters of one run, written to the venue's run log (``run_table``
    of :class:`StatusStore`); :meth:`line` is the run's last journal line.
    A venue adds its own counters and their words (:meth:`venue_parts`)."""

    #: statuses counted in the summary line, in this order
    line_statuses: ClassVar[tuple[str, ...]] = ("COMPLETE", "EARLY_CLOSE", "PARTIAL", "ERROR")

    run_id: int | None = None
    planned: int = 0
    done: int = 0
    left_pending: int = 0
    holidays: int = 0
    requests: int = 0
    bars: int = 0
    errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    elapsed: float = 0.0
    failed: str | None = None
    stopped: bool = False

    def venue_parts(self) -> list[str]:
        """The venue's counters in the summary line (after the bars stored)."""
        return []

    def ending(self) -> str:
        """How a run that did not fail ended: ``stopped`` or ``finished``."""
        return "stopped" if self.stopped else "finished"

    def line(self) -> str:
        """``summary: run 3 finished in 1m15s: 10 sessions planned, 9 done
        (COMPLETE 8, ERROR 1), 1 left PENDING, 0 HOLIDAY recorded, 11
        requests, 3,510 bars stored, ...`` (``FAILED (why)`` when it failed)."""
        st = ", ".join(f"{k} {self.statuses[k]}" for k in self.line_statuses if self.statuses[k])
        parts = [f"{self.planned} sessions planned, {self.done} done" + (f" ({st})" if st else ""),
                 f"{self.left_pending} left PENDING", f"{self.holidays} HOLIDAY recorded",
                 f"{self.requests} requests", f"{self.bars:,} bars stored", *self.venue_parts()]
        head = f"run {self.run_id} " if self.run_id is not None else ""
        state = f"FAILED ({self.failed})" if self.failed else self.ending()
        return f"summary: {head}{state} in {fmt_duration(self.elapsed)}: " + ", ".join(parts)


class BackfillRun:
    """What every venue's run does the same way around its requests: the
    database on one worker thread (the store is used from it only), the
    sessions planned and finished, the run log row (start, progress every
    ``periodic`` call, the final counters and summary line), the advisory
    lock and the end of a run.

    A venue sets ``log`` (its module's logger), ``program`` (the command's
    name), ``lock_error`` (raised when another run holds the lock),
    ``db_thread`` (the worker thread's name) and, in :meth:`settle` and
    :meth:`disconnect`, what it does at the end.
    """

    log = logging.getLogger(__name__)
    program = "feed-backfill"
    lock_error: type[Exception] = RuntimeError
    db_thread = "backfill-db"
    #: failures that end a run with their message only (no traceback)
    known_failures: tuple[type[Exception], ...] = ()

    def __init__(self, store: StatusStore, summary: RunSummary, notifier=None,
                 now: Callable[[], dt.datetime] | None = None):
        self.store = store
        self.summary = summary
        self.now = now or (lambda: dt.datetime.now(dt.timezone.utc))
        if notifier is None:
            from .runtime import sd_notifier
            notifier = sd_notifier()
        self.notifier = notifier
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._planned: set[tuple[str, dt.date]] = set()
        self._finished: set[tuple[str, dt.date]] = set()
        self._stop = asyncio.Event()
        self._total = 0
        self._t0 = time.monotonic()
        self._run_log: asyncio.Future | None = None

    async def _db(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the database thread."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.db_thread)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _shutdown_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _finish(self, key: str, day: dt.date, status: str) -> None:
        """The session ``(key, day)`` is done for this run with ``status``."""
        self._finished.add((key, day))
        self.summary.done += 1
        self.summary.statuses[status] += 1

    async def _begin(self, arguments: str, client_id=None) -> None:
        """Connect, take the lock (raises ``lock_error`` when another run
        holds it, with everything closed) and start the run log row."""
        self._t0 = time.monotonic()
        self._stop = asyncio.Event()
        await self._db(self.store.connect)
        if not await self._db(self.store.try_lock):
            await self._db(self.store.close)
            self._shutdown_executor()
            raise self.lock_error(f"another {self.program} is running (database advisory lock held)")
        self.summary.run_id = await self._db(self.store.start_run, arguments, client_id)

    async def _guarded(self, work: Awaitable, failure: str) -> None:
        """Await ``work`` and then end the run (:meth:`_end`) whatever
        happened: a ``known_failures`` exception or any other one (logged
        with ``failure`` and its traceback) fails the run, a cancellation
        (SIGTERM/SIGINT) stops it; every committed session stays."""
        sm = self.summary
        try:
            await work
        except self.known_failures as e:
            sm.failed = str(e)
            self.log.error("%s", e)
        except asyncio.CancelledError:  # SIGTERM/SIGINT: every committed session stays; the next run goes on
            sm.stopped = True
            self.log.info("stopped by a signal; the next run goes on from the status table")
        except Exception as e:  # database or client failure: say what, leave the rest to the next run
            sm.failed = f"{type(e).__name__}: {e}".strip()
            self.log.exception(failure)
        finally:
            await self._end()

    def settle(self) -> None:
        """The venue's last word on the summary before its line is written
        (why it failed, counters kept elsewhere)."""

    async def disconnect(self) -> None:
        """Close the venue's connection at the end of a run."""

    def run_counts(self, final: bool = False) -> dict:
        """The run log columns written every ``periodic`` call and, with
        ``final``, at the end."""
        sm = self.summary
        return dict(sessions_planned=sm.planned, sessions_done=sm.done, requests=sm.requests, bars_stored=sm.bars,
                    errors=sm.errors)

    async def _end(self) -> None:
        sm = self.summary
        self._stop.set()
        if self._run_log is not None:
            await asyncio.gather(self._run_log, return_exceptions=True)
        sm.left_pending = len(self._planned - self._finished)
        self.settle()
        sm.elapsed = time.monotonic() - self._t0
        line = sm.line()
        self.log.info("%s", line)
        self.notifier.notify("STATUS=" + line[:1000])
        try:
            state = "failed" if sm.failed else ("interrupted" if sm.stopped else "finished")
            await self._db(self.store.update_run, sm.run_id, finished=True, state=state,
                           **self.run_counts(final=True), summary=line)
        except Exception as e:  # the summary line above already says what happened
            self.log.error("run log not updated: %s", e)
        await self.disconnect()
        try:
            await self._db(self.store.close)   # also releases the advisory lock
        except Exception as e:
            self.log.warning("database connection not closed cleanly: %s", e)
        self._shutdown_executor()

    def periodic(self) -> None:
        """Write the progress counters to this run's run log row (in the
        background; skipped while the previous write runs)."""
        if self.summary.run_id is None or self._stop.is_set():
            return
        if self._run_log is None or self._run_log.done():
            self._run_log = asyncio.ensure_future(self._write_progress())

    async def _write_progress(self) -> None:
        if self._stop.is_set():             # the run's own last write follows
            return
        try:
            await self._db(self.store.update_run, self.summary.run_id, **self.run_counts())
        except Exception as e:
            self.log.warning("run log not updated: %s", e)


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


def format_status(rows: list[dict], errors: list[tuple], last_run: tuple | None, width: int = 10,
                  heartbeat: tuple | None = None, now: dt.datetime | None = None) -> str:
    """The ``--status`` table (rows of :meth:`StatusStore.summary`), the
    latest errors and the last run (:meth:`StatusStore.last_run`) with the
    rate it achieved (requests per minute from its start to its end, or to
    ``now`` while it runs); while it runs, also the service's own status
    line from ``heartbeat`` (``(state, status, updated_at)`` of its
    ``feed_heartbeat`` row: for a backfill the progress line, with the
    pacing in force, the requests in flight and the current rate) and how
    old that row is."""
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
        now = now or dt.datetime.now(dt.timezone.utc)
        minutes = ((finished or now) - started).total_seconds() / 60
        rate = f" ({requests / minutes:.1f}/min)" if minutes > 0 else ""
        out.append(f"last run {run_id}: {state}, started {started:%Y-%m-%d %H:%M:%S %Z}"
                   + (f", finished {finished:%H:%M:%S}" if finished else "")
                   + f"; {requests} requests{rate}, {bars:,} bars, {errs} errors")
        if state == "running" and heartbeat is not None and heartbeat[0] != "stopped":
            age = fmt_duration(max(0.0, (now - heartbeat[2]).total_seconds()))
            out.append(f"now ({heartbeat[0]}, heartbeat {age} ago): {heartbeat[1]}")
    return "\n".join(out)



def backfill_command(*, config_env: str, config_default: str, symbols_help: str, priority_help: str,
                     status_help: str, status_interval_help: str, unit: str, options: Sequence = ()):
    """Decorator making a venue's ``main`` its click command, with the
    options every backfill has: ``--config`` (from ``config_env``, default
    ``config_default``), ``--symbols``, ``--from``, ``--to``, ``--date``,
    ``--dry-run``, ``--retry-failed``, ``--priority-only``, ``--status``;
    then the venue's ``options`` (``click.option`` decorators, in order);
    then ``--status-interval``, ``--unit`` (from ``FEEDS_UNIT``, default
    ``unit``) and the symbols after ``--symbols`` (``more_symbols``).  A
    ``ConfigError`` exits 78 (:func:`feeds.config.exit_on_config_error`)."""
    import click

    from .config import exit_on_config_error

    head = [
        click.option("--config", "config_path", envvar=config_env, default=config_default, show_default=True,
                     help="TOML configuration file."),
        click.option("--symbols", "symbols", default=None, metavar="SYM [SYM ...]", help=symbols_help),
        click.option("--from", "from_", default=None, metavar="DATE",
                     help="First session: YYYY-MM-DD or Nd (days back)."),
        click.option("--to", "to", default=None, metavar="DATE", help="Last session: YYYY-MM-DD or Nd (days back)."),
        click.option("--date", "date", default=None, metavar="DATE", help="Exactly this session (YYYY-MM-DD or Nd)."),
        click.option("--dry-run", is_flag=True, help="Print the plan (nothing fetched, nothing written)."),
        click.option("--retry-failed", is_flag=True, help="Also request sessions recorded as ERROR."),
        click.option("--priority-only", is_flag=True, help=priority_help),
        click.option("--status", "status", is_flag=True, help=status_help),
    ]
    tail = [
        click.option("--status-interval", type=float, default=None, help=status_interval_help),
        click.option("--unit", envvar="FEEDS_UNIT", default=unit, show_default=True,
                     help="Name used for the heartbeat row."),
        click.argument("more_symbols", nargs=-1, metavar=""),
    ]

    def wrap(fn):
        f = exit_on_config_error(fn)
        for deco in reversed([*head, *options, *tail]):
            f = deco(f)
        return click.command(context_settings={"help_option_names": ["-h", "--help"]})(f)
    return wrap


def apply_overrides(settings, *, scale: float | None, scale_attr: str, scale_option: str,
                    status_interval: float | None) -> None:
    """Set the command line's scale (``scale_attr`` of ``settings``: 0 <
    scale <= 1) and ``status_interval`` (> 0) when given.  Raises
    ``click.BadParameter`` naming the option."""
    import click

    if scale is not None:
        if not 0 < scale <= 1:
            raise click.BadParameter("must be > 0 and <= 1", param_hint=scale_option)
        setattr(settings, scale_attr, scale)
    if status_interval is not None:
        if status_interval <= 0:
            raise click.BadParameter("must be > 0", param_hint="--status-interval")
        settings.status_interval = status_interval


def selection_from_options(symbols: str | None, more_symbols: tuple[str, ...], from_: str | None, to: str | None,
                           date: str | None, retry_failed: bool, priority_only: bool, known: set[str],
                           source: str, today: dt.date | None = None) -> Selection:
    """The :class:`Selection` of the command line (``--symbols``, ``--from``,
    ``--to``, ``--date``, ``--retry-failed``, ``--priority-only``; dates
    relative to ``today``, default the local date).  Raises
    ``click.UsageError``/``BadParameter``: ``--date`` with ``--from``/``--to``,
    ``--from`` after ``--to``, a symbol not in ``known`` (the instruments of
    the file ``source``)."""
    import click

    today = today or dt.date.today()
    sym_list = parse_symbols(symbols, more_symbols)
    if date is not None and (from_ is not None or to is not None):
        raise click.UsageError("--date excludes --from/--to")
    first, last = parse_date(from_, "--from", today), parse_date(to, "--to", today)
    if date is not None:
        first = last = parse_date(date, "--date", today)
    if first and last and first > last:
        raise click.BadParameter(f"--from {first} is after --to {last}", param_hint="--from")
    if sym_list:
        unknown = [s for s in sym_list if s not in known]
        if unknown:
            raise click.BadParameter(f"not in {source}: {', '.join(unknown)}", param_hint="--symbols")
    return Selection(symbols=sym_list, first=first, last=last, retry_failed=retry_failed,
                     priority_only=priority_only)


def print_status(store: StatusStore, symbols: Sequence[str] | None, error_symbols: Sequence[str] | None,
                 width: int = 10, unit: str | None = None) -> None:
    """``--status``: the summary of ``symbols`` (None: all), the latest
    errors of ``error_symbols``, the last run and, while it runs, the
    heartbeat of ``unit`` (:func:`format_status`), on stdout.  Raises
    ``psycopg.Error``."""
    import click

    store.connect()
    try:
        click.echo(format_status(store.summary(symbols), store.last_errors(error_symbols), store.last_run(),
                                 width=width, heartbeat=store.heartbeat(unit) if unit else None))
    finally:
        store.close()


@contextlib.contextmanager
def database_exit(log: logging.Logger):
    """Around a command's work: a database that cannot be reached logs one
    line (``cannot connect to the database: ...``) and exits 1."""
    import psycopg

    try:
        yield
    except psycopg.OperationalError as e:
        log.error("cannot connect to the database: %s", str(e).strip().splitlines()[0] if str(e).strip() else e)
        sys.exit(1)


class BackfillJob:
    """One backfill run as a collector of :mod:`feeds.service`: the runtime
    gives it signals, STATUS= (the progress line), the heartbeat row and the
    clean stop.  ``bf`` is the venue's run (``run(sel, arguments)``,
    ``figures()``, ``periodic()``, ``progress_line()``, ``summary``).
    ``run`` returns 0 (finished or stopped by a signal), 1 (the run could
    not finish) or the status ``failures`` gives the exception raised.

    A venue sets ``log``, ``failures`` (``(exception class, log format,
    exit status)``, the first match wins) and ``early_stop`` (logged when a
    signal stops the job before the run started; None: nothing)."""

    log = logging.getLogger(__name__)
    failures: tuple[tuple[type[Exception], str, int], ...] = ()
    early_stop: str | None = None

    def __init__(self, bf, sel: Selection, arguments: str):
        self.bf, self.sel, self.arguments = bf, sel, arguments

    def work(self) -> Awaitable:
        """The run itself."""
        return self.bf.run(self.sel, self.arguments)

    async def run(self, stop: asyncio.Event) -> int:
        work = asyncio.ensure_future(self.work())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not work.done():
            work.cancel()           # the run writes its summary, then returns it
        try:
            summary = await work
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            if self.early_stop:
                self.log.info("%s", self.early_stop)
            return 0
        except Exception as e:
            for cls, fmt, rc in self.failures:
                if isinstance(e, cls):
                    self.log.error(fmt, e)
                    return rc
            raise
        return 1 if summary.failed else 0

    def stream_kind(self, stream: str) -> str:
        return stream

    def figures(self) -> dict[str, int]:
        return self.bf.figures()

    def periodic(self) -> None:
        self.bf.periodic()

    def status_line(self) -> str:
        return self.bf.progress_line()


def run_job(store: StatusStore, *, unit: str, status_interval: float, make_job: Callable,
            run_metrics: Callable, textfile_dir: str, job_name: str, log: logging.Logger) -> NoReturn:
    """Run one backfill as a service and exit with its status.

    The lock first (the run takes it again on the same connection): a
    second run must not touch the running one's heartbeat row nor its
    textfile; it exits 75 with one line naming the command (the store's
    ``application_name``) on ``log``.  Then ``make_job(health,
    arguments)`` (the :class:`BackfillJob`; ``health`` gets the STATUS=
    lines, ``arguments`` is the command line) runs under
    :class:`feeds.service.Service` (``unit``, ``status_interval``); the
    node_exporter textfile ``feeds_<job_name>.prom`` gets
    ``run_metrics(job or None, started, rc)``, also when the database
    cannot be reached (rc 1, ``psycopg.OperationalError`` raised on)."""
    import psycopg

    from . import service
    from .ops.metrics import write_textfile

    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.time()
    jobs: list[BackfillJob] = []
    try:
        locked = store.connect().try_lock()
    except psycopg.OperationalError:
        write_textfile(textfile_dir, job_name, run_metrics(None, started, 1))
        raise
    if not locked:
        store.close()
        log.error("another %s is running (database advisory lock held)", store.application_name)
        sys.exit(EX_TEMPFAIL)
    svc = service.Service(unit, store.dsn, status_interval=status_interval)

    def prepare(svc: service.Service) -> BackfillJob:
        jobs.append(make_job(svc.health, args))
        return jobs[-1]
    rc = 1
    try:
        rc = svc.run(prepare)
    finally:
        store.close()
        # the node_exporter textfile (metrics.textfile_dir): the run's outcome and figures
        write_textfile(textfile_dir, job_name, run_metrics(jobs[-1] if jobs else None, started, rc))
    sys.exit(rc)


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

    def heartbeat(self, unit: str) -> tuple | None:
        """(state, status, updated_at) of ``unit``'s ``feed_heartbeat`` row, or None."""
        return self.c.execute("SELECT state, status, updated_at FROM feed_heartbeat WHERE unit = %s",
                              (unit,)).fetchone()

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

    def recent_requests(self, seconds: float) -> list[tuple[str, dt.date, dt.date, float]]:
        """Requests sent in the last ``seconds`` (by any run), one per
        request: ``(symbol, oldest session_date, newest session_date, age
        in seconds)``, oldest first.  The sessions of one request share
        their ``requested_at`` (noted in one transaction), so the two dates
        are the span the request covered.  The age counts from the answer
        (the rows' last update) when there was one, as the pacing limiter
        counts an answered request: an upper bound of when the venue read
        it (``requested_at``, noted just after sending, may precede the
        venue's reading by the time it takes to read a burst)."""
        return [(r[0], r[1], r[2], float(r[3])) for r in self.c.execute(
            f"""SELECT {self.key_column}, min(session_date), max(session_date),
                       extract(epoch FROM now() - max(GREATEST(requested_at, updated_at))) AS age
                  FROM {self.status_table}
                 WHERE requested_at > now() - make_interval(secs => %s)
                 GROUP BY {self.key_column}, requested_at
                 ORDER BY age DESC""",
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
