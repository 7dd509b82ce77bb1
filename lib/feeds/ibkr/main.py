"""``feed-backfill``: IBKR one-minute history into PostgreSQL, resumable.

Fetches every session not yet complete (see :mod:`feeds.ibkr.backfill`;
the planner, the status table and ``--status`` are shared with
feed-dhan-backfill: :mod:`feeds.backfill`).
Run by ``feed-backfill.service`` (oneshot) from ``feed-backfill.timer``
every weekday evening after the US close, or by hand::

    feed-backfill                          every contract, every session not yet complete
    feed-backfill --symbols AAPL MSFT      only these (also --symbols AAPL,MSFT)
    feed-backfill --from 2020-01-01 --to 2020-12-31
    feed-backfill --date 2024-07-03
    feed-backfill --from 30d               the last 30 days
    feed-backfill --dry-run                the plan: sessions, requests, time pacing implies
    feed-backfill --retry-failed           also request ERROR sessions again
    feed-backfill --priority-only          only contracts with priority > 0
    feed-backfill --status                 per-symbol summary table from the database
    feed-backfill --test-connection        connect, resolve every contract, exit

A run goes through the collector runtime (:mod:`feeds.service`): progress
in the journal and ``STATUS=`` every ``status_interval``, a heartbeat row
in ``feed_heartbeat`` (``feedctl status``; unit ``feed-backfill.service``
or ``--unit``), SIGTERM and SIGINT end it cleanly with the summary written.

At the end of a run (not of ``--dry-run``, ``--status`` or
``--test-connection``; nor of a second feed-backfill refused by the lock)
the node_exporter textfile ``<metrics.textfile_dir>/feeds_backfill.prom``
is written: ``feeds_job_last_run_timestamp_seconds{job="backfill"}``, the
last success, the duration, the exit code and the run's figures
(:func:`run_metrics`; see :mod:`feeds.ops.metrics`).

Exit status: 0 the run finished (sessions IB refused are ERROR rows and
in the summary), 1 the run could not finish (no connection, database
failure, sessions left PENDING after ``max_attempts``; at start, an
installed ib_async other than the version :mod:`feeds.ibkr.wire` patches),
75 another feed-backfill is running, 78 bad configuration or contracts file
(one line naming the file, line and field or key).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time

import click

from .. import backfill as B
from .. import service
from ..backfill import EX_TEMPFAIL, format_status, parse_date, parse_symbols
from ..config import EX_CONFIG, Config, ConfigError
from ..ops.metrics import job_values
from ..settings import IBKR_FILE, database_dsn
from .backfill import BAR_SIZE, Backfill, BackfillFailed, Plan, Selection, Settings, fmt_duration, pacing_limiter
from .contracts import ContractsError, load_contracts
from .pacing import AUTO, LearnedPacing, PacingLimiter
from .store import BackfillStore
from .wire import WireVersionError, check_version

log = logging.getLogger("feeds.ibkr")


def load_settings(cfg: Config) -> tuple[Settings, str]:
    """:class:`Settings` and the contracts file path from a loaded
    ``ibkr.toml`` (checked by :func:`feeds.settings.load`)."""
    i, b = "ibkr.", "backfill."
    early = cfg[b + "earliest"]
    s = Settings(
        **{n: cfg[i + n] for n in ("host", "port", "client_id", "client_id_tries", "connect_timeout")},
        **{n: cfg[b + n] for n in ("request_timeout", "concurrency", "max_attempts", "reconnect_timeout",
                                   "what_to_show", "use_rth", "status_interval", "pacing_scale", "pacing_profile",
                                   "max_concurrency", "slow_answer", "days_per_request",
                                   "keep_learned_when_scaled")},
        settle=dt.timedelta(minutes=cfg[b + "settle_minutes"]),
        earliest=dt.date.fromisoformat(early) if early else None,
        relearn=cfg[b + "relearn_hours"] * 3600.0,
    )
    if s.pacing_profile == AUTO and s.concurrency > s.max_concurrency:
        raise ConfigError(b + "concurrency", cfg.file, f"must not exceed backfill.max_concurrency "
                          f"({s.max_concurrency}) under the auto pacing profile")
    return s, cfg[i + "contracts_file"]


_date = parse_date
_symbols = parse_symbols


def format_plan(plan: Plan, limiter_window: float, max_requests: int, limiter: PacingLimiter | None = None,
                requests: dict[str, int] | None = None) -> str:
    """The ``--dry-run`` table: per symbol the date range, sessions to
    fetch, sessions done, holidays, requests (``requests``: per symbol,
    when a request covers several sessions); then totals and the duration
    pacing implies (with ``limiter``: under its profile in force, named
    at the end of the line with what it learned)."""
    requests = requests if requests is not None else {c.row.symbol: c.requests for c in plan.items}
    lines = [f"{'symbol':<10} {'secType':<7} {'calendar':<8} {'head timestamp':<17} {'from':<10} {'to':<10} "
             f"{'fetch':>6} {'done':>6} {'holiday':>7} {'error':>6} {'requests':>8}"]
    for c in plan.items:
        head = (c.head.strftime("%Y-%m-%d %H:%M") if c.head else ("unknown" if not c.head_known else "-"))
        lines.append(f"{c.row.symbol:<10} {c.row.sec_type:<7} {c.row.calendar:<8} {head:<17} "
                     f"{str(c.first or '-'):<10} {str(c.last or '-'):<10} {len(c.sessions):>6} {c.done:>6} "
                     f"{len(c.holidays):>7} {c.skipped_errors:>6} {requests[c.row.symbol]:>8}"
                     + (f"  ERROR: {c.error}" if c.error else ""))
    total = sum(requests.values())
    strict = limiter is None or limiter.in_force == "strict"
    rule = f"{max_requests} per {fmt_duration(limiter_window)}" if strict else f"{limiter.status().concurrency} in flight"
    profile = ""
    if limiter is not None:
        st = limiter.status()
        profile = f"; {st.line().split(',')[0].replace('pacing', 'profile', 1)}" + (
            f", learned {st.learned.at:%Y-%m-%d %H:%M} UTC: {st.learned.why}" if st.learned else "")
    lines.append(f"total: {plan.sessions} sessions to fetch, {total} requests; pacing ({rule}) implies "
                 f"{'at least' if strict else 'about'} {fmt_duration(plan.duration)}{profile}")
    return "\n".join(lines)


def pacing_line(settings: Settings, learned: LearnedPacing | None) -> str:
    """The ``--status`` line of the pacing: the profile configured, the
    one in force and the requests in flight a run starts with (what was
    learned while fresh), and what was learned when (with ``pacing_scale``
    other than 1 nothing learned is used: the line says so)."""
    lim = pacing_limiter(settings)
    lim.resume(learned)
    line = f"{lim.status().line().split(',')[0]}, starts with {lim.status().concurrency} in flight"
    if learned is not None:
        fresh = learned.fresh(lim.wall_clock(), settings.relearn)
        line += (f"; learned {learned.at:%Y-%m-%d %H:%M} UTC for {settings.endpoint}: {learned.profile} with "
                 f"{learned.concurrency} in flight ({learned.why}){'' if fresh else ', probed again next run'}")
    elif not settings.keeps_learned:
        line += f"; pacing_scale {settings.pacing_scale:g}: nothing learned is loaded or stored"
    return line


async def _test_connection(bf: Backfill, sel: Selection) -> int:
    try:
        ib = await bf.connect(time.monotonic())  # one round of attempts, no retries
    except BackfillFailed as e:
        click.echo(f"FAIL {e}")
        return 1
    ok = True
    try:
        t = await asyncio.wait_for(ib.reqCurrentTimeAsync(), bf.s.request_timeout)
        click.echo(f"connected to {bf.s.host}:{bf.s.port} clientId {bf.client_id}, server version "
                   f"{ib.client.serverVersion()}, accounts {','.join(ib.client.getAccounts()) or '-'}, "
                   f"TWS time {t:%Y-%m-%d %H:%M:%S %Z}")
        cached = await bf._db(bf.store.cached_heads)
        for row in bf._selected(sel):
            res = await bf._resolve(row, cached)
            if res.error:
                ok = False
                click.echo(f"FAIL {row.symbol} ({row.sec_type} {row.exchange}): {res.error}")
            else:
                click.echo(f"ok   {row.symbol} conId {res.con_id} {row.sec_type} {row.exchange}"
                           f"{'/' + row.primary_exchange if row.primary_exchange else ''} {res.time_zone or '-'} "
                           f"calendar {row.calendar} head timestamp {res.head:%Y-%m-%d %H:%M %Z}")
    finally:
        bf._stop.set()
        ib.disconnect()
        bf._shutdown_executor()
    return 0 if ok else 1


class BackfillJob(B.BackfillJob):
    """One feed-backfill run as a collector of :mod:`feeds.service` (see
    :class:`feeds.backfill.BackfillJob`).  ``run`` returns 0 (finished or
    stopped by a signal), 1 (the run could not finish) or 75 (another
    feed-backfill holds the lock)."""

    log = log
    failures = ((BackfillFailed, "%s", EX_TEMPFAIL),)
    early_stop = "stopped by a signal before the run started"


@B.backfill_command(
    config_env="FEEDS_IBKR_CONFIG", config_default="/etc/feeds/ibkr.toml", unit="feed-backfill.service",
    symbols_help="Only these symbols (space- or comma-separated; default: all in the contracts file).",
    priority_help="Only contracts with priority > 0 in the contracts file.",
    status_help="Print the per-symbol summary table and exit.",
    status_interval_help="Override [backfill] status_interval (s).",
    options=[
        click.option("--test-connection", is_flag=True, help="Connect, resolve every contract, print, exit."),
        click.option("--pacing-scale", type=float, default=None, envvar="FEEDS_IBKR_PACING_SCALE",
                     help="Override [backfill] pacing_scale (only for simulators with scaled windows)."),
    ])
def main(config_path, symbols, from_, to, date, dry_run, retry_failed, priority_only, status, test_connection,
         pacing_scale, status_interval, unit, more_symbols):
    """Backfill IBKR one-minute bars into PostgreSQL, newest session first,
    within IB's historical-data pacing rules."""
    try:
        check_version()
    except WireVersionError as e:
        click.echo(f"feed-backfill: {e}", err=True)
        sys.exit(1)
    cfg = service.start(config_path, IBKR_FILE)
    for name in ("ib_async.wrapper", "ib_async.client", "ib_async.ib", "ib_async.Decoder"):
        # Every IB error is logged once by the backfill with its session; the client's own lines would repeat it.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    settings, contracts_path = load_settings(cfg)
    B.apply_overrides(settings, scale=pacing_scale, scale_attr="pacing_scale", scale_option="--pacing-scale",
                      status_interval=status_interval)
    dsn = database_dsn(cfg)
    try:
        contracts = load_contracts(contracts_path)
    except ContractsError as e:
        click.echo(str(e), err=True)
        sys.exit(EX_CONFIG)
    sel = B.selection_from_options(symbols, more_symbols, from_, to, date, retry_failed, priority_only,
                                   {c.symbol for c in contracts}, contracts_path)
    with B.database_exit(log):
        _act(settings, contracts, dsn, sel, status, test_connection, dry_run, config_path, contracts_path, unit,
             cfg["metrics.textfile_dir"])


