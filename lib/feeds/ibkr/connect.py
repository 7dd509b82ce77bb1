"""One way to open an API session to TWS or IB Gateway, shared by
feed-backfill and feed-ibkr.

IB allows one session per clientId; a second one with the same id is
answered with error 326 ("Unable to connect as the client id is already
in use") and the socket is closed.  :func:`connect_ib` therefore tries
``client_id``, ``client_id + 1`` … (``tries`` ids) without waiting for the
connect timeout, and when the gateway cannot be reached at all retries the
round with exponential back-off (0.5 s doubling up to a cap: 30 s unless the
caller asks for less) until a monotonic
deadline.  The session is read-only and fetches nothing at start
(no accounts, positions or orders).  Reference: IB TWS API, "Connectivity"
and "Message Codes" (326).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("feeds.ibkr.connect")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
CLIENT_ID_IN_USE = 326


class ConnectFailed(Exception):
    """No session could be opened before the deadline; the message names the
    address and the last cause."""


async def connect_ib(host: str, port: int, client_id: int, *, tries: int, timeout: float, deadline: float,
                     prepare: Callable[[object], None] | None = None,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                     backoff_max: float = BACKOFF_MAX_S) -> tuple[object, int]:
    """Open a session; returns ``(ib, client_id_used)`` with ``ib`` an
    ``ib_async.IB`` connected and ``RaiseRequestErrors`` set.

    ``prepare(ib)`` runs on every fresh ``IB`` before its socket opens (wire
    taps and the decoder patch go there; an exception from it propagates and
    leaves nothing open).  ``sleep(seconds)`` waits between rounds (a caller
    that must keep pinging its watchdog passes its own); the waits double from
    0.5 s up to ``backoff_max`` seconds.  Raises
    :class:`ConnectFailed` once the next back-off would pass ``deadline``
    (monotonic seconds)."""
    from ib_async import IB
    from ib_async.ib import StartupFetchNONE
    from ib_async.wrapper import RequestError

    delay, last_err = BACKOFF_FIRST_S, ""
    while True:
        for cid in range(client_id, client_id + max(1, tries)):
            ib = IB()
            if prepare is not None:
                prepare(ib)
            ib.RaiseRequestErrors = True
            in_use = asyncio.get_running_loop().create_future()

            def on_error(req_id, code, text, contract, in_use=in_use):
                if code == CLIENT_ID_IN_USE and not in_use.done():
                    in_use.set_result(text)

            closed = asyncio.get_running_loop().create_future()

            def on_closed(msg, closed=closed):
                if not closed.done():
                    closed.set_result(msg or "the gateway closed the connection during the handshake")

            ib.errorEvent += on_error
            # A gateway that accepts and closes (restarting, refusing) ends the attempt at once,
            # not after ``timeout``: ib_async's handshake waits for the timeout, only the socket's
            # own event tells.
            ib.client.conn.disconnected += on_closed
            attempt = asyncio.ensure_future(ib.connectAsync(host, port, clientId=cid, timeout=timeout,
                                                            readonly=True, fetchFields=StartupFetchNONE))
            try:
                # 326 comes before the socket closes: do not wait for the timeout.
                await asyncio.wait({attempt, in_use, closed}, return_when=asyncio.FIRST_COMPLETED)
                if in_use.done() or (closed.done() and not attempt.done()):
                    attempt.cancel()
                    await asyncio.gather(attempt, return_exceptions=True)
                    raise ConnectionError("clientId in use" if in_use.done() else closed.result())
                attempt.result()
            except (OSError, asyncio.TimeoutError, ConnectionError, RequestError) as e:
                ib.disconnect()
                if in_use.done():
                    log.warning("clientId %d is in use (IB error 326); trying %d", cid, cid + 1)
                    last_err = "every clientId tried is in use (326)"
                    continue
                last_err = f"{type(e).__name__}: {e}".strip().rstrip(":")
                break
            finally:
                ib.errorEvent -= on_error
                ib.client.conn.disconnected -= on_closed
                for f in (in_use, closed):
                    if not f.done():
                        f.cancel()
            return ib, cid
        if time.monotonic() + delay > deadline:
            raise ConnectFailed(f"cannot connect to TWS/IB Gateway at {host}:{port}: {last_err}")
        log.warning("cannot connect to %s:%d (%s); retrying in %.1fs", host, port, last_err, delay)
        await sleep(delay)
        delay = min(delay * 2, backoff_max)
