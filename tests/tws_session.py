"""The TWS API simulator started in the test's event loop, an ib_async client connected to it,
and waiting for a condition there: shared by the simulator's tests."""
from __future__ import annotations

import asyncio
import contextlib
import time

from ib_async import IB

from feeds.sim.tws import TwsSimulator


@contextlib.asynccontextmanager
async def running_simulator(**kw):
    """A started ``TwsSimulator(**kw)``, stopped on leaving."""
    sim = TwsSimulator(**kw)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def connected_client(sim: TwsSimulator, client_id: int, watch):
    """``(ib, watch(ib))``: an ib_async client connected to ``sim`` as ``client_id``, with what
    ``watch`` attached to it before the connection (so it sees the connection's own messages)."""
    ib = IB()
    seen = watch(ib)
    await ib.connectAsync("127.0.0.1", sim.port, clientId=client_id, timeout=5)
    try:
        yield ib, seen
    finally:
        ib.disconnect()


async def reached(pred, timeout: float, interval: float) -> None:
    """Return once ``pred()`` is true, polling every ``interval`` s; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
