"""The IBKR one-minute backfill: plan, fetch, check, store; resumable.

Unit of work: one exchange session of one contract.  A
``reqHistoricalData`` request (TWS API "Historical Bar Data") covers one
session or, with ``days_per_request`` > 1, up to that many sessions on
consecutive weekdays, never across a weekend or a holiday
(:func:`feeds.ibkr.sessions.request_chunks`): ``endDateTime`` = the newest
session's close as ``yyyymmdd-hh:mm:ss`` UTC, ``durationStr`` ``"N D"``
(N = the request's sessions, which is also its calendar days and its
weekdays: :func:`~feeds.ibkr.sessions.duration_days`; ``"1 D"`` for one
session), ``barSizeSetting`` ``"1 min"``, ``whatToShow`` TRADES,
``useRTH`` 1, ``formatDate`` 2 (epoch seconds, so bar times are UTC
without any time-zone guessing).  The answer is split by the bars'
local date into its sessions; each is checked (:mod:`feeds.ibkr.bars`)
and its bars and status row are committed in one transaction
(:mod:`feeds.ibkr.store`), exactly as for a one-session request, so a
crash or ``kill -9`` never leaves half a day and a new run starts from the
status table: no completed session is requested again.

Plan (:meth:`Backfill.plan`, with the planner shared with feed-dhan-backfill:
:mod:`feeds.backfill`): for each STK/IND contract of the contracts
file (FUT and OPT rows are validated and skipped), every weekday from the
last finished session (close + ``settle`` passed; or ``--to``) back to IB's
head timestamp (``reqHeadTimeStamp``, cached in ``ibkr_contract``), to
``--from`` or to the configured ``earliest`` date, whichever is latest.
Holidays of the contract's exchange calendar are recorded HOLIDAY without a
request.  Sessions already COMPLETE, EARLY_CLOSE or HOLIDAY are skipped,
ERROR ones too unless ``--retry-failed``; PENDING, PARTIAL and new ones are
fetched, newest date first (then higher priority, then symbol) so that the
nightly top-up lands first and requests for one contract are spread out.

Requests go through one :class:`~feeds.ibkr.pacing.PacingLimiter`
(:func:`pacing_limiter`: the configured profile); as many workers as it
ever lets be open (``max_in_flight``, at most 50, IB's limit).  Each
answer or error is reported to it the moment it arrives (``finish``, from
the request's done callback, before the session is stored; a timeout as
``cancelled``), so that a pacing refusal holds back the next request.
Under ``auto`` it starts from what an earlier run learned for this TWS
(``host:port``) and bar size, kept in
``ibkr_pacing_learned`` (:meth:`BackfillStore.learned_pacing
<feeds.ibkr.store.BackfillStore.learned_pacing>`), and every new learning
is stored there by the database thread.  With ``pacing_scale`` other
than 1 (a simulator with scaled windows) nothing learned is loaded or
stored, since it would describe the simulator, not IB (one log line says
so), unless ``keep_learned_when_scaled`` asks for it (simulator tests).

Pacing after a restart: the requests earlier runs sent within the last
window (``requested_at`` of the status table) are counted by the limiter
before the first request, each with the identical-request key of the
request as sent (its ``endDateTime`` and ``durationStr`` rebuilt from the
first and last session it covered), so IB's 15-second identical-request
rule holds across a restart whatever ``days_per_request``.

Errors: ib_async returns an empty list when a request fails unless errors
are watched.  Here ``RaiseRequestErrors`` is on, so a failed request raises
``RequestError(reqId, code, text)`` into the worker that sent it, and
``errorEvent`` is watched for everything else.  Every error is recorded
against its session:

* 162 pacing violation: the limiter pauses (back-off), the session stays
  PENDING with the error text and is retried;
* 162 query cancelled, 322, 366, 10182, a timeout or a lost connection:
  transient, PENDING, retried (at most ``max_attempts`` times a run);
* 162 "HMDS query returned no data", 200, 354, 321 and any other error:
  ERROR with IB's code and text, fetched again only with ``--retry-failed``.

An error never marks a session HOLIDAY or COMPLETE.  Errors of contract
resolution (200 for an unknown contract, 354 not subscribed) are recorded
as ERROR on the contract's sessions of an explicit ``--from``/``--date``
range, or on its newest planned session, while the other contracts go on.

Connection: ``connectAsync(readonly=True)`` with a unique clientId (the
configured one; on error 326 "client id is already in use" the next ones are
tried).  On a socket loss the workers stop taking sessions, the run
reconnects with exponential back-off (for at most ``reconnect_timeout``
seconds), re-reads the status table and goes on.  1100 (IB-TWS connectivity
lost) pauses new requests until 1101 or 1102; 1101 ("data lost") also
re-sends the requests that were open.  2104, 2106, 2158 and the other 21xx
codes are information, logged, not counted as errors.

Progress: :meth:`Backfill.progress_line` (sessions done/total, requests,
bars, ETA from the pacing rules, the pacing profile in force, requests in
flight and the rate) and :meth:`Backfill.figures`, which the
runtime (:mod:`feeds.service`) shows every ``status_interval`` seconds in
the journal, sd_notify ``STATUS=`` and the heartbeat row;
:meth:`Backfill.periodic` writes the counters to the run log.  A final
``summary:`` line ends the run.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ib_async import IB, Contract
from ib_async.wrapper import RequestError

from .. import backfill as B
from ..backfill import (BackfillRun, Plan, Selection, SessionPlan, fetch_order, fmt_duration, plan_range,
                        plan_sessions, session_status)
from .bars import check_session
from .connect import ConnectFailed, connect_ib
from .contracts import ContractRow, fetchable, request_details
from .pacing import (AUTO, DEFAULT_MAX_CONCURRENCY, DEFAULT_RELEARN, DEFAULT_SLOW_ANSWER, LearnedPacing, PacingLimiter,
                     is_pacing_violation, is_query_cancelled)
from .sessions import Session, SessionCalendar, duration_str, request_chunks
from .store import BackfillStore
from .wire import keep_wire_text

log = logging.getLogger(__name__)

__all__ = ["Settings", "Selection", "Backfill", "RunSummary", "ContractPlan", "Plan", "BackfillFailed",
           "fmt_duration", "INFO_CODES", "TRANSIENT_CODES", "pacing_limiter", "BAR_SIZE"]

BAR_SIZE = "1 min"
FORMAT_DATE = 2
#: Codes that are information, not errors (data farm connection notices and other 21xx).
INFO_CODES = frozenset({2104, 2106, 2107, 2108, 2119, 2158, 2174})
#: Request errors after which the session is simply requested again.
TRANSIENT_CODES = frozenset({322, 366, 502, 504, 1100, 10182})
_CONN_CODES = {1100, 1101, 1102, 1300}


class BackfillFailed(Exception):
    """The run cannot go on (no connection within the reconnect budget,
    database failure)."""


class _DataLost(ConnectionError):
    """IB reported 1101: open requests will not be answered."""


@dataclass
class Settings:
    """Run settings (``[ibkr]`` and ``[backfill]`` of ibkr.toml).

    Times in seconds unless said otherwise; ``settle``: how long after a
    session's close its bars are considered final; ``earliest``: never plan
    before this date; ``pacing_profile``, ``concurrency``,
    ``max_concurrency``, ``slow_answer``, ``relearn``: the limiter's (see
    :class:`~feeds.ibkr.pacing.PacingLimiter`); ``days_per_request``:
    sessions one request covers at most, on consecutive weekdays
    (1..:data:`~feeds.ibkr.pacing.MAX_DAYS_PER_REQUEST`);
    ``keep_learned_when_scaled``: load and store what ``auto`` learns even
    when ``pacing_scale`` is not 1 (for tests against a simulator; the
    endpoint is then the simulator's).
    """

    host: str = "127.0.0.1"
    port: int = 7497
    client_id: int = 71
    client_id_tries: int = 5
    connect_timeout: float = 15.0
    request_timeout: float = 120.0
    concurrency: int = 4
    max_attempts: int = 4
    reconnect_timeout: float = 600.0
    what_to_show: str = "TRADES"
    use_rth: bool = True
    settle: dt.timedelta = dt.timedelta(minutes=30)
    status_interval: float = 30.0
    pacing_scale: float = 1.0
    earliest: dt.date | None = None
    pacing_profile: str = AUTO
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    slow_answer: float = DEFAULT_SLOW_ANSWER
    relearn: float = DEFAULT_RELEARN
    days_per_request: int = 1
    keep_learned_when_scaled: bool = False

    @property
    def keeps_learned(self) -> bool:
        """Whether what ``auto`` learns is loaded and stored: at IB's own
        windows (``pacing_scale`` 1), or when ``keep_learned_when_scaled``."""
        return self.pacing_scale == 1.0 or self.keep_learned_when_scaled

    @property
    def endpoint(self) -> str:
        """TWS / IB Gateway as ``host:port`` (the key of what pacing learned)."""
        return f"{self.host}:{self.port}"


def pacing_limiter(s: Settings, **kw) -> PacingLimiter:
    """The limiter of ``s`` (profile, concurrency, ceiling, slow answer,
    relearn, scale) for one-minute bars; ``kw`` goes to
    :class:`~feeds.ibkr.pacing.PacingLimiter` (``keep_history``, clocks).
    Raises ValueError as it does (e.g. ``concurrency`` above
    ``max_concurrency`` under ``auto``)."""
    return PacingLimiter(scale=s.pacing_scale, profile=s.pacing_profile, concurrency=s.concurrency,
                         max_concurrency=s.max_concurrency, slow_answer=s.slow_answer, relearn=s.relearn,
                         bar_size=BAR_SIZE, **kw)


@dataclass
class _Resolved:
    row: ContractRow
    contract: Contract | None = None
    con_id: int | None = None
    time_zone: str | None = None
    head: dt.datetime | None = None
    error: str | None = None
    head_known: bool = True


@dataclass
class ContractPlan(SessionPlan):
    """The plan for one contract (:class:`feeds.backfill.SessionPlan`: the
    date range, sessions to request, holidays to record, counts, ``error``
    for an unresolvable contract) with its row, conId and head timestamp."""

    row: ContractRow
    con_id: int | None
    head: dt.datetime | None
    head_known: bool = True


@dataclass
class _Job:
    """One request: ``sessions`` of one contract, newest first."""

    res: _Resolved
    sessions: list[Session]
    priority: int
    attempts: int = 0

    @property
    def session(self) -> Session:
        """The newest session (the request ends at its close)."""
        return self.sessions[0]

    @property
    def keys(self) -> list[tuple[str, dt.date]]:
        return [(self.res.row.symbol, s.day) for s in self.sessions]

    @property
    def label(self) -> str:
        """``AAPL 2024-01-05`` or ``AAPL 2024-01-02..2024-01-05``."""
        days = f"{self.sessions[-1].day}..{self.sessions[0].day}" if len(self.sessions) > 1 else str(self.session.day)
        return f"{self.res.row.symbol} {days}"


@dataclass
class RunSummary(B.RunSummary):
    """Counters of one run (also written to ``ibkr_backfill_run``)."""

    pacing_violations: int = 0
    reconnects: int = 0
    connectivity_losses: int = 0
    contract_errors: dict[str, str] = field(default_factory=dict)
    request_times: list[float] = field(default_factory=list)

    def venue_parts(self) -> list[str]:
        return [f"{self.errors} IB errors", f"{self.pacing_violations} pacing violations",
                f"{self.reconnects} reconnects"]


class _Outcome:
    """Reports one request's outcome to the limiter the moment it arrives
    (the done callback of the request's future), not when the worker that
    sent it runs again after its database work: a pacing refusal stops new
    requests at once, and the answer time ``auto`` judges is IB's, not our
    database queue's.  An answer or an IB error goes to
    :meth:`~feeds.ibkr.pacing.PacingLimiter.finish` (``pause``: the pause a
    pacing violation caused, seconds); a lost connection or a cancelled wait
    (timeout, stop) only releases the ticket."""

    __slots__ = ("limiter", "ticket", "pause")

    def __init__(self, limiter: PacingLimiter, ticket) -> None:
        self.limiter, self.ticket, self.pause = limiter, ticket, 0.0

    def __call__(self, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or (exc is not None and not isinstance(exc, RequestError)):
            self.limiter.release(self.ticket)
        elif exc is None:
            self.limiter.finish(self.ticket)
        else:
            self.pause = self.limiter.finish(self.ticket, exc.code, exc.message)


def _utc_end(t: dt.datetime) -> str:
    """TWS API explicit UTC form ``yyyymmdd-hh:mm:ss``."""
    return t.astimezone(dt.timezone.utc).strftime("%Y%m%d-%H:%M:%S")


class Backfill(BackfillRun):
    """One feed-backfill run (the run log, the lock and the end of a run:
    :class:`feeds.backfill.BackfillRun`).

    Args:
        settings: :class:`Settings`.
        contracts: rows of the contracts file.
        store: a :class:`~feeds.ibkr.store.BackfillStore` (used from one
            worker thread only).
        limiter: the pacing limiter (default: :func:`pacing_limiter`); its
            ``on_learn``, when unset, stores what it learns.
        notifier: object with ``notify(str)`` for sd_notify (default: the
            process's, :func:`feeds.runtime.sd_notifier`).
        now: returns the current time (aware); default UTC wall clock.

    :meth:`run` fetches; :meth:`dry_run` only plans.  Raises
    :class:`BackfillFailed` when the run cannot go on.
    """

    log = log
    program = "feed-backfill"
    lock_error = BackfillFailed
    known_failures = (BackfillFailed,)

    def __init__(self, settings: Settings, contracts: Sequence[ContractRow], store: BackfillStore, *,
                 limiter: PacingLimiter | None = None, notifier=None,
                 now: Callable[[], dt.datetime] | None = None):
        super().__init__(store, RunSummary(), notifier, now)
        self.s = settings
        self.rows = list(contracts)
        self.limiter = limiter or pacing_limiter(settings)
        if self.limiter.on_learn is None and settings.keeps_learned:
            self.limiter.on_learn = self._save_learned
        self._learn_saves: set[asyncio.Future] = set()
        self._calendars: dict[str, SessionCalendar] = {}
        self.ib: IB | None = None
        self.client_id: int | None = None
        self._resolved: dict[str, _Resolved] = {}
        self._queue: deque[_Job] = deque()
        self._attempts: dict[tuple[str, dt.date], int] = {}
        self._inflight: dict[int, tuple[_Job, asyncio.Future]] = {}
        self._busy = 0
        self._active: set[tuple[str, dt.date]] = set()
        self._link_up = False
        self._ib_ok = True
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._changed = asyncio.Event()
        self._selection = Selection()

    # ------------------------------------------------------------ helpers
    def calendar(self, name: str) -> SessionCalendar:
        """The (cached) :class:`SessionCalendar` called ``name``."""
        cal = self._calendars.get(name)
        if cal is None:
            cal = self._calendars[name] = SessionCalendar(name)
        return cal

    def _selected(self, sel: Selection) -> list[ContractRow]:
        return fetchable(self.rows, sel.symbols, verb="fetched",
                         keep=(lambda r: r.priority > 0) if sel.priority_only else None)

    def _set_ready(self) -> None:
        if self._link_up and self._ib_ok:
            self._ready.set()
        else:
            self._ready.clear()

    # --------------------------------------------------------- connection
    async def connect(self, attempts_deadline: float | None = None) -> IB:
        """Connect (read-only, no start-up account/order fetches) with a
        unique clientId; retries with back-off until ``attempts_deadline``
        (monotonic; default now + reconnect_timeout).  Raises
        :class:`BackfillFailed`, and :class:`feeds.ibkr.wire.WireVersionError`
        when the installed ib_async is not the one the bar decoder patch
        was written for."""
        deadline = attempts_deadline if attempts_deadline is not None else time.monotonic() + self.s.reconnect_timeout
        try:
            # keep_wire_text before any socket: a WireVersionError leaves nothing open
            ib, cid = await connect_ib(self.s.host, self.s.port, self.s.client_id, tries=self.s.client_id_tries,
                                       timeout=self.s.connect_timeout, deadline=deadline, prepare=keep_wire_text)
        except ConnectFailed as e:
            raise BackfillFailed(str(e)) from None
        self._attach(ib, cid)
        return ib

    def _attach(self, ib: IB, cid: int) -> None:
        ib.errorEvent += self._on_error
        ib.disconnectedEvent += lambda ib=ib: self._on_disconnect(ib)
        self.ib = ib
        self.client_id = cid
        self._link_up = True
        self._ib_ok = True
        self._lost.clear()
        self._set_ready()
        log.info("connected to %s:%d clientId %d server version %d accounts %s", self.s.host, self.s.port, cid,
                 ib.client.serverVersion(), ",".join(ib.client.getAccounts()) or "-")

    def _on_disconnect(self, ib: IB) -> None:
        if ib is not self.ib or not self._link_up or self._stop.is_set():
            return
        self._link_up = False
        self._set_ready()
        self._lost.set()
        self._changed.set()
        log.warning("connection to %s:%d lost", self.s.host, self.s.port)

    def _on_error(self, req_id: int, code: int, text: str, contract) -> None:
        if code in INFO_CODES or 2100 <= code < 2200:
            log.info("IB notice %d: %s", code, text)
            return
        if code == 1100:
            self.summary.connectivity_losses += 1
            self._ib_ok = False
            self._set_ready()
            log.warning("IB error 1100: %s: new requests wait for 1101/1102", text)
            return
        if code in (1101, 1102):
            self._ib_ok = True
            self._set_ready()
            if code == 1101:
                n = 0
                for rid, (_job, fut) in list(self._inflight.items()):
                    if not fut.done():
                        fut.set_exception(_DataLost(f"IB 1101: {text}"))
                        if self.ib is not None and self.ib.isConnected():
                            self.ib.client.cancelHistoricalData(rid)
                        n += 1
                log.warning("IB 1101: %s: %d open requests will be sent again", text, n)
            else:
                log.info("IB 1102: %s", text)
            return
        self.summary.errors += 1
        job = self._inflight.get(req_id, (None, None))[0]
        if job is not None:
            log.info("IB error %d for %s %s reqId %d: %s", code, job.res.row.symbol, job.session.day, req_id, text)
        else:
            log.warning("IB error %d reqId %d: %s", code, req_id, text)

    # ------------------------------------------------------- resolution
    async def _resolve(self, row: ContractRow, cached: dict) -> _Resolved:
        """Contract details and head timestamp, from IB (cached in ibkr_contract)."""
        got = self._resolved.get(row.symbol)
        if got is not None and got.error is None:
            return got
        assert self.ib is not None
        ib = self.ib
        res = _Resolved(row)
        got = await request_details(ib, row, self.s.request_timeout)
        res.error = got.error
        if got.details is not None:
            res.contract = got.details.contract
            res.con_id = res.contract.conId
            res.time_zone = got.details.timeZoneId or None
        if res.error is None:
            con_id, head = cached.get(row.symbol, (None, None))
            if head is not None and con_id == res.con_id:
                res.head = head
            else:
                try:
                    h = await asyncio.wait_for(
                        ib.reqHeadTimeStampAsync(res.contract, self.s.what_to_show, self.s.use_rth, FORMAT_DATE),
                        self.s.request_timeout)
                except RequestError as e:
                    res.error = f"IB error {e.code}: {e.message}"
                else:
                    if not isinstance(h, dt.datetime):
                        res.error = f"head timestamp not understood: {h!r}"
                    else:
                        res.head = h if h.tzinfo else h.replace(tzinfo=dt.timezone.utc)
        if res.error:
            log.error("contract %s (line %d): %s", row.symbol, row.line, res.error)
        else:
            log.info("contract %s conId %s %s/%s %s head timestamp %s", row.symbol, res.con_id, row.exchange,
                     row.primary_exchange or "-", res.time_zone or "-", res.head.isoformat() if res.head else "-")
        await self._db(self.store.save_contract, row.symbol, res.con_id, row.sec_type, row.exchange,
                       row.primary_exchange, row.currency, res.time_zone, row.calendar, res.head)
        self._resolved[row.symbol] = res
        return res

    # ------------------------------------------------------------- plan
    def _plan_contract(self, res: _Resolved, sel: Selection, statuses: dict) -> ContractPlan:
        row = res.row
        cal = self.calendar(row.calendar)
        now = self.now()
        head = [res.head.astimezone(cal.tz).date()] if res.head is not None else []
        first, last = plan_range(cal, now, self.s.settle, sel, [self.s.earliest, *head])
        cp = ContractPlan(row, res.con_id, res.head, first=first, last=last, error=res.error,
                          head_known=res.head_known)
        if last is None:
            return cp
        if res.error is not None:
            # Unresolvable contract: the error goes on the explicit range, else on the newest session.
            first = sel.first if sel.first is not None else last
            cp.first = first
        if first is None or first > last:
            return cp
        return plan_sessions(cal, row.symbol, first, last, statuses, now=now, retry_failed=sel.retry_failed,
                             finished=self._finished, include_errors=res.error is not None, out=cp)

    async def plan(self, sel: Selection, resolve: bool = True) -> Plan:
        """Resolve the selected contracts (when connected and ``resolve``)
        and build the plan from the status table.  Writes nothing."""
        rows = self._selected(sel)
        cached = await self._db(self.store.cached_heads)
        resolved = []
        for row in rows:
            if resolve and self.ib is not None and self.ib.isConnected():
                res = await self._resolve(row, cached)
            else:
                res = self._resolved.get(row.symbol) or _Resolved(row)
                if res.con_id is None and row.symbol in cached:
                    res.con_id, res.head = cached[row.symbol]
                if res.head is None:
                    res.head_known = False
            resolved.append(res)
        plans = []
        for res in resolved:
            cal = self.calendar(res.row.calendar)
            hi = sel.last or self.now().astimezone(cal.tz).date()
            statuses = await self._db(self.store.statuses, [res.row.symbol], dt.date(1900, 1, 1), hi)
            plans.append(self._plan_contract(res, sel, statuses))
        plan = Plan(plans)
        plan.duration = self.limiter.plan_duration([self.requests_of(c) for c in plans])
        return plan

    def requests_of(self, cp: ContractPlan) -> int:
        """Requests the plan of one contract sends (``days_per_request``
        sessions' days each at most; none for a contract in error)."""
        if cp.error is not None or not cp.sessions:
            return 0
        return len(request_chunks(cp.sessions, self.s.days_per_request))

    def _jobs(self, plan: Plan) -> list[_Job]:
        jobs = []
        for cp in plan.items:
            if cp.error is not None:
                continue
            res = self._resolved[cp.row.symbol]
            for chunk in request_chunks(cp.sessions, self.s.days_per_request):
                tried = max(self._attempts.get((cp.row.symbol, s.day), 0) for s in chunk)
                jobs.append(_Job(res, chunk, cp.row.priority, tried))
        jobs.sort(key=lambda j: fetch_order(j.session.day, j.priority, j.res.row.symbol))
        return jobs

    async def _apply_plan(self, plan: Plan, first_time: bool) -> None:
        """Record holidays, contract errors and PENDING rows; fill the queue."""
        holidays = [(cp.row.symbol, cp.con_id, d) for cp in plan.items for d in cp.holidays]
        await self._db(self.store.mark_holidays, holidays)
        self.summary.holidays += len(holidays)
        for cp in plan.items:
            if cp.error is None:
                continue
            self.summary.contract_errors[cp.row.symbol] = cp.error
            for s in cp.sessions:
                if (cp.row.symbol, s.day) in self._finished:
                    continue
                await self._db(self.store.record_error, cp.row.symbol, cp.con_id, s, "ERROR", cp.error, 0)
                self._finish(cp.row.symbol, s.day, "ERROR")
                if first_time:
                    self.summary.planned += 1
        jobs = self._jobs(plan)
        await self._db(self.store.mark_pending, [(j.res.row.symbol, j.res.con_id, s) for j in jobs
                                                 for s in j.sessions])
        self._queue = deque(jobs)
        self._planned.update(k for j in jobs for k in j.keys)
        if first_time:
            self.summary.planned += sum(len(j.sessions) for j in jobs)
            self._total = self.summary.planned

    # -------------------------------------------------------------- run
    async def dry_run(self, sel: Selection, connect: bool = True) -> Plan:
        """The plan without fetching or writing anything.  Connects (once,
        no retries) to resolve contracts and head timestamps; when TWS is
        not reachable the cached head timestamps are used."""
        await self._load_pacing()
        if connect:
            try:
                self.ib = await self.connect(time.monotonic())
            except BackfillFailed as e:
                log.warning("%s: planning from cached head timestamps", e)
                self.ib = None
        try:
            return await self.plan(sel, resolve=self.ib is not None)
        finally:
            self._stop.set()
            if self.ib is not None:
                self.ib.disconnect()
            self._shutdown_executor()

    async def run(self, sel: Selection, arguments: str = "") -> RunSummary:
        """Fetch every selected session not yet complete; returns the
        summary (``summary.failed`` set when the run could not finish).
        Raises :class:`BackfillFailed` when the database lock is held."""
        self._selection = sel
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._changed = asyncio.Event()
        await self._begin(arguments)
        self.notifier.notify("STATUS=connecting")
        await self._guarded(self._fetch_all(), "backfill failed")
        return self.summary

    async def _load_pacing(self) -> None:
        """Start the limiter from what an earlier run learned for this TWS
        and bar size (``ibkr_pacing_learned``); one log line."""
        lim = self.limiter
        if not self.s.keeps_learned:
            lim.resume(None)
            log.info("pacing: profile %s starts as %s with %d in flight; pacing_scale %g: what auto learns is "
                     "neither loaded nor stored (it would describe a simulator, not IB)", lim.profile, lim.in_force,
                     lim.status().concurrency, self.s.pacing_scale)
            return
        learned = await self._db(self.store.learned_pacing, self.s.endpoint, BAR_SIZE)
        lim.resume(learned)
        if lim.profile != AUTO:
            log.info("pacing: profile %s with %d in flight", lim.profile, lim.status().concurrency)
            return
        why = (f"learned {learned.at:%Y-%m-%d %H:%M} UTC: {learned.why}" if learned is not None
               else "nothing learned yet")
        if learned is not None and not learned.fresh(lim.wall_clock(), lim.relearn):
            why += f"; older than {lim.relearn / 3600:g} h, probing again"
        log.info("pacing: profile auto starts as %s with %d in flight (%s)", lim.in_force, lim.concurrency, why)

    def _save_learned(self, learned: LearnedPacing) -> None:
        """``on_learn`` of the limiter: store it on the database thread (in
        the background; :meth:`disconnect` waits for it)."""
        fut = asyncio.ensure_future(self._db(self.store.save_learned_pacing, self.s.endpoint, BAR_SIZE, learned))
        self._learn_saves.add(fut)
        fut.add_done_callback(self._learn_saved)

    def _learn_saved(self, fut: asyncio.Future) -> None:
        self._learn_saves.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("learned pacing not stored: %s", fut.exception())

    async def _fetch_all(self) -> None:
        sm = self.summary
        await self._load_pacing()
        plan = await self._connect_and_plan()
        await self._db(self.store.update_run, sm.run_id, client_id=self.client_id)
        await self._apply_plan(plan, first_time=True)
        await self._seed_pacing()
        log.info("plan: %d sessions to fetch in %d requests for %d contracts (%s), %d holidays recorded; pacing "
                 "implies %s", plan.sessions, len(self._queue), len(plan.items),
                 ", ".join(f"{c.row.symbol} {self.requests_of(c)}" for c in plan.items), sm.holidays,
                 fmt_duration(plan.duration))
        await self._run_workers()

    def settle(self) -> None:
        sm = self.summary
        if sm.failed is None and sm.left_pending and not sm.stopped:
            sm.failed = f"{sm.left_pending} sessions left PENDING after {self.s.max_attempts} attempts"
        sm.pacing_violations = self.limiter.violations
        if self.limiter.history is not None:
            sm.request_times = list(self.limiter.history)

    async def disconnect(self) -> None:
        if self._learn_saves:
            await asyncio.gather(*self._learn_saves, return_exceptions=True)
        if self.ib is not None:
            self.ib.disconnect()

    def run_counts(self, final: bool = False) -> dict:
        counts = super().run_counts(final)
        if final:
            counts["pacing_violations"] = self.summary.pacing_violations
        counts["reconnects"] = self.summary.reconnects
        return counts

    async def _connect_and_plan(self) -> Plan:
        """Connect and plan; a connection lost or a timeout while resolving
        contracts means connecting again (at most ``max_attempts`` times)."""
        deadline = time.monotonic() + self.s.reconnect_timeout
        for attempt in range(1, self.s.max_attempts + 1):
            self.ib = await self.connect(deadline)
            try:
                return await self.plan(self._selection)
            except (ConnectionError, asyncio.TimeoutError) as e:
                log.warning("contract resolution interrupted (%s), attempt %d of %d", e or type(e).__name__,
                            attempt, self.s.max_attempts)
                self._link_up = False
                self._set_ready()
                self.ib.disconnect()
        raise BackfillFailed(f"contract resolution failed {self.s.max_attempts} times (no answer from TWS)")

    async def _run_workers(self) -> None:
        supervisor = asyncio.create_task(self._supervise())
        workers = asyncio.gather(*(self._worker(i) for i in range(max(1, min(self.limiter.max_in_flight, 50)))))
        try:
            await asyncio.wait([supervisor, workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (supervisor, workers):
                t.cancel()
            await asyncio.gather(supervisor, workers, return_exceptions=True)
        if supervisor.done() and not supervisor.cancelled() and supervisor.exception() is not None:
            raise supervisor.exception()
        if workers.done() and not workers.cancelled() and workers.exception() is not None:
            raise workers.exception()

    async def _supervise(self) -> None:
        """Reconnect after a socket loss and re-plan from the status table."""
        while True:
            await self._lost.wait()
            if self._stop.is_set():
                return
            self.summary.reconnects += 1
            log.warning("reconnecting to %s:%d (reconnect %d)", self.s.host, self.s.port, self.summary.reconnects)
            self.notifier.notify("STATUS=reconnecting to TWS/IB Gateway")
            plan = await self._connect_and_plan()
            await self._apply_plan(plan, first_time=False)
            log.info("reconnected: %d sessions left, taken from the status table", len(self._queue))
            self._changed.set()

    async def _worker(self, n: int) -> None:
        while True:
            if not self._ready.is_set():
                if not self._queue and not self._busy and self._link_up:
                    return
                await self._ready.wait()
            if not self._queue:
                if not self._busy:
                    self._changed.set()
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            job = self._queue.popleft()
            job.sessions = [s for s, k in zip(job.sessions, job.keys) if k not in self._finished
                            and k not in self._active]
            if not job.sessions:
                continue
            keys = job.keys
            self._busy += 1
            self._active.update(keys)
            try:
                await self._fetch(job)
            finally:
                self._busy -= 1
                self._active.difference_update(keys)
                self._changed.set()

    def _requeue(self, job: _Job, error: str) -> None:
        if job.attempts >= self.s.max_attempts:
            log.error("%s: giving up for this run after %d attempts (%s); stays PENDING", job.label, job.attempts,
                      error)
            return
        self._queue.append(job)

    def _keys(self, res: _Resolved, sessions: Sequence[Session]) -> tuple[tuple, tuple]:
        """The limiter's identical-request key and contract key of the
        request for ``sessions`` (newest first): it ends at the newest
        session's close and covers ``durationStr`` back to the oldest
        (:func:`~feeds.ibkr.sessions.duration_str`)."""
        what = self.s.what_to_show
        ident = (res.con_id, res.row.exchange, _utc_end(sessions[0].close), duration_str(sessions), BAR_SIZE, what,
                 self.s.use_rth, FORMAT_DATE)
        return ident, (res.con_id, res.row.exchange, what)

    async def _seed_pacing(self) -> None:
        """Count the requests earlier runs sent within the last window
        (:meth:`feeds.backfill.StatusStore.recent_requests`): IB remembers
        them too.  Each gets the keys of the request as sent, rebuilt from
        the first and last session it covered (:meth:`_keys`); a request
        whose contract or sessions are unknown here counts in the
        ten-minute window only."""
        recent = await self._db(self.store.recent_requests, self.limiter.window)
        entries = []
        weight = self.limiter.weight_for(self.s.what_to_show)
        for sym, oldest, newest, age in recent:
            res = self._resolved.get(sym)
            ident = ckey = None
            if res is not None and res.con_id:
                cal = self.calendar(res.row.calendar)
                sessions = [cal.session(newest), cal.session(oldest)]
                if None not in sessions:
                    ident, ckey = self._keys(res, sessions)
            entries.append((age, ident, ckey, weight))
        if entries:
            self.limiter.seed(entries)
            log.info("pacing: %d requests sent in the last %s by an earlier run are counted", len(entries),
                     fmt_duration(self.limiter.window))

    async def _fetch(self, job: _Job) -> None:
        res, session, sm = job.res, job.session, self.summary
        row = res.row
        what = self.s.what_to_show
        end = _utc_end(session.close)
        duration = duration_str(job.sessions)
        ident, ckey = self._keys(res, job.sessions)
        ticket = await self.limiter.acquire(ident, ckey, self.limiter.weight_for(what))
        ib = self.ib
        if ib is None or not self._ready.is_set() or not ib.isConnected():
            self.limiter.release(ticket)
            self._queue.appendleft(job)
            return
        job.attempts += 1
        for k in job.keys:
            self._attempts[k] = job.attempts
        sm.requests += 1
        req_id = ib.client.getReqId()
        fut = ib.wrapper.startReq(req_id, res.contract, container=[])
        outcome = _Outcome(self.limiter, ticket)
        fut.add_done_callback(outcome)
        self._inflight[req_id] = (job, fut)
        try:
            # Sent right when the limiter allows it; counted in the status table just after.
            ib.client.reqHistoricalData(req_id, res.contract, end, duration, BAR_SIZE, what, self.s.use_rth,
                                        FORMAT_DATE, False, [])
            await self._db(self.store.note_requests, [(row.symbol, res.con_id, s) for s in job.sessions])
            bars = await asyncio.wait_for(fut, self.s.request_timeout)
        except RequestError as e:
            await self._request_error(job, e.code, e.message, outcome.pause)
            return
        except asyncio.TimeoutError:
            self.limiter.cancelled(ticket)
            if ib.isConnected():
                ib.client.cancelHistoricalData(req_id)
            err = f"no answer within {self.s.request_timeout:g}s"
            log.warning("%s: %s (attempt %d)", job.label, err, job.attempts)
            await self._record(job, "PENDING", err)
            self._requeue(job, err)
            return
        except ConnectionError as e:
            err = f"connection lost during the request ({e})"
            await self._record(job, "PENDING", err)
            if job.attempts >= self.s.max_attempts + 2:
                log.error("%s: %s; giving up for this run", job.label, err)
            else:
                self._queue.appendleft(job)
            return
        finally:
            self._inflight.pop(req_id, None)
        sm.request_times.append(time.monotonic())
        await self._store(job, bars)

    async def _record(self, job: _Job, status: str, err: str) -> None:
        """The error ``err`` with ``status`` on every session of the request."""
        res = job.res
        for s in job.sessions:
            await self._db(self.store.record_error, res.row.symbol, res.con_id, s, status, err)

    async def _request_error(self, job: _Job, code: int, text: str, pause: float = 0.0) -> None:
        err = f"IB error {code}: {text}"
        if is_pacing_violation(code, text):
            log.warning("pacing violation reported for %s: pausing new requests %.2fs", job.label, pause)
            await self._record(job, "PENDING", err)
            self._requeue(job, err)
            return
        if code in TRANSIENT_CODES or is_query_cancelled(code, text):
            await self._record(job, "PENDING", err)
            self._requeue(job, err)
            return
        await self._record(job, "ERROR", err)
        for k in job.keys:
            self._finish(*k, "ERROR")

    def split_answer(self, job: _Job, bars: list) -> list[tuple[Session, list]]:
        """The answer of one request cut into its sessions (newest first):
        each session gets the bars of its local date (in its calendar's
        time zone), in IB's order, so each is checked as a one-session
        answer would be.  Bars of any other date (a day the calendar has no
        session, or a session not requested) are left out and logged."""
        tz = job.session.tz
        by_day: dict[dt.date, list] = {s.day: [] for s in job.sessions}
        other: dict[dt.date, int] = {}
        for b in bars:
            d = b.date.astimezone(tz).date() if isinstance(b.date, dt.datetime) else job.session.day
            if d in by_day:
                by_day[d].append(b)
            else:
                other[d] = other.get(d, 0) + 1
        for d, n in sorted(other.items()):
            log.warning("%s: %d bars on %s, a day this request was not for (%s calendar), not stored", job.label,
                        n, d, job.res.row.calendar)
        return [(s, by_day[s.day]) for s in job.sessions]

    async def _store(self, job: _Job, bars: list) -> None:
        res = job.res
        row = res.row
        for session, day_bars in self.split_answer(job, bars):
            now = self.now()
            chk = check_session(row.symbol, res.con_id or 0, session, day_bars, now=now)
            # a thin session stays COMPLETE with its "thin:" note (the table predates THIN)
            status, error, note = session_status(chk, session, now, self.s.settle, thin_status=None)
            await self._db(self.store.commit_session, row.symbol, res.con_id, session, status, chk.rows,
                           chk.first, chk.last, error, note)
            self.summary.bars += chk.actual
            if status == "ERROR":
                log.error("%s %s: %s", row.symbol, session.day, error)
            elif note:
                # thin sessions are routine for illiquid contracts (the count is in --status): debug level
                thin_only = note.startswith("thin:") and ";" not in note
                level = logging.DEBUG if thin_only and status != "PARTIAL" else logging.INFO
                log.log(level, "%s %s: %s %d/%d bars: %s", row.symbol, session.day, status, chk.actual,
                        chk.expected, note)
            self._finish(row.symbol, session.day, status)

    # ---------------------------------------------------------- progress
    def progress_line(self) -> str:
        """``progress: sessions 120/756 (16%), requests 130, bars 46,800,
        errors 1, pacing waits 12s, ETA 4m10s; pacing auto (documented),
        3/8 in flight, 41.2 requests/min``."""
        sm = self.summary
        total = max(self._total, 1)
        remaining = max(0, self._total - sm.done)
        # requests left: sessions left, several to a request (at most days_per_request)
        eta = self.limiter.estimate(-(-remaining // self.s.days_per_request)) if remaining else 0.0
        return (f"progress: sessions {sm.done}/{self._total} ({100 * sm.done // total}%), requests {sm.requests}, "
                f"bars {sm.bars:,}, errors {sm.errors}, pacing waits {fmt_duration(self.limiter.waited)}"
                f"{', reconnects ' + str(sm.reconnects) if sm.reconnects else ''}, ETA {fmt_duration(eta)}; "
                f"{self.limiter.status().line()}")

    def figures(self) -> dict[str, int | float]:
        """Counters for the heartbeat: sessions planned and done, requests,
        bars, IB errors, pacing violations, reconnects; requests in flight
        and allowed, the rate (requests/min; the profile in force is in
        :meth:`progress_line`)."""
        sm, st = self.summary, self.limiter.status()
        return {"sessions": self._total, "done": sm.done, "requests": sm.requests, "bars": sm.bars,
                "errors": sm.errors, "pacing violations": self.limiter.violations, "reconnects": sm.reconnects,
                "in flight": st.in_flight, "concurrency": st.concurrency,
                "requests/min": round(st.rate, 1)}
