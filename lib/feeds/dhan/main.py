"""Command line ``feed-dhan``: Dhan's live market feed during NSE sessions.

Exit status: 0 after a clean stop (SIGTERM, or ``dhan.stop_after_close``
after the session's close; also at once on a day without a session), 77 when
the access token is missing, expired or refused (at start, or by Dhan during
the session: disconnect codes 806-810; renew it with feed-dhan-token), 78 on
a configuration error (one line naming the key and the file; also for more
instruments than ``dhan.max_connections`` x
``dhan.max_instruments_per_connection``), 1 on a runtime failure or when
rows could not be written at the stop (systemd restarts the unit).

Instruments: ``--instrument`` (repeatable or comma-separated, each
``SEGMENT:SYMBOL [mode] [priority]``) replaces the configured list; else
``dhan.instruments_file`` (or ``--instruments-file``) plus, with
``dhan.instruments_from_table``, the enabled rows of ``dhan_subscription``.
Symbols are resolved to security ids through Dhan's instrument list
(:mod:`feeds.dhan.instruments`); the format is that module's.  A line
naming a security id in digits (``NSE_EQ:1333``) needs no list.  More
instruments than the connections carry are refused before anything
connects.

Sessions: from the XNSE calendar (``dhan.session_calendar``, with
``dhan.extra_sessions`` / ``dhan.extra_holidays``), like feed-zerodha: the
timer starts it at 09:10 IST on weekdays; it exits at once on a day without
a session, waits for a later one (the Muhurat evening session), connects
``dhan.connect_before_open`` before the open and stops
``dhan.stop_after_close`` after the close.  ``--at`` prints that plan.

Candles (``[candles]``): built live (:class:`feeds.dhan.candles.DhanCandles`);
after a start inside a session, the minutes missed come from Dhan's
intraday charts (:func:`history_job`, ``candles.fill_from_history``).
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta, timezone

import click

from .. import calendars, service
from ..candles import always, calendar_sessions
from ..config import Config, ConfigError, exit_on_config_error
from ..candles import CandleSettings, candle_settings, first_missing
from ..settings import DHAN_FILE, database_dsn, hhmm
from . import adapter as A
from .candles import CANDLE_TABLE, DhanCandles
from .collector import RC_TOKEN, DhanCollector, Settings
from .connections import Subscription, TooManyInstruments, capacity, plan_connections, too_many_message
from .instruments import InstrumentLine, InstrumentList, InstrumentsError, load_instruments, parse_instruments
from .instruments import refresh_cache
from .token import IST, TokenError, TokenStore
from .wire import SEGMENT_BY_NAME

log = logging.getLogger("feeds.dhan")
UTC = timezone.utc
EX_NOPERM = 77


@dataclass
class DhanConfig:
    """The ``[dhan]`` settings feed-dhan uses (see :data:`feeds.settings.DHAN`)."""
    file: str
    client_id: str
    api_url: str
    feed_url: str
    instrument_list_url: str
    instrument_list_cache: str
    token_file: str
    instruments_file: str
    instruments_from_table: bool
    default_mode: str
    session_calendar: str
    connect_before_open: float
    stop_after_close: float
    max_connections: int
    max_instruments_per_connection: int
    requests_per_second: float = 5.0
    requests_per_day: int = 100_000
    status_interval: float = 10.0
    extra_sessions: dict[date, tuple[dtime, dtime]] = field(default_factory=dict)
    extra_holidays: list[date] = field(default_factory=list)
    collector: Settings = field(default_factory=Settings)
    candles: CandleSettings = field(default_factory=CandleSettings)

    @property
    def capacity(self) -> int:
        return capacity(self.max_connections, self.max_instruments_per_connection)


def _time(text: str) -> dtime:
    h, m = hhmm(text)
    return dtime(h, m)


def load_settings(cfg: Config) -> DhanConfig:
    """:class:`DhanConfig` from a loaded ``dhan.toml`` (checked by :func:`feeds.settings.load`)."""
    k = "dhan."
    dc = DhanConfig(file=str(cfg.file), **{n: cfg[k + n] for n in (
        "client_id", "api_url", "feed_url", "instrument_list_url", "instrument_list_cache", "token_file", "instruments_file",
        "instruments_from_table", "default_mode", "session_calendar", "connect_before_open", "stop_after_close",
        "max_connections", "max_instruments_per_connection", "requests_per_second", "requests_per_day",
        "status_interval")})
    for day, (open_, close) in cfg[k + "extra_sessions"].items():
        dc.extra_sessions[date.fromisoformat(day)] = (_time(open_), _time(close))
    dc.extra_holidays = [d if isinstance(d, date) else date.fromisoformat(str(d)) for d in cfg[k + "extra_holidays"]]
    dc.collector = Settings(feed_url=dc.feed_url, client_id=dc.client_id, silence_timeout=cfg[k + "silence_timeout"],
                            reconnect_max_delay=cfg[k + "reconnect_max_delay"])
    dc.candles = candle_settings(cfg)
    return dc


class SourceUnavailable(Exception):
    """The instruments could not be read (the database or Dhan's list is unreachable): worth a restart."""


def _table_lines(dsn: str, default_mode: str) -> list[InstrumentLine]:
    """The enabled rows of ``dhan_subscription`` as instrument lines."""
    from ..db import connect
    out = []
    with connect(dsn, application_name="feed-dhan") as conn:
        rows = conn.execute("SELECT exchange_segment, symbol, coalesce(mode, %s), priority FROM dhan_subscription "
                            "WHERE enabled ORDER BY priority DESC, exchange_segment, symbol",
                            (default_mode,)).fetchall()
    for i, (seg, sym, mode, prio) in enumerate(rows, 1):
        out.append(InstrumentLine(seg.strip().upper(), sym.strip().upper(), mode, prio, i))
    return out


def gather_lines(dc: DhanConfig, cli: tuple[str, ...], cli_file: str | None,
                 dsn: str | None) -> tuple[list[InstrumentLine], str]:
    """The instruments to collect (before resolution) and where they came
    from.  Raises ConfigError for a bad line, an empty list or more
    instruments than the connections carry; :class:`SourceUnavailable` when
    the table cannot be read."""
    if cli:
        text = "\n".join(part for arg in cli for part in arg.split(","))
        try:
            lines = parse_instruments(text, dc.default_mode, "--instrument")
        except InstrumentsError as e:
            raise ConfigError("--instrument", "command line", str(e)) from None
        source, where = "the command line", ("--instrument", "command line")
    else:
        path = cli_file or dc.instruments_file
        lines, names = [], []
        if path:
            try:
                lines = load_instruments(path, dc.default_mode)
                names.append(path)
            except InstrumentsError as e:
                missing = "No such file" in str(e)
                if not (missing and dc.instruments_from_table):
                    raise ConfigError("dhan.instruments_file", path if not missing else dc.file, str(e)) from None
        if dc.instruments_from_table:
            try:
                have = {ln.key for ln in lines}
                lines += [ln for ln in _table_lines(dsn or "", dc.default_mode) if ln.key not in have]
            except Exception as e:
                raise SourceUnavailable(f"cannot read the instruments from table dhan_subscription: "
                                        f"{_first_line(e)}") from None
            names.append("table dhan_subscription")
        source = " + ".join(names) or "nothing"
        where = ("dhan.instruments_file", path or dc.file)
    if not lines:
        raise ConfigError(where[0], where[1], f"no instruments to collect (read from {source})")
    if len(lines) > dc.capacity:
        raise ConfigError(where[0], where[1],
                          too_many_message(len(lines), dc.max_connections, dc.max_instruments_per_connection))
    return lines, source


def resolve(lines: list[InstrumentLine], master: InstrumentList | None) -> tuple[list[Subscription], list[str]]:
    """Subscriptions of ``lines`` through Dhan's instrument list (a line
    naming a security id in digits needs no list); returns them and the
    keys not found."""
    subs, unknown = [], []
    for ln in lines:
        inst = None
        if master is not None:
            try:
                inst = master.resolve(ln)
            except InstrumentsError:
                inst = None
        if inst is not None:
            subs.append(Subscription(SEGMENT_BY_NAME[inst.segment], inst.security_id, ln.mode, ln.priority, ln.key,
                                     inst.tick, inst.instrument))
        elif ln.symbol.isdigit():
            subs.append(Subscription(SEGMENT_BY_NAME[ln.segment], int(ln.symbol), ln.mode, ln.priority, ln.key))
        else:
            unknown.append(ln.key)
    return subs, unknown


def _store_instruments(dsn: str, master: InstrumentList, subs: list[Subscription]) -> None:
    """Upsert the resolved instruments into ``dhan_instrument`` (best effort)."""
    from ..db import connect
    from .wire import SEGMENT_NAMES
    rows = []
    for s in subs:
        inst = master.by_id.get((SEGMENT_NAMES[s.segment], s.security_id))
        if inst is not None:
            rows.append((inst.segment, inst.security_id, inst.symbol, inst.instrument, str(inst.tick), str(inst.lot)))
    if not rows:
        return
    try:
        with connect(dsn, application_name="feed-dhan") as conn:
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.executemany(
                        """INSERT INTO dhan_instrument (exchange_segment, security_id, symbol, instrument, tick_size,
                               lot_size, updated_at) VALUES (%s, %s, %s, %s, %s::numeric, %s::numeric, now())
                           ON CONFLICT (exchange_segment, security_id) DO UPDATE SET symbol = EXCLUDED.symbol,
                               instrument = EXCLUDED.instrument, tick_size = EXCLUDED.tick_size,
                               lot_size = EXCLUDED.lot_size, updated_at = now()""", rows)
    except Exception as e:
        log.warning("instrument names not stored in dhan_instrument (%s)", _first_line(e))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


MINUTE_NS = 60_000_000_000
NS = 1_000_000_000


def _last_final_minutes(dsn: str, subs: list[Subscription], since_ns: int) -> dict[int, int]:
    """The start (epoch ns) of each instrument's latest stored final
    one-minute candle starting at or after ``since_ns`` (the session's open),
    from ``dhan_candle``, by the candle key ``segment << 32 | security_id``."""
    from ..db import connect
    from .wire import SEGMENT_BY_NAME as codes
    with connect(dsn, application_name="feed-dhan") as conn:
        rows = conn.execute(
            "SELECT exchange_segment, security_id, max(bar_start) FROM dhan_candle WHERE interval_min = 1 AND final "
            "AND bar_start >= %s AND security_id = ANY(%s) GROUP BY exchange_segment, security_id",
            (datetime.fromtimestamp(since_ns / NS, UTC), [s.security_id for s in subs])).fetchall()
    return {codes[seg] << 32 | int(sid): int(ts.timestamp()) * NS for seg, sid, ts in rows if seg in codes}


def _units(price, scale: int) -> int:
    """A Decimal price from Dhan's charts as integer units of 1/``scale`` rupee (rounded half even)."""
    return int((price * scale).to_integral_value())


def _ist(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS, IST).strftime("%Y-%m-%d %H:%M:%S")


def history_job(dc: DhanConfig, dsn: str, access_token: str, candles: DhanCandles, subs: list[Subscription],
                open_ns: int, last_ns: int):
    """The history fill of a start inside a session: a coroutine function
    ``job(stop)`` that requests each instrument's missed one-minute candles
    (from the session's open, or after its last final one-minute candle
    stored today, to the minute starting at ``last_ns``) from Dhan's intraday
    charts API (:class:`feeds.dhan.rest.DhanRest`, within
    ``dhan.requests_per_second`` and ``dhan.requests_per_day``), priority
    instruments first, and hands them to the candle builder
    (:meth:`DhanCandles.seed`), which stores them with source ``history``.
    Dhan gives no trade count: history bars carry ``ticks`` 0; instruments
    without volume (ticker mode, indices) get bars without volume.
    Venue document: DhanHQ v2 "Historical Data", "Intraday Historical Data"."""
    from .rest import DailyBudget, DhanError, DhanRest, TokenError as RestTokenError, data_limiter
    from .wire import PRICE_DECIMALS

    async def job(stop: asyncio.Event) -> None:
        try:
            last = await asyncio.to_thread(_last_final_minutes, dsn, subs, open_ns)
        except Exception as e:
            log.warning("candles: stored candles not read (%s); filling from the session's open", _first_line(e))
            last = {}
        plan = []
        for s in sorted(subs, key=lambda s: -s.priority):
            key = candles.key_of(s.segment, s.security_id)
            first, keep = first_missing(open_ns, last.get(key), candles.s.intervals)
            if first <= last_ns:
                plan.append((s, key, first, keep))
        if not plan:
            return
        log.info("candles: filling the minutes missed (%s .. %s IST) of %d instrument(s) from Dhan's intraday "
                 "charts, at most %g requests a second", _ist(min(p[2] for p in plan)), _ist(last_ns), len(plan),
                 dc.requests_per_second)
        rest = DhanRest(dc.api_url, dc.client_id, access_token, limiter=data_limiter(dc.requests_per_second),
                        budget=DailyBudget(dc.requests_per_day))
        filled = bars_n = failed = 0
        try:
            for s, key, first, keep in plan:
                if stop.is_set():
                    break
                try:
                    got, _bad = await rest.intraday(s.security_id, s.segment_name,
                                                    s.instrument or ("INDEX" if s.segment == 0 else "EQUITY"),
                                                    _ist(first), _ist(last_ns + MINUTE_NS - NS))
                except RestTokenError as e:
                    log.error("candles: history fill stopped: Dhan refused the access token (%s)", e)
                    failed += 1
                    break
                except DhanError as e:
                    log.warning("candles: history of %s not filled: %s", s.key or s.security_id, e)
                    failed += 1
                    continue
                scale = 10 ** PRICE_DECIMALS[s.segment]
                bars = []
                for c in got:
                    t = int(c.start.timestamp()) * NS
                    if first <= t <= last_ns:
                        bars.append((t, _units(c.open, scale), _units(c.high, scale), _units(c.low, scale),
                                     _units(c.close, scale), None if s.volumeless else int(c.volume), 0))
                candles.seed(key, bars, keep, until_ns=last_ns + MINUTE_NS)
                filled += 1
                bars_n += len(bars)
        finally:
            await rest.close()
        log.info("candles: history fill %s: %d instrument(s) filled with %d minute(s), %d failed",
                 "stopped" if stop.is_set() else "done", filled, bars_n, failed)
    return job


def _collect(dc: DhanConfig, sk: dict, dsn: str, plan_conns, access_token: str, run_plan, unit: str,
             calendar, since_ns: int, reporters=()) -> int:
    """Run the collector through the runtime (waiting for the session first
    when started before it); returns the exit status."""
    cs = dc.candles
    tables = A.TABLES + ((CANDLE_TABLE,) if cs.enabled else ())
    svc = service.Service(unit, dsn, tables=tables, sink=sk, status_interval=dc.status_interval,
                          reporters=reporters)

    async def prepare(svc: service.Service) -> DhanCollector | None:
        if run_plan.start is not None and run_plan.start > datetime.now(UTC):
            line = (f"waiting for the session: {run_plan.reason}; connecting at "
                    f"{run_plan.start.astimezone(IST):%Y-%m-%d %H:%M} IST")
            if not await svc.wait_until(run_plan.start, line):
                return None
        dc.collector.watchdog_interval = svc.watchdog_interval
        candles = history = None
        if cs.enabled:
            sessions = always() if calendar is None else calendar_sessions(calendar)
            subs = [s for conn in plan_conns for s in conn]
            candles = DhanCandles(cs, sessions, subs, svc.sink, since_ns=since_ns)
            window = sessions.window(since_ns)
            note = ""
            # history only for a real session (without a calendar every UTC day is one window)
            if cs.fill_from_history and calendar is not None and window is not None and since_ns > window[0]:
                open_ns, close_ns = window
                start_min = since_ns // MINUTE_NS * MINUTE_NS
                # once the start minute can no longer be revised by a late tick: its history bar replaces it
                when = min(start_min + MINUTE_NS, close_ns) + int((cs.lateness + cs.grace) * NS)
                history = (when, history_job(dc, svc.dsn, access_token, candles, subs, open_ns, start_min))
                note = (f"; started inside the session: the minutes missed up to {_ist(start_min)[11:16]} IST come "
                        f"from Dhan's intraday charts at {_ist(when)[11:19]} IST")
            log.info("candles: %s min, aligned to the session's open, closed %.1f s after their end%s",
                     ", ".join(map(str, cs.intervals)), cs.grace, note)
        return DhanCollector(dc.collector, access_token, plan_conns, svc.sink, svc.health, until=run_plan.stop,
                             candles=candles, history=history)
    return svc.run(prepare)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="FEEDS_DHAN_CONFIG", default="/etc/feeds/dhan.toml",
              show_default=True, help="TOML configuration file.")
