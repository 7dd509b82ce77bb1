"""feed-ibkr: IBKR live trades, quotes and index ticks, and candles built from them.

One ib_async 2.1.0 connection to TWS or IB Gateway with clientId
``ibkr.live_client_id`` (the backfill has its own; on error 326 "client id
already in use" the next ``client_id_tries - 1`` ids are tried).  For every
contract of ``live.contracts_file`` (STK and IND rows; FUT and OPT rows are
validated, not collected):

* the contract is resolved once (``reqContractDetails``: its conId);
* ``reqMarketDataType`` (``live.market_data_type``), then ``reqMktData``:
  stocks with generic tick 233 (RTVolume: every trade's price, size and
  time) plus bid/ask price and size; indices with the default ticks (last
  price);
* for the stocks of ``live.tick_by_tick`` also ``reqTickByTickData``
  AllLast and BidAsk (two of IB's simultaneous tick-by-tick subscriptions
  each, at most ``live.max_tick_by_tick``: more is refused at start).

Messages are read in front of ib_async's decoder (:func:`feeds.ibkr.wire.tap_messages`)
and turned into rows by :mod:`feeds.ibkr.live_rows`, which go to the sink at
the end of every socket read (ib_async's ``updateEvent``).  Trades feed
:class:`feeds.candles.CandleBuilder` (stocks: RTVolume, whose times are in
milliseconds, also where AllLast is subscribed: AllLast's whole seconds
cannot order the trades of one second, so open and close would be guesses;
indices: the last price, without volume, at the receive time since IB sends
none); a timer closes the candles and stores them in ``ibkr_candle``.

IB's messages (TWS API "Message Codes"):

* 1100 connectivity between IB and TWS lost: noted in STATUS, wait;
  1102 restored, data maintained: nothing to do; 1101 restored, data lost:
  every subscription is cancelled and requested again.
* 2103/2105/2157 a data farm connection is broken: noted in STATUS, wait;
  2104/2106/2158 OK; 2107/2108 inactive but available on demand: fine.
* 354, 10089, 10090, 10167, 10168, 10190, 10197, 200 and any other error
  about a subscription: a row in ``ibkr_live_error`` (symbol, conId, the
  request, code, IB's text, time) while the other contracts go on.  Those of
  :data:`REFUSING` end that request until the next reconnection or 1101.
* The socket closed (TWS restarted, IB's nightly reset): reconnect with
  back-off for at most ``live.reconnect_timeout`` seconds (then exit 1),
  and request every subscription again.
* A contract silent for ``live.silence_timeout`` during its session while
  other contracts tick is cancelled and requested again (counted).

Watchdog: WATCHDOG=1 while ticks arrive and are stored (:mod:`feeds.health`),
and also while IB has said its side is down (1100, a farm broken) or the
socket is being reconnected (:meth:`LiveCollector.keepalive`): waiting as IB
documents is not a fault, a silent socket without IB's word is.

Venue documents: TWS API "Market Data: Top of Book", "Tick-by-Tick Data",
"Market Data Types", "Message Codes", "Historical Bar Data".
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from .. import calendars
from ..calendars import ExchangeCalendar, RunPlan, Session
from ..config import Config, ConfigError
from ..health import Health, StreamHealth
from ..plausible import Malformed
from ..settings import time_of_day
from ..sink import Sink, Table
from . import live_rows as R
from .connect import ConnectFailed, connect_ib
from .contracts import ContractRow, fetchable, request_details
from .wire import (MARKET_DATA_TYPE, TICK_BY_TICK, TICK_PRICE, TICK_SIZE, TICK_STRING, keep_wire_text, req_id_of,
                   tap_messages)

log = logging.getLogger("feeds.ibkr.live")

__all__ = ["LiveSettings", "load_settings", "select_contracts", "RunPlan", "plan_run", "LiveCollector",
           "LiveFailed", "CANDLE_TABLE", "TABLES", "REFUSING", "NY", "PRE_MARKET", "POST_MARKET",
           "CONNECT_BEFORE_OPEN", "TBT_PER_SYMBOL"]

UTC = dt.timezone.utc
NY = ZoneInfo("America/New_York")
MINUTE_NS = 60_000_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

#: Extended hours (NYSE Arca / IB): pre-market from 04:00, 5 h 30 min before the 09:30 open;
#: post-market to 20:00, 4 h after the 16:00 close (17:00 after a 13:00 early close).
PRE_MARKET = dt.timedelta(hours=5, minutes=30)
POST_MARKET = dt.timedelta(hours=4)
#: Connect this long before the session (or pre-market) opens; the timer starts the unit at 09:20 New York.
CONNECT_BEFORE_OPEN = dt.timedelta(minutes=10)
#: IB counts AllLast and BidAsk as two tick-by-tick subscriptions.
TBT_PER_SYMBOL = 2
#: Generic tick list of stock subscriptions: 233 = RTVolume (every trade with price, size, time).
STOCK_GENERIC_TICKS = "233"

#: Errors after which a request gets no data: it is not requested again until a reconnection or 1101.
REFUSING = frozenset({200, 354, 10089, 10168, 10190, 10197})
#: Errors recorded in ibkr_live_error as IB's own list of market-data problems (others about a
#: subscription are recorded too).
RECORDED = frozenset({200, 354, 10089, 10090, 10167, 10168, 10190, 10197})
#: Longest wait between two connection attempts while TWS/IB Gateway is away (seconds): short
#: enough that every subscription is back within 10 s of the gateway's return (after IB's nightly
#: reset or a restart), cheap because the gateway is local.
RECONNECT_BACKOFF_MAX_S = 4.0
FARM_BROKEN = frozenset({2103, 2105, 2157})
FARM_OK = frozenset({2104, 2106, 2158})
FARM_INACTIVE = frozenset({2107, 2108})
CONNECTIVITY = frozenset({1100, 1101, 1102, 1300})

CANDLE_TABLE = Table("ibkr_candle", ("symbol", "con_id", "interval_min", "bar_start", "bar_end", "open", "high",
                                     "low", "close", "volume", "ticks", "final", "revision", "source",
                                     "recorded_at"))
TABLES = R.TABLES + (CANDLE_TABLE,)


class LiveFailed(Exception):
    """The collection cannot go on (no connection within the reconnect budget)."""


# ----------------------------------------------------------------------------- settings

@dataclass
class LiveSettings:
    """feed-ibkr's settings from ibkr.toml (``[ibkr]`` connection keys with
    ``ibkr.live_client_id``, ``[live]``, ``[candles]``); times in seconds."""
    file: str = "ibkr.toml"
    host: str = "127.0.0.1"
    port: int = 7497
    client_id: int = 72
    client_id_tries: int = 5
    connect_timeout: float = 15.0
    contracts_file: str = "/etc/feeds/ibkr-live.csv"
    tick_by_tick: list[str] = field(default_factory=list)
    max_tick_by_tick: int = 3
    market_data_type: str = "realtime"
    session_calendar: str = "XNYS"
    extra_sessions: dict[dt.date, tuple[dt.time, dt.time]] = field(default_factory=dict)
    extra_holidays: list[dt.date] = field(default_factory=list)
    extended_hours: bool = False
    stop_after_close: float = 300.0
    silence_timeout: float = 60.0
    reconnect_timeout: float = 600.0
    status_interval: float = 10.0
    candles: bool = True
    intervals: tuple[int, ...] = (1, 5, 15)
    grace: float = 2.0
    lateness: float = 10.0
    fill_from_history: bool = True
    request_timeout: float = 60.0


def load_settings(cfg: Config) -> LiveSettings:
    """:class:`LiveSettings` from a loaded ``ibkr.toml`` (checked by
    :func:`feeds.settings.load`).  Raises ConfigError."""
    ls = LiveSettings(
        file=cfg.file, client_id=cfg["ibkr.live_client_id"],
        **{n: cfg["ibkr." + n] for n in ("host", "port", "client_id_tries", "connect_timeout")},
        **{n: cfg["live." + n] for n in ("contracts_file", "max_tick_by_tick", "market_data_type",
                                         "session_calendar", "extended_hours", "stop_after_close",
                                         "silence_timeout", "reconnect_timeout", "status_interval")},
        tick_by_tick=[s.strip().upper() for s in cfg["live.tick_by_tick"]],
        candles=cfg["candles.enabled"], intervals=tuple(cfg["candles.intervals"]), grace=cfg["candles.grace"],
        lateness=cfg["candles.lateness"], fill_from_history=cfg["candles.fill_from_history"])
    for day, (open_, close) in cfg["live.extra_sessions"].items():
        ls.extra_sessions[dt.date.fromisoformat(day)] = (time_of_day(open_), time_of_day(close))
    ls.extra_holidays = [d if isinstance(d, dt.date) else dt.date.fromisoformat(str(d))
                         for d in cfg["live.extra_holidays"]]
    if len(set(ls.tick_by_tick)) * TBT_PER_SYMBOL > ls.max_tick_by_tick:
        n = len(set(ls.tick_by_tick))
        raise ConfigError("live.tick_by_tick", ls.file,
                          f"{n} symbol(s) take {n * TBT_PER_SYMBOL} tick-by-tick subscriptions (AllLast and BidAsk "
                          f"each), more than live.max_tick_by_tick = {ls.max_tick_by_tick} (IB's limit for the "
                          f"account); list at most {ls.max_tick_by_tick // TBT_PER_SYMBOL} symbol(s)")
    return ls


def select_contracts(rows: Sequence[ContractRow], symbols: Sequence[str] | None,
                     ls: LiveSettings) -> list[ContractRow]:
    """The STK and IND rows to collect (only ``symbols`` when given: the
    caller has checked they are in the file).  Raises ConfigError when
    nothing is left or a ``live.tick_by_tick`` symbol is not a stock of the
    contracts file."""
    stocks = {r.symbol for r in rows if r.sec_type == "STK"}
    for s in ls.tick_by_tick:
        if s not in stocks:
            raise ConfigError("live.tick_by_tick", ls.file,
                              f"{s} is not a STK row of {ls.contracts_file} (tick-by-tick is for stocks)")
    out = fetchable(rows, symbols, verb="collected")
    if not out:
        raise ConfigError("live.contracts_file", ls.file, f"no STK or IND contract to collect in {ls.contracts_file}")
    return out


# ----------------------------------------------------------------------------- market hours

def new_york_calendar(ls: LiveSettings) -> ExchangeCalendar | None:
    """The XNYS calendar with the configured extra sessions and holidays
    (None for ``live.session_calendar = "none"``).  Raises ConfigError for
    an extra session that does not close after it opens."""
    if ls.session_calendar == "none":
        return None
    try:
        return ExchangeCalendar("XNYS", extra_sessions=ls.extra_sessions, extra_holidays=ls.extra_holidays)
    except ValueError as e:
        raise ConfigError("live.extra_sessions", ls.file, str(e)) from None


def window_of(session: Session, extended: bool) -> tuple[dt.datetime, dt.datetime]:
    """The collection window of ``session``: its hours, or with ``extended``
    from :data:`PRE_MARKET` before the open to :data:`POST_MARKET` after the close."""
    if not extended:
        return session.open, session.close
    return session.open - PRE_MARKET, session.close + POST_MARKET


def plan_run(now: dt.datetime, cal: ExchangeCalendar | None, *, extended: bool = False,
             stop_after: dt.timedelta = dt.timedelta(minutes=5),
             connect_before: dt.timedelta = CONNECT_BEFORE_OPEN) -> RunPlan:
    """Plan a run of feed-ibkr started at the aware ``now`` (see
    :func:`feeds.calendars.plan_run`): the New York date decides; with
    ``extended`` the window runs from the pre-market to the post-market."""
    return calendars.plan_run(now, cal, exchange="NYSE", connect_before=connect_before, stop_after=stop_after,
                              window=lambda s: window_of(s, extended), reasons=CLOSED_REASONS)


#: The calendar's reasons for a day without a session, as feed-ibkr's journal says them.
CLOSED_REASONS = {"configured holiday": "holiday in live.extra_holidays", "weekend": "weekend in the XNYS calendar",
                  "holiday": "NYSE holiday in the XNYS calendar"}


# ----------------------------------------------------------------------------- the collector

def _ns_to_dt(ns: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=ns // 1000)


def _utc_end(t: dt.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%d-%H:%M:%S")


@dataclass(eq=False)
class _Sub:
    """One contract and its subscriptions."""
    row: ContractRow
    tbt: bool
    stream: StreamHealth
    contract: object = None
    con_id: int | None = None
    unresolved: str | None = None           # why it cannot be subscribed at all (200 at resolution)
    mkt_state: str = "down"                 # live | refused | down
    tbt_state: str = "down"
    mdt: int | None = None                  # market data type IB reported
    last: float = 0.0                       # monotonic time of its last tick
    since: float = 0.0                      # when last (re)subscribed
    resubscribed: int = 0
    pending_index: list = field(default_factory=list)

    @property
    def symbol(self) -> str:
        return self.row.symbol

    @property
    def kind(self) -> str:
        return "index" if self.row.sec_type == "IND" else "stock"


class LiveCollector:
    """Collect live market data for ``contracts`` into ``sink`` until ``until``
    (aware datetime; None = until stopped).  A collector of :mod:`feeds.service`.

    ``window``: the session window (UTC datetimes) for the silence check and
    the history fill (None: always in session).  ``builders``: ``{"stock":
    CandleBuilder, "index": CandleBuilder}`` or None without candles.
    ``dsn``: read the last stored candles for the history fill.

    ``await run(stop)`` returns 0 (stopped or session over) or 1 (no
    connection within ``reconnect_timeout``, or the sink failed).
    """

    def __init__(self, ls: LiveSettings, contracts: Sequence[ContractRow], sink: Sink, health: Health, *,
                 until: dt.datetime | None = None, window: tuple[dt.datetime, dt.datetime] | None = None,
                 builders: dict | None = None, dsn: str = "", started_ns: int | None = None):
        self.s = ls
        self.sink = sink
        self.health = health
        self.until = until
        self.window = window
        self.builders = builders
        self.dsn = dsn
        self.started_ns = started_ns if started_ns is not None else time.time_ns()
        tbt = set(ls.tick_by_tick)
        self.subs = [_Sub(r, r.symbol in tbt and r.sec_type == "STK", health.stream(f"{r.symbol} "
                          f"{'index' if r.sec_type == 'IND' else 'trade'}")) for r in contracts]
        self.by_symbol = {s.symbol: s for s in self.subs}
        self.quote_streams = {s.symbol: health.stream(f"{s.symbol} quote") for s in self.subs if s.kind == "stock"}
        self.by_req: dict[int, tuple[_Sub, str]] = {}
        self.seq = R.Seq()
        self.quotes = R.Quotes()
        self.rows: dict[str, list] = {t.name: [] for t in R.TABLES}
        self.ib = None
        self.client_id: int | None = None
        self.ib_ok = True
        self.farms: dict[str, str] = {}
        self.reconnects = 0
        self.resubscribe_all = 0
        self.errors = 0
        self.candles_stored = 0
        self.history_candles = 0
        self.failure: str | None = None
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()        # the main loop has work now (connection lost, 1101)
        self._data_lost = False
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._index_pending: list[_Sub] = []

    # ------------------------------------------------------------ connection
    async def connect(self, deadline: float):
        """Connect (read-only, nothing fetched at start) with this program's
        clientId, trying the next ids on 326; retries with back-off until the
        monotonic ``deadline``.  Returns the ``ib_async.IB``.  Raises
        :class:`LiveFailed`."""
        def prepare(ib):
            tap_messages(ib, self._tap)
            keep_wire_text(ib)
            # A new API session: IB states each farm's condition in its first messages, which
            # must be heard (a farm still broken, or OK again after the reset).
            self.farms.clear()
            ib.errorEvent += self._on_error

        async def wait(seconds: float):
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                self.keepalive()
                await asyncio.sleep(min(1.0, until - time.monotonic()))

        try:
            ib, cid = await connect_ib(self.s.host, self.s.port, self.s.client_id, tries=self.s.client_id_tries,
                                       timeout=self.s.connect_timeout, deadline=deadline, prepare=prepare, sleep=wait,
                                       backoff_max=RECONNECT_BACKOFF_MAX_S)
        except ConnectFailed as e:
            raise LiveFailed(str(e)) from None
        self._attach(ib, cid)
        return ib

    def _attach(self, ib, cid: int) -> None:
        ib.disconnectedEvent += lambda ib=ib: self._on_disconnect(ib)
        ib.updateEvent += self._flush
        self.ib, self.client_id = ib, cid
        self.ib_ok = True
        self.by_req = {}
        self._lost.clear()
        log.info("connected to %s:%d clientId %d server version %d", self.s.host, self.s.port, cid,
                 ib.client.serverVersion())

    def _on_disconnect(self, ib) -> None:
        if ib is not self.ib or self._stopping:
            return
        for sub in self.subs:
            if sub.mkt_state == "live":
                sub.mkt_state = "down"
            if sub.tbt_state == "live":
                sub.tbt_state = "down"
        self._flush()
        self._lost.set()
        self._wake.set()
        log.warning("connection to %s:%d lost", self.s.host, self.s.port)

    def waiting_for_ib(self) -> bool:
        """IB said its side is down (1100, a data farm broken) or the socket is being reconnected."""
        return not self.ib_ok or self._lost.is_set() or any(v == "broken" for v in self.farms.values())

    def keepalive(self) -> None:
        """WATCHDOG=1 while knowingly waiting for IB (see :meth:`waiting_for_ib`; within
        ``live.reconnect_timeout``) and the sink still stores: systemd must not restart a
        collector that waits as IB documents, while a silent socket without IB's word still
        stops the pings."""
        h = self.health
        if h.ready and h.storing():
            h.notifier.notify("WATCHDOG=1")

    # ------------------------------------------------------------ IB's messages
    def _on_error(self, req_id: int, code: int, text: str, contract) -> None:
        if code in FARM_OK or code in FARM_INACTIVE or code in FARM_BROKEN:
            # the farm's name ends IB's text: "...is broken:usfarm", "...available upon demand.ushmds"
            farm = re.split(r"[:.]", text)[-1].strip() or str(code)
            if code in FARM_BROKEN:
                self.farms[farm] = "broken"
                log.warning("IB %d: %s (waiting for it to come back)", code, text)
            else:
                self.farms.pop(farm, None)
                log.info("IB %d: %s", code, text)
            return
        if code in CONNECTIVITY:
            if code == 1100:
                self.ib_ok = False
                log.warning("IB 1100: %s: waiting for 1101/1102", text)
            elif code == 1101:
                self.ib_ok = True
                self._data_lost = True
                self._wake.set()
                log.warning("IB 1101: %s: every subscription is requested again", text)
            elif code == 1102:
                self.ib_ok = True
                log.info("IB 1102: %s: subscriptions maintained", text)
            else:
                log.warning("IB %d: %s", code, text)
            return
        routed = self.by_req.get(req_id)
        if routed is None:
            if 2100 <= code < 2200:
                log.info("IB notice %d: %s", code, text)
            else:
                log.warning("IB error %d reqId %d: %s", code, req_id, text)
            return
        sub, request = routed
        self.errors += 1
        self._error_row(sub.symbol, sub.con_id, request, code, text)
        if code in REFUSING:
            if request == "mktData":
                sub.mkt_state = "refused"
            else:
                sub.tbt_state = "refused"
            log.error("IB error %d for %s %s: %s (no data for this request until reconnected)", code, sub.symbol,
                      request, text)
        else:
            log.warning("IB error %d for %s %s: %s", code, sub.symbol, request, text)

    def _error_row(self, symbol: str | None, con_id: int | None, request: str, code: int, text: str) -> None:
        self.rows["ibkr_live_error"].append((symbol, con_id, request, code, text, dt.datetime.now(UTC),
                                             self.seq.next()))
        self._flush()

    def _tap(self, msg_id: int, fields: list[str]) -> None:
        """Every live market-data message, before ib_async handles it."""
        try:
            if msg_id == TICK_BY_TICK:
                routed = self.by_req.get(int(fields[1]))
            else:
                routed = self.by_req.get(int(fields[2]))
            if routed is None:
                return
            sub, request = routed
            if msg_id == MARKET_DATA_TYPE:
                sub.mdt = int(fields[3])
                return
            self._message(sub, request, msg_id, fields)
        except Malformed as e:
            self.health.count_malformed(f"{routed[0].symbol} {routed[1]}", str(e))
        except (ValueError, IndexError) as e:
            self.health.count_malformed("TWS message", f"message {msg_id} not understood ({e}): {fields!r:.200}")
        except Exception:            # never let a row problem reach ib_async's reader
            log.exception("message %d not processed: %.200r", msg_id, fields)

    def _message(self, sub: _Sub, request: str, msg_id: int, f: list[str]) -> None:
        if msg_id == TICK_BY_TICK:
            tt = int(f[2])
            if tt in (1, 2):
                self._trade(sub, "alllast", R.parse_all_last(f), candle=False)
            elif tt == 3:
                t, bid, bsz, ask, asz = R.parse_bid_ask(f)
                self.rows["ibkr_quote"].append((sub.symbol, sub.con_id, "bidask", bid, bsz, ask, asz,
                                                R.utc_from_ms(t), dt.datetime.now(UTC), self.seq.next(), sub.mdt))
                self.quote_streams[sub.symbol].seen()
                sub.last = time.monotonic()
            return
        tt = int(f[3])
        if sub.kind == "index":
            if msg_id == TICK_PRICE and tt in R.LAST_TYPES:
                sub.pending_index.append([R.price_text(f[4]), None, time.time_ns()])
                sub.last = time.monotonic()
                if len(sub.pending_index) == 1:
                    self._index_pending.append(sub)
            elif msg_id == TICK_STRING and tt in R.LAST_TIME_TYPES:
                t = R.ms_time(str(int(f[4]) * 1000) if f[4].isdigit() else f[4], "last timestamp")
                for p in sub.pending_index:
                    if p[1] is None:
                        p[1] = t
            return
        if msg_id == TICK_PRICE and (tt in R.BID_TYPES or tt in R.ASK_TYPES):
            self.quotes.price(sub, tt, f[4], f[5] if len(f) > 5 else None)
            return
        if msg_id == TICK_SIZE and (tt in R.BID_SIZE_TYPES or tt in R.ASK_SIZE_TYPES):
            self.quotes.size(sub, tt, f[4])
            return
        self._quote_out(sub)            # any other message ends a run of bid/ask updates
        if msg_id == TICK_STRING and tt in R.RTV_TYPES:
            tr = R.parse_rtvolume(f[4])
            if tr is not None:
                self._trade(sub, "rtvolume", tr, candle=True)
        elif msg_id == TICK_PRICE and tt == R.DELAYED_LAST:
            # delayed data has no RTVolume: its trades are the last price with its size, without IB's time
            # (not in candles: they arrive 15 minutes late)
            self._trade(sub, "last", R.Trade(R.price_text(f[4]), R.size_text(f[5]), 0), candle=False)

    def _quote_out(self, sub: _Sub, now: dt.datetime | None = None) -> None:
        q = self.quotes.take(sub)
        if q is None:
            return
        self.rows["ibkr_quote"].append((sub.symbol, sub.con_id, "mktdata", q[0], q[1], q[2], q[3], None,
                                        now or dt.datetime.now(UTC), self.seq.next(), sub.mdt))
        self.quote_streams[sub.symbol].seen()
        sub.last = time.monotonic()

    def _trade(self, sub: _Sub, source: str, tr: R.Trade, candle: bool) -> None:
        self.rows["ibkr_trade"].append((sub.symbol, sub.con_id, source, tr.price, tr.size,
                                        R.utc_from_ms(tr.time_ms) if tr.time_ms else None,
                                        dt.datetime.now(UTC), self.seq.next(), sub.mdt, tr.total_volume, tr.vwap,
                                        tr.exchange, tr.conditions))
        sub.stream.seen()
        sub.last = time.monotonic()
        if candle and self.builders is not None:
            self.builders["stock"].trade(sub.symbol, tr.time_ms * 1_000_000, tr.decimal_price(), tr.decimal_size())

    def _flush(self, *_a) -> None:
        """End of a socket read: the quotes changed in it, the index ticks
        read in it, then every row to the sink."""
        if self.quotes.changed:
            now = dt.datetime.now(UTC)
            for sub in self.quotes.changed:
                self._quote_out(sub, now)
            self.quotes.changed.clear()
        for sub in self._index_pending:
            for price, t_ms, recv_ns in sub.pending_index:
                self.rows["ibkr_index_tick"].append((sub.symbol, sub.con_id, price,
                                                     R.utc_from_ms(t_ms) if t_ms is not None else None,
                                                     _ns_to_dt(recv_ns), self.seq.next(), sub.mdt))
                sub.stream.seen()
                if self.builders is not None:
                    ts = t_ms * 1_000_000 if t_ms is not None else recv_ns
                    self.builders["index"].trade(sub.symbol, ts, Decimal(price), None)
            sub.pending_index.clear()
        self._index_pending.clear()
        for name, rows in self.rows.items():
            if rows:
                try:
                    self.sink.add_many(name, rows)
                except RuntimeError as e:      # the sink is closed or its writer died
                    if self.failure is None:
                        self.failure = f"sink refused rows: {e}"
                self.rows[name] = []

    # ------------------------------------------------------------ subscriptions
    async def resolve(self) -> None:
        """reqContractDetails for every contract not resolved yet; a refusal
        (200, ambiguity) is recorded and the contract left out."""
        for sub in self.subs:
            if sub.contract is not None or sub.unresolved:
                continue
            got = await request_details(self.ib, sub.row, self.s.request_timeout)
            if got.code is not None:
                self.errors += 1
                self._error_row(sub.symbol, None, "contractDetails", got.code, got.text)
            if got.details is not None:
                sub.contract = got.details.contract
                sub.con_id = sub.contract.conId
            else:
                sub.unresolved = got.error
            if sub.unresolved:
                sub.mkt_state = sub.tbt_state = "refused"
                log.error("contract %s (line %d) not collected: %s", sub.symbol, sub.row.line, sub.unresolved)
            else:
                log.info("contract %s conId %s %s/%s: %s%s", sub.symbol, sub.con_id, sub.row.exchange,
                         sub.row.primary_exchange or "-", "index last price" if sub.kind == "index" else
                         "RTVolume, bid/ask", ", tick-by-tick AllLast and BidAsk" if sub.tbt else "")

    def subscribe(self, sub: _Sub) -> None:
        """Request ``sub``'s market data (and tick-by-tick) on the current connection."""
        ib = self.ib
        if sub.contract is None or ib is None or not ib.isConnected():
            return
        ticker = ib.reqMktData(sub.contract, STOCK_GENERIC_TICKS if sub.kind == "stock" else "", False, False)
        self.by_req[req_id_of(ib, ticker, "mktData")] = (sub, "mktData")
        sub.mkt_state = "live"
        if sub.tbt:
            for kind in ("AllLast", "BidAsk"):
                t = ib.reqTickByTickData(sub.contract, kind, 0, False)
                self.by_req[req_id_of(ib, t, kind)] = (sub, kind)
            sub.tbt_state = "live"
        sub.since = time.monotonic()

    def unsubscribe(self, sub: _Sub) -> None:
        """Cancel ``sub``'s requests on the current connection."""
        ib = self.ib
        if sub.contract is None or ib is None or not ib.isConnected():
            return
        if sub.mkt_state != "down":
            ib.cancelMktData(sub.contract)
        if sub.tbt and sub.tbt_state != "down":
            for kind in ("AllLast", "BidAsk"):
                ib.cancelTickByTickData(sub.contract, kind)
        sub.mkt_state = sub.tbt_state = "down"
        self.quotes.forget(sub)

    def subscribe_all(self, again: bool = False) -> None:
        """Request every resolved contract's data.  ``again``: after 1101, when IB has
        already cancelled every subscription of the session ("market data requests must be
        resubmitted"), so nothing is cancelled first (that would spend IB's 50 messages/s
        on requests IB no longer holds) and refused ones are tried again."""
        self.ib.reqMarketDataType(R.MARKET_DATA_TYPES[self.s.market_data_type])
        n = 0
        for sub in self.subs:
            if sub.unresolved:
                continue
            if again:
                sub.mkt_state = sub.tbt_state = "down"
                self.quotes.forget(sub)
            self.subscribe(sub)
            n += 1
        log.info("%s %d contract(s): market data type %s", "subscribed again" if again else "subscribed", n,
                 self.s.market_data_type)

    def in_session(self, now: dt.datetime | None = None) -> bool:
        if self.window is None:
            return True
        now = now or dt.datetime.now(UTC)
        return self.window[0] <= now < self.window[1]

    def check_silence(self) -> list[str]:
        """Resubscribe contracts silent for ``silence_timeout`` during the
        session while others tick; returns their symbols."""
        if self.ib is None or not self.ib.isConnected() or not self.ib_ok or not self.in_session():
            return []
        now = time.monotonic()
        live = [s for s in self.subs if s.mkt_state == "live"]
        limit = self.s.silence_timeout
        ticking = [s for s in live if s.last and now - s.last < limit]
        out = []
        for sub in live:
            if now - max(sub.last, sub.since) <= limit:
                continue
            if not [o for o in ticking if o is not sub]:
                continue
            sub.resubscribed += 1
            log.warning("%s silent for %.0f s while %d other contract(s) tick: cancelled and requested again "
                        "(%d time(s) this run)", sub.symbol, now - max(sub.last, sub.since), len(ticking),
                        sub.resubscribed)
            self.unsubscribe(sub)
            self.subscribe(sub)
            out.append(sub.symbol)
        return out

    # ------------------------------------------------------------ candles
    def _candle_rows(self, candles, recorded: dt.datetime) -> list[tuple]:
        rows = []
        for c in candles:
            sub = self.by_symbol.get(c.key)
            rows.append((c.key, sub.con_id if sub else None, c.interval_min, _ns_to_dt(c.start_ns), _ns_to_dt(c.end_ns),
                         c.open, c.high, c.low, c.close, c.volume, c.ticks, c.final, c.revision, c.source, recorded))
        return rows

    def store_candles(self, candles) -> None:
        if not candles:
            return
        rows = self._candle_rows(candles, dt.datetime.now(UTC))
        try:
            self.sink.add_many(CANDLE_TABLE.name, rows)
        except RuntimeError as e:
            if self.failure is None:
                self.failure = f"sink refused rows: {e}"
        self.candles_stored += len(rows)

    async def _candle_timer(self, stop: asyncio.Event) -> None:
        """Close candles on the clock: ``due()`` at ``next_due_ns()`` (at least every second)."""
        while not stop.is_set():
            nxt = [n for n in (b.next_due_ns() for b in self.builders.values()) if n is not None]
            wait = 1.0
            if nxt:
                wait = min(wait, max(0.0, (min(nxt) - time.time_ns()) / 1e9))
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass
            now = time.time_ns()
            for b in self.builders.values():
                self.store_candles(b.due(now))

    def _read_last_final(self, day_start: dt.datetime) -> dict[str, int]:
        """The bar start (ns) of each symbol's last stored final 1-min candle since ``day_start``."""
        from ..db import connect
        out: dict[str, int] = {}
        try:
            with connect(self.dsn, application_name="feed-ibkr") as conn:
                for sym, start in conn.execute(
                        "SELECT symbol, max(bar_start) FROM ibkr_candle WHERE interval_min = 1 AND final "
                        "AND bar_start >= %s AND symbol = ANY(%s) GROUP BY symbol",
                        (day_start, [s.symbol for s in self.subs])).fetchall():
                    out[sym] = int(start.timestamp()) * 1_000_000_000
        except Exception as e:
            log.warning("last stored candles not read (%s): history fill starts at the session open",
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return out

    async def _fill_history(self, stop: asyncio.Event) -> None:
        """After a start inside the session: the 1-min candles missed since
        the open (or the last stored final one) up to the minute the process
        started in, from reqHistoricalData once that minute is over."""
        from ib_async.wrapper import RequestError
        if self.window is None:
            return
        open_ns = int(self.window[0].timestamp()) * 1_000_000_000
        close_ns = int(self.window[1].timestamp()) * 1_000_000_000
        t0 = self.started_ns
        if not open_ns <= t0 < close_ns:
            return
        m0 = t0 - (t0 - open_ns) % MINUTE_NS
        end_ns = m0 + MINUTE_NS
        wait = (end_ns - time.time_ns()) / 1e9 + 1.0
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), wait)
                return
            except asyncio.TimeoutError:
                pass
        last = await asyncio.to_thread(self._read_last_final, self.window[0]) if self.dsn else {}
        for sub in self.subs:
            if stop.is_set():
                return
            if sub.contract is None:
                continue
            frm = max(open_ns, last.get(sub.symbol, open_ns - MINUTE_NS) + MINUTE_NS)
            if frm > m0:
                continue
            # from the earliest start of the candles (every interval) containing frm, on the builder's
            # own grid, so that they are whole; only the minutes from frm on (and the candles reaching
            # them) are stored
            builder = self.builders["stock" if sub.kind == "stock" else "index"]
            starts = [builder.bucket_start(frm, i) for i in self.s.intervals]
            fetch = min([s for s in starts if s is not None] or [frm])
            secs = (end_ns - fetch) // 1_000_000_000
            try:
                bars = await self.ib.reqHistoricalDataAsync(
                    sub.contract, _utc_end(_ns_to_dt(end_ns)), f"{secs} S", "1 min", "TRADES",
                    not self.s.extended_hours, 2, False, [], timeout=self.s.request_timeout)
            except RequestError as e:
                self.errors += 1
                self._error_row(sub.symbol, sub.con_id, "historicalData", e.code, e.message)
                log.warning("history fill for %s: IB error %d: %s", sub.symbol, e.code, e.message)
                continue
            except (asyncio.TimeoutError, ConnectionError) as e:
                log.warning("history fill for %s not done: %s", sub.symbol, e or type(e).__name__)
                continue
            seed = []
            for b in bars or []:
                start = int(b.date.timestamp()) * 1_000_000_000
                if not fetch <= start <= m0:
                    continue
                o, h, lo, c, v, _wap = (Decimal(x) for x in b.text)
                seed.append((start, o, h, lo, c, v if sub.kind == "stock" else None, int(b.barCount)))
            candles = [c for c in builder.seed(sub.symbol, seed, until_ns=end_ns) if c.end_ns > frm]
            self.store_candles(candles)
            self.history_candles += len(candles)
            log.info("history fill for %s: %d one-minute bar(s) from %s to %s, %d candle(s) stored", sub.symbol,
                     sum(1 for b in seed if b[0] >= frm), _ns_to_dt(frm).astimezone(NY).strftime("%H:%M"),
                     _ns_to_dt(m0).astimezone(NY).strftime("%H:%M"), len(candles))

    # ------------------------------------------------------------ the runtime's interface
    def stream_kind(self, stream: str) -> str:
        """``trade``, ``quote`` or ``index``: the last word of the stream name."""
        return stream.rsplit(" ", 1)[-1]

    def figures(self) -> dict[str, int | float | str]:
        """Subscriptions live per kind, resubscriptions, reconnects, IB errors, candles and the candle
        builders' counters."""
        subs = [s for s in self.subs if not s.unresolved]
        out: dict = {
            "stocks live": sum(1 for s in subs if s.kind == "stock" and s.mkt_state == "live"),
            "indices live": sum(1 for s in subs if s.kind == "index" and s.mkt_state == "live"),
            "contracts": len(self.subs),
            "tick-by-tick live": sum(1 for s in subs if s.tbt and s.tbt_state == "live"),
            "refused": sum(1 for s in self.subs if s.mkt_state == "refused"),
            "resubscribed": sum(s.resubscribed for s in self.subs),
            "reconnects": self.reconnects, "data lost": self.resubscribe_all, "ib errors": self.errors,
            "candles": self.candles_stored, "history candles": self.history_candles,
        }
        if not self.ib_ok:
            out["IB-TWS"] = "connectivity lost (1100)"
        broken = sorted(f for f, st in self.farms.items() if st == "broken")
        if broken:
            out["farm broken"] = ",".join(broken)
        if self.builders is not None:
            for b in self.builders.values():
                for k, v in b.stats.items():
                    if k in ("late_revised", "late_dropped", "outside_session", "volume_reset"):
                        out[k] = out.get(k, 0) + v
        return out

    def periodic(self) -> None:
        """Nothing beyond the checks of :meth:`run`."""

    async def run(self, stop: asyncio.Event) -> int:
        """Connect, resolve, subscribe, collect until ``stop`` or ``until``;
        reconnects and resubscribes; returns 0 or 1 (see the class)."""
        try:
            await self.connect(time.monotonic() + self.s.reconnect_timeout)
            await self.resolve()
        except LiveFailed as e:
            log.error("%s", e)
            return 1
        self.subscribe_all()
        if self.builders is not None:
            self._tasks.append(asyncio.ensure_future(self._candle_timer(stop)))
            if self.s.fill_from_history:
                self._tasks.append(asyncio.ensure_future(self._fill_history(stop)))
        rc = 0
        try:
            while not stop.is_set():
                self._wake.clear()
                if self.until is not None and dt.datetime.now(UTC) >= self.until:
                    log.info("session over (stop time %s reached)", self.until.isoformat(timespec="seconds"))
                    break
                if self.failure is not None:
                    log.error("%s", self.failure)
                    rc = 1
                    break
                if self.sink.fatal:
                    log.error("sink writer failed: %r", self.sink.fatal)
                    rc = 1
                    break
                if self._lost.is_set():
                    if not await self._reconnect():
                        rc = 1
                        break
                    continue
                if self._data_lost:
                    self._data_lost = False
                    self.resubscribe_all += 1
                    self.subscribe_all(again=True)
                if self.waiting_for_ib():
                    self.keepalive()
                self.check_silence()
                wait = 1.0
                if self.until is not None:
                    wait = max(0.0, min(wait, (self.until - dt.datetime.now(UTC)).total_seconds()))
                waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
                _, pending = await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
        finally:
            await self._shutdown()
        return rc

    async def _reconnect(self) -> bool:
        self.reconnects += 1
        self.health.notify_status(f"reconnecting to TWS/IB Gateway at {self.s.host}:{self.s.port}")
        log.warning("reconnecting to %s:%d (reconnect %d)", self.s.host, self.s.port, self.reconnects)
        old, self.ib = self.ib, None
        if old is not None:
            old.errorEvent -= self._on_error
            old.updateEvent -= self._flush
            old.disconnect()
        try:
            await self.connect(time.monotonic() + self.s.reconnect_timeout)
            await self.resolve()
        except LiveFailed as e:
            log.error("%s (live.reconnect_timeout = %g s)", e, self.s.reconnect_timeout)
            return False
        except (asyncio.TimeoutError, ConnectionError) as e:
            log.warning("contract resolution interrupted (%s)", e or type(e).__name__)
            self._lost.set()
            return True
        self.subscribe_all()
        return True

    async def _shutdown(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        ib = self.ib
        if ib is not None and ib.isConnected():
            for sub in self.subs:
                try:
                    self.unsubscribe(sub)
                except Exception:
                    pass
        self._flush()
        if self.builders is not None:
            for b in self.builders.values():
                self.store_candles(b.close_all())
        if ib is not None:
            ib.disconnect()
        log.info("disconnected: %s", ", ".join(f"{s.symbol} {s.stream.count}" for s in self.subs))
