"""The Kite collector: kiteconnect's KiteTicker connections -> sink.

One ``KiteTicker`` (kiteconnect 5.2.2, pinned) per planned connection (at
most 3 per API key, 3000 instruments each; see
:func:`feeds.kite.instruments.plan_connections`).  KiteTicker runs on
Twisted: the reactor runs in its own thread (as KiteTicker's ``threaded``
mode does) and every callback runs there; the asyncio loop of the main
thread watches silence, failures and the end of the session, while the
runtime (:mod:`feeds.service`) reports health, status and heartbeats.
Twisted's reactor cannot be restarted, so one process runs one collection.

Per connection, on the first connect every instrument is subscribed and put
in its mode; on later connects KiteTicker resubscribes by itself.  Each
binary message is decoded (:class:`~feeds.kite.adapter.FrameDecoder`, or
KiteTicker's own parser with ``decoder = "kiteticker"``) and its rows go to
``kite_tick_full`` / ``kite_tick_quote`` / ``kite_tick_ltp`` through the
shared sink.  A call into the sink may block (back-pressure): the reactor
thread then stops reading and TCP slows Kite down; nothing is dropped.

Silence: KiteTicker's ping loop never sends a ping, so a connection that
goes quiet without closing is never noticed by the library.  Kite sends a
1-byte heartbeat every second or so when there is no data; a connection
with no message at all (data, heartbeat or text) for ``silence_timeout``
seconds is aborted here, and KiteTicker's reconnecting factory opens a new
one (and resubscribes).

Candles (optional, :mod:`feeds.kite.candles`): every decoded frame's rows
are also folded into the candle builder; an asyncio task closes candles by
the wall clock (``candles.grace`` seconds after each one's end, whether or
not another tick comes) and writes them through the same sink into
``kite_candle``; at the stop the candles already due are written final and
the open ones with ``final`` false.  After a start inside a session, a
second task waits until the minute the process started in is over and runs
the history fill (:mod:`feeds.kite.history`) in a thread.

Every use of KiteTicker beyond its documented callbacks and methods (the
current socket, the connection factory, ``connect()`` on a running reactor)
goes through :mod:`feeds.kite.wire`.

Venue document: Kite Connect v3 "WebSocket streaming".
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..config import EX_NOPERM
from ..health import Health, StreamHealth
from ..sink import Sink
from ..timetext import time_text
from . import adapter as A
from . import wire as W
from .instruments import Subscription

if TYPE_CHECKING:
    from .candles import KiteCandles

log = logging.getLogger(__name__)
UTC = timezone.utc

RC_OK, RC_FAILED, RC_TOKEN = 0, 1, EX_NOPERM
_HTTP_STATUS = re.compile(r"\((\d{3})\s*-")


@dataclass
class Settings:
    """Collector settings (see ``etc/kite.toml`` for each; times in seconds).
    ``watchdog_interval``: the longest pause between checks for silence."""
    api_key: str = ""
    ticker_url: str = "wss://ws.kite.trade"
    decoder: str = "native"
    silence_timeout: float = 10.0
    watchdog_interval: float = 2.0
    reconnect_max_delay: int = 30
    reconnect_max_tries: int = 300
    connect_timeout: int = 30
    connect_stagger: float = 0.2


@dataclass
class _Connection:
    index: int
    subs: list[Subscription]
    stream: StreamHealth
    ticker: object = None
    open: bool = False
    subscribed: bool = False
    generation: int = 0
    last: float = 0.0
    heartbeats: int = 0
    silences: int = 0
    closes: int = 0
    last_close: str = ""
    by_mode: dict[str, list[int]] = field(default_factory=dict)


def _reactor():
    from twisted.internet import reactor
    return reactor


def _route_twisted_logs() -> None:
    """Send Twisted's own log events to Python logging (logger ``twisted``,
    warnings and up unless debugging).  kiteconnect's ticker logs every close
    as an error, clean ones included; the collector logs connection events
    itself, so that logger is kept for debugging."""
    from twisted.python import log as tlog
    if not getattr(_route_twisted_logs, "done", False):
        tlog.PythonLoggingObserver(loggerName="twisted").start()
        _route_twisted_logs.done = True
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("twisted").setLevel(logging.WARNING)
        logging.getLogger("kiteconnect").setLevel(logging.CRITICAL)


class KiteCollector:
    """Collect ticks for ``plan`` (a list of connections, each a list of
    :class:`Subscription`) with access token ``access_token`` into ``sink``.

    ``await run(stop)`` connects, collects until ``stop`` is set or the
    aware datetime ``until`` passes, closes the connections and returns an
    exit status: 0 (stopped or session over), 77 (Kite refused the access
    token: it expired or was revoked), 1 (a connection gave up
    reconnecting, or the sink failed).  The caller closes the sink.
    Call ``run`` once per process (Twisted's reactor cannot restart).
    A collector of :mod:`feeds.service` (``stream_kind``, ``figures``,
    ``periodic``).
    """

    def __init__(self, settings: Settings, access_token: str, plan: list[list[Subscription]], sink: Sink,
                 health: Health, until: datetime | None = None, candles: KiteCandles | None = None,
                 history: tuple[int, Callable[[threading.Event], object]] | None = None):
        if settings.decoder not in ("native", "kiteticker"):
            raise ValueError("decoder must be 'native' or 'kiteticker'")
        self.s = settings
        self.access_token = access_token
        self.sink = sink
        self.health = health
        self.until = until
        # packets of an unknown length or out of range: counted once each, in the health counter
        self.decoder = A.FrameDecoder(on_bad=lambda r: self.health.count_malformed("kite frame", r))
        self.conns: list[_Connection] = []
        for i, subs in enumerate(plan, 1):
            c = _Connection(i, subs, health.stream(f"connection {i}"))
            for sub in subs:
                c.by_mode.setdefault(sub.mode, []).append(sub.instrument_token)
            self.conns.append(c)
        used = {sub.mode for subs in plan for sub in subs}
        self.mode_streams = {m: health.stream(m) if m in used else StreamHealth() for m in A.MODES}
        self.text_messages = 0
        self.failure: str | None = None
        self.failure_rc = RC_FAILED
        self._store_since = 0.0
        self._thread: threading.Thread | None = None
        self._texts_logged = 0
        self.candles = candles
        self.history = history
        self._candle_errors = 0
        self._history_thread: asyncio.Future | None = None

    # ------------------------------------------------------------ reactor thread: callbacks
    def _store(self, rows: tuple[list, list, list]) -> None:
        self._store_since = time.monotonic()
        try:
            for mode, batch in zip(A.MODES, rows):
                if batch:
                    self.sink.add_many(A.TABLE_OF[mode], batch)
                    self.mode_streams[mode].seen(len(batch))
        except RuntimeError as e:          # the sink is closed or its writer died
            if self.failure is None:
                self.failure = f"sink refused rows: {e}"
        finally:
            self._store_since = 0.0

    def _on_message(self, c: _Connection, payload: bytes, is_binary: bool) -> None:
        c.last = time.monotonic()
        c.stream.seen()
        if not is_binary:
            self.text_messages += 1
            if self._texts_logged < 100:
                self._texts_logged += 1
                text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
                log.info("connection %d: text message from Kite: %.300s", c.index, text)
            return
        if len(payload) < 2:
            c.heartbeats += 1
            return
        if self.s.decoder != "native":
            return                          # decoded by KiteTicker, see _on_ticks
        recv_ns = time.time_ns()
        recv = time_text(recv_ns)
        dec = self.decoder
        try:
            rows = dec.decode(payload, recv)
        except A.Malformed as e:
            rows = dec.partial
            self.health.count_malformed(f"connection {c.index}",
                                        f"frame cut short ({e}); its {sum(map(len, rows))} complete packet(s) kept")
        self._store(rows)
        if self.candles is not None:
            self._candle_ticks(rows, recv_ns)

    def _candle_ticks(self, rows: tuple[list, list, list], recv_ns: int) -> None:
        try:
            self.candles.ticks(rows, recv_ns)
        except Exception:                   # a candle bug must not stop the ticks being stored
            self._candle_errors += 1
            if self._candle_errors <= 3:
                log.exception("candles: ticks not folded into candles")

    def _on_ticks(self, c: _Connection, ticks: list) -> None:
        recv_ns = time.time_ns()
        try:
            rows = A.rows_from_ticks(ticks, time_text(recv_ns),
                                     on_bad=lambda r: self.health.count_malformed(f"connection {c.index}", r))
        except (KeyError, TypeError, ValueError) as e:      # not KiteTicker ticks at all
            self.health.count_malformed(f"connection {c.index}", f"ticks not understood ({e!r}); skipped")
            return
        self._store(rows)
        if self.candles is not None:
            self._candle_ticks(rows, recv_ns)

    def _on_connect(self, c: _Connection, ws, response) -> None:
        c.open = True
        c.generation += 1
        c.last = time.monotonic()
        if not c.subscribed:
            tokens = [s.instrument_token for s in c.subs]
            ws.subscribe(tokens)
            for mode, toks in c.by_mode.items():
                ws.set_mode(mode, toks)
            c.subscribed = True
        log.info("connection %d open (generation %d): %d instruments (%s)", c.index, c.generation, len(c.subs),
                 ", ".join(f"{m} {len(t)}" for m, t in sorted(c.by_mode.items())))

    def _on_close(self, c: _Connection, ws, code, reason) -> None:
        c.open = False
        c.closes += 1
        c.last_close = f"{code} {reason}"
        log.info("connection %d closed (%s %s)", c.index, code, reason)

    def _on_error(self, c: _Connection, ws, code, reason) -> None:
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        m = _HTTP_STATUS.search(text)
        status = m.group(1) if m else ""
        if status == "403":
            if self.failure is None:
                self.failure = ("Kite refused the access token on the ticker (HTTP 403): it has expired or was "
                                "revoked; renew it with feed-kite-token, then start feed-zerodha again")
                self.failure_rc = RC_TOKEN
            log.error("connection %d: ticker refused the access token (HTTP 403)", c.index)
        elif status == "429":
            log.error("connection %d: Kite refused the connection (HTTP 429): too many connections for this "
                      "api_key (another collector using it?); KiteTicker retries", c.index)
        else:
            log.warning("connection %d: error %s %s", c.index, code, text[:300])

    def _on_reconnect(self, c: _Connection, ws, attempts) -> None:
        log.info("connection %d: reconnecting (attempt %d)", c.index, attempts)

    def _on_noreconnect(self, c: _Connection, ws) -> None:
        if self.failure is None:
            self.failure = f"connection {c.index} gave up after {self.s.reconnect_max_tries} reconnection attempts"
        log.error("connection %d: KiteTicker gave up reconnecting", c.index)

    def _make_ticker(self, c: _Connection):
        from kiteconnect import KiteTicker
        kt = KiteTicker(self.s.api_key, self.access_token, root=self.s.ticker_url,
                        reconnect_max_tries=self.s.reconnect_max_tries,
                        reconnect_max_delay=self.s.reconnect_max_delay,
                        connect_timeout=self.s.connect_timeout)

        def guard(fn):
            def call(*a):
                try:
                    fn(c, *a)
                except Exception:           # never let a callback error reach autobahn
                    log.exception("connection %d: callback %s failed", c.index, fn.__name__)
            return call
        kt.on_connect = guard(self._on_connect)
        kt.on_close = guard(self._on_close)
        kt.on_error = guard(self._on_error)
        kt.on_reconnect = guard(self._on_reconnect)
        kt.on_noreconnect = guard(self._on_noreconnect)
        kt.on_message = guard(lambda c_, ws, payload, is_binary: self._on_message(c_, payload, is_binary))
        if self.s.decoder == "kiteticker":
            kt.on_ticks = guard(lambda c_, ws, ticks: self._on_ticks(c_, ticks))
        return kt

    @staticmethod
    def _drop(c: _Connection) -> None:
        W.abort_connection(c.ticker)

    # ------------------------------------------------------------ main thread
    def _start_reactor(self) -> None:
        reactor = _reactor()
        _route_twisted_logs()
        if reactor.running:
            return
        self._thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                        name="kite-ticker", daemon=True)
        self._thread.start()

    def check_silence(self) -> list[int]:
        """Abort connections silent beyond ``silence_timeout``; returns their indexes."""
        now = time.monotonic()
        if self._store_since and now - self._store_since > 0.5:
            return []                        # the sink is pushing back: reading paused on purpose
        out = []
        for c in self.conns:
            if c.open and now - c.last > self.s.silence_timeout:
                c.silences += 1
                log.warning("connection %d silent for %.1f s (no data, no heartbeat): dropping it to reconnect",
                            c.index, now - c.last)
                c.last = now
                _reactor().callFromThread(self._drop, c)
                out.append(c.index)
        return out

    # ------------------------------------------------------------ the runtime's interface
    def stream_kind(self, stream: str) -> str:
        """``frames`` for a connection's messages, else the mode (full, quote, ltp)."""
        return "frames" if stream.startswith("connection") else stream

    def figures(self) -> dict[str, int]:
        """Connections (planned and open), reconnects, silence drops,
        instruments and Kite's text messages; with candles, the candle rows
        written (from history too) and the late ticks revised / dropped."""
        out = {"connections": len(self.conns), "open": sum(c.open for c in self.conns),
               "reconnects": sum(max(0, c.generation - 1) for c in self.conns),
               "silent": sum(c.silences for c in self.conns),
               "instruments": sum(len(c.subs) for c in self.conns), "text messages": self.text_messages}
        if self.candles is not None:
            out.update(self.candles.figures())
        return out

    def periodic(self) -> None:
        """Nothing beyond the checks of :meth:`run`."""

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    async def run(self, stop: asyncio.Event) -> int:
        """Connect, collect until ``stop`` is set or ``until`` passes, close
        the connections; returns 0, 77 or 1 (see the class)."""
        reactor = _reactor()
        self._start_reactor()
        until = self.until
        log.info("connecting %d connection(s) to %s for %d instruments", len(self.conns), self.s.ticker_url,
                 sum(len(c.subs) for c in self.conns))
        for c in self.conns:
            c.ticker = self._make_ticker(c)
            c.last = time.monotonic()
            reactor.callFromThread(W.connect_in_reactor, c.ticker)
            await self._sleep(stop, self.s.connect_stagger)
        rc = RC_OK
        check = min(self.s.watchdog_interval, max(0.1, self.s.silence_timeout / 4))
        tasks = []
        stop_threads = threading.Event()
        if self.candles is not None:
            tasks.append(asyncio.ensure_future(self._candle_timer(stop)))
            if self.history is not None:
                tasks.append(asyncio.ensure_future(self._history(stop, stop_threads)))
        try:
            while not stop.is_set():
                if until is not None and datetime.now(UTC) >= until:
                    log.info("session over (stop time %s reached)", until.isoformat(timespec="seconds"))
                    break
                if self.failure is not None:
                    log.error("%s", self.failure)
                    rc = self.failure_rc
                    break
                if self.sink.fatal:
                    log.error("sink writer failed: %r", self.sink.fatal)
                    rc = RC_FAILED
                    break
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None and self.failure is None:
                        self.failure = f"candles failed: {t.exception()!r}"
                if self.candles is not None and self.candles.sink_failure and self.failure is None:
                    self.failure = self.candles.sink_failure
                self.check_silence()
                wait = check
                if until is not None:
                    wait = min(wait, (until - datetime.now(UTC)).total_seconds())
                await self._sleep(stop, wait)
        finally:
            stop_threads.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._history_thread is not None:        # a request under way: let it end (stop is set)
                await asyncio.wait([self._history_thread], timeout=30.0)
            await self._shutdown()
            if self.candles is not None:
                self._close_candles()
        return rc

    # ------------------------------------------------------------ candles
    async def _candle_timer(self, stop: asyncio.Event) -> None:
        """Close candles by the wall clock: each one ``grace`` seconds after its end."""
        cd = self.candles
        while not stop.is_set():
            now = time.time_ns()
            due = cd.next_due_ns()
            if due is not None and due <= now:
                await asyncio.to_thread(cd.close_due, now)      # the sink may block (back-pressure)
                continue
            wait = 0.25 if due is None else min(0.25, (due - now) / 1e9)
            await self._sleep(stop, wait)

    async def _history(self, stop: asyncio.Event, stop_threads: threading.Event) -> None:
        """Once the minute the process started in is over, fill the missed
        minutes from Kite's historical candles (in a thread: blocking HTTP)."""
        when_ns, job = self.history
        await self._sleep(stop, (when_ns - time.time_ns()) / 1e9)
        if stop.is_set():
            return
        self._history_thread = asyncio.ensure_future(asyncio.to_thread(job, stop_threads))
        await asyncio.shield(self._history_thread)

    def _close_candles(self) -> None:
        """At the stop: the candles already due (final), then every open one (final false)."""
        cd = self.candles
        try:
            n = cd.close_due() + cd.close_all()
        except Exception:
            log.exception("candles: open candles not written at the stop")
            return
        log.info("candles: %d written at the stop (open ones not final)", n)

    async def _shutdown(self) -> None:
        reactor = _reactor()
        if not reactor.running:
            return
        for c in self.conns:
            if c.ticker is not None and W.connection_started(c.ticker):
                reactor.callFromThread(c.ticker.close, 1000, "collector stopping")
        deadline = time.monotonic() + 3.0
        while any(c.open for c in self.conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        reactor.callFromThread(reactor.stop)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        log.info("connections closed (%d message(s), %d heartbeat(s), %d silence drop(s))",
                 sum(c.stream.count for c in self.conns), sum(c.heartbeats for c in self.conns),
                 sum(c.silences for c in self.conns))
