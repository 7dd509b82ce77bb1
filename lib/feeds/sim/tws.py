"""TWS API socket server for ib_async (the IBKR one-minute backfill's venue).

The unmodified ``ib_async`` 2.1.0 client (``IB().connect(host, port,
clientId)``) talks to this server as it would to TWS or IB Gateway.  The
protocol followed is the TWS API socket protocol as ib_async's ``client.py``
and ``decoder.py`` speak it:

* the client sends ``b"API\\0"`` then a length-prefixed ``"v<min>..<max>"``
  version range (optionally followed by connect options); the server answers
  with the chosen server version (178, the highest ib_async 2.1.0 asks for;
  any client whose range reaches 166..178 is served) and its connection time;
* every later message is a 4-byte big-endian length followed by
  NUL-terminated text fields, the first being the message id;
* ``startApi`` (71) carries the clientId; the server answers managedAccounts
  (15), nextValidId (9) and the informational 2104/2106/2158 notices, or
  error 326 and a close when the clientId is already connected.

Served requests: the start-up requests ib_async makes in ``connect()``
(positions, open and completed orders, account updates, account updates
multi, executions: empty answers), reqCurrentTime, reqIds,
reqManagedAccts, reqAccountSummary (empty), reqContractDetails,
reqHeadTimeStamp and reqHistoricalData for one-minute bars
(TRADES/MIDPOINT/BID_ASK, useRTH 0/1, formatDate 1/2, keepUpToDate 0) with
cancelHistoricalData; live data: reqMarketDataType, reqMktData (also
snapshots), reqTickByTickData, reqRealTimeBars and their cancels (see
:mod:`feeds.sim.tws_live` for the message layouts).  Other message ids are
answered with error 321.

Live mode (``live_rate=N`` or :meth:`TwsSimulator.live`): every contract
trades N times a minute, every minute of every day -- nights, weekends and
holidays included, so live tests run at any hour and ``useRTH=0`` requests
get a bar for every minute (``useRTH=1`` keeps the exchange session).  The
trades of minute M are derived from the very TRADES bar ``reqHistoricalData``
serves for M (first = open, last = close, high and low hit, sizes summing to
the volume, barCount trades; the minute in progress is served with the trades
up to now), and each is sent when the simulator's clock passes its time.
Control: :meth:`~TwsSimulator.inject_error`, :meth:`~TwsSimulator.silence`,
:meth:`~TwsSimulator.farm_message`, :meth:`~TwsSimulator.nightly_reset`,
:meth:`~TwsSimulator.connectivity_loss`, :meth:`~TwsSimulator.disconnect_all`;
observation: :meth:`~TwsSimulator.sent_ticks`,
:meth:`~TwsSimulator.subscriptions`, ``stats()["live"]``.

Historical answers (message 17) carry the window start and end strings and
the bars: date (formatDate 1: ``"yyyymmdd hh:mm:ss US/Eastern"`` in the
contract's time zone, the form TWS 10.x sends for intraday bars; formatDate
2: epoch seconds), open, high, low, close, volume, WAP, barCount.  The head
timestamp is answered as ``"yyyymmdd-hh:mm:ss"`` in UTC (formatDate 1) or
epoch seconds (formatDate 2).

Data: see :mod:`feeds.sim.tws_data`.  The recorded S&P 500 file
(``spx-1min-2019-11-05..08.csv``) is served for SPX (IND, CBOE, USD) exactly
as IB answers ``useRTH=1``: bars 09:30..15:59 only, so the extra 16:00 rows
of 2019-11-05..07 are *not* served and a regular day is 390 bars; prices and
volume are sent with the file's decimal text; WAP and barCount are derived
(``round((H+L+C)/3, 2)``, ``ceil(volume/100)``).  ``useRTH=0`` serves every
recorded row.  Other contracts get deterministic generated bars for every
NYSE session.

Pacing (TWS API "Historical Data Limitations"): see
:mod:`feeds.sim.tws_pacing`, whose model is chosen with ``pacing_model``:
``strict`` (IB's small-bar rules for every bar size, the default),
``documented`` (the page as written: for one-minute bars only the 50-open
and identical-within-15-s rules) or ``throttle`` (answers to one-minute
requests slow down as their rate rises, and are refused past a threshold).
A refusal is answered with error 162 "Historical Market Data Service error
message:Historical data request pacing violation"; a throttled answer is
sent after its delay (the request stays open meanwhile).  Every decision
(arrival on the pacing clock, bar size, contract, whatToShow, delay, rule)
is kept: :meth:`TwsSimulator.pacing_log`, ``stats()["pacing"]``.

Error codes and texts sent (``{…}`` filled in):

* 162 ``Historical Market Data Service error message:HMDS query returned no
  data: {symbol}@{exchange} {Trades|Midpoint|Bid_Ask}``
* 162 ``Historical Market Data Service error message:API historical data
  query cancelled: {reqId}``
* 162 ``Historical Market Data Service error message:Historical data request
  pacing violation``
* 162 ``Historical Market Data Service error message:Time length exceed
  max.`` (more than one week of one-minute bars)
* 162 ``Historical Market Data Service error message:No data of type
  {whatToShow} is available for {symbol}@{exchange}`` (legal IB bar types
  the simulator does not produce) and ``...:Bar size {size} is not available
  from this server; request 1 min bars`` (legal bar sizes other than 1 min)
* 200 ``No security definition has been found for the request``
* 321 ``Error validating request.-'{marker}' : cause - {cause}`` (malformed
  or invalid requests; bar size cause as IB words it)
* 326 ``Unable to connect as the client id is already in use. Retry with a
  unique client id.``
* 354 ``Requested market data is not subscribed.``
* 1100 ``Connectivity between IB and Trader Workstation has been lost.``
* 1101 ``Connectivity between IB and Trader Workstation has been restored -
  data lost.``
* 1102 ``Connectivity between IB and Trader Workstation has been restored -
  data maintained.``
* 2104 ``Market data farm connection is OK:usfarm``, 2106 ``HMDS data farm
  connection is OK:ushmds``, 2158 ``Sec-def data farm connection is
  OK:secdefnj``; on demand the other farm notices of
  :data:`~feeds.sim.tws_live.FARM_TEXTS` (2103, 2105, 2107, 2108, 2157)
* live data errors on demand with IB's texts
  (:data:`~feeds.sim.tws_live.ERROR_TEXTS`): 200, 354, 10089, 10090, 10167,
  10168, 10189, 10190 (also IB's tick-by-tick limit), 10197
* 2174 ``Warning: You submitted request with date-time attributes without
  explicit time zone. ...`` (endDateTime without a zone)
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import re
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

from .tws_data import (
    BAR_SIZES,
    MAX_ONE_MIN_SECONDS,
    WHAT_TO_SHOW,
    Bar,
    BarStore,
    ContractSpec,
    DurationError,
    EndDateTimeError,
    Sessions,
    builtin_contract,
    duration_seconds_upper,
    format_bar_time,
    format_utc_dash,
    parse_duration,
    parse_end_datetime,
    request_window_start,
)
from .tws_live import ERROR_TEXTS, FARM_TEXTS, MAX_TICK_BY_TICK, TICK_INTERVAL, LiveEngine
from .tws_pacing import BID_ASK_WEIGHT, PACER_OPTIONS, HistoricalPacer

log = logging.getLogger(__name__)

__all__ = [
    "TwsSimulator",
    "TwsSimulatorThread",
    "ContractSpec",
    "builtin_contract",
    "default_csv_files",
    "run_until_signalled",
    "SERVER_VERSION",
    "HMDS",
    "ERROR_TEXTS",
    "FARM_TEXTS",
]

SERVER_VERSION = 178
MIN_SERVER_VERSION = 166
MAX_FRAME = 0xFFFFFF  # largest message the TWS API framing allows

HMDS = "Historical Market Data Service error message:"
TXT_NO_SECDEF = "No security definition has been found for the request"
TXT_NOT_SUBSCRIBED = "Requested market data is not subscribed."
TXT_PACING = HMDS + "Historical data request pacing violation"
TXT_NO_DATA = HMDS + "HMDS query returned no data: {symbol}@{exchange} {what}"
TXT_CANCELLED = HMDS + "API historical data query cancelled: {req_id}"
TXT_TIME_LENGTH = HMDS + "Time length exceed max."
TXT_NO_TYPE = HMDS + "No data of type {what} is available for {symbol}@{exchange}"
TXT_BAR_SIZE_UNSERVED = HMDS + "Bar size {size} is not available from this server; request 1 min bars"
TXT_VALIDATE = "Error validating request.-'{marker}' : cause - {cause}"
TXT_BAR_SIZE_INVALID = (
    "Historical data bar size setting is invalid. Legal ones are: " + ", ".join(BAR_SIZES)
)
TXT_DUP_CLIENT = "Unable to connect as the client id is already in use. Retry with a unique client id."
TXT_1100 = "Connectivity between IB and Trader Workstation has been lost."
TXT_1101 = "Connectivity between IB and Trader Workstation has been restored - data lost."
TXT_1102 = "Connectivity between IB and Trader Workstation has been restored - data maintained."
TXT_2174 = (
    "Warning: You submitted request with date-time attributes without explicit time zone. "
    "Please switch to use yyyymmdd-hh:mm:ss in UTC or use instrument time zone, like US/Eastern. "
    "Implied time zone functionality will be removed in the next API release"
)
CONNECT_NOTICES = (
    (2104, "Market data farm connection is OK:usfarm"),
    (2106, "HMDS data farm connection is OK:ushmds"),
    (2158, "Sec-def data farm connection is OK:secdefnj"),
)

#: whatToShow values IB accepts for historical bars (others are malformed).
IB_BAR_TYPES = frozenset({
    "TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK", "ADJUSTED_LAST", "HISTORICAL_VOLATILITY",
    "OPTION_IMPLIED_VOLATILITY", "REBATE_RATE", "FEE_RATE", "YIELD_BID", "YIELD_ASK",
    "YIELD_BID_ASK", "YIELD_LAST", "SCHEDULE", "AGGTRADES",
})

#: Client message ids (TWS API outgoing message numbers) by name, for stats.
MSG_NAMES = {
    1: "reqMktData", 2: "cancelMktData", 5: "reqOpenOrders", 6: "reqAccountUpdates", 7: "reqExecutions", 8: "reqIds",
    9: "reqContractDetails", 15: "reqAutoOpenOrders", 16: "reqAllOpenOrders", 17: "reqManagedAccts",
    20: "reqHistoricalData", 25: "cancelHistoricalData", 49: "reqCurrentTime", 59: "reqMarketDataType",
    61: "reqPositions", 62: "reqAccountSummary", 63: "cancelAccountSummary", 64: "cancelPositions",
    71: "startApi", 76: "reqAccountUpdatesMulti", 77: "cancelAccountUpdatesMulti",
    87: "reqHeadTimeStamp", 90: "cancelHeadTimeStamp", 99: "reqCompletedOrders",
    50: "reqRealTimeBars", 51: "cancelRealTimeBars", 97: "reqTickByTickData", 98: "cancelTickByTickData",
}
# Position of the reqId field in messages that carry one (for error replies).
_REQ_ID_POS = {20: 1, 87: 1, 90: 1, 9: 2, 25: 2, 7: 2, 62: 2, 63: 2, 76: 2, 77: 2,
               1: 2, 2: 2, 50: 2, 51: 2, 97: 1, 98: 1}

_VERSION_RE = re.compile(r"^v(\d+)(?:\.\.(\d+))?(?:\s+(.*))?$")

_STK_ORDER_TYPES = (
    "ACTIVETIM,AD,ADJUST,ALERT,ALGO,ALLOC,AON,AVGCOST,BASKET,BENCHPX,CASHQTY,COND,CONDORDER,"
    "DARKONLY,DARKPOLL,DAY,DEACT,DEACTDIS,DEACTEOD,DIS,DUR,GAT,GTC,GTD,GTT,HID,IBKRATS,ICE,IMB,"
    "IOC,LIT,LMT,LOC,MIDPX,MIT,MKT,MOC,MTL,NGCOMB,NODARK,NONALGO,OCA,OPG,OPGREROUT,PEGBENCH,"
    "PEGMID,POSTATS,POSTONLY,PREOPGRTH,PRICECHK,REL,REL2MID,RELPCTOFS,RPI,RTH,SCALE,SCALEODD,"
    "SCALERST,SIZECHK,SNAPMID,SNAPMKT,SNAPREL,STP,STPLMT,SWEEP,TRAIL,TRAILLIT,TRAILLMT,TRAILMIT,WHATIF"
)


class _Malformed(Exception):
    """A client message that cannot be read; answered with error 321."""

    def __init__(self, req_id: int, cause: str, marker: str = "bS") -> None:
        super().__init__(cause)
        self.req_id = req_id
        self.cause = cause
        self.marker = marker


def default_csv_files() -> dict[str, Path]:
    """``{"SPX": path}`` for the shared S&P 500 recording when it exists
    (``$FEEDS_SHARED_DATA`` or ``<repo>/../shared/data``), else ``{}``."""
    root = os.environ.get("FEEDS_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
    path = base / "ib" / "spx-1min-2019-11-05..08.csv"
    return {"SPX": path.resolve()} if path.is_file() else {}


class _Conn:
    """One client socket."""

    def __init__(self, sim: TwsSimulator, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.sim = sim
        self.number = number
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_id: int | None = None
        self.version = 0
        self.next_order_id = 1
        self.pending: dict[int, asyncio.Task] = {}
        self.task: asyncio.Task | None = None
        self.closed = False
        self.market_data_type = 1
        self.live_subs: dict = {}

    def send(self, *fields: object) -> None:
        """Frame and write one message (fields as text, NUL-terminated)."""
        if self.closed:
            return
        payload = "".join(f"{'' if f is None else f}\0" for f in fields).encode()
        self.writer.write(struct.pack(">I", len(payload)) + payload)
        self.sim._bytes_sent += 4 + len(payload)

    def error(self, req_id: int, code: int, text: str) -> None:
        """Send an error/notice message (id 4, version 2, with the empty
        advancedOrderRejectJson field of server versions >= 166)."""
        self.sim._errors[code] += 1
        self.send(4, 2, req_id, code, text, "")

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()
        try:
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
        except Exception:  # transport already gone
            pass


class TwsSimulator:
    """A TWS API server on ``host:port`` (port 0 picks a free one).

    Args:
        pacing_scale: multiplies every pacing window (1.0 = IB's real 10 min
            / 15 s / 2 s) and the throttle's delays.
        pacing_model: ``"strict"``, ``"documented"`` or ``"throttle"`` (see
            :mod:`feeds.sim.tws_pacing`).
        pacing_options: numbers of the pacing rules by
            :class:`~feeds.sim.tws_pacing.HistoricalPacer` argument name
            (e.g. ``{"throttle_free": 30}``); unknown names raise
            ``ValueError``.
        csv_files: ``{symbol: path or [paths]}`` of recorded one-minute bars
            (``Date,Open,Close,High,Low,Volume``, US/Eastern).
        contracts: extra :class:`ContractSpec` entries (replace built-ins).
        generate: symbols served with generated bars (default AAPL, MSFT).
        thin: symbols whose TRADES bars have gaps.
        unsubscribed: symbols answered with error 354 for historical data.
        unknown: symbols always answered with error 200.
        head_timestamps: ``{symbol: aware datetime}`` first available bar.
        latency: seconds before a historical answer is sent (requests are
            "open" meanwhile and can be cancelled).
        accounts: account codes sent in managedAccounts.
        tws_time_zone: zone used for endDateTime without a zone, and the
            connection time.
        clock: returns "now" in epoch seconds (default ``time.time``); live
            trades are sent as this clock passes their time.
        pacer_clock: monotonic clock for the pacing windows (and the times
            of :meth:`pacing_log`).
        live_rate: live mode with this many trades per minute per contract
            (1..60000); None: off until :meth:`live` is called.
        max_tick_by_tick: simultaneous tick-by-tick subscriptions over all
            connections (IB's default 3); more are refused with 10190.
        record_ticks: ``"all"`` keeps sent ticks for :meth:`sent_ticks`
            (the last ``max_recorded``), ``"count"`` only counts them.
        tick_interval: seconds between rounds of live ticks (batches).

    Raises ``FileNotFoundError``/``ValueError`` for unreadable CSV files,
    ``ValueError`` for an unknown pacing model or option.
    Use from one event loop: ``await start()``, ``await stop()``; see
    :class:`TwsSimulatorThread` for a background-thread runner.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        pacing_scale: float = 1.0,
        pacing_model: str = "strict",
        pacing_options: Mapping[str, float] | None = None,
        csv_files: Mapping[str, str | Path | Sequence[str | Path]] | None = None,
        contracts: Iterable[ContractSpec] = (),
        generate: Iterable[str] = ("AAPL", "MSFT"),
        thin: Iterable[str] = (),
        unsubscribed: Iterable[str] = (),
        unknown: Iterable[str] = (),
        head_timestamps: Mapping[str, dt.datetime] | None = None,
        latency: float = 0.0,
        accounts: Sequence[str] = ("DU1234567",),
        tws_time_zone: str = "US/Eastern",
        clock: Callable[[], float] | None = None,
        pacer_clock: Callable[[], float] = time.monotonic,
        connect_notices: bool = True,
        live_rate: int | None = None,
        max_tick_by_tick: int = MAX_TICK_BY_TICK,
        record_ticks: str = "all",
        max_recorded: int = 200_000,
        tick_interval: float = TICK_INTERVAL,
    ) -> None:
        self.host = host
        self._port = port
        self.port = port
        self.latency = float(latency)
        self.accounts = list(accounts)
        self.tws_tz_name = tws_time_zone
        self.tws_tz = ZoneInfo(tws_time_zone)
        self.clock = clock or time.time
        self.connect_notices = connect_notices
        options = dict(pacing_options or {})
        unknown_options = set(options) - PACER_OPTIONS
        if unknown_options:
            raise ValueError(f"unknown pacing option(s): {', '.join(sorted(unknown_options))} "
                             f"(known: {', '.join(sorted(PACER_OPTIONS))})")
        self.pacer = HistoricalPacer(scale=pacing_scale, clock=pacer_clock, model=pacing_model, **options)
        self.sessions = Sessions()
        self.store = BarStore(self.sessions)

        specs: dict[str, ContractSpec] = {}
        for sym in generate:
            if sym.strip():
                specs[sym.strip().upper()] = builtin_contract(sym.strip())
        for sym, files in (csv_files or {}).items():
            paths = (files,) if isinstance(files, (str, Path)) else tuple(files)
            specs[sym.upper()] = builtin_contract(sym, csv_files=paths)
        for spec in contracts:
            specs[spec.symbol] = spec
        for sym in thin:
            if sym.upper() in specs:
                specs[sym.upper()].thin = True
        for sym in unsubscribed:
            if sym.upper() in specs:
                specs[sym.upper()].subscribed = False
        for sym, ts in (head_timestamps or {}).items():
            if sym.upper() in specs:
                specs[sym.upper()].head_timestamp = ts
        for sym in unknown:
            specs.pop(sym.upper(), None)
        self.contracts = specs
        self._by_con_id = {s.con_id: s for s in specs.values()}
        for spec in specs.values():
            n = self.store.load(spec)
            if spec.csv_files:
                log.info("tws sim loaded csv symbol=%s bars=%d files=%s", spec.symbol, n,
                         ",".join(str(p) for p in spec.csv_files))

        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_Conn] = set()
        self._conn_seq = 0
        self._fault: dict | None = None
        self._refusing = False
        self.live_engine = LiveEngine(self, live_rate, max_tick_by_tick=max_tick_by_tick, record=record_ticks,
                                      max_recorded=max_recorded, tick_interval=tick_interval)
        eng = self.live_engine
        self._handlers = {
            59: eng.market_data_type, 1: self._req_mkt_data, 2: eng.cancel_mkt_data,
            97: self._req_tick_by_tick, 98: eng.cancel_tick_by_tick,
            50: self._req_real_time_bars, 51: eng.cancel_real_time_bars,
            71: self._start_api, 61: self._positions, 64: self._noop, 5: self._open_orders,
            16: self._open_orders, 15: self._noop, 99: self._completed_orders,
            6: self._account_updates, 76: self._account_updates_multi, 77: self._noop,
            7: self._executions, 49: self._current_time, 17: self._managed_accounts,
            8: self._req_ids, 62: self._account_summary, 63: self._noop,
            9: self._contract_details, 20: self._historical_data, 25: self._cancel_historical,
            87: self._head_timestamp, 90: self._noop,
        }
        # stats
        self._requests: Counter[str] = Counter()
        self._errors: Counter[int] = Counter()
        self._client_ids: set[int] = set()
        self._counts: Counter[str] = Counter()
        self._bytes_sent = 0

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        """Listen; sets :attr:`port` to the bound port."""
        self._loop = asyncio.get_running_loop()
        self.sessions.session(dt.date.fromtimestamp(self.clock()))  # warm the calendar
        self._server = await asyncio.start_server(self._on_client, self.host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.live_engine.start()
        log.info("tws sim listening host=%s port=%d server_version=%d contracts=%s pacing_scale=%s "
                 "pacing_model=%s", self.host, self.port, SERVER_VERSION, ",".join(sorted(self.contracts)),
                 self.pacer.scale, self.pacer.model)
        log.info("tws sim pacing %s", " ".join(f"{k}={v}" for k, v in self.pacer.parameters().items()))

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        await self.live_engine.stop()
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        tasks = [c.task for c in conns if c.task is not None and c.task is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)
        log.info("tws sim stopped port=%d", self.port)

    # ----------------------------------------------------------- faults/stats
    def disconnect_all(self, abort: bool = False) -> int:
        """Close every client socket now (``abort`` sends a TCP reset);
        returns how many were closed.  Call from the server's loop."""
        conns = [c for c in self._conns if not c.closed]
        for conn in conns:
            conn.close(abort=abort)
        self._counts["forced_disconnects"] += len(conns)
        if conns:
            log.warning("tws sim forced disconnect of all clients count=%d", len(conns))
        return len(conns)

    def fail_after(self, n_requests: int, request: str | None = "reqHistoricalData") -> None:
        """Arm a one-shot fault: after ``n_requests`` more requests named
        ``request`` (any request when ``None``) have been answered, the next
        one is not answered and its connection is closed."""
        if n_requests < 0:
            raise ValueError("n_requests must be >= 0")
        self._fault = {"remaining": n_requests, "request": request}

    def connectivity_loss(self, gap: float = 1.0, data_lost: bool = False) -> None:
        """Send 1100 (connectivity lost) to every client, then after ``gap``
        seconds 1102 (restored, data maintained) or 1101 (data lost: live
        subscriptions are dropped).  No live tick is sent during the gap.
        Call from the server's loop."""
        for conn in list(self._conns):
            if conn.client_id is not None:
                conn.error(-1, 1100, TXT_1100)
        self._counts["connectivity_losses"] += 1
        self.live_engine.set_offline(True)
        log.warning("tws sim connectivity lost gap=%.3fs", gap)

        def restore() -> None:
            self.live_engine.set_offline(False)
            if data_lost:
                self.live_engine.drop_all()
            for conn in list(self._conns):
                if conn.client_id is not None:
                    conn.error(-1, 1101 if data_lost else 1102, TXT_1101 if data_lost else TXT_1102)
            log.info("tws sim connectivity restored")

        asyncio.get_running_loop().call_later(gap, restore)

    # ------------------------------------------------------- live controls
    def live(self, trades_per_minute: int | None = None) -> int:
        """Switch live mode on (see :mod:`feeds.sim.tws_live`): every
        minute of every day gets a generated bar whose barCount is
        ``trades_per_minute`` (1..60000; None keeps the current rate, 60 by
        default) and whose trades are sent live to subscribers.  A new rate
        applies from the next minute.  Returns the rate."""
        return self.live_engine.live(trades_per_minute)

    def inject_error(self, symbol: str, code: int, text: str | None = None) -> None:
        """Answer ``symbol``'s live requests (and its current subscriptions)
        with error ``code`` (IB's text unless ``text``) until cleared with
        code 0 or :meth:`clear_error`; see :meth:`LiveEngine.inject_error`."""
        self.live_engine.inject_error(symbol, code, text)

    def clear_error(self, symbol: str | None = None) -> None:
        """Forget the injected error of ``symbol`` (all when None)."""
        self.live_engine.clear_error(symbol)

    def silence(self, symbol: str, seconds: float) -> None:
        """``symbol`` sends no tick for ``seconds`` (subscriptions stay; its
        trades still happen and stay in the bars); a new reqMktData for it
        ends the silence early (counted in ``stats()["live"]["resubscriptions"]``
        when it follows a cancelMktData on the same connection)."""
        self.live_engine.silence(symbol, seconds)

    def farm_message(self, code: int, text: str | None = None) -> int:
        """Send farm/connectivity notice ``code`` (reqId -1, IB's text from
        :data:`FARM_TEXTS` unless ``text``) to every started connection;
        2103 also stops every tick until a 2104.  Returns connections told."""
        txt = text if text is not None else FARM_TEXTS.get(code)
        if txt is None:
            raise ValueError(f"no text known for code {code}; pass text")
        conns = [c for c in self._conns if c.client_id is not None and not c.closed]
        for conn in conns:
            conn.error(-1, code, txt)
        self.live_engine.farm(code)
        self._counts["farm_messages"] += 1
        return len(conns)

    def nightly_reset(self, gap: float = 2.0, data_lost: bool = True, disconnect: bool = False) -> None:
        """IB's nightly reset as TWS shows it: 2103/2105 (farms broken) and
        1100 to every client, no tick for ``gap`` seconds, then 1101 (data
        lost: every live subscription is dropped and must be re-requested)
        or 1102 (data maintained), then 2104/2106 (farms OK).  With
        ``disconnect`` the sockets are closed after the 1100 and new
        connections are refused until the gap is over."""
        eng = self.live_engine
        for conn in list(self._conns):
            if conn.client_id is not None:
                conn.error(-1, 2103, FARM_TEXTS[2103])
                conn.error(-1, 2105, FARM_TEXTS[2105])
                conn.error(-1, 1100, TXT_1100)
        eng.set_offline(True)
        self._counts["nightly_resets"] += 1
        log.warning("tws sim nightly reset gap=%.3fs data_lost=%s disconnect=%s", gap, data_lost, disconnect)
        if disconnect:
            self._refusing = True
            n = self.disconnect_all()
            log.warning("tws sim nightly reset closed %d connections", n)

        def restore() -> None:
            eng.set_offline(False)
            self._refusing = False
            if data_lost:
                eng.drop_all()
            for conn in list(self._conns):
                if conn.client_id is not None:
                    conn.error(-1, 1101 if data_lost else 1102, TXT_1101 if data_lost else TXT_1102)
                    conn.error(-1, 2104, FARM_TEXTS[2104])
                    conn.error(-1, 2106, FARM_TEXTS[2106])
            log.info("tws sim nightly reset over")

        asyncio.get_running_loop().call_later(gap, restore)

    def sent_ticks(self) -> list[dict]:
        """Every live tick sent, oldest first (see :meth:`LiveEngine.sent_ticks`)."""
        return self.live_engine.sent_ticks()

    def subscriptions(self) -> dict:
        """Live subscriptions per connection (see :meth:`LiveEngine.subscriptions`)."""
        return self.live_engine.subscriptions()

    def stats(self) -> dict:
        """Counters: ``requests`` by TWS request name, ``historical``
        (served, no_data, bars_sent, cancelled, cancel_not_open, open),
        ``pacing_violations`` by rule (the model's rules), ``pacing``
        (model, requests, accepted, refused, delayed, delay_total, delay_max:
        see :meth:`pacing_log`), ``errors_sent`` by code,
        ``connections`` (accepted, active, refused_duplicate_client_id,
        bad_handshake, forced_disconnects, connectivity_losses),
        ``client_ids_seen``, ``malformed``, ``unsupported``, ``bytes_sent``,
        ``live`` (rate, subscriptions by kind, trades/quotes/index ticks/
        tick-by-tick/real-time bars/messages sent, ticks_silenced,
        ticks_offline, slow_client_skips, resubscriptions (+ by symbol),
        tbt_limit_refusals, silences, snapshots, injected_errors,
        farm_messages, nightly_resets, refused_during_reset)."""
        c = self._counts
        return copy.deepcopy({
            "requests": dict(self._requests),
            "historical": {
                "served": c["hist_served"], "no_data": c["hist_no_data"],
                "bars_sent": c["hist_bars"], "cancelled": c["hist_cancelled"],
                "cancel_not_open": c["cancel_not_open"], "open": self._open_count(),
            },
            "pacing_violations": {r: self.pacer.violations[r] for r in self.pacer.rules},
            "pacing": dict(self.pacer.summary(), model=self.pacer.model),
            "errors_sent": dict(self._errors),
            "connections": {
                "accepted": c["accepted"], "active": len(self._conns),
                "refused_duplicate_client_id": c["dup_client_id"], "bad_handshake": c["bad_handshake"],
                "forced_disconnects": c["forced_disconnects"],
                "connectivity_losses": c["connectivity_losses"],
            },
            "client_ids_seen": sorted(self._client_ids),
            "malformed": c["malformed"],
            "unsupported": c["unsupported"],
            "bytes_sent": self._bytes_sent,
            "live": dict(self.live_engine.stats(), farm_messages=c["farm_messages"],
                         nightly_resets=c["nightly_resets"], refused_during_reset=c["refused_during_reset"]),
        })

    def pacing_log(self, since: int = 0) -> list[dict]:
        """Every historical request the pacer decided on, oldest first, from
        index ``since``: ``{"t": arrival (seconds, pacer clock), "bar_size",
        "contract" (symbol), "what", "weight", "delay" (seconds the answer
        was held back), "rule" (refusing rule or None), "in_window"}``
        (see :class:`~feeds.sim.tws_pacing.PacedRequest`; at most the last
        200000 are kept)."""
        hist = self.pacer.history
        return [hist[i].as_dict() for i in range(since, len(hist))]

    def _open_count(self) -> int:
        return sum(len(c.pending) for c in self._conns)

    def now(self) -> float:
        """The simulator's current time, epoch seconds."""
        return self.clock()

    # -------------------------------------------------------------- protocol
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conn_seq += 1
        conn = _Conn(self, self._conn_seq, reader, writer)
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        self._counts["accepted"] += 1
        log.info("tws sim connection open conn=%d peer=%s", conn.number, conn.peer)
        if self._refusing:
            self._counts["refused_during_reset"] += 1
            log.info("tws sim connection refused during reset conn=%d", conn.number)
            conn.close()
            self._conns.discard(conn)
            return
        try:
            if await self._handshake(conn):
                while not conn.closed:
                    payload = await self._read_frame(conn)
                    if payload is None:
                        break
                    self._dispatch(conn, payload)
                    if not conn.closed:
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # server shutting down
            pass
        except Exception:  # never let one client take the server down
            log.exception("tws sim connection failed conn=%d", conn.number)
        finally:
            conn.close()
            self.live_engine.conn_closed(conn)
            self._conns.discard(conn)
            log.info("tws sim connection closed conn=%d client_id=%s", conn.number, conn.client_id)

    async def _read_frame(self, conn: _Conn) -> bytes | None:
        head = await conn.reader.readexactly(4)
        (n,) = struct.unpack(">I", head)
        if n == 0 or n > MAX_FRAME:
            self._counts["malformed"] += 1
            log.warning("tws sim bad frame length conn=%d length=%d: closing", conn.number, n)
            conn.close()
            return None
        return await conn.reader.readexactly(n)

    async def _handshake(self, conn: _Conn) -> bool:
        prefix = await conn.reader.readexactly(4)
        if prefix != b"API\0":
            self._counts["bad_handshake"] += 1
            log.warning("tws sim bad handshake conn=%d prefix=%r: closing", conn.number, prefix)
            conn.close()
            return False
        payload = await self._read_frame(conn)
        if payload is None:
            return False
        text = payload.decode(errors="replace").strip("\0")
        m = _VERSION_RE.match(text)
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        version = min(hi, SERVER_VERSION)
        if not m or version < max(lo, MIN_SERVER_VERSION):
            self._counts["bad_handshake"] += 1
            log.warning("tws sim unsupported client versions conn=%d text=%r (serves %d..%d): closing",
                        conn.number, text, MIN_SERVER_VERSION, SERVER_VERSION)
            conn.close()
            return False
        conn.version = version
        if m.group(3):
            log.info("tws sim connect options conn=%d options=%r (ignored)", conn.number, m.group(3))
        now = dt.datetime.fromtimestamp(self.now(), self.tws_tz)
        conn.send(version, now.strftime("%Y%m%d %H:%M:%S ") + (now.tzname() or self.tws_tz_name))
        return True

    def _dispatch(self, conn: _Conn, payload: bytes) -> None:
        fields = payload.decode(errors="replace").split("\0")
        if fields and fields[-1] == "":
            fields.pop()
        try:
            msg_id = int(fields[0])
        except (ValueError, IndexError):
            self._malformed(conn, _Malformed(-1, f"unreadable message id {fields[:1]!r}"))
            return
        name = MSG_NAMES.get(msg_id, f"msg{msg_id}")
        self._requests[name] += 1
        if self._fault is not None and (self._fault["request"] in (None, name)) and msg_id != 71:
            if self._fault["remaining"] <= 0:
                self._fault = None
                self._counts["forced_disconnects"] += 1
                log.warning("tws sim fault: closing conn=%d client_id=%s on %s without answer",
                            conn.number, conn.client_id, name)
                conn.close()
                return
            self._fault["remaining"] -= 1
        handler = self._handlers.get(msg_id)
        if handler is None:
            self._counts["unsupported"] += 1
            req_id = _int_or(fields, _REQ_ID_POS.get(msg_id, 99), -1)
            log.info("tws sim unsupported request conn=%d msg_id=%d", conn.number, msg_id)
            conn.error(req_id, 321, TXT_VALIDATE.format(
                marker="bN", cause=f"Message id {msg_id} is not served by this server"))
            return
        try:
            handler(conn, fields)
        except _Malformed as exc:
            self._malformed(conn, exc)
        except (ValueError, IndexError) as exc:
            req_id = _int_or(fields, _REQ_ID_POS.get(msg_id, 99), -1)
            self._malformed(conn, _Malformed(req_id, f"cannot read {name}: {exc}"))

    def _malformed(self, conn: _Conn, exc: _Malformed) -> None:
        self._counts["malformed"] += 1
        log.warning("tws sim malformed request conn=%d req_id=%d cause=%s", conn.number, exc.req_id, exc.cause)
        conn.error(exc.req_id, 321, TXT_VALIDATE.format(marker=exc.marker, cause=exc.cause))

    # ------------------------------------------------------- simple requests
    def _noop(self, conn: _Conn, f: list[str]) -> None:
        pass

    def _start_api(self, conn: _Conn, f: list[str]) -> None:
        client_id = int(f[2])
        if conn.client_id is not None:
            return
        if any(c.client_id == client_id and not c.closed for c in self._conns if c is not conn):
            self._counts["dup_client_id"] += 1
            log.warning("tws sim refused duplicate client_id=%d conn=%d", client_id, conn.number)
            conn.error(-1, 326, TXT_DUP_CLIENT)
            conn.close()
            return
        conn.client_id = client_id
        self._client_ids.add(client_id)
        log.info("tws sim api started conn=%d client_id=%d version=%d", conn.number, client_id, conn.version)
        conn.send(15, 1, ",".join(self.accounts))
        conn.send(9, 1, conn.next_order_id)
        if self.connect_notices:
            for code, text in CONNECT_NOTICES:
                conn.error(-1, code, text)

    def _positions(self, conn: _Conn, f: list[str]) -> None:
        conn.send(62, 1)

    def _open_orders(self, conn: _Conn, f: list[str]) -> None:
        conn.send(53, 1)

    def _completed_orders(self, conn: _Conn, f: list[str]) -> None:
        conn.send(102)

    def _account_updates(self, conn: _Conn, f: list[str]) -> None:
        if f[2] in ("1", "True", "true"):
            now = dt.datetime.fromtimestamp(self.now(), self.tws_tz)
            conn.send(8, 1, now.strftime("%H:%M"))
            conn.send(54, 1, f[3] if len(f) > 3 else "")

    def _account_updates_multi(self, conn: _Conn, f: list[str]) -> None:
        conn.send(74, 1, int(f[2]))

    def _executions(self, conn: _Conn, f: list[str]) -> None:
        conn.send(55, 1, int(f[2]))

    def _current_time(self, conn: _Conn, f: list[str]) -> None:
        conn.send(49, 1, int(self.now()))

    def _managed_accounts(self, conn: _Conn, f: list[str]) -> None:
        conn.send(15, 1, ",".join(self.accounts))

    def _req_ids(self, conn: _Conn, f: list[str]) -> None:
        conn.send(9, 1, conn.next_order_id)

    def _account_summary(self, conn: _Conn, f: list[str]) -> None:
        conn.send(64, 1, int(f[2]))

    # -------------------------------------------------------------- contracts
    def _match(self, c: dict) -> ContractSpec | None:
        """The configured contract a request's contract fields name, or None."""
        spec = None
        if c["conId"]:
            spec = self._by_con_id.get(c["conId"])
            if spec is None or (c["symbol"] and c["symbol"].upper() != spec.symbol):
                return None
        elif c["symbol"]:
            spec = self.contracts.get(c["symbol"].upper())
        if spec is None:
            return None
        if c["secType"] and c["secType"].upper() != spec.sec_type:
            return None
        if c["currency"] and c["currency"].upper() != spec.currency:
            return None
        if c["localSymbol"] and c["localSymbol"].upper() != spec.symbol:
            return None
        if not spec.accepts_exchange(c["exchange"]) or not spec.accepts_primary(c["primaryExchange"]):
            return None
        return spec

    def _contract_details(self, conn: _Conn, f: list[str]) -> None:
        req_id = int(f[2])
        if len(f) < 18:
            raise _Malformed(req_id, "reqContractDetails has too few fields", marker="bM")
        c = _contract(f, 3)
        spec = self._match(c)
        if spec is None:
            log.info("tws sim unknown contract req_id=%d symbol=%s secType=%s exchange=%s",
                     req_id, c["symbol"], c["secType"], c["exchange"])
            conn.error(req_id, 200, TXT_NO_SECDEF)
            return
        exchange = c["exchange"].upper() or spec.exchange
        trading, liquid = self._hours(spec)
        stk = spec.sec_type == "STK"
        conn.send(
            10, req_id, spec.symbol, spec.sec_type, "", "0", "", exchange, spec.currency, spec.symbol,
            spec.trading_class, spec.trading_class, spec.con_id, spec.min_tick, "",
            _STK_ORDER_TYPES if stk else "", ",".join(spec.valid_exchanges), 1, 0, spec.long_name,
            spec.primary_exchange, "", spec.industry, spec.category, spec.subcategory, spec.time_zone,
            trading, liquid, "", "", 0,
            1, "", "", ",".join(["26" if stk else "110"] * len(spec.valid_exchanges)), "",
            "COMMON" if stk else "",
            "0.0001" if stk else "1", "0.0001" if stk else "1", "100" if stk else "1",
        )
        conn.send(52, 1, req_id)
        self._counts["contract_details"] += 1

    def _hours(self, spec: ContractSpec) -> tuple[str, str]:
        """tradingHours and liquidHours for seven days from today, in IB's
        ``yyyymmdd:hhmm-yyyymmdd:hhmm;yyyymmdd:CLOSED`` form."""
        tz = spec.tz
        today = dt.datetime.fromtimestamp(self.now(), tz).date()
        trading, liquid = [], []
        for i in range(7):
            day = today + dt.timedelta(days=i)
            d = day.strftime("%Y%m%d")
            sess = self.sessions.session(day)
            if sess is None:
                trading.append(f"{d}:CLOSED")
                liquid.append(f"{d}:CLOSED")
                continue
            o = dt.datetime.fromtimestamp(sess[0], tz).strftime("%H%M")
            c_dt = dt.datetime.fromtimestamp(sess[1], tz)
            c = c_dt.strftime("%H%M")
            liquid.append(f"{d}:{o}-{d}:{c}")
            if spec.sec_type == "STK":
                ext_close = "2000" if c_dt.hour >= 16 else f"{c_dt.hour + 4:02d}{c_dt.minute:02d}"
                trading.append(f"{d}:0400-{d}:{ext_close}")
            else:
                trading.append(f"{d}:{o}-{d}:{c}")
        return ";".join(trading), ";".join(liquid)

    # --------------------------------------------------------- head timestamp
    def _head_epoch(self, spec: ContractSpec, use_rth: bool) -> int | None:
        if spec.head_timestamp is not None:
            ts = spec.head_timestamp
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=spec.tz)
            return int(ts.timestamp())
        if spec.csv_files:
            return self.store.first_bar_time(spec, use_rth)
        tz = spec.tz
        day = dt.datetime.fromtimestamp(self.now(), tz).date() - dt.timedelta(days=730)
        for _ in range(15):
            sess = self.sessions.session(day)
            if sess is not None:
                if use_rth:
                    return sess[0]
                return int(dt.datetime.combine(day, dt.time(4, 0), tzinfo=tz).timestamp())
            day += dt.timedelta(days=1)
        return None

    def _head_timestamp(self, conn: _Conn, f: list[str]) -> None:
        req_id = int(f[1])
        if len(f) < 18:
            raise _Malformed(req_id, "reqHeadTimeStamp has too few fields")
        c = _contract(f, 2)
        use_rth_s, what, fmt_s = f[15], f[16].upper(), f[17]
        if use_rth_s not in ("0", "1"):
            raise _Malformed(req_id, f"useRTH must be 0 or 1, not {use_rth_s!r}")
        if fmt_s not in ("1", "2"):
            raise _Malformed(req_id, f"Date formatting selection of {fmt_s} rejected", marker="bT")
        if what not in IB_BAR_TYPES:
            raise _Malformed(req_id, f"Historical data type {what!r} is invalid")
        spec = self._match(c)
        if spec is None:
            conn.error(req_id, 200, TXT_NO_SECDEF)
            return
        if not spec.subscribed:
            conn.error(req_id, 354, TXT_NOT_SUBSCRIBED)
            return
        exchange = c["exchange"].upper() or spec.exchange
        head = self._head_epoch(spec, use_rth_s == "1") if what in WHAT_TO_SHOW else None
        if head is None:
            conn.error(req_id, 162, TXT_NO_DATA.format(symbol=spec.symbol, exchange=exchange,
                                                       what=WHAT_TO_SHOW.get(what, what.title())))
            return
        conn.send(88, req_id, str(head) if fmt_s == "2" else format_utc_dash(head))

    # -------------------------------------------------------- historical data
    def _historical_data(self, conn: _Conn, f: list[str]) -> None:
        req_id = int(f[1])
        if len(f) < 23:
            raise _Malformed(req_id, "reqHistoricalData has too few fields")
        c = _contract(f, 2)
        end_s, bar_size, dur_s, use_rth_s, what, fmt_s = f[15], f[16].strip(), f[17], f[18], f[19].upper(), f[20]
        i = 21
        if c["secType"].upper() == "BAG":
            i += 1 + 4 * int(f[i])
        keep_up = f[i] if len(f) > i else ""

        if bar_size not in BAR_SIZES:
            raise _Malformed(req_id, TXT_BAR_SIZE_INVALID, marker="bK")
        if what not in IB_BAR_TYPES:
            raise _Malformed(req_id, f"Historical data type {what!r} is invalid")
        if fmt_s not in ("1", "2"):
            raise _Malformed(req_id, f"Date formatting selection of {fmt_s} rejected", marker="bT")
        if use_rth_s not in ("0", "1"):
            raise _Malformed(req_id, f"useRTH must be 0 or 1, not {use_rth_s!r}")
        if keep_up not in ("", "0", "False"):
            raise _Malformed(req_id, "keepUpToDate is not served by this server; send keepUpToDate=0")
        try:
            n, unit = parse_duration(dur_s)
        except DurationError:
            raise _Malformed(req_id, f"Historical data duration {dur_s!r} is invalid") from None
        now = self.now()
        try:
            end, implied = parse_end_datetime(end_s, self.tws_tz, now)
        except EndDateTimeError:
            raise _Malformed(req_id, "invalid end date/time") from None

        spec = self._match(c)
        if spec is None:
            log.info("tws sim unknown contract req_id=%d symbol=%s secType=%s exchange=%s",
                     req_id, c["symbol"], c["secType"], c["exchange"])
            conn.error(req_id, 200, TXT_NO_SECDEF)
            return
        exchange = c["exchange"].upper() or spec.exchange
        if not spec.subscribed:
            conn.error(req_id, 354, TXT_NOT_SUBSCRIBED)
            return
        if bar_size != "1 min":
            conn.error(req_id, 162, TXT_BAR_SIZE_UNSERVED.format(size=bar_size))
            return
        if what not in WHAT_TO_SHOW:
            conn.error(req_id, 162, TXT_NO_TYPE.format(what=what, symbol=spec.symbol, exchange=exchange))
            return
        if duration_seconds_upper(n, unit) > MAX_ONE_MIN_SECONDS:
            conn.error(req_id, 162, TXT_TIME_LENGTH)
            return
        identical = (spec.con_id, exchange, end_s.strip(), dur_s.strip(), bar_size, what, use_rth_s, fmt_s)
        paced = self.pacer.decide(identical, (spec.con_id, exchange, what),
                                  weight=BID_ASK_WEIGHT if what == "BID_ASK" else 1, open_now=self._open_count(),
                                  bar_size=bar_size, contract=spec.symbol, what=what)
        if paced.rule is not None:
            log.warning("tws sim pacing violation rule=%s model=%s conn=%d req_id=%d symbol=%s what=%s "
                        "end=%r dur=%r t=%.6f in_window=%d", paced.rule, self.pacer.model, conn.number, req_id,
                        spec.symbol, what, end_s, dur_s, paced.t, paced.in_window)
            conn.error(req_id, 162, TXT_PACING)
            return
        log.debug("tws sim historical request conn=%d req_id=%d symbol=%s bar=%s what=%s t=%.6f "
                  "in_window=%d delay=%.6f", conn.number, req_id, spec.symbol, bar_size, what, paced.t,
                  paced.in_window, paced.delay)
        if implied:
            conn.error(req_id, 2174, TXT_2174)

        use_rth = use_rth_s == "1"
        start = request_window_start(end, n, unit, spec.tz)
        bars = self._bars(spec, what, use_rth, start, end, now)
        fields: list[object]
        if bars:
            tz, tzn = spec.tz, spec.time_zone
            fields = [17, req_id, format_bar_time(int(start), tz, tzn), format_bar_time(int(end), tz, tzn), len(bars)]
            for b in bars:
                fields += (str(b.t) if fmt_s == "2" else format_bar_time(b.t, tz, tzn),
                           b.open, b.high, b.low, b.close, b.volume, b.wap, b.count)
        else:
            fields = []
        no_data = TXT_NO_DATA.format(symbol=spec.symbol, exchange=exchange, what=WHAT_TO_SHOW[what])
        delay = self.latency + paced.delay
        if delay > 0:
            conn.pending[req_id] = asyncio.get_running_loop().create_task(
                self._answer_later(conn, req_id, fields, no_data, len(bars), delay))
        else:
            self._answer(conn, req_id, fields, no_data, len(bars))

    def _bars(self, spec: ContractSpec, what: str, use_rth: bool, start: float, end: float, now: float) -> list[Bar]:
        head = self._head_epoch(spec, use_rth)
        lo = max(start, head) if head is not None else start
        hi = min(end, now + 1)
        if lo >= hi:
            return []
        tz = spec.tz
        day = dt.datetime.fromtimestamp(lo, tz).date()
        last = dt.datetime.fromtimestamp(hi, tz).date()
        out: list[Bar] = []
        live = self.store.live is not None
        while day <= last:
            if live or day.weekday() < 5 or spec.csv_files:
                out.extend(b for b in self.store.day_bars(spec, day, what, use_rth) if lo <= b.t < hi)
            day += dt.timedelta(days=1)
        if live and out and out[-1].t + 60 > now and what == "TRADES":
            part = self.live_engine.partial_bar(spec, out[-1], now)
            if part is None:
                out.pop()
            else:
                out[-1] = part
        return out

    # ------------------------------------------------------------ live data
    def _req_mkt_data(self, conn: _Conn, f: list[str]) -> None:
        if len(f) < 19:
            raise _Malformed(int(f[2]), "reqMktData has too few fields")
        self.live_engine.req_mkt_data(conn, f, self._match(_contract(f, 3)))

    def _req_tick_by_tick(self, conn: _Conn, f: list[str]) -> None:
        if len(f) < 17:
            raise _Malformed(int(f[1]), "reqTickByTickData has too few fields")
        self.live_engine.req_tick_by_tick(conn, f, self._match(_contract(f, 2)))

    def _req_real_time_bars(self, conn: _Conn, f: list[str]) -> None:
        if len(f) < 18:
            raise _Malformed(int(f[2]), "reqRealTimeBars has too few fields")
        self.live_engine.req_real_time_bars(conn, f, self._match(_contract(f, 3)))

    def _answer(self, conn: _Conn, req_id: int, fields: list, no_data: str, n_bars: int) -> None:
        if n_bars:
            conn.send(*fields)
            self._counts["hist_served"] += 1
            self._counts["hist_bars"] += n_bars
        else:
            self._counts["hist_no_data"] += 1
            conn.error(req_id, 162, no_data)

    async def _answer_later(self, conn: _Conn, req_id: int, fields: list, no_data: str, n_bars: int,
                            delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            return
        conn.pending.pop(req_id, None)
        if conn.closed:
            return
        self._answer(conn, req_id, fields, no_data, n_bars)
        try:
            await conn.writer.drain()
        except ConnectionError:
            pass

    def _cancel_historical(self, conn: _Conn, f: list[str]) -> None:
        req_id = int(f[2])
        task = conn.pending.pop(req_id, None)
        if task is None or task.done():
            self._counts["cancel_not_open"] += 1
            return
        task.cancel()
        self._counts["hist_cancelled"] += 1
        conn.error(req_id, 162, TXT_CANCELLED.format(req_id=req_id))


def _int_or(fields: Sequence[str], pos: int, default: int) -> int:
    try:
        return int(fields[pos])
    except (IndexError, ValueError):
        return default


def _contract(f: Sequence[str], i: int) -> dict:
    """The 12 contract fields ib_async sends starting at index ``i``."""
    return {
        "conId": int(f[i] or 0), "symbol": f[i + 1], "secType": f[i + 2],
        "lastTradeDateOrContractMonth": f[i + 3], "strike": f[i + 4], "right": f[i + 5],
        "multiplier": f[i + 6], "exchange": f[i + 7], "primaryExchange": f[i + 8],
        "currency": f[i + 9], "localSymbol": f[i + 10], "tradingClass": f[i + 11],
    }


# ------------------------------------------------------------------ runners


async def run_until_signalled(sim: TwsSimulator, stats_interval: float = 30.0) -> dict:
    """Start ``sim``, log a stats line every ``stats_interval`` seconds,
    stop on SIGTERM or SIGINT and return the final :meth:`TwsSimulator.stats`."""
    import json

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sim.start()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=stats_interval)
            except asyncio.TimeoutError:
                log.info("tws sim stats %s", json.dumps(sim.stats(), sort_keys=True))
    finally:
        await sim.stop()
    return sim.stats()


