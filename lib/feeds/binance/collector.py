"""The Binance USD-M futures collector: python-binance sockets -> sink.

Streams (per symbol): ``aggTrade``, ``bookTicker``, ``markPrice@1s``,
``ticker`` and ``kline_<interval>``, split over combined-stream connections
of at most ``max_streams_per_connection`` streams (Binance allows 1024), on
``/public`` (bookTicker) and ``/market`` (the rest) as Binance has served
them since 2026-04.

Completeness:

* aggTrade ids are contiguous per symbol; a jump (a reconnect, a skipped
  message, a restart) is filled from ``GET /fapi/v1/aggTrades`` starting at
  the first missing id.  The last stored id per symbol is read from the
  database at start, so the downtime of a restart is filled too.
* Closed klines missed while disconnected (or down) are filled from
  ``GET /fapi/v1/klines``.
* The kline check (``kline_check``): each closed one-minute kline from the
  stream is compared with the candle built from the aggTrades stored for
  its minute (open, high, low, close, volume, and ``n`` against the sum of
  ``l - f + 1``; see :mod:`.klinecheck`).  A mismatch is counted, logged
  and stored in ``binance_kline_check``; the minute's aggTrades are then
  fetched from ``GET /fapi/v1/aggTrades`` (``startTime``/``endTime``,
  within the REST weight budget), stored, read back and compared again: a
  second row says whether the minute is repaired.
* Each connection is replaced before Binance's 24 h expiry: the new one is
  up (first message received) before the old one is closed; the overlap is
  de-duplicated in memory (per-stream last id / event time) and by the
  tables' keys.
* Staleness is judged per stream: a stream silent beyond its kind's limit
  (or an aggTrade stream that the 24h ticker shows to be behind) causes its
  connection to be replaced the same way.
* Reconnects use capped exponential backoff with full jitter.
* A malformed frame - bad JSON, a missing key, a wrong type, or a value
  outside its plausible range (a time before 2019-09 or ahead of now, an id
  beyond ``bigint``, a negative price) - is counted, logged and skipped; it
  never reaches the de-duplication state, and the connection stays up.
* An aggTrade or bookTicker id that jumps far from the last accepted one is
  held until the following messages confirm it (see :class:`BinanceCollector`).

python-binance's internals are patched only in :mod:`.wire`.

Venue document: Binance "USDⓈ-M Futures / Websocket Market Streams" and
"Market Data Endpoints".
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Callable

import orjson

from .. import plausible as P
from ..db import connect
from ..health import Health, StreamHealth
from ..sink import Sink
from . import adapter as A
from . import klinecheck as KC
from . import wire
from .rest import BinanceRest

log = logging.getLogger(__name__)

#: journal lines a minute about kline check mismatches (the rest are counted and summed up)
KC_LOG_PER_MINUTE = 10
#: seconds the kline check waits for a filled minute's aggTrades to be committed before reading them back
KC_READBACK_S = 60.0


class _Throttle:
    """At most ``per_minute`` journal lines a minute; the lines left out are
    counted and named in the next line written."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._window = 0.0
        self._lines = 0
        self.quiet = 0

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._window >= 60.0:
            self._window, self._lines = now, 0
        if self._lines >= self.per_minute:
            self.quiet += 1
            return
        self._lines += 1
        if self.quiet:
            msg += " (%d more kline check line(s) left out before)"
            args = (*args, self.quiet)
            self.quiet = 0
        log.log(level, msg, *args)


@dataclass
class Settings:
    """Collector settings (see ``etc/binance.toml`` for the meaning of each).

    Plausibility (see :mod:`feeds.plausible`): ``max_future_s`` - venue
    times more than this many seconds ahead of now are malformed;
    ``max_id_jump`` - per kind, the largest step of an id (aggTrade ``a``,
    bookTicker ``u``) accepted on one message's evidence; a larger one is
    held until ``id_confirmations`` further messages continue it;
    ``id_adopt_lone_after`` - seconds after which the held first messages of
    a symbol without any state are accepted when nothing contradicts them.

    ``status_interval``, ``heartbeat_interval``, ``watchdog_interval``
    (seconds) are for the runtime that runs the collector
    (:class:`feeds.service.Service`); the collector does not use them.

    ``kline_check``: compare closed one-minute klines with the aggTrades
    (needs the ``aggTrade`` and ``kline`` streams and the ``1m`` interval;
    otherwise it is off).
    """
    rest_url: str = "https://fapi.binance.com"
    ws_url: str = "wss://fstream.binance.com"
    symbols: list[str] = field(default_factory=list)
    quote_assets: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=lambda: list(A.KINDS))
    kline_intervals: list[str] = field(default_factory=lambda: ["1m"])
    max_streams_per_connection: int = 200
    rollover_after: float = 23 * 3600.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stale_after: dict[str, float] = field(default_factory=lambda: {
        A.AGG_TRADE: 0.0, A.BOOK_TICKER: 120.0, A.MARK_PRICE: 15.0, A.TICKER: 30.0, A.KLINE: 120.0})
    agg_behind_grace: float = 10.0
    rest_weight_budget: int = 1200
    gap_fill_max_trades: int = 1_000_000
    resume_lookback_hours: float = 48.0
    shard: tuple[int, int] = (1, 1)
    status_interval: float = 10.0
    heartbeat_interval: float = 10.0
    watchdog_interval: float = 2.0
    connect_stagger: float = 0.1
    symbols_refresh: float = 3600.0
    max_future_s: float = 600.0
    max_id_jump: dict[str, int] = field(default_factory=lambda: {
        A.AGG_TRADE: 1_000_000, A.BOOK_TICKER: 10_000_000_000})
    id_confirmations: int = 2
    id_adopt_lone_after: float = 60.0
    kline_check: bool = True


@dataclass
class _Route:
    kind: str
    symbol: str
    health: StreamHealth
    slot: "_Slot"
    seen: Callable[[], None]   # health.seen, bound once (called per message)
    interval: str = ""
    retired: bool = False      # symbol no longer listed: its silence is expected


