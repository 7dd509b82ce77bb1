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
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import click

from ..config import EX_NOPERM, Config, ConfigError, exit_on_config_error, first_line
from .. import calendars, service
from .. import session_main as M
from ..candles import MINUTE_NS, SECOND_NS as NS
from ..session_main import SourceUnavailable
from ..timetext import ist_text
from ..settings import DHAN_FILE
from . import adapter as A
from .candles import CANDLE_TABLE, DhanCandles
from .collector import RC_TOKEN, DhanCollector, Settings
from .connections import Subscription, TooManyInstruments, plan_connections, too_many_message
from .instruments import InstrumentLine, InstrumentList, InstrumentsError, load_instruments, parse_instruments
from .instruments import instrument_list
from .token import IST, TokenError, TokenStore
from .wire import SEGMENT_BY_NAME

log = logging.getLogger("feeds.dhan")
UTC = timezone.utc


@dataclass(kw_only=True)
class DhanConfig(M.SessionConfig):
    """The ``[dhan]`` settings feed-dhan uses (see :data:`feeds.settings.DHAN`;
    keyword arguments only)."""
    client_id: str
    feed_url: str
    instrument_list_url: str
    instrument_list_cache: str
    requests_per_second: float = 5.0
    requests_per_day: int = 100_000
    collector: Settings = field(default_factory=Settings)


def load_settings(cfg: Config) -> DhanConfig:
    """:class:`DhanConfig` from a loaded ``dhan.toml`` (checked by :func:`feeds.settings.load`)."""
    k = "dhan."
    dc = M.load_session_config(DhanConfig, cfg, "dhan", ("client_id", "feed_url", "instrument_list_url",
                                                         "instrument_list_cache", "requests_per_second",
                                                         "requests_per_day"))
    dc.collector = Settings(feed_url=dc.feed_url, client_id=dc.client_id, silence_timeout=cfg[k + "silence_timeout"],
                            reconnect_max_delay=cfg[k + "reconnect_max_delay"])
    return dc


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
                                        f"{first_line(e)}") from None
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
        log.warning("instrument names not stored in dhan_instrument (%s)", first_line(e))


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
        last = await asyncio.to_thread(M.stored_minutes, lambda: _last_final_minutes(dsn, subs, open_ns), log)
        items = [(s, candles.key_of(s.segment, s.security_id)) for s in sorted(subs, key=lambda s: -s.priority)]
        # only instruments with a minute missing up to the start (their larger candles follow from it)
        plan = [p for p in M.missed_minutes(items, last, open_ns, candles.s.intervals) if p[3] <= last_ns]
        if not plan:
            return
        M.log_fill_start(log, min(p[2] for p in plan), last_ns, len(plan), "Dhan's intraday charts",
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
                                                    ist_text(first), ist_text(last_ns + MINUTE_NS - NS))
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
        M.log_fill_end(log, stop.is_set(), filled, bars_n, failed)
    return job


#: What :func:`feeds.session_main.collect` runs for feed-dhan.
FEED = M.SessionFeed(program="feed-dhan", venue="Dhan", renewer="feed-dhan-token", tables=A.TABLES,
                     candle_table=CANDLE_TABLE, collector=DhanCollector, candles=DhanCandles, history_job=history_job,
                     history_source="Dhan's intraday charts", rc_token=RC_TOKEN, log=log)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@M.collector_options("FEEDS_DHAN_CONFIG", "/etc/feeds/dhan.toml", "SEGMENT:SYMBOL [ticker|quote|full] [priority]",
                     "feed-dhan.service")
@exit_on_config_error
def main(config_path: str, instruments: tuple[str, ...], instruments_file: str | None, at: str | None,
         unit: str) -> None:
    """Collect Dhan's live market feed (ticker, quote, full) during NSE sessions into PostgreSQL."""
    st = M.begin(config_path, DHAN_FILE, unit, load_settings)
    dc, dsn = st.settings, st.dsn
    lines, source = M.gathered(lambda: gather_lines(dc, instruments, instruments_file, dsn), log)
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
            master = instrument_list(dc.instrument_list_url, dc.instrument_list_cache)
        except InstrumentsError as e:
            log.error("%s", e)
            sys.exit(1)
    subs, unknown = resolve(lines, master)
    M.check_resolved(subs, unknown, len(lines), "Dhan's", "dhan.instruments_file", dc.instruments_file or dc.file,
                     log)
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
    sys.exit(M.collect(FEED, dc, st, plan_conns, tok.access_token, run_plan, unit, calendar))
