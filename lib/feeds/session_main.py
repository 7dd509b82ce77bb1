"""Entry plumbing of the collectors that run during NSE sessions
(``feed-zerodha``, ``feed-dhan``) and of their token renewers.

What they share: the settings (:class:`SessionConfig`,
:func:`load_session_config`, :func:`extra_days`), the command-line options
(:func:`config_option`, :func:`collector_options`), the start
(:func:`begin`, :func:`gathered`), the check of the resolved instruments
(:func:`check_resolved`), one run (:func:`collect` of a
:class:`SessionFeed`: wait for the session, build candles, fill the
minutes missed by a start inside the session from the venue's history, run
the collector under :class:`feeds.service.Service`) and the bookkeeping of
that history fill (:func:`stored_minutes`, :func:`missed_minutes`,
:func:`log_fill_start`, :func:`log_fill_end`).  A venue's ``main.py``
keeps what differs: its instrument syntax and list, its token, its
collector and candle classes, and its history requests.  Times in the
journal are IST.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timezone
from typing import Any, TypeVar

import click

from .timetext import ist_text
from .settings import time_of_day
from .calendars import IST
from .config import first_line
from .candles import MINUTE_NS, SECOND_NS, CandleSettings, candle_settings, first_missing, sessions_of
from .config import Config, ConfigError

UTC = timezone.utc

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


class SourceUnavailable(Exception):
    """The instruments could not be read (the database or the venue's
    instrument list is unreachable): worth a restart."""




# ----------------------------------------------------------------------------- configuration

#: The keys of ``[<venue>]`` every session collector reads into :class:`SessionConfig`.
SESSION_KEYS = ("api_url", "token_file", "instruments_file", "instruments_from_table", "default_mode",
                "session_calendar", "connect_before_open", "stop_after_close", "max_connections",
                "max_instruments_per_connection", "status_interval")


@dataclass(kw_only=True)
class SessionConfig:
    """The settings every session collector has (keyword arguments only):
    ``file`` (the configuration's path), the keys of :data:`SESSION_KEYS`
    (``connect_before_open`` and ``stop_after_close`` in seconds),
    ``extra_sessions``/``extra_holidays`` (:func:`extra_days`) and
    ``candles``.  A venue's subclass adds its own keys and its collector's
    settings (``collector``)."""
    file: str
    api_url: str
    token_file: str
    instruments_file: str
    instruments_from_table: bool
    default_mode: str
    session_calendar: str
    connect_before_open: float
    stop_after_close: float
    max_connections: int
    max_instruments_per_connection: int
    status_interval: float = 10.0
    extra_sessions: dict[date, tuple[dtime, dtime]] = field(default_factory=dict)
    extra_holidays: list[date] = field(default_factory=list)
    candles: CandleSettings = field(default_factory=CandleSettings)

    @property
    def capacity(self) -> int:
        """Instruments the connections carry: ``max_connections`` x ``max_instruments_per_connection``."""
        return self.max_connections * self.max_instruments_per_connection


C = TypeVar("C", bound=SessionConfig)


def load_session_config(cls: type[C], cfg: Config, section: str, keys: Iterable[str] = ()) -> C:
    """A ``cls`` from ``[section]`` of a loaded configuration (checked by
    :func:`feeds.settings.load`): :data:`SESSION_KEYS` and the venue's
    ``keys``, the extra sessions and holidays, and ``[candles]``."""
    config = cls(file=cfg.file, **{n: cfg[f"{section}.{n}"] for n in (*SESSION_KEYS, *keys)})
    config.extra_sessions, config.extra_holidays = extra_days(cfg, section)
    config.candles = candle_settings(cfg)
    return config


def extra_days(cfg: Config, section: str) -> tuple[dict[date, tuple[dtime, dtime]], list[date]]:
    """``(extra_sessions, extra_holidays)`` of ``[section]`` in a loaded
    configuration (checked by :func:`feeds.settings.load`): date -> (open,
    close) IST, and the dates without a session."""
    sessions = {date.fromisoformat(day): (time_of_day(open_), time_of_day(close))
                for day, (open_, close) in cfg[section + ".extra_sessions"].items()}
    holidays = [d if isinstance(d, date) else date.fromisoformat(str(d)) for d in cfg[section + ".extra_holidays"]]
    return sessions, holidays


# ----------------------------------------------------------------------------- command line

def config_option(envvar: str, default: str):
    """The ``--config`` option (``config_path``) of a program reading ``default``."""
    return click.option("--config", "config_path", envvar=envvar, default=default, show_default=True,
                        help="TOML configuration file.")


def collector_options(envvar: str, config_default: str, instrument_help: str, unit_default: str):
    """The options of a session collector, in this order: ``--config``,
    ``--instrument``/``-i`` (``instrument_help`` names one instrument's
    syntax), ``--instruments-file``, ``--at`` and ``--unit``."""
    options = (
        config_option(envvar, config_default),
        click.option("--instrument", "-i", "instruments", multiple=True,
                     help=f"{instrument_help} (repeatable, or comma-separated); replaces the configured list."),
        click.option("--instruments-file", default=None, help="Read the instrument list from this file instead."),
        click.option("--at", "at", default=None,
                     help="Print the plan for a start at this ISO time (e.g. 2024-11-01T09:10+05:30) and exit."),
        click.option("--unit", envvar="FEEDS_UNIT", default=unit_default, help="Name used for the heartbeat row."),
    )

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


@dataclass
class Start:
    """What a collector reads first: ``since_ns`` (its start, epoch ns), the
    configuration, the venue's ``settings``, the ``[sink]`` settings, the
    database DSN and the reporters of ``unit``."""
    since_ns: int
    cfg: Config
    settings: Any
    sink: dict
    dsn: str
    reporters: list


def begin(config_path: str, schema, unit: str, load_settings: Callable[[Config], Any]) -> Start:
    """The start of a collector: logging, the configuration file read as
    ``schema``, the venue's settings (``load_settings(cfg)``), then the
    sink, DSN and reporters.  Raises ConfigError."""
    from . import service
    from .settings import database_dsn
    since_ns = time.time_ns()
    cfg = service.start(config_path, schema)
    settings = load_settings(cfg)
    return Start(since_ns, cfg, settings, service.sink_settings(cfg), database_dsn(cfg), service.reporters(cfg, unit))


def gathered(gather: Callable[[], S], log: logging.Logger) -> S:
    """``gather()`` (the instruments and their source); exits 1 after one
    error line when it raises :class:`SourceUnavailable`."""
    try:
        return gather()
    except SourceUnavailable as e:
        log.error("%s", e)
        sys.exit(1)


def check_resolved(subs: list, unknown: list[str], requested: int, venue: str, key: str, where: str,
                   log: logging.Logger) -> None:
    """After resolving ``requested`` instruments against the venue's list
    (``venue``: "Kite's", "Dhan's"): a warning naming the ``unknown`` keys
    (the first 20); ConfigError (setting ``key`` of file ``where``) when
    none resolved."""
    if unknown:
        log.warning("%d instrument(s) not in %s instrument list, skipped: %s%s", len(unknown), venue,
                    ", ".join(unknown[:20]), " ..." if len(unknown) > 20 else "")
    if not subs:
        raise ConfigError(key, where, f"none of the {requested} instruments is in {venue} instrument list")


# ----------------------------------------------------------------------------- one run

@dataclass(frozen=True)
class SessionFeed:
    """What one venue's collector brings to :func:`collect`.

    ``program``: its name in stderr lines (``feed-dhan``); ``venue``:
    "Dhan", "Kite"; ``renewer``: the token program to run after a refusal;
    ``tables``: its sink tables, ``candle_table`` joining them with candles
    enabled; ``collector(settings, access_token, connections, sink, health,
    until=, candles=, history=)`` and ``candles(candle_settings, sessions,
    subscriptions, sink, since_ns=)`` its classes; ``history_job(config,
    dsn, access_token, candles, subscriptions, open_ns, last_ns)`` makes the
    history fill of a start inside a session, from ``history_source``;
    ``rc_token``: the collector's exit status when the venue refuses the
    token during the session; ``log``: its logger."""
    program: str
    venue: str
    renewer: str
    tables: tuple
    candle_table: Any
    collector: Callable[..., Any]
    candles: Callable[..., Any]
    history_job: Callable[..., Any]
    history_source: str
    rc_token: int
    log: logging.Logger


def collect(feed: SessionFeed, config, start: Start, connections: list[list], access_token: str, run_plan,
            unit: str, calendar) -> int:
    """Run ``feed``'s collector over the planned ``connections`` (lists of
    subscriptions) through :class:`feeds.service.Service`; returns its exit
    status, after a line on stderr when the venue refused the token.
    ``config``: the venue's settings (``status_interval``, ``candles``,
    ``collector``, the collector's settings, whose ``watchdog_interval`` is
    set here).

    Started before the session (``run_plan.start`` ahead), it waits
    (READY, STATUS=, watchdog pings) until then.  With candles enabled they
    are built over the calendar's sessions
    (:func:`feeds.candles.sessions_of`); started inside a session (with
    ``candles.fill_from_history``), the minutes missed come from the
    venue's history once the start minute can no longer be revised by a
    late tick (its history bar replaces it)."""
    from . import service
    cs: CandleSettings = config.candles
    log = feed.log
    subs = [sub for conn in connections for sub in conn]
    svc = service.Service(unit, start.dsn, tables=feed.tables + ((feed.candle_table,) if cs.enabled else ()),
                          sink=start.sink, status_interval=config.status_interval, reporters=start.reporters)
    since_ns = start.since_ns

    async def prepare(svc: service.Service):
        if run_plan.start is not None and run_plan.start > datetime.now(UTC):
            line = (f"waiting for the session: {run_plan.reason}; connecting at "
                    f"{run_plan.start.astimezone(IST):%Y-%m-%d %H:%M} IST")
            if not await svc.wait_until(run_plan.start, line):
                return None
        config.collector.watchdog_interval = svc.watchdog_interval
        candles = history = None
        if cs.enabled:
            sessions = sessions_of(calendar)
            candles = feed.candles(cs, sessions, subs, svc.sink, since_ns=since_ns)
            window = sessions.window(since_ns)
            note = ""
            # history only for a real session (without a calendar every UTC day is one window)
            if cs.fill_from_history and calendar is not None and window is not None and since_ns > window[0]:
                open_ns, close_ns = window
                start_min = since_ns // MINUTE_NS * MINUTE_NS
                # once the start minute can no longer be revised by a late tick: its history bar replaces it
                when = min(start_min + MINUTE_NS, close_ns) + int((cs.lateness + cs.grace) * SECOND_NS)
                history = (when, feed.history_job(config, svc.dsn, access_token, candles, subs, open_ns, start_min))
                note = (f"; started inside the session: the minutes missed up to {ist_text(start_min)[11:16]} IST "
                        f"come from {feed.history_source} at {ist_text(when)[11:19]} IST")
            log.info("candles: %s min, aligned to the session's open, closed %.1f s after their end%s",
                     ", ".join(map(str, cs.intervals)), cs.grace, note)
        return feed.collector(config.collector, access_token, connections, svc.sink, svc.health,
                              until=run_plan.stop, candles=candles, history=history)
    rc = svc.run(prepare)
    if rc == feed.rc_token:
        print(f"{feed.program}: {feed.venue} refused the access token during the session; run {feed.renewer}",
              file=sys.stderr, flush=True)
    return rc


# ----------------------------------------------------------------------------- the history fill

def stored_minutes(read: Callable[[], dict[K, int]], log: logging.Logger) -> dict[K, int]:
    """``read()``: each instrument's latest final one-minute candle stored
    since the session's open (epoch ns, by candle key); empty after a
    warning when the table cannot be read (the fill starts at the open)."""
    try:
        return read()
    except Exception as e:
        log.warning("candles: stored candles not read (%s); filling from the session's open", first_line(e))
        return {}


def missed_minutes(items: Iterable[tuple[S, K]], last: dict[K, int], open_ns: int,
                   intervals: Iterable[int]) -> list[tuple[S, K, int, int]]:
    """``(item, key, request_from_ns, keep_from_ns)`` for each ``(item,
    key)`` in order (:func:`feeds.candles.first_missing`, from the
    session's open or after ``last[key]``)."""
    intervals = tuple(intervals)
    return [(item, key, *first_missing(open_ns, last.get(key), intervals)) for item, key in items]


def log_fill_start(log: logging.Logger, first_ns: int, last_ns: int, instruments: int, source: str,
                   per_second: float) -> None:
    """The journal line that opens a history fill."""
    log.info("candles: filling the minutes missed (%s .. %s IST) of %d instrument(s) from %s, at most %g "
             "requests a second", ist_text(first_ns), ist_text(last_ns), instruments, source, per_second)


def log_fill_end(log: logging.Logger, stopped: bool, filled: int, bars: int, failed: int, more: str = "") -> None:
    """The journal line that closes a history fill (``more`` ends it)."""
    log.info("candles: history fill %s: %d instrument(s) filled with %d minute(s), %d failed%s",
             "stopped" if stopped else "done", filled, bars, failed, more)
