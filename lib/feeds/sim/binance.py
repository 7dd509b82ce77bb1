"""Binance USD-M futures simulator: REST (``/fapi``) and WebSocket market
streams on one port, speaking Binance's real wire protocol so that the
unmodified python-binance 1.0.37 connects to it.

Documents followed (Binance "Derivatives Trading: USDS-M Futures"):
"General Info" (request weight, ``X-MBX-USED-WEIGHT-1M``, HTTP 429 and error
codes), "Market Data" REST endpoints (ping, time, exchangeInfo, aggTrades,
klines, depth, ticker/price v1 and v2), "Websocket Market Streams" (combined and raw streams, the
``/market`` and ``/public`` categories, limits) and "Live
Subscribing/Unsubscribing to streams".

Pointing python-binance at the simulator::

    client = AsyncClient()             # no network call in the constructor
    client.FUTURES_URL = f"http://127.0.0.1:{port}/fapi"
    bm = BinanceSocketManager(client)
    bm.FSTREAM_URL = f"ws://127.0.0.1:{port}/"
    async with bm.futures_multiplex_socket(["btcusdt@aggTrade"], category="market") as s:
        msg = await s.recv()

``AsyncClient.create()`` calls ``GET {API_URL}/v3/ping`` and
``GET {API_URL}/v3/time`` (the spot API) before returning, so set the URLs on a
subclass first; the simulator serves both::

    class SimClient(AsyncClient):
        API_URL = f"http://127.0.0.1:{port}/api"
        FUTURES_URL = f"http://127.0.0.1:{port}/fapi"
    client = await SimClient.create()

Data sources
------------
* **Replay** of recorded sessions (:class:`~feeds.sim.binance_replay.Recording`:
  ``*.frames`` lines ``<recv s>: <frame>`` or ``<recv ns> <frame>`` lines with
  combined or raw frames, plain or gzip, detected automatically):
  frames are sent verbatim (combined frames byte for byte as recorded), at the
  recorded pace (receive times) times ``speed`` (``speed=0``: as fast as the
  clients read).
  A recording starts once every stream in it has a subscriber (over all
  connections), or ``replay_wait`` seconds after the first subscription.
  Afterwards the connections stay open and idle.
* **Generator**: symbols ``SYM0000USDT``... (or given names) with random-walk
  prices as decimal strings; agg ids per symbol increase by exactly 1;
  ``E``/``T`` are the wall clock (ms) when the message is made. ``rate`` > 0
  is the total number of generated aggTrade + bookTicker events per second
  over all symbols (delivered to every subscriber); ``rate=0`` generates for
  the subscribed streams as fast as the slowest subscribed connection takes
  them (the producer waits for room in the send buffers: nothing is dropped
  and nothing is buffered without bound).

Derived streams
---------------
markPrice (``@1s`` and 3 s), 24h ticker and - when not replayed - kline_1m
messages are DERIVED by the simulator from the generated or replayed trades
(Binance's own mark price, index price and funding are not reproduced). Every
derived data object carries the extra key ``"sim":"derived"``, which Binance
never sends. kline_1m updates of the open candle go out about every 250 ms
while it changes, and exactly one ``"x":true`` message closes each minute.
Derived messages are only built for streams that have a subscriber.

Limits and faults
-----------------
At most ``max_streams`` (1024) streams per connection, at most
``max_incoming_per_s`` (10) incoming messages per second (the connection is
closed with code 1008 beyond it), a ping every ``ping_interval`` s (180) and a
close after ``pong_timeout`` s (600) without pong, and a close with code 1001
once a connection is ``max_connection_age`` s old (24 h: Binance documents
only "expect to be disconnected at the 24 hour mark"). REST request weight is
counted per minute; over ``weight_limit`` the answer is HTTP 429 with
``{"code":-1003,...}`` and ``Retry-After``.

Faults (Python methods, or ``POST /sim/fault/...``): drop connections, stall
one stream, stall everything, send malformed frames, skip aggTrades on the
WebSocket (kept in the REST history), skip the last aggTrade of a minute on
the WebSocket (kept in the REST history; the minute's closed kline goes out
before the next aggTrade, so the gap shows in the kline before the ids show
it). ``GET /sim/stats`` returns counters.

Known simplifications: one weight counter for all clients (Binance counts per
IP); no 418 IP bans; ``timeUnit`` is ignored; replay items without a
subscriber are counted as ``unsent`` and not queued. Back-pressure is global:
a connection that stops reading holds back every source once it has about
1024 frames queued (nothing is dropped; Binance would rather disconnect it).
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as _dt
import logging
import random
import re
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import orjson
from aiohttp import WSMsgType, web

from .binance_market import Candle, SymbolMarket, fmt_scaled
from .binance_replay import Recording, ReplayItem
from .binance_streams import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    KLINE_INTERVALS_MS,
    MARKET,
    PUBLIC,
    StreamName,
    StreamNameError,
    error_message,
    parse_stream,
    ping_frame,
    result_message,
    text_frame,
    text_header,
)

log = logging.getLogger(__name__)

#: Stream kinds the generator can serve.
GENERATOR_KINDS = ("aggTrade", "bookTicker", "markPrice@1s", "markPrice", "ticker", "kline_1m")
_DERIVED_KINDS = ("markPrice@1s", "markPrice", "ticker", "kline_1m")
_CONTROL_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")

# Generator target kinds
_AGG_SENT, _AGG_INTERNAL, _BOOK = 0, 1, 2
# Random-walk steps in ticks, indexed by 4 random bits (symmetric).
_STEPS = (-2, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2)

_BATCH = 256  # events per producer step
_OUT_HIGH = 1024  # queued frames per connection before producers wait
_TICK_S = 0.25  # derived-stream clock
_SYMBOL_NAME = re.compile(r"^[A-Z0-9_]{2,40}$")
_CLOSE_GRACE_MS = 1000  # replay: close a derived candle this long after its minute

_EVENT_TYPES = {
    "aggTrade": "aggTrade",
    "bookTicker": "bookTicker",
    "markPrice": "markPriceUpdate",
    "markPrice@1s": "markPriceUpdate",
    "ticker": "24hrTicker",
    "kline_1m": "kline",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


class BinanceAPIError(Exception):
    """A REST error answered as ``{"code": code, "msg": msg}`` with ``status``."""

    def __init__(self, status: int, code: int, msg: str):
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


class _Slot:
    """One stream: its subscribers and counters."""

    __slots__ = ("name", "conns", "sent", "unsent", "withheld", "stall_until", "cprefix")

    def __init__(self, name: str):
        self.name = name
        self.conns: list[_Conn] = []
        self.sent = self.unsent = self.withheld = 0
        self.stall_until = 0.0
        self.cprefix = b'{"stream":"' + name.encode() + b'","data":'


class _Conn:
    """One WebSocket connection."""

    __slots__ = (
        "id", "ws", "transport", "drain", "path", "category", "combined", "streams",
        "out", "wake", "opened", "last_pong", "in_times", "closing", "writer_task",
        "ping_handle", "age_handle", "peer", "close_reason", "frames_out",
    )

    def __init__(self, cid, ws, request, path, category, combined, max_in):
        self.id = cid
        self.ws = ws
        self.transport = request.transport
        self.drain = request.writer.drain
        self.path = path
        self.category = category
        self.combined = combined
        self.streams: dict[str, _Slot] = {}
        self.out: list[bytes] = []
        self.wake = asyncio.Event()
        self.opened = asyncio.get_running_loop().time()
        self.last_pong = self.opened
        self.in_times: deque = deque(maxlen=max(1, max_in))
        self.closing = False
        self.writer_task: asyncio.Task | None = None
        self.ping_handle = None
        self.age_handle = None
        self.peer = request.remote
        self.close_reason = "client"
        self.frames_out = 0


class _GenSym:
    """Generator state of one symbol."""

    __slots__ = ("m", "S", "px", "ps", "qs", "next_a", "next_f", "u",
                 "agg_slot", "book_slot", "agg_kind")

    def __init__(self, m: SymbolMarket, px: int, agg_slot, book_slot, agg_kind):
        self.m = m
        self.S = m.symbol
        self.px = px
        self.ps = m.price_scale
        self.qs = m.qty_scale
        self.next_a = m.history.first_id
        self.next_f = 1_000_000 + m.history.first_id * 2
        self.u = 1
        self.agg_slot = agg_slot
        self.book_slot = book_slot
        self.agg_kind = agg_kind


class BinanceSimulator:
    """Binance USD-M futures REST + WebSocket simulator on one port.

    Parameters (all optional):

    * ``host``, ``port``: listen address (``port=0``: ephemeral; read
      :attr:`port` after :meth:`start`).
    * ``replay``: recording files (``*.frames`` or ``<recv ns> <frame>`` lines,
      plain or gzip; see :mod:`feeds.sim.binance_replay`), played one after another;
      ``speed`` (1.0 = recorded pace, 0 = as fast as clients read);
      ``replay_wait`` (s, see module doc).
    * ``symbols``: number of generated symbols (``SYM0000USDT``...) or a list
      of names; ``streams``: generated kinds among :data:`GENERATOR_KINDS`;
      ``rate``: generated aggTrade+bookTicker events per second in total
      (0 = as fast as the subscribers take them); ``seed``: random seed.
    * ``max_connection_age``, ``ping_interval``, ``pong_timeout`` (s),
      ``max_streams``, ``max_incoming_per_s``: WebSocket limits.
    * ``weight_limit``: REST request weight per minute.
    * ``history_limit``: aggTrades kept per symbol for REST.

    Raises ``ValueError`` for inconsistent options (unknown stream kind,
    a generated symbol that is also replayed) and ``OSError``/``ValueError``
    from reading recordings.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        replay: Sequence[str | Path] = (),
        speed: float = 1.0,
        replay_wait: float = 30.0,
        symbols: int | Sequence[str] | None = None,
        streams: Sequence[str] = ("aggTrade", "bookTicker", "markPrice@1s", "ticker", "kline_1m"),
        rate: float = 0.0,
        seed: int | None = None,
        max_connection_age: float = 86_400.0,
        ping_interval: float = 180.0,
        pong_timeout: float = 600.0,
        max_streams: int = 1024,
        max_incoming_per_s: int = 10,
        weight_limit: int = 2400,
        history_limit: int = 1_000_000,
    ):
        if speed < 0 or rate < 0:
            raise ValueError("speed and rate must be >= 0")
        self.host, self._req_port = host, port
        self.port: int | None = None
        self.speed = float(speed)
        self.replay_wait = float(replay_wait)
        self.rate = float(rate)
        self.max_connection_age = float(max_connection_age)
        self.ping_interval = float(ping_interval)
        self.pong_timeout = float(pong_timeout)
        self.max_streams = int(max_streams)
        self.max_incoming_per_s = int(max_incoming_per_s)
        self.weight_limit = int(weight_limit)
        self.history_limit = int(history_limit)
        self._rng = random.Random(seed)

        kinds = []
        for k in streams:
            try:
                canon = parse_stream("x@" + k).kind
            except StreamNameError as exc:
                raise ValueError(f"unknown stream kind {k!r}") from exc
            if canon not in GENERATOR_KINDS:
                raise ValueError(f"stream kind {k!r} is not one of {', '.join(GENERATOR_KINDS)}")
            kinds.append(canon)
        self.gen_kinds = tuple(dict.fromkeys(kinds))

        self._markets: dict[str, SymbolMarket] = {}
        self._slots: dict[str, _Slot] = {}
        self._recordings = [Recording.load(p) for p in replay]
        for rec in self._recordings:
            for sym in sorted(rec.symbols):
                if sym in self._markets:
                    continue
                m = SymbolMarket(sym, "replay", rec.price_scale.get(sym, 2),
                                 rec.qty_scale.get(sym, 0), history_limit)
                m.klines_recorded = sym in rec.kline_symbols
                self._markets[sym] = m
            for name in rec.streams:
                self._slot(name)
        replayed = set(self._markets)

        if symbols is None:
            names: list[str] = []
        elif isinstance(symbols, int):
            names = [f"SYM{i:04d}USDT" for i in range(symbols)]
        else:
            names = [s.strip().upper() for s in symbols if s.strip()]
        bad = [n for n in names if not _SYMBOL_NAME.match(n)]
        if bad:
            raise ValueError(f"invalid symbol name(s): {', '.join(bad)} (letters, digits, '_' only)")
        clash = replayed.intersection(names)
        if clash:
            raise ValueError(f"symbols both replayed and generated: {', '.join(sorted(clash))}")
        self._gen: list[_GenSym] = []
        for name in names:
            self._gen.append(self._new_gen_symbol(name))

        self._conns: set[_Conn] = set()
        self._conn_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._targets: list | None = None
        self._rr = 0
        self._sub_waiters: list[asyncio.Future] = []
        self._room = None
        self._first_sub_at: float | None = None
        self._replay_force = False
        self._replay_clock = 0
        self._replay_started = False
        self._replay_finished = not self._recordings
        self._stall_all_until = 0.0
        self._started_at = 0.0
        # counters
        self._conn_total = 0
        self._malformed_sent = 0
        self._agg_skipped = 0
        self._client_errors = 0
        self._generated = 0
        self._replayed = 0
        self._w_minute = 0
        self._w_used = 0
        self._rest_requests = 0
        self._rest_429 = 0

    # ------------------------------------------------------------------ setup

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot(name)
        return slot

    def _new_gen_symbol(self, name: str) -> _GenSym:
        rng = self._rng
        base = rng.uniform(10.0, 50_000.0)
        digits = len(str(int(base)))
        ps = max(0, 5 - digits) + 1
        qs = max(0, digits - 2)
        px = int(base * 10**ps)
        m = SymbolMarket(name, "generated", ps, qs, self.history_limit,
                         first_agg_id=rng.randrange(1_000_000, 900_000_000))
        m.onboard_ms = _now_ms()
        self._markets[m.symbol] = m
        kinds = self.gen_kinds
        agg_kind = None
        if "aggTrade" in kinds:
            agg_kind = _AGG_SENT
        elif any(k in kinds for k in _DERIVED_KINDS):
            agg_kind = _AGG_INTERNAL
        agg_slot = self._slot(f"{m.lower}@aggTrade") if "aggTrade" in kinds else _Slot("-")
        book_slot = self._slot(f"{m.lower}@bookTicker") if "bookTicker" in kinds else None
        for k in _DERIVED_KINDS:
            if k in kinds:
                self._slot(f"{m.lower}@{k}")
        return _GenSym(m, px, agg_slot, book_slot, agg_kind)

    @property
    def symbols(self) -> list[str]:
        """Every simulated symbol (upper case), replayed ones first."""
        return list(self._markets)

    def market(self, symbol: str) -> SymbolMarket:
        """State of one symbol; raises ``KeyError`` if it is not simulated."""
        return self._markets[symbol.upper()]

    async def start(self) -> None:
        """Bind the port and start the data sources.

        Raises ``OSError`` when the address cannot be bound.
        """
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._started_at = self._loop.time()
        app = web.Application()
        r = app.router
        for prefix, cat in (("/market", MARKET), ("/public", PUBLIC), ("", None)):
            r.add_get(prefix + "/stream", self._ws_route(cat, "stream"))
            r.add_get(prefix + "/ws", self._ws_route(cat, "ws"))
            r.add_get(prefix + "/ws/{stream}", self._ws_route(cat, "ws"))
        r.add_get("/fapi/v1/ping", self._rest(self._h_ping, lambda q: 1))
        r.add_get("/fapi/v1/time", self._rest(self._h_time, lambda q: 1))
        r.add_get("/fapi/v1/exchangeInfo", self._rest(self._h_exchange_info, lambda q: 1))
        r.add_get("/fapi/v1/aggTrades", self._rest(self._h_agg_trades, lambda q: 20))
        r.add_get("/fapi/v1/klines", self._rest(self._h_klines, _klines_weight))
        r.add_get("/fapi/v1/depth", self._rest(self._h_depth, _depth_weight))
        for version in ("v1", "v2"):
            r.add_get(f"/fapi/{version}/ticker/price",
                      self._rest(self._h_ticker_price, lambda q: 1 if q.get("symbol") else 2))
        r.add_get("/api/v3/ping", self._rest(self._h_ping, lambda q: 1))
        r.add_get("/api/v3/time", self._rest(self._h_time, lambda q: 1))
        r.add_get("/sim/stats", self._h_stats)
        r.add_post("/sim/fault/{name}", self._h_fault)
        r.add_post("/sim/replay/start", self._h_replay_start)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._req_port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self._recordings:
            self._spawn(self._replay_loop(), "replay")
        if self._gen:
            self._spawn(self._rate_loop() if self.rate > 0 else self._fast_loop(), "generator")
        self._spawn(self._derived_loop(), "derived")
        log.info(
            "binance simulator listening on %s:%d symbols=%d replay=%d generator_rate=%s",
            self.host, self.port, len(self._markets), len(self._recordings),
            self.rate if self._gen else "off",
        )

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=f"binance-sim-{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    @staticmethod
    def _task_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task %s failed: %r", task.get_name(), task.exception())

    async def stop(self) -> None:
        """Stop the sources, close every connection and release the port."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        for c in list(self._conns):
            c.close_reason = "shutdown"
            self._detach(c)
            if c.transport is not None:
                c.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("binance simulator stopped")

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-ready dict.

        Keys: ``streams`` (name -> ``{"sent","unsent","withheld"}``: frames
        handed to connections, frames with no subscriber, frames held back by
        a stall), ``sent_total``, ``unsent_total``, ``withheld_total``,
        ``connections_open``, ``connections_total``, ``malformed_sent``,
        ``agg_ids_skipped``, ``client_errors``, ``generated_events``,
        ``replayed_frames``, ``replay_started``, ``replay_finished``,
        ``rest_weight_used`` (this minute), ``rest_requests``, ``rest_429``,
        ``uptime_s``.
        """
        streams = {
            name: {"sent": s.sent, "unsent": s.unsent, "withheld": s.withheld}
            for name, s in self._slots.items()
            if s.sent or s.unsent or s.withheld or s.conns
        }
        self._weight_window()
        return {
            "streams": streams,
            "sent_total": sum(s["sent"] for s in streams.values()),
            "unsent_total": sum(s["unsent"] for s in streams.values()),
            "withheld_total": sum(s["withheld"] for s in streams.values()),
            "connections_open": len(self._conns),
            "connections_total": self._conn_total,
            "malformed_sent": self._malformed_sent,
            "agg_ids_skipped": self._agg_skipped,
            "client_errors": self._client_errors,
            "generated_events": self._generated,
            "replayed_frames": self._replayed,
            "replay_started": self._replay_started,
            "replay_finished": self._replay_finished,
            "rest_weight_used": self._w_used,
            "rest_requests": self._rest_requests,
            "rest_429": self._rest_429,
            "uptime_s": round(self._loop.time() - self._started_at, 3) if self._loop else 0.0,
        }

    # ------------------------------------------------------------------ faults

    def fault_drop(self, path: str | None = None) -> int:
        """Abruptly close (TCP abort, no close frame) matching connections.

        ``path``: ``"market"``, ``"public"``, ``"legacy"`` (no category) or
        ``None`` for all. Returns the number of connections dropped.
        Raises ``ValueError`` for another ``path``.
        """
        if path not in (None, "", MARKET, PUBLIC, "legacy"):
            raise ValueError(f"path must be market, public or legacy, not {path!r}")
        n = 0
        for c in list(self._conns):
            cat = c.category or "legacy"
            if path and cat != path:
                continue
            c.close_reason = "dropped"
            self._detach(c)
            if c.transport is not None:
                c.transport.abort()
            n += 1
        log.warning("fault: dropped %d connection(s) path=%s", n, path or "all")
        return n

    def fault_stall(self, stream: str, seconds: float) -> str:
        """Send nothing of ``stream`` for ``seconds`` (others go on).

        Frames of that stream made meanwhile are not sent (counted as
        ``withheld``). Returns the canonical stream name. Raises
        ``ValueError`` for a bad name or negative duration.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        try:
            name = parse_stream(stream).name
        except StreamNameError as exc:
            raise ValueError(str(exc)) from exc
        self._slot(name).stall_until = self._loop.time() + seconds
        log.warning("fault: stall %s for %.3fs", name, seconds)
        return name

    def fault_stall_all(self, seconds: float) -> None:
        """Send nothing at all (no data, no pings) for ``seconds``; sockets stay open."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._stall_all_until = self._loop.time() + seconds
        log.warning("fault: stall all connections for %.3fs", seconds)

    def fault_skip(self, symbol: str, count: int) -> None:
        """Do not send the next ``count`` aggTrades of ``symbol`` on the WebSocket.

        They stay in the REST history (``/fapi/v1/aggTrades``). Raises
        ``ValueError`` for an unknown symbol or a negative count.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        m = self._markets.get(symbol.upper())
        if m is None:
            raise ValueError(f"unknown symbol {symbol!r}")
        m.skip_left += int(count)
        log.warning("fault: skip next %d aggTrade(s) of %s", count, m.symbol)

    def fault_skip_last(self, symbol: str) -> int:
        """Do not send the last aggTrade of the next whole minute of the
        generated ``symbol`` on the WebSocket (it stays in the REST history).

        The minute is the first one that starts after this call; its
        aggTrades are each sent when the next one is made (one trade late),
        so that the last is known when the minute's candle closes: then it
        is dropped, and the closed kline goes out before the next aggTrade.
        Returns the minute's start (epoch ms).  Raises ``ValueError`` for an
        unknown or replayed symbol."""
        m = self._markets.get(symbol.upper())
        if m is None:
            raise ValueError(f"unknown symbol {symbol!r}")
        if m.source != "generated":
            raise ValueError(f"{m.symbol} is replayed: skip_last works on generated symbols only")
        now = _now_ms()
        m.tail_from = now - now % 60_000 + 60_000
        m.tail_held = None
        log.warning("fault: skip the last aggTrade of %s in the minute starting at %d", m.symbol, m.tail_from)
        return m.tail_from

    def fault_malformed(self, count: int) -> int:
        """Send ``count`` malformed frames on every open connection.

        They cycle through: invalid JSON, a data object lacking required keys,
        and a data object with wrong-typed fields. Returns frames sent.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        sent = 0
        for c in list(self._conns):
            if c.closing:
                continue
            stream = next(iter(c.streams), "btcusdt@aggTrade")
            for i in range(count):
                data = _malformed_data(stream, i % 3)
                body = (b'{"stream":"' + stream.encode() + b'","data":' + data + b"}") if c.combined else data
                c.out.append(text_frame(body))
                sent += 1
            c.wake.set()
        self._malformed_sent += sent
        log.warning("fault: %d malformed frame(s) sent", sent)
        return sent

    def start_replay(self) -> None:
        """Start the pending recording now, without waiting for subscribers."""
        self._replay_force = True
        self._notify_subs()

    # ------------------------------------------------------------------ WebSocket

    def _ws_route(self, category: str | None, style: str):
        async def handler(request: web.Request):
            return await self._ws_handler(request, category, style)

        return handler

    def _refuse(self, msg: str) -> web.Response:
        self._client_errors += 1
        log.warning("ws refused: %s", msg)
        return web.json_response({"code": -1100, "msg": msg}, status=400)

    def _check_streams(self, names: Iterable[str], category: str | None) -> list[StreamName]:
        out = []
        for raw in names:
            sn = parse_stream(raw)
            if category is not None and sn.category != category:
                raise StreamNameError(
                    f"stream {sn.name} is served under /{sn.category}, not /{category}"
                )
            out.append(sn)
        return out

    async def _ws_handler(self, request: web.Request, category: str | None, style: str):
        if style == "ws":
            raw = request.match_info.get("stream", "")
            names = [raw] if raw else []
        else:
            names = [n for n in request.query.get("streams", "").split("/") if n]
        try:
            parsed = self._check_streams(names, category)
        except StreamNameError as exc:
            return self._refuse(str(exc))
        unique = list(dict.fromkeys(parsed))
        if len(unique) > self.max_streams:
            return self._refuse(f"too many streams: {len(unique)} > {self.max_streams}")
        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=2.0, max_msg_size=1 << 16)
        if not ws.can_prepare(request).ok:
            return web.json_response({"code": -1100, "msg": "WebSocket upgrade expected"}, status=400)
        await ws.prepare(request)
        self._conn_seq += 1
        self._conn_total += 1
        c = _Conn(self._conn_seq, ws, request, request.path, category, style == "stream",
                  self.max_incoming_per_s)
        self._conns.add(c)
        self._subscribe(c, unique)
        c.writer_task = asyncio.create_task(self._writer(c), name=f"binance-sim-writer-{c.id}")
        loop = self._loop
        if self.ping_interval > 0:
            c.ping_handle = loop.call_later(self.ping_interval, self._ping, c)
        if self.max_connection_age > 0:
            c.age_handle = loop.call_later(
                self.max_connection_age, self._close_later, c, CLOSE_GOING_AWAY, "connection age limit"
            )
        log.info("ws open id=%d path=%s streams=%d peer=%s", c.id, request.path_qs[:200], len(unique), c.peer)
        try:
            while True:
                msg = await ws.receive()
                t = msg.type
                if t is WSMsgType.TEXT:
                    if self._count_incoming(c):
                        self._on_text(c, msg.data)
                elif t is WSMsgType.PING:
                    if self._count_incoming(c):
                        await ws.pong(msg.data)
                elif t is WSMsgType.PONG:
                    c.last_pong = loop.time()
                    self._count_incoming(c)
                elif t is WSMsgType.BINARY:
                    if self._count_incoming(c):
                        self._client_error(c, error_message(3, "Invalid JSON: binary frames are not accepted"),
                                           "binary frame")
                else:
                    if t is WSMsgType.ERROR:  # protocol violation, oversized message...
                        self._client_errors += 1
                        c.close_reason = f"protocol error: {ws.exception()!r}"[:200]
                    break
        except ConnectionError:
            pass
        finally:
            self._teardown(c)
        return ws

    def _count_incoming(self, c: _Conn) -> bool:
        """Record one incoming message; close the connection beyond the rate limit."""
        if c.closing:
            return False
        now = self._loop.time()
        times = c.in_times
        if len(times) == times.maxlen and now - times[0] < 1.0:
            self._client_errors += 1
            log.warning("ws id=%d exceeded %d incoming messages/s; closing", c.id, self.max_incoming_per_s)
            self._close_later(c, CLOSE_POLICY, "Too many messages")
            return False
        times.append(now)
        return True

    def _client_error(self, c: _Conn, reply: bytes, what: str) -> None:
        self._client_errors += 1
        log.warning("ws id=%d bad client message: %s", c.id, what[:200])
        self._send_control(c, reply)

    def _send_control(self, c: _Conn, payload: bytes) -> None:
        if not c.closing:
            c.out.append(text_frame(payload))
            c.wake.set()

    def _on_text(self, c: _Conn, text: str) -> None:
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self._client_error(c, error_message(3, f"Invalid JSON: {exc}"), f"invalid JSON {text!r}")
            return
        if not isinstance(req, dict):
            self._client_error(c, error_message(2, "Invalid request: expected a JSON object"), repr(text))
            return
        rid = req.get("id")
        if isinstance(rid, bool) or not (isinstance(rid, int) and rid >= 0 or isinstance(rid, str)):
            self._client_error(
                c, error_message(2, "Invalid request: request ID must be an unsigned integer"), repr(text)
            )
            return
        method = req.get("method")
        if method not in _CONTROL_METHODS:
            self._client_error(
                c,
                error_message(
                    2,
                    f"Invalid request: unknown variant `{method}`, expected one of "
                    + ", ".join(f"`{m}`" for m in _CONTROL_METHODS),
                    rid,
                ),
                repr(text),
            )
            return
        params = req.get("params", [])
        if not isinstance(params, list):
            self._client_error(c, error_message(2, "Invalid request: params must be an array", rid), repr(text))
            return
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not all(isinstance(p, str) for p in params):
                self._client_error(c, error_message(2, "Invalid request: stream names must be strings", rid),
                                   repr(text))
                return
            try:
                parsed = list(dict.fromkeys(self._check_streams(params, c.category)))
            except StreamNameError as exc:
                self._client_error(c, error_message(2, f"Invalid request: {exc}", rid), repr(text))
                return
            if method == "SUBSCRIBE":
                total = len(set(c.streams) | {p.name for p in parsed})
                if total > self.max_streams:
                    self._client_error(
                        c, error_message(2, f"Invalid request: too many streams ({total} > {self.max_streams})",
                                         rid), "too many streams")
                    return
                self._subscribe(c, parsed)
            else:
                self._unsubscribe(c, parsed)
            self._send_control(c, result_message(None, rid))
        elif method == "LIST_SUBSCRIPTIONS":
            self._send_control(c, result_message(list(c.streams), rid))
        elif method == "SET_PROPERTY":
            if len(params) != 2 or params[0] != "combined":
                self._client_error(c, error_message(0, "Unknown property", rid), repr(text))
            elif not isinstance(params[1], bool):
                self._client_error(c, error_message(1, "Invalid value type: expected Boolean", rid), repr(text))
            else:
                c.combined = params[1]
                self._send_control(c, result_message(None, rid))
        else:  # GET_PROPERTY
            if params != ["combined"]:
                self._client_error(c, error_message(0, "Unknown property", rid), repr(text))
            else:
                self._send_control(c, result_message(c.combined, rid))

    def _subscribe(self, c: _Conn, names: Iterable[StreamName]) -> None:
        changed = False
        for sn in names:
            if sn.name in c.streams:
                continue
            slot = self._slot(sn.name)
            slot.conns.append(c)
            c.streams[sn.name] = slot
            changed = True
        if changed:
            if self._first_sub_at is None:
                self._first_sub_at = self._loop.time()
            self._targets = None
            self._notify_subs()

    def _unsubscribe(self, c: _Conn, names: Iterable[StreamName]) -> None:
        for sn in names:
            slot = c.streams.pop(sn.name, None)
            if slot is not None and c in slot.conns:
                slot.conns.remove(c)
        self._targets = None
        self._notify_subs()

    def _notify_subs(self) -> None:
        waiters, self._sub_waiters = self._sub_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait_subs(self, timeout: float | None = None) -> None:
        fut = self._loop.create_future()
        self._sub_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass

    def _detach(self, c: _Conn) -> None:
        """Stop all traffic to ``c`` (subscriptions, timers, writer)."""
        if c.closing:
            return
        c.closing = True
        for slot in c.streams.values():
            if c in slot.conns:
                slot.conns.remove(c)
        for h in (c.ping_handle, c.age_handle):
            if h is not None:
                h.cancel()
        if c.writer_task is not None:
            c.writer_task.cancel()
        c.out = []
        self._targets = None
        self._room.set()

    def _teardown(self, c: _Conn) -> None:
        self._detach(c)
        if c in self._conns:
            self._conns.discard(c)
            log.info(
                "ws close id=%d path=%s reason=%s frames=%d age=%.1fs",
                c.id, c.path, c.close_reason, c.frames_out, self._loop.time() - c.opened,
            )
            self._notify_subs()

    def _close_later(self, c: _Conn, code: int, reason: str) -> None:
        if not c.closing:
            c.close_reason = reason
            asyncio.ensure_future(self._close(c, code, reason))

    async def _close(self, c: _Conn, code: int, reason: str) -> None:
        """Close ``c`` with a close frame (``code``, ``reason``)."""
        self._detach(c)
        try:
            await asyncio.wait_for(c.ws.close(code=code, message=reason.encode()), 3.0)
        except Exception:
            if c.transport is not None:
                c.transport.abort()

    def _ping(self, c: _Conn) -> None:
        if c.closing:
            return
        now = self._loop.time()
        if now - c.last_pong > self.pong_timeout:
            log.warning("ws id=%d no pong for %.0fs; closing", c.id, now - c.last_pong)
            self._close_later(c, CLOSE_POLICY, "pong timeout")
            return
        if self._stall_all_until <= now:
            c.out.append(ping_frame(str(_now_ms()).encode()))
            c.wake.set()
        c.ping_handle = self._loop.call_later(self.ping_interval, self._ping, c)

    async def _writer(self, c: _Conn) -> None:
        """Move queued frames to the socket; wait while its buffer is full."""
        transport, drain, room = c.transport, c.drain, self._room
        try:
            while not c.closing:
                out = c.out
                if not out:
                    c.wake.clear()
                    await c.wake.wait()
                    continue
                c.out = []
                if transport is None or transport.is_closing():
                    break
                transport.write(b"".join(out))
                c.frames_out += len(out)
                await drain()
                room.set()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            room.set()

    def _backlogged(self) -> bool:
        for c in self._conns:
            if len(c.out) > _OUT_HIGH:
                return True
        return False

    async def _wait_room(self) -> None:
        room = self._room
        while self._backlogged():
            room.clear()
            await room.wait()

    # ------------------------------------------------------------------ delivery

    def _deliver(self, slot: _Slot, data: bytes, now: float, combined: bytes | None = None) -> None:
        """Hand one data object to every subscriber of ``slot`` (not queued if none)."""
        conns = slot.conns
        if not conns:
            slot.unsent += 1
            return
        if slot.stall_until > now or self._stall_all_until > now:
            slot.withheld += 1
            return
        comb = raw = None
        for c in conns:
            if c.combined:
                if comb is None:
                    body = combined if combined is not None else slot.cprefix + data + b"}"
                    comb = text_header(len(body)) + body
                c.out.append(comb)
            else:
                if raw is None:
                    raw = text_header(len(data)) + data
                c.out.append(raw)
            c.wake.set()
        slot.sent += len(conns)

    def _emit_kline_close(self, m: SymbolMarket, c: Candle, event_ms: int) -> None:
        slot = self._slots.get(f"{m.lower}@kline_1m")
        if slot is not None and slot.conns and self._serves(m, "kline_1m"):
            self._deliver(slot, m.kline_payload(c, event_ms, True), self._loop.time())

    def _serves(self, m: SymbolMarket, kind: str) -> bool:
        if m.source == "generated":
            return kind in self.gen_kinds
        if kind == "kline_1m":
            return not m.klines_recorded
        return True

    # ------------------------------------------------------------------ generator

    def _drop_tail(self, m: SymbolMarket) -> None:
        """The held last aggTrade of the faulted minute is not sent (see :meth:`fault_skip_last`)."""
        m.tail_held = None
        m.tail_from = None
        self._agg_skipped += 1
        log.warning("fault: last aggTrade of %s's minute not sent", m.symbol)

    def _gen_targets(self) -> list:
        targets = self._targets
        if targets is None:
            targets = []
            fixed = self.rate > 0
            for g in self._gen:
                if g.agg_kind is not None and (fixed or (g.agg_kind == _AGG_SENT and g.agg_slot.conns)):
                    targets.append((g, g.agg_kind))
                if g.book_slot is not None and (fixed or g.book_slot.conns):
                    targets.append((g, _BOOK))
            self._targets = targets
        return targets

    def _generate(self, targets: list, count: int) -> None:
        """Make ``count`` events round-robin over ``targets`` and deliver them."""
        nt = len(targets)
        if nt == 0:
            return
        rnd = self._rng.getrandbits
        clock = time.time
        now_loop = self._loop.time()
        deliver = self._deliver
        j = self._rr % nt
        steps = _STEPS
        for _ in range(count):
            g, kind = targets[j]
            j += 1
            if j == nt:
                j = 0
            bits = rnd(32)
            now = int(clock() * 1000)
            if kind != _BOOK:
                px = g.px + steps[bits & 15]
                if px < 1:
                    px = 1
                g.px = px
                q = ((bits >> 4) & 1023) + 1
                f = g.next_f
                last = f + ((bits >> 14) & 3)
                g.next_f = last + 1
                mkt = (bits >> 16) & 1
                a = g.next_a
                g.next_a = a + 1
                mk = g.m
                mk.history.append(px, q, f, last, now, mkt)
                closed = mk.add_trade(px, q, f, last, now, mkt)
                ps = fmt_scaled(px, g.ps)
                qs = fmt_scaled(q, g.qs)
                mk.last_price_text = ps
                mk.last_qty_text = qs
                if closed is not None:
                    self._emit_kline_close(mk, closed, now)
                if kind == _AGG_INTERNAL:
                    continue
                if mk.skip_left:
                    mk.skip_left -= 1
                    self._agg_skipped += 1
                    continue
                slot = g.agg_slot
                if not slot.conns:
                    slot.unsent += 1
                    continue
                data = (
                    f'{{"e":"aggTrade","E":{now},"a":{a},"s":"{g.S}","p":"{ps}","q":"{qs}",'
                    f'"f":{f},"l":{last},"T":{now},"m":{"true" if mkt else "false"}}}'
                ).encode()
                if mk.tail_from is not None and now >= mk.tail_from:
                    held = mk.tail_held
                    if closed is not None and held is not None:
                        self._drop_tail(mk)         # it was the last of the closed minute
                    else:
                        if held is not None:
                            deliver(slot, held, now_loop)
                        mk.tail_held = data
                        continue
            else:
                slot = g.book_slot
                if g.agg_kind is None:  # no trades move the price: walk it here
                    g.px = max(1, g.px + steps[(bits >> 28) & 15])
                u = g.u + 1 + (bits & 3)
                g.u = u
                mk = g.m
                mk.book_update_id = u
                if not slot.conns:
                    slot.unsent += 1
                    continue
                ps_, qs_ = g.ps, g.qs
                bid = fmt_scaled(g.px, ps_)
                ask = fmt_scaled(g.px + 1, ps_)
                bq = fmt_scaled(((bits >> 2) & 4095) + 1, qs_)
                aq = fmt_scaled(((bits >> 14) & 4095) + 1, qs_)
                mk.book = (bid, bq, ask, aq)
                data = (
                    f'{{"e":"bookTicker","u":{u},"s":"{g.S}","b":"{bid}","B":"{bq}",'
                    f'"a":"{ask}","A":"{aq}","T":{now},"E":{now}}}'
                ).encode()
            deliver(slot, data, now_loop)
        self._rr = j
        self._generated += count

    async def _fast_loop(self) -> None:
        """rate 0: generate for subscribed streams as fast as they are read."""
        while True:
            targets = self._gen_targets()
            if not targets:
                await self._wait_subs()
                continue
            self._generate(targets, _BATCH)
            await asyncio.sleep(0)
            await self._wait_room()

    async def _rate_loop(self) -> None:
        """rate > 0: ``rate`` events per second in total, on the loop clock."""
        loop = self._loop
        step = min(0.01, 1.0 / self.rate)
        t0 = loop.time()
        made = 0
        while True:
            await asyncio.sleep(step)
            due = int((loop.time() - t0) * self.rate) - made
            cap = max(1, int(self.rate))
            if due > cap:  # more than 1 s behind: do not catch up
                made += due - cap
                due = cap
            while due > 0:
                n = min(due, _BATCH)
                self._generate(self._gen_targets(), n)
                made += n
                due -= n
                if self._backlogged():
                    await self._wait_room()

    # ------------------------------------------------------------------ derived streams

    async def _derived_loop(self) -> None:
        """Every 250 ms: kline updates/closes, markPrice (1 s / 3 s), ticker (1 s)."""
        tick = 0
        while True:
            await asyncio.sleep(_TICK_S)
            tick += 1
            wall = _now_ms()
            now_loop = self._loop.time()
            for m in self._markets.values():
                if not m.active:
                    continue
                clock = wall if m.source == "generated" else self._replay_clock
                lower = m.lower
                if m.source == "generated" and m.candle is not None:
                    for closed in m.roll_candle(wall):
                        self._emit_kline_close(m, closed, wall)
                        if m.tail_held is not None:
                            self._drop_tail(m)
                slots = self._slots
                ks = slots.get(f"{lower}@kline_1m")
                if (ks is not None and ks.conns and m.candle is not None and m.candle.changed
                        and self._serves(m, "kline_1m")):
                    m.candle.changed = False
                    self._deliver(ks, m.kline_payload(m.candle, clock, False), now_loop)
                if tick % 4 == 0:
                    self._derived(m, "markPrice@1s", m.mark_price_payload, clock, now_loop)
                    self._derived(m, "ticker", m.ticker_payload, clock, now_loop)
                if tick % 12 == 0:
                    self._derived(m, "markPrice", m.mark_price_payload, clock, now_loop)
            if self.rate == 0 and self._gen:
                self._trickle()

    def _derived(self, m: SymbolMarket, kind: str, make: Callable[[int], bytes | None],
                 clock: int, now_loop: float) -> None:
        slot = self._slots.get(f"{m.lower}@{kind}")
        if slot is None or not slot.conns or not self._serves(m, kind):
            return
        data = make(clock)
        if data is not None:
            self._deliver(slot, data, now_loop)

    def _trickle(self) -> None:
        """rate 0: a few trades for symbols followed only through derived streams."""
        for g in self._gen:
            if g.agg_kind is None or (g.agg_kind == _AGG_SENT and g.agg_slot.conns):
                continue
            lower = g.m.lower
            if any(
                (s := self._slots.get(f"{lower}@{k}")) is not None and s.conns
                for k in _DERIVED_KINDS
            ):
                self._generate([(g, g.agg_kind)], 4)

    # ------------------------------------------------------------------ replay

    def _replay_ready(self, rec: Recording, since: float) -> bool:
        if self._replay_force:
            return True
        if all(self._slots[name].conns for name in rec.streams):
            return True
        if self._first_sub_at is None:
            return False
        return self._loop.time() >= max(self._first_sub_at, since) + self.replay_wait

    async def _replay_loop(self) -> None:
        loop = self._loop
        for rec in self._recordings:
            since = loop.time()
            while not self._replay_ready(rec, since):
                timeout = None
                if self._first_sub_at is not None:
                    timeout = max(0.01, max(self._first_sub_at, since) + self.replay_wait - loop.time())
                await self._wait_subs(timeout)
            self._replay_force = False
            self._replay_started = True
            syms = [self._markets[s] for s in sorted(rec.symbols)]
            for m in syms:
                m.active = True
            derived_klines = [m for m in syms if not m.klines_recorded]
            log.info("replay start %s frames=%d streams=%d speed=%s",
                     rec.path.name, rec.frame_count, len(rec.streams), self.speed)
            items = rec.items
            t_rec0 = items[0].ts
            t_wall0 = loop.time()
            next_close = None
            for i, it in enumerate(items):
                if self.speed > 0:
                    delay = t_wall0 + (it.ts - t_rec0) / self.speed - loop.time()
                    if delay > 0.0005:
                        await asyncio.sleep(delay)
                elif i % 64 == 63:
                    await asyncio.sleep(0)
                self._replay_item(it)
                # Candles built from replayed trades close once the replay
                # clock (latest recorded E) is _CLOSE_GRACE_MS past the
                # minute, so a trade stamped just before the boundary that
                # arrives after another stream's later event still counts.
                clock = self._replay_clock - _CLOSE_GRACE_MS
                if next_close is None and clock > 0:
                    next_close = clock - clock % 60_000 + 60_000
                if next_close is not None and clock >= next_close:
                    next_close = clock - clock % 60_000 + 60_000
                    for m in derived_klines:
                        for closed in m.roll_candle(clock):
                            self._emit_kline_close(m, closed, self._replay_clock)
                if self._backlogged():
                    await self._wait_room()
            for m in syms:
                m.active = False
            log.info("replay done %s", rec.path.name)
        self._replay_finished = True
        log.info("replay finished; connections stay open")

    def _replay_item(self, it: ReplayItem) -> None:
        if it.data is None:  # REST capture
            if it.rest_path.endswith("/depth") and it.symbol in self._markets:
                self._markets[it.symbol].depth_snapshot = it.body
            return
        data = it.data
        m = self._markets.get(it.symbol)
        ev = data.get("E") if isinstance(data, dict) else None
        if isinstance(ev, int) and ev > self._replay_clock:
            self._replay_clock = ev
        slot = self._slots[it.stream]
        self._replayed += 1
        if m is not None and isinstance(data, dict):
            e = data.get("e")
            try:
                if e == "aggTrade":
                    m.history.append(data)
                    m.last_price_text, m.last_qty_text = data["p"], data["q"]
                    p, q = m.scaled_price(data["p"]), m.scaled_qty(data["q"])
                    if m.klines_recorded:
                        m.last_price, m.last_trade_id = p, data["l"]
                        if m.first_trade_id is None:
                            m.first_trade_id = data["f"]
                    else:
                        closed = m.add_trade(p, q, data["f"], data["l"], data["T"], data["m"])
                        if closed is not None:
                            self._emit_kline_close(m, closed, data["E"])
                    if m.skip_left:
                        m.skip_left -= 1
                        self._agg_skipped += 1
                        return
                elif e == "kline":
                    m.apply_recorded_kline(data["k"])
                elif e == "bookTicker":
                    m.book = (data["b"], data["B"], data["a"], data["A"])
                    m.book_update_id = data["u"]
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("replay: frame of %s not understood (%s); sent as recorded", it.stream, exc)
        self._deliver(slot, it.data_raw, self._loop.time(), it.body)

    # ------------------------------------------------------------------ REST

    def _weight_window(self) -> None:
        minute = int(time.time() // 60)
        if minute != self._w_minute:
            self._w_minute = minute
            self._w_used = 0

    def _rest(self, handler, weight_of: Callable[[Any], int]):
        async def wrapped(request: web.Request) -> web.Response:
            self._rest_requests += 1
            self._weight_window()
            try:
                weight = weight_of(request.query)
            except BinanceAPIError as exc:
                return self._error_response(exc)
            if self._w_used + weight > self.weight_limit:
                self._rest_429 += 1
                retry = 60 - int(time.time()) % 60
                log.warning("rest 429 %s (weight %d/%d)", request.path, self._w_used, self.weight_limit)
                resp = web.json_response(
                    {"code": -1003, "msg": f"Too many requests; current limit of IP(127.0.0.1) is "
                                           f"{self.weight_limit} requests per minute. Please use the "
                                           "websocket for live updates to avoid polling the API."},
                    status=429,
                )
                resp.headers["Retry-After"] = str(retry)
                resp.headers["X-MBX-USED-WEIGHT-1M"] = str(self._w_used)
                return resp
            self._w_used += weight
            try:
                body = handler(request.query)
                resp = web.Response(body=orjson.dumps(body), content_type="application/json")
            except BinanceAPIError as exc:
                resp = self._error_response(exc)
            resp.headers["X-MBX-USED-WEIGHT-1M"] = str(self._w_used)
            return resp

        return wrapped

    def _error_response(self, exc: BinanceAPIError) -> web.Response:
        log.info("rest error %d %s", exc.code, exc.msg)
        resp = web.json_response({"code": exc.code, "msg": exc.msg}, status=exc.status)
        resp.headers["X-MBX-USED-WEIGHT-1M"] = str(self._w_used)
        return resp

    def _h_ping(self, q) -> dict:
        return {}

    def _h_time(self, q) -> dict:
        return {"serverTime": _now_ms()}

    def _symbol_param(self, q) -> SymbolMarket:
        sym = q.get("symbol")
        if not sym:
            raise BinanceAPIError(
                400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        m = self._markets.get(sym.upper()) if sym == sym.upper() else None
        if m is None:
            raise BinanceAPIError(400, -1121, "Invalid symbol.")
        return m

    def _h_agg_trades(self, q) -> list:
        m = self._symbol_param(q)
        limit = _int_param(q, "limit", 500)
        if not 1 <= limit <= 1000:
            raise BinanceAPIError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        from_id = _int_param(q, "fromId", None)
        start = _int_param(q, "startTime", None)
        end = _int_param(q, "endTime", None)
        if start is not None and end is not None:
            if end < start:
                raise BinanceAPIError(400, -1128, "Combination of optional parameters invalid.")
            if end - start > 3_600_000:
                raise BinanceAPIError(400, -1127, "More than 1 hours between startTime and endTime.")
        return m.history.query(from_id, start, end, limit)

    def _h_klines(self, q) -> list:
        m = self._symbol_param(q)
        interval = q.get("interval")
        if not interval:
            raise BinanceAPIError(
                400, -1102, "Mandatory parameter 'interval' was not sent, was empty/null, or malformed."
            )
        if interval not in KLINE_INTERVALS_MS:
            raise BinanceAPIError(400, -1120, "Invalid interval.")
        limit = _int_param(q, "limit", 500)
        if not 1 <= limit <= 1500:
            raise BinanceAPIError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        start = _int_param(q, "startTime", None)
        end = _int_param(q, "endTime", None)
        if start is not None and end is not None and end < start:
            raise BinanceAPIError(400, -1128, "Combination of optional parameters invalid.")
        return m.klines(interval, start, end, limit)

    def _h_ticker_price(self, q):
        """``/fapi/v1|v2/ticker/price``: ``{"symbol","price","time"}`` for one
        symbol, or a list for every symbol with a price."""
        now = _now_ms()
        gen = {g.S: g for g in self._gen}

        def one(m: SymbolMarket) -> dict | None:
            price = m.last_price_text
            if price is None and m.symbol in gen:
                price = fmt_scaled(gen[m.symbol].px, m.price_scale)
            return None if price is None else {"symbol": m.symbol, "price": price, "time": now}
        if q.get("symbol"):
            item = one(self._symbol_param(q))
            if item is None:
                raise BinanceAPIError(400, -1121, "Invalid symbol.")
            return item
        return [x for x in map(one, self._markets.values()) if x is not None]

    def _h_depth(self, q) -> dict:
        m = self._symbol_param(q)
        limit = _int_param(q, "limit", 500)
        if limit not in (5, 10, 20, 50, 100, 500, 1000):
            raise BinanceAPIError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        return m.depth(limit, _now_ms())

    def _h_exchange_info(self, q) -> dict:
        now = _now_ms()
        symbols = [
            _symbol_info(m.symbol, "PERPETUAL", "TRADING", m.price_scale, m.qty_scale,
                         4133404800000, m.onboard_ms or 1569398400000)
            for m in self._markets.values()
        ]
        cq, nq = _quarter_expiries(now)
        for name, ctype, status, delivery in (
            (f"XYZUSDT_{_yymmdd(cq)}", "CURRENT_QUARTER", "TRADING", cq),
            (f"XYZUSDT_{_yymmdd(nq)}", "NEXT_QUARTER", "TRADING", nq),
            ("XYZUSDT", "PERPETUAL", "SETTLING", 4133404800000),
        ):
            if name not in self._markets:
                symbols.append(_symbol_info(name, ctype, status, 1, 3, delivery, 1569398400000))
        return {
            "timezone": "UTC",
            "serverTime": now,
            "futuresType": "U_MARGINED",
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                 "limit": self.weight_limit},
                {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300},
            ],
            "exchangeFilters": [],
            "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
            "symbols": symbols,
        }

    # ------------------------------------------------------------------ control API

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _h_replay_start(self, request: web.Request) -> web.Response:
        self.start_replay()
        return web.json_response({"ok": True})

    async def _h_fault(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        q = request.query
        try:
            if name == "drop":
                result = {"dropped": self.fault_drop(q.get("path") or None)}
            elif name == "stall":
                stream = q.get("stream")
                if not stream:
                    raise ValueError("parameter 'stream' is required")
                result = {"stream": self.fault_stall(stream, _float_arg(q, "seconds"))}
            elif name == "stall_all":
                self.fault_stall_all(_float_arg(q, "seconds"))
                result = {}
            elif name == "skip_last":
                symbol = q.get("symbol")
                if not symbol:
                    raise ValueError("parameter 'symbol' is required")
                result = {"minute": self.fault_skip_last(symbol)}
            elif name == "malformed":
                result = {"sent": self.fault_malformed(int(q.get("count", "1")))}
            elif name == "skip":
                symbol = q.get("symbol")
                if not symbol:
                    raise ValueError("parameter 'symbol' is required")
                self.fault_skip(symbol, int(q.get("count", "1")))
                result = {}
            else:
                return web.json_response({"ok": False, "error": f"unknown fault {name!r}"}, status=404)
        except ValueError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        return web.json_response({"ok": True, **result})


# ---------------------------------------------------------------------- helpers


def _malformed_data(stream: str, variant: int) -> bytes:
    """Payload of one malformed frame for ``stream`` (variant 0, 1 or 2)."""
    symbol, _, kind = stream.partition("@")
    e = _EVENT_TYPES.get(kind, kind)
    sym = symbol.upper()
    now = _now_ms()
    if variant == 0:  # invalid JSON (truncated object)
        return f'{{"e":"{e}","E":{now},"s":"{sym}","p":"1.0'.encode()
    if variant == 1:  # required keys missing
        return orjson.dumps({"e": e, "E": now})
    # wrong types: numbers where Binance sends strings and the reverse
    return orjson.dumps({"e": e, "E": str(now), "a": "not-an-id", "s": sym, "p": 1.5, "q": 2,
                         "f": "x", "l": None, "T": "later", "m": "yes",
                         "b": 1.5, "B": 2, "u": "x"})


def _int_param(q, name: str, default):
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    if not raw.lstrip("-").isdigit() or len(raw) > 20:
        raise BinanceAPIError(
            400, -1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'."
        )
    return int(raw)


def _float_arg(q, name: str) -> float:
    raw = q.get(name)
    if raw is None:
        raise ValueError(f"parameter {name!r} is required")
    return float(raw)


def _klines_weight(q) -> int:
    """Binance: limit [1,100) -> 1, [100,500) -> 2, [500,1000] -> 5, > 1000 -> 10."""
    limit = _int_param(q, "limit", 500)
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


def _depth_weight(q) -> int:
    """Binance: limit 5/10/20/50 -> 2, 100 -> 5, 500 -> 10, 1000 -> 20."""
    limit = _int_param(q, "limit", 500)
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


def _quarter_expiries(now_ms: int) -> tuple[int, int]:
    """Delivery times (08:00 UTC, last Friday of Mar/Jun/Sep/Dec) after ``now_ms``."""
    d = _dt.datetime.fromtimestamp(now_ms / 1000, tz=_dt.timezone.utc)
    out = []
    year, month = d.year, d.month
    while len(out) < 2:
        qm = ((month - 1) // 3 + 1) * 3
        last_day = calendar.monthrange(year, qm)[1]
        day = _dt.datetime(year, qm, last_day, 8, tzinfo=_dt.timezone.utc)
        day -= _dt.timedelta(days=(day.weekday() - 4) % 7)
        ms = int(day.timestamp() * 1000)
        if ms > now_ms and (not out or ms > out[-1]):
            out.append(ms)
        month = qm + 1
        if month > 12:
            month, year = 1, year + 1
    return out[0], out[1]


def _yymmdd(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).strftime("%y%m%d")


def _symbol_info(symbol: str, contract_type: str, status: str, ps: int, qs: int,
                 delivery: int, onboard: int) -> dict:
    """One exchangeInfo ``symbols`` entry (USD-M layout)."""
    pair = symbol.split("_")[0]
    base = pair[:-4] if pair.endswith("USDT") else pair
    tick = fmt_scaled(1, ps)
    step = fmt_scaled(1, qs)
    return {
        "symbol": symbol, "pair": pair, "contractType": contract_type,
        "deliveryDate": delivery, "onboardDate": onboard, "status": status,
        "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000",
        "baseAsset": base, "quoteAsset": "USDT", "marginAsset": "USDT",
        "pricePrecision": ps, "quantityPrecision": qs,
        "baseAssetPrecision": 8, "quotePrecision": 8,
        "underlyingType": "COIN", "underlyingSubType": [], "settlePlan": 0,
        "triggerProtect": "0.0500", "liquidationFee": "0.012500", "marketTakeBound": "0.05",
        "maxMoveOrderLimit": 10000,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000", "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": step, "maxQty": "1000000", "stepSize": step},
            {"filterType": "MARKET_LOT_SIZE", "minQty": step, "maxQty": "100000", "stepSize": step},
            {"filterType": "MAX_NUM_ORDERS", "limit": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
            {"filterType": "MIN_NOTIONAL", "notional": "5"},
            {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
             "multiplierDecimal": "4"},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT",
                       "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
    }


# ---------------------------------------------------------------------- running


class SimulatorThread:
    """Run a :class:`BinanceSimulator` in a background thread with its own loop.

    ``with SimulatorThread(**options) as sim:`` starts it on 127.0.0.1 and an
    ephemeral port (unless ``host``/``port`` are given) and yields this
    object: ``sim.http_url`` (``http://127.0.0.1:<port>``), ``sim.fapi_url``
    (``.../fapi``, for ``AsyncClient.FUTURES_URL``), ``sim.ws_url``
    (``ws://127.0.0.1:<port>/``, for ``BinanceSocketManager.FSTREAM_URL``),
    ``sim.urls`` (``(http_url, ws_url)``), ``sim.sim`` (the simulator).
    :meth:`call` runs a function or coroutine function inside the
    simulator's loop and returns its result; :meth:`stats` is a shortcut.
    Raises ``RuntimeError`` if the simulator fails to start within 15 s.
    """

    def __init__(self, **options):
        self._options = options
        self.sim: BinanceSimulator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> "SimulatorThread":
        self._thread = threading.Thread(target=self._run, name="binance-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("binance simulator did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"binance simulator failed to start: {self._error!r}") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            self.sim = BinanceSimulator(**self._options)
            loop.run_until_complete(self.sim.start())
        except BaseException as exc:  # reported to __enter__
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.sim.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __exit__(self, *exc) -> None:
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(15)

    @property
    def port(self) -> int:
        """The listening port."""
        assert self.sim is not None and self.sim.port is not None
        return self.sim.port

    @property
    def http_url(self) -> str:
        return f"http://{self.sim.host}:{self.port}"

    @property
    def fapi_url(self) -> str:
        return f"{self.http_url}/fapi"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.sim.host}:{self.port}/"

    @property
    def urls(self) -> tuple[str, str]:
        return self.http_url, self.ws_url

    def call(self, fn: Callable, *args, timeout: float = 10.0, **kwargs):
        """Run ``fn(*args, **kwargs)`` in the simulator's loop; return its result.

        ``fn`` may be a plain or a coroutine function; exceptions propagate.
        """

        async def runner():
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def stats(self) -> dict:
        """:meth:`BinanceSimulator.stats`, read inside the simulator's loop."""
        return self.call(self.sim.stats)


async def serve(stats_interval: float = 60.0, notify: bool = True, **options) -> None:
    """Run a simulator until SIGTERM/SIGINT or cancellation (for the command line).

    Logs a stats line every ``stats_interval`` seconds (0: never) and sends
    ``READY=1`` to systemd (when ``notify`` and sdnotify is available) once
    listening. ``options`` are :class:`BinanceSimulator` parameters.
    """
    sim = BinanceSimulator(**options)
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if notify:
        try:
            import sdnotify

            sdnotify.SystemdNotifier().notify(f"READY=1\nSTATUS=listening on port {sim.port}")
        except ImportError:
            pass
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), stats_interval if stats_interval > 0 else None)
            except asyncio.TimeoutError:
                s = sim.stats()
                log.info(
                    "stats sent=%d unsent=%d withheld=%d conns=%d/%d malformed=%d skipped=%d "
                    "generated=%d replayed=%d replay_finished=%s rest=%d weight=%d 429=%d",
                    s["sent_total"], s["unsent_total"], s["withheld_total"], s["connections_open"],
                    s["connections_total"], s["malformed_sent"], s["agg_ids_skipped"],
                    s["generated_events"], s["replayed_frames"], s["replay_finished"],
                    s["rest_requests"], s["rest_weight_used"], s["rest_429"],
                )
    finally:
        await sim.stop()
