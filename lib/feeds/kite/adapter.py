"""Kite ticker packets -> table rows.  Pure, no I/O.

Venue document: Kite Connect v3 "WebSocket streaming", section "Message
structure" (binary frames of LTP, quote and full packets, index packets,
1-byte heartbeats).  A binary frame is ``uint16 number_of_packets`` and,
for each packet, ``uint16 length`` and the packet, all big-endian; the
packet kind follows from its length:

============  =====  ========================================================
packet        bytes  stored in
============  =====  ========================================================
LTP             8    ``kite_tick_ltp``
index quote    28    ``kite_tick_quote`` (quantities NULL)
quote          44    ``kite_tick_quote``
index full     32    ``kite_tick_full`` (quantities, OI and depth NULL)
full          184    ``kite_tick_full`` with the five-level depth
============  =====  ========================================================

Prices travel as unsigned integers in the segment's smallest unit: divide
by 100 (paise), by 10^7 for the currency segment CDS (segment 3) and by
10^4 for BCD (6) and NCO (12); the segment is ``instrument_token & 0xff``.
Rows carry prices as exact decimal text built from those integers
(``157370`` paise -> ``"1573.70"``), so a price never passes through a
binary float on its way to the ``numeric`` columns.  Exchange times are
epoch seconds; rows carry them as UTC timestamp text
(``2021-07-05 05:11:27+00:00``); 0 (no time) becomes NULL.

Two decoders give identical rows:

* :class:`FrameDecoder` reads the raw frame bytes (one ``struct`` call per
  packet).  The collector uses it by default: it is about twenty times
  cheaper than KiteTicker's own parser.
* :func:`rows_from_ticks` converts the tick dicts that kiteconnect's
  ``KiteTicker._parse_binary`` yields (its ``on_ticks`` callback): floats
  divided by the segment divisor and naive local datetimes, which the
  collector makes IST by running with ``TZ=Asia/Kolkata``.  Prices are
  recovered exactly as ``round(price * divisor)`` (the division was
  correctly rounded and every price is below 2**32 units), the naive IST
  times are converted to UTC.

Every row ends with ``recv_time`` (text from :func:`feeds.timetext.now_text`, the frame's
receive time) and ``seq`` (the packet's position in its frame); with
``instrument_token`` they form the tables' natural key, so a replayed spool
never duplicates a tick.

Ranges (:mod:`feeds.plausible`): prices and quantities are unsigned 32-bit
integers on the wire, so they are never negative and always fit; 0 is a
valid price (an empty depth level, an instrument not traded yet).  The
exchange times (``last_trade_time``, ``exchange_timestamp``) must be 0 (no
time) or inside :data:`WINDOW`: not before 2010 (Kite did not exist) and not
more than 10 minutes ahead of now.  A packet outside these ranges is skipped
and counted like a packet of unknown length; ticks from KiteTicker are held
to the same ranges (prices must come back as 0 .. 2**32-1 units).
"""
from __future__ import annotations

import struct
from datetime import datetime, timedelta
from typing import Callable

from .. import plausible
from .. import timetext as T
from ..sink import Table

SEGMENT_CDS = 3
SEGMENT_BCD = 6
SEGMENT_INDICES = 9
SEGMENT_NCO = 12

MODE_LTP = "ltp"
MODE_QUOTE = "quote"
MODE_FULL = "full"
MODES = (MODE_LTP, MODE_QUOTE, MODE_FULL)

LTP_TABLE = Table("kite_tick_ltp", ("instrument_token", "last_price", "recv_time", "seq"),
                  partition_column="recv_time", time_column="recv_time")
_QUOTE_COLS = ("instrument_token", "last_price", "last_traded_quantity", "average_traded_price",
               "volume_traded", "total_buy_quantity", "total_sell_quantity", "open", "high", "low", "close")
QUOTE_TABLE = Table("kite_tick_quote", _QUOTE_COLS + ("recv_time", "seq"),
                    partition_column="recv_time", time_column="recv_time")
FULL_TABLE = Table("kite_tick_full",
                   _QUOTE_COLS + ("last_trade_time", "oi", "oi_day_high", "oi_day_low", "exchange_timestamp",
                                  "bid_price", "bid_quantity", "bid_orders",
                                  "ask_price", "ask_quantity", "ask_orders", "recv_time", "seq"),
                   partition_column="recv_time", time_column="recv_time")
