"""Contract of feeds.binance.wire with python-binance: the pinned version, and every
internal it patches still there with the shape relied on."""
from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from binance import AsyncClient, BinanceSocketManager
from binance.enums import FuturesType
from binance.ws.constants import WSListenerState
from binance.ws.reconnecting_websocket import ReconnectingWebsocket

from conftest import pinned_in_setup_cfg
from feeds.binance import wire

ROOT = Path(__file__).resolve().parents[2]


def test_pinned_version_is_installed_and_matches_setup_cfg():
    assert pinned_in_setup_cfg("python-binance") == wire.PINNED
    assert wire.installed_version() == wire.PINNED
    assert wire.check_version() == wire.PINNED


def test_other_version_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setattr(wire, "_checked", None)
    monkeypatch.setattr(wire, "installed_version", lambda: "1.0.38")
    with pytest.raises(wire.WireVersionError) as e:
        wire.check_version()
    msg = str(e.value)
    assert "1.0.38" in msg and "python-binance==1.0.37" in msg and "\n" not in msg

    async def go():
        await wire.open_combined(None, "ws://127.0.0.1:9", ["btcusdt@aggTrade"], "market")
    with pytest.raises(wire.WireVersionError):          # checked at first use, before any connection
        asyncio.run(go())


def _src(fn) -> str:
    return inspect.getsource(fn)


def test_reconnecting_websocket_internals_have_the_expected_shape():
    rw = ReconnectingWebsocket
    # patch 1: every received text goes through self.json_loads in _handle_message, from _read_loop
    assert "self.json_loads(evt)" in _src(rw._handle_message)
    read_loop = _src(rw._read_loop)
    assert "self._handle_message(res)" in read_loop
    # patch 2: the per-receive timeout is the TIMEOUT attribute (None: no timer)
    assert isinstance(rw.TIMEOUT, (int, float))
    assert "asyncio.wait_for(" in read_loop and "timeout=self.TIMEOUT" in read_loop
    # patch 3: decoded messages are put on self._queue; recv() takes from it and detects a dead loop
    assert "self._queue.put(res)" in read_loop
    recv = _src(rw.recv)
    assert "self._queue.get()" in recv and "self._handle_read_loop" in recv
    # patch 4: the read loop stops on EXITING and reconnects through self.connect()
    assert "WSListenerState.EXITING" in read_loop and "self._run_reconnect()" in read_loop
    assert "await self.connect()" in _src(rw._run_reconnect)
    assert inspect.iscoroutinefunction(rw.connect) and inspect.iscoroutinefunction(rw.__aexit__)
    assert {m.name for m in WSListenerState} >= {"STREAMING", "RECONNECTING", "EXITING"}


def test_socket_manager_builds_the_combined_socket_the_wire_module_expects():
    async def go():
        client = AsyncClient()
        try:
            params = inspect.signature(BinanceSocketManager.__init__).parameters
            assert "max_queue_size" in params
            bm = BinanceSocketManager(client, max_queue_size=7)
            assert hasattr(bm, "FSTREAM_URL")
            bm.FSTREAM_URL = "ws://127.0.0.1:1/"
            sig = inspect.signature(bm.futures_multiplex_socket).parameters
            assert {"streams", "futures_type", "category"} <= set(sig)
            sock = bm.futures_multiplex_socket(["btcusdt@bookTicker"], futures_type=FuturesType.USD_M,
                                               category="public")
            assert isinstance(sock, ReconnectingWebsocket)
            assert sock._url + sock._prefix + sock._path == "ws://127.0.0.1:1/public/stream?streams=btcusdt@bookTicker"
            assert isinstance(sock._queue, asyncio.Queue) and sock.max_queue_size == 7
            assert sock.ws is None and sock.ws_state == WSListenerState.INITIALISING
            # patch 1 in effect: a received text comes back wrapped, undecoded, even when it is not JSON
            sock.json_loads = wire.Frame
            f = sock._handle_message('{"stream":"x","data":')
            assert type(f) is wire.Frame and f.raw == '{"stream":"x","data":' and repr(f) == "<frame>" and f
            # patch 4 in effect: connect is replaced by a no-op coroutine
            sock.connect = wire._no_reconnect
            await sock.connect()
        finally:
            await client.close_connection()
    asyncio.run(go())


def test_pump_drains_queued_messages_and_close_never_raises():
    class Sock:
        def __init__(self):
            self._queue = asyncio.Queue()
            self.ws = None
            self.ws_state = WSListenerState.STREAMING
            self.exited = False

        async def recv(self):
            return await self._queue.get()

        async def connect(self):
            raise AssertionError("reconnected while closing")

        async def __aexit__(self, *a):
            self.exited = True
            await self.connect()                 # a reconnect attempt during exit: must be the no-op

    async def go():
        s = Sock()
        got = []
        for i in range(5):
            s._queue.put_nowait(i)
        first = asyncio.Event()
        task = asyncio.create_task(wire.pump(s, got.append, first))
        await asyncio.sleep(0.01)
        assert first.is_set() and got == [0, 1, 2, 3, 4]
        await wire.close(s, task)
        assert task.cancelled() and s.exited and s.ws_state == WSListenerState.EXITING
    asyncio.run(go())
