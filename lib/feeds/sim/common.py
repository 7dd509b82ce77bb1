"""What the Kite and Dhan simulators serve the same way.

:class:`SimServer` is one aiohttp server on one port, used from asyncio
(``await start()`` / ``stop()``), from synchronous code (``with
sim.running(): ...``, the server on its own event loop in a daemon thread)
or from a command line (run until SIGINT/SIGTERM).  It keeps the open
streaming connections by id, answers the ``/sim/fault/{name}`` and
``/sim/stats`` control routes, turns errors into the venue's error answers,
and offers the faults every streaming connection takes the same way.  The
venue's subclass brings its protocol: routes, error shapes, connections.

:class:`PerSecondLimiter` counts requests in sliding one-second windows;
:func:`shared_data_dir` finds the recorded venue data.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Awaitable, Callable, ClassVar, Iterator, Mapping, TypeVar

import orjson
from aiohttp import WSMessage, WSMsgType, web

_S = TypeVar("_S", bound="SimServer")


def shared_data_dir(*parts: str) -> Path | None:
    """The recorded venue data ``$FEEDS_SHARED_DATA/<parts>``, else ``<repo>/../shared/data/<parts>``.

    Returns the first of these that is a directory (an absolute path), None if neither is."""
    env = os.environ.get("FEEDS_SHARED_DATA")
    candidates = [Path(env).joinpath(*parts)] if env else []
    candidates.append((Path(__file__).resolve().parents[3] / ".." / "shared" / "data").joinpath(*parts))
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return None


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as an ``application/json`` answer with HTTP ``status``."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class PerSecondLimiter:
    """Sliding one-second windows per key on the monotonic clock.

    A request arriving at ``t`` is allowed when fewer than ``limit`` requests
    of its key were allowed in ``(t - 1 s, t]``; a refused request is not
    counted.  Not thread-safe: use from the simulator's event loop."""

    def __init__(self) -> None:
        self._hits: dict[Any, deque[float]] = {}

    def allow(self, key: Any, limit: int) -> bool:
        """Count one request of ``key`` (any hashable) against ``limit`` a second; True when allowed."""
        now = time.monotonic()
        q = self._hits.setdefault(key, deque())
        while q and q[0] <= now - 1.0:
            q.popleft()
        if len(q) >= limit:
            return False
        q.append(now)
        return True


