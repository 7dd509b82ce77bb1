"""Dhan's v2 live market feed on the wire: requests out, binary packets in.

Pure, no I/O.  Venue documents: DhanHQ v2 "Live Market Feed" (request JSON,
response header, Ticker / Prev Close / Quote / OI Data / Full Packet, Feed
Disconnect, Keeping Connection Alive) and DhanHQ v2 "Annexure" (Exchange
Segment, Feed Request Code, Feed Response Code, Data API Error).

Requests
--------
Every request is a JSON text message.  :func:`subscribe_messages` and
:func:`unsubscribe_messages` turn ``(segment, security_id)`` pairs into
messages of at most :data:`~feeds.dhan.limits.MAX_INSTRUMENTS_PER_MESSAGE`
instruments each::

    {"RequestCode": 21, "InstrumentCount": 2,
     "InstrumentList": [{"ExchangeSegment": "NSE_EQ", "SecurityId": "1333"}, ...]}

:func:`disconnect_message` is ``{"RequestCode": 12}``.

Responses
---------
Every response packet starts with the same 8-byte header, little-endian::

    offset 0  u8   feed response code (ResponseCode)
    offset 1  u16  message length
    offset 3  u8   exchange segment (ExchangeSegment)
    offset 4  u32  security id

followed by the payload of the packet kind (sizes with the header:
ticker 16, quote 50, OI 12, prev close 16, market status 8, full 162,
disconnect 10).  :func:`decode` takes one WebSocket binary message and walks
it packet by packet, so that a message carrying one packet (what Dhan sends
today; the official client ``dhanhq`` 2.3.0 reads only the first packet of a
message) and a message carrying several packets back to back (as the "Full
Market Depth" document describes for its own feed) both decode.  Packet
sizes come from the document, not from the header: a header whose length
field disagrees with the documented size is reported and the walk goes on
at the documented size.  The length field is read as the length of the whole
packet, header included (what the simulator sends); the payload-only reading
("Message Length of the entire payload packet" is ambiguous) is accepted too.
:func:`decode_many` decodes the messages of one socket read together, with
the same result as :func:`decode` of each in turn; a message that is one
full packet (Dhan's full mode) is read there with a single ``unpack``.

Records
-------
:func:`decode` returns plain named tuples (fast to build, cheap to keep):
:class:`Ticker`, :class:`Quote`, :class:`OpenInterest`, :class:`PrevClose`,
:class:`MarketStatus`, :class:`Full` and :class:`Disconnect`.  Each has a
class attribute ``kind`` ("ticker", "quote", ...).  Field values are the wire
values: prices as the float32 Dhan sent (widened to a Python float), counts
as ints, ``ltt_ist`` as sent (see below).  Full's ``depth`` is the flat tuple
of the 5 levels in wire order, 6 numbers a level (:data:`DEPTH_FIELDS`);
:func:`depth_levels` names them.

Prices: float32 on the wire, exact decimals in the database
------------------------------------------------------------
Dhan sends rupee prices as IEEE float32, which cannot hold 1650.45 exactly
(it holds 1650.449951171875).  Every price Dhan quotes is a multiple of the
instrument's tick, so the exact value is the multiple of the tick nearest to
the float32.  The rule used here:

* without the instrument's tick: round to :data:`PRICE_DECIMALS` of the
  segment, 2 decimals (paise) for every segment but the currency segments,
  4 for NSE_CURRENCY and BSE_CURRENCY (tick 0.0025).  This is exact while
  half a float32 step stays under half a unit of the last decimal: below
  131,072 rupees with 2 decimals and below 1,024 with 4 decimals
  (:data:`EXACT_BELOW`), which covers every NSE/BSE price today except a few
  MCX contracts and very high-priced shares;
* with the tick (``SEM_TICK_SIZE`` of Dhan's instrument list):
  :func:`price_on_tick` rounds to the nearest multiple of the tick, exact
  below ``2**23 * tick`` (about 419,000 rupees at a 0.05 tick).

The decoder itself keeps the floats (converting 16 prices of a full packet
to :class:`~decimal.Decimal` would cost more than decoding it).  The
collector converts when it builds a row: :func:`format_prices` /
:data:`PRICE_FORMAT` (the text for COPY, e.g. ``"1650.45"``; about 1 us for
the 16 prices of a full packet), :func:`price_text` or :func:`price_decimal`;
a price never reaches the database as a binary float.

LTT: IST wall clock as epoch seconds
------------------------------------
The last trade time (``ltt_ist``) is epoch seconds of the *Indian* wall-clock
time, not of UTC: a trade at 09:15:00 IST arrives as the epoch of
09:15:00 UTC.  Dhan said so on the official client's tracker (dhan-oss/DhanHQ-py
issue 51: the client's ``utc_time()`` only formats the value; Dhan "convert[s]
IST to EPOCH directly"), and the client prints the value with a UTC
formatter to show IST clock time.  :func:`ltt_to_utc_ns` subtracts
:data:`IST_OFFSET_S` (India has no daylight saving time).  The REST candle
timestamps are true UTC epochs and need no shift.

Malformed input
---------------
Nothing in a message is trusted.  A packet that is cut short, has an unknown
response code or exchange segment, a length field that disagrees with the
document, a negative, NaN, infinite or absurd price (the prices of one packet
must add up to less than :data:`MAX_PRICE`), or a trade time before
:data:`EARLIEST_LTT_IST` or more than ``ahead_s`` after now is reported as a
:class:`WireError` (a ``ValueError`` with a short ``reason``) in the
``errors`` list of :func:`decode`'s result; the good packets of the same
message are still returned.  :func:`decode` never raises on input bytes.
"""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from decimal import Decimal
from enum import IntEnum
from operator import itemgetter
from struct import Struct
from typing import Iterable, NamedTuple

