"""Live market data of the TWS API simulator: reqMktData, reqTickByTickData,
reqRealTimeBars, their cancels, errors on demand and connectivity events.

Wire layouts (TWS API socket protocol at server version 178, as ib_async
2.1.0's ``client.py`` sends and ``decoder.py`` reads them):

Incoming

* reqMarketDataType (59): ``59, 1, marketDataType`` (1 live, 2 frozen,
  3 delayed, 4 delayed-frozen);
* reqMktData (1): ``1, 11, reqId, <12 contract fields>, deltaNeutral flag
  (0, or 1 + conId, delta, price), genericTickList, snapshot,
  regulatorySnapshot, mktDataOptions``; cancelMktData (2): ``2, 2, reqId``;
* reqTickByTickData (97): ``97, reqId, <12 contract fields>, tickType
  (Last|AllLast|BidAsk|MidPoint), numberOfTicks, ignoreSize``;
  cancelTickByTickData (98): ``98, reqId``;
* reqRealTimeBars (50): ``50, 3, reqId, <12 contract fields>, barSize,
  whatToShow, useRTH, options``; cancelRealTimeBars (51): ``51, 1, reqId``.

Outgoing

* MARKET_DATA_TYPE (58): ``58, 1, reqId, type``;
* TICK_REQ_PARAMS (81): ``81, reqId, minTick, bboExchange, snapshotPermissions``;
* TICK_PRICE (1): ``1, 6, reqId, tickType, price, size, attrMask`` (1 bid,
  2 ask, 4 last; 66/67/68 their delayed forms);
* TICK_SIZE (2): ``2, 6, reqId, tickType, size`` (0 bid size, 3 ask size,
  5 last size, 8 volume; 69/70/71/74 delayed);
* TICK_STRING (46): ``46, 6, reqId, 48, "price;size;ms;totalVolume;vwap;true"``
  (RTVolume, generic tick 233; ms = the trade's epoch milliseconds,
  totalVolume and vwap of the contract's local day; tick type 77, RT Trade
  Volume, the same for generic tick 375);
* TICK_SNAPSHOT_END (57): ``57, 1, reqId`` after a snapshot request (the
  quote and last trade in force, then the end);
* TICK_GENERIC (45): ``45, 6, reqId, tickType, value`` (49 halted = 0 on
  subscription; 54 tradeCount when generic tick 293 is asked);
* TICK_BY_TICK (99): ``99, reqId, 1|2, time, price, size, mask, exchange,
  specialConditions`` (Last/AllLast), ``99, reqId, 3, time, bid, ask,
  bidSize, askSize, mask`` (BidAsk), ``99, reqId, 4, time, midPoint``;
  time in epoch seconds;
* REAL_TIME_BARS (50): ``50, 3, reqId, time, open, high, low, close, volume,
  wap, count`` every 5 s (bar start time), from the same trades.

Generated data: for minute M of contract S the trades are
:func:`feeds.sim.tws_data.bar_trades` of the TRADES bar the simulator
serves to ``reqHistoricalData`` for M (live mode: a bar for *every* minute,
nights, weekends and holidays included, so ``useRTH=0`` requests see every
minute and live trades flow at any hour; ``useRTH=1`` keeps the exchange
session).  Each trade is sent when the simulator's clock passes its time:
for a stock the quote in force (tickPrice 1/2 with their size, tickSize 0/3),
then tickPrice 4 (last, with size), tickSize 5 and, with generic tick 233,
the RTVolume string; after each batch tickSize 8 (day volume).  An index
(secType IND) gets tickPrice 4 only (size 0).  Ticks are batched per event
loop round (``tick_interval``) with one socket write per connection.

Errors on demand (:meth:`LiveEngine.inject_error`) use IB's texts
(:data:`ERROR_TEXTS`): 354, 10089, 10168, 10197, 200 refuse the request;
10090 keeps the subscription without the RTVolume generic tick; 10167
continues with delayed data (marketDataType 3, delayed tick types 66..71,
no RTVolume); 10190 refuses tick-by-tick requests only.  IB's limit on
simultaneous tick-by-tick subscriptions (TWS API "Tick-by-Tick Data": the
market depth formula, three for a default account) answers the extra
request with 10190.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from collections import Counter, OrderedDict, deque
from typing import TYPE_CHECKING, Any

from .tws_data import Bar, ContractSpec, LiveRates, MinuteTrades, bar_trades

if TYPE_CHECKING:  # pragma: no cover
    from .tws import TwsSimulator, _Conn

log = logging.getLogger(__name__)

__all__ = [
    "LiveEngine",
    "ERROR_TEXTS",
    "FARM_TEXTS",
    "MAX_TICK_BY_TICK",
    "DEFAULT_TRADES_PER_MINUTE",
    "TICK_INTERVAL",
]

#: IB's default number of simultaneous tick-by-tick subscriptions (TWS API
#: "Tick-by-Tick Data": same formula as market depth, minimum three).
MAX_TICK_BY_TICK = 3
#: Trades per minute per contract when live mode is switched on without a rate.
DEFAULT_TRADES_PER_MINUTE = 60
#: Seconds between two rounds of generated ticks (IB aggregates stock ticks
#: every 250 ms for reqMktData; the simulator sends more often, in batches).
TICK_INTERVAL = 0.05
#: A connection whose unsent output exceeds this many bytes gets no more
#: ticks until it drains (counted in stats as ``slow_client_skips``).
MAX_BUFFERED = 64 * 1024 * 1024

#: IB's texts for the market data errors the simulator sends on demand.
ERROR_TEXTS: dict[int, str] = {
    200: "No security definition has been found for the request",
    354: "Requested market data is not subscribed.",
    10089: ("Requested market data requires additional subscription for API. "
            "See link in 'Market Data Connections' dialog for more details."),
    10090: ("Part of requested market data is not subscribed. Subscription-independent ticks are "
            "still active.Delayed market data is not available."),
    10167: "Requested market data is not subscribed. Displaying delayed market data.",
    10168: "Requested market data is not subscribed. Delayed market data is not enabled.",
    10189: "Failed to request tick-by-tick data. Invalid Real-time Query",
    10190: "Max number of tick-by-tick requests has been reached.",
    10197: "No market data during competing live session",
}
#: Farm and connectivity notices (code -> text) as TWS sends them (reqId -1).
FARM_TEXTS: dict[int, str] = {
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
    2103: "Market data farm connection is broken:usfarm",
    2104: "Market data farm connection is OK:usfarm",
    2105: "HMDS data farm connection is broken:ushmds",
    2106: "HMDS data farm connection is OK:ushmds",
    2107: "HMDS data farm connection is inactive but should be available upon demand.ushmds",
    2108: "Market data farm connection is inactive but should be available upon demand.usfarm",
    2157: "Sec-def data farm connection is broken:secdefnj",
    2158: "Sec-def data farm connection is OK:secdefnj",
}
#: Codes that refuse a live request (no data follows).
REFUSING = frozenset({200, 354, 10089, 10168, 10189, 10197})

_PACK = struct.Struct(">I").pack
_TBT_TYPES = {"Last": 1, "AllLast": 2, "BidAsk": 3, "MidPoint": 4}


def _frame(payload: str) -> bytes:
    b = payload.encode()
    return _PACK(len(b)) + b


# 4-byte big-endian length prefixes as latin-1 text, so that a batch of
# ASCII messages is framed with one join and one encode.
_PFX = [struct.pack(">I", n).decode("latin-1") for n in range(8192)]


def _frames(msgs: list[str]) -> bytes:
    pfx = _PFX
    try:
        return "".join([pfx[len(m)] + m for m in msgs]).encode("latin-1")
    except (IndexError, UnicodeEncodeError):
        return b"".join([_frame(m) for m in msgs])


@dataclasses.dataclass(eq=False)
class _Sub:
    kind: str                 # "mkt" | "tbt" | "rtb"
    conn: Any
    req_id: int
    spec: ContractSpec
    generic: frozenset[str] = frozenset()
    mode: str = "live"        # mkt: "live" | "delayed" | "partial"
    tbt_type: str = ""
    what: str = ""
    use_rth: bool = False
    next_bar_ms: int = 0
    pre_price: str = ""
    pre_size: str = ""
    pre_string: str = ""


@dataclasses.dataclass(eq=False)
class _SymState:
    last_ms: int
    subs: list = dataclasses.field(default_factory=list)


class LiveEngine:
    """The live-data part of one :class:`~feeds.sim.tws.TwsSimulator`.

    Runs on the simulator's event loop; not thread-safe (the simulator's
    thread runner marshals calls).  ``rate`` None leaves live mode off until
    :meth:`live` is called (then requests are still accepted but no ticks
    are generated).  ``record``: ``"all"`` keeps every sent tick for
    :meth:`sent_ticks` (at most ``max_recorded``, oldest dropped), ``"count"``
    keeps counters only.
    """

    def __init__(self, sim: TwsSimulator, rate: int | None = None, *, max_tick_by_tick: int = MAX_TICK_BY_TICK,
                 record: str = "all", max_recorded: int = 200_000, tick_interval: float = TICK_INTERVAL) -> None:
        if record not in ("all", "count"):
            raise ValueError("record must be 'all' or 'count'")
        self.sim = sim
        self.max_tbt = int(max_tick_by_tick)
        self.record = record
        self.tick_interval = float(tick_interval)
        self._sent: deque[dict] = deque(maxlen=max_recorded)
        self._symbols: dict[str, _SymState] = {}
        self._minutes: OrderedDict[tuple[str, int], MinuteTrades] = OrderedDict()
        self._errors: dict[str, tuple[int, str]] = {}
        self._silent_until: dict[str, float] = {}
        self._cancelled: set[tuple[int, str]] = set()   # (conn number, symbol) of cancelled mktData
        self._offline = False
        self._farm_down = False
        self._task: asyncio.Task | None = None
        self.counts: Counter[str] = Counter()
        self.resubscriptions: Counter[str] = Counter()
        self.rates: LiveRates | None = None
        if rate is not None:
            self.live(rate)

    # ------------------------------------------------------------ control
    def live(self, trades_per_minute: int | None = None) -> int:
        """Switch live mode on; ``trades_per_minute`` (1..60000, default the
        current rate or :data:`DEFAULT_TRADES_PER_MINUTE`) is barCount of
        every generated minute from the next minute on (all minutes when
        live mode was off).  Returns the rate."""
        store = self.sim.store
        if self.rates is None:
            self.rates = LiveRates(trades_per_minute or DEFAULT_TRADES_PER_MINUTE)
            store.set_live(self.rates, cache_days=4 * len(self.sim.contracts) + 16)
        elif trades_per_minute is not None:
            nxt = (int(self.sim.now()) // 60 + 1) * 60
            self.rates.set_from(nxt, trades_per_minute)
            store.set_live(self.rates)
        self._minutes.clear()
        log.info("tws sim live mode rate=%d trades/min/contract", self.rates.current)
        return self.rates.current

    def inject_error(self, symbol: str, code: int, text: str | None = None) -> None:
        """From now on the contract's live requests (and its current
        subscriptions) are answered with ``code`` (IB's text unless ``text``);
        ``code`` 0 clears it.  10167: delayed data follows (marketDataType 3,
        whatever reqMarketDataType asked; the same trades, not 15 minutes
        late); 10090: data without RTVolume; 10190: tick-by-tick requests
        only; other codes end the contract's subscriptions (reqMktData,
        tick-by-tick, real-time bars)."""
        sym = symbol.upper()
        if not code:
            self._errors.pop(sym, None)
            return
        txt = text if text is not None else ERROR_TEXTS.get(code, f"Error {code}")
        self._errors[sym] = (int(code), txt)
        for sub in list(self._all_subs()):
            if sub.spec.symbol != sym:
                continue
            if code == 10190:
                if sub.kind == "tbt":
                    sub.conn.error(sub.req_id, code, txt)
                    self._drop(sub)
                continue
            sub.conn.error(sub.req_id, code, txt)
            if code == 10167 and sub.kind == "mkt":
                sub.mode = "delayed"
                sub.conn.send(58, 1, sub.req_id, 3)
            elif code == 10090 and sub.kind == "mkt":
                sub.mode = "partial"
            else:
                self._drop(sub)

    def clear_error(self, symbol: str | None = None) -> None:
        """Forget the injected error of ``symbol`` (every symbol when None)."""
        if symbol is None:
            self._errors.clear()
        else:
            self._errors.pop(symbol.upper(), None)

    def silence(self, symbol: str, seconds: float) -> None:
        """The contract sends no tick for ``seconds`` (its trades still
        happen and are in the bars); subscriptions stay.  A new reqMktData
        for it ends the silence early."""
        self._silent_until[symbol.upper()] = self.sim.now() + float(seconds)
        self.counts["silences"] += 1

    def set_offline(self, offline: bool) -> None:
        """No tick at all while offline (connectivity lost)."""
        self._offline = offline

    def farm(self, code: int) -> None:
        """2103 stops every tick until 2104; other farm codes only notify."""
        if code == 2103:
            self._farm_down = True
        elif code == 2104:
            self._farm_down = False

    def drop_all(self) -> int:
        """Forget every subscription (IB's 'data lost'); returns how many.
        A later reqMktData for a dropped contract on the same connection
        counts as a resubscription."""
        subs = list(self._all_subs())
        for sub in subs:
            if sub.kind == "mkt":
                self._cancelled.add((sub.conn.number, sub.spec.symbol))
            self._drop(sub)
        return len(subs)

    def sent_ticks(self) -> list[dict]:
        """Every tick sent (see module docstring), oldest first: dicts with
        ``symbol, kind ("trade" | "bid_ask" | "index" | "tbt_last" |
        "tbt_bidask" | "tbt_midpoint"), price, size, time_ms, bid, ask,
        bid_size, ask_size, conn, req_id, market_data_type`` (trades also
        ``rt_volume``: whether an RTVolume string was sent; "rtbar" entries
        ``bar``: (open, high, low, close, volume, wap, count)); prices are
        decimal text, sizes int (None where not applicable); ``time_ms`` is
        the trade's (simulated) epoch milliseconds.  Empty when recording
        only counts."""
        return list(self._sent)

    def subscriptions(self) -> dict:
        """``{conn number: {"client_id", "mktData": {reqId: symbol},
        "tbt": {reqId: [symbol, tickType]}, "rtbars": {reqId: [symbol, what]}}}``."""
        out: dict = {}
        for conn in self.sim._conns:
            subs = getattr(conn, "live_subs", {})
            out[conn.number] = {
                "client_id": conn.client_id,
                "mktData": {r: s.spec.symbol for r, s in subs.items() if s.kind == "mkt"},
                "tbt": {r: [s.spec.symbol, s.tbt_type] for r, s in subs.items() if s.kind == "tbt"},
                "rtbars": {r: [s.spec.symbol, s.what] for r, s in subs.items() if s.kind == "rtb"},
            }
        return out

    def stats(self) -> dict:
        c = self.counts
        return {
            "rate": self.rates.current if self.rates else None,
            "subscriptions": {"mktData": self._count("mkt"), "tbt": self._count("tbt"), "rtbars": self._count("rtb")},
            "trades_sent": c["trade"], "quotes_sent": c["bid_ask"], "index_ticks_sent": c["index"],
            "tbt_sent": c["tbt"], "rtbars_sent": c["rtbar"], "messages_sent": c["messages"],
            "ticks_silenced": c["silenced"], "ticks_offline": c["offline"],
            "slow_client_skips": c["slow"], "resubscriptions": sum(self.resubscriptions.values()),
            "resubscriptions_by_symbol": dict(self.resubscriptions),
            "tbt_limit_refusals": c["tbt_limit"], "silences": c["silences"], "snapshots": c["snapshots"],
            "injected_errors": {s: e[0] for s, e in self._errors.items()},
        }

    def _count(self, kind: str) -> int:
        return sum(1 for s in self._all_subs() if s.kind == kind)

    def _all_subs(self):
        for conn in list(self.sim._conns):
            yield from list(getattr(conn, "live_subs", {}).values())

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self.pump()
            except Exception:  # never let generation kill the loop
                log.exception("tws sim live pump failed")

    def conn_closed(self, conn: _Conn) -> None:
        for sub in list(getattr(conn, "live_subs", {}).values()):
            self._drop(sub)

    # ------------------------------------------------------------ requests
    def market_data_type(self, conn: _Conn, f: list[str]) -> None:
        conn.market_data_type = int(f[2])

    def _check_error(self, conn: _Conn, req_id: int, spec: ContractSpec, kind: str) -> int | None:
        """Send the contract's injected error; returns its code (None: none)."""
        err = self._errors.get(spec.symbol)
        if err is None:
            return None
        code, txt = err
        if code == 10190 and kind != "tbt":
            return None
        conn.error(req_id, code, txt)
        return code

    @staticmethod
    def _refused(conn: _Conn, req_id: int, spec: ContractSpec | None) -> bool:
        """Answer a request for an unknown contract with 200 and one without a market data
        subscription with 354, as IB does; True when answered so."""
        if spec is None:
            conn.error(req_id, 200, ERROR_TEXTS[200])
            return True
        if not spec.subscribed:
            conn.error(req_id, 354, ERROR_TEXTS[354])
            return True
        return False

    def req_mkt_data(self, conn: _Conn, f: list[str], spec: ContractSpec | None) -> None:
        req_id = int(f[2])
        i = 15
        if f[i] in ("1", "True", "true"):
            i += 3
        generic = frozenset(g.strip() for g in f[i + 1].split(",") if g.strip())
        snapshot = f[i + 2] in ("1", "True", "true")
        if self._refused(conn, req_id, spec):
            return
        code = self._check_error(conn, req_id, spec, "mkt")
        if code is not None and code not in (10167, 10090):
            return
        key = (conn.number, spec.symbol)
        if key in self._cancelled:
            self._cancelled.discard(key)
            self.resubscriptions[spec.symbol] += 1
        self._silent_until.pop(spec.symbol, None)
        mode = "delayed" if code == 10167 else "partial" if code == 10090 else "live"
        sub = _Sub("mkt", conn, req_id, spec, generic=generic, mode=mode)
        d = mode == "delayed"
        conn.send(58, 1, req_id, 3 if d else 1)
        conn.send(81, req_id, spec.min_tick, "9c0001", 3)
        if spec.sec_type == "STK":
            conn.send(45, 6, req_id, 90 if d else 49, 0)
        if snapshot:
            self._snapshot(conn, req_id, spec, d)
            return
        sub.pre_price = f"1\0{6}\0{req_id}\0"
        sub.pre_size = f"2\0{6}\0{req_id}\0"
        sub.pre_string = f"46\0{6}\0{req_id}\0"
        self._add(sub)

    def _snapshot(self, conn: _Conn, req_id: int, spec: ContractSpec, delayed: bool) -> None:
        """Snapshot: the quote and last trade in force now, then
        tickSnapshotEnd (57).  Not recorded in :meth:`sent_ticks`."""
        if self.rates is not None and not self._offline:
            now_ms = int(self.sim.now() * 1000)
            last = None
            for m in (now_ms // 60000, now_ms // 60000 - 1):
                mt = self.minute(spec, m * 60)
                if mt is not None and len(mt):
                    k = mt.count_until(now_ms)
                    if k:
                        last = mt.slice(k - 1, k)
                        break
            if last is not None:
                mt, i = last, 0
                t_bid, t_ask, t_last, t_bsz, t_asz, t_lsz = (66, 67, 68, 69, 70, 71) if delayed else (1, 2, 4, 0, 3, 5)
                if spec.sec_type == "IND":
                    conn.send(1, 6, req_id, t_last, mt.texts[i], 0, 0)
                else:
                    conn.send(1, 6, req_id, t_bid, mt.bids[i], mt.bid_sizes[i], 1)
                    conn.send(2, 6, req_id, t_bsz, mt.bid_sizes[i])
                    conn.send(1, 6, req_id, t_ask, mt.asks[i], mt.ask_sizes[i], 1)
                    conn.send(2, 6, req_id, t_asz, mt.ask_sizes[i])
                    conn.send(1, 6, req_id, t_last, mt.texts[i], mt.sizes[i], 0)
                    conn.send(2, 6, req_id, t_lsz, mt.sizes[i])
        self.counts["snapshots"] += 1
        conn.send(57, 1, req_id)

    def cancel_mkt_data(self, conn: _Conn, f: list[str]) -> None:
        req_id = int(f[2])
        sub = getattr(conn, "live_subs", {}).get(req_id)
        if sub is None or sub.kind != "mkt":
            self.counts["cancel_unknown"] += 1
            return
        self._cancelled.add((conn.number, sub.spec.symbol))
        self._drop(sub)

    def req_tick_by_tick(self, conn: _Conn, f: list[str], spec: ContractSpec | None) -> None:
        req_id = int(f[1])
        tick_type = f[14]
        if spec is None:
            conn.error(req_id, 200, ERROR_TEXTS[200])
            return
        if tick_type not in _TBT_TYPES:
            conn.error(req_id, 10189, ERROR_TEXTS[10189])
            return
        if not spec.subscribed:
            conn.error(req_id, 10189, ERROR_TEXTS[10189])
            return
        if self._check_error(conn, req_id, spec, "tbt") is not None:
            return
        if spec.sec_type == "IND":
            conn.error(req_id, 10189, ERROR_TEXTS[10189])
            return
        if self._count("tbt") >= self.max_tbt:
            self.counts["tbt_limit"] += 1
            conn.error(req_id, 10190, ERROR_TEXTS[10190])
            return
        self._add(_Sub("tbt", conn, req_id, spec, tbt_type=tick_type))

    def cancel_tick_by_tick(self, conn: _Conn, f: list[str]) -> None:
        sub = getattr(conn, "live_subs", {}).get(int(f[1]))
        if sub is not None and sub.kind == "tbt":
            self._drop(sub)

    def req_real_time_bars(self, conn: _Conn, f: list[str], spec: ContractSpec | None) -> None:
        req_id = int(f[2])
        bar_size, what, use_rth = f[15], f[16].upper(), f[17] in ("1", "True", "true")
        if self._refused(conn, req_id, spec):
            return
        if str(bar_size) != "5":
            conn.error(req_id, 321, f"Error validating request.-'bE' : cause - Invalid bar size {bar_size}: only 5 second bars")
            return
        if what not in ("TRADES", "MIDPOINT", "BID", "ASK"):
            conn.error(req_id, 321, f"Error validating request.-'bE' : cause - Invalid whatToShow {what}")
            return
        code = self._check_error(conn, req_id, spec, "rtb")
        if code is not None and code not in (10090,):
            return
        now_ms = int(self.sim.now() * 1000)
        sub = _Sub("rtb", conn, req_id, spec, what=what, use_rth=use_rth, next_bar_ms=(now_ms // 5000 + 1) * 5000)
        self._add(sub)

    def cancel_real_time_bars(self, conn: _Conn, f: list[str]) -> None:
        sub = getattr(conn, "live_subs", {}).get(int(f[2]))
        if sub is not None and sub.kind == "rtb":
            self._drop(sub)

    # ------------------------------------------------------------ registry
    def _add(self, sub: _Sub) -> None:
        subs = sub.conn.__dict__.setdefault("live_subs", {})
        old = subs.get(sub.req_id)
        if old is not None:
            self._drop(old)
        subs[sub.req_id] = sub
        st = self._symbols.get(sub.spec.symbol)
        if st is None:
            st = self._symbols[sub.spec.symbol] = _SymState(int(self.sim.now() * 1000))
        st.subs.append(sub)
        self.counts[f"sub_{sub.kind}"] += 1

    def _drop(self, sub: _Sub) -> None:
        subs = getattr(sub.conn, "live_subs", {})
        if subs.get(sub.req_id) is sub:
            del subs[sub.req_id]
        st = self._symbols.get(sub.spec.symbol)
        if st is not None:
            if sub in st.subs:
                st.subs.remove(sub)
            if not st.subs:
                del self._symbols[sub.spec.symbol]

    # ------------------------------------------------------------ generation
    def minute(self, spec: ContractSpec, t: int) -> MinuteTrades | None:
        """The trades of the minute starting at epoch ``t`` (cached)."""
        key = (spec.symbol, t)
        got = self._minutes.get(key)
        if got is not None:
            return got
        bar, vol, pv = self.sim.store.minute_bar(spec, t)
        got = bar_trades(spec, bar, vol, pv) if bar is not None else None
        self._minutes[key] = got
        limit = 3 * max(1, len(self._symbols)) + 8
        while len(self._minutes) > limit:
            self._minutes.popitem(last=False)
        return got

    def partial_bar(self, spec: ContractSpec, bar: Bar, now: float) -> Bar | None:
        """The bar of the minute in progress as IB serves it: the trades up
        to ``now`` only (None before the first)."""
        mt = self.minute(spec, bar.t)
        if mt is None:
            return None
        k = mt.count_until(int(now * 1000))
        if k == 0:
            return None
        if k == len(mt):
            return bar
        sl = mt.slice(0, k)
        texts, prices = sl.texts, sl.prices
        hi = texts[prices.index(max(prices))]
        lo = texts[prices.index(min(prices))]
        vol = sum(sl.sizes)
        from decimal import ROUND_HALF_EVEN, Decimal
        wap = str(((Decimal(hi) + Decimal(lo) + Decimal(texts[-1])) / 3).quantize(Decimal("0.01"), ROUND_HALF_EVEN))
        return Bar(bar.t, texts[0], hi, lo, texts[-1], str(vol), wap, k)

    def _events(self, spec: ContractSpec, start_ms: int, end_ms: int):
        """:class:`~feeds.sim.tws_data.TradeSlice` lists of the trades with start < time <= end,
        one per minute touched."""
        for m in range(start_ms // 60000, end_ms // 60000 + 1):
            mt = self.minute(spec, m * 60)
            if mt is None or not len(mt):
                continue
            i0 = mt.count_until(start_ms)
            i1 = mt.count_until(end_ms)
            if i1 > i0:
                yield mt.slice(i0, i1)

    def pump(self) -> None:
        """Send every tick whose time has passed since the last round."""
        if self.rates is None or not self._symbols:
            return
        now = self.sim.now()
        now_ms = int(now * 1000)
        out: dict[Any, list[str]] = {}
        rec = self.record == "all"
        counts = self.counts
        for sym, st in list(self._symbols.items()):
            start = st.last_ms
            if now_ms <= start:
                continue
            st.last_ms = now_ms
            spec = st.subs[0].spec
            events = list(self._events(spec, start, now_ms))
            n_ev = sum(len(e) for e in events)
            rtbs = [s for s in st.subs if s.kind == "rtb"]
            if rtbs:
                self._rt_bars(spec, rtbs, now_ms, out)
            if not n_ev:
                continue
            if self._offline or self._farm_down:
                counts["offline"] += n_ev
                continue
            until = self._silent_until.get(sym)
            if until is not None:
                if now < until:
                    counts["silenced"] += n_ev
                    continue
                del self._silent_until[sym]
            for sub in st.subs:
                conn = sub.conn
                if conn.closed or sub.kind == "rtb":
                    continue
                try:
                    if conn.writer.transport.get_write_buffer_size() > MAX_BUFFERED:
                        counts["slow"] += 1
                        continue
                except AttributeError:
                    pass
                buf = out.setdefault(conn, [])
                if sub.kind == "mkt":
                    self._mkt_msgs(sub, events, buf, rec)
                else:
                    self._tbt_msgs(sub, events, buf, rec)
        if now_ms % 60000 >= 40000:
            self._prefetch(now_ms)
        for conn, msgs in out.items():
            if msgs and not conn.closed:
                data = _frames(msgs)
                conn.writer.write(data)
                self.sim._bytes_sent += len(data)
                counts["messages"] += len(msgs)

    def _prefetch(self, now_ms: int, budget: float = 0.01) -> None:
        """Generate next minute's trades ahead, a few contracts per round."""
        import time as _time

        t_next = (now_ms // 60000 + 1) * 60
        deadline = _time.perf_counter() + budget
        for sym, st in self._symbols.items():
            if (sym, t_next) in self._minutes:
                continue
            self.minute(st.subs[0].spec, t_next)
            if _time.perf_counter() > deadline:
                break

    def _mkt_msgs(self, sub: _Sub, events, buf: list[str], rec: bool) -> None:
        pp, ps, pstr = sub.pre_price, sub.pre_size, sub.pre_string
        conn_no, rid, sym = sub.conn.number, sub.req_id, sub.spec.symbol
        index = sub.spec.sec_type == "IND"
        delayed = sub.mode == "delayed"
        rtv = "233" in sub.generic and sub.mode == "live" and not index
        rttv = "375" in sub.generic and sub.mode == "live" and not index
        t_bid, t_ask, t_last, t_bsz, t_asz, t_lsz, t_vol = (66, 67, 68, 69, 70, 71, 74) if delayed else (1, 2, 4, 0, 3, 5, 8)
        mdt = 3 if delayed else 1
        sent = self._sent
        counts = self.counts
        last_cum = None
        n_trades = 0
        for mt in events:
            texts, sizes, times = mt.texts, mt.sizes, mt.times_ms
            i0, i1 = 0, len(mt)
            if index:
                for i in range(i0, i1):
                    buf.append(f"{pp}{t_last}\0{texts[i]}\x000\x000\0")
                    if rec:
                        sent.append({"symbol": sym, "kind": "index", "price": texts[i], "size": None,
                                     "time_ms": times[i], "bid": None, "ask": None, "bid_size": None,
                                     "ask_size": None, "conn": conn_no, "req_id": rid, "market_data_type": mdt})
                counts["index"] += i1 - i0
                continue
            bids, asks, bszs, aszs, cum, vwap = mt.bids, mt.asks, mt.bid_sizes, mt.ask_sizes, mt.cum_volume, mt.vwap
            for i in range(i0, i1):
                b, a, bs, as_, p, s = bids[i], asks[i], bszs[i], aszs[i], texts[i], sizes[i]
                buf.append(f"{pp}{t_bid}\0{b}\0{bs}\x001\0")
                buf.append(f"{ps}{t_bsz}\0{bs}\0")
                buf.append(f"{pp}{t_ask}\0{a}\0{as_}\x001\0")
                buf.append(f"{ps}{t_asz}\0{as_}\0")
                buf.append(f"{pp}{t_last}\0{p}\0{s}\x000\0")
                buf.append(f"{ps}{t_lsz}\0{s}\0")
                if rtv:
                    buf.append(f"{pstr}48\0{p};{s};{times[i]};{cum[i]};{vwap[i]};true\0")
                if rttv:
                    buf.append(f"{pstr}77\0{p};{s};{times[i]};{cum[i]};{vwap[i]};true\0")
                if rec:
                    tm = times[i]
                    sent.append({"symbol": sym, "kind": "bid_ask", "price": None, "size": None, "time_ms": tm,
                                 "bid": b, "ask": a, "bid_size": bs, "ask_size": as_, "conn": conn_no,
                                 "req_id": rid, "market_data_type": mdt})
                    sent.append({"symbol": sym, "kind": "trade", "price": p, "size": s, "time_ms": tm,
                                 "bid": None, "ask": None, "bid_size": None, "ask_size": None, "conn": conn_no,
                                 "req_id": rid, "market_data_type": mdt, "rt_volume": rtv})
            n_trades += i1 - i0
            last_cum = cum[i1 - 1]
        if n_trades:
            counts["trade"] += n_trades
            counts["bid_ask"] += n_trades
            buf.append(f"{ps}{t_vol}\0{last_cum}\0")
            if "293" in sub.generic:
                sub.trade_count = getattr(sub, "trade_count", 0) + n_trades
                buf.append(f"45\x006\0{rid}\x0054\0{sub.trade_count}\0")

    def _tbt_msgs(self, sub: _Sub, events, buf: list[str], rec: bool) -> None:
        rid, conn_no, sym = sub.req_id, sub.conn.number, sub.spec.symbol
        typ = _TBT_TYPES[sub.tbt_type]
        exch = sub.spec.primary_exchange
        sent = self._sent
        n = 0
        for mt in events:
            texts, sizes, times = mt.texts, mt.sizes, mt.times_ms
            i0, i1 = 0, len(mt)
            for i in range(i0, i1):
                tm = times[i]
                ts = tm // 1000
                if typ in (1, 2):
                    buf.append(f"99\0{rid}\0{typ}\0{ts}\0{texts[i]}\0{sizes[i]}\x000\0{exch}\0\0")
                    if rec:
                        sent.append({"symbol": sym, "kind": "tbt_last", "price": texts[i], "size": sizes[i],
                                     "time_ms": tm, "bid": None, "ask": None, "bid_size": None, "ask_size": None,
                                     "conn": conn_no, "req_id": rid, "market_data_type": 1})
                elif typ == 3:
                    b, a, bs, as_ = mt.bids[i], mt.asks[i], mt.bid_sizes[i], mt.ask_sizes[i]
                    buf.append(f"99\0{rid}\x003\0{ts}\0{b}\0{a}\0{bs}\0{as_}\x000\0")
                    if rec:
                        sent.append({"symbol": sym, "kind": "tbt_bidask", "price": None, "size": None,
                                     "time_ms": tm, "bid": b, "ask": a, "bid_size": bs, "ask_size": as_,
                                     "conn": conn_no, "req_id": rid, "market_data_type": 1})
                else:
                    mid = _mid(mt.bids[i], mt.asks[i])
                    buf.append(f"99\0{rid}\x004\0{ts}\0{mid}\0")
                    if rec:
                        sent.append({"symbol": sym, "kind": "tbt_midpoint", "price": mid, "size": None,
                                     "time_ms": tm, "bid": None, "ask": None, "bid_size": None, "ask_size": None,
                                     "conn": conn_no, "req_id": rid, "market_data_type": 1})
            n += i1 - i0
        self.counts["tbt"] += n

    def _rt_bars(self, spec: ContractSpec, subs: list[_Sub], now_ms: int, out: dict) -> None:
        for sub in subs:
            while sub.next_bar_ms + 5000 <= now_ms:
                start = sub.next_bar_ms
                sub.next_bar_ms += 5000
                if self._offline or self._farm_down:
                    continue
                if sub.use_rth and not self._in_session(spec, start // 1000):
                    continue
                bar = self._five_seconds(spec, start, sub.what)
                if bar is None:
                    continue
                out.setdefault(sub.conn, []).append(
                    f"50\x003\0{sub.req_id}\0{start // 1000}\0" + "\0".join(str(x) for x in bar) + "\0")
                self.counts["rtbar"] += 1
                if self.record == "all":
                    self._sent.append({"symbol": spec.symbol, "kind": "rtbar", "price": None, "size": None,
                                       "time_ms": start, "bid": None, "ask": None, "bid_size": None,
                                       "ask_size": None, "conn": sub.conn.number, "req_id": sub.req_id,
                                       "market_data_type": 1, "bar": bar})

    def _in_session(self, spec: ContractSpec, t: int) -> bool:
        import datetime as dt
        day = dt.datetime.fromtimestamp(t, spec.tz).date()
        sess = self.sim.sessions.session(day)
        return sess is not None and sess[0] <= t < sess[1]

    def _five_seconds(self, spec: ContractSpec, start_ms: int, what: str) -> tuple | None:
        """``(open, high, low, close, volume, wap, count)`` of the trades
        (TRADES) or trade-time quotes (MIDPOINT/BID/ASK) in [start, start+5 s);
        None when there was none."""
        ev = list(self._events(spec, start_ms - 1, start_ms + 4999))
        vals: list[tuple[int, str, int]] = []
        dec = 2
        for m in range(start_ms // 60000, (start_ms + 4999) // 60000 + 1):
            got = self.minute(spec, m * 60)
            if got is not None:
                dec = got.decimals
        for mt in ev:
            for i in range(len(mt)):
                if what == "TRADES":
                    vals.append((mt.prices[i], mt.texts[i], mt.sizes[i]))
                else:
                    txt = mt.bids[i] if what == "BID" else mt.asks[i] if what == "ASK" else _mid(mt.bids[i], mt.asks[i])
                    vals.append((_scaled_text(txt, dec), txt, 0))
        if not vals:
            return None
        prices = [v[0] for v in vals]
        hi = vals[prices.index(max(prices))][1]
        lo = vals[prices.index(min(prices))][1]
        vol = sum(v[2] for v in vals)
        if what == "TRADES" and vol:
            wap = f"{sum(v[0] * v[2] for v in vals) / vol / 10 ** dec:.6f}"
        else:
            wap = vals[-1][1]
        count = len(vals) if what == "TRADES" else -1
        return (vals[0][1], hi, lo, vals[-1][1], vol if what == "TRADES" else -1, wap, count)


def _scaled_text(txt: str, dec: int) -> int:
    whole, _, frac = txt.partition(".")
    frac = (frac + "0" * dec)[:dec]
    return int(whole) * 10 ** dec + (int(frac) if frac else 0)


def _mid(bid: str, ask: str) -> str:
    dec = max(len(bid.partition(".")[2]), len(ask.partition(".")[2]))
    s = _scaled_text(bid, dec + 1) + _scaled_text(ask, dec + 1)
    q, r = divmod(s // 2, 10 ** (dec + 1))
    return f"{q}.{r:0{dec + 1}d}".rstrip("0").rstrip(".") if dec else str(s // 2 / 10)
