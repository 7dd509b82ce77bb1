"""Every configuration setting, declared once, and the one function that loads a file.

A :class:`Setting` gives a dotted key, its type, default, check and a
one-line meaning.  A :class:`Schema` is a kind of configuration file (what
``feeds.toml``, ``binance.toml``, ``kite.toml`` or ``ibkr.toml`` may hold):
the settings it declares and, where one program differs, its own defaults.
:func:`load` reads a file, refuses unknown keys, checks every type and value
and fills in the defaults; the programs then read ``cfg["sink.batch_rows"]``.

Types: ``str``, ``int`` (not a boolean), ``float`` (an integer is accepted),
``bool``, ``list[T]`` (every item a T), and ``dict[str, T]`` for a table
whose entries the operator names (``[binance.stale_after]``,
``[retention]``): there ``check`` applies to each value and ``entry`` to
each name, and an error names the entry (``retention.binance_agg_trade``).
A default of :data:`REQUIRED` makes the key mandatory; a default of None
leaves it unset (the program that needs it asks with ``cfg.require``).

Errors are :class:`feeds.config.ConfigError`: one line naming the key and the
file; the programs exit 78.
"""
from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, time
from pathlib import Path
from typing import Any

from .config import first_line as _first_line
from .binance import adapter as binance_adapter
from .config import Config, ConfigError, non_negative, one_of, positive, within
from .dhan import limits as dhan_limits
from .ibkr import pacing as ibkr_pacing
from .kite import adapter as kite_adapter
from .kite.instruments import MAX_CONNECTIONS_PER_API_KEY, MAX_INSTRUMENTS_PER_CONNECTION
from .kite.login import CHROMIUM_FLAGS, Selectors
from .plausible import INT64_MAX

REQUIRED = object()
"""Default of a setting that must be given."""

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Setting:
    """One configuration key.

    ``key``: dotted path (``sink.flush_interval``).  ``type``: see the module
    docstring.  ``default``: the value when the file does not set it
    (:data:`REQUIRED`: must be set; None: unset).  ``meaning``: one line.
    ``check(value)`` returns an error text or None.  ``entry(name)``: for
    ``dict`` settings, the check of each entry's name.
    """

    key: str
    type: Any
    default: Any
    meaning: str
    check: Check | None = None
    entry: Check | None = None


@dataclass(frozen=True)
class Schema:
    """A kind of configuration file: ``name`` (e.g. ``binance.toml``),
    ``programs`` that read it, its ``settings`` and per-file ``defaults``
    (key -> default) where it differs from the declaration."""

    name: str
    programs: str
    settings: tuple[Setting, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        keys = [s.key for s in self.settings]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"settings declared twice in {self.name}: {sorted(dup)}")
        for k in self.defaults:
            if k not in keys:
                raise ValueError(f"{self.name}: default for undeclared key {k}")

    def setting(self, key: str) -> Setting | None:
        return self.by_key.get(key)

    @property
    def by_key(self) -> dict[str, Setting]:
        return {s.key: s for s in self.settings}

    def default(self, key: str) -> Any:
        return self.defaults[key] if key in self.defaults else self.by_key[key].default


# ----------------------------------------------------------------------------- checks