class TwsSimulatorThread:
    """Runs a :class:`TwsSimulator` on its own event loop in a daemon thread.

    ``with TwsSimulatorThread(pacing_scale=0.01) as sim: ...`` -- keyword
    arguments go to :class:`TwsSimulator`.  :attr:`port`, :meth:`stats`,
    :meth:`pacing_log`, :meth:`disconnect_all`, :meth:`fail_after`,
    :meth:`connectivity_loss` and the live controls (:meth:`live`, :meth:`inject_error`,
    :meth:`clear_error`, :meth:`silence`, :meth:`farm_message`,
    :meth:`nightly_reset`, :meth:`sent_ticks`, :meth:`subscriptions`) are
    safe to call from the caller's thread.
    Raises ``TimeoutError`` if the server does not start within
    ``start_timeout`` seconds.
    """

    def __init__(self, start_timeout: float = 10.0, **kwargs) -> None:
        self.sim = TwsSimulator(**kwargs)
        self._timeout = start_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tws-sim", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.sim.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.sim.stop())
        self._loop.close()

    def __enter__(self) -> TwsSimulatorThread:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError("TWS simulator did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and the thread (idempotent)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self._timeout)

    @property
    def port(self) -> int:
        return self.sim.port

    def _call(self, fn: Callable, *args, **kwargs):
        async def run():
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    def stats(self) -> dict:
        return self._call(self.sim.stats)

    def pacing_log(self, since: int = 0) -> list[dict]:
        return self._call(self.sim.pacing_log, since)

    def disconnect_all(self, abort: bool = False) -> int:
        return self._call(self.sim.disconnect_all, abort)

    def fail_after(self, n_requests: int, request: str | None = "reqHistoricalData") -> None:
        self._call(self.sim.fail_after, n_requests, request)

    def connectivity_loss(self, gap: float = 1.0, data_lost: bool = False) -> None:
        self._call(self.sim.connectivity_loss, gap, data_lost)

    def live(self, trades_per_minute: int | None = None) -> int:
        return self._call(self.sim.live, trades_per_minute)

    def inject_error(self, symbol: str, code: int, text: str | None = None) -> None:
        self._call(self.sim.inject_error, symbol, code, text)

    def clear_error(self, symbol: str | None = None) -> None:
        self._call(self.sim.clear_error, symbol)

    def silence(self, symbol: str, seconds: float) -> None:
        self._call(self.sim.silence, symbol, seconds)

    def farm_message(self, code: int, text: str | None = None) -> int:
        return self._call(self.sim.farm_message, code, text)

    def nightly_reset(self, gap: float = 2.0, data_lost: bool = True, disconnect: bool = False) -> None:
        self._call(self.sim.nightly_reset, gap, data_lost, disconnect)

    def sent_ticks(self) -> list[dict]:
        return self._call(self.sim.sent_ticks)

    def subscriptions(self) -> dict:
        return self._call(self.sim.subscriptions)