@dataclass
class _Slot:
    """One logical connection: a fixed list of streams on one category."""
    index: int
    category: str
    streams: list[str]
    generation: int = 0
    replace: asyncio.Event = field(default_factory=asyncio.Event)
    replace_reason: str = ""
    opened_at: float = 0.0
    last_replace: float = 0.0
    reconnects: int = 0


class BinanceCollector:
    """Collect the configured streams into ``sink``; health in ``health``.

    Run with ``await collector.run(stop_event)``; it returns after
    ``stop_event`` is set and every socket is closed (the caller then closes
    the sink).  Raises ValueError when the symbol list is empty.

    Runtime interface: :meth:`run`, :meth:`stream_kind`, :meth:`figures`,
    :meth:`periodic`.

    De-duplication state and plausibility: a message is first checked by the
    adapter (types and ranges: times, ids, prices; see
    :mod:`feeds.binance.adapter`); one that fails is counted as malformed and
    never touches any state.  aggTrade ``a`` and bookTicker ``u`` then pass a
    :class:`~feeds.plausible.SequenceGuard` per symbol: an id within
    ``max_id_jump`` after the last accepted one is stored (aggTrade: a step
    above 1 is a gap, filled from REST); one at or just behind it is a
    duplicate; one farther away in either direction - or the first ids of a
    symbol without state - is held and stored only when
    ``id_confirmations`` further messages continue it (then it becomes the
    state: a genuine jump after a long disconnect, or a bad state read back
    at start).  Held ids that regular messages contradict are counted as
    malformed.  markPrice and ticker are de-duplicated by event time and
    klines by open time, both inside the time window of the adapter.
    """

    def __init__(self, settings: Settings, sink: Sink, health: Health, dsn: str | None = None):
        self.s = settings
        self.sink = sink
        self.health = health
        self.dsn = dsn
        self.rest: BinanceRest | None = None     # made in run(): python-binance binds to the running loop
        self.routes: dict[str, _Route] = {}
        self.slots: list[_Slot] = []
        self._slot_tasks: list[asyncio.Task] = []
        self._next_refresh = 0.0
        jumps = settings.max_id_jump
        conf, lone = settings.id_confirmations, settings.id_adopt_lone_after
        self.agg_ids = P.SequenceGuard(jumps.get(A.AGG_TRADE, 1_000_000), conf, adopt_lone_after=lone)
        self.book_ids = P.SequenceGuard(jumps.get(A.BOOK_TICKER, 10_000_000_000), conf, adopt_lone_after=lone)
        self.last_agg: dict[str, int] = self.agg_ids.last       # the guards' state, by symbol
        self.last_book: dict[str, int] = self.book_ids.last
        self.last_trade_id: dict[str, int] = {}
        self.ticker_last_trade: dict[str, tuple[int, float]] = {}
        self.last_mark: dict[str, int] = {}
        self.last_ticker: dict[str, int] = {}
        self.last_kline: dict[tuple[str, str], int] = {}
        self.kline_filling: set[tuple[str, str]] = set()
        self.gaps_open: set[tuple[str, int]] = set()     # aggTrade gaps being filled: (symbol, first id)
        self.counters = {"gaps": 0, "gap_trades_filled": 0, "klines_filled": 0, "reconnects": 0,
                         "rollovers": 0, "stale": 0, "duplicates_skipped": 0, "id_jumps_accepted": 0,
                         "kline_check_ok": 0, "kline_check_mismatched": 0, "kline_check_repaired": 0,
                         "kline_check_not_repaired": 0, "kline_check_not_comparable": 0}
        self.kc: KC.KlineCheck | None = None
        self.kline_check_off = self._kline_check_off()
        if not self.kline_check_off:
            self.kc = KC.KlineCheck()
        self._kc_cur: dict[str, KC.Fold] | None = self.kc.cur if self.kc is not None else None
        self._kc_fills: set[tuple[str, int]] = set()
        self._kc_log = _Throttle(KC_LOG_PER_MINUTE)
        self._tasks: set[asyncio.Task] = set()
        self._stop: asyncio.Event | None = None
        self.symbols: list[str] = []
        self._waiting = ""          # what run() waits for before collecting (kept as STATUS=)
        A.WINDOW.ahead_ms = int(settings.max_future_s * 1000)
        A.WINDOW.refresh()

    # ------------------------------------------------------------ runtime interface
    def stream_kind(self, stream: str) -> str:
        """The kind of a stream name for STATUS grouping (``aggTrade``, ``bookTicker``,
        ``markPrice@1s``, ``ticker``, ``kline``), ``"?"`` for an unknown name."""
        r = self.routes.get(stream)
        return r.kind if r is not None else "?"

    def figures(self) -> dict[str, int | float]:
        """Counters for STATUS and the heartbeat: gaps, fills, reconnects,
        rollovers, stale streams, duplicates, accepted id jumps, the kline
        check's minutes (``kline_check_ok``, ``_mismatched``, ``_repaired``,
        ``_not_repaired``, ``_not_comparable``), ids held for confirmation
        and the REST weight used in the last minute."""
        f: dict[str, int | float] = dict(self.counters)
        f["ids_held"] = self.agg_ids.held() + self.book_ids.held()
        f["rest_weight_1m"] = self.rest.limiter.used if self.rest is not None else 0
        return f

    def periodic(self) -> None:
        """Every status interval (called by the runtime, after its status
        line): replace connections of stale streams, accept the lone held
        first ids of quiet symbols, refresh the time window and (when symbols
        come from exchangeInfo) re-read the symbol list when due.  While
        :meth:`run` still waits for exchangeInfo, that remains the STATUS=."""
        if self._waiting:
            self.health.notify_status(self._waiting)
        self.check_staleness()
        self.release_lone_ids()
        if self.kc is not None:
            self._kc_verdicts(self.kc.due(self.last_trade_id))
        A.WINDOW.refresh()
        now = time.monotonic()
        if not self.s.symbols and self.s.symbols_refresh and self._stop is not None and now >= self._next_refresh:
            self._next_refresh = now + self.s.symbols_refresh
            self._spawn(self.refresh_symbols())

    def _malformed(self, where: str, reason: str) -> None:
        """Count one malformed or implausible input and log it (one line, throttled by Health)."""
        self.health.count_malformed(where, reason)

    def _wait_status(self, text: str) -> None:
        """STATUS= while :meth:`run` waits before collecting (exchangeInfo);
        :meth:`periodic` keeps it over the runtime's status line until the
        collection starts."""
        self._waiting = text
        self.health.notify_status(text)

    # ------------------------------------------------------------ planning
    async def discover_symbols(self) -> list[str]:
        syms = [s.upper() for s in self.s.symbols] if self.s.symbols else \
            await self.rest.perpetual_symbols(self.s.quote_assets or None)
        i, n = self.s.shard
        syms = sorted(syms)[i - 1::n]
        if not syms:
            raise ValueError("no symbols to collect")
        return syms

    def plan(self, symbols: list[str]) -> list[_Slot]:
        """Split every stream over connections by category, at most
        ``max_streams_per_connection`` each (Binance: 1024)."""
        per = max(1, min(1024, self.s.max_streams_per_connection))
        by_cat: dict[str, list[tuple[str, str, str, str]]] = {"market": [], "public": []}
        for sym in symbols:
            for kind in self.s.streams:
                if kind == A.KLINE:
                    for iv in self.s.kline_intervals:
                        by_cat["market"].append((A.stream_name(sym, kind, iv), kind, sym, iv))
                else:
                    by_cat[A.category(kind)].append((A.stream_name(sym, kind), kind, sym, ""))
        slots: list[_Slot] = []
        for cat in ("market", "public"):
            items = by_cat[cat]
            for j in range(0, len(items), per):
                chunk = items[j:j + per]
                slot = _Slot(len(self.slots) + len(slots), cat, [c[0] for c in chunk])
                for name, kind, sym, iv in chunk:
                    sh = self.health.stream(name)
                    self.routes[name] = _Route(kind, sym, sh, slot, sh.seen, iv)
                slots.append(slot)
        return slots

    # ------------------------------------------------------------ hot path
    def handle(self, msg) -> None:
        """Process one message from a combined stream: a :class:`wire.Frame`
        (raw text) or an already decoded dict.  Never raises for bad input:
        it is counted as malformed (with one journal line) and skipped."""
        if type(msg) is wire.Frame:
            try:
                msg = orjson.loads(msg.raw)
            except orjson.JSONDecodeError as e:
                self._malformed("frame", f"not JSON ({e}): {msg.raw!r:.120}")
                return
        try:
            stream = msg["stream"]
            data = msg["data"]
            route = self.routes[stream]
        except (KeyError, TypeError):
            if isinstance(msg, dict) and msg.get("e") == "error":
                log.warning("socket event: %s %s", msg.get("type"), msg.get("m"))
                return
            self._malformed("frame", f"not a frame of a subscribed stream: {msg!r:.200}")
            return
        route.seen()
        recv = A.now_text()
        kind = route.kind
        try:
            if type(data) is not dict:
                raise A.Malformed("data is not an object")
            if kind == A.AGG_TRADE:
                row = A.agg_trade_row(data, recv)
                sym, a = row[0], row[1]
                if sym != route.symbol:
                    raise A.Malformed(f"symbol {sym} on the stream of {route.symbol}")
                g = self.agg_ids
                last = g.last.get(sym)
                if last is not None and last < a <= last + g.max_jump:
                    if g.pending and sym in g.pending:
                        self._reject_held(stream, kind, sym, g.inline(sym), last)
                    if a != last + 1:
                        self._gap(sym, last + 1, a - 1)
                    g.last[sym] = a
                    self.last_trade_id[sym] = row[5]
                    self.sink.add("binance_agg_trade", row)
                    kcur = self._kc_cur
                    if kcur is not None:
                        # the kline check's fold of this minute (see klinecheck.Fold), inline
                        t = data["T"]
                        fd = kcur.get(sym)
                        if fd is not None and fd.start <= t < fd.end:
                            fd.n += row[5] - row[4] + 1
                            fd.v += Decimal(row[3])
                            p = row[2]
                            if p != fd.c:
                                x = float(p)
                                if x >= fd.hf or x <= fd.lf:
                                    fd.extreme(p, x)
                                fd.c = p
                            fd.c_a = a
                        else:
                            self._kc_verdicts(self.kc.trade(sym, a, last, row[2], row[3], row[4], row[5], t))
                elif last is not None and last - g.max_jump <= a <= last:
                    self.counters["duplicates_skipped"] += 1
                else:
                    self._hold(stream, kind, g, sym, a, row)
            elif kind == A.BOOK_TICKER:
                row = A.book_ticker_row(data, recv)
                sym, u = row[0], row[1]
                if sym != route.symbol:
                    raise A.Malformed(f"symbol {sym} on the stream of {route.symbol}")
                g = self.book_ids
                last = g.last.get(sym)
                if last is not None and last < u <= last + g.max_jump:
                    if g.pending and sym in g.pending:
                        self._reject_held(stream, kind, sym, g.inline(sym), last)
                    g.last[sym] = u
                    self.sink.add("binance_book_ticker", row)
                elif last is not None and last - g.max_jump <= u <= last:
                    self.counters["duplicates_skipped"] += 1
                else:
                    self._hold(stream, kind, g, sym, u, row)
            elif kind == A.MARK_PRICE:
                row = A.mark_price_row(data, recv)
                sym = row[0]
                if sym != route.symbol:
                    raise A.Malformed(f"symbol {sym} on the stream of {route.symbol}")
                e = data["E"]
                if e <= self.last_mark.get(sym, -1):
                    self.counters["duplicates_skipped"] += 1
                    return
                self.last_mark[sym] = e
                self.sink.add("binance_mark_price", row)
            elif kind == A.TICKER:
                row = A.ticker_row(data, recv)
                sym = row[0]
                if sym != route.symbol:
                    raise A.Malformed(f"symbol {sym} on the stream of {route.symbol}")
                e = data["E"]
                if e <= self.last_ticker.get(sym, -1):
                    self.counters["duplicates_skipped"] += 1
                    return
                self.last_ticker[sym] = e
                prev = self.ticker_last_trade.get(sym)
                if prev is None or prev[0] != row[15]:
                    self.ticker_last_trade[sym] = (row[15], route.health.last)
                self.sink.add("binance_ticker_24h", row)
            elif kind == A.KLINE:
                self._kline(data, recv, route)
        except (ValueError, KeyError, TypeError) as e:     # A.Malformed is a ValueError
            self._malformed(stream, f"{kind}: {e}" if isinstance(e, ValueError) else f"{kind}: {e!r}")

    def _hold(self, stream: str, kind: str, g: P.SequenceGuard, sym: str, x: int, row: tuple) -> None:
        """An id without state or far from it: held until confirmed (see the class doc)."""
        adopted, previous, rejected, dup = g.hold(sym, x, row)
        if dup:
            self.counters["duplicates_skipped"] += 1
            return
        if rejected:
            self._reject_held(stream, kind, sym, rejected, g.last.get(sym))
        if adopted is not None:
            self._adopt(kind, sym, adopted, previous)

    def _reject_held(self, stream: str, kind: str, sym: str, rows: list, state: int | None) -> None:
        for row in rows:
            self._malformed(stream, f"{kind} id {row[1]} of {sym} not confirmed by the following messages "
                                    f"(accepted id {state if state is not None else 'none'}); dropped")

    def _adopt(self, kind: str, sym: str, rows: list, previous: int | None) -> None:
        """Store confirmed held rows (ids increasing); their last id is already the state."""
        first = rows[0][1]
        if previous is not None:
            self.counters["id_jumps_accepted"] += 1
            log.warning("%s ids of %s move from %d to %d, confirmed by %d messages; accepted",
                        kind, sym, previous, first, len(rows) - 1)
        if kind == A.AGG_TRADE:
            prev = previous if previous is not None and first > previous else None
            kc = self.kc
            for row in rows:
                a = row[1]
                if prev is not None and a != prev + 1:
                    self._gap(sym, prev + 1, a - 1)
                if kc is not None:
                    self._kc_verdicts(kc.trade(sym, a, prev, row[2], row[3], row[4], row[5], A.text_ms(row[6])))
                prev = a
            self.last_trade_id[sym] = rows[-1][5]
            self.sink.add_many("binance_agg_trade", rows)
        else:
            self.sink.add_many("binance_book_ticker", rows)

    def release_lone_ids(self) -> int:
        """Store the held first ids of symbols without state that nothing
        contradicted for ``id_adopt_lone_after`` seconds.  Returns rows stored."""
        n = 0
        for kind, g in ((A.AGG_TRADE, self.agg_ids), (A.BOOK_TICKER, self.book_ids)):
            for sym, rows in g.expire():
                self._adopt(kind, sym, rows, None)
                n += len(rows)
        return n

    def _settle_held_at_stop(self) -> None:
        """At stop, the lone first runs of symbols without state are stored (the
        stop ends their wait, as ``id_adopt_lone_after`` would); runs that
        contradict an accepted state stay unconfirmed and are counted as
        malformed, each with its journal line, never stored silently."""
        stored = 0
        for kind, g in ((A.AGG_TRADE, self.agg_ids), (A.BOOK_TICKER, self.book_ids)):
            for sym, rows in g.expire(now=float("inf")):
                self._adopt(kind, sym, rows, None)
                stored += len(rows)
            for sym, p in list(g.pending.items()):
                stream = A.stream_name(sym, kind)
                for run in p.runs:
                    self._reject_held(stream, kind, sym, run.items, g.last.get(sym))
                del g.pending[sym]
        if stored:
            log.info("%d first message(s) awaiting id confirmation stored at stop", stored)

    def _kline(self, data: dict, recv: str, route: _Route) -> None:
        k = data.get("k")
        if type(k) is not dict:
            raise A.Malformed("kline without k")
        sym, iv, t, closed = k.get("s"), k.get("i"), k.get("t"), k.get("x")
        if type(sym) is not str or sym != route.symbol:
            raise A.Malformed(f"kline symbol {sym!r:.40} on the stream of {route.symbol}")
        if type(iv) is not str or iv != route.interval:
            raise A.Malformed(f"kline interval {iv!r:.40} on a {route.interval} stream")
        if type(closed) is not bool:
            raise A.Malformed(f"kline x not a boolean: {closed!r:.40}")
        _, _, step = A.kline_times(t, k.get("T"), iv)       # t inside the time window, on the grid
        key = (sym, iv)
        last = self.last_kline.get(key)
        if last is not None and t - step > last and key not in self.kline_filling:
            # closed klines (last, t) missing: fill them from REST
            self.kline_filling.add(key)
            self._spawn(self._fill_klines(sym, iv, last + step, t - 1))
        if closed:
            if last is not None and t <= last:
                self.counters["duplicates_skipped"] += 1
                return
            row = A.kline_row(data, recv)
            self.last_kline[key] = t
            self.sink.add("binance_kline", row)
            if self.kc is not None and iv == "1m":
                self._kc_verdicts(self.kc.kline(sym, k, self.last_trade_id.get(sym, -1)))
        elif last is None:
            # first sight of this symbol/interval with no history: start here
            self.last_kline[key] = t - step

    # ------------------------------------------------------------ kline check
    def _kline_check_off(self) -> str:
        """Why the kline check is off ("" when it is on)."""
        s = self.s
        if not s.kline_check:
            return "kline_check = false"
        if A.AGG_TRADE not in s.streams or A.KLINE not in s.streams:
            return "needs the aggTrade and kline streams"
        if "1m" not in s.kline_intervals:
            return "needs the 1m kline interval"
        return ""

    def _kc_lost(self, slot: _Slot) -> None:
        """The connection of ``slot`` was lost or replaced: its aggTrade
        symbols' current minutes are unsure until the reconnect is settled."""
        if self.kc is not None:
            self.kc.connection_lost([r.symbol for r in (self.routes.get(n) for n in slot.streams)
                                     if r is not None and r.kind == A.AGG_TRADE])

    def _kc_verdicts(self, verdicts: list) -> None:
        """Count the kline check's verdicts; a mismatch is stored, logged and
        its minute filled from REST."""
        c = self.counters
        for v in verdicts:
            if v.outcome == KC.OK:
                c["kline_check_ok"] += 1
            elif v.outcome == KC.NOT_COMPARABLE:
                c["kline_check_not_comparable"] += 1
                log.debug("kline check %s %s: not comparable (%s)", v.symbol, A.ms_text(v.minute), v.reason)
            else:
                c["kline_check_mismatched"] += 1
                self._kc_mismatch(v)

    def _kc_mismatch(self, v: KC.Verdict) -> None:
        key = (v.symbol, v.minute)
        note = None
        if key in self._kc_fills:
            note = "a fill of this minute is already running"
        elif len(self._kc_fills) >= KC.MAX_PENDING_FILLS:
            note = f"not filled: {len(self._kc_fills)} minute fills already pending"
        self.sink.add("binance_kline_check", KC.check_row(
            v.symbol, A.ms_text(v.minute), A.now_text(), "found", v.kline, v.agg, v.differs, "stream", note=note))
        k, g = v.kline, v.agg
        self._kc_log(logging.WARNING, "kline check %s %s: the aggTrades differ from the kline in %s (kline n %d "
                     "v %s, aggTrades n %d v %s); %s", v.symbol, A.ms_text(v.minute)[:16], ", ".join(v.differs),
                     k.trades, k.volume, g.trades, g.volume, note or "filling the minute from REST")
        if note is None:
            self._kc_fills.add(key)
            self._spawn(self._kc_fill(v))

    async def _kc_fill(self, v: KC.Verdict) -> None:
        """The aggTrade gap fill of a mismatched minute: its aggTrades from
        REST stored, then read back (or, when the database cannot be read,
        the REST ones) and compared with the kline again; the outcome is the
        ``after_fill`` row."""
        key = (v.symbol, v.minute)
        try:
            items, rows = await self._agg_minute(v.symbol, v.minute)
            if items is None:
                return          # stopped
            if rows:
                self.sink.add_many("binance_agg_trade", rows)
            stored, note = None, None
            want = {it[0] for it in items}
            ids = sorted(want) + [x for x in (v.agg.first_id, v.agg.last_id) if x is not None]
            # read the minute back until every aggTrade REST returned is stored (the sink commits
            # asynchronously); the database down or too slow: compare the REST ones instead
            deadline = time.monotonic() + KC_READBACK_S
            if not self.dsn:
                note = "no database: compared with the aggTrades REST returned"
            while self.dsn:
                try:
                    got = await asyncio.to_thread(self._stored_minute, v.symbol, v.minute, ids)
                except Exception as e:
                    note = f"database not readable ({str(e).strip()[:120]}): compared with the aggTrades REST returned"
                    break
                if want <= {r[0] for r in got}:
                    stored = got
                    break
                if time.monotonic() >= deadline or self._stop.is_set():
                    note = (f"{len(want - {r[0] for r in got})} aggTrade(s) from REST not stored within "
                            f"{KC_READBACK_S:.0f} s: compared with the aggTrades REST returned")
                    break
                await self._sleep(1.0)
            if self._stop.is_set() and stored is None:
                return
            agg = KC.candle_of(stored if stored is not None else items)
            diff = KC.differences(v.kline, agg)
            repaired = not diff
            if diff and note is None:
                note = _unaggregated_note(stored, v.kline)
            self.counters["kline_check_repaired" if repaired else "kline_check_not_repaired"] += 1
            self.sink.add("binance_kline_check", KC.check_row(
                v.symbol, A.ms_text(v.minute), A.now_text(), "after_fill", v.kline, agg, diff,
                "stored" if stored is not None else "rest", repaired, len(items), note))
            if repaired:
                self._kc_log(logging.INFO, "kline check %s %s: repaired by the fill (%d aggTrades from REST)",
                             v.symbol, A.ms_text(v.minute)[:16], len(items))
            else:
                self._kc_log(logging.WARNING, "kline check %s %s: still differs after the fill in %s (%s)",
                             v.symbol, A.ms_text(v.minute)[:16], ", ".join(diff), note or "REST has no more trades")
        finally:
            self._kc_fills.discard(key)

    async def _agg_minute(self, symbol: str, minute: int) -> tuple[list[tuple] | None, list[tuple]]:
        """The aggTrades of one minute from REST: ``(trades, rows)`` with
        trades as ``(a, p, q, f, l)`` and their table rows; ``(None, [])``
        when stopped.  The first page by ``startTime``/``endTime``, further
        pages by ``fromId``; failures are retried (backoff up to 60 s)."""
        end = minute + KC.MINUTE_MS - 1
        trades: list[tuple] = []
        rows: list[tuple] = []
        from_id, delay = None, 1.0
        while not self._stop.is_set():
            try:
                items = await (self.rest.agg_trades_between(symbol, minute, end, 1000) if from_id is None
                               else self.rest.agg_trades(symbol, from_id, 1000))
            except Exception as e:
                log.warning("kline check fill %s %s failed: %s; retrying in %.0fs", symbol, A.ms_text(minute)[:16],
                            e, delay)
                await self._sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            delay = 1.0
            recv = A.now_text()
            last_a = None
            for it in items:
                a, t = it.get("a"), it.get("T")
                if type(a) is not int or type(t) is not int:
                    self._malformed(f"REST aggTrades {symbol}", f"a or T not an integer: {it!r:.120}")
                    continue
                last_a = a if last_a is None or a > last_a else last_a
                if not minute <= t <= end or (from_id is not None and a < from_id):
                    continue
                try:
                    row = A.rest_agg_trade_row(symbol, it, recv)
                except A.Malformed as e:
                    self._malformed(f"REST aggTrades {symbol}", str(e))
                    continue
                rows.append(row)
                trades.append((row[1], row[2], row[3], row[4], row[5]))
            t_last = items[-1].get("T") if items else None
            if len(items) < 1000 or last_a is None or type(t_last) is not int or t_last > end:
                return trades, rows
            from_id = last_a + 1
        return None, []

    def _stored_minute(self, symbol: str, minute: int, ids: list[int]) -> list[tuple]:
        """The stored aggTrades of ``symbol`` in the minute, as ``(a, p, q, f, l)``
        (searched between the lowest and highest of ``ids``)."""
        if not ids:
            return []
        with connect(self.dsn, application_name="feed-binance", connect_timeout=3, statement_timeout=30.0) as conn:
            return conn.execute(
                "SELECT agg_id, price::text, qty::text, first_trade_id, last_trade_id FROM binance_agg_trade "
                "WHERE symbol = %s AND agg_id BETWEEN %s AND %s AND trade_time >= %s AND trade_time < %s",
                (symbol, min(ids), max(ids), A.ms_to_dt(minute), A.ms_to_dt(minute + KC.MINUTE_MS))).fetchall()

    # ------------------------------------------------------------ gap filling
    def _gap(self, symbol: str, first: int, last: int) -> None:
        self.counters["gaps"] += 1
        log.warning("aggTrade gap %s ids %d..%d (%d missing); filling from REST", symbol, first, last, last - first + 1)
        self._start_fill(symbol, first, last, record=True)

    def _gap_sql(self, sql: str, params: tuple) -> None:
        if not self.dsn:
            return
        try:
            with connect(self.dsn, application_name="feed-binance", connect_timeout=3) as conn:
                conn.execute(sql, params)
        except Exception as e:
            log.warning("gap bookkeeping not written (%s)", str(e).strip().splitlines()[0] if str(e) else e)

    def _start_fill(self, symbol: str, first: int, last: int, record: bool = False) -> None:
        """Fill aggTrade ids ``first..last`` of ``symbol`` from REST in a task
        (``record``: list the gap in ``binance_agg_gap`` first).  The gap stays
        in :attr:`gaps_open` until its fill has ended: rows committed and its
        ``binance_agg_gap`` row deleted, or given up, or stopped (then the row
        stays for the next start)."""
        key = (symbol, first)
        self.gaps_open.add(key)

        async def fill() -> None:
            complete = False
            try:
                complete = await self._fill_agg(symbol, first, last, record)
            finally:
                self.gaps_open.discard(key)
                if self.kc is not None:
                    self._kc_verdicts(self.kc.gap_filled(symbol, first, complete))
        self._spawn(fill())

    async def _fill_agg(self, symbol: str, first: int, last: int, record: bool = False) -> bool:
        """Fill ids ``first..last`` (see :meth:`_start_fill`); True when every
        id was filled and the rows committed or spooled."""
        if record:
            await asyncio.to_thread(self._gap_sql, "INSERT INTO binance_agg_gap (symbol, first_id, last_id) "
                                    "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (symbol, first, last))
        gap_first = first
        cap = self.s.gap_fill_max_trades
        if last - first + 1 > cap:
            log.error("aggTrade gap %s %d..%d exceeds gap_fill_max_trades=%d; filling the newest %d only",
                      symbol, first, last, cap, cap)
            first = last - cap + 1
        cur, filled, delay = first, 0, 1.0
        while cur <= last and not self._stop.is_set():
            try:
                items = await self.rest.agg_trades(symbol, cur, 1000)
            except Exception as e:
                log.warning("aggTrade fill %s from %d failed: %s; retrying in %.0fs", symbol, cur, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            delay = 1.0
            recv = A.now_text()
            rows = []
            for it in items:
                a = it.get("a")
                if type(a) is int and cur <= a <= last:
                    try:
                        rows.append(A.rest_agg_trade_row(symbol, it, recv))
                    except A.Malformed as e:
                        self._malformed(f"REST aggTrades {symbol}", str(e))
            if rows:
                self.sink.add_many("binance_agg_trade", rows)
                if self.kc is not None:
                    self.kc.filled(symbol, [(r[1], r[2], r[3], r[4], r[5], A.text_ms(r[6])) for r in rows])
                filled += len(rows)
                cur = rows[-1][1] + 1
            if not rows or not items or items[-1].get("a", last) >= last:
                break
        self.counters["gap_trades_filled"] += filled
        if self._stop.is_set():
            return False    # still listed in binance_agg_gap: the next start fills it
        if cur <= last:
            log.error("aggTrade gap %s: ids %d..%d not available from REST", symbol, cur, last)
        else:
            log.info("aggTrade gap %s %d..%d filled (%d trades)", symbol, first, last, filled)
        # forget the gap only once its rows are committed
        if await asyncio.to_thread(self.sink.flush, 60.0):
            await asyncio.to_thread(self._gap_sql, "DELETE FROM binance_agg_gap WHERE symbol = %s AND first_id = %s",
                                    (symbol, gap_first))
            return cur > last and first == gap_first
        return False

    async def _fill_klines(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> None:
        key = (symbol, interval)
        try:
            cur, total, delay = start_ms, 0, 1.0
            while cur <= end_ms and not self._stop.is_set():
                try:
                    items = await self.rest.klines(symbol, interval, cur, end_ms, 1500)
                except Exception as e:
                    log.warning("kline fill %s %s failed: %s; retrying in %.0fs", symbol, interval, e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
                    continue
                now_ms = int(time.time() * 1000)
                recv = A.now_text()
                rows = []
                last_t = None
                for k in items:
                    try:
                        if k[6] < now_ms and k[0] >= cur:      # closed klines only
                            rows.append(A.rest_kline_row(symbol, interval, k, recv))
                            last_t = k[0]
                    except (A.Malformed, IndexError, TypeError) as e:
                        self._malformed(f"REST klines {symbol} {interval}", f"{e}")
                if not rows:
                    break
                self.sink.add_many("binance_kline", rows)
                total += len(rows)
                cur = last_t + A.INTERVAL_MS[interval]
            self.counters["klines_filled"] += total
            if total:
                log.info("klines %s %s filled from REST: %d", symbol, interval, total)
        finally:
            self.kline_filling.discard(key)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ connections
    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.s.backoff_max, self.s.backoff_base * (2 ** attempt)))

    async def _open(self, slot: _Slot):
        """Open one python-binance combined-stream socket for ``slot`` (see :mod:`.wire`)."""
        return await wire.open_combined(self.rest.client, self.s.ws_url, slot.streams, slot.category)

    async def _pump(self, sock, first: asyncio.Event) -> None:
        await wire.pump(sock, self.handle, first)

    async def _close(self, sock, task: asyncio.Task | None) -> None:
        await wire.close(sock, task)

    async def _run_slot(self, slot: _Slot) -> None:
        attempt = 0
        stop = self._stop
        sock = task = None
        while not stop.is_set():
            if sock is None:
                try:
                    sock = await self._open(slot)
                except Exception as e:
                    wait = self._backoff(attempt)
                    attempt += 1
                    self.counters["reconnects"] += 1
                    log.warning("connection %d (%s, %d streams) failed: %s; retry in %.1fs",
                                slot.index, slot.category, len(slot.streams), e, wait)
                    await self._sleep(wait)
                    continue
                slot.generation += 1
                slot.opened_at = time.monotonic()
                first = asyncio.Event()
                task = asyncio.create_task(self._pump(sock, first))
                log.info("connection %d open (%s, %d streams, generation %d)", slot.index, slot.category,
                         len(slot.streams), slot.generation)
            slot.replace.clear()
            rollover_in = max(0.0, self.s.rollover_after - (time.monotonic() - slot.opened_at))
            waiters = [task, asyncio.ensure_future(slot.replace.wait()), asyncio.ensure_future(stop.wait())]
            done, _ = await asyncio.wait(waiters, timeout=rollover_in, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters[1:]:
                w.cancel()
            if stop.is_set():
                break
            if task in done:
                err = task.exception() if not task.cancelled() else None
                wait = self._backoff(attempt)
                attempt += 1
                self.counters["reconnects"] += 1
                log.warning("connection %d lost (%r); reconnecting in %.1fs", slot.index, err, wait)
                self._kc_lost(slot)
                await self._close(sock, None)
                sock = task = None
                await self._sleep(wait)
                continue
            # rollover (24 h expiry ahead) or a stale stream: new connection first, then close the old
            reason = slot.replace_reason or "rollover before the 24 h expiry"
            if slot.replace_reason:
                self._kc_lost(slot)         # a stale stream: trades may be missing since it stalled
            slot.replace_reason = ""
            try:
                new_sock = await self._open(slot)
            except Exception as e:
                log.warning("replacement connection %d failed: %s; keeping the old one", slot.index, e)
                await self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            new_first = asyncio.Event()
            new_task = asyncio.create_task(self._pump(new_sock, new_first))
            waiters = [asyncio.ensure_future(new_first.wait()), asyncio.ensure_future(stop.wait())]
            done, _ = await asyncio.wait(waiters, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if stop.is_set():
                await self._close(new_sock, new_task)
                break
            if not new_first.is_set():
                log.warning("replacement connection %d delivered nothing in 30 s; replacing anyway", slot.index)
            await self._close(sock, task)
            sock, task = new_sock, new_task
            slot.generation += 1
            slot.opened_at = time.monotonic()
            self.counters["rollovers"] += 1
            attempt = 0
            log.info("connection %d replaced (%s), generation %d", slot.index, reason, slot.generation)
        if sock is not None:
            await self._close(sock, task)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------ supervision
    def check_staleness(self) -> list[str]:
        """Streams silent beyond their limit; their connections get replaced."""
        now = time.monotonic()
        stale: list[str] = []
        limits = self.s.stale_after
        for name, r in self.routes.items():
            if r.retired:
                continue
            slot = r.slot
            if not slot.opened_at or now - slot.opened_at < 5.0:
                continue
            since = max(r.health.last, slot.opened_at)
            limit = limits.get(r.kind, 0.0)
            if limit and now - since > limit:
                stale.append(name)
            elif r.kind == A.AGG_TRADE:
                # the 24h ticker carries the last trade id: if it stays ahead of
                # the aggTrades we received, the aggTrade stream is stalled
                tl = self.ticker_last_trade.get(r.symbol)
                if tl is not None:
                    ticker_last_id, changed_at = tl
                    if self.last_trade_id.get(r.symbol, -1) < ticker_last_id and \
                            now - max(changed_at, since) > self.s.agg_behind_grace:
                        stale.append(name)
        for name in stale:
            slot = self.routes[name].slot
            if now - slot.last_replace < 30.0 or slot.replace.is_set():
                continue
            slot.last_replace = now
            slot.replace_reason = f"stream {name} stale"
            self.counters["stale"] += 1
            log.warning("stream %s stale; replacing connection %d", name, slot.index)
            slot.replace.set()
        return stale

    async def load_resume_state(self) -> None:
        """Last stored aggTrade id and closed kline per symbol, so that a
        restart fills its downtime.  Best effort: skipped if the database is down.

        Only rows of the last ``resume_lookback_hours`` and not beyond
        ``max_future_s`` after now count: a row stamped in the future cannot
        be the last one received.  An aggTrade id read back here is state
        like any other: live ids far behind it are held and, once confirmed,
        replace it (see the class doc), so an implausible id stored by an
        older version cannot make later trades duplicates."""
        if not self.dsn:
            return
        back, ahead = self.s.resume_lookback_hours * 3600, self.s.max_future_s

        def q():
            # one look-up per symbol (and interval) over the lookback's daily partitions: allow a minute
            with connect(self.dsn, application_name="feed-binance", statement_timeout=60.0) as conn:
                aggs = conn.execute(
                    """SELECT s, (SELECT agg_id FROM binance_agg_trade t
                                   WHERE t.symbol = s AND t.trade_time > now() - make_interval(secs => %s)
                                     AND t.trade_time <= now() + make_interval(secs => %s)
                                   ORDER BY agg_id DESC LIMIT 1)
                         FROM unnest(%s::text[]) AS s""",
                    (back, ahead, self.symbols)).fetchall()
                kl = conn.execute(
                    """SELECT s, i, (SELECT open_time FROM binance_kline k
                                      WHERE k.symbol = s AND k.interval = i
                                        AND k.open_time > now() - make_interval(secs => %s)
                                        AND k.open_time <= now() + make_interval(secs => %s)
                                      ORDER BY open_time DESC LIMIT 1)
                         FROM unnest(%s::text[]) AS s, unnest(%s::text[]) AS i""",
                    (back, ahead, self.symbols, self.s.kline_intervals)).fetchall()
                gaps = conn.execute("SELECT symbol, first_id, last_id FROM binance_agg_gap "
                                    "WHERE symbol = ANY(%s) ORDER BY symbol, first_id", (self.symbols,)).fetchall()
                return aggs, kl, gaps
        try:
            aggs, kl, gaps = await asyncio.to_thread(q)
        except Exception as e:
            log.warning("resume state not loaded (%s); gaps during the downtime will not be filled", e)
            return
        for s, a in aggs:
            if a is not None and 0 <= a <= P.INT64_MAX:
                self.last_agg[s] = a
        for s, i, t in kl:
            if t is not None:
                self.last_kline[(s, i)] = (t - A.EPOCH) // timedelta(milliseconds=1)
        log.info("resume state: last aggTrade id for %d symbols, last kline for %d, %d unfinished gap fill(s)",
                 sum(1 for _, a in aggs if a is not None), sum(1 for *_, t in kl if t is not None), len(gaps))
        for sym, first, last in gaps:
            self._start_fill(sym, first, last)

    async def refresh_symbols(self) -> tuple[list[str], list[str]]:
        """Re-read exchangeInfo: new perpetuals get connections of their own;
        delisted ones are retired (their silence no longer counts as stale).
        Returns ``(added, removed)``."""
        try:
            current = await self.discover_symbols()
        except Exception as e:
            log.warning("exchangeInfo refresh failed (%s); keeping %d symbols", e, len(self.symbols))
            return [], []
        known = set(self.symbols)
        added = [x for x in current if x not in known]
        removed = sorted(known - set(current))
        for r in self.routes.values():
            if r.symbol in removed:
                r.retired = True
        if added:
            new = self.plan(added)
            self.slots.extend(new)
            self.symbols.extend(added)
            for slot in new:
                self._slot_tasks.append(asyncio.create_task(self._run_slot(slot)))
                await asyncio.sleep(self.s.connect_stagger)
        self.symbols = [x for x in self.symbols if x not in removed]
        if added or removed:
            log.info("exchangeInfo changed: %d symbol(s) added (%s), %d retired (%s)", len(added),
                     ",".join(added[:10]), len(removed), ",".join(removed[:10]))
        return added, removed

    async def run(self, stop: asyncio.Event) -> None:
        """Collect until ``stop`` is set (sets it itself when it fails);
        returns once every connection is closed and the held first ids are
        settled.  Raises ValueError when there are no symbols to collect.
        The runtime (:mod:`feeds.service`) ticks the watchdog, writes status
        lines and heartbeats, calls :meth:`periodic` and stops the process
        when the sink's writer dies."""
        self._stop = stop
        self.rest = BinanceRest(self.s.rest_url, self.s.rest_weight_budget)
        try:
            await self._run(stop)
        finally:
            await self.rest.close()

    async def _discover_with_retry(self, stop: asyncio.Event) -> list[str] | None:
        attempt = 0
        while not stop.is_set():
            try:
                return await self.discover_symbols()
            except ValueError:
                raise
            except Exception as e:
                wait = self._backoff(attempt) + 1.0
                attempt += 1
                log.warning("exchangeInfo failed (%s); retrying in %.1fs", str(e) or type(e).__name__, wait)
                self._wait_status(f"waiting for exchangeInfo: {e}"[:200])
                await self._sleep(wait)
        return None

    async def _run(self, stop: asyncio.Event) -> None:
        symbols = await self._discover_with_retry(stop)
        if symbols is None:
            return
        self.symbols = symbols
        self.slots = []
        self.slots = self.plan(self.symbols)
        log.info("collecting %d symbols, %d streams over %d connections (%d market, %d public)",
                 len(self.symbols), len(self.routes), len(self.slots),
                 sum(1 for x in self.slots if x.category == "market"),
                 sum(1 for x in self.slots if x.category == "public"))
        await self.load_resume_state()
        log.info("kline check: %s", "on (closed 1m klines against the stored aggTrades)" if self.kc is not None
                 else f"off ({self.kline_check_off})")
        self._waiting = ""
        self.health.notify_status(f"connecting {len(self.slots)} connections")
        self._next_refresh = time.monotonic() + self.s.symbols_refresh
        slot_tasks = self._slot_tasks = []      # refresh_symbols() appends the connections of new listings
        try:
            for slot in self.slots:
                if stop.is_set():
                    break
                slot_tasks.append(asyncio.create_task(self._run_slot(slot)))
                await asyncio.sleep(self.s.connect_stagger)   # Binance: at most 300 connection attempts / 5 min
            await stop.wait()
        finally:
            stop.set()
            done, pending = await asyncio.wait(slot_tasks, timeout=15) if slot_tasks else (set(), set())
            for t in pending:
                t.cancel()
            if pending:
                log.warning("%d connection(s) did not close within 15 s; cancelled", len(pending))
                await asyncio.wait(pending, timeout=5)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._settle_held_at_stop()


def _unaggregated_note(stored: list[tuple] | None, kline: KC.Candle) -> str | None:
    """When the stored aggTrades of a minute are complete by their aggregate
    ids but skip trade ids inside the minute: a note naming how many (Binance
    aggregates market trades only; insurance-fund and ADL trades are in no
    aggTrade)."""
    if not stored:
        return None
    ids = sorted(r[0] for r in stored)
    if ids[-1] - ids[0] + 1 != len(ids):
        return None
    lo, hi = min(r[3] for r in stored), max(r[4] for r in stored)
    holes = (hi - lo + 1) - sum(r[4] - r[3] + 1 for r in stored)
    if holes <= 0:
        return None
    return (f"the aggTrades have every aggregate id but skip {holes} trade id(s) inside the minute: trades "
            "Binance does not aggregate (insurance fund, ADL)")