class SimServer:
    """The server side of a venue simulator: lifecycle, thread, control routes, common faults.

    A subclass sets :attr:`venue`, :attr:`log`, :attr:`Error` (its exception
    carrying ``status``, ``message`` and ``body()``, the JSON error answer),
    :attr:`connection_kind`, the timeouts, and in ``__init__`` its
    ``self._counters`` (a dict holding at least ``rest_requests``,
    ``rest_errors`` and ``connections_total``, counted here); it implements
    ``start()`` with :meth:`_app` and :meth:`_serve`, ``stop()`` with
    :meth:`_shutdown`, ``stats()`` and the hooks :meth:`_input_error`,
    :meth:`_http_error`, :meth:`_rest_error`, :meth:`_reply`, :meth:`_faults`
    and :meth:`_unknown_fault`.  Streaming connections, opened with
    :meth:`_open` and read with :meth:`_receive`, carry ``cid``, ``peer``,
    ``ws`` (the :class:`aiohttp.web.WebSocketResponse`), ``silenced_until``
    (monotonic seconds) and ``wake`` (an :class:`asyncio.Event`).
    """

    #: the venue's name; the thread of :meth:`running` is ``<venue>-sim``
    venue: ClassVar[str] = "sim"
    #: the venue module's logger (log lines keep the venue's logger name)
    log: ClassVar[logging.Logger] = logging.getLogger(__name__)
    #: the venue's error exception: answered as ``json_response(exc.body(), exc.status)``
    Error: ClassVar[type[Exception]] = Exception
    #: what one streaming connection is called ("ticker", "feed"): in error messages and
    #: in the events ``<kind>_connected`` and ``<kind>_closed``
    connection_kind: ClassVar[str] = "streaming"
    #: seconds :meth:`running` waits for start() and for stop()
    running_timeout: ClassVar[float] = 15.0
    #: seconds :meth:`_call` waits for its result
    call_timeout: ClassVar[float] = 10.0

    _counters: dict[str, Any]

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._connections: dict[int, Any] = {}
        self._next_cid = 1
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """``http://host:port``, the root of every HTTP route; valid after start().

        Raises RuntimeError before start()."""
        if self.port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self.host}:{self.port}"

    def _app(self, client_max_size: int) -> web.Application:
        """An application with the error middleware and the control routes every
        venue has (``GET /sim/stats``, ``POST /sim/fault/{name}``); the venue adds
        its own.  ``client_max_size``: the largest request body, bytes."""
        app = web.Application(middlewares=[self._middleware], client_max_size=client_max_size)
        app.router.add_get("/sim/stats", self._h_sim_stats)
        app.router.add_post("/sim/fault/{name}", self._h_sim_fault)
        return app

    async def _serve(self, app: web.Application) -> None:
        """Serve ``app`` on the running loop at host:port; sets ``.port``.  Raises OSError if the bind fails."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _shutdown(self, close: Callable[[Any], Awaitable[Any]]) -> None:
        """Refuse new streaming connections, ``await close(conn)`` for each open one, stop the server."""
        self._stopping = True
        for conn in list(self._connections.values()):
            await close(conn)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _run_until_signal(self) -> None:
        """Wait for SIGINT or SIGTERM (where the loop can take signal handlers), then stop()."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await self.stop()

    @contextlib.contextmanager
    def running(self: _S, timeout: float | None = None) -> Iterator[_S]:
        """Run the simulator on its own event loop in a daemon thread.

        ``with Simulator(...).running() as sim:`` -- started on enter
        (``sim.port`` is set), stopped on exit.  Raises TimeoutError if it
        does not start or stop within ``timeout`` seconds (default
        :attr:`running_timeout`), OSError if the bind fails.
        """
        timeout = self.running_timeout if timeout is None else timeout
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"{self.venue}-sim", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
            yield self
        finally:
            try:
                if self._runner is not None:
                    asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
                loop.close()

    def _call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run fn on the simulator's loop (directly when already there) and return its result.

        Raises RuntimeError before start(), TimeoutError after ``timeout``
        seconds (default :attr:`call_timeout`), and whatever fn raises."""
        if self._loop is None:
            raise RuntimeError("simulator not started")
        if threading.get_ident() == self._loop_thread:
            return fn()
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # pragma: no cover - passed to the caller
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return fut.result(self.call_timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ streaming connections

    def _open(self, make: Callable[[int], Any]) -> Any:
        """Open the connection ``make(cid)`` under the next id: keep, count and log it; returns it."""
        cid = self._next_cid
        self._next_cid += 1
        conn = make(cid)
        self._connections[cid] = conn
        self._counters["connections_total"] += 1
        self.log.info(f"event={self.connection_kind}_connected id=%d peer=%s active=%d", cid, conn.peer,
                      len(self._connections))
        return conn

    async def _receive(self, conn: Any, handle: Callable[[WSMessage], Awaitable[None]],
                       tasks: list[asyncio.Task]) -> None:
        """Hand every message from ``conn.ws`` to ``handle`` until the socket closes,
        fails or yields an error; then forget ``conn``, cancel and await ``tasks``
        (its senders) and log the close."""
        ws = conn.ws
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
                await handle(msg)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.pop(conn.cid, None)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            self.log.info(f"event={self.connection_kind}_closed id=%d peer=%s close_code=%s active=%d",
                          conn.cid, conn.peer, ws.close_code, len(self._connections))

    def _targets(self, connection: int | None) -> list[Any]:
        """Every open connection, or the one with id ``connection`` (else the venue's 400 error)."""
        if connection is None:
            return list(self._connections.values())
        conn = self._connections.get(connection)
        if conn is None:
            raise self._input_error(f"no {self.connection_kind} connection {connection}")
        return [conn]

    def _each(self, connection: int | None, action: Callable[[Any], None], event: str | None = None,
              *args: Any) -> int:
        """On the loop: ``action(conn)`` for every (or one) connection, then log the warning
        ``event`` (a format whose last field is the number of connections) with ``args``.
        Returns the number of connections; raises as :meth:`_targets`."""
        def run() -> int:
            targets = self._targets(connection)
            for conn in targets:
                action(conn)
            if event is not None:
                self.log.warning(event, *args, len(targets))
            return len(targets)
        return self._call(run)

    def fault_silence(self, seconds: float, connection: int | None = None) -> int:
        """Send nothing at all (data, heartbeats, pings, pongs, texts) for ``seconds``
        on every (or one) streaming connection; the socket stays open.  Returns the
        number of connections affected; raises the venue's error (400) for an
        unknown connection id, ValueError for negative seconds."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        until = time.monotonic() + seconds

        def silence(conn: Any) -> None:
            conn.silenced_until = until
            conn.wake.set()
        return self._each(connection, silence, "event=fault_silence seconds=%.3f connections=%d", seconds)

    @staticmethod
    async def _wait(conn: Any, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds or until ``conn.wake`` is set; clears it."""
        if timeout > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(conn.wake.wait(), timeout)
        conn.wake.clear()

    # ------------------------------------------------------------------ venue hooks

    def _input_error(self, message: str) -> Exception:  # pragma: no cover - every venue has its own
        """The venue's 400 error for bad input."""
        raise NotImplementedError

    def _http_error(self, status: int) -> Exception:  # pragma: no cover - every venue has its own
        """The venue's error for an unknown route (404), method (405) or a failure (500)."""
        raise NotImplementedError

    def _rest_error(self, request: web.Request, exc: Any) -> None:  # pragma: no cover
        """Log (and count) an error answered to a request."""
        raise NotImplementedError

    def _reply(self, data: Any) -> web.Response:  # pragma: no cover - every venue has its own
        """A successful JSON answer in the venue's envelope."""
        raise NotImplementedError

    def _faults(self, query: Mapping[str, str],
                connection: int | None) -> dict[str, Callable[[], int]]:  # pragma: no cover
        """Fault name -> the call that injects it with the query's parameters (none run yet)."""
        raise NotImplementedError

    def _unknown_fault(self, name: str) -> Exception:  # pragma: no cover - every venue has its own
        """The venue's error for a fault it does not know."""
        raise NotImplementedError

    # ------------------------------------------------------------------ HTTP plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Count requests and errors; answer every error in the venue's shape."""
        self._counters["rest_requests"] += 1
        try:
            return await handler(request)
        except self.Error as exc:
            self._counters["rest_errors"] += 1
            self._rest_error(request, exc)
            return json_response(exc.body(), exc.status)  # type: ignore[attr-defined]
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            self._counters["rest_errors"] += 1
            err = self._http_error(exc.status)
            return json_response(err.body(), err.status)  # type: ignore[attr-defined]
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception:
            self._counters["rest_errors"] += 1
            self.log.exception("event=rest_internal_error method=%s path=%s", request.method, request.path)
            err = self._http_error(500)
            return json_response(err.body(), err.status)  # type: ignore[attr-defined]

    async def _h_sim_stats(self, request: web.Request) -> web.Response:
        """``GET /sim/stats``: :meth:`stats` in the venue's envelope."""
        return self._reply(self.stats())

    async def _h_sim_fault(self, request: web.Request) -> web.Response:
        """``POST /sim/fault/{name}[?connection=ID&...]``: ``{"fault": name, "affected": n}``."""
        name = request.match_info["name"]
        q = request.query
        try:
            connection = int(q["connection"]) if "connection" in q else None
            fault = self._faults(q, connection).get(name)
            if fault is None:
                raise self._unknown_fault(name)
            n = fault()
        except ValueError as exc:
            raise self._input_error(str(exc)) from None
        return self._reply({"fault": name, "affected": n})