TABLES = (LTP_TABLE, QUOTE_TABLE, FULL_TABLE)
#: table name per mode
TABLE_OF = {MODE_LTP: LTP_TABLE.name, MODE_QUOTE: QUOTE_TABLE.name, MODE_FULL: FULL_TABLE.name}

_LTP = struct.Struct(">II")
_INDEX_QUOTE = struct.Struct(">IIIIIIi")
_INDEX_FULL = struct.Struct(">IIIIIIiI")
_QUOTE = struct.Struct(">11I")
_FULL = struct.Struct(">16I" + "IIHxx" * 10)
assert (_LTP.size, _INDEX_QUOTE.size, _INDEX_FULL.size, _QUOTE.size, _FULL.size) == (8, 28, 32, 44, 184)
_U16 = struct.Struct(">H")


class Malformed(plausible.Malformed):
    """A frame whose packet headers do not add up (cut short, or a packet of a
    length no packet kind has), or a tick outside its plausible range."""


#: The plausible range of Kite exchange times (epoch ms; packets carry seconds):
#: from 2010-01-01 to 10 minutes ahead of now.  A module-level policy; tests
#: may replace it (or its ``clock``, then call ``WINDOW.refresh()``).
WINDOW = plausible.Window(plausible.KITE_START_MS, ahead_ms=10 * plausible.MINUTE_MS)
_U32_MAX = (1 << 32) - 1


def _times_ok(*secs: int) -> str | None:
    """None if every epoch-second time is 0 or inside :data:`WINDOW`, else the reason."""
    w = WINDOW
    for sec in secs:
        if sec and not w.ok(sec * 1000):
            return f"exchange time {sec} s outside {w.lo // 1000}..{w.hi // 1000} s"
    return None


def divisor(instrument_token: int) -> int:
    """Price divisor of the token's segment: 100, 10**4 (BCD, NCO) or 10**7 (CDS)."""
    seg = instrument_token & 0xFF
    if seg == SEGMENT_CDS:
        return 10_000_000
    if seg == SEGMENT_BCD or seg == SEGMENT_NCO:
        return 10_000
    return 100


_PRICE_FMT = {100: "%d.%02d", 10_000: "%d.%04d", 10_000_000: "%d.%07d"}


class _PriceTexts(dict):
    """``units -> text`` for one divisor, filled on first use: prices repeat
    (they sit on a tick-size grid), so formatting is mostly a dict lookup."""

    __slots__ = ("div", "fmt")
    LIMIT = 500_000

    def __init__(self, div: int):
        super().__init__()
        self.div, self.fmt = div, _PRICE_FMT[div]

    def __missing__(self, units: int) -> str:
        if len(self) >= self.LIMIT:
            self.clear()
        t = self[units] = self.fmt % divmod(units, self.div)
        return t


_TEXTS = {d: _PriceTexts(d) for d in _PRICE_FMT}


def price_text(units: int, div: int) -> str:
    """Integer price units -> exact decimal text (``157370, 100 -> "1573.70"``).

    Raises KeyError for a divisor other than 100, 10**4, 10**7."""
    return _TEXTS[div][units]


def epoch_text(sec: int) -> str | None:
    """Epoch seconds -> ``YYYY-MM-DD HH:MM:SS+00:00`` (UTC); 0 (no time in the packet) -> None."""
    return T.epoch_text(sec) if sec else None


