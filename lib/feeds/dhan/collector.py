"""The Dhan collector: Dhan's v2 live market feed connections -> sink.

One asyncio task per planned connection (:mod:`feeds.dhan.connections`: at
most 5 per user, 5,000 instruments each), each holding a WebSocket of
picows's client (``picows.ws_connect``) to
``<dhan.feed_url>?version=2&token=..&clientId=..&authType=2``.  picows
rather than aiohttp or ``websockets``: its compiled frame parser calls the
listener (:class:`_Listener`) with each frame straight from the socket's
``data_received``, without a queue, a future or a message object per frame:
about 0.7 us of CPU per 162-byte message on loopback, where aiohttp's
``ws_connect`` reader takes about 2.7 us and ``websockets`` 17 about 6.5 us.
A message split into frames is put together again before it is handled.
On every (re)connect the connection's instruments are subscribed again, per
mode, in JSON messages of at most 100 instruments
(:func:`feeds.dhan.wire.subscribe_messages`).  The official client
``dhanhq`` is not used for the feed: its feed class runs an event loop of
its own and reads only the first packet of a message.

The hot path, called by the listener with the binary messages of one
socket read together (at most :data:`MAX_BATCH_MESSAGES` at a time,
:meth:`DhanCollector.batch_handler`), top to bottom: the receive time of
each message (strictly increasing microseconds per connection, so that
``(instrument, recv_time, seq)`` is unique),
:func:`feeds.dhan.wire.decode_many` (malformed packets are counted in the
health counter and logged, never fatal), the rows
(:class:`feeds.dhan.adapter.RowMaker`, gathered and handed to the sink every
``flush_interval`` or ``batch_rows`` rows), the candles.  Handling the
messages of a read together rather than one by one saves a third of the
CPU per packet (bench/dhan_collector.py).
A call into the sink may block (back-pressure): the event loop then stops
reading every socket and TCP slows Dhan down; nothing is dropped.  An
exception out of the handler closes that connection and ends its task with
the exception.

Keeping the connection alive ("Live Market Feed", "Keeping Connection
Alive"): Dhan's server sends a WebSocket ping every 10 s and closes a
connection that has not answered for 40 s; each ping is answered here with
a pong at once (picows's ``enable_auto_pong`` off, so that pings are seen and
counted).  The client sends no pings of its own.  Every message received
(data, text, ping) stamps the connection; one that stays silent for
``silence_timeout`` seconds is closed here and opened again (the socket may
be dead without a close: a NAT timeout, a stalled server).  Dhan's pings
also count as the connection's sign of life for the watchdog, so that the
minutes before the open, when no packet flows, do not stop it.

Feed Disconnect packets (code 50) are written to ``dhan_disconnect`` with
their code, meaning and the action taken (:func:`feeds.dhan.wire.disconnect_action`):

* ``exit``: the access token expired (807) or was refused (808, 809, 810),
  or the account lacks the data APIs (806): one clear line, the collector
  stops with exit status 77 (the unit does not restart it);
* ``backoff``: 805 (the user opened more connections than Dhan allows: Dhan
  closes the oldest one), 804, 814: one line, then a long wait before
  reconnecting (``reconnect_max_delay``, doubled at each repeat up to
  :data:`BACKOFF_MAX`), so that this collector and the other program of the
  same client id do not keep closing each other's connections;
* ``reconnect``: anything else, reconnecting with the usual backoff.

Candles (optional): every decoded record with a price is folded into
:class:`feeds.dhan.candles.DhanCandles` (the shared :class:`feeds.candles.CandleBuilder`, the
approach of :mod:`feeds.kite.candles`); a task closes candles by the wall
clock and writes them through the same sink into ``dhan_candle``; at the
stop the candles already due are written final, the open ones with
``final`` false.

Venue documents: DhanHQ v2 "Live Market Feed", "Annexure".
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import picows
from picows import WSMsgType

from ..config import EX_NOPERM, first_line as _first_line
from ..health import Health, StreamHealth
from ..sink import Sink
from . import adapter as A
from . import wire
from .candles import DhanCandles
from .connections import Subscription, subscribe_messages

log = logging.getLogger(__name__)
UTC = timezone.utc
NS = 1_000_000_000

RC_OK, RC_FAILED, RC_TOKEN = 0, 1, EX_NOPERM
#: the longest wait after repeated "too many connections" disconnects (s)
BACKOFF_MAX = 600.0
#: a connection that delivered data for this long resets the reconnect backoff (s)
STABLE_AFTER = 30.0
#: the largest message taken from the feed (bytes); Dhan's are under 200, a longer one closes the connection
MAX_MESSAGE_BYTES = 1 << 20
#: the most binary messages of one socket read handed to the handler at once (a read of a
#: backlog can hold many thousands: the records of a batch are in memory together)
MAX_BATCH_MESSAGES = 256


@dataclass
class Settings:
    """Collector settings (see ``etc/dhan.toml``; times in seconds).

    ``feed_url``: the feed's base URL; ``client_id``: dhanClientId;
    ``silence_timeout``: a connection without any bytes for this long is
    aborted and reopened; ``reconnect_max_delay``: the longest ordinary wait
    between reconnects, and the first wait after an 805; ``flush_interval``
    / ``batch_rows``: rows are handed to the sink at least this often / in
    batches of at most this many; ``watchdog_interval``: the longest pause
    between checks; ``connect_timeout``: the WebSocket handshake's limit;
    ``connect_stagger``: the pause between opening two connections."""
    feed_url: str = "wss://api-feed.dhan.co"
    client_id: str = ""
    silence_timeout: float = 30.0
    reconnect_max_delay: float = 30.0
    flush_interval: float = 0.05
    batch_rows: int = 2000
    watchdog_interval: float = 2.0
    connect_timeout: float = 30.0
    connect_stagger: float = 0.2


@dataclass
class _Connection:
    index: int
    subs: list[Subscription]
    stream: StreamHealth
    ws: picows.WSTransport | None = None
    open: bool = False
    last: float = 0.0                       # time.monotonic() of the last message of any kind
    generation: int = 0
    opened_at: float = 0.0
    last_us: int = 0
    sec: int = -1
    prefix: str = ""
    silences: int = 0
    closes: int = 0
    pings: int = 0
    disconnects: int = 0
    backoffs: int = 0
    backoff_next: bool = False
    last_close: str = ""
    messages: int = 0
    packets: int = 0
    seen: int = 0
    alive: float = 0.0
    by_mode: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the collector

class DhanCollector:
    """Collect Dhan's live market feed for ``plan`` (a list of connections,
    each a list of :class:`~feeds.dhan.connections.Subscription`) with the
    access token ``access_token`` into ``sink``.

    ``await run(stop)`` connects, collects until ``stop`` is set or the
    aware datetime ``until`` passes, closes the connections and returns an
    exit status: 0 (stopped, or the session is over), 77 (Dhan refused the
    access token or the client: disconnect codes 806-810, or HTTP 401/403 at
    the handshake), 1 (the sink failed).  The caller closes the sink.  A
    collector of :mod:`feeds.service` (``stream_kind``, ``figures``,
    ``periodic``).

    ``history``: ``(when_ns, job)``: at the wall-clock time ``when_ns`` the
    coroutine ``job(stop)`` runs on the event loop (the history fill of a
    start inside a session, :func:`feeds.dhan.main.history_job`)."""

    def __init__(self, settings: Settings, access_token: str, plan: list[list[Subscription]], sink: Sink,
                 health: Health, until: datetime | None = None, candles: DhanCandles | None = None,
                 history: tuple[int, Callable[[asyncio.Event], Awaitable[None]]] | None = None):
        self.s = settings
        self.access_token = access_token
        self.sink = sink
        self.health = health
        self.until = until
        self.candles = candles
        self.history = history
        self.conns: list[_Connection] = []
        for i, subs in enumerate(plan, 1):
            c = _Connection(i, list(subs), health.stream(f"connection {i}"))
            for s in subs:
                c.by_mode[s.mode] = c.by_mode.get(s.mode, 0) + 1
            self.conns.append(c)
        used = {s.mode for subs in plan for s in subs}
        self.table_streams = {t.name: (health.stream(t.name.removeprefix("dhan_tick_"))
                                       if t.name.removeprefix("dhan_tick_") in used else StreamHealth())
                              for t in A.TICK_TABLES}
        self.rows = A.RowMaker()
        self.failure: str | None = None
        self.failure_rc = RC_FAILED
        self.text_messages = 0
        self._texts_logged = 0
        self.disconnects: dict[int, int] = {}
        self._stop: asyncio.Event | None = None
        self._stall_end = 0.0
        self._candle_errors = 0

    # ------------------------------------------------------------ the hot path
    def _text(self, c: _Connection, msg) -> None:
        self.text_messages += 1
        if self._texts_logged < 100:
            self._texts_logged += 1
            log.info("connection %d: text message from Dhan: %.300s", c.index, msg)

    def _candle_failed(self) -> None:
        self._candle_errors += 1
        if self._candle_errors <= 3:
            log.exception("candles: packets not folded into candles")

    def handler(self, c: _Connection) -> Callable[[bytes | str], bool]:
        """The function called with one message of connection ``c`` (a text
        message, or a binary message taken on its own: one reassembled from
        several frames); the binary ones go through :meth:`batch_handler`'s
        function as a batch of one.  Returns True when the collector must
        stop reading (a fatal disconnect code, a sink that refuses rows)."""
        on_batch = self.batch_handler(c)

        def on(msg) -> bool:
            if type(msg) is not bytes:
                c.messages += 1
                self._text(c, msg)
                return False
            return on_batch((msg,))
        return on

    def batch_handler(self, c: _Connection) -> Callable[[list[bytes]], bool]:
        """The function called with the binary messages of connection ``c``
        that arrived together (one socket read), in order: the hot path,
        names bound once.  Returns True when the collector must stop reading
        (a fatal disconnect code, a sink that refuses rows); the messages
        after the one that made it stop are not handled.

        Each message gets its receive time: the clock at the call, then one
        microsecond more for each message, never back in time on the
        connection (strictly increasing, so that ``(instrument, recv_time,
        seq)`` is unique).  The messages are decoded together
        (:func:`feeds.dhan.wire.decode_many`), their rows made together
        (:meth:`feeds.dhan.adapter.RowMaker.add_many`) and handed to the sink
        after the message that brings the rows gathered to ``batch_rows``,
        their trades folded into the candles together.  A batch holding a
        Feed Disconnect packet is handled one message at a time, so that the
        disconnect is acted on right after its message's rows and nothing
        after a fatal one is handled."""
        decode_many = wire.decode_many
        decode = wire.decode
        rows = self.rows
        add_many = rows.add_many
        fold = self.candles.records if self.candles is not None else None
        malformed = self.health.count_malformed
        where = f"connection {c.index}"
        batch = self.s.batch_rows
        time_ns = time.time_ns
        epoch_text = A.epoch_text

        def recv_texts(us: int, n: int) -> list[str]:
            """The receive time texts of ``n`` messages from ``us`` on, one microsecond apart."""
            sec, frac = divmod(us, 1_000_000)
            if sec != c.sec:
                c.sec, c.prefix = sec, epoch_text(sec)[:19]
            p = c.prefix
            if frac + n <= 1_000_000:
                if n == 1:
                    return [f"{p}.{frac:06d}+00:00"]
                return [f"{p}.{f:06d}+00:00" for f in range(frac, frac + n)]
            out = []
            for u in range(us, us + n):
                sec, frac = divmod(u, 1_000_000)
                if sec != c.sec:
                    c.sec, c.prefix = sec, epoch_text(sec)[:19]
                out.append(f"{c.prefix}.{frac:06d}+00:00")
            return out

        def folded(records: list, ns: int) -> None:
            try:
                fold(records, ns)
            except Exception:               # a candle bug must not stop the ticks being stored
                self._candle_failed()

        def one_by_one(msgs, us: int, ns: int) -> bool:
            now = ns / NS
            for k, msg in enumerate(msgs):
                c.messages += 1
                records, errors = decode(msg, now)
                for e in errors:
                    malformed(where, str(e))
                if records:
                    recv = recv_texts(us + k, 1)[0]
                    disc = rows.add(records, recv)
                    c.packets += 1
                    if fold is not None:
                        folded(records, ns)
                    for d in disc:
                        self._on_disconnect(c, d.reason, recv)
                    if rows.pending >= batch:
                        self._flush()
                if self.failure is not None:
                    return True
            return False

        def on_batch(msgs) -> bool:
            n = len(msgs)
            if self.failure is not None:    # stopping: this message is the last handled
                msgs, n = msgs[:1], 1
            ns = time_ns()
            us = ns // 1000
            if us <= c.last_us:
                us = c.last_us + 1
            c.last_us = us + n - 1
            records, index, errors, messages, disconnects = decode_many(msgs, ns / NS)
            if disconnects:
                return one_by_one(msgs, us, ns)
            c.messages += n
            if errors:
                for e in errors:
                    malformed(where, str(e))
            if not records:
                return self.failure is not None
            recvs = recv_texts(us, n)
            total = len(records)
            if total < batch - rows.pending:        # no flush due in this batch
                add_many(records, index, recvs)
                c.packets += messages
                if fold is not None:
                    folded(records, ns)
                return self.failure is not None
            lo = 0                                  # flush after the message that fills a batch
            while lo < total:
                hi = lo + max(1, batch - rows.pending)
                if hi < total:
                    last = index[hi - 1]
                    while hi < total and index[hi] == last:
                        hi += 1
                else:
                    hi = total
                part = records[lo:hi]
                add_many(part, index[lo:hi], recvs)
                c.packets += len(set(index[lo:hi]))
                if fold is not None:
                    folded(part, ns)
                if rows.pending >= batch:
                    self._flush()
                if self.failure is not None:
                    c.messages -= n - 1 - index[hi - 1]     # the messages after this one are not handled
                    return True
                lo = hi
            return self.failure is not None
        return on_batch

    def _flush(self) -> None:
        for c in self.conns:                # messages with data, for the health of each connection
            if c.packets != c.seen:
                c.stream.seen(c.packets - c.seen)
                c.seen = c.packets
        batch = self.rows.take()
        if not batch:
            return
        t0 = time.monotonic()
        try:
            for name, rows in batch.items():
                self.sink.add_many(name, rows)
                st = self.table_streams.get(name)
                if st is not None:
                    st.seen(len(rows))
        except RuntimeError as e:           # the sink is closed or its writer died
            if self.failure is None:
                self.failure = f"sink refused rows: {e}"
        t1 = time.monotonic()
        if t1 - t0 > 0.5:                   # reading was paused on purpose: not silence
            self._stall_end = t1

    def _on_disconnect(self, c: _Connection, code: int, recv: str) -> None:
        action = wire.disconnect_action(code)
        meaning = wire.disconnect_reason(code)
        c.disconnects += 1
        self.disconnects[code] = self.disconnects.get(code, 0) + 1
        self.rows.rows[A.DISCONNECT_TABLE.name].append(A.disconnect_row(recv, c.index, code, action))
        self.rows.pending += 1
        if action == "exit":
            if self.failure is None:
                self.failure = (f"Dhan closed the feed with code {code} ({meaning}): renew the access token "
                                f"(systemctl start feed-dhan-token), then start feed-dhan again")
                self.failure_rc = RC_TOKEN
            log.error("connection %d: Dhan disconnected it with code %d (%s)", c.index, code, meaning)
        elif action == "backoff":
            c.backoff_next = True
            log.warning("connection %d: Dhan disconnected it with code %d (%s)%s", c.index, code, meaning,
                        ": another program of client id %s holds feed connections; waiting before reconnecting"
                        % self.s.client_id if code == wire.TOO_MANY_CONNECTIONS else "; waiting before reconnecting")
        else:
            log.warning("connection %d: Dhan disconnected it with code %d (%s); reconnecting", c.index, code,
                        meaning)

    # ------------------------------------------------------------ connections
    def _delay(self, c: _Connection, attempt: int) -> float:
        if c.backoff_next:
            c.backoff_next = False
            c.backoffs += 1
            return min(BACKOFF_MAX, self.s.reconnect_max_delay * 2 ** (c.backoffs - 1))
        return random.uniform(0.5, 1.0) * min(self.s.reconnect_max_delay, 2.0 ** attempt)

    async def _open(self, c: _Connection, on: Callable[[bytes | str], bool],
                    on_batch: Callable[[list[bytes]], bool]) -> tuple[picows.WSTransport, "_Listener"]:
        url = wire.feed_url(self.s.feed_url, self.access_token, self.s.client_id)
        return await asyncio.wait_for(
            picows.ws_connect(lambda: _Listener(self, c, on, on_batch), url, enable_auto_pong=False,
                              enable_auto_ping=False, max_frame_size=MAX_MESSAGE_BYTES,
                              websocket_handshake_timeout=self.s.connect_timeout, disconnect_on_exception=True),
            self.s.connect_timeout)

    async def _connection(self, c: _Connection) -> None:
        stop = self._stop
        attempt = 0
        on = self.handler(c)
        on_batch = self.batch_handler(c)
        while not stop.is_set() and self.failure is None:
            try:
                ws, listener = await self._open(c, on, on_batch)
            except picows.WSInvalidStatusError as e:
                status = int(e.response.status) if e.response is not None else 0
                if status in (401, 403):
                    if self.failure is None:
                        self.failure = (f"Dhan refused the access token at the feed (HTTP {status}): it has "
                                        "expired or was revoked; renew it (systemctl start feed-dhan-token), "
                                        "then start feed-dhan again")
                        self.failure_rc = RC_TOKEN
                    return
                if status == 429:
                    c.backoff_next = True
                wait = self._delay(c, attempt)
                attempt += 1
                log.warning("connection %d: the feed refused the connection (HTTP %d); retrying in %.1f s",
                            c.index, status, wait)
                await self._sleep(wait)
                continue
            except (OSError, asyncio.TimeoutError, picows.WSError) as e:
                wait = self._delay(c, attempt)
                attempt += 1
                log.warning("connection %d: cannot connect to %s (%s); retrying in %.1f s", c.index,
                            self.s.feed_url, _first_line(e), wait)
                await self._sleep(wait)
                continue
            c.ws, c.open = ws, True
            c.generation += 1
            c.opened_at = c.last = time.monotonic()
            try:
                text = WSMsgType.TEXT
                for m in subscribe_messages(c.subs):
                    ws.send(text, m.encode())
                log.info("connection %d open (generation %d): %d instruments subscribed (%s)", c.index,
                         c.generation, len(c.subs), ", ".join(f"{m} {n}" for m, n in sorted(c.by_mode.items())))
                await ws.wait_disconnected()
            except (ConnectionError, picows.WSError):
                pass
            finally:
                c.open = False
                lasted = time.monotonic() - c.opened_at
                if not stop.is_set():
                    c.closes += 1
                await _close(ws)
                hs = ws.close_handshake
                code = hs.recv.code if hs is not None and hs.recv is not None else None
                c.last_close = f"close code {getattr(code, 'value', code)}" if code is not None else "no close frame"
            if listener.error is not None:
                raise listener.error
            if stop.is_set() or self.failure is not None:
                break
            if lasted >= STABLE_AFTER:
                attempt = 0
            wait = self._delay(c, attempt)
            attempt += 1
            log.info("connection %d closed after %.1f s (%s); reconnecting in %.1f s", c.index, lasted,
                     c.last_close, wait)
            await self._sleep(wait)

    def check_silence(self) -> list[int]:
        """Abort the connections silent (no bytes at all, pings included)
        beyond ``silence_timeout``; returns their numbers.  Bytes received
        (Dhan's pings before the open, when no packet flows) also count as
        the connection's sign of life for the watchdog."""
        now = time.monotonic()
        out = []
        for c in self.conns:
            ws = c.ws
            if not c.open or ws is None:
                continue
            if c.last > c.alive:
                c.alive = c.last
                c.stream.seen(0)
            since = max(c.last, self._stall_end)
            if now - since > self.s.silence_timeout:
                c.silences += 1
                c.last = now
                log.warning("connection %d silent for %.1f s (no data, no ping): dropping it to reconnect",
                            c.index, now - since)
                asyncio.ensure_future(_close(ws))       # ends the connection's reading loop
                out.append(c.index)
        return out

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    async def _flusher(self) -> None:
        while not self._stop.is_set():
            await self._sleep(self.s.flush_interval)
            if self.rows.pending:
                self._flush()

    async def _candle_timer(self) -> None:
        """Close candles by the wall clock: each one ``grace`` seconds after its end."""
        cd = self.candles
        while not self._stop.is_set():
            now = time.time_ns()
            due = cd.next_due_ns()
            if due is not None and due <= now:
                self._flush()               # the ticks first, then their candles
                cd.close_due(now)
                continue
            await self._sleep(0.25 if due is None else min(0.25, (due - now) / NS))

    async def _history(self) -> None:
        when_ns, job = self.history
        await self._sleep((when_ns - time.time_ns()) / NS)
        if self._stop.is_set():
            return
        try:
            await job(self._stop)
        except Exception:                   # the live candles go on without it
            log.exception("candles: history fill failed")

    # ------------------------------------------------------------ the runtime's interface
    def stream_kind(self, stream: str) -> str:
        """``frames`` for a connection's messages, else the packet kind (full, quote, ticker, oi)."""
        return "frames" if stream.startswith("connection") else stream

    def figures(self) -> dict[str, int]:
        """Connections (planned and open), reconnects, silence drops,
        Dhan's pings, disconnect packets (all and 805), instruments, text
        messages; with candles, the candle rows written and the late ticks."""
        out = {"connections": len(self.conns), "open": sum(c.open for c in self.conns),
               "reconnects": sum(max(0, c.generation - 1) for c in self.conns),
               "silent": sum(c.silences for c in self.conns),
               "pings": sum(c.pings for c in self.conns),
               "disconnects": sum(self.disconnects.values()),
               "too many connections": self.disconnects.get(wire.TOO_MANY_CONNECTIONS, 0),
               "instruments": sum(len(c.subs) for c in self.conns), "text messages": self.text_messages}
        if self.candles is not None:
            out.update(self.candles.figures())
        return out

    def periodic(self) -> None:
        """Nothing beyond the checks of :meth:`run`."""

    async def run(self, stop: asyncio.Event) -> int:
        """Connect, collect until ``stop`` is set or ``until`` passes, close
        the connections; returns 0, 77 or 1 (see the class)."""
        self._stop = inner = asyncio.Event()
        log.info("connecting %d connection(s) to %s for %d instruments", len(self.conns), self.s.feed_url,
                 sum(len(c.subs) for c in self.conns))
        tasks: list[asyncio.Task] = []
        for c in self.conns:
            tasks.append(asyncio.ensure_future(self._connection(c)))
            if self.s.connect_stagger:
                await asyncio.sleep(self.s.connect_stagger)
        helpers = [asyncio.ensure_future(self._flusher())]
        if self.candles is not None:
            helpers.append(asyncio.ensure_future(self._candle_timer()))
            if self.history is not None:
                helpers.append(asyncio.ensure_future(self._history()))
        check = min(self.s.watchdog_interval, max(0.1, self.s.silence_timeout / 4))
        rc = RC_OK
        try:
            while not stop.is_set():
                if self.until is not None and datetime.now(UTC) >= self.until:
                    log.info("session over (stop time %s reached)", self.until.isoformat(timespec="seconds"))
                    break
                if self.failure is not None:
                    log.error("%s", self.failure)
                    rc = self.failure_rc
                    break
                if self.sink.fatal:
                    log.error("sink writer failed: %r", self.sink.fatal)
                    rc = RC_FAILED
                    break
                for t in helpers:
                    if t.done() and not t.cancelled() and t.exception() is not None and self.failure is None:
                        self.failure = f"collector task failed: {t.exception()!r}"
                if self.candles is not None and self.candles.sink_failure and self.failure is None:
                    self.failure = self.candles.sink_failure
                self.check_silence()
                wait = check
                if self.until is not None:
                    wait = min(wait, (self.until - datetime.now(UTC)).total_seconds())
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, wait))
                except asyncio.TimeoutError:
                    pass
        finally:
            inner.set()
            for c in self.conns:
                if c.ws is not None and c.open:
                    await _close(c.ws)
            for t in tasks + helpers:
                t.cancel()
            await asyncio.gather(*tasks, *helpers, return_exceptions=True)
            self._flush()
            if self.candles is not None:
                try:
                    n = self.candles.close_due() + self.candles.close_all()
                    log.info("candles: %d written at the stop (open ones not final)", n)
                except Exception:
                    log.exception("candles: open candles not written at the stop")
            log.info("connections closed (%d message(s), %d ping(s) from Dhan, %d silence drop(s), %d disconnect "
                     "packet(s))", sum(c.messages for c in self.conns), self.figures()["pings"],
                     sum(c.silences for c in self.conns), sum(self.disconnects.values()))
        return rc


