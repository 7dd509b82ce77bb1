"""Kite ticker binary packets and the simulated market state behind them.

Follows Kite Connect v3 "WebSocket streaming", section "Message structure":
a binary frame is ``uint16 number_of_packets`` followed, for each packet, by
``uint16 packet_length`` and the packet; everything big-endian.  Packet kinds
are told apart by their length:

=========  =====  =============================================================
kind       bytes  fields (offsets in bytes)
=========  =====  =============================================================
LTP          8    0 instrument_token, 4 last_price
index quote 28    0 token, 4 last_price, 8 high, 12 low, 16 open, 20 close,
                  24 price change (signed)
index full  32    index quote + 28 exchange timestamp
quote       44    0 token, 4 last_price, 8 last_traded_quantity,
                  12 average_traded_price, 16 volume_traded,
                  20 total_buy_quantity, 24 total_sell_quantity,
                  28 open, 32 high, 36 low, 40 close
full       184    quote + 44 last_trade_time, 48 oi, 52 oi_day_high,
                  56 oi_day_low, 60 exchange timestamp, 64 depth: 5 bids then
                  5 offers of 12 bytes (uint32 quantity, uint32 price,
                  uint16 orders, 2 bytes padding)
=========  =====  =============================================================

Prices are unsigned integers in the segment's smallest unit: divide by 100
(paise), by 10^7 for the currency segment (CDS, segment 3) and by 10^4 for
BCD (6) and NCO (12); the segment is ``instrument_token & 0xff``.  Index
instruments (segment 9) get the index layouts.  Timestamps are epoch
seconds (UTC based, as Kite sends them; pykiteconnect turns them into naive
local wall-clock datetimes with ``datetime.fromtimestamp``).

The packers are vectorised with numpy: one structured record per packet,
including its 2-byte length prefix, so a frame for thousands of instruments
is a handful of array operations and one ``tobytes()``.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..calendars import IST
from .kite_bars import MinuteBars

log = logging.getLogger(__name__)


MODE_LTP = 0
MODE_QUOTE = 1
MODE_FULL = 2
MODE_NAMES = ("ltp", "quote", "full")
MODE_CODES = {name: code for code, name in enumerate(MODE_NAMES)}

SEGMENT_CDS = 3
SEGMENT_BCD = 6
SEGMENT_INDICES = 9
SEGMENT_NCO = 12

HEARTBEAT = b"\x00"

_DEPTH_DT = np.dtype([("quantity", ">u4"), ("price", ">u4"), ("orders", ">u2"), ("pad", ">u2")])

#: One record per packet, each starting with its own uint16 length prefix.
LTP_DT = np.dtype([("length", ">u2"), ("token", ">u4"), ("last_price", ">u4")])
INDEX_QUOTE_DT = np.dtype([
    ("length", ">u2"), ("token", ">u4"), ("last_price", ">u4"),
    ("high", ">u4"), ("low", ">u4"), ("open", ">u4"), ("close", ">u4"),
    ("change", ">i4"),
])
INDEX_FULL_DT = np.dtype(INDEX_QUOTE_DT.descr + [("timestamp", ">u4")])
QUOTE_DT = np.dtype([
    ("length", ">u2"), ("token", ">u4"), ("last_price", ">u4"),
    ("last_quantity", ">u4"), ("average_price", ">u4"), ("volume", ">u4"),
    ("buy_quantity", ">u4"), ("sell_quantity", ">u4"),
    ("open", ">u4"), ("high", ">u4"), ("low", ">u4"), ("close", ">u4"),
])
FULL_DT = np.dtype(QUOTE_DT.descr + [
    ("last_trade_time", ">u4"), ("oi", ">u4"), ("oi_day_high", ">u4"),
    ("oi_day_low", ">u4"), ("timestamp", ">u4"), ("depth", _DEPTH_DT, (10,)),
])

PACKET_LENGTHS = {
    "ltp": LTP_DT.itemsize - 2,
    "index_quote": INDEX_QUOTE_DT.itemsize - 2,
    "index_full": INDEX_FULL_DT.itemsize - 2,
    "quote": QUOTE_DT.itemsize - 2,
    "full": FULL_DT.itemsize - 2,
}
assert PACKET_LENGTHS == {"ltp": 8, "index_quote": 28, "index_full": 32, "quote": 44, "full": 184}

_U32 = 0xFFFFFFFF


def price_divisor(instrument_token: int) -> int:
    """Return the integer price divisor for a token's segment (100, 10^4 or 10^7)."""
    segment = instrument_token & 0xFF
    if segment == SEGMENT_CDS:
        return 10_000_000
    if segment in (SEGMENT_BCD, SEGMENT_NCO):
        return 10_000
    return 100


