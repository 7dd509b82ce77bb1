"""The live side of the Dhan simulator: trades of the running session, packed fast.

Venue document: DhanHQ v2 "Live Market Feed" (packet layouts, one packet per
WebSocket message, as the official client ``dhanhq`` 2.3.0 reads them).

:class:`LiveMarket` turns the candles of the running session (the very
candles the REST charts API serves, :class:`feeds.sim.dhan_market.
CandleSource`) into trades (:class:`feeds.sim.dhan_market.MinutePaths`), and
:class:`Subscriptions` follows what one connection sends: which trades are
due, the running day volume, high, low and average price of each
instrument, and the packets (ticker, quote or full per instrument).

Speed: packets of many instruments are built at once with numpy structured
arrays whose records are complete WebSocket frames (the 2- or 4-byte frame
header of an unmasked binary message, then the packet), so one connection
writes thousands of messages with one ``transport.write``.  The records are
byte for byte what :mod:`feeds.sim.dhan_packets` builds for the same values
(the tests compare them).
"""
from __future__ import annotations

import numpy as np

from .dhan_market import IST_SHIFT_S, CandleSource, Instrument, MinutePaths, SimSession, generate_minutes

TICKER, QUOTE, FULL = 2, 4, 8
#: subscribe request code -> response code of the mode
MODE_OF_REQUEST = {15: TICKER, 17: QUOTE, 21: FULL}
UNSUBSCRIBE = {16: TICKER, 18: QUOTE, 22: FULL}
MODE_NAMES = {TICKER: "ticker", QUOTE: "quote", FULL: "full"}

_HDR = [("code", "u1"), ("length", "<u2"), ("segment", "u1"), ("security_id", "<u4")]
_TRADE = [("ltp", "<f4"), ("ltq", "<u2"), ("ltt", "<u4"), ("atp", "<f4"), ("volume", "<u4"),
          ("total_sell_qty", "<u4"), ("total_buy_qty", "<u4")]
_DEPTH = np.dtype([("bid_qty", "<u4"), ("ask_qty", "<u4"), ("bid_orders", "<u2"), ("ask_orders", "<u2"),
                   ("bid_price", "<f4"), ("ask_price", "<f4")])
TICKER_FRAME = np.dtype([("ws0", "u1"), ("ws1", "u1")] + _HDR + [("ltp", "<f4"), ("ltt", "<u4")])
QUOTE_FRAME = np.dtype([("ws0", "u1"), ("ws1", "u1")] + _HDR + _TRADE
                       + [("open", "<f4"), ("close", "<f4"), ("high", "<f4"), ("low", "<f4")])
FULL_FRAME = np.dtype([("ws0", "u1"), ("ws1", "u1"), ("ws_len", ">u2")] + _HDR + _TRADE
                      + [("oi", "<u4"), ("oi_day_high", "<u4"), ("oi_day_low", "<u4"),
                         ("open", "<f4"), ("close", "<f4"), ("high", "<f4"), ("low", "<f4"),
                         ("depth", _DEPTH, (5,))])
#: bytes of WebSocket frame header in front of each packet, per response code
FRAME_HEADER = {TICKER: 2, QUOTE: 2, FULL: 4}
_FRAMES = {TICKER: TICKER_FRAME, QUOTE: QUOTE_FRAME, FULL: FULL_FRAME}
assert TICKER_FRAME.itemsize == 18 and QUOTE_FRAME.itemsize == 52 and FULL_FRAME.itemsize == 166