class FrameDecoder:
    """Decode raw ticker frames into rows for the three tick tables.

    :meth:`decode` takes one binary WebSocket message and its receive time
    text and returns ``(ltp_rows, quote_rows, full_rows)`` (lists of tuples
    in the column order of :data:`LTP_TABLE`, :data:`QUOTE_TABLE`,
    :data:`FULL_TABLE`).  A 1-byte heartbeat gives three empty lists.
    Packets of an unknown length, and packets whose exchange times are
    outside :data:`WINDOW`, are skipped and counted in ``malformed`` (as
    KiteTicker skips unknown packets); ``on_bad(reason)``, if set, is called
    once for each such packet.  A frame cut short raises :class:`Malformed`
    after the rows of its complete packets were kept in ``partial``.
    """

    def __init__(self, on_bad: Callable[[str], None] | None = None) -> None:
        self.malformed = 0
        self.partial: tuple[list, list, list] = ([], [], [])
        self.on_bad = on_bad

    def _bad(self, reason: str) -> None:
        self.malformed += 1
        if self.on_bad is not None:
            self.on_bad(reason)

    def decode(self, frame: bytes, recv: str) -> tuple[list, list, list]:
        ltp: list = []
        quote: list = []
        full: list = []
        n = len(frame)
        if n < 2:
            return ltp, quote, full
        count = _U16.unpack_from(frame, 0)[0]
        j = 2
        u16 = _U16.unpack_from
        texts = _TEXTS
        w = WINDOW
        lo, hi = w.lo // 1000, w.hi // 1000      # exchange times in seconds; 0 = none
        for seq in range(count):
            if j + 2 > n:
                self.partial = (ltp, quote, full)
                raise Malformed(f"frame of {n} bytes ends inside the header of packet {seq + 1} of {count}")
            length = u16(frame, j)[0]
            j += 2
            end = j + length
            if end > n:
                self.partial = (ltp, quote, full)
                raise Malformed(f"packet {seq + 1} of {count} claims {length} bytes, {n - j} left in the frame")
            if length == 184:
                v = _FULL.unpack_from(frame, j)
                tok = v[0]
                if not ((lo <= v[11] <= hi or not v[11]) and (lo <= v[15] <= hi or not v[15])):
                    bad = _times_ok(v[11], v[15])
                    if bad:
                        self._bad(f"full packet of {tok}: {bad}")
                        j = end
                        continue
                    lo, hi = w.lo // 1000, w.hi // 1000
                P = texts[divisor(tok)]
                full.append((
                    tok, P[v[1]], v[2], P[v[3]], v[4], v[5], v[6], P[v[7]], P[v[8]], P[v[9]], P[v[10]],
                    epoch_text(v[11]), v[12], v[13], v[14], epoch_text(v[15]),
                    "{%s,%s,%s,%s,%s}" % (P[v[17]], P[v[20]], P[v[23]], P[v[26]], P[v[29]]),
                    "{%d,%d,%d,%d,%d}" % (v[16], v[19], v[22], v[25], v[28]),
                    "{%d,%d,%d,%d,%d}" % (v[18], v[21], v[24], v[27], v[30]),
                    "{%s,%s,%s,%s,%s}" % (P[v[32]], P[v[35]], P[v[38]], P[v[41]], P[v[44]]),
                    "{%d,%d,%d,%d,%d}" % (v[31], v[34], v[37], v[40], v[43]),
                    "{%d,%d,%d,%d,%d}" % (v[33], v[36], v[39], v[42], v[45]),
                    recv, seq))
            elif length == 44:
                v = _QUOTE.unpack_from(frame, j)
                tok = v[0]
                P = texts[divisor(tok)]
                quote.append((tok, P[v[1]], v[2], P[v[3]], v[4], v[5], v[6],
                              P[v[7]], P[v[8]], P[v[9]], P[v[10]], recv, seq))
            elif length == 8:
                tok, lp = _LTP.unpack_from(frame, j)
                ltp.append((tok, texts[divisor(tok)][lp], recv, seq))
            elif length == 28 or length == 32:
                v = (_INDEX_FULL if length == 32 else _INDEX_QUOTE).unpack_from(frame, j)
                tok = v[0]
                if length == 32 and v[7] and not lo <= v[7] <= hi:
                    bad = _times_ok(v[7])
                    if bad:
                        self._bad(f"index packet of {tok}: {bad}")
                        j = end
                        continue
                    lo, hi = w.lo // 1000, w.hi // 1000
                P = texts[divisor(tok)]
                # layout: last_price, high, low, open, close, change; stored as open, high, low, close
                base = (tok, P[v[1]], None, None, None, None, None, P[v[4]], P[v[2]], P[v[3]], P[v[5]])
                if length == 28:
                    quote.append(base + (recv, seq))
                else:
                    full.append(base + (None, None, None, None, epoch_text(v[7]),
                                        None, None, None, None, None, None, recv, seq))
            else:
                self._bad(f"packet {seq + 1} of {count}: no packet kind is {length} bytes long")
            j = end
        return ltp, quote, full


# ---------------------------------------------------------------- KiteTicker ticks