def frame(packets: Sequence[bytes]) -> bytes:
    """Build one binary ticker frame from raw packets (no length prefixes).

    Returns ``uint16 n`` + n x (``uint16 len`` + packet).  Raises ValueError
    for more than 65535 packets or a packet longer than 65535 bytes.
    """
    if len(packets) > 0xFFFF:
        raise ValueError("a frame holds at most 65535 packets")
    parts = [struct.pack(">H", len(packets))]
    for packet in packets:
        parts.append(struct.pack(">H", len(packet)))
        parts.append(packet)
    return b"".join(parts)


@dataclass(frozen=True)
class RecordedPackets:
    """Real ticker packets for one instrument, replayed unchanged.

    ``full`` (184 bytes) and ``quote`` (44 bytes) are the recorded packets;
    ``ltp`` (8 bytes) is derived from the quote packet's token and last price,
    which is the last price pykiteconnect's recorded LTP tick shows.
    """

    instrument_token: int
    full: bytes
    quote: bytes
    ltp: bytes

    @classmethod
    def load(cls, kite_dir: Path) -> "RecordedPackets | None":
        """Read ``ticker_full.packet``/``ticker_quote.packet`` (base64) from kite_dir.

        Returns None when either file is missing; raises ValueError when a
        file does not hold a packet of the expected length.
        """
        full_path = kite_dir / "ticker_full.packet"
        quote_path = kite_dir / "ticker_quote.packet"
        if not (full_path.is_file() and quote_path.is_file()):
            return None
        full = base64.b64decode(full_path.read_text().strip())
        quote = base64.b64decode(quote_path.read_text().strip())
        if len(full) != 184 or len(quote) != 44:
            raise ValueError(f"unexpected recorded packet lengths {len(full)}/{len(quote)} in {kite_dir}")
        token = struct.unpack_from(">I", full, 0)[0]
        if struct.unpack_from(">I", quote, 0)[0] != token:
            raise ValueError(f"recorded full and quote packets in {kite_dir} are for different tokens")
        return cls(token, full, quote, quote[:8])

    def packet(self, mode: int) -> bytes:
        """Return the recorded packet for a mode code (MODE_LTP/QUOTE/FULL)."""
        return (self.ltp, self.quote, self.full)[mode]