def ws_frame(payload: bytes) -> bytes:
    """One unmasked binary WebSocket message (RFC 6455) holding ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 65536:
        return bytes((0x82, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x82, 127)) + n.to_bytes(8, "big") + payload


def strip_frames(data: bytes) -> list[bytes]:
    """The payloads of consecutive unmasked server frames (tests and tools)."""
    out, i = [], 0
    while i < len(data):
        n = data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = int.from_bytes(data[i:i + 2], "big")
            i += 2
        elif n == 127:
            n = int.from_bytes(data[i:i + 8], "big")
            i += 8
        out.append(data[i:i + n])
        i += n
    return out


def pack_frames(code: int, seg, sid, ltp, ltt, ltq=None, atp=None, volume=None, open_=None, high=None, low=None,
                tick=None) -> bytes:
    """Frames (one packet each) of response ``code`` (2, 4 or 8) for arrays of values.

    Prices in paise (int arrays; sent as float32 rupees); ``ltt`` IST epoch;
    the quote/full extras (total buy/sell quantity, depth) are derived from
    the price, quantity and the security id; ``close`` is 0 during the
    session, OI 0 (equities and indices)."""
    n = len(sid)
    rec = np.zeros(n, dtype=_FRAMES[code])
    size = _FRAMES[code].itemsize - FRAME_HEADER[code]
    rec["ws0"] = 0x82
    if code == FULL:
        rec["ws1"] = 126
        rec["ws_len"] = size
    else:
        rec["ws1"] = size
    rec["code"] = code
    rec["length"] = size
    rec["segment"] = seg
    rec["security_id"] = sid
    rec["ltp"] = ltp / 100.0
    rec["ltt"] = ltt
    if code == TICKER:
        return rec.tobytes()
    rec["ltq"] = np.minimum(ltq, 65535)
    rec["atp"] = atp / 100.0
    rec["volume"] = volume
    rec["open"] = open_ / 100.0
    rec["high"] = high / 100.0
    rec["low"] = low / 100.0
    base = (sid * 7919 + ltt * 31) % 997
    if code == QUOTE:
        rec["total_sell_qty"] = 1000 + base * 13
        rec["total_buy_qty"] = 1000 + base * 17
        return rec.tobytes()
    lvl = np.arange(1, 6, dtype=np.int64)[None, :]
    t = tick[:, None]
    d = rec["depth"]
    d["bid_qty"] = 10 + (base[:, None] * lvl * 37) % 2000
    d["ask_qty"] = 10 + (base[:, None] * lvl * 53) % 2000
    d["bid_orders"] = 1 + (base[:, None] + lvl) % 20
    d["ask_orders"] = 1 + (base[:, None] + 3 * lvl) % 20
    d["bid_price"] = np.maximum(ltp[:, None] - lvl * t, t) / 100.0
    d["ask_price"] = (ltp[:, None] + lvl * t) / 100.0
    rec["total_sell_qty"] = d["ask_qty"].sum(axis=1) * 5
    rec["total_buy_qty"] = d["bid_qty"].sum(axis=1) * 5
    return rec.tobytes()


class LiveMarket:
    """One-minute candles of the running session for the instruments someone
    subscribed, as integer arrays (paise), shared by every connection.

    ``source``: the REST candle source (the same candles); ``ticks_per_minute``:
    trades per instrument and minute (at most the minute's volume, at least 4)."""

    def __init__(self, source: CandleSource, ticks_per_minute: int) -> None:
        self.source = source
        self.ticks_per_minute = max(4, int(ticks_per_minute))
        self._session: SimSession | None = None
        self._days: dict[tuple[int, int], np.ndarray] = {}     # (seg, sid) -> (5, M) int64
        self._prev: dict[tuple[int, int], int] = {}

    def _reset(self, session: SimSession) -> None:
        if self._session != session:
            self._session = session
            self._days.clear()
            self._prev.clear()

    def day_arrays(self, insts: list[Instrument], session: SimSession) -> list[np.ndarray]:
        """Per instrument a (5, M) int32 array (shared, do not modify): open, high,
        low, close (paise) and volume of each minute of ``session``."""
        self._reset(session)
        src = self.source
        missing = [i for i in insts if (i.segment, i.security_id) not in self._days]
        plain = [i for i in missing if not src.is_adjusted(i, session.day)
                 and not any(r.security_id == i.security_id and session.day in r.days for r in src.recordings)]
        for c0 in range(0, len(plain), 256):          # in chunks: bounded temporary memory
            chunk = plain[c0:c0 + 256]
            arrays = generate_minutes(chunk, session, src.seed, [src.raw_factor(i, session.day) for i in chunk])
            stacked = np.stack([arrays[n] for n in ("open", "high", "low", "close", "volume")], axis=1)
            for i, inst in enumerate(chunk):
                self._days[(inst.segment, inst.security_id)] = stacked[i].astype(np.int32)
        for inst in missing:
            key = (inst.segment, inst.security_id)
            if key not in self._days:       # recorded or adjusted: through the REST path
                c = src.minutes(inst, session)
                self._days[key] = np.array([np.rint(np.array(c.open) * 100), np.rint(np.array(c.high) * 100),
                                            np.rint(np.array(c.low) * 100), np.rint(np.array(c.close) * 100),
                                            np.array(c.volume)], dtype=np.int32)
        return [self._days[(i.segment, i.security_id)] for i in insts]

    def prev_closes(self, insts: list[Instrument], session: SimSession) -> list[int]:
        """Previous session's close (paise) of each instrument, as the charts serve it."""
        self._reset(session)
        src = self.source
        missing = [i for i in dict.fromkeys(insts) if (i.segment, i.security_id) not in self._prev]
        prev = self.source.sessions.previous(session)
        if prev is None:
            for i in missing:
                self._prev[(i.segment, i.security_id)] = 0
            missing = []
        plain = [i for i in missing if not src.is_adjusted(i, prev.day)
                 and not any(r.security_id == i.security_id and prev.day in r.days for r in src.recordings)]
        for c0 in range(0, len(plain), 256):
            chunk = plain[c0:c0 + 256]
            closes = generate_minutes(chunk, prev, src.seed, [src.raw_factor(i, prev.day) for i in chunk])["close"]
            for i, inst in enumerate(chunk):
                self._prev[(inst.segment, inst.security_id)] = int(closes[i, -1])
        for inst in missing:
            key = (inst.segment, inst.security_id)
            if key not in self._prev:
                self._prev[key] = int(round(src.prev_close(inst, session) * 100))
        return [self._prev[(i.segment, i.security_id)] for i in insts]


class Subscriptions:
    """The instruments of one feed connection and what has been sent of the running session.

    Rows keep subscription order; ``mode`` is the response code of the
    packets sent for each row (2 ticker, 4 quote, 8 full)."""

    def __init__(self, market: LiveMarket) -> None:
        self.market = market
        self.insts: list[Instrument] = []
        self.index: dict[tuple[int, int], int] = {}
        self.mode = np.zeros(0, dtype=np.int64)
        self.seg = np.zeros(0, dtype=np.int64)
        self.session: SimSession | None = None
        self.minute = -1
        self.paths: MinutePaths | None = None
        self.days: list[np.ndarray] = []             # per row (5, M) int32, shared with the LiveMarket
        self.col = np.zeros((0, 5), dtype=np.int64)   # the current minute's candle per row
        self.day_open = np.zeros(0, dtype=np.int64)
        # per-row running state of the session
        self.sent = np.zeros(0, dtype=np.int64)
        self.vol_before = np.zeros(0, dtype=np.int64)
        self.high = np.zeros(0, dtype=np.int64)
        self.low = np.zeros(0, dtype=np.int64)
        self.turnover = np.zeros(0, dtype=np.float64)
        self.dirty = False

    def __len__(self) -> int:
        return len(self.insts)

    def counts(self) -> dict[str, int]:
        return {MODE_NAMES[c]: int((self.mode == c).sum()) for c in MODE_NAMES}

    def add(self, insts: list[Instrument], mode: int) -> list[Instrument]:
        """Subscribe (or change the mode of) instruments; returns the newly added ones."""
        new = []
        for inst in insts:
            key = (inst.segment, inst.security_id)
            i = self.index.get(key)
            if i is not None:
                self.mode[i] = mode
                continue
            self.index[key] = len(self.insts)
            self.insts.append(inst)
            new.append(inst)
        if new:
            n = len(new)
            self.mode = np.concatenate([self.mode, np.full(n, mode, dtype=np.int64)])
            self.seg = np.concatenate([self.seg, np.array([i.segment for i in new], dtype=np.int64)])
            self.sent = np.concatenate([self.sent, np.full(n, -1, dtype=np.int64)])   # -1: to initialise
            for name in ("vol_before", "high", "low", "day_open"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(n, dtype=np.int64)]))
            self.turnover = np.concatenate([self.turnover, np.zeros(n)])
            self.dirty = True
        return new

    def remove(self, insts: list[Instrument]) -> int:
        drop = sorted({self.index[(i.segment, i.security_id)] for i in insts
                       if (i.segment, i.security_id) in self.index})
        if not drop:
            return 0
        keep = np.setdiff1d(np.arange(len(self.insts)), drop)
        self.insts = [self.insts[i] for i in keep.tolist()]
        self.index = {(inst.segment, inst.security_id): n for n, inst in enumerate(self.insts)}
        for name in ("mode", "seg", "sent", "vol_before", "high", "low", "turnover"):
            setattr(self, name, getattr(self, name)[keep])
        if self.days:
            self.days = [self.days[i] for i in keep.tolist()]
            self.col = self.col[keep]
            self.day_open = self.day_open[keep]
        self.dirty = True
        return len(drop)

    # -- the running session

    def _init_rows(self, rows: np.ndarray, now: float) -> None:
        for c0 in range(0, rows.size, 128):          # in chunks: bounded temporary memory
            self._init_chunk(rows[c0:c0 + 128], now)

    def _init_chunk(self, rows: np.ndarray, now: float) -> None:
        """Start rows mid-session: the day so far is taken as sent, except the
        latest trade, which goes out next (the snapshot on subscribe)."""
        p, m = self.paths, self.minute
        d = np.stack([self.days[r] for r in rows.tolist()]).astype(np.int64)
        self.day_open[rows] = d[:, 0, 0]
        self.vol_before[rows] = d[:, 4, :m].sum(axis=1)
        typical = (d[:, 1, :m] + d[:, 2, :m] + d[:, 3, :m]) / 3.0
        self.turnover[rows] = (typical * d[:, 4, :m]).sum(axis=1)
        self.high[rows] = d[:, 1, :m].max(axis=1) if m else 0
        self.low[rows] = d[:, 2, :m].min(axis=1) if m else np.iinfo(np.int64).max
        sent = np.maximum(p.due(now)[rows] - 1, 0)
        self.sent[rows] = sent
        kmax = int(sent.max()) if sent.size else 0
        if kmax:
            j = np.arange(kmax, dtype=np.int64)[None, :].repeat(rows.size, axis=0)
            rr = rows[:, None].repeat(kmax, axis=1)
            mask = j < sent[:, None]
            price = p.price(rr.ravel(), j.ravel()).reshape(j.shape)
            cq = p.cum_qty(rr.ravel(), j.ravel()).reshape(j.shape)
            q = np.diff(np.concatenate([np.zeros((rows.size, 1), dtype=np.int64), cq], axis=1), axis=1)
            big = np.iinfo(np.int64).max
            self.high[rows] = np.maximum(self.high[rows], np.where(mask, price, 0).max(axis=1))
            self.low[rows] = np.minimum(self.low[rows], np.where(mask, price, big).min(axis=1))
            self.turnover[rows] += np.where(mask, price * q, 0).sum(axis=1)

    def _build_paths(self) -> None:
        m = self.minute
        d = self.col = np.array([a[:, m] for a in self.days], dtype=np.int64).reshape(len(self.days), 5)
        self.paths = MinutePaths.build(
            self.session.open + 60 * m, [i.security_id for i in self.insts], [i.tick for i in self.insts],
            d[:, 0], d[:, 1], d[:, 2], d[:, 3], d[:, 4],
            self.market.ticks_per_minute, self.market.source.seed)

    def prepare(self, session: SimSession, now: float) -> tuple[bytes, dict[int, int]]:
        """Bring the tables to ``session`` and the minute of ``now`` (call only in a
        session).  Returns the frames of the trades left in a minute that ended
        (to be sent before anything of the new minute)."""
        none = (b"", {TICKER: 0, QUOTE: 0, FULL: 0})
        m = min(int((now - session.open) // 60), session.minutes - 1)
        if session != self.session:
            self.session = session
            self.minute = m
            self.days = self.market.day_arrays(self.insts, session)
            self._build_paths()
            if len(self.insts):
                self._init_rows(np.arange(len(self.insts)), now)
            self.dirty = False
            return none
        if self.dirty:
            self.days = self.market.day_arrays(self.insts, session)
            self._build_paths()
            fresh = np.flatnonzero(self.sent < 0)
            if fresh.size:
                self._init_rows(fresh, min(now, self.paths.minute + 59.999))
            self.dirty = False
        if m <= self.minute:
            return none
        parts: list[bytes] = []
        counts = {TICKER: 0, QUOTE: 0, FULL: 0}
        while self.minute < m:          # every trade of every minute goes out, late if need be
            data, c = self.flush_minute()
            parts.append(data)
            for k in counts:
                counts[k] += c[k]
            # the ended minute's volume is now part of the day before the minute
            self.vol_before += self.col[:, 4]
            self.minute += 1
            self.sent[:] = 0
            self._build_paths()
        return b"".join(parts), counts

    def next_due(self) -> float:
        """UTC epoch of the next trade of any row in this minute (inf if none)."""
        p = self.paths
        if p is None or not len(self.insts):
            return float("inf")
        left = self.sent < p.k
        if not left.any():
            return float(p.minute + 60)
        rows = np.flatnonzero(left)
        return float(p.time_of(rows, self.sent[rows]).min())

    def take(self, now: float, limit: int = 1_000_000) -> tuple[bytes, dict[int, int]]:
        """Frames of every trade due by ``now`` (at most about ``limit`` packets),
        and the packet count per response code."""
        p = self.paths
        counts = {TICKER: 0, QUOTE: 0, FULL: 0}
        if p is None or not len(self.insts):
            return b"", counts
        due = p.due(now)
        parts: list[bytes] = []
        total = 0
        while total < limit:
            rows = np.flatnonzero(self.sent < due)
            if not rows.size:
                break
            j = self.sent[rows]
            price = p.price(rows, j)
            cq = p.cum_qty(rows, j)
            q = cq - p.cum_qty(rows, j - 1)
            vol = self.vol_before[rows] + cq
            self.high[rows] = np.maximum(self.high[rows], price)
            self.low[rows] = np.minimum(self.low[rows], price)
            self.turnover[rows] += price * q
            atp = np.where(vol > 0, self.turnover[rows] / np.maximum(vol, 1), price)
            ltt = np.floor(p.time_of(rows, j)).astype(np.int64) + IST_SHIFT_S
            self.sent[rows] = j + 1
            modes = self.mode[rows]
            seg = self.seg[rows]
            sid = p.sid[rows]
            for code in (TICKER, QUOTE, FULL):
                sel = modes == code
                if not sel.any():
                    continue
                s = np.flatnonzero(sel)
                parts.append(pack_frames(code, seg[s], sid[s], price[s], ltt[s], q[s], atp[s], vol[s],
                                         self.day_open[rows[s]], self.high[rows[s]], self.low[rows[s]],
                                         p.tick[rows[s]]))
                counts[code] += int(s.size)
            total += rows.size
        return b"".join(parts), counts

    def flush_minute(self) -> tuple[bytes, dict[int, int]]:
        """Every remaining trade of the current minute (before it rolls over)."""
        if self.paths is None:
            return b"", {TICKER: 0, QUOTE: 0, FULL: 0}
        return self.take(self.paths.minute + 60.0)

    def end_session(self) -> tuple[bytes, dict[int, int]]:
        """The session closed: the remaining trades of its last minute; the tables are dropped."""
        out = self.flush_minute() if self.session is not None else (b"", {TICKER: 0, QUOTE: 0, FULL: 0})
        self.session = None
        self.paths = None
        self.minute = -1
        self.sent[:] = -1
        return out
