"""Zerodha Kite Connect simulator: REST API, web login pages and binary ticker.

One aiohttp server on one port speaks, on loopback, what the unmodified
``kiteconnect`` 5.2.2 client expects from api.kite.trade, kite.zerodha.com
and ws.kite.trade:

* REST (Kite Connect v3, envelope ``{"status": "success", "data": ...}``,
  errors ``{"status": "error", "message", "error_type"}`` with Kite's HTTP
  codes): ``GET /instruments``, ``GET /instruments/{exchange}`` (CSV, no
  token needed, as on Kite), ``POST``/``DELETE /session/token``,
  ``GET /user/profile``, ``GET /quote``, ``/quote/ltp``, ``/quote/ohlc``
  (``i=EXCHANGE:SYMBOL`` repeated), ``GET /instruments/historical/{token}/
  {interval}?from=..&to=..``.  Per-endpoint rate limits as Kite documents
  them (quote endpoints 1/s, historical 3/s, others 10/s) answer 429
  ``NetworkException`` "Too many requests".  Historical candles of the
  minutes since the simulator started are those of the trades it generated
  and sent as ticks (:mod:`feeds.sim.kite_bars`; :meth:`KiteSimulator.
  minute_bars`), so a client's candles built from the ticks can be compared
  with them; earlier minutes are generated per instrument and day.
* Web login (see :mod:`feeds.sim.kite_auth`): ``GET /connect/login``,
  ``POST /api/login``, ``POST /api/twofa``, ``GET /connect/finish`` -> 302
  to ``<redirect_url>?action=login&type=login&status=success&request_token=..``.
  The page works in a real browser (plain HTML, inline JS with fetch).
* Ticker (Kite Connect v3 "WebSocket streaming"): WebSocket upgrade on
  ``/?api_key=..&access_token=..`` (KiteTicker's URL); an invalid or
  expired token gets HTTP 403, a 4th connection for one api_key HTTP 429
  (Kite answers "WebSocket connection upgrade failed (429 -
  TooManyRequests)").  Text messages ``{"a": "subscribe"|"unsubscribe",
  "v": [tokens]}`` and ``{"a": "mode", "v": [mode, [tokens]]}``; default
  mode after subscribe is quote; a subscription beyond 3000 instruments is
  cut at 3000 and answered with a ``{"type": "error"}`` text message.
  Binary frames batch every due packet (see :mod:`feeds.sim.kite_packets`);
  a 1-byte heartbeat is sent after ``heartbeat_interval`` seconds without
  data.  On subscribe or mode change the current state is sent at once,
  then each instrument ticks ``rate`` times a second.  INFY (408065) replays
  the recorded packets from ``shared/data/kite`` unchanged.
* Control (simulator only, under ``/sim``): ``GET /sim/stats``,
  ``POST /sim/fault/silence?seconds=S``, ``/sim/fault/disconnect[?code=]``,
  ``/sim/fault/expire_tokens[?disconnect=0]``,
  ``/sim/fault/malformed[?kind=bad_length|truncated]``,
  ``/sim/fault/error?message=``, ``/sim/fault/message?message=``,
  ``POST /sim/access_token`` (a valid token without the login),
  ``POST /sim/unlock``; every fault takes ``connection=<id>`` to target one
  ticker connection.

Use :class:`KiteSimulator` from asyncio (``await start()`` / ``stop()``),
from synchronous tests (``with sim.running(): ...``), or from the command
line (``bin/feed-sim-kite``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, time as dtime
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

import numpy as np
import orjson
from aiohttp import WSMessage, WSMsgType, web

from .common import PerSecondLimiter, SimServer, json_response, shared_data_dir
from .kite_auth import AuthState, KiteAccount, KiteError
from .kite_bars import MinuteBar
from .kite_instruments import (
    HistoricalError,
    InstrumentMaster,
    SessionCalendar,
    historical_candles,
    parse_kite_datetime,
)
from .kite_packets import (
    HEARTBEAT,
    IST,
    MODE_CODES,
    MODE_NAMES,
    MODE_QUOTE,
    Market,
    RecordedPackets,
    malformed_packet,
)

log = logging.getLogger(__name__)

#: Kite's documented per-second REST limits, per endpoint here.
REST_RATE_LIMITS = {"/quote": 1, "/quote/ltp": 1, "/quote/ohlc": 1, "historical": 3, "default": 10}
QUOTE_MAX_INSTRUMENTS = {"/quote": 500, "/quote/ltp": 1000, "/quote/ohlc": 1000}


def _ok(data: Any) -> web.Response:
    return json_response({"status": "success", "data": data})


# ----------------------------------------------------------------------------
# ticker connections


@dataclass
class _TickerConnection:
    cid: int
    api_key: str
    access_token: str
    peer: str
    transport: asyncio.BaseTransport | None
    ws: web.WebSocketResponse
    connected_at: float = field(default_factory=time.time)
    modes: dict[int, int] = field(default_factory=dict)
    snapshot: set[int] = field(default_factory=set)
    dirty: bool = False
    row_tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    row_modes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    period: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    due: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    silenced_until: float = 0.0
    pending_malformed: list[str] = field(default_factory=list)
    pending_text: list[str] = field(default_factory=list)
    packets_sent: list[int] = field(default_factory=lambda: [0, 0, 0])
    frames_sent: int = 0
    heartbeats_sent: int = 0
    bytes_sent: int = 0
    texts_sent: int = 0
    bad_messages: int = 0
    sender: asyncio.Task | None = None

    def stats(self) -> dict:
        by_mode: dict[str, list[int]] = {name: [] for name in MODE_NAMES}
        for token, mode in self.modes.items():
            by_mode[MODE_NAMES[mode]].append(token)
        return {
            "id": self.cid,
            "api_key": self.api_key,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "subscribed": len(self.modes),
            "modes": {name: len(tokens) for name, tokens in by_mode.items()},
            "tokens": by_mode,
            "packets_sent": dict(zip(MODE_NAMES, self.packets_sent)),
            "frames_sent": self.frames_sent,
            "heartbeats_sent": self.heartbeats_sent,
            "bytes_sent": self.bytes_sent,
            "texts_sent": self.texts_sent,
            "bad_messages": self.bad_messages,
            "silenced": self.silenced_until > time.monotonic(),
        }


# ----------------------------------------------------------------------------
# the simulator


class KiteSimulator(SimServer):
    """Kite Connect REST + login + ticker simulator on one HTTP port.

    Parameters (all keyword except host/port):

    * ``host``, ``port``: bind address; port 0 picks a free port (see
      ``.port`` after ``start()``).
    * ``api_key``, ``api_secret``, ``user_id``, ``password``,
      ``totp_secret`` (base32), ``redirect_url`` (None: the simulator's own
      ``/sim/login_done`` page): the one app and user it knows.
    * ``rate``: ticks per second per subscribed instrument (float; 0 sends
      only the snapshot on subscribe/mode change); ``rates``: per-token
      overrides ``{instrument_token: rate}``.
    * ``heartbeat_interval``: seconds without data before a 1-byte heartbeat.
    * ``max_connections`` (3 per api_key), ``max_instruments`` (3000 per
      connection): Kite's limits.
    * ``token_expiry``: IST time of day access tokens expire (``"06:00"``);
      ``token_ttl``: seconds, overrides token_expiry when set.
    * ``data_dir``: recorded data root (``shared/data``; default
      :func:`feeds.sim.common.shared_data_dir`); ``replay``: replay INFY's recorded packets.
    * ``min_nse_equities``: size of the NSE equity universe (generated).
    * ``rest_rate_limits``: enforce Kite's per-second REST limits.
    * ``seed``: random seed of the generated market.

    Raises ValueError for inconsistent parameters.  Methods other than
    start/stop are safe to call from any thread once started.
    """

    venue = "kite"
    log = log
    Error = KiteError
    connection_kind = "ticker"
    running_timeout = 15.0
    call_timeout = 10.0

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str = "simkey",
        api_secret: str = "simsecret",
        user_id: str = "AB1234",
        password: str = "simpassword",
        totp_secret: str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
        redirect_url: str | None = None,
        rate: float = 1.0,
        rates: dict[int, float] | None = None,
        heartbeat_interval: float = 1.0,
        max_connections: int = 3,
        max_instruments: int = 3000,
        token_expiry: str | dtime = "06:00",
        token_ttl: float | None = None,
        data_dir: Path | str | None = None,
        replay: bool = True,
        min_nse_equities: int = 10_000,
        rest_rate_limits: bool = True,
        seed: int | None = None,
    ) -> None:
        if rate < 0 or heartbeat_interval <= 0 or max_connections < 1 or max_instruments < 1:
            raise ValueError("rate must be >= 0, heartbeat_interval > 0, limits >= 1")
        if isinstance(token_expiry, str):
            try:
                hh, mm = token_expiry.split(":")
                token_expiry = dtime(int(hh), int(mm))
            except ValueError as exc:
                raise ValueError(f"token_expiry must be HH:MM, got {token_expiry!r}") from exc
        super().__init__(host, port)
        self.rate = float(rate)
        self.rates = {int(k): float(v) for k, v in (rates or {}).items()}
        self.heartbeat_interval = float(heartbeat_interval)
        self.max_connections = max_connections
        self.max_instruments = max_instruments
        self.account = KiteAccount(api_key=api_key, api_secret=api_secret, user_id=user_id,
                                   password=password, totp_secret=totp_secret, redirect_url=redirect_url)
        self.auth = AuthState(self.account, token_expiry=token_expiry, token_ttl=token_ttl)
        root = Path(data_dir) if data_dir is not None else shared_data_dir()
        kite_dir = root / "kite" if root is not None and (root / "kite").is_dir() else None
        self.data_dir = kite_dir
        self.master = InstrumentMaster.build(kite_dir, min_nse_equities=min_nse_equities)
        recorded = RecordedPackets.load(kite_dir) if (kite_dir is not None and replay) else None
        insts = self.master.instruments
        self.market = Market(
            [i.instrument_token for i in insts],
            [i.tick_size for i in insts],
            [i.reference_price for i in insts],
            seed=seed,
            replay=[recorded] if recorded else [],
        )
        self.replayed_tokens = [recorded.instrument_token] if recorded else []
        self.calendar = SessionCalendar()
        self._limiter = PerSecondLimiter() if rest_rate_limits else None
        self._connections: dict[int, _TickerConnection] = {}
        self._pending_handshakes: dict[str, int] = {}
        self._counters: dict[str, int] = {
            "connections_total": 0, "refused_403": 0, "refused_429": 0,
            "rest_requests": 0, "rest_errors": 0, "rate_limited": 0,
            "bad_client_messages": 0, "subscribe_over_limit": 0, "disconnects_forced": 0,
        }

    # ------------------------------------------------------------ lifecycle

    @property
    def ws_url(self) -> str:
        """``ws://host:port/``, the KiteTicker ``root``; valid after start()."""
        return "ws" + self.base_url[len("http"):] + "/"

    @property
    def redirect_url(self) -> str:
        """Where a finished login redirects (configured, or ``/sim/login_done``)."""
        return self.account.redirect_url or f"{self.base_url}/sim/login_done"

    def _build_app(self) -> web.Application:
        app = self._app(client_max_size=2 * 1024 * 1024)
        r = app.router
        r.add_get("/", self._h_root)
        r.add_get("/instruments", self._h_instruments)
        r.add_get("/instruments/historical/{token}/{interval}", self._h_historical)
        r.add_get("/instruments/{exchange}", self._h_instruments)
        r.add_post("/session/token", self._h_session_token)
        r.add_delete("/session/token", self._h_session_delete)
        r.add_get("/user/profile", self._h_profile)
        r.add_get("/quote", self._h_quote)
        r.add_get("/quote/ltp", self._h_quote)
        r.add_get("/quote/ohlc", self._h_quote)
        r.add_get("/connect/login", self._h_connect_login)
        r.add_get("/connect/finish", self._h_connect_finish)
        r.add_post("/api/login", self._h_api_login)
        r.add_post("/api/twofa", self._h_api_twofa)
        r.add_get("/sim/login_done", self._h_sim_login_done)
        r.add_post("/sim/access_token", self._h_sim_access_token)
        r.add_post("/sim/unlock", self._h_sim_unlock)
        return app

    async def start(self) -> None:
        """Bind and start serving; sets ``.port``.  Raises OSError if the bind fails."""
        await self._serve(self._build_app())
        log.info("event=kite_sim_started url=%s instruments=%d replay=%s",
                 self.base_url, len(self.master.instruments), self.replayed_tokens)

    async def stop(self) -> None:
        """Close every ticker connection (going away) and stop the server."""
        await self._shutdown(lambda conn: self._close_connection(conn, code=1001, reason="simulator stopping"))
        log.info("event=kite_sim_stopped")

    async def serve_forever(self) -> None:
        """start(), print the URLs on stdout, run until SIGINT/SIGTERM, stop()."""
        await self.start()
        print(f"kite simulator listening on {self.base_url} (ticker {self.ws_url}, "
              f"api_key {self.account.api_key})", flush=True)
        await self._run_until_signal()

    # ------------------------------------------------------------ stats/faults

    def stats(self) -> dict:
        """Snapshot of counters: connections (per connection: subscribed
        tokens and modes, packets sent per mode, frames, heartbeats, bytes),
        refusals (403/429), REST requests/errors/rate-limited, login counters,
        bad client messages."""
        def snap() -> dict:
            auth = self.auth.stats
            return {
                "connections": [c.stats() for c in self._connections.values()],
                "active_connections": len(self._connections),
                **self._counters,
                "auth": {
                    "logins_ok": auth.logins_ok, "logins_failed": auth.logins_failed,
                    "twofa_ok": auth.twofa_ok, "twofa_failed": auth.twofa_failed,
                    "request_tokens_issued": auth.request_tokens_issued,
                    "access_tokens_issued": auth.access_tokens_issued,
                    "token_rejections": auth.token_rejections,
                    "expirations_forced": auth.expirations_forced,
                    "locked": auth.locked, "failed_attempts": auth.failed_attempts,
                },
                "instruments": len(self.master.instruments),
                "replayed_tokens": self.replayed_tokens,
            }
        return self._call(snap)

    def fault_disconnect(self, code: int | None = None, connection: int | None = None) -> int:
        """Drop ticker connections: with ``code`` None the TCP connection is
        aborted (no close frame, the client sees 1006), otherwise a close frame
        with that code is sent.  Returns the number dropped."""
        def drop(conn: _TickerConnection) -> None:
            self._counters["disconnects_forced"] += 1
            if code is None:
                self._abort(conn, "fault_disconnect")
            else:
                asyncio.ensure_future(self._close_connection(conn, code=code, reason="disconnect fault"))
        return self._each(connection, drop, "event=fault_disconnect code=%s connections=%d", code)

    def fault_expire_tokens(self, disconnect: bool = True) -> int:
        """Expire every access token now (REST answers 403 TokenException,
        the ticker refuses with HTTP 403).  With ``disconnect`` the open ticker
        connections are aborted as well.  Returns tokens expired."""
        def run() -> int:
            n = self.auth.expire_all()
            if disconnect:
                for conn in list(self._connections.values()):
                    self._abort(conn, "token_expired")
            log.warning("event=fault_expire_tokens tokens=%d disconnect=%s", n, disconnect)
            return n
        return self._call(run)

    def fault_malformed(self, kind: str = "bad_length", connection: int | None = None) -> int:
        """Put one malformed packet in the next frame of every (or one)
        connection: ``bad_length`` (a 43-byte packet) or ``truncated`` (length
        prefix larger than the bytes left).  Returns connections affected."""
        malformed_packet(kind, 0)  # validates kind

        def queue(conn: _TickerConnection) -> None:
            conn.pending_malformed.append(kind)
            conn.wake.set()
        return self._each(connection, queue, "event=fault_malformed kind=%s connections=%d", kind)

    def send_text(self, kind: str, message: str, connection: int | None = None) -> int:
        """Send a ``{"type": kind, "data": message}`` text message (kind is
        ``error`` or ``message``) on every (or one) connection."""
        if kind not in ("error", "message"):
            raise ValueError("kind must be 'error' or 'message'")
        text = orjson.dumps({"type": kind, "data": message}).decode()

        def queue(conn: _TickerConnection) -> None:
            conn.pending_text.append(text)
            conn.wake.set()
        return self._each(connection, queue)

    def minute_bars(self, instrument_token: int, first: int = 0, last: int = 2**62) -> list[MinuteBar]:
        """The minute candles of the trades generated for ``instrument_token``
        (sent as its ticks) whose minute starts in [first, last] (epoch
        seconds), ascending, the current minute included; prices in integer
        units of the instrument's segment.  Raises KeyError for a token the
        simulator does not know."""
        row = self.market.row_of[instrument_token]
        return self._call(lambda: self.market.bars.bars(row, first, last))

    def issue_access_token(self) -> str:
        """A valid access token for the configured api_key, without the login flow."""
        return self._call(self.auth.issue_access_token)

    def unlock_account(self) -> None:
        """Unlock the user after too many wrong passwords."""
        self._call(self.auth.unlock)

    def totp_now(self) -> str:
        """The TOTP code valid now for the configured secret."""
        return self.auth.totp_now()

    # ------------------------------------------------------------ errors and answers

    def _input_error(self, message: str) -> KiteError:
        return KiteError(400, "InputException", message)

    def _http_error(self, status: int) -> KiteError:
        return KiteError(status, "GeneralException", {404: "Route not found", 405: "Method not allowed"}.get(
            status, "Internal server error"))

    def _rest_error(self, request: web.Request, exc: KiteError) -> None:
        if exc.status == 429:
            self._counters["rate_limited"] += 1
        log.info("event=rest_error method=%s path=%s status=%d error_type=%s message=%r",
                 request.method, request.path, exc.status, exc.error_type, exc.message)

    def _reply(self, data: Any) -> web.Response:
        return _ok(data)

    def _unknown_fault(self, name: str) -> KiteError:
        return KiteError(404, "GeneralException", f"unknown fault {name!r}")

    def _faults(self, q: Mapping[str, str], connection: int | None) -> dict[str, Callable[[], int]]:
        return {
            "silence": lambda: self.fault_silence(float(q.get("seconds", "5")), connection),
            "disconnect": lambda: self.fault_disconnect(int(q["code"]) if "code" in q else None, connection),
            "expire_tokens": lambda: self.fault_expire_tokens(
                disconnect=q.get("disconnect", "1") not in ("0", "false")),
            "malformed": lambda: self.fault_malformed(q.get("kind", "bad_length"), connection),
            "error": lambda: self.send_text("error", q.get("message", "simulated error"), connection),
            "message": lambda: self.send_text("message", q.get("message", "simulated message"), connection),
        }

    def _rate(self, who: str, group: str) -> None:
        limit = REST_RATE_LIMITS.get(group, REST_RATE_LIMITS["default"])
        if self._limiter is not None and not self._limiter.allow((who, group), limit):
            raise KiteError(429, "NetworkException", "Too many requests")

    def _authorize(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        api_key = token = None
        if header.startswith("token "):
            api_key, _, token = header[6:].strip().partition(":")
        self.auth.check_access(api_key, token)
        return api_key or ""

    @staticmethod
    async def _form(request: web.Request) -> dict[str, str]:
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise KiteError(400, "InputException", "Invalid JSON body.") from None
            if not isinstance(body, dict):
                raise KiteError(400, "InputException", "Invalid JSON body.")
            return {str(k): str(v) for k, v in body.items()}
        form = await request.post()
        return {k: str(v) for k, v in form.items()}

    # ------------------------------------------------------------ REST

    async def _h_root(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._ticker(request)
        return _ok({"service": "Kite Connect simulator", "rest": self.base_url, "ticker": self.ws_url,
                    "login": f"{self.base_url}/connect/login?api_key={self.account.api_key}&v=3"})

    async def _h_instruments(self, request: web.Request) -> web.Response:
        self._rate(request.remote or "", "default")
        exchange = request.match_info.get("exchange")
        if exchange is not None:
            exchange = exchange.upper()
            if exchange not in self.master.exchanges:
                raise KiteError(400, "InputException", f"Invalid exchange `{exchange}`.")
        return web.Response(body=self.master.csv_bytes(exchange), content_type="text/csv")

    async def _h_session_token(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        self._rate(form.get("api_key", ""), "default")
        data = self.auth.exchange(form.get("api_key"), form.get("request_token"), form.get("checksum"))
        log.info("event=session_created user_id=%s", data["user_id"])
        return _ok(data)

    async def _h_session_delete(self, request: web.Request) -> web.Response:
        q = request.query
        self._rate(q.get("api_key", ""), "default")
        return _ok(self.auth.invalidate(q.get("api_key"), q.get("access_token")))

    async def _h_profile(self, request: web.Request) -> web.Response:
        api_key = self._authorize(request)
        self._rate(api_key, "default")
        return _ok(self.auth.profile())

    async def _h_quote(self, request: web.Request) -> web.Response:
        api_key = self._authorize(request)
        path = request.path.rstrip("/")
        self._rate(api_key, path)
        keys = request.query.getall("i", [])
        if len(keys) > QUOTE_MAX_INSTRUMENTS[path]:
            raise KiteError(400, "InputException",
                            f"Too many instruments: at most {QUOTE_MAX_INSTRUMENTS[path]} per request.")
        view = {"/quote": self.market.quote_view, "/quote/ltp": self.market.ltp_view,
                "/quote/ohlc": self.market.ohlc_view}[path]
        data = {}
        for key in keys:
            inst = self.master.by_key.get(key)
            if inst is None:
                continue
            data[key] = view(self.market.row_of[inst.instrument_token])
        return _ok(data)

    async def _h_historical(self, request: web.Request) -> web.Response:
        api_key = self._authorize(request)
        self._rate(api_key, "historical")
        try:
            token = int(request.match_info["token"])
        except ValueError:
            raise KiteError(400, "InputException", "invalid token") from None
        inst = self.master.by_token.get(token)
        if inst is None:
            raise KiteError(400, "InputException", "invalid token")
        q = request.query
        try:
            start = parse_kite_datetime(q.get("from", ""))
            end = parse_kite_datetime(q.get("to", ""))
            row = self.market.row_of[token]
            base = int(self.market.close[row]) / int(self.market.divisor[row])
            bars = self.market.bars
            candles = historical_candles(
                inst, base, request.match_info["interval"], start, end,
                calendar=self.calendar, now=datetime.now(IST), oi=q.get("oi") in ("1", "true"),
                traded=lambda first, last: bars.bars(row, first, last), traded_since=bars.since,
                divisor=int(self.market.divisor[row]),
            )
        except HistoricalError as exc:
            raise KiteError(400, "InputException", str(exc)) from None
        return _ok({"candles": candles})

    # ------------------------------------------------------------ login pages

    def _finish_url(self, api_key: str, sess_id: str) -> str:
        return "/connect/finish?" + urlencode({"api_key": api_key, "sess_id": sess_id})

    async def _h_connect_login(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        api_key = q.get("api_key", "")
        self.auth.check_api_key(api_key)
        sess_id = q.get("sess_id")
        if not self.auth.connect_session_valid(api_key, sess_id):
            sess_id = self.auth.open_connect_session(api_key)
            raise web.HTTPFound("/connect/login?" + urlencode({"api_key": api_key, "sess_id": sess_id}))
        if self.auth.web_session_user(request.cookies.get("kf_session")):
            raise web.HTTPFound(self._finish_url(api_key, sess_id))
        return web.Response(text=_login_page(api_key, sess_id), content_type="text/html")

    async def _h_connect_finish(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        api_key = q.get("api_key", "")
        self.auth.check_api_key(api_key)
        sess_id = q.get("sess_id", "")
        if not self.auth.connect_session_valid(api_key, sess_id) or \
                not self.auth.web_session_user(request.cookies.get("kf_session")):
            raise web.HTTPFound("/connect/login?" + urlencode({"api_key": api_key, "v": "3"}))
        request_token = self.auth.issue_request_token(api_key, request.cookies.get("kf_session"))
        parts = urlsplit(self.redirect_url)
        query = parse_qsl(parts.query, keep_blank_values=True) + [
            ("action", "login"), ("type", "login"), ("status", "success"), ("request_token", request_token)]
        log.info("event=login_finished user_id=%s", self.account.user_id)
        raise web.HTTPFound(urlunsplit(parts._replace(query=urlencode(query))))

    async def _h_api_login(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        try:
            data = self.auth.login(form.get("user_id"), form.get("password"))
        except KiteError as exc:
            log.warning("event=login_failed user_id=%r status=%d", form.get("user_id"), exc.status)
            raise
        return _ok(data)

    async def _h_api_twofa(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        try:
            session_id = self.auth.twofa(form.get("user_id"), form.get("request_id"),
                                         form.get("twofa_value"), form.get("twofa_type", "totp"))
        except KiteError:
            log.warning("event=twofa_failed user_id=%r", form.get("user_id"))
            raise
        resp = _ok({"profile": {}})
        resp.set_cookie("kf_session", session_id, path="/", httponly=True, samesite="Lax")
        resp.set_cookie("user_id", self.account.user_id, path="/", samesite="Lax")
        resp.set_cookie("public_token", self.auth.public_token, path="/", samesite="Lax")
        resp.set_cookie("enctoken", session_id[:24], path="/", httponly=True, samesite="Lax")
        log.info("event=twofa_ok user_id=%s", self.account.user_id)
        return resp

    # ------------------------------------------------------------ /sim control

    async def _h_sim_login_done(self, request: web.Request) -> web.Response:
        token = html.escape(request.query.get("request_token", ""))
        status = html.escape(request.query.get("status", ""))
        return web.Response(
            text=(f"<!doctype html><html><head><meta charset='utf-8'><title>Login {status}</title></head>"
                  f"<body><p>Login {status}.</p><p>request_token: <code id='request_token'>{token}</code></p>"
                  "</body></html>"),
            content_type="text/html")

    async def _h_sim_access_token(self, request: web.Request) -> web.Response:
        return _ok({"api_key": self.account.api_key, "access_token": self.auth.issue_access_token()})

    async def _h_sim_unlock(self, request: web.Request) -> web.Response:
        self.auth.unlock()
        return _ok(True)

    # ------------------------------------------------------------ ticker

    async def _ticker(self, request: web.Request) -> web.StreamResponse:
        api_key = request.query.get("api_key", "")
        access_token = request.query.get("access_token", "")
        peer = str(request.remote)
        if self._stopping:
            return web.Response(status=503, text="Service unavailable")
        if not self.auth.is_valid(api_key, access_token):
            self._counters["refused_403"] += 1
            log.warning("event=ticker_refused status=403 peer=%s reason=invalid_or_expired_token", peer)
            return web.Response(status=403, text="Forbidden")
        active = sum(1 for c in self._connections.values() if c.api_key == api_key)
        active += self._pending_handshakes.get(api_key, 0)
        if active >= self.max_connections:
            self._counters["refused_429"] += 1
            log.warning("event=ticker_refused status=429 peer=%s reason=max_connections limit=%d",
                        peer, self.max_connections)
            return web.Response(status=429, text="Too many connections")
        ws = web.WebSocketResponse(autoping=False, compress=False, max_msg_size=1 << 20, timeout=2.0)
        self._pending_handshakes[api_key] = self._pending_handshakes.get(api_key, 0) + 1
        try:
            await ws.prepare(request)
        finally:
            self._pending_handshakes[api_key] -= 1
        conn = self._open(lambda cid: _TickerConnection(cid, api_key, access_token, peer, request.transport, ws))
        conn.sender = asyncio.create_task(self._sender(conn), name=f"kite-ticker-{conn.cid}")

        async def on_message(msg: WSMessage) -> None:
            if msg.type == WSMsgType.TEXT:
                await self._on_client_text(conn, msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self._bad_message(conn, "binary messages are not accepted")
            elif msg.type == WSMsgType.PING:
                if conn.silenced_until <= time.monotonic():
                    await ws.pong(msg.data)

        await self._receive(conn, on_message, [conn.sender])
        return ws

    async def _bad_message(self, conn: _TickerConnection, reason: str) -> None:
        conn.bad_messages += 1
        self._counters["bad_client_messages"] += 1
        log.warning("event=ticker_bad_message id=%d reason=%r", conn.cid, reason)
        await self._send_text(conn, orjson.dumps({"type": "error", "data": reason}).decode())

    async def _send_text(self, conn: _TickerConnection, text: str) -> None:
        if conn.silenced_until > time.monotonic() or conn.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.send_str(text)
            conn.texts_sent += 1

    @staticmethod
    def _parse_tokens(value: Any) -> list[int] | None:
        if not isinstance(value, list):
            return None
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0 or item > 0xFFFFFFFF:
                return None
            out.append(item)
        return out

    async def _on_client_text(self, conn: _TickerConnection, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self._bad_message(conn, "invalid JSON message")
            return
        if not isinstance(msg, dict):
            await self._bad_message(conn, "message must be a JSON object")
            return
        action, value = msg.get("a"), msg.get("v")
        if action == "subscribe":
            tokens = self._parse_tokens(value)
            if tokens is None:
                await self._bad_message(conn, "subscribe expects a list of instrument tokens")
                return
            await self._subscribe(conn, tokens)
        elif action == "unsubscribe":
            tokens = self._parse_tokens(value)
            if tokens is None:
                await self._bad_message(conn, "unsubscribe expects a list of instrument tokens")
                return
            for t in tokens:
                conn.modes.pop(t, None)
            conn.dirty = True
            conn.wake.set()
        elif action == "mode":
            if not (isinstance(value, list) and len(value) == 2 and value[0] in MODE_CODES):
                await self._bad_message(conn, "mode expects [\"ltp\"|\"quote\"|\"full\", [tokens]]")
                return
            tokens = self._parse_tokens(value[1])
            if tokens is None:
                await self._bad_message(conn, "mode expects a list of instrument tokens")
                return
            code = MODE_CODES[value[0]]
            for t in tokens:
                if t in conn.modes:
                    conn.modes[t] = code
                    conn.snapshot.add(t)
            conn.dirty = True
            conn.wake.set()
        else:
            await self._bad_message(conn, f"unknown action {action!r}")

    async def _subscribe(self, conn: _TickerConnection, tokens: list[int]) -> None:
        new = [t for t in dict.fromkeys(tokens) if t not in conn.modes]
        room = max(0, self.max_instruments - len(conn.modes))
        accepted, ignored = new[:room], new[room:]
        for t in accepted:
            conn.modes[t] = MODE_QUOTE
        conn.snapshot.update(accepted)
        conn.dirty = True
        conn.wake.set()
        if ignored:
            self._counters["subscribe_over_limit"] += 1
            log.warning("event=ticker_subscribe_over_limit id=%d accepted=%d ignored=%d limit=%d",
                        conn.cid, len(accepted), len(ignored), self.max_instruments)
            await self._send_text(conn, orjson.dumps({
                "type": "error",
                "data": (f"Subscription limit exceeded: at most {self.max_instruments} instruments per "
                         f"connection; {len(ignored)} instrument(s) ignored."),
            }).decode())

    def _rate_for(self, token: int) -> float:
        return self.rates.get(token, self.rate)

    def _rebuild(self, conn: _TickerConnection, now: float) -> None:
        old_due = dict(zip(conn.row_tokens.tolist(), conn.due.tolist()))
        row_of = self.market.row_of
        tokens = [t for t in conn.modes if t in row_of]
        periods = [1.0 / r if (r := self._rate_for(t)) > 0 else float("inf") for t in tokens]
        due = []
        for t, p in zip(tokens, periods):
            if t in conn.snapshot:
                due.append(now)
            else:
                due.append(old_due.get(t, now + p))
        conn.row_tokens = np.array(tokens, dtype=np.int64)
        conn.rows = np.array([row_of[t] for t in tokens], dtype=np.int64)
        conn.row_modes = np.array([conn.modes[t] for t in tokens], dtype=np.int64)
        conn.period = np.array(periods, dtype=np.float64)
        conn.due = np.array(due, dtype=np.float64)
        conn.snapshot.clear()
        conn.dirty = False

    def _abort(self, conn: _TickerConnection, reason: str) -> None:
        log.warning("event=ticker_abort id=%d reason=%s", conn.cid, reason)
        if conn.transport is not None:
            conn.transport.abort()  # type: ignore[attr-defined]

    async def _close_connection(self, conn: _TickerConnection, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.ws.close(code=code, message=reason.encode()), 3.0)
        if not conn.ws.closed:
            self._abort(conn, reason)

    async def _sender(self, conn: _TickerConnection) -> None:
        """Per-connection loop: due packets in one frame, heartbeats, faults."""
        ws = conn.ws
        hb = self.heartbeat_interval
        last_sent = time.monotonic()
        empty = np.empty(0, dtype=np.int64)
        try:
            while not ws.closed:
                now = time.monotonic()
                if conn.silenced_until > now:
                    await self._wait(conn, conn.silenced_until - now)
                    last_sent = time.monotonic() - hb  # heartbeat right after a silence
                    continue
                if not self.auth.is_valid(conn.api_key, conn.access_token):
                    self._abort(conn, "token_expired")
                    break
                while conn.pending_text:
                    await self._send_text(conn, conn.pending_text.pop(0))
                if conn.dirty:
                    self._rebuild(conn, now)
                data = None
                extra: list[bytes] = []
                truncate = False
                sel = np.flatnonzero(conn.due <= now) if conn.rows.size else empty
                # A malformed packet rides in the next data frame (alone when nothing is subscribed).
                if conn.pending_malformed and (sel.size or not conn.rows.size):
                    token = int(conn.row_tokens[0]) if conn.row_tokens.size else 408065
                    packet, truncate = malformed_packet(conn.pending_malformed.pop(0), token)
                    extra.append(packet)
                if sel.size:
                    period = conn.period[sel]
                    nxt = conn.due[sel] + period
                    # Catch up after a short stall; more than a second behind, start afresh.
                    conn.due[sel] = np.where(nxt <= now - 1.0, now + period, nxt)
                    rows = conn.rows[sel]
                    modes = conn.row_modes[sel]
                    self.market.advance(rows)
                    data = self.market.pack(rows, modes, extra)
                    counts = np.bincount(modes, minlength=3)
                    for m in range(3):
                        conn.packets_sent[m] += int(counts[m])
                if data is None and extra:
                    data = self.market.pack(empty, empty, extra)
                if data is not None:
                    if truncate:
                        data = data[:-84]
                    await ws.send_bytes(data)
                    conn.frames_sent += 1
                    conn.bytes_sent += len(data)
                    last_sent = time.monotonic()
                elif now - last_sent >= hb:
                    await ws.send_bytes(HEARTBEAT)
                    conn.heartbeats_sent += 1
                    conn.bytes_sent += 1
                    last_sent = now
                wake_at = last_sent + hb
                if conn.due.size:
                    wake_at = min(wake_at, float(conn.due.min()))
                await self._wait(conn, wake_at - time.monotonic())
        except (ConnectionError, RuntimeError) as exc:
            log.info("event=ticker_send_stopped id=%d error=%r", conn.cid, exc)
        except asyncio.CancelledError:
            pass


# ----------------------------------------------------------------------------
# the login page (plain HTML, one form re-rendered for the TOTP step)

_LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kite - Login</title>
<style>
body { font-family: sans-serif; background: #fafafa; }
main { max-width: 22rem; margin: 4rem auto; padding: 2rem; background: #fff; border: 1px solid #ddd; }
input, button { display: block; width: 100%; box-sizing: border-box; margin: .5rem 0; padding: .6rem; }
#error { color: #c00; min-height: 1.2em; }
</style>
</head>
<body data-api-key="__API_KEY__" data-sess-id="__SESS_ID__">
<main>
<form id="form" method="post" action="/api/login" autocomplete="on"></form>
<p id="error" role="alert"></p>
</main>
<script>
(function () {
  "use strict";
  var body = document.body, form = document.getElementById("form"), err = document.getElementById("error");
  var state = {step: "login", user_id: null, request_id: null};
  function showLogin() {
    state.step = "login";
    form.innerHTML = '<h2>Login to Kite</h2>' +
      '<input id="userid" name="user_id" type="text" placeholder="User ID" autocomplete="username" required>' +
      '<input id="password" name="password" type="password" placeholder="Password" autocomplete="current-password" required>' +
      '<button type="submit">Login</button>';
  }
  function showTotp() {
    state.step = "twofa";
    form.innerHTML = '<h2>External TOTP</h2>' +
      '<input id="totp" name="twofa_value" type="text" inputmode="numeric" maxlength="6" placeholder="TOTP" autocomplete="one-time-code" required>' +
      '<button type="submit">Continue</button>';
    document.getElementById("totp").focus();
  }
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    err.textContent = "";
    var fd = new FormData(form), url, params;
    if (state.step === "login") {
      url = "/api/login";
      params = new URLSearchParams({user_id: fd.get("user_id"), password: fd.get("password")});
    } else {
      url = "/api/twofa";
      params = new URLSearchParams({user_id: state.user_id, request_id: state.request_id,
                                    twofa_value: fd.get("twofa_value"), twofa_type: "totp"});
    }
    fetch(url, {method: "POST", body: params, credentials: "same-origin"})
      .then(function (resp) { return resp.json(); })
      .then(function (data) {
        if (data.status !== "success") { err.textContent = data.message || "Error"; return; }
        if (state.step === "login") {
          state.user_id = data.data.user_id;
          state.request_id = data.data.request_id;
          showTotp();
        } else {
          window.location.href = "/connect/finish?api_key=" + encodeURIComponent(body.dataset.apiKey) +
            "&sess_id=" + encodeURIComponent(body.dataset.sessId);
        }
      })
      .catch(function () { err.textContent = "Network error, try again."; });
  });
  showLogin();
})();
</script>
</body>
</html>
"""


def _login_page(api_key: str, sess_id: str) -> str:
    return (_LOGIN_PAGE.replace("__API_KEY__", html.escape(api_key, quote=True))
            .replace("__SESS_ID__", html.escape(sess_id, quote=True)))