from ..config import EX_NOPERM
from ..plausible import Malformed
from . import limits

__all__ = [
    "ExchangeSegment", "RequestCode", "ResponseCode", "SEGMENT_NAMES", "SEGMENT_BY_NAME", "MODES",
    "segment_code", "subscribe_messages", "unsubscribe_messages", "disconnect_message", "feed_url",
    "Ticker", "Quote", "OpenInterest", "PrevClose", "MarketStatus", "Full", "Disconnect", "DepthLevel",
    "DEPTH_FIELDS", "depth_levels", "Decoded", "decode", "DecodedMany", "decode_many", "WireError", "PACKET_SIZES", "HEADER_SIZE",
    "PRICE_DECIMALS", "EXACT_BELOW", "MAX_PRICE", "PRICE_FORMAT", "format_prices", "price_units", "price_text",
    "price_decimal", "price_on_tick",
    "IST_OFFSET_S", "EARLIEST_LTT_IST", "LTT_AHEAD_S", "ltt_to_utc_ns", "ltt_to_utc",
    "DISCONNECT_REASONS", "TOO_MANY_CONNECTIONS", "FATAL_CODES", "EXIT_FATAL", "disconnect_reason",
    "disconnect_action",
]


# --------------------------------------------------------------------------- codes (Annexure)

class ExchangeSegment(IntEnum):
    """Exchange segment: the byte in the response header, the name in requests
    ("Annexure", section "Exchange Segment").  There is no code 6."""
    IDX_I = 0          # index values
    NSE_EQ = 1
    NSE_FNO = 2
    NSE_CURRENCY = 3
    BSE_EQ = 4
    MCX_COMM = 5
    BSE_CURRENCY = 7
    BSE_FNO = 8


#: segment code -> the name Dhan's JSON requests use
SEGMENT_NAMES: dict[int, str] = {int(s): s.name for s in ExchangeSegment}
#: segment name -> code
SEGMENT_BY_NAME: dict[str, int] = {s.name: int(s) for s in ExchangeSegment}


class RequestCode(IntEnum):
    """``RequestCode`` of a request message ("Annexure", section "Feed Request Code").
    23/24 belong to the separate full-market-depth feed and are listed for completeness."""
    CONNECT = 11
    DISCONNECT = 12
    SUBSCRIBE_TICKER = 15
    UNSUBSCRIBE_TICKER = 16
    SUBSCRIBE_QUOTE = 17
    UNSUBSCRIBE_QUOTE = 18
    SUBSCRIBE_FULL = 21
    UNSUBSCRIBE_FULL = 22
    SUBSCRIBE_FULL_DEPTH = 23
    UNSUBSCRIBE_FULL_DEPTH = 24


class ResponseCode(IntEnum):
    """Byte 0 of a response packet ("Annexure", section "Feed Response Code").
    INDEX (1) is listed there but its layout is not documented: :func:`decode`
    reports it as an undocumented packet."""
    INDEX = 1
    TICKER = 2
    QUOTE = 4
    OI = 5
    PREV_CLOSE = 6
    MARKET_STATUS = 7
    FULL = 8
    DISCONNECT = 50


