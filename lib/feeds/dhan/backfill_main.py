"""``feed-dhan-backfill``: Dhan one-minute history into PostgreSQL, resumable.

Fetches every XNSE session not yet final for the instruments of
``dhan.instruments_file`` (see :mod:`feeds.dhan.history`; the planner, the
status table and ``--status`` are the ones feed-backfill uses:
:mod:`feeds.backfill`), then reconciles the day's live candles.  Run by
``feed-dhan-backfill.service`` (oneshot) from ``feed-dhan-backfill.timer``
every NSE weekday evening, or by hand::

    feed-dhan-backfill                         every instrument, every session not yet final
    feed-dhan-backfill --symbols HDFCBANK NSE_EQ:TCS
    feed-dhan-backfill --from 2020-01-01 --to 2020-12-31
    feed-dhan-backfill --date 2024-09-12
    feed-dhan-backfill --from 30d              the last 30 days
    feed-dhan-backfill --dry-run               the plan: sessions, requests, time the rate limit implies
    feed-dhan-backfill --retry-failed          also request ERROR sessions again
    feed-dhan-backfill --priority-only         only instruments with a priority
    feed-dhan-backfill --refetch --from 30d    fetch stored sessions again: record adjustments (both kept)
    feed-dhan-backfill --refetch --interval 15 compare Dhan's 15-minute candles with the stored ones
    feed-dhan-backfill --status                per-instrument summary table from the database
    feed-dhan-backfill --no-reconcile          skip the comparison with the live candles

A run goes through the collector runtime (:mod:`feeds.service`): progress
in the journal and ``STATUS=`` every ``backfill.status_interval``, a
heartbeat row (``feedctl status``), SIGTERM/SIGINT end it cleanly with the
summary written.  At the end of a run the node_exporter textfile
``<metrics.textfile_dir>/feeds_dhan_backfill.prom`` is written
(:func:`run_metrics`).

Exit status: 0 the run finished (or used the day's request budget), 1 it
could not finish (database failure, sessions left PENDING), 75 another
feed-dhan-backfill is running, 77 the access token is missing, invalid or
expired (renew it with feed-dhan-token; not restarted), 78 bad
configuration or instruments file (one line naming the file and key).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys

import click

from ..settings import time_of_day
from .. import backfill as B
from .. import service
from ..backfill import EX_TEMPFAIL, Selection, fmt_duration, format_status
from ..config import EX_CONFIG, Config
from ..ops.metrics import job_values
from ..settings import DHAN_FILE, database_dsn
from . import rest as R
from .history import DhanBackfill, DhanStore, Plan, Settings, TokenExpired
from .instruments import InstrumentsError, instrument_list, load_instruments

log = logging.getLogger("feeds.dhan")
EX_TOKEN = R.EX_TOKEN


def load_settings(cfg: Config) -> tuple[Settings, dict]:
    """:class:`~feeds.dhan.history.Settings` and the file locations
    (``instruments_file``, ``instrument_list_url``, ``instrument_list_cache``,
    ``default_mode``) from a loaded ``dhan.toml``."""
    d, b = "dhan.", "backfill."
    early = cfg[b + "earliest"]
    s = Settings(
        api_url=cfg[d + "api_url"], client_id=cfg[d + "client_id"], token_file=cfg[d + "token_file"],
        requests_per_second=cfg[d + "requests_per_second"], requests_per_day=cfg[d + "requests_per_day"],
        days_per_request=cfg[d + "history_days_per_request"], history_years=cfg[d + "history_years"],
        earliest=dt.date.fromisoformat(early) if early else None, request_timeout=cfg[b + "request_timeout"],
        max_attempts=cfg[b + "max_attempts"], settle=dt.timedelta(minutes=cfg[b + "settle_minutes"]),
        status_interval=cfg[b + "status_interval"], reconcile=cfg[d + "reconcile"],
        calendar="XNSE",
        extra_sessions={dt.date.fromisoformat(k): (time_of_day(v[0]), time_of_day(v[1]))
                        for k, v in cfg[d + "extra_sessions"].items()},
        extra_holidays=[x if isinstance(x, dt.date) else dt.date.fromisoformat(str(x))
                        for x in cfg[d + "extra_holidays"]],
    )
    files = {k: cfg[d + k] for k in ("instruments_file", "instrument_list_url", "instrument_list_cache",
                                     "default_mode")}
    return s, files


def format_plan(plan: Plan, rate: float) -> str:
    """The ``--dry-run`` table: per instrument the security id, date range,
    sessions to fetch, done, holidays, ERROR skipped, requests; then totals
    and the time the rate limit implies."""
    lines = [f"{'instrument':<22} {'securityId':>10} {'prio':>4} {'from':<10} {'to':<10} "
             f"{'fetch':>6} {'done':>6} {'holiday':>7} {'error':>6} {'requests':>8}"]
    for p in plan.items:
        sid = str(p.inst.security_id) if p.inst else "-"
        lines.append(f"{p.line.key:<22} {sid:>10} {p.line.priority:>4} {str(p.first or '-'):<10} "
                     f"{str(p.last or '-'):<10} {len(p.sessions):>6} {p.done:>6} {len(p.holidays):>7} "
                     f"{p.skipped_errors:>6} {p.requests:>8}" + (f"  ERROR: {p.error}" if p.error else ""))
    lines.append(f"total: {plan.sessions} sessions to fetch, {plan.requests} requests; the rate limit "
                 f"({rate:g}/s) implies at least {fmt_duration(plan.duration)}")
    return "\n".join(lines)


class BackfillJob(B.BackfillJob):
    """One run as a collector of :mod:`feeds.service` (signals, STATUS=,
    heartbeat, clean stop: :class:`feeds.backfill.BackfillJob`).  ``run``
    returns 0, 1, 75 or 77."""

    log = log
    failures = ((TokenExpired, "access token: %s", EX_TOKEN), (RuntimeError, "%s", EX_TEMPFAIL))

    def __init__(self, bf: DhanBackfill, sel: Selection, arguments: str, refetch: bool, interval: int):
        super().__init__(bf, sel, arguments)
        self.refetch, self.interval = refetch, interval

    def work(self):
        return self._work()

    async def _work(self):
        if self.interval == 1:
            return await self.bf.run(self.sel, self.arguments, refetch=self.refetch)
        return await compare_run(self.bf, self.sel, self.interval)


async def compare_run(bf: DhanBackfill, sel: Selection, interval: int):
    """``--refetch --interval N``: every stored session of the selection
    fetched at N minutes and compared with the stored one-minute candles
    rolled up; adjustments recorded (nothing stored in dhan_bar)."""
    sm = bf.summary
    await bf._db(bf.store.connect)
    try:
        now = bf.now()
        last = sel.last or (bf.cal.last_finished(now, bf.s.settle).day)
        first = sel.first or last
        for ln in bf.selected(sel):
            inst = bf.resolved.get(ln.key)
            if inst is None:
                continue
            for s in reversed(bf.cal.sessions(first, last)):
                try:
                    cmp = await bf.compare_interval(inst, s, interval)
                except R.TokenError as e:
                    sm.token_expired, sm.failed = True, str(e)
                    raise TokenExpired(str(e)) from None
                except R.DhanError as e:
                    log.warning("%s %s: %s", ln.key, s.day, e)
                    sm.errors += 1
                    continue
                sm.done += 1
                log.info("%s %s at %d minutes: %s %s", ln.key, s.day, interval, cmp.kind, cmp.detail)
    finally:
        sm.requests = bf.rest.requests
        line = sm.line()
        log.info("%s", line)
        await bf.rest.close()
        await bf._db(bf.store.close)
        bf._shutdown_executor()
    return sm


def run_metrics(job: BackfillJob | None, started: float, rc: int) -> dict[str, float]:
    """The textfile values of one run (:func:`feeds.ops.metrics.job_values`)
    and its figures (``sessions_planned``, ``sessions_done``,
    ``sessions_failed``, ``sessions_left_pending``, ``requests``,
    ``bars_stored``, ``dhan_errors``, ``rate_limited``, ``adjustments``)."""
    figures = {}
    if job is not None:
        sm = job.bf.summary
        figures = {"sessions_planned": sm.planned, "sessions_done": sm.done, "sessions_failed": sm.statuses["ERROR"],
                   "sessions_left_pending": sm.left_pending, "requests": job.bf.rest.requests,
                   "bars_stored": sm.bars, "dhan_errors": job.bf.rest.errors,
                   "rate_limited": job.bf.rest.rate_limited, "adjustments": sm.adjustments}
    return job_values(started, rc, **figures)


@B.backfill_command(
    config_env="FEEDS_DHAN_CONFIG", config_default="/etc/feeds/dhan.toml", unit="feed-dhan-backfill.service",
    symbols_help="Only these instruments (SYMBOL or SEGMENT:SYMBOL, space- or comma-separated).",
    priority_help="Only instruments with a priority in the instruments file.",
    status_help="Print the per-instrument summary table and exit.",
    status_interval_help="Override backfill.status_interval (s).",
    options=[
        click.option("--refetch", is_flag=True, help="Fetch stored sessions again and record adjustments (both kept)."),
        click.option("--interval", type=click.Choice(["1", "5", "15", "25", "60"]), default="1", show_default=True,
                     help="With --refetch: the candle interval fetched for the comparison (N > 1 stores nothing)."),
        click.option("--no-reconcile", is_flag=True, help="Skip the comparison with the live candles."),
        click.option("--rate-scale", type=float, default=None, envvar="FEEDS_DHAN_RATE_SCALE",
                     help="Scale the one-second rate window (only for simulators with a scaled clock; 1 = Dhan's)."),
    ])
def main(config_path, symbols, from_, to, date, dry_run, retry_failed, priority_only, status, refetch, interval,
         no_reconcile, rate_scale, status_interval, unit, more_symbols):
    """Backfill Dhan one-minute candles into PostgreSQL, newest session first,
    priority instruments first, within Dhan's data API rate limits."""
    cfg = service.start(config_path, DHAN_FILE)
    settings, files = load_settings(cfg)
    B.apply_overrides(settings, scale=rate_scale, scale_attr="rate_scale", scale_option="--rate-scale",
                      status_interval=status_interval)
    if no_reconcile:
        settings.reconcile = False
    if int(interval) != 1 and not refetch:
        raise click.UsageError("--interval goes with --refetch")
    dsn = database_dsn(cfg)
    try:
        lines = load_instruments(files["instruments_file"], files["default_mode"])
    except InstrumentsError as e:
        click.echo(str(e), err=True)
        sys.exit(EX_CONFIG)
    sel = B.selection_from_options(symbols, more_symbols, from_, to, date, retry_failed, priority_only,
                                   {ln.key for ln in lines} | {ln.symbol for ln in lines}, files["instruments_file"])
    store = DhanStore(dsn)
    with B.database_exit(log):
        if status:
            B.print_status(store, sel.symbols and _keys(lines, sel.symbols), None, width=22, unit=unit)
            return
        _act(settings, files, lines, store, sel, dry_run, refetch, int(interval), unit, cfg["metrics.textfile_dir"])


