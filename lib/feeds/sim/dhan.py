"""DhanHQ v2 simulator: REST (charts, instrument list, tokens) and the binary live market feed.

One aiohttp server on one port answers, on loopback, what a Dhan client asks
of api.dhan.co, auth.dhan.co, images.dhan.co and api-feed.dhan.co:

REST (DhanHQ v2 "Historical Data", "Instruments", "Authentication", "Annexure")
-------------------------------------------------------------------------------
* ``GET /api-data/api-scrip-master.csv``: the compact scrip master
  (:class:`feeds.sim.dhan_market.ScripMaster`; no token, no rate limit).
* ``POST /v2/charts/intraday``: body ``{securityId, exchangeSegment,
  instrument, interval ("1", "5", "15", "25", "60"; a number is accepted),
  oi?, fromDate, toDate}``, dates ``YYYY-MM-DD`` (toDate: the whole day
  included) or ``YYYY-MM-DD HH:MM:SS`` (IST); answers Dhan's columnar
  ``{open, high, low, close, volume, timestamp}`` (``open_interest`` too
  when ``oi`` is true), candles labelled by their start in the range, only
  minutes that have ended.  A range over 90 days
  (:data:`~feeds.dhan.limits.MAX_INTRADAY_DAYS_PER_REQUEST`) answers 400
  DH-905.  Candles: :class:`feeds.sim.dhan_market.CandleSource` (the real
  recordings of ``shared/data/dhan`` where they exist, generated elsewhere).
* ``POST /v2/charts/historical``: daily candles, ``toDate`` not included,
  labelled 00:00 IST.
* ``GET /v2/RenewToken`` (headers ``access-token``, ``dhanClientId``): expires
  the token and answers a new one; ``POST /app/generateAccessToken?
  dhanClientId=..&pin=..&totp=..`` (the auth host's path): a token for the
  PIN and a current TOTP.  Both answer ``{dhanClientId, dhanClientName,
  dhanClientUcc, givenPowerOfAttorney, accessToken, expiryTime}``
  (``expiryTime`` ISO, IST, no zone).  ``GET /v2/profile``: Dhan's profile
  answer (``tokenValidity`` "DD/MM/YYYY HH:MM" IST), a cheap token check.
* Errors: Dhan's envelope ``{"errorType", "errorCode", "errorMessage"}``:
  an unknown token 400 DH-906 "Invalid Token" (as recorded), an expired or
  renewed-away token 401 DH-901, bad input 400 DH-905, unknown security 400
  DH-907, rate limit 429 DH-904.

Rate limits (DhanHQ v2 "Rate Limit": data APIs 5 a second, 100,000 a day)
-------------------------------------------------------------------------
The charts endpoints are data APIs, limited per client id (the
``client-id`` header, else the token's client).  A request is *accepted*
when fewer than ``data_rate`` requests were accepted in the sliding
one-second window ending at its arrival, i.e. in ``(t - 1 s, t]`` (arrival
times on the monotonic clock); otherwise it is a *violation*: answered 429
DH-904 and counted.  So "0 violations" means no request was sent beyond the
limit, and at most ``data_rate`` requests were accepted in any interval of
one second.  A day (IST) allows ``data_per_day`` accepted requests; beyond
them 429 DH-904 too.  Rejected requests do not use the allowance.
Other ``/v2`` endpoints allow 20 a second (non-trading APIs).
``GET /sim/stats`` -> ``rest``: ``data_requests`` (arrivals), ``data_accepted``,
``violations``, ``max_accepted_in_any_second`` (the largest number of
accepted requests in one sliding window, <= ``data_rate``),
``max_arrivals_in_any_second`` (the same over every arrival, rejected ones
included), ``per_second`` (accepted requests per whole UTC second, the last
hour), ``first_at`` / ``last_at`` (UTC epoch of the first and last accepted
request) and ``allowance_used`` = accepted / (``data_rate`` * (last_at -
first_at) + ``data_rate``): 1.0 for a client that sent a full window at
once and then exactly ``data_rate`` a second.

Live market feed (DhanHQ v2 "Live Market Feed", "Annexure")
----------------------------------------------------------
WebSocket upgrade on ``/?version=2&token=..&clientId=..&authType=2``.  A
bad request (version or authType not 2) gets a Feed Disconnect packet with
814, an unknown token 809, an expired one 807, a client id that is not the
simulator's 810, then the close.  Requests are JSON text messages:
``RequestCode`` 15/17/21 subscribe in ticker/quote/full mode, 16/18/22
unsubscribe (in whatever mode), 12 disconnect; ``InstrumentList`` of
``{ExchangeSegment, SecurityId}``.  More than 100 instruments in one message
or 5,000 on one connection: disconnect 804 and close.  A 6th connection of a
client closes the *oldest* with 805 (the document: "the first socket will be
disconnected with 805 with every additional connection").  Each packet is
its own binary message (what the official client reads); on subscribe a
Prev Close packet (code 6) is sent for each instrument, and an OI packet (5)
for quote mode; then the trades of the session (:mod:`feeds.sim.
dhan_feed`), the latest one first as the snapshot.  A Market Status packet
(7) is sent when the session opens and when it closes.  The server pings
every ``ping_interval`` (10 s) and closes a connection from which nothing
(pong or any other frame) arrived for ``idle_timeout`` (40 s) after a ping
(time silenced by a fault does not count: no ping goes out then).  An
expired token on an open connection: disconnect 807, close (a token retired
by ``RenewToken`` keeps its open feed connections until its own expiry).

Time and sessions: the wall clock; ticks flow only in an NSE session of the
XNSE calendar, or in the *virtual session* that ``session_now`` opens at
start (``session_elapsed`` minutes ago, ``session_minutes`` long), or that
``POST /sim/session`` opens at any time.

Control (simulator only, under ``/sim``; JSON answers)
-----------------------------------------------------
``GET /sim/stats``, ``POST /sim/stats/reset``, ``POST /sim/access_token
[?ttl=S]``, ``GET|POST /sim/adjust[?applied=1|0]``, ``GET|POST|DELETE
/sim/session[?elapsed=MIN&minutes=N]``, ``GET /sim/candles?securityId=..
&exchangeSegment=..&from=EPOCH&to=EPOCH[&interval=1]`` (what the intraday
endpoint serves, with no token and no rate limit), ``POST /sim/fault/
expire_token[?token=T]``, ``POST /sim/fault/disconnect[?code=N]``,
``POST /sim/fault/silence?seconds=S``, ``POST /sim/fault/malformed[?kind=
unknown_code|short|bad_length]``, ``POST /sim/fault/market_status``; the
feed faults take ``connection=ID`` (see ``stats`` -> ``feed`` ->
``connections``) to target one connection.

Use :class:`DhanSimulator` from asyncio (``await start()`` / ``stop()``), from
synchronous tests (``with sim.running(): ...``) or from the command line
(``bin/feed-sim-dhan``).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

import orjson
from aiohttp import WSMessage, WSMsgType, web

from ..dhan import limits
from . import dhan_packets as P
from .common import PerSecondLimiter, SimServer, json_response as _json, shared_data_dir
from .dhan_auth import DhanError, Token, TokenBook
from .dhan_feed import FULL, MODE_NAMES, MODE_OF_REQUEST, QUOTE, TICKER, UNSUBSCRIBE, LiveMarket, Subscriptions, \
    ws_frame
from .dhan_market import (IST, INTERVALS, SEGMENTS, CandleSource, CorporateAction, Instrument, ScripMaster,
                          Sessions, load_recordings)

log = logging.getLogger(__name__)

#: what Dhan documents for the feed ("Keeping Connection Alive"), from the one limits module
PING_INTERVAL_S = float(limits.SERVER_PING_INTERVAL_S)
IDLE_TIMEOUT_S = float(limits.SERVER_IDLE_CLOSE_S)
DEFAULT_CORPORATE_ACTIONS = ("1333:2025-08-26:2",)   # HDFCBANK 1:1 bonus


# ----------------------------------------------------------------------------- rate limits


class DataLimiter:
    """Dhan's data API limits per client: ``per_second`` in any sliding second,
    ``per_day`` per IST day; with the counters :meth:`stats` reports."""

    def __init__(self, per_second: int, per_day: int, enabled: bool = True) -> None:
        self.per_second = per_second
        self.per_day = per_day
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        self._accepted: dict[str, deque[float]] = {}
        self._arrivals: dict[str, deque[float]] = {}
        self._days: dict[tuple[str, dt.date], int] = {}
        self.requests = 0
        self.accepted = 0
        self.violations = 0
        self.max_accepted = 0
        self.max_arrivals = 0
        self.per_sec: dict[int, int] = {}
        self.first_at: float | None = None
        self.last_at: float | None = None

    def allow(self, who: str) -> bool:
        """Count one arrival for ``who``; True when accepted."""
        now = time.monotonic()
        wall = time.time()
        self.requests += 1
        arr = self._arrivals.setdefault(who, deque())
        while arr and arr[0] <= now - 1.0:
            arr.popleft()
        arr.append(now)
        self.max_arrivals = max(self.max_arrivals, len(arr))
        q = self._accepted.setdefault(who, deque())
        while q and q[0] <= now - 1.0:
            q.popleft()
        day = (who, dt.datetime.fromtimestamp(wall, IST).date())
        if self.enabled and (len(q) >= self.per_second or self._days.get(day, 0) >= self.per_day):
            self.violations += 1
            return False
        q.append(now)
        self._days[day] = self._days.get(day, 0) + 1
        self.accepted += 1
        self.max_accepted = max(self.max_accepted, len(q))
        sec = int(wall)
        self.per_sec[sec] = self.per_sec.get(sec, 0) + 1
        if len(self.per_sec) > 3600:
            for k in sorted(self.per_sec)[:len(self.per_sec) - 3600]:
                del self.per_sec[k]
        self.first_at = wall if self.first_at is None else self.first_at
        self.last_at = wall
        return True

    def stats(self) -> dict:
        span = (self.last_at - self.first_at) if self.first_at is not None else 0.0
        used = self.accepted / (self.per_second * span + self.per_second) if self.accepted else 0.0
        return {"data_rate": self.per_second, "data_per_day": self.per_day, "enforced": self.enabled,
                "data_requests": self.requests, "data_accepted": self.accepted, "violations": self.violations,
                "max_accepted_in_any_second": self.max_accepted, "max_arrivals_in_any_second": self.max_arrivals,
                "per_second": {str(k): v for k, v in sorted(self.per_sec.items())},
                "first_at": self.first_at, "last_at": self.last_at, "allowance_used": used}


# ----------------------------------------------------------------------------- feed connections


@dataclass
class _FeedConnection:
    cid: int
    client_id: str
    token: str
    peer: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport
    subs: Subscriptions
    connected_at: float = field(default_factory=time.time)
    last_heard: float = field(default_factory=time.monotonic)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    control: list[bytes] = field(default_factory=list)       # framed packets to send before ticks
    silenced_until: float = 0.0
    closing: bool = False
    in_session: bool | None = None
    packets: dict[str, int] = field(default_factory=lambda: {
        "ticker": 0, "quote": 0, "full": 0, "prev_close": 0, "oi": 0, "market_status": 0, "disconnect": 0,
        "malformed": 0})
    frames_sent: int = 0
    bytes_sent: int = 0
    pings_sent: int = 0
    pongs: int = 0
    bad_messages: int = 0
    last_ping: float = 0.0
    unanswered_since: float | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    def stats(self) -> dict:
        return {"id": self.cid, "client_id": self.client_id, "peer": self.peer, "connected_at": self.connected_at,
                "subscribed": len(self.subs), "modes": self.subs.counts(), "packets_sent": dict(self.packets),
                "frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent, "pings_sent": self.pings_sent,
                "pongs": self.pongs, "bad_messages": self.bad_messages,
                "silent_for": round(time.monotonic() - self.last_heard, 3),
                "silenced": self.silenced_until > time.monotonic(), "in_session": bool(self.in_session)}


# ----------------------------------------------------------------------------- the simulator


class DhanSimulator(SimServer):
    """Dhan REST + live feed simulator on one HTTP port (see the module text).

    Keyword parameters: ``client_id``, ``pin``, ``totp_secret`` (base32) and
    ``client_name`` of the one user; ``token_ttl`` (s, 86400); ``access_token``
    (register this token string at start, else one is issued; see
    :attr:`access_token`); ``data_dir`` (the ``dhan`` recordings directory;
    default ``shared_data_dir("dhan")`` of :mod:`feeds.sim.common`; ``False``:
    none); ``instruments`` (generated NSE equities); ``seed``; ``rate`` (trades
    a second per subscribed instrument, at least 4 a minute); ``session_now`` / ``session_elapsed`` (min) /
    ``session_minutes``: the virtual session; ``corporate_actions``
    (``SECURITY_ID:YYYY-MM-DD:FACTOR`` strings, ``"none"`` ignored); ``adjusted`` (apply them from the
    start); ``ping_interval``, ``idle_timeout`` (s); ``max_connections``,
    ``max_instruments``, ``max_per_message``; ``data_rate``, ``data_per_day``,
    ``rate_limits`` (enforce them).  Raises ValueError for bad values.
    """

    venue = "dhan"
    log = log
    Error = DhanError
    connection_kind = "feed"
    running_timeout = 30.0
    call_timeout = 30.0

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, client_id: str = "1000000001",
                 pin: str = "123456", totp_secret: str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
                 client_name: str = "SIMULATED USER", token_ttl: float = 86_400.0, access_token: str | None = None,
                 data_dir: Path | str | bool | None = None, instruments: int = 1000, seed: int = 0,
                 rate: float = 1.0, session_now: bool = False, session_elapsed: float = 0.0,
                 session_minutes: int = 375, corporate_actions: tuple[str, ...] | list[str] = DEFAULT_CORPORATE_ACTIONS,
                 adjusted: bool = False, ping_interval: float = PING_INTERVAL_S,
                 idle_timeout: float = IDLE_TIMEOUT_S,
                 max_connections: int = limits.MAX_CONNECTIONS_PER_USER,
                 max_instruments: int = limits.MAX_INSTRUMENTS_PER_CONNECTION,
                 max_per_message: int = limits.MAX_INSTRUMENTS_PER_MESSAGE,
                 data_rate: int = limits.DATA_REQUESTS_PER_SECOND, data_per_day: int = limits.DATA_REQUESTS_PER_DAY,
                 rate_limits: bool = True) -> None:
        if rate < 0 or ping_interval <= 0 or idle_timeout <= 0 or min(max_connections, max_instruments,
                                                                         max_per_message, data_rate,
                                                                         data_per_day) < 1:
            raise ValueError("rate must be >= 0; intervals > 0; limits >= 1")
        if session_minutes < 1 or session_elapsed < 0:
            raise ValueError("session_minutes must be >= 1 and session_elapsed >= 0")
        super().__init__(host, port)
        self.auth = TokenBook(client_id, pin=pin, totp_secret=totp_secret, ttl=token_ttl, client_name=client_name)
        self._initial_token = access_token
        self.access_token: str | None = None
        if data_dir is False:
            self.data_dir = None
        else:
            self.data_dir = Path(data_dir).resolve() if data_dir else shared_data_dir("dhan")
        self.master = ScripMaster(instruments, seed)
        self.sessions = Sessions()
        self.session_minutes = session_minutes
        if session_now:
            self.sessions.set_virtual(int(time.time() - 60 * session_elapsed), session_minutes)
        actions = [CorporateAction.parse(a) for a in corporate_actions if a.strip().lower() != "none"]
        self.source = CandleSource(self.master, self.sessions, load_recordings(self.data_dir), seed=seed,
                                   actions=actions, adjusted=adjusted)
        self.live = LiveMarket(self.source, int(round(60 * rate)))
        self.ping_interval = float(ping_interval)
        self.idle_timeout = float(idle_timeout)
        self.max_connections = max_connections
        self.max_instruments = max_instruments
        self.max_per_message = max_per_message
        self.limiter = DataLimiter(data_rate, data_per_day, rate_limits)
        self._other = PerSecondLimiter()
        self._other_enabled = rate_limits
        self._connections: dict[int, _FeedConnection] = {}
        self._counters: dict[str, Any] = {"connections_total": 0, "refused": {}, "disconnects_sent": {},
                                          "idle_closed": 0, "bad_messages": 0, "rest_requests": 0, "rest_errors": 0}

    # ------------------------------------------------------------------ lifecycle

    @property
    def ws_url(self) -> str:
        """``ws://host:port``: the feed root (the client adds ``?version=2&token=..``)."""
        return "ws" + self.base_url[len("http"):]

    def feed_url(self, token: str | None = None, client_id: str | None = None) -> str:
        """The full feed URL for a token (default: :attr:`access_token`)."""
        return self.ws_url + "/?" + urlencode({"version": "2", "token": token or self.access_token,
                                               "clientId": client_id or self.auth.client_id, "authType": "2"})

    def _build_app(self) -> web.Application:
        app = self._app(client_max_size=1 << 20)
        r = app.router
        r.add_get("/", self._h_root)
        r.add_get("/api-data/api-scrip-master.csv", self._h_scrip_master)
        r.add_post("/v2/charts/intraday", self._h_intraday)
        r.add_post("/v2/charts/historical", self._h_historical)
        r.add_get("/v2/RenewToken", self._h_renew)
        r.add_post("/v2/RenewToken", self._h_renew)
        r.add_get("/v2/profile", self._h_profile)
        r.add_post("/app/generateAccessToken", self._h_generate)
        r.add_post("/sim/stats/reset", self._h_sim_stats_reset)
        r.add_post("/sim/access_token", self._h_sim_access_token)
        r.add_get("/sim/adjust", self._h_sim_adjust)
        r.add_post("/sim/adjust", self._h_sim_adjust)
        r.add_get("/sim/session", self._h_sim_session)
        r.add_post("/sim/session", self._h_sim_session)
        r.add_delete("/sim/session", self._h_sim_session)
        r.add_get("/sim/candles", self._h_sim_candles)
        return app

    async def start(self) -> None:
        """Bind and serve; sets ``.port`` and :attr:`access_token`.  Raises OSError if the bind fails."""
        self.access_token = self.auth.issue(token=self._initial_token).token
        await self._serve(self._build_app())
        log.info("event=dhan_sim_started url=%s instruments=%d recordings=%d data_dir=%s virtual_session=%s",
                 self.base_url, len(self.master.instruments), len(self.source.recordings), self.data_dir,
                 self.sessions.virtual)

    async def stop(self) -> None:
        """Close every feed connection and stop the server."""
        await self._shutdown(lambda conn: self._close(conn, 1001, "simulator stopping"))
        log.info("event=dhan_sim_stopped")

    async def serve_forever(self, token_file: Path | None = None) -> None:
        """start(), print the URLs (and write the token to ``token_file``), run until SIGINT/SIGTERM."""
        await self.start()
        if token_file is not None:
            token_file.write_text(self.access_token + "\n")
            os.chmod(token_file, 0o600)
        print(f"dhan simulator listening on {self.base_url} (feed {self.ws_url}/, client id {self.auth.client_id})",
              flush=True)
        await self._run_until_signal()

    # ------------------------------------------------------------------ control (also for tests)

    def stats(self) -> dict:
        """Counters: ``rest`` (see the module text), ``feed`` (connections and their
        packets, disconnect codes sent, refusals, idle closes), ``auth``, the
        adjustment and the session."""
        def snap() -> dict:
            a = self.auth.stats
            now = time.time()
            s = self.sessions.at(now)
            return {
                "rest": {**self.limiter.stats(), "requests": self._counters["rest_requests"],
                         "errors": self._counters["rest_errors"]},
                "feed": {"connections": [c.stats() for c in self._connections.values()],
                         "active_connections": len(self._connections),
                         "connections_total": self._counters["connections_total"],
                         "disconnects_sent": dict(self._counters["disconnects_sent"]),
                         "refused": dict(self._counters["refused"]),
                         "idle_closed": self._counters["idle_closed"],
                         "bad_messages": self._counters["bad_messages"]},
                "auth": {"issued": a.issued, "renewed": a.renewed, "generated": a.generated,
                         "rejected_invalid": a.rejected_invalid, "rejected_expired": a.rejected_expired,
                         "totp_failures": a.totp_failures, "expired_forced": a.expired_forced},
                "adjusted": self.source.adjusted,
                "session": self._session_json(s, now),
                "instruments": len(self.master.instruments),
            }
        return self._call(snap)

    def reset_stats(self) -> None:
        self._call(self.limiter.reset)

    def issue_token(self, ttl: float | None = None) -> str:
        """A new valid access token (no login)."""
        return self._call(lambda: self.auth.issue(ttl).token)

    def set_adjusted(self, applied: bool) -> None:
        """Serve history adjusted for the corporate actions (True) or raw (False)."""
        def run() -> None:
            self.source.adjusted = bool(applied)
            self.source._cache.clear()
            log.warning("event=adjustment applied=%s", applied)
        self._call(run)

    def open_session(self, elapsed_min: float = 0.0, minutes: int | None = None) -> dict:
        """Open a virtual session now (``elapsed_min`` minutes ago); returns it as JSON."""
        def run() -> dict:
            s = self.sessions.set_virtual(int(time.time() - 60 * elapsed_min), minutes or self.session_minutes)
            self.source._cache.clear()
            for c in self._connections.values():
                c.wake.set()
            return self._session_json(s, time.time())
        return self._call(run)

    def close_session(self) -> None:
        def run() -> None:
            self.sessions.virtual = None
            self.source._cache.clear()
        self._call(run)

    @staticmethod
    def _session_json(s, now: float) -> dict | None:
        if s is None:
            return {"open": False, "now": now}
        return {"open": s.open <= now < s.close, "day": s.day.isoformat(), "open_at": s.open, "close_at": s.close,
                "minutes": s.minutes, "kind": s.kind, "now": now}

    def candles(self, security_id: int, segment: str | int, first: int, last: int, interval: int = 1) -> dict:
        """The intraday answer for [first, last] (UTC epoch s), no token or rate limit."""
        seg = SEGMENTS[segment] if isinstance(segment, str) else int(segment)
        inst = self.master.get(seg, int(security_id))
        if inst is None:
            raise KeyError(f"unknown instrument {segment}:{security_id}")
        return self._call(lambda: self.source.intraday(inst, interval, first, last, time.time()).to_json())

    def fault_expire_token(self, token: str | None = None) -> int:
        """Expire one token (or all) now; feed connections on it get 807 and close.  Returns tokens expired."""
        def run() -> int:
            expired = self.auth.expire(token)
            names = {t.token for t in expired}
            for conn in list(self._connections.values()):
                if conn.token in names:
                    asyncio.ensure_future(self._disconnect(conn, 807))
            log.warning("event=fault_expire_token tokens=%d", len(expired))
            return len(expired)
        return self._call(run)

    def fault_disconnect(self, code: int | None = None, connection: int | None = None) -> int:
        """Drop feed connections: with ``code`` a Feed Disconnect packet then the close; without, a TCP abort."""
        def drop(conn: _FeedConnection) -> None:
            if code is None:
                conn.closing = True
                conn.transport.abort()
            else:
                asyncio.ensure_future(self._disconnect(conn, code))
        return self._each(connection, drop, "event=fault_disconnect code=%s connections=%d", code)

    def fault_malformed(self, kind: str = "unknown_code", connection: int | None = None) -> int:
        """Send one malformed message: ``unknown_code`` (code 99, 16 bytes), ``short`` (a full
        packet cut to 100 bytes) or ``bad_length`` (a ticker whose length field says 40)."""
        packet = {
            "unknown_code": lambda: bytes((99,)) + (16).to_bytes(2, "little") + bytes((1,))
            + (1333).to_bytes(4, "little") + bytes(8),
            "short": lambda: P.pack_full(1, 1333, 1.0, 1, 0, 1.0, 1, 0, 0, 0, 0, 0, 1.0, 0.0, 1.0, 1.0)[:100],
            "bad_length": lambda: bytearray(P.pack_ticker(1, 1333, 1.0, 0))[:1] + (40).to_bytes(2, "little")
            + P.pack_ticker(1, 1333, 1.0, 0)[3:],
        }.get(kind)
        if packet is None:
            raise ValueError("kind must be unknown_code, short or bad_length")

        def queue(conn: _FeedConnection) -> None:
            conn.control.append(ws_frame(bytes(packet())))
            conn.packets["malformed"] += 1
            conn.wake.set()
        return self._each(connection, queue)

    def fault_market_status(self, connection: int | None = None) -> int:
        """Send a Market Status packet (code 7) now on every (or one) connection; returns how many."""
        return self._each(connection, lambda conn: self._queue(conn, P.pack_market_status(), "market_status"))

    # ------------------------------------------------------------------ REST plumbing

    def _input_error(self, message: str) -> DhanError:
        return DhanError(400, "DH-905", message)

    def _http_error(self, status: int) -> DhanError:
        if status == 500:
            return DhanError(500, "DH-908")
        return DhanError(status, "DH-905", "Not found" if status == 404 else "Method not allowed")

    def _rest_error(self, request: web.Request, exc: DhanError) -> None:
        log.info("event=rest_error method=%s path=%s status=%d code=%s message=%r", request.method,
                 request.path, exc.status, exc.code, exc.message)

    def _reply(self, data: Any) -> web.Response:
        return _json(data)

    def _unknown_fault(self, name: str) -> DhanError:
        return DhanError(400, "DH-905", f"unknown fault {name!r}")

    def _faults(self, q: Mapping[str, str], connection: int | None) -> dict[str, Callable[[], int]]:
        return {
            "expire_token": lambda: self.fault_expire_token(q.get("token")),
            "disconnect": lambda: self.fault_disconnect(int(q["code"]) if "code" in q else None, connection),
            "silence": lambda: self.fault_silence(float(q.get("seconds", "60")), connection),
            "malformed": lambda: self.fault_malformed(q.get("kind", "unknown_code"), connection),
            "market_status": lambda: self.fault_market_status(connection),
        }

    def _authorize(self, request: web.Request, client_header: str = "client-id") -> Token:
        return self.auth.check(request.headers.get("access-token"), request.headers.get(client_header))

    def _data_rate(self, request: web.Request, tok: Token) -> None:
        who = request.headers.get("client-id") or tok.client_id
        if not self.limiter.allow(who):
            raise DhanError(429, "DH-904")

    def _other_rate(self, who: str) -> None:
        if self._other_enabled and not self._other.allow(who, limits.NON_TRADING_REQUESTS_PER_SECOND):
            raise DhanError(429, "DH-904")

    @staticmethod
    async def _body(request: web.Request) -> dict:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise DhanError(400, "DH-905", "Request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise DhanError(400, "DH-905", "Request body must be a JSON object.")
        return body

    def _instrument(self, body: dict) -> Instrument:
        seg = body.get("exchangeSegment")
        sid = body.get("securityId")
        if seg not in SEGMENTS or sid is None:
            raise DhanError(400, "DH-905", "securityId and exchangeSegment are required.")
        try:
            inst = self.master.get(SEGMENTS[seg], int(str(sid)))
        except ValueError:
            inst = None
        if inst is None:
            raise DhanError(400, "DH-907", f"No data for securityId {sid} in {seg}.")
        return inst

    @staticmethod
    def _parse_when(text: Any, end: bool) -> dt.datetime:
        if not isinstance(text, str):
            raise DhanError(400, "DH-905", "fromDate and toDate are required (YYYY-MM-DD[ HH:MM:SS]).")
        text = text.strip()
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
            try:
                got = dt.datetime.strptime(text, fmt)
            except ValueError:
                continue
            if fmt == "%Y-%m-%d" and end:
                got = got.replace(hour=23, minute=59, second=59)
            return got.replace(tzinfo=IST)
        raise DhanError(400, "DH-905", f"Invalid date format: {text!r} (YYYY-MM-DD or YYYY-MM-DD HH:MM:SS).")

    # ------------------------------------------------------------------ REST handlers

    async def _h_root(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._feed(request)
        return _json({"service": "DhanHQ v2 simulator", "api": self.base_url, "feed": self.ws_url + "/",
                      "clientId": self.auth.client_id})

    async def _h_scrip_master(self, request: web.Request) -> web.Response:
        return web.Response(body=self.master.csv_bytes(), content_type="text/csv")

    async def _h_intraday(self, request: web.Request) -> web.Response:
        tok = self._authorize(request)
        self._data_rate(request, tok)
        body = await self._body(request)
        inst = self._instrument(body)
        try:
            interval = int(str(body.get("interval", "")))
        except ValueError:
            interval = 0
        if interval not in INTERVALS:
            raise DhanError(400, "DH-905", "interval must be one of 1, 5, 15, 25, 60.")
        start = self._parse_when(body.get("fromDate"), end=False)
        end = self._parse_when(body.get("toDate"), end=True)
        if end < start:
            raise DhanError(400, "DH-905", "fromDate is after toDate.")
        if end.date() - start.date() > dt.timedelta(days=limits.MAX_INTRADAY_DAYS_PER_REQUEST):
            raise DhanError(400, "DH-905", f"Intraday data can be fetched for at most "
                                           f"{limits.MAX_INTRADAY_DAYS_PER_REQUEST} days per request.")
        candles = self.source.intraday(inst, interval, int(start.timestamp()), int(end.timestamp()), time.time())
        return _json(candles.to_json(bool(body.get("oi"))))

    async def _h_historical(self, request: web.Request) -> web.Response:
        tok = self._authorize(request)
        self._data_rate(request, tok)
        body = await self._body(request)
        inst = self._instrument(body)
        start = self._parse_when(body.get("fromDate"), end=False)
        end = self._parse_when(body.get("toDate"), end=False)
        candles = self.source.daily(inst, start.date(), end.date(), time.time())
        return _json(candles.to_json(bool(body.get("oi"))))

    async def _h_renew(self, request: web.Request) -> web.Response:
        token = request.headers.get("access-token")
        client = request.headers.get("dhanClientId") or request.headers.get("client-id")
        self._other_rate(client or "")
        tok = self.auth.renew(token, client)
        self.access_token = tok.token
        log.info("event=token_renewed client_id=%s expiry=%s", tok.client_id, tok.expiry_text())
        return _json(self.auth.answer(tok))

    async def _h_generate(self, request: web.Request) -> web.Response:
        q = request.query
        self._other_rate(q.get("dhanClientId", ""))
        try:
            tok = self.auth.generate(q.get("dhanClientId"), q.get("pin"), q.get("totp"))
        except DhanError:
            log.warning("event=generate_token_refused client_id=%r", q.get("dhanClientId"))
            raise
        self.access_token = tok.token
        log.info("event=token_generated client_id=%s expiry=%s", tok.client_id, tok.expiry_text())
        return _json(self.auth.answer(tok))

    async def _h_profile(self, request: web.Request) -> web.Response:
        tok = self._authorize(request, "client-id")
        self._other_rate(tok.client_id)
        return _json({"dhanClientId": tok.client_id,
                      "tokenValidity": dt.datetime.fromtimestamp(tok.expires_at, IST).strftime("%d/%m/%Y %H:%M"),
                      "activeSegment": "Equity, Derivative, Currency, Commodity", "ddpi": "Deactive",
                      "mtf": "Deactive", "dataPlan": "Active", "dataValidity": "2099-12-31 23:59:59.0"})

    # ------------------------------------------------------------------ /sim handlers

    async def _h_sim_stats_reset(self, request: web.Request) -> web.Response:
        self.limiter.reset()
        return _json({"reset": True})

    async def _h_sim_access_token(self, request: web.Request) -> web.Response:
        ttl = float(request.query["ttl"]) if "ttl" in request.query else None
        tok = self.auth.issue(ttl)
        return _json(self.auth.answer(tok))

    async def _h_sim_adjust(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.set_adjusted(request.query.get("applied", "1").lower() not in ("0", "false", "no", "off"))
        return _json({"applied": self.source.adjusted,
                      "corporate_actions": [{"securityId": a.security_id, "exDate": a.ex_date.isoformat(),
                                             "factor": a.factor} for a in self.source.actions.values()]})

    async def _h_sim_session(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            if request.method == "POST":
                return _json(self.open_session(float(q.get("elapsed", "0")),
                                               int(q["minutes"]) if "minutes" in q else None))
            if request.method == "DELETE":
                self.close_session()
        except ValueError as exc:
            raise DhanError(400, "DH-905", str(exc)) from None
        now = time.time()
        return _json(self._session_json(self.sessions.at(now) or self.sessions.next_open(now), now))

    async def _h_sim_candles(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            return _json(self.candles(int(q["securityId"]), q.get("exchangeSegment", "NSE_EQ"), int(q["from"]),
                                      int(q["to"]), int(q.get("interval", "1"))))
        except (KeyError, ValueError) as exc:
            raise DhanError(400, "DH-905", f"bad query: {exc}") from None

    # ------------------------------------------------------------------ the feed

    def _count_disconnect(self, code: int) -> None:
        d = self._counters["disconnects_sent"]
        d[str(code)] = d.get(str(code), 0) + 1

    def _queue(self, conn: _FeedConnection, packet: bytes, kind: str) -> None:
        conn.control.append(ws_frame(packet))
        conn.packets[kind] += 1
        conn.wake.set()

    async def _close(self, conn: _FeedConnection | web.WebSocketResponse, code: int, reason: str) -> None:
        ws = conn.ws if isinstance(conn, _FeedConnection) else conn
        if isinstance(conn, _FeedConnection):
            conn.closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, message=reason.encode()), 3.0)
        if not ws.closed and isinstance(conn, _FeedConnection):
            conn.transport.abort()

    async def _disconnect(self, conn: _FeedConnection, code: int) -> None:
        """Feed Disconnect packet with ``code``, then the close."""
        if conn.closing:
            return
        conn.closing = True
        self._count_disconnect(code)
        conn.packets["disconnect"] += 1
        log.warning("event=feed_disconnect id=%d code=%d", conn.cid, code)
        with contextlib.suppress(Exception):
            conn.transport.write(ws_frame(P.pack_disconnect(code)))
        await self._close(conn, 1000, f"disconnect {code}")

    async def _refuse(self, request: web.Request, code: int, why: str) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False, compress=False)
        await ws.prepare(request)
        refused = self._counters["refused"]
        refused[str(code)] = refused.get(str(code), 0) + 1
        self._count_disconnect(code)
        log.warning("event=feed_refused code=%d reason=%s peer=%s", code, why, request.remote)
        with contextlib.suppress(Exception):
            await ws.send_bytes(P.pack_disconnect(code))
        await self._close(ws, 1000, f"disconnect {code}")
        return ws

    async def _feed(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        if self._stopping:
            return web.Response(status=503, text="Service unavailable")
        if q.get("version") != "2" or q.get("authType", "2") != "2":
            return await self._refuse(request, 814, "version/authType")
        tok = self.auth.lookup(q.get("token"))
        if tok is None:
            return await self._refuse(request, 809, "invalid_token")
        if not tok.valid(time.time()):
            return await self._refuse(request, 807, "token_expired")
        if q.get("clientId") != self.auth.client_id:
            return await self._refuse(request, 810, "client_id")
        ws = web.WebSocketResponse(autoping=False, compress=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        mine = sorted((c for c in self._connections.values() if c.client_id == tok.client_id and not c.closing),
                      key=lambda c: c.cid)
        conn = self._open(lambda cid: _FeedConnection(cid, tok.client_id, tok.token, str(request.remote), ws,
                                                      request.transport, Subscriptions(self.live)))
        while len(mine) >= self.max_connections:
            oldest = mine.pop(0)
            asyncio.ensure_future(self._disconnect(oldest, 805))
        conn.tasks = [asyncio.create_task(self._sender(conn), name=f"dhan-feed-{conn.cid}"),
                      asyncio.create_task(self._pinger(conn), name=f"dhan-ping-{conn.cid}")]

        async def on_message(msg: WSMessage) -> None:
            conn.last_heard = time.monotonic()
            if msg.type == WSMsgType.TEXT:
                await self._on_text(conn, msg.data)
            elif msg.type == WSMsgType.PING:
                if conn.silenced_until <= time.monotonic():
                    with contextlib.suppress(Exception):
                        await ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                conn.pongs += 1
            elif msg.type == WSMsgType.BINARY:
                self._bad(conn, "binary request (v2 requests are JSON text)")

        await self._receive(conn, on_message, conn.tasks)
        return ws

    def _bad(self, conn: _FeedConnection, reason: str) -> None:
        conn.bad_messages += 1
        self._counters["bad_messages"] += 1
        log.warning("event=feed_bad_request id=%d reason=%r", conn.cid, reason)

    async def _on_text(self, conn: _FeedConnection, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._bad(conn, "invalid JSON")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("RequestCode"), int):
            self._bad(conn, "no RequestCode")
            return
        code = msg["RequestCode"]
        if code == 12:
            log.info("event=feed_disconnect_request id=%d", conn.cid)
            await self._close(conn, 1000, "disconnect requested")
            return
        if code not in MODE_OF_REQUEST and code not in UNSUBSCRIBE:
            self._bad(conn, f"unknown RequestCode {code}")
            return
        items = msg.get("InstrumentList")
        if not isinstance(items, list):
            self._bad(conn, "InstrumentList is not a list")
            return
        if len(items) > self.max_per_message:
            log.warning("event=feed_limit id=%d reason=per_message count=%d limit=%d", conn.cid, len(items),
                        self.max_per_message)
            await self._disconnect(conn, 804)
            return
        insts: list[Instrument] = []
        for item in items:
            try:
                seg = item["ExchangeSegment"]
                seg = SEGMENTS[seg] if isinstance(seg, str) else int(seg)
                inst = self.master.get(seg, int(str(item["SecurityId"])))
            except (KeyError, TypeError, ValueError):
                inst = None
            if inst is None:
                self._bad(conn, f"unknown instrument {item!r}")
                continue
            insts.append(inst)
        subs = conn.subs
        if code in UNSUBSCRIBE:
            subs.remove(insts)
            conn.wake.set()
            return
        new_keys = {(i.segment, i.security_id) for i in insts} - set(subs.index)
        if len(subs) + len(new_keys) > self.max_instruments:
            log.warning("event=feed_limit id=%d reason=per_connection count=%d limit=%d", conn.cid,
                        len(subs) + len(new_keys), self.max_instruments)
            await self._disconnect(conn, 804)
            return
        mode = MODE_OF_REQUEST[code]
        added = subs.add(insts, mode)
        now = time.time()
        session = self.sessions.at(now) or self.sessions.next_open(now)
        prevs = self.live.prev_closes(insts, session) if session is not None else [0] * len(insts)
        for inst, prev in zip(insts, prevs):
            self._queue(conn, P.pack_prev_close(inst.segment, inst.security_id, prev / 100.0, 0), "prev_close")
            if mode == QUOTE:
                self._queue(conn, P.pack_oi(inst.segment, inst.security_id, 0), "oi")
        if added:
            log.info("event=feed_subscribed id=%d mode=%s added=%d total=%d", conn.cid, MODE_NAMES[mode],
                     len(added), len(subs))
        conn.wake.set()

    def _write(self, conn: _FeedConnection, data: bytes, counts: dict[int, int] | None = None) -> None:
        if not data:
            return
        conn.transport.write(data)
        conn.bytes_sent += len(data)
        if counts:
            n = sum(counts.values())
            conn.frames_sent += n
            conn.packets["ticker"] += counts[TICKER]
            conn.packets["quote"] += counts[QUOTE]
            conn.packets["full"] += counts[FULL]

    async def _sender(self, conn: _FeedConnection) -> None:
        """Per connection: control packets, then every trade due, as they fall due."""
        subs = conn.subs
        try:
            while not conn.ws.closed and not conn.closing:
                now_m = time.monotonic()
                if conn.silenced_until > now_m:
                    await self._wait(conn, conn.silenced_until - now_m)
                    continue
                if conn.transport.is_closing():
                    break
                if self.auth.lookup(conn.token).expires_at <= time.time():
                    await self._disconnect(conn, 807)     # expired (a renewal alone does not close the feed)
                    break
                if conn.transport.get_write_buffer_size() > (8 << 20):
                    await asyncio.sleep(0.01)            # the client is slow: trades wait, none is lost
                    continue
                if conn.control:
                    data, conn.control = b"".join(conn.control), []
                    self._write(conn, data)
                now = time.time()
                session = self.sessions.at(now)
                if session is None:
                    if subs.session is not None:
                        self._write(conn, *subs.end_session())
                    if conn.in_session:
                        self._write(conn, ws_frame(P.pack_market_status()))
                        conn.packets["market_status"] += 1
                    conn.in_session = False
                    nxt = self.sessions.next_open(now)
                    await self._wait(conn, min(1.0, max(0.01, (nxt.open - now) if nxt else 1.0)))
                    continue
                if subs.session is not None and subs.session != session:
                    self._write(conn, *subs.end_session())
                if not conn.in_session:
                    self._write(conn, ws_frame(P.pack_market_status()))
                    conn.packets["market_status"] += 1
                    conn.in_session = True
                self._write(conn, *subs.prepare(session, now))   # also with no rows: the minute runs on
                self._write(conn, *subs.take(now))
                nxt = min(subs.next_due(), session.close)
                await self._wait(conn, min(0.25, max(0.005, nxt - time.time())))
        except (ConnectionError, RuntimeError) as exc:
            log.info("event=feed_send_stopped id=%d error=%r", conn.cid, exc)
        except asyncio.CancelledError:
            pass

    async def _pinger(self, conn: _FeedConnection) -> None:
        """Ping every ``ping_interval``; close a connection that sent nothing (no pong,
        no other frame) for ``idle_timeout`` seconds after a ping."""
        try:
            while not conn.ws.closed and not conn.closing:
                await asyncio.sleep(min(self.ping_interval, self.idle_timeout / 4))
                now = time.monotonic()
                waiting = conn.unanswered_since
                if waiting is not None and conn.last_heard >= waiting:
                    waiting = conn.unanswered_since = None          # answered
                if waiting is not None and now - waiting > self.idle_timeout:
                    self._counters["idle_closed"] += 1
                    log.warning("event=feed_idle_close id=%d silent_for=%.1f", conn.cid, now - conn.last_heard)
                    conn.closing = True
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.ws.close(code=1000, message=b"no pong"), 2.0)
                    conn.transport.abort()
                    return
                if conn.silenced_until <= now and now - conn.last_ping >= self.ping_interval:
                    conn.last_ping = now
                    if conn.unanswered_since is None:
                        conn.unanswered_since = now
                    with contextlib.suppress(Exception):
                        await conn.ws.ping()
                        conn.pings_sent += 1
        except asyncio.CancelledError:
            pass