#: mode name -> (subscribe code, unsubscribe code)
MODES: dict[str, tuple[int, int]] = {
    "ticker": (RequestCode.SUBSCRIBE_TICKER, RequestCode.UNSUBSCRIBE_TICKER),
    "quote": (RequestCode.SUBSCRIBE_QUOTE, RequestCode.UNSUBSCRIBE_QUOTE),
    "full": (RequestCode.SUBSCRIBE_FULL, RequestCode.UNSUBSCRIBE_FULL),
}


# --------------------------------------------------------------------------- requests

def segment_code(segment: int | str) -> int:
    """The segment code of ``segment`` (a code such as 1 or a name such as "NSE_EQ").

    Raises ValueError for anything that is not an Annexure segment."""
    if isinstance(segment, str):
        code = SEGMENT_BY_NAME.get(segment.strip().upper())
        if code is None:
            raise ValueError(f"unknown Dhan exchange segment {segment!r} "
                             f"(one of {', '.join(SEGMENT_BY_NAME)})")
        return code
    if isinstance(segment, bool) or not isinstance(segment, int) or segment not in SEGMENT_NAMES:
        raise ValueError(f"unknown Dhan exchange segment code {segment!r}")
    return int(segment)


def _instrument_list(instruments: Iterable[tuple[int | str, int | str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    seen: set[tuple[int, str]] = set()
    for item in instruments:
        try:
            segment, security_id = item
        except (TypeError, ValueError):
            raise ValueError(f"an instrument is a (segment, security id) pair, not {item!r}") from None
        code = segment_code(segment)
        sid = str(security_id).strip()
        if not sid.isascii() or not sid.isdigit() or len(sid) > 10 or int(sid) >= 1 << 32:
            raise ValueError(f"security id {security_id!r} is not a Dhan security id (digits, 32 bits)")
        sid = str(int(sid))
        if (code, sid) in seen:
            continue
        seen.add((code, sid))
        out.append({"ExchangeSegment": SEGMENT_NAMES[code], "SecurityId": sid})
    return out


def _messages(request_code: int, instruments, per_message: int) -> list[str]:
    if not 1 <= per_message <= limits.MAX_INSTRUMENTS_PER_MESSAGE:
        raise ValueError(f"per_message must be 1..{limits.MAX_INSTRUMENTS_PER_MESSAGE}, not {per_message}")
    items = _instrument_list(instruments)
    return [json.dumps({"RequestCode": int(request_code),
                        "InstrumentCount": len(chunk),
                        "InstrumentList": chunk}, separators=(",", ":"))
            for chunk in (items[i:i + per_message] for i in range(0, len(items), per_message))]


def _mode_codes(mode: str) -> tuple[int, int]:
    codes = MODES.get(mode)
    if codes is None:
        raise ValueError(f"unknown Dhan feed mode {mode!r} (one of {', '.join(MODES)})")
    return codes


def subscribe_messages(mode: str, instruments: Iterable[tuple[int | str, int | str]],
                       per_message: int = limits.MAX_INSTRUMENTS_PER_MESSAGE) -> list[str]:
    """JSON text messages subscribing ``instruments`` in ``mode``.

    ``mode``: "ticker", "quote" or "full" (RequestCode 15, 17, 21).
    ``instruments``: ``(segment, security_id)`` pairs, the segment as a code or
    a name ("NSE_EQ"), the security id as int or digit string.  Duplicates
    are sent once; order is kept.  At most ``per_message`` (default and
    maximum: 100, "Live Market Feed", "Adding Instruments") instruments per
    message, so 250 instruments make 3 messages.  Returns [] for no
    instruments.  The limit of instruments per *connection* is the caller's.

    Raises ValueError for an unknown mode, segment or malformed security id."""
    return _messages(_mode_codes(mode)[0], instruments, per_message)


def unsubscribe_messages(mode: str, instruments: Iterable[tuple[int | str, int | str]],
                         per_message: int = limits.MAX_INSTRUMENTS_PER_MESSAGE) -> list[str]:
    """Like :func:`subscribe_messages`, with the unsubscribe codes (16, 18, 22)."""
    return _messages(_mode_codes(mode)[1], instruments, per_message)


def disconnect_message() -> str:
    """The JSON text message that asks Dhan to close the feed ("Feed Disconnect": RequestCode 12)."""
    return json.dumps({"RequestCode": int(RequestCode.DISCONNECT)})


def feed_url(base_url: str, token: str, client_id: str) -> str:
    """The feed URL ``<base_url>?version=2&token=..&clientId=..&authType=2``
    ("Live Market Feed", "Establishing Connection").  It carries the access
    token: never log it."""
    from urllib.parse import urlencode
    return f"{base_url.rstrip('/')}?" + urlencode(
        {"version": "2", "token": token, "clientId": client_id, "authType": "2"})


# --------------------------------------------------------------------------- records

class Ticker(NamedTuple):
    """Ticker packet (code 2): last traded price and time."""
    segment: int
    security_id: int
    ltp: float            # rupees, float32 as sent
    ltt_ist: int          # epoch seconds of IST wall clock (0: none); see ltt_to_utc_ns
    kind = "ticker"


class Quote(NamedTuple):
    """Quote packet (code 4)."""
    segment: int
    security_id: int
    ltp: float
    ltq: int              # last traded quantity
    ltt_ist: int
    atp: float            # average traded price
    volume: int
    total_sell_qty: int
    total_buy_qty: int
    open: float           # day open
    close: float          # day close: only after the close, 0 before
    high: float
    low: float
    kind = "quote"


class OpenInterest(NamedTuple):
    """OI Data packet (code 5), sent with quote subscriptions."""
    segment: int
    security_id: int
    oi: int
    kind = "oi"


class PrevClose(NamedTuple):
    """Prev Close packet (code 6), sent on subscription in every mode."""
    segment: int
    security_id: int
    prev_close: float
    prev_oi: int
    kind = "prev_close"


class MarketStatus(NamedTuple):
    """Market Status packet (code 7).  Only the header is documented; a body, if
    any, is kept as bytes."""
    segment: int
    security_id: int
    body: bytes = b""
    kind = "market_status"


#: names of the 6 numbers of one depth level, in wire order
DEPTH_FIELDS = ("bid_qty", "ask_qty", "bid_orders", "ask_orders", "bid_price", "ask_price")


class DepthLevel(NamedTuple):
    """One of the 5 levels of a full packet's market depth (20 bytes on the wire)."""
    bid_qty: int
    ask_qty: int
    bid_orders: int
    ask_orders: int
    bid_price: float
    ask_price: float


class Full(NamedTuple):
    """Full packet (code 8): the quote fields, open interest and 5-level depth.

    ``depth`` is flat: 30 numbers, level 1 (best) first, each level
    ``bid_qty, ask_qty, bid_orders, ask_orders, bid_price, ask_price``
    (:data:`DEPTH_FIELDS`); ``depth[4 + 6*i]`` is the bid price of level
    ``i+1``.  An empty level is all zeros."""
    segment: int
    security_id: int
    ltp: float
    ltq: int
    ltt_ist: int
    atp: float
    volume: int
    total_sell_qty: int
    total_buy_qty: int
    oi: int
    oi_day_high: int      # NSE_FNO only
    oi_day_low: int       # NSE_FNO only
    open: float
    close: float
    high: float
    low: float
    depth: tuple
    kind = "full"


class Disconnect(NamedTuple):
    """Feed Disconnect packet (code 50): Dhan closes the connection for ``reason``
    (:data:`DISCONNECT_REASONS`, :func:`disconnect_action`)."""
    segment: int
    security_id: int
    reason: int
    kind = "disconnect"


def depth_levels(depth: tuple) -> tuple[DepthLevel, ...]:
    """The flat ``Full.depth`` as 5 :class:`DepthLevel` (best first)."""
    return tuple(DepthLevel._make(depth[i:i + 6]) for i in range(0, len(depth), 6))


class WireError(Malformed):
    """A packet that cannot be trusted.  ``reason`` is a short fixed word for
    counting ("short", "truncated", "unknown-code", "undocumented-code",
    "segment", "length", "price", "ltt"); ``detail`` says more; ``offset`` is the
    packet's position in the message; ``code``, ``segment`` and
    ``security_id`` are the header's (None when unread)."""

    def __init__(self, reason: str, detail: str = "", offset: int = 0, code: int | None = None,
                 segment: int | None = None, security_id: int | None = None):
        self.reason = reason
        self.detail = detail
        self.offset = offset
        self.code = code
        self.segment = segment
        self.security_id = security_id
        where = f" at byte {offset}" if offset else ""
        who = f" (code {code}, segment {segment}, security {security_id})" if code is not None else ""
        super().__init__(f"{reason}: {detail}{where}{who}" if detail else f"{reason}{where}{who}")


class Decoded(NamedTuple):
    """What :func:`decode` returns: the records of the good packets, in order,
    and one :class:`WireError` per bad packet (or bad remainder)."""
    records: list
    errors: list


# --------------------------------------------------------------------------- decoding

HEADER_SIZE = 8
_HEADER = Struct("<BHBI")
# The record structs skip the code and the length (3 bytes) and start at the segment.
_TICKER = Struct("<3xBIfI")                                  # 16
_QUOTE = Struct("<3xBIfHIfIIIffff")                          # 50
_OI = Struct("<3xBII")                                       # 12
_PREV_CLOSE = Struct("<3xBIfI")                              # 16
_MARKET_STATUS = Struct("<3xBI")                             # 8
_FULL = Struct("<3xBIfHIfIIIIIIffff" + "IIHHff" * 5)         # 162
_DISCONNECT = Struct("<3xBIH")                               # 10

#: documented size of each packet kind, header included
PACKET_SIZES: dict[int, int] = {
    ResponseCode.TICKER: _TICKER.size, ResponseCode.QUOTE: _QUOTE.size, ResponseCode.OI: _OI.size,
    ResponseCode.PREV_CLOSE: _PREV_CLOSE.size, ResponseCode.MARKET_STATUS: _MARKET_STATUS.size,
    ResponseCode.FULL: _FULL.size, ResponseCode.DISCONNECT: _DISCONNECT.size,
}
assert [PACKET_SIZES[c] for c in (2, 4, 5, 6, 7, 8, 50)] == [16, 50, 12, 16, 8, 162, 10]

#: decimals of a price without the instrument's tick, per segment (see the module text)
PRICE_DECIMALS: dict[int, int] = {code: 2 for code in SEGMENT_NAMES}
PRICE_DECIMALS[ExchangeSegment.NSE_CURRENCY] = 4
PRICE_DECIMALS[ExchangeSegment.BSE_CURRENCY] = 4
#: rounding a float32 to N decimals gives back the sent price below this magnitude
EXACT_BELOW: dict[int, float] = {2: 131_072.0, 4: 1_024.0}
#: no price above this is plausible (rupees); also rejects float32 infinities
MAX_PRICE = 100_000_000.0

#: India Standard Time is UTC+05:30 all year
IST_OFFSET_S = 19_800
#: no trade time before 2000-01-01 00:00 IST is plausible (as an IST epoch)
EARLIEST_LTT_IST = 946_684_800
#: default allowance for a trade time after now (clock differences)
LTT_AHEAD_S = 600

_SEGMENT_OK = frozenset(SEGMENT_NAMES)
_isfinite = math.isfinite
_time = time.time


def _price_problem(t: tuple, names: tuple[tuple[str, int], ...]) -> str:
    for name, i in names:
        v = t[i]
        if not (0.0 <= v < MAX_PRICE):
            return f"{name} {v!r}"
    return f"prices sum to {sum(t[i] for _, i in names)!r}, over {MAX_PRICE:.0f}"


_new = tuple.__new__
_quote_prices = itemgetter(2, 5, 9, 10, 11, 12)
#: positions of the 16 prices in a full packet's fields (segment first)
_FULL_PRICE_FIELDS = (2, 5, 12, 13, 14, 15, *(16 + 6 * lvl + k for lvl in range(5) for k in (4, 5)))
_full_prices = itemgetter(*_FULL_PRICE_FIELDS)
_QUOTE_PRICES = (("ltp", 2), ("atp", 5), ("open", 9), ("close", 10), ("high", 11), ("low", 12))
_FULL_PRICES = (("ltp", 2), ("atp", 5), ("open", 12), ("close", 13), ("high", 14), ("low", 15)) + tuple(
    (f"{side}_price[{lvl + 1}]", 16 + 6 * lvl + k) for lvl in range(5) for side, k in (("bid", 4), ("ask", 5)))

#: response code -> what checks and builds its record: the struct's unpack_from, the prices
#: (a tuple) and their names, the index of ``ltt_ist`` (0: none), the record class
_PRICED = {
    int(ResponseCode.FULL): (_FULL.unpack_from, _full_prices, _FULL_PRICES, 4, Full),
    int(ResponseCode.TICKER): (_TICKER.unpack_from, itemgetter(slice(2, 3)), (("ltp", 2),), 3, Ticker),
    int(ResponseCode.QUOTE): (_QUOTE.unpack_from, _quote_prices, _QUOTE_PRICES, 4, Quote),
    int(ResponseCode.PREV_CLOSE): (_PREV_CLOSE.unpack_from, itemgetter(slice(2, 3)), (("prev_close", 2),), 0,
                                  PrevClose),
}


def _ltt_bounds(now: float | None, ahead_s: float, max_age_s: float | None) -> tuple[float, float]:
    """The range ``[lo, hi]`` a trade time (IST epoch seconds) must lie in at ``now``."""
    now_ist = (_time() if now is None else now) + IST_OFFSET_S
    return (EARLIEST_LTT_IST if max_age_s is None else max(EARLIEST_LTT_IST, now_ist - max_age_s)), now_ist + ahead_s


def decode(frame: bytes | bytearray | memoryview, now: float | None = None,
           ahead_s: float = LTT_AHEAD_S, max_age_s: float | None = None) -> Decoded:
    """Decode one binary WebSocket message of Dhan's live market feed.

    ``frame``: the message (one or more packets back to back).
    ``now``: the current time as UTC epoch seconds for the trade-time check
    (default: the wall clock); a trade time (``ltt_ist``, 0 allowed: "no
    trade") must lie in [:data:`EARLIEST_LTT_IST`, now + ``ahead_s``] and, if
    ``max_age_s`` is given, not before now - ``max_age_s``.

    Returns :class:`Decoded` ``(records, errors)``: the records of the good
    packets in order (:class:`Ticker`, :class:`Quote`, :class:`OpenInterest`,
    :class:`PrevClose`, :class:`MarketStatus`, :class:`Full`,
    :class:`Disconnect`) and a :class:`WireError` for each bad packet.  Never
    raises on the content of ``frame``; a packet with an unknown code is
    skipped by its length field when that is plausible, otherwise the rest of
    the message is reported as one error.

    Document: DhanHQ v2 "Live Market Feed", sections "Response Header" to
    "Feed Disconnect"."""
    records: list = []
    errors: list = []
    ltt_lo, ltt_hi = _ltt_bounds(now, ahead_s, max_age_s)
    _walk(frame, ltt_lo, ltt_hi, records.append, errors)
    return _new(Decoded, (records, errors))


def _walk(frame, ltt_lo: float, ltt_hi: float, append, errors: list) -> None:
    """The packets of one message: each good one's record to ``append``, a
    :class:`WireError` for each bad one to ``errors`` (see :func:`decode`)."""
    n = len(frame)
    if n == 0:
        errors.append(WireError("short", "empty message"))
        return
    off = 0
    while off < n:
        left = n - off
        if left < HEADER_SIZE:
            errors.append(WireError("short", f"{left} bytes left, a header has 8", off))
            break
        code, length, seg, sid = _HEADER.unpack_from(frame, off)
        size = PACKET_SIZES.get(code)
        if size is None:
            known = code == ResponseCode.INDEX
            skip = HEADER_SIZE <= length <= left
            detail = f"{length} bytes by its length field" + ("" if skip else ", rest of message dropped")
            errors.append(WireError("undocumented-code" if known else "unknown-code", detail, off, code, seg, sid))
            if not skip:
                break
            off += length
            continue
        if code == ResponseCode.MARKET_STATUS and length > size and length <= left:
            size = length                     # an undocumented body: keep it, walk past it
        if left < size:
            errors.append(WireError("truncated", f"{left} of {size} bytes", off, code, seg, sid))
            break
        start = off
        off += size
        if length != size and length != size - HEADER_SIZE:
            errors.append(WireError("length", f"length field {length}, documented size {size}",
                                    start, code, seg, sid))
            continue
        if seg not in _SEGMENT_OK:
            errors.append(WireError("segment", f"unknown exchange segment {seg}", start, code, seg, sid))
            continue
        spec = _PRICED.get(code)
        if spec is not None:
            unpack, prices, names, lt, cls = spec
            t = unpack(frame, start)
            p = prices(t)
            if not (min(p) >= 0.0 and sum(p) < MAX_PRICE):
                errors.append(WireError("price", _price_problem(t, names), start, code, seg, sid))
                continue
            if lt:
                ltt = t[lt]
                if ltt and not (ltt_lo <= ltt <= ltt_hi):
                    errors.append(WireError("ltt", f"ltt_ist {ltt} outside [{ltt_lo:.0f}, {ltt_hi:.0f}]",
                                            start, code, seg, sid))
                    continue
            append(_new(Full, t[:16] + (t[16:],)) if cls is Full else _new(cls, t))
        elif code == 5:
            append(_new(OpenInterest, _OI.unpack_from(frame, start)))
        elif code == 7:
            append(MarketStatus(seg, sid, bytes(frame[start + HEADER_SIZE:off])))
        else:  # 50
            append(_new(Disconnect, _DISCONNECT.unpack_from(frame, start)))


class DecodedMany(NamedTuple):
    """What :func:`decode_many` returns.

    ``records``: the records of the good packets of every message, in order;
    ``index``: for each record, the position of its message in the list
    given (so ``len(index) == len(records)``; a message of one packet has
    one entry); ``errors``: one :class:`WireError` per bad packet, in order;
    ``messages``: how many messages gave at least one record;
    ``disconnects``: how many of the records are :class:`Disconnect`."""
    records: list
    index: list
    errors: list
    messages: int
    disconnects: int


#: a message that is one full packet, header included, read in one call
_FULL_MESSAGE = Struct("<BHB" + _FULL.format.removeprefix("<3xB"))
assert _FULL_MESSAGE.size == _FULL.size
_full_message_prices = itemgetter(*(i + 2 for i in _FULL_PRICE_FIELDS))     # after code and length
_FULL_LENGTHS = frozenset({_FULL.size, _FULL.size - HEADER_SIZE})


def decode_many(frames, now: float | None = None, ahead_s: float = LTT_AHEAD_S,
                max_age_s: float | None = None) -> DecodedMany:
    """Decode the binary WebSocket messages ``frames`` (a sequence of
    bytes-like objects, each one message as :func:`decode` takes it) received
    together, with one trade-time range for all of them (``now``,
    ``ahead_s``, ``max_age_s`` as for :func:`decode`).

    Returns :class:`DecodedMany`: the records and errors are exactly those
    :func:`decode` gives for each message in turn, laid end to end, with the
    message of each record in ``index``.  A message that is a single full
    packet (what Dhan sends in full mode) is read with one ``unpack``;
    anything else, and a full packet that fails a check, goes through
    :func:`decode`'s walk, which reports the error.  Never raises on the
    content of a message.

    Document: DhanHQ v2 "Live Market Feed", as for :func:`decode`."""
    ltt_lo, ltt_hi = _ltt_bounds(now, ahead_s, max_age_s)
    records: list = []
    index: list = []
    errors: list = []
    append = records.append
    mark = index.append
    unpack = _FULL_MESSAGE.unpack
    prices = _full_message_prices
    lengths = _FULL_LENGTHS
    segments = _SEGMENT_OK
    full_size = _FULL.size
    full_code = int(ResponseCode.FULL)
    messages = disconnects = 0
    i = -1
    for frame in frames:
        i += 1
        if len(frame) == full_size and frame[0] == full_code:
            t = unpack(frame)
            if t[1] in lengths and t[2] in segments:
                p = prices(t)
                if min(p) >= 0.0 and sum(p) < MAX_PRICE:     # implies each < MAX_PRICE; else the walk judges
                    ltt = t[6]
                    if not ltt or ltt_lo <= ltt <= ltt_hi:
                        append(_new(Full, t[2:18] + (t[18:],)))
                        mark(i)
                        messages += 1
                        continue
        before = len(records)
        _walk(frame, ltt_lo, ltt_hi, append, errors)
        got = len(records) - before
        if got:
            messages += 1
            index.extend([i] * got)
            for r in records[before:]:
                if type(r) is Disconnect:
                    disconnects += 1
    return _new(DecodedMany, (records, index, errors, messages, disconnects))


# --------------------------------------------------------------------------- prices and times

def price_text(value: float, decimals: int = 2) -> str:
    """``value`` (a float32 price as decoded) rounded to ``decimals`` as text,
    e.g. ``price_text(1650.449951171875) == "1650.45"``; the form for COPY.
    Exact below :data:`EXACT_BELOW` [decimals] (see the module text).
    Raises ValueError for NaN or an infinity."""
    if not _isfinite(value):
        raise ValueError(f"price {value!r} is not a number")
    s = "%.*f" % (decimals, value)
    return s[1:] if s[0] == "-" and not s.strip("-0.") else s      # no "-0.00"


#: %-format of a price with 2 or 4 decimals; safe on decoded prices, which are finite and >= 0
PRICE_FORMAT: dict[int, str] = {2: "%.2f", 4: "%.4f"}


def format_prices(values: Iterable[float], decimals: int = 2) -> list[str]:
    """Texts of many decoded prices at once (the fast path for rows: the 16
    prices of a full packet cost one call).  Only for prices from
    :func:`decode`, which are finite and non-negative; see :func:`price_text`
    for exactness."""
    return list(map(PRICE_FORMAT[decimals].__mod__, values))


def price_units(values: Iterable[float], decimals: int = 2) -> list[int]:
    """Many decoded prices as integers of 10**-decimals rupees (paise for 2):
    ``price_units([1650.449951171875]) == [165045]``; about half the cost of
    :func:`format_prices`.  The same exactness as :func:`price_text`; for a
    ``numeric`` column the COPY text ``"165045e-2"`` or
    ``Decimal(165045).scaleb(-2)`` gives the exact value."""
    scale = 10 ** decimals
    return list(map(round, [v * scale for v in values]))


def price_decimal(value: float, segment: int = ExchangeSegment.NSE_EQ, tick: Decimal | None = None) -> Decimal:
    """The exact price of a decoded float32 ``value``: the nearest multiple of
    ``tick`` when the instrument's tick is known (:func:`price_on_tick`), else
    rounded to :data:`PRICE_DECIMALS` of ``segment`` (2, or 4 for currency).
    Raises ValueError for NaN/infinity, an unknown segment or a tick <= 0."""
    if tick is not None:
        return price_on_tick(value, tick)
    decimals = PRICE_DECIMALS.get(segment)
    if decimals is None:
        raise ValueError(f"unknown Dhan exchange segment code {segment!r}")
    return Decimal(price_text(value, decimals))


def price_on_tick(value: float, tick: Decimal) -> Decimal:
    """The multiple of ``tick`` (e.g. ``Decimal("0.05")``) nearest to ``value``,
    with the tick's exponent (``Decimal("1650.45")``).  Exact while half a
    float32 step is under half a tick (below ``2**23 * tick``).  Raises
    ValueError for NaN/infinity or a tick <= 0."""
    if not _isfinite(value):
        raise ValueError(f"price {value!r} is not a number")
    tick = Decimal(tick)
    if not tick > 0:
        raise ValueError(f"tick {tick} is not positive")
    return (round(Decimal(repr(value)) / tick) * tick).quantize(tick)


def ltt_to_utc_ns(ltt_ist: int) -> int | None:
    """A packet's ``ltt_ist`` (epoch seconds of IST wall clock, as Dhan sends it)
    as UTC epoch nanoseconds; None for 0 ("no trade").  Source: dhan-oss/DhanHQ-py
    issue 51 (Dhan converts IST to epoch directly); see the module text."""
    if not ltt_ist:
        return None
    return (ltt_ist - IST_OFFSET_S) * 1_000_000_000


def ltt_to_utc(ltt_ist: int) -> datetime | None:
    """Like :func:`ltt_to_utc_ns`, as an aware UTC datetime (None for 0)."""
    if not ltt_ist:
        return None
    return datetime.fromtimestamp(ltt_ist - IST_OFFSET_S, timezone.utc)


# --------------------------------------------------------------------------- disconnect codes

#: reason codes of the Feed Disconnect packet, which are Dhan's data API error
#: codes ("Annexure", section "Data API Error")
DISCONNECT_REASONS: dict[int, str] = {
    800: "internal server error",
    804: "requested number of instruments exceeds limit",
    805: "too many requests or connections (more than 5 feed connections: the oldest is closed); "
         "further requests may get the user blocked",
    806: "Data APIs not subscribed",
    807: "access token is expired",
    808: "authentication failed: client id or access token invalid",
    809: "access token is invalid",
    810: "client id is invalid",
    811: "invalid expiry date",
    812: "invalid date format",
    813: "invalid security id",
    814: "invalid request",
}
#: more connections than allowed ("Live Market Feed", "Feed Disconnect": the first
#: socket is disconnected with 805 for every connection beyond 5)
TOO_MANY_CONNECTIONS = limits.TOO_MANY_CONNECTIONS_CODE
#: codes no reconnection can cure: the token or client id is refused (807-810) or the
#: account lacks the Data APIs (806); the collector stops with :data:`EXIT_FATAL`
FATAL_CODES = frozenset({806, 807, 808, 809, 810})
#: exit status for a fatal code (EX_NOPERM, as for an expired Kite token; not restarted)
EXIT_FATAL = EX_NOPERM


def disconnect_reason(code: int) -> str:
    """The meaning of a disconnect reason ``code`` ("unknown reason N" when undocumented)."""
    return DISCONNECT_REASONS.get(code, f"unknown reason {code}")


def disconnect_action(code: int) -> str:
    """What a collector does after a Feed Disconnect with ``code``:

    * ``"exit"``: a :data:`FATAL_CODES` code: one clear line, exit :data:`EXIT_FATAL`;
    * ``"backoff"``: 805 (another connection of the same user took the slot;
      reconnecting at once would close a connection in turn), 804 (our
      subscription broke a limit) and 814: reconnect only after the long delay;
    * ``"reconnect"``: anything else (800, undocumented codes): reconnect with
      the usual backoff."""
    if code in FATAL_CODES:
        return "exit"
    if code in (804, 805, 814):
        return "backoff"
    return "reconnect"