def dsn_check(v: str) -> str | None:
    """A libpq connection string (``key=value ...`` or a ``postgresql://`` URI)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict
    try:
        conninfo_to_dict(v)
    except ProgrammingError as e:
        # libpq quotes the token it stumbled on, which may be part of a password
        return "not a valid libpq connection string (" + re.sub(r'"[^"]*"', '"..."', _first_line(e)) + ")"
    return None


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


_URL = re.compile(r"^(https?|wss?)://[^\s/]+")


def url(*schemes: str) -> Check:
    def check(v: str):
        if not _URL.match(v) or v.split(":", 1)[0] not in schemes:
            return f"not a {'/'.join(schemes)} URL: {v!r}"
        return None
    return check


def _subset(allowed, what: str) -> Check:
    allowed = tuple(allowed)

    def check(v: list):
        bad = [x for x in v if x not in allowed]
        if not v or bad:
            return f"must be a non-empty subset of {list(allowed)}" + (f" ({bad[0]!r} is not)" if bad else "")
        return None
    return check


def _symbols(v: list) -> str | None:
    for s in v:
        if not re.fullmatch(r"[A-Za-z0-9_]+", s):
            return f"not a symbol: {s!r}"
    return None


def shard_check(v: str) -> str | None:
    """``KofN`` with 1 <= K <= N, or empty (every symbol)."""
    if not v:
        return None
    m = re.fullmatch(r"(\d+)of(\d+)", v)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        return f"expected KofN with 1 <= K <= N (e.g. 1of2), got {v!r}"
    return None


def _iso_date(v) -> str | None:
    if isinstance(v, date):
        return None
    try:
        date.fromisoformat(str(v))
    except ValueError:
        return f"not a date YYYY-MM-DD: {v!r}"
    return None


def _dates(v: list) -> str | None:
    for d in v:
        err = _iso_date(d)
        if err:
            return err
    return None


def _earliest(v: str) -> str | None:
    return None if v == "" or _iso_date(v) is None else "expected YYYY-MM-DD or an empty string"


def hhmm(v) -> tuple[int, int] | None:
    """``"HH:MM"`` -> (hour, minute), or None when not a time of day."""
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", v.strip()) if isinstance(v, str) else None
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        return None
    return int(m.group(1)), int(m.group(2))


def time_of_day(v: str) -> time:
    """A ``"HH:MM"`` setting already checked by :func:`hhmm` -> :class:`datetime.time`."""
    h, m = hhmm(v)
    return time(h, m)


def _session_hours(v: list) -> str | None:
    if len(v) == 2 and all(hhmm(h) for h in v) and hhmm(v[0]) < hhmm(v[1]):
        return None
    return 'expected ["HH:MM", "HH:MM"] (open, close in IST)'


def _table_name(name: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", name) else \
        "not a table name"


def _seconds_list(v: list) -> str | None:
    return None if all(x >= 0 for x in v) else "must be a list of seconds >= 0"


# ----------------------------------------------------------------------------- declarations

DATABASE = (
    Setting("database.dsn", str, None, "libpq connection string of the feeds database "
            "(FEEDS_DSN in the environment overrides it)", dsn_check),
    Setting("database.password_file", str, "", "file whose first line is the database password "
            "(mode 0600); empty: none"),
)

SINK = (
    Setting("sink.spool_dir", str, "/var/lib/feeds", "spool directory when systemd gives no StateDirectory="),
    Setting("sink.flush_interval", float, 0.2, "seconds a row may wait before its batch is written",
            lambda v: None if 0 < v <= 1.0 else "must be > 0 and <= 1.0 s"),
    Setting("sink.batch_rows", int, 20_000, "pending rows that start a write at once", positive),
    Setting("sink.max_pending", int, 200_000, "rows waiting for the writer before reading pauses "
            "(back-pressure)", positive),
    Setting("sink.flow_timeout", float, 20.0, "seconds without data or storage progress before "
            "watchdog pings stop", positive),
    Setting("sink.statement_timeout", float, 10.0, "seconds a sink statement may run before PostgreSQL "
            "cancels it", positive),
    Setting("sink.lock_timeout", float, 5.0, "seconds a sink statement may wait for a lock", positive),
    Setting("sink.spool_max_bytes", int, 2 << 30, "largest spool on disk, in bytes, before back-pressure",
            lambda v: None if v >= 1 << 20 else "must be >= 1048576 (1 MiB)"),
)

RETENTION = (
    Setting("retention", dict[str, int], {}, "days of daily partitions kept, per partitioned table "
            "(feed-maintain)", lambda v: None if v >= 1 else "must be an integer number of days >= 1",
            entry=_table_name),
)

MAINTAIN = (
    Setting("maintain.lock_timeout", float, 5.0, "seconds feed-maintain's DDL waits for a table lock "
            "(collectors queue behind a waiting lock)", positive),
    Setting("maintain.statement_timeout", float, 60.0, "seconds one feed-maintain statement may run",
            positive),
    Setting("maintain.attempts", int, 5, "tries per table when a lock is not granted in time",
            within(1, 20)),
    Setting("maintain.retry_delay", float, 2.0, "seconds before the second try; doubled for each "
            "further one (at most 30 s)", positive),
)

_KINDS = binance_adapter.KINDS
_ID_KINDS = (binance_adapter.AGG_TRADE, binance_adapter.BOOK_TICKER)
BINANCE = (
    Setting("binance.rest_url", str, REQUIRED, "Binance USD-M futures REST base URL", url("http", "https")),
    Setting("binance.ws_url", str, REQUIRED, "Binance USD-M futures WebSocket base URL", url("ws", "wss")),
    Setting("binance.symbols", list[str], [], "symbols to collect; empty: every perpetual in TRADING "
            "status from exchangeInfo", _symbols),
    Setting("binance.quote_assets", list[str], [], "restrict the automatic list to these quote assets"),
    Setting("binance.streams", list[str], list(_KINDS), "stream kinds collected per symbol",
            _subset(_KINDS, "stream kinds")),
    Setting("binance.kline_intervals", list[str], ["1m"], "kline intervals collected",
            _subset(binance_adapter.INTERVAL_MS, "intervals")),
    Setting("binance.max_streams_per_connection", int, 200, "streams per combined-stream connection",
            within(1, 1024, "Binance limit")),
    Setting("binance.rollover_after", float, 23 * 3600.0, "seconds after which a connection is replaced "
            "(Binance closes at 24 h)",
            lambda v: None if 0 < v < 86400 else "must be > 0 and < 86400 (Binance closes at 24 h)"),
    Setting("binance.backoff_max", float, 60.0, "reconnect backoff cap in seconds", positive),
    Setting("binance.rest_weight_budget", int, 1200, "REST request weight per minute for gap fills",
            within(1, 2400, "Binance limit per minute")),
    Setting("binance.gap_fill_max_trades", int, 1_000_000, "largest aggTrade gap filled from REST per symbol",
            positive),
    Setting("binance.resume_lookback_hours", float, 48.0, "hours looked back at start for the last stored "
            "aggTrade and kline", non_negative),
    Setting("binance.status_interval", float, 10.0, "seconds between status lines", positive),
    Setting("binance.symbols_refresh", float, 3600.0, "seconds between exchangeInfo re-reads; 0 = never",
            non_negative),
    Setting("binance.shard", str, "", "collect share K of N of the symbols (KofN); empty: all", shard_check),
    Setting("binance.stale_after", dict[str, float], {}, "seconds of silence after which a stream kind's "
            "connection is replaced", non_negative,
            entry=lambda k: None if k in _KINDS else f"unknown stream kind; use one of {sorted(_KINDS)}"),
    Setting("binance.max_future_s", float, 600.0, "seconds a venue time may lie ahead of now; later ones "
            "are malformed", within(1, 86400, unit="s")),
    Setting("binance.max_id_jump", dict[str, int], {}, "per id-carrying kind, the largest step of an id "
            "(aggTrade a, bookTicker u) accepted on one message; unset: aggTrade 1000000, bookTicker "
            "10000000000", within(1, INT64_MAX),
            entry=lambda k: None if k in _ID_KINDS else f"no id to guard; use one of {sorted(_ID_KINDS)}"),
    Setting("binance.id_confirmations", int, 2, "further messages that must continue a larger id step "
            "before it is accepted", within(1, 20)),
    Setting("binance.kline_check", bool, True, "compare each closed one-minute kline with the candle "
            "built from the stored aggTrades; a mismatch triggers the aggTrade gap fill of that minute"),
    Setting("binance.id_adopt_lone_after", float, 60.0, "seconds after which the held first ids of a "
            "symbol without state are accepted when nothing contradicts them", within(0, 3600, unit="s")),
)

KITE = (
    Setting("kite.api_key", str, REQUIRED, "the Kite Connect app's api_key", _not_empty),
    Setting("kite.api_url", str, "https://api.kite.trade", "Kite Connect REST base URL", url("http", "https")),
    Setting("kite.ticker_url", str, "wss://ws.kite.trade", "Kite ticker WebSocket URL", url("ws", "wss")),
    Setting("kite.login_url", str, "https://kite.zerodha.com", "Kite login page base URL", url("http", "https")),
    Setting("kite.token_file", str, "/var/lib/feeds/kite/access_token.json", "access token file written by "
            "feed-kite-token"),
    Setting("kite.instruments_file", str, "/etc/feeds/kite-instruments.txt", "instrument list file "
            "(EXCHANGE:TRADINGSYMBOL [mode] a line)"),
    Setting("kite.instruments_from_table", bool, False, "also collect the enabled rows of kite_subscription"),
    Setting("kite.default_mode", str, "full", "mode of a line without one", one_of(*kite_adapter.MODES)),
    Setting("kite.session_calendar", str, "XNSE", "exchange calendar of the sessions; none: collect until "
            "stopped", one_of("XNSE", "none")),
    Setting("kite.connect_before_open", float, 300.0, "seconds before the open to connect",
            within(0, 3600, unit="s")),
    Setting("kite.stop_after_close", float, 300.0, "seconds after the close to stop", within(0, 3600, unit="s")),
    Setting("kite.max_connections", int, MAX_CONNECTIONS_PER_API_KEY, "ticker connections used",
            within(1, MAX_CONNECTIONS_PER_API_KEY, "Kite's limit per API key")),
    Setting("kite.max_instruments_per_connection", int, MAX_INSTRUMENTS_PER_CONNECTION,
            "instruments per ticker connection",
            within(1, MAX_INSTRUMENTS_PER_CONNECTION, "Kite's limit per connection")),
    Setting("kite.extra_sessions", dict[str, list[str]], {}, "sessions the installed calendar does not "
            "know: date = [open, close] IST", _session_hours,
            entry=lambda k: "keys must be dates YYYY-MM-DD" if _iso_date(k) else None),
    Setting("kite.extra_holidays", list, [], "days without a session the installed calendar does not know",
            _dates),
    Setting("kite.decoder", str, "native", "ticker frame decoder", one_of("native", "kiteticker")),
    Setting("kite.silence_timeout", float, 10.0, "seconds without any message before a connection is "
            "dropped and reconnected", within(1, 300, unit="s")),
    Setting("kite.status_interval", float, 10.0, "seconds between status lines", positive),
    Setting("kite.reconnect_max_delay", int, 30, "KiteTicker's longest wait between reconnects (s)",
            within(5, 300, "KiteTicker: >= 5", "s")),
    Setting("kite.reconnect_max_tries", int, 300, "KiteTicker's reconnect attempts",
            within(1, 300, "KiteTicker: <= 300")),
    Setting("kite.login.user_id", str, None, "Kite user id (feed-kite-token)", _not_empty),
    Setting("kite.login.api_secret_file", str, None, "file holding the app's api_secret (mode 0600)"),
    Setting("kite.login.password_file", str, None, "file holding the Kite password (mode 0600)"),
    Setting("kite.login.totp_secret_file", str, None, "file holding the base32 TOTP secret (mode 0600)"),
    Setting("kite.login.browser", str, "/usr/bin/chromium", "Chromium executable driven headless"),
    Setting("kite.login.browser_flags", list[str], list(CHROMIUM_FLAGS), "Chromium command-line flags"),
    Setting("kite.login.use_browser", bool, True, "log in with the browser"),
    Setting("kite.login.http_fallback", bool, True, "log in with the page's HTTP requests when the "
            "browser fails"),
    Setting("kite.login.timeout", float, 30.0, "seconds per login page step or request", positive),
    Setting("kite.login.attempts", int, 4, "login tries", within(1, 20)),
    Setting("kite.login.retry_delays", list[float], [15.0, 60.0, 180.0], "seconds between login tries "
            "(the last repeats)", _seconds_list),
    *(Setting(f"kite.login.selectors.{name}", str, getattr(Selectors, name), f"CSS selector of the login "
              f"page's {name.replace('_', ' ')} (comma list: first visible match)")
      for name in ("user_id", "password", "submit", "totp", "error")),
)

IBKR = (
    Setting("ibkr.host", str, "127.0.0.1", "TWS / IB Gateway host", lambda v: None if v.strip() else "empty"),
    Setting("ibkr.port", int, 7497, "TWS / IB Gateway API port", within(1, 65535)),
    Setting("ibkr.client_id", int, 71, "API clientId", within(0, 2**31 - 100)),
    Setting("ibkr.client_id_tries", int, 5, "clientIds tried when one is in use (326)", positive),
    Setting("ibkr.connect_timeout", float, 15.0, "seconds to wait for the API handshake", positive),
    Setting("ibkr.contracts_file", str, "/etc/feeds/contracts.csv", "the contracts to backfill (CSV)"),
    Setting("backfill.concurrency", int, 4, "historical requests open at once",
            within(1, ibkr_pacing.MAX_OPEN, f"IB allows {ibkr_pacing.MAX_OPEN} open requests")),
    Setting("backfill.reconnect_timeout", float, 600.0, "seconds to keep reconnecting before the run "
            "gives up", positive),
    Setting("backfill.what_to_show", str, "TRADES", "whatToShow of the bars",
            lambda v: None if v == "TRADES" else "only TRADES is backfilled"),
    Setting("backfill.use_rth", bool, True, "useRTH of the bars",
            lambda v: None if v else "must be true (sessions are regular trading hours)"),
    Setting("backfill.pacing_scale", float, 1.0, "1 = IB's pacing windows; smaller only for a scaled "
            "simulator", lambda v: None if 0 < v <= 1 else "must be > 0 and <= 1 (1 = IB's real limits)"),
    Setting("backfill.pacing_profile", str, ibkr_pacing.AUTO, "how IB's pacing rules are read: strict (60 "
            "requests in ten minutes for every bar size), documented (IB's page as written), auto (documented, "
            "adapting to IB's answers)", one_of(*ibkr_pacing.PROFILES)),
    Setting("backfill.max_concurrency", int, ibkr_pacing.DEFAULT_MAX_CONCURRENCY, "most requests in flight "
            "auto lets grow to", within(1, ibkr_pacing.MAX_OPEN, f"IB allows {ibkr_pacing.MAX_OPEN} open requests")),
    Setting("backfill.slow_answer", float, ibkr_pacing.DEFAULT_SLOW_ANSWER, "seconds: an answer slower "
            "than this counts as IB throttling (auto; multiplied by pacing_scale like IB's windows)", positive),
    Setting("backfill.relearn_hours", float, ibkr_pacing.DEFAULT_RELEARN / 3600, "hours a learned pacing "
            "profile is trusted before auto probes IB again", non_negative),
    Setting("backfill.days_per_request", int, 1, "most sessions one request of one-minute bars covers, on "
            "consecutive weekdays (durationStr N D; 1 = one session per request)",
            within(1, ibkr_pacing.MAX_DAYS_PER_REQUEST, "IB's 2000 bars per request")),
    Setting("backfill.keep_learned_when_scaled", bool, False, "with pacing_scale other than 1, still load and "
            "store what auto learns (tests against a simulator; otherwise it is neither, since it would describe "
            "the simulator, not IB)"),
)

# The planner and status table shared by feed-backfill (IBKR) and feed-dhan-backfill.
BACKFILL = (
    Setting("backfill.earliest", str, "", "never plan sessions before this date (YYYY-MM-DD); empty: "
            "the venue's earliest (IB's head timestamp; Dhan: dhan.history_years back)", _earliest),
    Setting("backfill.request_timeout", float, 120.0, "seconds without an answer before a request is "
            "cancelled and tried again", positive),
    Setting("backfill.max_attempts", int, 4, "tries per session and run for transient failures", positive),
    Setting("backfill.settle_minutes", float, 30.0, "minutes after a session's close before its bars "
            "are final", lambda v: None if v >= 0 else "must be >= 0"),
    Setting("backfill.status_interval", float, 30.0, "seconds between progress lines", positive),
)

def _minutes_list(v: list) -> str | None:
    if not v or any(not 1 <= m <= 1440 for m in v) or len(set(v)) != len(v):
        return "must be a non-empty list of distinct whole minutes from 1 to 1440"
    return None


def _ny_session_hours(v: list) -> str | None:
    if len(v) == 2 and all(hhmm(h) for h in v) and hhmm(v[0]) < hhmm(v[1]):
        return None
    return 'expected ["HH:MM", "HH:MM"] (open, close in America/New_York)'


# Candles built from ticks (feeds.candles), one declaration for every collector that builds them.
CANDLES = (
    Setting("candles.enabled", bool, True, "build and store candles from the collected trades"),
    Setting("candles.intervals", list[int], [1, 5, 15], "candle intervals in minutes, aligned to the "
            "session open", _minutes_list),
    Setting("candles.grace", float, 2.0, "seconds after a candle's end before the timer closes it",
            within(0, 60, unit="s")),
    Setting("candles.lateness", float, 10.0, "seconds after a candle's end during which a late trade "
            "still revises it; later trades are counted and logged", within(0, 3600, unit="s")),
    Setting("candles.fill_from_history", bool, True, "after a restart mid-session, fill the candles "
            "missed while down from the venue's historical minute data"),
)

IBKR_LIVE = (
    Setting("ibkr.live_client_id", int, 72, "API clientId of feed-ibkr (not the backfill's)",
            within(0, 2**31 - 100)),
    Setting("live.contracts_file", str, "/etc/feeds/ibkr-live.csv", "the contracts feed-ibkr collects "
            "(same CSV format and checks as contracts_file)"),
    Setting("live.tick_by_tick", list[str], [], "symbols also subscribed tick by tick (AllLast and "
            "BidAsk), within IB's limit on simultaneous tick-by-tick subscriptions"),
    Setting("live.max_tick_by_tick", int, 3, "tick-by-tick subscriptions this account may hold "
            "(each symbol takes two: AllLast and BidAsk)", within(0, 100)),
    Setting("live.market_data_type", str, "realtime", "market data type requested (reqMarketDataType)",
            one_of("realtime", "frozen", "delayed", "delayed-frozen")),
    Setting("live.session_calendar", str, "XNYS", "exchange calendar of the sessions; none: collect "
            "until stopped", one_of("XNYS", "none")),
    Setting("live.extra_sessions", dict[str, list[str]], {}, "sessions the installed calendar does not "
            "know: date = [open, close] America/New_York", _ny_session_hours,
            entry=lambda k: "keys must be dates YYYY-MM-DD" if _iso_date(k) else None),
    Setting("live.extra_holidays", list, [], "days without a session the installed calendar does not "
            "know", _dates),
    Setting("live.extended_hours", bool, False, "also collect pre-market (from 04:00) and post-market "
            "(to 20:00) New York time"),
    Setting("live.stop_after_close", float, 300.0, "seconds after the close to stop",
            within(0, 3600, unit="s")),
    Setting("live.silence_timeout", float, 60.0, "seconds a contract may stay silent in its session "
            "while others tick before it is resubscribed", within(1, 3600, unit="s")),
    Setting("live.reconnect_timeout", float, 600.0, "seconds to keep reconnecting to TWS before the "
            "run gives up (exit 1; systemd restarts it)", positive),
    Setting("live.status_interval", float, 10.0, "seconds between status lines", positive),
)

_DHAN_MODES = ("ticker", "quote", "full")
L = dhan_limits
DHAN = (
    Setting("dhan.client_id", str, REQUIRED, "the Dhan client id (dhanClientId)", _not_empty),
    Setting("dhan.api_url", str, "https://api.dhan.co", "DhanHQ v2 REST base URL", url("http", "https")),
    Setting("dhan.auth_url", str, "https://auth.dhan.co", "DhanHQ authentication base URL (PIN + TOTP "
            "token generation)", url("http", "https")),
    Setting("dhan.feed_url", str, "wss://api-feed.dhan.co", "DhanHQ v2 live market feed WebSocket URL",
            url("ws", "wss")),
    Setting("dhan.instrument_list_url", str, "https://images.dhan.co/api-data/api-scrip-master.csv",
            "Dhan's instrument list (CSV): security ids and exchange segments", url("http", "https")),
    Setting("dhan.instrument_list_cache", str, "/var/lib/feeds/dhan/api-scrip-master.csv", "local copy of "
            "the instrument list, fetched again when older than a day"),
    Setting("dhan.token_file", str, "/var/lib/feeds/dhan/access_token.json", "access token file written "
            "by feed-dhan-token (mode 0600)"),
    Setting("dhan.instruments_file", str, "/etc/feeds/dhan-instruments.txt", "instrument list file "
            "(SEGMENT:SYMBOL [mode] [priority] a line)"),
    Setting("dhan.instruments_from_table", bool, False, "also collect the enabled rows of dhan_subscription"),
    Setting("dhan.default_mode", str, "full", "mode of a line without one", one_of(*_DHAN_MODES)),
    Setting("dhan.session_calendar", str, "XNSE", "exchange calendar of the sessions; none: collect until "
            "stopped", one_of("XNSE", "none")),
    Setting("dhan.connect_before_open", float, 300.0, "seconds before the open to connect",
            within(0, 3600, unit="s")),
    Setting("dhan.stop_after_close", float, 300.0, "seconds after the close to stop", within(0, 3600, unit="s")),
    Setting("dhan.extra_sessions", dict[str, list[str]], {}, "sessions the installed calendar does not "
            "know: date = [open, close] IST", _session_hours,
            entry=lambda k: "keys must be dates YYYY-MM-DD" if _iso_date(k) else None),
    Setting("dhan.extra_holidays", list, [], "days without a session the installed calendar does not know",
            _dates),
    Setting("dhan.max_connections", int, L.MAX_CONNECTIONS_PER_USER, "feed connections used",
            within(1, L.MAX_CONNECTIONS_PER_USER, "Dhan's limit per user")),
    Setting("dhan.max_instruments_per_connection", int, L.MAX_INSTRUMENTS_PER_CONNECTION,
            "instruments per feed connection",
            within(1, L.MAX_INSTRUMENTS_PER_CONNECTION, "Dhan's limit per connection")),
    Setting("dhan.silence_timeout", float, 30.0, "seconds without any frame (Dhan pings every 10 s) "
            "before a connection is dropped and reconnected", within(1, 300, unit="s")),
    Setting("dhan.reconnect_max_delay", float, 30.0, "longest wait between reconnects (s)",
            within(1, 300, unit="s")),
    Setting("dhan.status_interval", float, 10.0, "seconds between status lines", positive),
    Setting("dhan.requests_per_second", float, float(L.DATA_REQUESTS_PER_SECOND), "data API requests "
            "per second (history, reconciliation)",
            within(0.1, L.DATA_REQUESTS_PER_SECOND, "Dhan's data API limit", "/s")),
    Setting("dhan.requests_per_day", int, L.DATA_REQUESTS_PER_DAY, "data API requests per day",
            within(1, L.DATA_REQUESTS_PER_DAY, "Dhan's data API limit")),
    Setting("dhan.history_days_per_request", int, L.MAX_INTRADAY_DAYS_PER_REQUEST, "days of one-minute "
            "candles asked in one intraday charts request",
            within(1, L.MAX_INTRADAY_DAYS_PER_REQUEST, "Dhan's range per request")),
    Setting("dhan.history_years", float, 5.0, "years of one-minute history planned when "
            "backfill.earliest is empty", within(0.01, 30, unit=" years")),
    Setting("dhan.reconcile", bool, True, "after the session, compare the live one-minute candles with "
            "Dhan's own (feed-dhan-backfill)"),
    Setting("dhan.login.method", str, "renew", "how feed-dhan-token gets a new token: renew (Dhan's "
            "token renewal endpoint, while the current token is valid) or totp (PIN + TOTP)",
            one_of("renew", "totp")),
    Setting("dhan.login.initial_token_file", str, "", "file holding a token generated on Dhan's web "
            "page (mode 0600), used when no token file exists yet (method renew)"),
    Setting("dhan.login.pin_file", str, None, "file holding the Dhan PIN (mode 0600; method totp)"),
    Setting("dhan.login.totp_secret_file", str, None, "file holding the base32 TOTP secret (mode 0600; "
            "method totp)"),
    Setting("dhan.login.timeout", float, 30.0, "seconds per token request", positive),
    Setting("dhan.login.attempts", int, 4, "token tries", within(1, 20)),
    Setting("dhan.login.retry_delays", list[float], [15.0, 60.0, 180.0], "seconds between token tries "
            "(the last repeats)", _seconds_list),
)
del L

_INDICATOR_SPEC = re.compile(r"^[A-Z][A-Z0-9_]*(\(\s*([a-z_]+\s*=\s*[-+0-9.eE]+\s*(,\s*[a-z_]+\s*=\s*[-+0-9.eE]+\s*)*)?\))?$")


def _indicator_specs(v: list) -> str | None:
    for x in v:
        if not _INDICATOR_SPEC.match(x.strip()):
            return f"{x!r} is not NAME or NAME(param=value, ...), e.g. \"RSI(timeperiod=14)\""
    if len(set(v)) != len(v):
        return "an indicator is listed twice"
    return None


_VENUES = ("binance", "kite", "ibkr", "dhan")
# Technical indicators on closed candles of every venue (feed-indicators, feeds.indicators).
INDICATORS = (
    Setting("indicators.functions", list[str],
            ["SMA(timeperiod=20)", "EMA(timeperiod=20)", "RSI(timeperiod=14)",
             "MACD(fastperiod=12, slowperiod=26, signalperiod=9)", "BBANDS(timeperiod=20, nbdevup=2, nbdevdn=2)",
             "ATR(timeperiod=14)", "ADX(timeperiod=14)", "OBV", "VWAP"],
            "indicators computed: a TA-Lib function by name with its parameters, or VWAP (the "
            "README's formula)", _indicator_specs),
    Setting("indicators.venues", list[str], list(_VENUES), "venues whose candles are read",
            _subset(_VENUES, "venues")),
    Setting("indicators.intervals", list[int], [], "candle intervals in minutes; [] for every interval "
            "stored", lambda v: None if all(1 <= m <= 1440 for m in v) else "minutes from 1 to 1440"),
    Setting("indicators.warmup_bars", int, 500, "closed candles read per series at start to warm the "
            "indicators up", within(1, 100_000)),
    Setting("indicators.poll_interval", float, 1.0, "seconds between looks for new candles when no "
            "notification came", within(0.05, 60, unit="s")),
    Setting("indicators.status_interval", float, 10.0, "seconds between status lines", positive),
)


def _quiet_hours(v: list) -> str | None:
    if not v or (len(v) == 2 and all(hhmm(h) for h in v) and v[0] != v[1]):
        return None
    return 'expected [] or ["HH:MM", "HH:MM"] (start, end; may span midnight)'


def _time_zone(v: str) -> str | None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {v!r} (an IANA name such as Europe/London)"
    return None


ALERTS = (
    Setting("alerts.url_files", list[str], [], "files each holding one apprise URL, one channel per file "
            "(mailto://, slack://, tgram://, json://...): secrets, mode 0600, never logged"),
    Setting("alerts.quiet_hours", list[str], [], "[start, end] HH:MM in alerts.time_zone during which "
            "alerts wait and are sent at the end if their condition still holds; [] for none", _quiet_hours),
    Setting("alerts.time_zone", str, "UTC", "time zone of alerts.quiet_hours", _time_zone),
    Setting("alerts.state_file", str, "/var/lib/feeds/alerts/state.json", "which conditions hold and "
            "were told, so that each is told once when it starts and once when it clears"),
    Setting("alerts.journal_lines", int, 30, "journal lines of a failed unit sent with its alert",
            within(0, 500)),
    Setting("alerts.send_timeout", float, 20.0, "seconds one channel may take to accept a message",
            within(1, 300, unit="s")),
    Setting("alerts.health_threshold", int, 60, "a feed whose health score (0-100) is below this alerts",
            within(0, 100)),
    Setting("alerts.disk_min_free", float, 10.0, "percent of free space under which the database's or a "
            "spool's file system alerts", within(0, 100)),
    Setting("alerts.rate_drop", float, 0.2, "a stream whose rate falls below this fraction of its usual "
            "rate for that time of day alerts", within(0, 1)),
)

def _address(v: str) -> str | None:
    import ipaddress
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"not an IP address: {v!r}"
    return None


# Prometheus metrics of the long-running collectors, node_exporter textfiles of the oneshot jobs
# (feeds.ops.metrics).  The port defaults differ per file (see the schemas below).
TEXTFILE = (
    Setting("metrics.textfile_dir", str, "/var/lib/prometheus/node-exporter", "directory where the "
            "oneshot jobs write node_exporter textfiles (*.prom); empty: none"),
)
METRICS = (
    Setting("metrics.port", int, 0, "TCP port of the Prometheus metrics endpoint; a sharded "
            "feed-binance@K of N listens on port + K; 0: no endpoint", within(0, 65535)),
    Setting("metrics.address", str, "127.0.0.1", "address the metrics endpoint listens on "
            "(loopback: scraped from this machine only)", _address),
) + TEXTFILE

# MQTT heartbeat of the long-running collectors (feeds.ops.mqtt), off unless mqtt.host is set.
MQTT = (
    Setting("mqtt.host", str, "", "MQTT broker host of the heartbeat; empty: no MQTT heartbeat"),
    Setting("mqtt.port", int, 1883, "broker port (8883 is usual with TLS)", within(1, 65535)),
    Setting("mqtt.topic", str, "feeds/{host}/{unit}/status", "topic of the heartbeat; {host} and "
            "{unit} are replaced by the host name and the systemd unit", _not_empty),
    Setting("mqtt.interval", float, 30.0, "seconds between heartbeats", within(1, 3600, unit="s")),
    Setting("mqtt.qos", int, 1, "MQTT QoS of the heartbeat and of the last will", within(0, 2)),
    Setting("mqtt.keepalive", int, 60, "seconds of MQTT keep-alive; the broker publishes the last will "
            "(state \"offline\") about 1.5 times this after the collector dies", within(5, 3600)),
    Setting("mqtt.tls", bool, False, "connect with TLS"),
    Setting("mqtt.ca_file", str, "", "CA certificates to verify the broker with; empty: the system's"),
    Setting("mqtt.cert_file", str, "", "client certificate for mutual TLS; empty: none"),
    Setting("mqtt.key_file", str, "", "client key for mutual TLS (a secret, mode 0600)"),
    Setting("mqtt.username_file", str, "", "file holding the broker user name; empty: no login"),
    Setting("mqtt.password_file", str, "", "file holding the broker password (a secret, mode 0600)"),
)

# The control API and status page (feed-api.service, feeds.ops.api).
API = (
    Setting("api.address", str, "127.0.0.1", "address feed-api listens on (loopback by default)",
            _address),
    Setting("api.port", int, 9800, "TCP port of feed-api", within(1, 65535)),
    Setting("api.token_file", str, "/etc/feeds/secrets/feed-api.token", "file holding the bearer token "
            "every request but GET /health must carry (a secret, mode 0600)"),
)

FEEDS_FILE = Schema("feeds.toml", "feed-migrate, feed-maintain", DATABASE + RETENTION + MAINTAIN + TEXTFILE)
BINANCE_FILE = Schema("binance.toml", "feed-binance", DATABASE + BINANCE + SINK + METRICS + MQTT,
                      defaults={"sink.spool_dir": "/var/lib/feeds/binance", "metrics.port": 9810})
# A full-mode row takes about 1 kB: 50,000 pending rows keep the buffers near 100 MB.
KITE_FILE = Schema("kite.toml", "feed-zerodha, feed-kite-token",
                   DATABASE + KITE + SINK + CANDLES + METRICS + MQTT,
                   defaults={"sink.spool_dir": "/var/lib/feeds/zerodha", "sink.max_pending": 50_000,
                             "metrics.port": 9820})
IBKR_FILE = Schema("ibkr.toml", "feed-backfill, feed-ibkr",
                   DATABASE + IBKR + BACKFILL + IBKR_LIVE + SINK + CANDLES + METRICS + MQTT,
                   defaults={"sink.spool_dir": "/var/lib/feeds/ibkr", "metrics.port": 9830})

# Operations: feedctl (as root or a member of the group feeds_ops), feed-check, feed-alert@ and
# feed-api connect as the read-only role feeds_ops.
OPS_FILE = Schema("ops.toml", "feedctl, feed-check, feed-alert@, feed-api", DATABASE + API)
# The alert channels and conditions, read beside ops.toml by the same programs.
ALERTS_FILE = Schema("alerts.toml", "feedctl, feed-check, feed-alert@, feed-api", ALERTS)
DHAN_FILE = Schema("dhan.toml", "feed-dhan, feed-dhan-token, feed-dhan-backfill",
                   DATABASE + DHAN + BACKFILL + SINK + CANDLES + METRICS + MQTT,
                   defaults={"sink.spool_dir": "/var/lib/feeds/dhan", "sink.max_pending": 50_000,
                             "metrics.port": 9850})
INDICATORS_FILE = Schema("indicators.toml", "feed-indicators", DATABASE + INDICATORS + SINK + METRICS + MQTT,
                         defaults={"sink.spool_dir": "/var/lib/feeds/indicators", "metrics.port": 9840})

SCHEMAS = {s.name: s for s in (FEEDS_FILE, BINANCE_FILE, KITE_FILE, IBKR_FILE, OPS_FILE, ALERTS_FILE,
                               DHAN_FILE, INDICATORS_FILE)}
"""Every kind of configuration file, by its installed name."""


# ----------------------------------------------------------------------------- loading

def _type_name(typ) -> str:
    return typ.__name__ if isinstance(typ, type) else str(typ)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _conform(value: Any, typ: Any) -> tuple[bool, Any]:
    """(fits, value converted) for the declared ``typ``."""
    if typ is Any or typ is object:
        return True, value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        for t in typing.get_args(typ):
            ok, v = _conform(value, t)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(typ)
        out = []
        for x in value:
            ok, v = _conform(x, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if isinstance(typ, type):
        return isinstance(value, typ), value
    raise TypeError(f"unsupported setting type {typ!r}")


def _value(s: Setting, key: str, raw: Any, file: str) -> Any:
    """Check one declared value (for ``dict`` settings: every entry)."""
    if typing.get_origin(s.type) is dict:
        if not isinstance(raw, dict):
            raise ConfigError(key, file, f"expected a table of entries, got {type(raw).__name__} {_short(raw)}")
        _, item = typing.get_args(s.type)
        out = {}
        for name, v in raw.items():
            ekey = f"{key}.{name}"
            if s.entry is not None:
                err = s.entry(name)
                if err:
                    raise ConfigError(ekey, file, err)
            ok, v2 = _conform(v, item)
            if not ok:
                raise ConfigError(ekey, file, f"expected {_type_name(item)}, got {type(v).__name__} {_short(v)}")
            if s.check is not None:
                err = s.check(v2)
                if err:
                    raise ConfigError(ekey, file, err)
            out[name] = v2
        return out
    ok, v = _conform(raw, s.type)
    if not ok:
        raise ConfigError(key, file, f"expected {_type_name(s.type)}, got {type(raw).__name__} {_short(raw)}")
    if s.check is not None:
        err = s.check(v)
        if err:
            raise ConfigError(key, file, err)
    return v


def _sections(keys) -> set[str]:
    """Every table that holds a declared key (``kite.login`` for ``kite.login.user_id``)."""
    return {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}


def _unknown(key: str, schema: Schema, file: str) -> ConfigError:
    names = list(schema.by_key) + sorted(_sections(schema.by_key))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    hint = f"did you mean '{close[0]}'?" if close else f"{schema.name} ({schema.programs}) has no such setting"
    return ConfigError(key, file, f"unknown key ({hint})")


def check_document(doc: Config, schema: Schema) -> Config:
    """Check a parsed document against ``schema``; fills ``doc.values`` and
    ``doc.given``.  Raises :class:`ConfigError`."""
    decl = schema.by_key
    sections = _sections(decl)
    values: dict[str, Any] = {}

    def walk(table: dict, prefix: str) -> None:
        for name, raw in table.items():
            key = prefix + name
            s = decl.get(key)
            if s is not None:
                values[key] = _value(s, key, raw, doc.file)
            elif key in sections:
                if not isinstance(raw, dict):
                    raise ConfigError(key, doc.file, f"expected a table [{key}], got {type(raw).__name__} "
                                                     f"{_short(raw)}")
                walk(raw, key + ".")
            else:
                raise _unknown(key, schema, doc.file)

    walk(doc.data, "")
    doc.given = set(values)
    for key in decl:
        if key not in values:
            d = schema.default(key)
            if d is REQUIRED:
                raise ConfigError(key, doc.file, "missing")
            values[key] = d
    doc.values = values
    return doc


def load(path: str | os.PathLike, schema: Schema) -> Config:
    """Read the configuration file at ``path`` as a ``schema`` file.

    Returns a :class:`~feeds.config.Config` whose ``cfg[key]`` gives every
    declared setting (checked, or its default).  Raises
    :class:`~feeds.config.ConfigError` for a missing or unreadable file,
    invalid TOML, an unknown key, a wrong type, a value its check refuses or
    a missing required key.
    """
    return check_document(Config.load(path), schema)


def empty(path: str | os.PathLike, schema: Schema) -> Config:
    """The defaults of ``schema``, as if the file at ``path`` were empty."""
    return check_document(Config({}, path), schema)


def alerts_path(ops_file: str | os.PathLike, given: str | os.PathLike | None = None) -> Path:
    """Where the alerts' file is: ``given`` (an option or FEEDS_ALERTS_CONFIG),
    else ``alerts.toml`` beside the ``ops.toml`` at ``ops_file``."""
    return Path(given) if given else Path(ops_file).with_name(ALERTS_FILE.name)


def database_dsn(cfg: Config, *, shared_secret: bool = False) -> str:
    """The libpq connection string for a loaded configuration.

    ``FEEDS_DSN`` in the environment wins (tests and demos); else
    ``database.dsn`` of the file, or of ``feeds.toml`` beside it when the
    file sets none; a ``database.password_file`` adds the password (with
    ``shared_secret`` the file may be readable by its group: ``ops.toml``'s
    password of the operators' role, shared by the group feeds_ops).
    Raises :class:`ConfigError` (missing or malformed DSN, bad secret file).
    """
    env = os.environ.get("FEEDS_DSN")
    if env:
        err = dsn_check(env)
        if err:
            raise ConfigError("FEEDS_DSN", "the environment", err)
        return env
    if cfg.values.get("database.dsn") is None:
        common = Path(cfg.file).with_name("feeds.toml")
        if common.exists() and Path(cfg.file) != common:
            return database_dsn(load(common, FEEDS_FILE))
    if "database.dsn" not in cfg.values:
        raise ConfigError("database.dsn", cfg.file, "missing")
    dsn = cfg.require("database.dsn")
    if cfg["database.password_file"]:
        from psycopg.conninfo import make_conninfo
        dsn = make_conninfo(dsn, password=cfg.secret("database.password_file", shared=shared_secret))
    return dsn
