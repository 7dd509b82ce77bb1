"""The one place that reaches into ib_async's internals: historical bars
and live market data with the exact decimal text TWS sent.

ib_async 2.1.0 (pinned in setup.cfg) turns every price of a historical bar
into a ``float`` in its decoder (``Decoder.historicalData``, the handler of
incoming message 17, HISTORICAL_DATA).  Prices are stored exactly as TWS
sent them, so :func:`keep_wire_text` replaces that handler in the client's
``decoder.handlers`` table with one that reads the same fields and yields
:class:`WireBar` objects: ordinary ``BarData`` (floats, as ib_async users
expect) that also carry the decimal text.

The replaced handler and the table are not part of ib_async's public API:
:func:`check_version` refuses any other ib_async version than
:data:`PINNED_VERSION`, and :func:`keep_wire_text` checks the shape of what
it replaces; ``tests/unit/test_ibkr_wire.py`` is the contract test.  When
ib_async is upgraded, review the patch against the new decoder and move the
pin in setup.cfg and here together.

Live data (feed-ibkr): ib_async turns tick prices into floats and keeps
only the latest RTVolume time per ticker, so :func:`tap_messages` puts a
listener in front of the decoder handlers of the live market-data messages
(:data:`LIVE_MESSAGES`): the listener sees each message's text fields first,
then ib_async's own handler runs unchanged (its tickers stay coherent).
:func:`req_id_of` reads the reqId ib_async gave a ticker's subscription.

Venue document: TWS API message HISTORICAL_DATA (incoming id 17) for server
versions >= 124: reqId, startDateStr, endDateStr, itemCount, then per bar
date, open, high, low, close, volume, WAP, barCount (no message version,
no per-bar hasGaps field).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import ib_async
from ib_async import BarData

from ..wirecheck import WireVersionError, require_version

__all__ = ["PINNED_VERSION", "HISTORICAL_DATA", "WireBar", "WireVersionError", "check_version", "keep_wire_text",
           "LIVE_MESSAGES", "TICK_PRICE", "TICK_SIZE", "TICK_STRING", "MARKET_DATA_TYPE", "TICK_BY_TICK",
           "tap_messages", "req_id_of"]

#: The ib_async version whose decoder the patch was written against (setup.cfg pins the same).
PINNED_VERSION = "2.1.0"

#: TWS API incoming message id of HISTORICAL_DATA (a key of ``Decoder.handlers``).
HISTORICAL_DATA = 17

#: Incoming live market-data message ids (TWS API ``EDecoder``): fields after the id.
TICK_PRICE = 1          # version, reqId, tickType, price, size, attrMask
TICK_SIZE = 2           # version, reqId, tickType, size
TICK_STRING = 46        # version, reqId, tickType, value (RTVolume 48: "price;size;ms;total;vwap;single")
MARKET_DATA_TYPE = 58   # version, reqId, marketDataType (1 real-time, 2 frozen, 3 delayed, 4 delayed-frozen)
TICK_BY_TICK = 99       # reqId, tickType, time, ... (1/2 AllLast: price, size, mask, exchange, conditions;
                        # 3 BidAsk: bidPrice, askPrice, bidSize, askSize, mask)
#: The handlers :func:`tap_messages` listens in front of: ib_async 2.1.0's decoder method, or the
#: wrapper method its generic ``Decoder.wrap`` handler calls.
LIVE_MESSAGES = {TICK_PRICE: "priceSizeTick", TICK_SIZE: "tickSize", TICK_STRING: "tickString",
                 MARKET_DATA_TYPE: "marketDataType", TICK_BY_TICK: "tickByTick"}


@dataclass
class WireBar(BarData):
    """A historical bar with the decimal text TWS sent:
    ``text = (open, high, low, close, volume, WAP)``."""

    text: tuple[str, str, str, str, str, str] = ("", "", "", "", "", "")


def check_version(version: str | None = None) -> None:
    """Raise :class:`WireVersionError` unless ib_async ``version`` (default:
    the installed ``ib_async.__version__``) is :data:`PINNED_VERSION`."""
    require_version("ib_async", ib_async.__version__ if version is None else version, PINNED_VERSION,
                    f"feeds.ibkr.wire replaces the decoder handler of message {HISTORICAL_DATA} (historicalData) "
                    f"and listens in front of those of messages {sorted(LIVE_MESSAGES)} (live market data)")


def _check_handler(handler) -> None:
    """The handler being replaced must be ib_async's ``Decoder.historicalData(fields)``."""
    if getattr(handler, "_keeps_text", False):
        return
    name = getattr(handler, "__name__", "")
    try:
        params = list(inspect.signature(handler).parameters)
    except (TypeError, ValueError):
        params = []
    if name != "historicalData" or params != ["fields"]:
        raise WireVersionError(
            f"ib_async's decoder handler for message {HISTORICAL_DATA} is {handler!r}, not "
            "historicalData(fields): the decoder changed; review feeds.ibkr.wire")