def run_metrics(job: BackfillJob | None, started: float, rc: int) -> dict[str, float]:
    """The textfile values of one run (:func:`feeds.ops.metrics.job_values`):
    the standard keys and, once the run has started, its figures
    (``sessions_planned``, ``sessions_done``, ``sessions_failed`` (ERROR),
    ``sessions_left_pending``, ``requests``, ``bars_stored``, ``ib_errors``,
    ``pacing_violations``, ``reconnects``)."""
    figures = {}
    if job is not None:
        sm = job.bf.summary
        figures = {"sessions_planned": sm.planned, "sessions_done": sm.done,
                   "sessions_failed": sm.statuses["ERROR"], "sessions_left_pending": sm.left_pending,
                   "requests": sm.requests, "bars_stored": sm.bars, "ib_errors": sm.errors,
                   "pacing_violations": job.bf.limiter.violations, "reconnects": sm.reconnects}
    return job_values(started, rc, **figures)


def _act(settings: Settings, contracts, dsn: str, sel: Selection, status: bool, test_connection: bool,
         dry_run: bool, config_path: str, contracts_path: str, unit: str, textfile_dir: str = "") -> None:
    store = BackfillStore(dsn)
    if status:
        # read before print_status, which closes the store
        learned = store.learned_pacing(settings.endpoint, BAR_SIZE) if settings.keeps_learned else None
        B.print_status(store, sel.symbols, sel.symbols, unit=unit)
        click.echo(pacing_line(settings, learned))
        return
    limiter = pacing_limiter(settings)
    if test_connection:
        sys.exit(asyncio.run(_test_connection(Backfill(settings, contracts, store, limiter=limiter), sel)))
    if dry_run:
        bf = Backfill(settings, contracts, store, limiter=limiter)
        plan = asyncio.run(bf.dry_run(sel))
        click.echo(format_plan(plan, limiter.window, limiter.max_requests, limiter,
                               {c.row.symbol: bf.requests_of(c) for c in plan.items}))
        store.close()
        return
    log.info("feed-backfill starting: config %s, contracts %s (%d rows), TWS %s:%d, pacing %s, scale %g, "
             "%d days per request", config_path, contracts_path, len(contracts), settings.host, settings.port,
             settings.pacing_profile, settings.pacing_scale, settings.days_per_request)
    B.run_job(store, unit=unit, status_interval=settings.status_interval, textfile_dir=textfile_dir,
              job_name="backfill", run_metrics=run_metrics, log=log,
              # STATUS= lines of the run (connecting, the summary) also go to the heartbeat row
              make_job=lambda health, args: BackfillJob(
                  Backfill(settings, contracts, store, limiter=limiter, notifier=health), sel, args))


__all__ = ["main", "load_settings", "format_plan", "format_status", "BackfillJob", "run_metrics", "ConfigError",
           "pacing_line"]