def _keys(lines, symbols) -> list[str]:
    want = set(symbols)
    return [ln.key for ln in lines if ln.key in want or ln.symbol in want]


def _act(settings: Settings, files: dict, lines, store: DhanStore, sel: Selection, dry_run: bool, refetch: bool,
         interval: int, unit: str, textfile_dir: str) -> None:
    try:
        ilist = instrument_list(files["instrument_list_url"], files["instrument_list_cache"])
    except InstrumentsError as e:
        log.error("%s", e)
        sys.exit(1)
    if dry_run:
        async def plan():
            bf = DhanBackfill(settings, lines, store, ilist, notifier=_Quiet())
            try:
                return bf, await bf.plan(sel, refetch)
            finally:
                await bf.rest.close()
                bf._shutdown_executor()
        store.connect()
        try:
            bf, p = asyncio.run(plan())
        finally:
            store.close()
        click.echo(format_plan(p, settings.requests_per_second))
        return
    try:
        R.read_token(settings.token_file)
    except R.TokenError as e:
        log.error("%s: renew it with feed-dhan-token", e)
        sys.exit(EX_TOKEN)
    log.info("feed-dhan-backfill starting: %d instruments, API %s, %g requests/s, %d a day, "
             "rate scale %g", len(lines), settings.api_url, settings.requests_per_second,
             settings.requests_per_day, settings.rate_scale)
    B.run_job(store, unit=unit, status_interval=settings.status_interval, textfile_dir=textfile_dir,
              job_name="dhan_backfill", run_metrics=run_metrics, log=log,
              make_job=lambda health, args: BackfillJob(DhanBackfill(settings, lines, store, ilist, notifier=health),
                                                        sel, args, refetch, interval))


class _Quiet:
    def notify(self, msg: str) -> None:
        pass


__all__ = ["main", "load_settings", "format_plan", "format_status", "BackfillJob", "run_metrics", "compare_run"]