def keep_wire_text(ib) -> None:
    """Make ``ib`` (an ``ib_async.IB``) produce :class:`WireBar` for
    historical bars (message 17).  Idempotent; survives reconnects (the
    decoder belongs to the client object).

    Raises :class:`WireVersionError` when ib_async is not the pinned
    version or its handler table has not the expected shape.
    """
    check_version()
    decoder = ib.client.decoder
    handlers = getattr(decoder, "handlers", None)
    if not isinstance(handlers, dict) or HISTORICAL_DATA not in handlers:
        raise WireVersionError(f"ib_async's decoder has no handler table entry {HISTORICAL_DATA}; "
                               "review feeds.ibkr.wire")
    current = handlers[HISTORICAL_DATA]
    if getattr(current, "_keeps_text", False):
        return
    _check_handler(current)
    wrapper = decoder.wrapper

    def historical_data(fields: list[str]) -> None:
        _, req_id, start, end, n, *rest = fields
        req = int(req_id)
        it = iter(rest).__next__
        for _ in range(int(n)):
            date, o, h, lo, c, v, wap, count = it(), it(), it(), it(), it(), it(), it(), it()
            bar = WireBar(date=date, open=float(o), high=float(h), low=float(lo), close=float(c),
                          volume=float(v), average=float(wap), barCount=int(count), text=(o, h, lo, c, v, wap))
            wrapper.historicalData(req, bar)
        wrapper.historicalDataEnd(req, start, end)

    historical_data._keeps_text = True  # type: ignore[attr-defined]
    handlers[HISTORICAL_DATA] = historical_data


def tap_messages(ib, listener) -> None:
    """Call ``listener(msg_id, fields)`` with the text fields (``list[str]``,
    the message id first) of every live market-data message
    (:data:`LIVE_MESSAGES`) ``ib`` receives, before ib_async handles it.
    An exception in the listener is not caught here (the caller guards it).
    Idempotent per listener; survives reconnects (the decoder belongs to the
    client object).

    Raises :class:`WireVersionError` when ib_async is not the pinned version
    or a handler is not the one the tap was written against.
    """
    check_version()
    handlers = getattr(ib.client.decoder, "handlers", None)
    if not isinstance(handlers, dict):
        raise WireVersionError("ib_async's decoder has no handler table; review feeds.ibkr.wire")
    inners = {}
    for msg_id, name in LIVE_MESSAGES.items():         # every handler checked before any is replaced
        current = handlers.get(msg_id)
        if current is None:
            raise WireVersionError(f"ib_async's decoder has no handler for message {msg_id}; review feeds.ibkr.wire")
        inner = getattr(current, "_inner", current)
        try:
            params = list(inspect.signature(inner).parameters)
            calls = inspect.getclosurevars(inner).nonlocals.get("methodName") if inspect.isfunction(inner) else None
        except (TypeError, ValueError):
            params, calls = [], None
        if name not in (getattr(inner, "__name__", ""), calls) or params != ["fields"]:
            raise WireVersionError(f"ib_async's decoder handler for message {msg_id} is {inner!r}, not "
                                   f"{name}(fields): the decoder changed; review feeds.ibkr.wire")
        inners[msg_id] = inner
    for msg_id, inner in inners.items():
        if getattr(handlers[msg_id], "_tap", None) is listener:
            continue

        def tapped(fields: list[str], _inner=inner, _id=msg_id) -> None:
            listener(_id, fields)
            _inner(fields)

        tapped._tap = listener          # type: ignore[attr-defined]
        tapped._inner = inner           # type: ignore[attr-defined]
        handlers[msg_id] = tapped


def req_id_of(ib, ticker, kind: str) -> int:
    """The reqId ib_async sent for ``ticker``'s subscription of ``kind``
    (``"mktData"``, ``"AllLast"``, ``"BidAsk"``), read from its wrapper's
    ``ticker2ReqId`` table; 0 when there is none."""
    table = getattr(ib.wrapper, "ticker2ReqId", None)
    if not isinstance(table, dict):
        raise WireVersionError("ib_async's wrapper has no ticker2ReqId table; review feeds.ibkr.wire")
    return int(table.get(kind, {}).get(ticker, 0))