@click.option("--instrument", "-i", "instruments", multiple=True,
              help="SEGMENT:SYMBOL [ticker|quote|full] [priority] (repeatable, or comma-separated); "
                   "replaces the configured list.")
@click.option("--instruments-file", default=None, help="Read the instrument list from this file instead.")
@click.option("--at", "at", default=None,
              help="Print the plan for a start at this ISO time (e.g. 2024-11-01T09:10+05:30) and exit.")
@click.option("--unit", envvar="FEEDS_UNIT", default="feed-dhan.service", help="Name used for the heartbeat row.")
@exit_on_config_error
def main(config_path: str, instruments: tuple[str, ...], instruments_file: str | None, at: str | None,
         unit: str) -> None:
    """Collect Dhan's live market feed (ticker, quote, full) during NSE sessions into PostgreSQL."""
    since_ns = time.time_ns()
    cfg = service.start(config_path, DHAN_FILE)
    dc = load_settings(cfg)
    sk = service.sink_settings(cfg)
    dsn = database_dsn(cfg)
    reporters = service.reporters(cfg, unit)
    try:
        lines, source = gather_lines(dc, instruments, instruments_file, dsn)
    except SourceUnavailable as e:
        log.error("%s", e)
        sys.exit(1)
    calendar = None
    if dc.session_calendar == "XNSE":
        try:
            calendar = calendars.ExchangeCalendar("XNSE", extra_sessions=dc.extra_sessions,
                                                  extra_holidays=dc.extra_holidays)
        except ValueError as e:
            raise ConfigError("dhan.extra_sessions", dc.file, str(e)) from None
    run_plan = calendars.plan_run(service.run_time(at, IST), calendar, exchange="NSE",
                                  connect_before=timedelta(seconds=dc.connect_before_open),
                                  stop_after=timedelta(seconds=dc.stop_after_close))
    service.plan_or_exit(run_plan, at, IST, "IST")
    try:
        tok = TokenStore(dc.token_file).load_current(dc.client_id)
    except TokenError as e:
        print(f"feed-dhan: {e}", file=sys.stderr, flush=True)
        sys.exit(EX_NOPERM)
    master = None
    if not all(ln.symbol.isdigit() for ln in lines):
        try:
            text = asyncio.run(refresh_cache(dc.instrument_list_url, dc.instrument_list_cache))
        except InstrumentsError as e:
            log.error("%s", e)
            sys.exit(1)
        master = InstrumentList(text)
        if master.malformed:
            log.warning("Dhan's instrument list: %d row(s) not understood, skipped", master.malformed)
    subs, unknown = resolve(lines, master)
    if unknown:
        log.warning("%d instrument(s) not in Dhan's instrument list, skipped: %s%s", len(unknown),
                    ", ".join(unknown[:20]), " ..." if len(unknown) > 20 else "")
    if not subs:
        raise ConfigError("dhan.instruments_file", dc.instruments_file or dc.file,
                          f"none of the {len(lines)} instruments is in Dhan's instrument list")
    try:
        plan_conns = plan_connections(subs, dc.max_instruments_per_connection, dc.max_connections)
    except TooManyInstruments as e:
        raise ConfigError("dhan.instruments_file", dc.instruments_file or dc.file, str(e)) from None
    if master is not None:
        _store_instruments(dsn, master, subs)
    modes = {m: sum(1 for s in subs if s.mode == m) for m in ("full", "quote", "ticker")}
    log.info("feed-dhan starting: config %s, %d instruments from %s (full %d, quote %d, ticker %d) over %d "
             "connection(s) of at most %d, feed %s, %s; token %s", config_path, len(subs), source, modes["full"],
             modes["quote"], modes["ticker"], len(plan_conns), dc.max_instruments_per_connection, dc.feed_url,
             run_plan.reason, tok.describe())
    rc = _collect(dc, sk, dsn, plan_conns, tok.access_token, run_plan, unit, calendar, since_ns,
                  reporters=reporters)
    if rc == RC_TOKEN:
        print("feed-dhan: Dhan refused the access token during the session; run feed-dhan-token",
              file=sys.stderr, flush=True)
    sys.exit(rc)
