"""Every patch of python-binance's websocket internals, in one place.

The collector uses python-binance's ``BinanceSocketManager`` and its
``ReconnectingWebsocket`` as they are, except for four things, all made here
and nowhere else:

1. **Frame decoding** - ``ReconnectingWebsocket.json_loads`` (called by
   ``_handle_message`` for every received text) is replaced per socket by
   :class:`Frame`, which only wraps the raw text.  The collector decodes it
   itself, so a frame that is not JSON is counted and skipped instead of
   ending python-binance's read loop, and the read loop's per-message debug
   formatting of the decoded dict (``f"Received message: {res}"``) costs
   nothing (``Frame.__repr__`` is constant).
2. **No per-receive timeout** - ``TIMEOUT = None`` on the socket: the read
   loop then awaits ``ws.recv()`` directly instead of through a timer task.
   Silence is detected per stream by the collector, and :func:`close` closes
   the socket under the read loop, so nothing waits forever.
3. **Draining the read queue** - :func:`pump` takes every message already
   waiting in the socket's ``_queue`` in one go and awaits ``recv()`` (with
   its closed-loop detection) only when none wait.
4. **No reconnect while closing** - :func:`close` marks the socket
   ``WSListenerState.EXITING`` and replaces its ``connect`` by a no-op, so a
   reconnect already under way in the read loop cannot revive a socket that
   is being closed; the collector reconnects itself, with its own backoff.

These reach into private attributes, so python-binance is pinned
(``python-binance == 1.0.37`` in setup.cfg): :func:`check_version` raises
:class:`WireVersionError` at the first :func:`open_combined` when another
version is installed, and ``tests/unit/test_binance_wire.py`` asserts that
every internal used here still exists with the shape relied on.

Venue document: Binance "USDⓈ-M Futures / Websocket Market Streams"
(combined streams ``/stream?streams=a/b/...`` under ``/market`` and
``/public``); library: python-binance 1.0.37 ``binance/ws/``.
"""
from __future__ import annotations

import asyncio
import logging
from importlib import metadata

from binance import BinanceSocketManager
from binance.enums import FuturesType
from binance.ws.constants import WSListenerState

from ..wirecheck import WireVersionError, require_version  # noqa: F401  (WireVersionError: re-exported)

log = logging.getLogger(__name__)

#: the python-binance version whose internals this module patches (setup.cfg pins it)
PINNED = "1.0.37"
DISTRIBUTION = "python-binance"

_checked: str | None = None


def installed_version() -> str | None:
    """The installed python-binance version, or None if it is not installed as a distribution."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def check_version() -> str:
    """Return the installed python-binance version; raise :class:`WireVersionError`
    (one line naming both versions) unless it is :data:`PINNED`."""
    global _checked
    if _checked == PINNED:
        return _checked
    _checked = require_version(DISTRIBUTION, installed_version(), PINNED,
                               "feeds.binance.wire patches the socket manager internals")
    return _checked


class Frame:
    """A received frame, decoded by the collector rather than inside
    python-binance's read loop; ``raw`` is the text (or bytes) as received.
    Its repr is constant, so the read loop's debug formatting is free."""

    __slots__ = ("raw",)

    def __init__(self, raw):
        self.raw = raw

    def __repr__(self) -> str:
        return "<frame>"


async def _no_reconnect(*_a, **_k) -> None:
    """Stands in for ``ReconnectingWebsocket.connect`` once a socket is being closed."""


async def open_combined(client, ws_url: str, streams: list[str], category: str,
                        max_queue_size: int = 100_000):
    """Open one USD-M combined-stream socket for ``streams`` on ``category``
    (``"market"`` or ``"public"``) at ``ws_url`` (``wss://fstream.binance.com``
    or a simulator's ``ws://127.0.0.1:PORT``).

    Returns python-binance's ``ReconnectingWebsocket``, connected, whose
    ``recv()`` yields :class:`Frame` objects (and python-binance's own
    ``{"e": "error", ...}`` dicts).  Raises :class:`WireVersionError` for an
    unpinned python-binance, ``OSError``/``websockets`` errors when the
    connection fails.
    """
    check_version()
    bm = BinanceSocketManager(client, max_queue_size=max_queue_size)
    bm.FSTREAM_URL = ws_url.rstrip("/") + "/"
    sock = bm.futures_multiplex_socket(streams, futures_type=FuturesType.USD_M, category=category)
    sock.json_loads = Frame                  # patch 1: decoded by the collector
    sock.TIMEOUT = None                      # patch 2: no timer task per receive
    await sock.__aenter__()
    return sock


async def pump(sock, handle, first: asyncio.Event) -> None:
    """Hand every message of ``sock`` to ``handle(msg)``; set ``first`` after
    the first one.  Messages already queued by python-binance's read loop are
    taken in one go (patch 3).  Returns only by raising (python-binance's
    ``ReadLoopClosed`` once its read loop ended, or cancellation)."""
    recv = sock.recv
    queue = sock._queue
    get = queue.get_nowait
    msg = await recv()
    first.set()
    handle(msg)
    while True:
        if queue.empty():
            handle(await recv())
        else:
            for _ in range(queue.qsize()):
                handle(get())


async def close(sock, task: asyncio.Task | None = None) -> None:
    """Cancel ``task`` (the :func:`pump` of ``sock``), then close ``sock`` so
    that python-binance cannot reconnect it (patch 4).  Never raises."""
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
    # python-binance's read loop only notices an exit request between
    # receives; mark it exiting, make sure a reconnect in progress cannot
    # revive it, then close the socket under it
    sock.ws_state = WSListenerState.EXITING
    sock.connect = _no_reconnect
    try:
        if sock.ws is not None:
            await asyncio.wait_for(sock.ws.close(), 2)
    except (asyncio.TimeoutError, Exception) as e:
        log.debug("socket close: %r", e)
    try:
        await asyncio.wait_for(sock.__aexit__(None, None, None), 5)
    except (asyncio.TimeoutError, Exception) as e:
        log.debug("socket exit: %r", e)