class _Listener(picows.WSListener):
    """The frames of one connection, as picows parses them: binary and text
    messages to the collector's handlers, Dhan's pings answered and counted,
    a close answered.  Every frame stamps the connection (``last``); the
    binary messages gathered for ``on_batch`` do when they are handed over.

    With ``on_batch``, the binary messages of one socket read (picows calls
    :meth:`on_ws_frame` for each frame of a read, the last one marked
    ``last_in_buffer``) are gathered and handed to ``on_batch`` as one list
    after the last of them, after every :data:`MAX_BATCH_MESSAGES`, and
    before any other frame of the read (a ping, a text, a close), so that
    the order of messages is kept; messages still gathered when the
    connection ends are handed over then.  Without it,
    and for a message put together from several frames, each binary
    message goes to ``on`` on its own.  Text messages go to the collector.

    Once a handler asks to stop (a fatal disconnect code), the connection is
    closed and the frames still buffered are ignored.  An exception from a
    handler is kept in ``error`` (the connection's task raises it), nothing
    more reaches the handlers and picows closes the connection.  A message
    of more than :data:`MAX_MESSAGE_BYTES` closes the connection with 1009
    (``oversized``)."""

    def __init__(self, collector: DhanCollector, c: _Connection, on: Callable[[bytes | str], bool],
                 on_batch: Callable[[list[bytes]], bool] | None = None):
        super().__init__()
        self.collector = collector
        self.c = c
        self.on = on
        self.on_batch = on_batch
        self.stopped = False
        self.error: BaseException | None = None
        self._batch: list[bytes] = []
        self._parts: list[bytes] = []
        self._size = 0
        self.oversized = False
        self._kind = WSMsgType.BINARY

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        t = frame.msg_type
        if t == _BINARY and frame.fin and self.on_batch is not None:   # Dhan's packets: one frame a message
            if not self.stopped:
                batch = self._batch
                batch.append(frame.get_payload_as_bytes())
                if frame.last_in_buffer or len(batch) >= MAX_BATCH_MESSAGES:
                    self._deliver(transport)    # stamps the connection
            return
        c = self.c
        c.last = _monotonic()
        if self._batch:
            self._deliver(transport)
        if t == _BINARY and frame.fin:
            self._binary(transport, frame.get_payload_as_bytes())
            return
        if t == _PING:
            c.pings += 1
            transport.send_pong(frame.get_payload_as_bytes())
        elif t == _CLOSE:
            code = frame.get_close_code()
            transport.send_close(code if code != picows.WSCloseCode.NO_INFO else picows.WSCloseCode.OK)
            transport.disconnect()
        elif t == _CONTINUATION or not frame.fin:   # a message in several frames
            if t != _CONTINUATION:
                self._kind = t
                self._parts, self._size = [], 0
            self._parts.append(frame.get_payload_as_bytes())
            self._size += len(self._parts[-1])
            if self._size > MAX_MESSAGE_BYTES:      # never a Dhan message: drop the connection, reconnect
                self._parts, self._size = [], 0
                self.oversized = self.stopped = True
                log.warning("connection %d: a message over %d bytes, not one of Dhan's: closed (1009), "
                            "reconnecting", self.c.index, MAX_MESSAGE_BYTES)
                transport.send_close(picows.WSCloseCode.MESSAGE_TOO_BIG)
                transport.disconnect()
                return
            if frame.fin:
                self._size = 0
                data = b"".join(self._parts)
                self._parts = []
                if self._kind == _TEXT:
                    self._text(data)
                else:
                    self._binary(transport, data)
        elif t == _TEXT:
            self._text(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if self._batch:                             # a read cut short (a bad frame after them)
            self._deliver(transport, closed=True)

    def _deliver(self, transport: picows.WSTransport, closed: bool = False) -> None:
        self.c.last = _monotonic()
        batch, self._batch = self._batch, []
        self._hand(transport, self.on_batch, batch, closed)

    def _binary(self, transport: picows.WSTransport, data: bytes) -> None:
        self._hand(transport, self.on, data)

    def _hand(self, transport: picows.WSTransport, handler: Callable, arg, closed: bool = False) -> None:
        """``handler(arg)`` unless stopped; its exception stops the connection (kept in ``error``);
        its True closes it (unless ``closed`` already)."""
        if self.stopped:
            return
        try:
            stop = handler(arg)
        except BaseException as e:
            self.error = e
            self.stopped = True                     # nothing more reaches the handlers on this connection
            raise
        if stop:
            self.stopped = True
            if not closed:
                transport.send_close(picows.WSCloseCode.OK)
                transport.disconnect()

    def _text(self, data: bytes) -> None:
        if not self.stopped:
            self.collector._text(self.c, data.decode("utf-8", "replace"))


_monotonic = time.monotonic
_BINARY, _TEXT, _PING, _PONG, _CLOSE, _CONTINUATION = (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.PING,
                                                      WSMsgType.PONG, WSMsgType.CLOSE, WSMsgType.CONTINUATION)


async def _close(ws: picows.WSTransport) -> None:
    """Close ``ws``: a close frame (unless one was sent already), then the
    socket once the frames written are flushed; after 5 s the socket is
    aborted."""
    try:
        if not ws.is_close_frame_sent:
            ws.send_close(picows.WSCloseCode.OK)
        ws.disconnect()
        await asyncio.wait_for(ws.wait_disconnected(), 5.0)
    except Exception:                       # closing a broken connection: abort it, nothing more to do
        try:
            ws.disconnect(graceful=False)
        except Exception:
            pass