_IST_EPOCH = datetime(1970, 1, 1, 5, 30)     # the epoch as a naive IST wall-clock time
_SECOND = timedelta(seconds=1)


def _naive_ist_text(dt) -> str | None:
    if dt is None:
        return None
    sec = (dt - _IST_EPOCH) // _SECOND
    bad = _times_ok(sec)
    if bad:
        raise Malformed(bad)
    return epoch_text(sec)


def _units(x: float, div: int) -> int:
    """A KiteTicker price (units / divisor, a float) -> integer units 0 .. 2**32-1."""
    try:
        u = int(round(x * div))
    except (OverflowError, ValueError, TypeError):
        raise Malformed(f"price not a finite number: {x!r:.40}") from None
    if not 0 <= u <= _U32_MAX:
        raise Malformed(f"price {x!r:.40} outside 0 .. 2**32-1 units of 1/{div}")
    return u


def _u32(x) -> int:
    if type(x) is int and 0 <= x <= _U32_MAX:
        return x
    raise Malformed(f"quantity not an integer 0 .. 2**32-1: {x!r:.40}")


def rows_from_ticks(ticks: list[dict], recv: str,
                    on_bad: Callable[[str], None] | None = None) -> tuple[list, list, list]:
    """KiteTicker tick dicts (kiteconnect 5.2.2 ``on_ticks``) -> rows.

    Returns ``(ltp_rows, quote_rows, full_rows)`` exactly as
    :meth:`FrameDecoder.decode` returns them for the same frame.  Datetimes
    must be naive IST wall-clock times (KiteTicker's ``fromtimestamp`` in a
    process running with ``TZ=Asia/Kolkata``).  Raises KeyError/TypeError
    for a dict that is not a KiteTicker tick.  A tick outside the ranges of
    the packets (prices 0 .. 2**32-1 units, quantities unsigned 32-bit,
    exchange times inside :data:`WINDOW`) is skipped and ``on_bad(reason)``
    called; without ``on_bad`` it raises :class:`Malformed` (a ValueError).
    """
    ltp: list = []
    quote: list = []
    full: list = []
    for seq, t in enumerate(ticks):
        tok = t["instrument_token"]
        div = divisor(tok)
        T = _TEXTS[div]

        def p(x: float) -> str:
            return T[_units(x, div)]
        try:
            mode = t["mode"]
            if mode == MODE_LTP:
                ltp.append((tok, p(t["last_price"]), recv, seq))
                continue
            o = t["ohlc"]
            if "volume_traded" in t:
                base = (tok, p(t["last_price"]), _u32(t["last_traded_quantity"]), p(t["average_traded_price"]),
                        _u32(t["volume_traded"]), _u32(t["total_buy_quantity"]), _u32(t["total_sell_quantity"]),
                        p(o["open"]), p(o["high"]), p(o["low"]), p(o["close"]))
            else:                                   # index packet
                base = (tok, p(t["last_price"]), None, None, None, None, None,
                        p(o["open"]), p(o["high"]), p(o["low"]), p(o["close"]))
            if mode == MODE_QUOTE:
                quote.append(base + (recv, seq))
                continue
            depth = t.get("depth")
            if depth is None:                       # index full
                full.append(base + (None, None, None, None, _naive_ist_text(t.get("exchange_timestamp")),
                                    None, None, None, None, None, None, recv, seq))
                continue
            b, s = depth["buy"], depth["sell"]
            full.append(base + (
                _naive_ist_text(t.get("last_trade_time")), _u32(t["oi"]), _u32(t["oi_day_high"]),
                _u32(t["oi_day_low"]), _naive_ist_text(t.get("exchange_timestamp")),
                "{%s}" % ",".join(p(x["price"]) for x in b),
                "{%s}" % ",".join("%d" % _u32(x["quantity"]) for x in b),
                "{%s}" % ",".join("%d" % _u32(x["orders"]) for x in b),
                "{%s}" % ",".join(p(x["price"]) for x in s),
                "{%s}" % ",".join("%d" % _u32(x["quantity"]) for x in s),
                "{%s}" % ",".join("%d" % _u32(x["orders"]) for x in s),
                recv, seq))
        except Malformed as e:
            if on_bad is None:
                raise
            on_bad(f"tick {seq + 1} of {len(ticks)} ({tok}): {e}")
    return ltp, quote, full