class Market:
    """Vectorised state of every simulated instrument, in integer price units.

    ``tokens`` is the instrument_token of each row; prices are integers in
    the token's segment unit (see module docstring), quantities in shares or
    lots as Kite sends them, times in epoch seconds.  ``advance(rows)`` moves
    the given rows one random-walk step (a trade), ``pack(rows, modes)``
    returns the bytes of a ticker frame for them.  Rows of instruments with
    recorded packets (``replay``) never move and are sent as recorded.

    Not thread-safe: use it from the event loop that owns it.
    """

    def __init__(
        self,
        tokens: Sequence[int],
        tick_sizes: Sequence[float],
        reference_prices: Sequence[float],
        *,
        seed: int | None = None,
        replay: Iterable[RecordedPackets] = (),
        clock=time.time,
    ) -> None:
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        n = len(tokens)
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.row_of: dict[int, int] = {int(t): i for i, t in enumerate(self.tokens)}
        segment = self.tokens & 0xFF
        self.is_index = segment == SEGMENT_INDICES
        self.divisor = np.full(n, 100, dtype=np.int64)
        self.divisor[segment == SEGMENT_CDS] = 10_000_000
        self.divisor[(segment == SEGMENT_BCD) | (segment == SEGMENT_NCO)] = 10_000
        tick = np.rint(np.asarray(tick_sizes, dtype=np.float64) * self.divisor).astype(np.int64)
        self.tick = np.where(tick > 0, tick, 5 * self.divisor // 100)
        ref = np.asarray(reference_prices, dtype=np.float64)
        # Instruments without a reference price get a stable pseudo price.
        fallback = 50.0 + (self.tokens % 3001).astype(np.float64) * 0.7
        ref = np.where(ref > 0, ref, fallback)
        close = (np.rint(ref * self.divisor / self.tick) * self.tick).astype(np.int64)
        close = np.maximum(close, self.tick)
        now = int(self._clock())
        self.close = close
        self.last_price = close.copy()
        self.open = close.copy()
        self.high = close.copy()
        self.low = close.copy()
        traded = ~self.is_index
        self.last_quantity = np.where(traded, 1, 0).astype(np.int64)
        self.volume = np.where(traded, 1000, 0).astype(np.int64)
        self.average_price = close.copy()
        self.buy_quantity = np.where(traded, 5000, 0).astype(np.int64)
        self.sell_quantity = np.where(traded, 5000, 0).astype(np.int64)
        self.oi = np.zeros(n, dtype=np.int64)
        self.oi_day_high = np.zeros(n, dtype=np.int64)
        self.oi_day_low = np.zeros(n, dtype=np.int64)
        self.last_trade_time = np.full(n, now, dtype=np.int64)
        self.timestamp = np.full(n, now, dtype=np.int64)
        self.is_replay = np.zeros(n, dtype=bool)
        #: minute candles of the generated trades (the historical candles API answers from them)
        self.bars = MinuteBars(n, now)
        self.recorded: dict[int, RecordedPackets] = {}
        self._recorded_depth: dict[int, np.ndarray] = {}
        for rec in replay:
            row = self.row_of.get(rec.instrument_token)
            if row is None:
                log.warning("event=replay_skipped token=%d reason=not_in_instrument_master", rec.instrument_token)
                continue
            self.recorded[row] = rec
            self.is_replay[row] = True
            self._load_row_from_full(row, rec.full)

    def __len__(self) -> int:
        return len(self.tokens)

    def _load_row_from_full(self, row: int, packet: bytes) -> None:
        rec = np.frombuffer(struct.pack(">H", len(packet)) + packet, dtype=FULL_DT)[0]
        for name in ("last_price", "last_quantity", "average_price", "volume", "buy_quantity",
                     "sell_quantity", "open", "high", "low", "close", "last_trade_time", "oi",
                     "oi_day_high", "oi_day_low", "timestamp"):
            getattr(self, name)[row] = int(rec[name])
        self._recorded_depth[row] = rec["depth"].copy()

    # ------------------------------------------------------------------ moves

    def advance(self, rows: np.ndarray) -> None:
        """Move each given row one trade: last price by -2..+2 ticks, volume, OHLC.

        ``rows`` is an int array of row numbers (may repeat); replayed rows
        are left untouched.  Timestamps are set to the current epoch second,
        and the trade is folded into that minute's candle (:attr:`bars`).
        """
        rows = rows[~self.is_replay[rows]]
        if rows.size == 0:
            return
        rng = self._rng
        k = rows.size
        tick = self.tick[rows]
        price = self.last_price[rows] + rng.integers(-2, 3, size=k) * tick
        price = np.maximum(price, tick)
        self.last_price[rows] = price
        self.high[rows] = np.maximum(self.high[rows], price)
        self.low[rows] = np.minimum(self.low[rows], price)
        traded = ~self.is_index[rows]
        qty = np.where(traded, rng.integers(1, 200, size=k), 0)
        vol = self.volume[rows]
        new_vol = vol + qty
        avg = np.where(
            new_vol > 0,
            np.rint((self.average_price[rows] * vol.astype(np.float64) + price * qty.astype(np.float64))
                    / np.maximum(new_vol, 1)),
            price,
        ).astype(np.int64)
        self.last_quantity[rows] = qty
        self.volume[rows] = new_vol & _U32
        self.average_price[rows] = avg
        drift = rng.integers(-50, 51, size=(2, k))
        self.buy_quantity[rows] = np.where(traded, np.maximum(self.buy_quantity[rows] + drift[0], 0), 0)
        self.sell_quantity[rows] = np.where(traded, np.maximum(self.sell_quantity[rows] + drift[1], 0), 0)
        now = int(self._clock())
        self.last_trade_time[rows] = now
        self.timestamp[rows] = now
        self.bars.record(rows, price, qty, now)

    # ---------------------------------------------------------------- packing

    def pack(self, rows: np.ndarray, modes: np.ndarray, extra: Sequence[bytes] = ()) -> bytes:
        """Return one binary frame with a packet per (row, mode), plus ``extra``.

        ``rows`` and ``modes`` are equal-length int arrays (modes are
        MODE_LTP/QUOTE/FULL); ``extra`` are raw packets appended as they are
        (used for fault injection).  Packet order inside the frame: replayed
        instruments first, then LTP, quote and full groups.  Raises
        ValueError when the frame would exceed 65535 packets.
        """
        parts: list[bytes] = []
        count = 0
        if rows.size:
            replay_mask = self.is_replay[rows]
            if replay_mask.any():
                for row, mode in zip(rows[replay_mask].tolist(), modes[replay_mask].tolist()):
                    packet = self.recorded[row].packet(mode)
                    parts.append(struct.pack(">H", len(packet)) + packet)
                    count += 1
                rows = rows[~replay_mask]
                modes = modes[~replay_mask]
            for mode in (MODE_LTP, MODE_QUOTE, MODE_FULL):
                sel = rows[modes == mode]
                if sel.size == 0:
                    continue
                if mode == MODE_LTP:
                    parts.append(self._pack_ltp(sel))
                    count += sel.size
                    continue
                index_mask = self.is_index[sel]
                if index_mask.any():
                    parts.append(self._pack_index(sel[index_mask], full=mode == MODE_FULL))
                    count += int(index_mask.sum())
                    sel = sel[~index_mask]
                if sel.size:
                    parts.append(self._pack_quote(sel) if mode == MODE_QUOTE else self._pack_full(sel))
                    count += sel.size
        for packet in extra:
            parts.append(struct.pack(">H", len(packet)) + packet)
            count += 1
        if count > 0xFFFF:
            raise ValueError("a frame holds at most 65535 packets")
        return struct.pack(">H", count) + b"".join(parts)

    def _pack_ltp(self, rows: np.ndarray) -> bytes:
        out = np.empty(rows.size, dtype=LTP_DT)
        out["length"] = 8
        out["token"] = self.tokens[rows]
        out["last_price"] = self.last_price[rows]
        return out.tobytes()

    def _pack_index(self, rows: np.ndarray, *, full: bool) -> bytes:
        out = np.empty(rows.size, dtype=INDEX_FULL_DT if full else INDEX_QUOTE_DT)
        out["length"] = out.dtype.itemsize - 2
        out["token"] = self.tokens[rows]
        out["last_price"] = self.last_price[rows]
        out["high"] = self.high[rows]
        out["low"] = self.low[rows]
        out["open"] = self.open[rows]
        out["close"] = self.close[rows]
        out["change"] = self.last_price[rows] - self.close[rows]
        if full:
            out["timestamp"] = self.timestamp[rows]
        return out.tobytes()

    def _fill_quote(self, out: np.ndarray, rows: np.ndarray) -> None:
        out["token"] = self.tokens[rows]
        out["last_price"] = self.last_price[rows]
        out["last_quantity"] = self.last_quantity[rows]
        out["average_price"] = self.average_price[rows]
        out["volume"] = self.volume[rows] & _U32
        out["buy_quantity"] = self.buy_quantity[rows] & _U32
        out["sell_quantity"] = self.sell_quantity[rows] & _U32
        out["open"] = self.open[rows]
        out["high"] = self.high[rows]
        out["low"] = self.low[rows]
        out["close"] = self.close[rows]

    def _pack_quote(self, rows: np.ndarray) -> bytes:
        out = np.empty(rows.size, dtype=QUOTE_DT)
        out["length"] = 44
        self._fill_quote(out, rows)
        return out.tobytes()

    def _pack_full(self, rows: np.ndarray) -> bytes:
        k = rows.size
        out = np.empty(k, dtype=FULL_DT)
        out["length"] = 184
        self._fill_quote(out, rows)
        out["last_trade_time"] = self.last_trade_time[rows]
        out["oi"] = self.oi[rows]
        out["oi_day_high"] = self.oi_day_high[rows]
        out["oi_day_low"] = self.oi_day_low[rows]
        out["timestamp"] = self.timestamp[rows]
        depth = out["depth"]
        depth["price"] = self.depth_prices(rows)
        depth["quantity"] = self._rng.integers(1, 1000, size=(k, 10))
        depth["orders"] = self._rng.integers(1, 20, size=(k, 10))
        depth["pad"] = 0
        return out.tobytes()

    def depth_prices(self, rows: np.ndarray) -> np.ndarray:
        """Return a (len(rows), 10) int array: 5 bid prices then 5 offer prices.

        Bids step down from one tick below the last price, offers step up
        from the last price; never below zero.
        """
        ltp = self.last_price[rows][:, None]
        tick = self.tick[rows][:, None]
        steps = np.arange(5, dtype=np.int64)[None, :]
        bids = np.maximum(ltp - tick * (steps + 1), 0)
        asks = ltp + tick * steps
        return np.concatenate([bids, asks], axis=1)

    # ------------------------------------------------------------ REST views

    def _price(self, row: int, value: int) -> float:
        return int(value) / int(self.divisor[row])

    def ltp_view(self, row: int) -> dict:
        """Return the /quote/ltp entry for a row: instrument_token, last_price (rupees)."""
        return {"instrument_token": int(self.tokens[row]), "last_price": self._price(row, self.last_price[row])}

    def ohlc_view(self, row: int) -> dict:
        """Return the /quote/ohlc entry for a row (prices in rupees)."""
        view = self.ltp_view(row)
        view["ohlc"] = {
            "open": self._price(row, self.open[row]),
            "high": self._price(row, self.high[row]),
            "low": self._price(row, self.low[row]),
            "close": self._price(row, self.close[row]),
        }
        return view

    def quote_view(self, row: int) -> dict:
        """Return the /quote entry for a row, shaped like Kite's quote response.

        Timestamps are IST wall-clock strings ``YYYY-MM-DD HH:MM:SS``; prices
        in rupees; depth has 5 buy and 5 sell levels.
        """
        view = self.ohlc_view(row)
        ltp = view["last_price"]
        close = view["ohlc"]["close"]
        if row in self.recorded:
            depth_rec = self._recorded_depth[row]
            prices = [int(p) for p in depth_rec["price"]]
            qty = [int(q) for q in depth_rec["quantity"]]
            orders = [int(o) for o in depth_rec["orders"]]
        elif self.is_index[row]:
            prices, qty, orders = [0] * 10, [0] * 10, [0] * 10
        else:
            prices = [int(p) for p in self.depth_prices(np.array([row]))[0]]
            seed = int(self.tokens[row])
            qty = [(seed * (i + 7)) % 900 + 1 for i in range(10)]
            orders = [(seed // (i + 3)) % 19 + 1 for i in range(10)]
        levels = [
            {"price": self._price(row, p), "quantity": q, "orders": o}
            for p, q, o in zip(prices, qty, orders)
        ]
        view.update({
            "timestamp": _ist(int(self.timestamp[row])),
            "last_trade_time": _ist(int(self.last_trade_time[row])),
            "last_quantity": int(self.last_quantity[row]),
            "buy_quantity": int(self.buy_quantity[row]),
            "sell_quantity": int(self.sell_quantity[row]),
            "volume": int(self.volume[row]),
            "average_price": self._price(row, self.average_price[row]),
            "oi": int(self.oi[row]),
            "oi_day_high": int(self.oi_day_high[row]),
            "oi_day_low": int(self.oi_day_low[row]),
            "net_change": round(ltp - close, 6),
            "lower_circuit_limit": round(close * 0.9, 2),
            "upper_circuit_limit": round(close * 1.1, 2),
            "depth": {"buy": levels[:5], "sell": levels[5:]},
        })
        # Keep the key order of Kite's response for readability.
        order = ("instrument_token", "timestamp", "last_trade_time", "last_price", "last_quantity",
                 "buy_quantity", "sell_quantity", "volume", "average_price", "oi", "oi_day_high",
                 "oi_day_low", "net_change", "lower_circuit_limit", "upper_circuit_limit", "ohlc", "depth")
        return {key: view[key] for key in order}


def _ist(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, IST).strftime("%Y-%m-%d %H:%M:%S")


def malformed_packet(kind: str, token: int) -> tuple[bytes, bool]:
    """Return (raw packet, truncate) for a malformed-packet fault.

    ``kind="bad_length"``: a 43-byte packet (a quote packet missing its last
    byte) with a correct length prefix; Kite clients skip unknown lengths.
    ``kind="truncated"``: a full packet whose length prefix promises 184
    bytes but the frame ends after 100 (``truncate`` is True, so the caller
    must cut the frame).  Raises ValueError for another kind.
    """
    body = struct.pack(">11I", token, *([100] * 10))
    if kind == "bad_length":
        return body[:43], False
    if kind == "truncated":
        return (body + bytes(140))[:184], True
    raise ValueError(f"unknown malformed packet kind {kind!r}; use 'bad_length' or 'truncated'")
