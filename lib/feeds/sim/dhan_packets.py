"""Dhan's v2 live market feed packets, built the way the Dhan server sends them.

The simulator's encoder.  Written from the tables of DhanHQ v2 "Live Market
Feed" (sections "Response Header", "Ticker Packet", "Prev Close", "Quote
Packet", "OI Data", "Full Packet", "Feed Disconnect") on its own, without the
decoder's formats (``feeds.dhan.wire``), so that the tests of each check the
other.  Every packet is little-endian and starts with the 8-byte response
header: response code (1 byte), message length (2 bytes, written here as the
size of the whole packet, header included), exchange segment (1 byte),
security id (4 bytes).

Arguments are plain Python numbers: ``segment`` is the Annexure code
(NSE_EQ = 1, ...), prices are rupees as float (sent as float32, as Dhan
does), quantities are non-negative ints, ``ltt`` is what Dhan puts on the
wire: epoch seconds of the *IST* wall clock (:func:`ltt_from_utc` makes it
from a UTC epoch).  A value that does not fit its field raises
``struct.error``; a depth with more than 5 levels raises ValueError.
"""
from __future__ import annotations

import struct
from typing import Sequence

__all__ = ["TICKER", "QUOTE", "OI", "PREV_CLOSE", "MARKET_STATUS", "FULL", "DISCONNECT",
           "IST_SHIFT_S", "ltt_from_utc", "pack_header", "pack_ticker", "pack_quote", "pack_oi",
           "pack_prev_close", "pack_market_status", "pack_full", "pack_disconnect", "pack_frame"]

#: feed response codes ("Annexure", "Feed Response Code")
TICKER, QUOTE, OI, PREV_CLOSE, MARKET_STATUS, FULL, DISCONNECT = 2, 4, 5, 6, 7, 8, 50

#: IST is 5 h 30 min ahead of UTC, all year
IST_SHIFT_S = 5 * 3600 + 30 * 60


def ltt_from_utc(utc_seconds: float) -> int:
    """The LTT Dhan sends for a trade at ``utc_seconds`` (UTC epoch): the epoch of
    the same IST wall-clock time, i.e. ``utc_seconds + 19800``, whole seconds."""
    return int(utc_seconds) + IST_SHIFT_S


def pack_header(code: int, length: int, segment: int, security_id: int) -> bytes:
    """The 8-byte response header: bytes 1 (code), 2-3 (length), 4 (segment), 5-8 (security id)."""
    return (struct.pack("<B", code) + struct.pack("<H", length)
            + struct.pack("<B", segment) + struct.pack("<I", security_id))


def _packet(code: int, segment: int, security_id: int, body: bytes) -> bytes:
    return pack_header(code, 8 + len(body), segment, security_id) + body


def pack_ticker(segment: int, security_id: int, ltp: float, ltt: int) -> bytes:
    """Ticker packet, 16 bytes: bytes 9-12 LTP (float32), 13-16 LTT (epoch, IST)."""
    return _packet(TICKER, segment, security_id, struct.pack("<f", ltp) + struct.pack("<I", ltt))


def pack_prev_close(segment: int, security_id: int, prev_close: float, prev_oi: int) -> bytes:
    """Prev Close packet, 16 bytes: 9-12 previous day close (float32), 13-16 previous day OI."""
    return _packet(PREV_CLOSE, segment, security_id, struct.pack("<fI", prev_close, prev_oi))


def pack_quote(segment: int, security_id: int, ltp: float, ltq: int, ltt: int, atp: float, volume: int,
               total_sell_qty: int, total_buy_qty: int, open: float, close: float, high: float,
               low: float) -> bytes:
    """Quote packet, 50 bytes: 9-12 LTP, 13-14 LTQ, 15-18 LTT, 19-22 ATP, 23-26 volume,
    27-30 total sell qty, 31-34 total buy qty, 35-38 open, 39-42 close, 43-46 high, 47-50 low."""
    body = b"".join((
        struct.pack("<f", ltp), struct.pack("<H", ltq), struct.pack("<I", ltt), struct.pack("<f", atp),
        struct.pack("<III", volume, total_sell_qty, total_buy_qty),
        struct.pack("<4f", open, close, high, low),
    ))
    return _packet(QUOTE, segment, security_id, body)


def pack_oi(segment: int, security_id: int, oi: int) -> bytes:
    """OI Data packet, 12 bytes: 9-12 open interest."""
    return _packet(OI, segment, security_id, struct.pack("<I", oi))


def pack_market_status(segment: int = 0, security_id: int = 0) -> bytes:
    """Market Status packet: the header alone (8 bytes), as the official client reads it."""
    return _packet(MARKET_STATUS, segment, security_id, b"")


def pack_full(segment: int, security_id: int, ltp: float, ltq: int, ltt: int, atp: float, volume: int,
              total_sell_qty: int, total_buy_qty: int, oi: int, oi_day_high: int, oi_day_low: int,
              open: float, close: float, high: float, low: float,
              depth: Sequence[Sequence[float]] = ()) -> bytes:
    """Full packet, 162 bytes: 9-12 LTP, 13-14 LTQ, 15-18 LTT, 19-22 ATP, 23-26 volume,
    27-30 total sell qty, 31-34 total buy qty, 35-38 OI, 39-42 OI day high, 43-46 OI day low,
    47-50 open, 51-54 close, 55-58 high, 59-62 low, 63-162 market depth.

    ``depth``: up to 5 levels, best first, each ``(bid_qty, ask_qty, bid_orders,
    ask_orders, bid_price, ask_price)``; missing levels are sent as zeros.  One
    level is 20 bytes: bid qty (4), ask qty (4), bid orders (2), ask orders (2),
    bid price (float32), ask price (float32)."""
    if len(depth) > 5:
        raise ValueError(f"a full packet has 5 depth levels, not {len(depth)}")
    levels = [struct.pack("<2I2H2f", *level) for level in depth]
    levels += [bytes(20)] * (5 - len(levels))
    body = b"".join((
        struct.pack("<f", ltp), struct.pack("<H", ltq), struct.pack("<I", ltt), struct.pack("<f", atp),
        struct.pack("<III", volume, total_sell_qty, total_buy_qty),
        struct.pack("<III", oi, oi_day_high, oi_day_low),
        struct.pack("<4f", open, close, high, low),
        *levels,
    ))
    return _packet(FULL, segment, security_id, body)


def pack_disconnect(reason: int, segment: int = 0, security_id: int = 0) -> bytes:
    """Feed Disconnect packet, 10 bytes: 9-10 the reason code (805, 807, ...)."""
    return _packet(DISCONNECT, segment, security_id, struct.pack("<H", reason))


def pack_frame(*packets: bytes) -> bytes:
    """Several packets back to back in one WebSocket message."""
    return b"".join(packets)
