"""The one place that relies on kiteconnect's internals (KiteTicker, the
Twisted/autobahn WebSocket client of kiteconnect 5.2.2, pinned in setup.cfg).

What is relied on, and why:

* **Local time is IST** (:func:`use_ist_localtime`).  KiteTicker's binary
  parser (``KiteTicker._parse_binary``, used with ``decoder =
  "kiteticker"``) turns the exchange's epoch-second timestamps
  (``last_trade_time``, ``exchange_timestamp``) into *naive* datetimes with
  ``datetime.fromtimestamp``, i.e. in the process's local time zone.  The
  collector reads them as IST wall clock, so the process runs with
  ``TZ=Asia/Kolkata`` (NSE's zone, no daylight saving time).
* **The current socket** (:func:`abort_connection`).  ``KiteTicker.ws`` is the
  autobahn protocol of the open connection (set on every connect);
  dropping it with ``dropConnection(abort=True)`` makes KiteTicker's
  reconnecting factory open a new connection and resubscribe.  The
  library itself never notices a connection that goes silent.
* **The connection factory** (:func:`connection_started`).
  ``KiteTicker.factory`` exists once ``connect()`` has run.
* **connect() on a running reactor** (:func:`connect_in_reactor`).
  ``KiteTicker.connect()`` runs Twisted's global reactor itself (and blocks)
  unless the reactor is already running; the collector runs the reactor in
  its own thread and calls ``connect()`` in it.

:func:`check_version` refuses any other kiteconnect version than
:data:`PINNED_VERSION`; ``tests/unit/test_kite_wire.py`` is the contract test
of everything above.  When kiteconnect is upgraded, review these against the
new ticker and move the pin in setup.cfg and here together.

Venue document: Kite Connect v3 "WebSocket streaming" (binary packet layout,
timestamps as Unix epoch seconds).
"""
from __future__ import annotations

import importlib
import os
import time

from ..wirecheck import WireVersionError, require_version

__all__ = ["PINNED_VERSION", "LOCAL_TIME_ZONE", "WireVersionError", "installed_version", "check_version",
           "use_ist_localtime", "abort_connection", "connection_started", "connect_in_reactor"]

#: The kiteconnect version whose internals this module was written against (setup.cfg pins the same).
PINNED_VERSION = "5.2.2"

#: The process's time zone while collecting (NSE's, UTC+05:30 all year).
LOCAL_TIME_ZONE = "Asia/Kolkata"
_IST_OFFSET_S = 19_800


def installed_version() -> str:
    """kiteconnect's own version string (``kiteconnect/__version__.py``)."""
    return importlib.import_module("kiteconnect.__version__").__version__


def check_version(version: str | None = None) -> None:
    """Raise :class:`WireVersionError` unless kiteconnect ``version``
    (default: the installed one) is :data:`PINNED_VERSION`."""
    require_version("kiteconnect", installed_version() if version is None else version, PINNED_VERSION,
                    "feeds.kite.wire relies on KiteTicker internals (naive local timestamps, "
                    "KiteTicker.ws/.factory, connect() on a running reactor)")


def use_ist_localtime() -> None:
    """Make the whole process's local time IST (``TZ=Asia/Kolkata`` and
    ``time.tzset()``), so that the naive datetimes KiteTicker builds with
    ``datetime.fromtimestamp`` are IST wall clock.  Call once at start-up,
    before any thread starts.

    Raises :class:`WireVersionError` (see :func:`check_version`), and
    ``RuntimeError`` when the system lacks the zone (no tzdata: the C
    library would silently use UTC).
    """
    check_version()
    os.environ["TZ"] = LOCAL_TIME_ZONE
    time.tzset()
    if time.localtime(0).tm_gmtoff != _IST_OFFSET_S:
        raise RuntimeError(f"time zone {LOCAL_TIME_ZONE} is not available to the C library "
                           "(install the system's tzdata)")


def abort_connection(ticker) -> bool:
    """Drop ``ticker``'s current WebSocket at once, without a close
    handshake; KiteTicker's reconnecting factory then opens a new one.
    Call in the reactor thread.  Returns False when there is no connection."""
    ws = getattr(ticker, "ws", None)
    if ws is None:
        return False
    ws.dropConnection(abort=True)
    return True


def connection_started(ticker) -> bool:
    """True once ``ticker.connect()`` has created its connection factory
    (so that ``ticker.close()`` has something to close)."""
    return getattr(ticker, "factory", None) is not None


def connect_in_reactor(ticker) -> None:
    """``ticker.connect()`` for a reactor already running in another
    thread; call it in the reactor thread (``reactor.callFromThread``).
    Raises ``RuntimeError`` when the reactor is not running (KiteTicker
    would run it here and block)."""
    from twisted.internet import reactor

    if not reactor.running:
        raise RuntimeError("Twisted's reactor is not running: KiteTicker.connect() would run it and block")
    ticker.connect()
