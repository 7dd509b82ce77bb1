"""The simulated Dhan market: instruments, sessions, candles and the ticks inside them.

Everything here is pure (no I/O but reading the recordings) and deterministic:
a value is a function of the seed, the security id, the session and the
minute, never of the order in which questions are asked, so the REST
candles, the daily candles and the ticks of the live feed agree wherever
they meet.

Instrument list (DhanHQ v2 "Instruments", compact scrip master)
---------------------------------------------------------------
:class:`ScripMaster` holds the NIFTY 50 index (``IDX_I`` 13), HDFCBANK
(``NSE_EQ`` 1333) and ``n_generated`` clearly named NSE equities
(``SIMEQ00001`` ..., security ids from 100001).  :meth:`ScripMaster.csv_bytes`
renders Dhan's compact CSV with its 16 columns (``SEM_EXM_EXCH_ID,
SEM_SEGMENT, SEM_SMST_SECURITY_ID, SEM_INSTRUMENT_NAME, SEM_EXPIRY_CODE,
SEM_TRADING_SYMBOL, SEM_LOT_UNITS, SEM_CUSTOM_SYMBOL, SEM_EXPIRY_DATE,
SEM_STRIKE_PRICE, SEM_OPTION_TYPE, SEM_TICK_SIZE, SEM_EXPIRY_FLAG,
SEM_EXCH_INSTRUMENT_TYPE, SEM_SERIES, SM_SYMBOL_NAME``).  As in Dhan's file,
``SEM_TICK_SIZE`` of an equity row is in paise (``5.0000`` = 0.05 rupee);
the index row carries ``0.0500``.

Sessions
--------
:class:`Sessions` gives the NSE sessions from the XNSE calendar of
:mod:`feeds.calendars` (regular 09:15-15:30 IST, 375 one-minute bars; special
sessions such as Muhurat and the Saturday sessions included; holidays have
none).  A *virtual session* (``--session-now``) can replace the sessions of
its IST date(s): it opens at a given UTC minute and lasts a given number of
minutes, so that a "session" runs now whatever the wall clock says.

Candles
-------
One-minute candles are labelled by their start (UTC epoch seconds).  Where a
real recording of ``shared/data/dhan`` covers a session (HDFCBANK one-minute
2024-09-11..13; NIFTY 50 five-minute 2024-01-15..16; HDFCBANK daily January
2024) it is served; everything else is generated (:func:`generate_minutes`):
a random walk per instrument and session, prices on the 0.05 tick in paise,
``open`` of a minute = ``close`` of the one before, volume 50..5000 a
minute (0 for an index).  Intervals of 5, 15, 25 and 60 minutes are built
from the one-minute candles (first open, highest high, lowest low, last
close, summed volume), buckets aligned to the session open; the last bucket
of a session may be shorter (60: 15:15-15:30).

Corporate actions
-----------------
A :class:`CorporateAction` (security id, ex-date, factor; a 1:1 bonus is
factor 2) makes the generated raw prices before the ex-date ``factor`` times
higher (the market halves at the ex-date).  While the adjustment is
*applied*, every candle before the ex-date is served the way Dhan serves
adjusted history: price ``round(round(p / factor / 0.05) * 0.05, 2)``
(floating point, as the recordings show: the 15-minute HDFCBANK recording
equals the one-minute recording rolled up and adjusted this way, to the
last paisa) and volume ``v * factor``.  The recordings made after the bonus
(the 15-minute and the daily HDFCBANK files) are served as recorded while
the adjustment is applied; the daily file is served as recorded in both
states (it is the only record of those days and was recorded adjusted).

Ticks inside a minute (what the feed sends)
--------------------------------------------
:class:`MinutePaths` describes the trades of one minute of one instrument
from its candle ``(O, H, L, C, V)`` and a tick count ``K`` (``ticks_per_minute``,
at most ``V`` trades when ``V`` > 0, at least 4):

* trade ``j`` (0 .. K-1) happens at ``minute + j * 60 / K`` seconds;
* its price: trade 0 at ``O``, trade K-1 at ``C``, one trade in between at
  ``H`` and another at ``L``, the others anywhere in ``[L, H]`` on the tick;
* the cumulative quantity after trade j is ``Q(j) = (j + 1) + floor((V - K)
  * g(j))`` with ``g`` strictly increasing and ``g(K-1) = 1``, so every
  trade has a quantity >= 1 and the quantities add up to ``V`` (an index
  trades quantity 0).

So the trades of a minute fold into exactly that minute's candle: first
price = open, maximum = high, minimum = low, last = close, sum of quantities
= volume.  Each value comes from a counter-based hash of (seed, security id,
minute, trade, channel), so any trade can be computed alone, in any order,
for any set of instruments at once (numpy, vectorised).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..calendars import calendar as exchange_calendar

log = logging.getLogger(__name__)

UTC = dt.timezone.utc
IST = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")
IST_SHIFT_S = 19_800

#: Annexure "Exchange Segment"
SEGMENTS = {"IDX_I": 0, "NSE_EQ": 1, "NSE_FNO": 2, "NSE_CURRENCY": 3, "BSE_EQ": 4, "MCX_COMM": 5,
            "BSE_CURRENCY": 7, "BSE_FNO": 8}
SEGMENT_NAMES = {v: k for k, v in SEGMENTS.items()}

#: intraday chart intervals (minutes), DhanHQ v2 "Historical Data"
INTERVALS = (1, 5, 15, 25, 60)

SCRIP_HEADER = (
    "SEM_EXM_EXCH_ID", "SEM_SEGMENT", "SEM_SMST_SECURITY_ID", "SEM_INSTRUMENT_NAME", "SEM_EXPIRY_CODE",
    "SEM_TRADING_SYMBOL", "SEM_LOT_UNITS", "SEM_CUSTOM_SYMBOL", "SEM_EXPIRY_DATE", "SEM_STRIKE_PRICE",
    "SEM_OPTION_TYPE", "SEM_TICK_SIZE", "SEM_EXPIRY_FLAG", "SEM_EXCH_INSTRUMENT_TYPE", "SEM_SERIES",
    "SM_SYMBOL_NAME",
)

NIFTY_ID = 13
HDFCBANK_ID = 1333
FIRST_GENERATED_ID = 100_001


# ---------------------------------------------------------------------------- hashing

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLD
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def hash_uniform(seed: int, *keys) -> np.ndarray:
    """Uniform floats in [0, 1) from the integer keys (scalars or broadcastable
    arrays), one per element: the same keys always give the same value."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        for k in keys:
            h = _mix(h ^ np.asarray(k).astype(np.int64).astype(np.uint64))
    return (h >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def hash_normal(seed: int, *keys) -> np.ndarray:
    """Standard normal values (Box-Muller on two hashed uniforms)."""
    u1 = hash_uniform(seed, *keys, 1)
    u2 = hash_uniform(seed, *keys, 2)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


# ---------------------------------------------------------------------------- instruments


@dataclass(frozen=True, slots=True)
class Instrument:
    """One scrip master row.  ``tick`` in paise; ``ref_price`` in paise: the
    price level of the generated candles (today's level, after any bonus)."""
    security_id: int
    segment: int
    symbol: str
    name: str
    instrument: str            # EQUITY | INDEX
    tick: int
    lot: int
    ref_price: int

    @property
    def is_index(self) -> bool:
        return self.segment == SEGMENTS["IDX_I"]

    @property
    def segment_name(self) -> str:
        return SEGMENT_NAMES[self.segment]

    def csv_row(self) -> tuple[str, ...]:
        if self.is_index:
            return ("NSE", "I", str(self.security_id), "INDEX", "0", self.symbol, "1.0", self.name,
                    "0001-01-01", "", "XX", f"{self.tick / 100:.4f}", "", "INDEX", "X", self.symbol)
        return ("NSE", "E", str(self.security_id), "EQUITY", "0", self.symbol, f"{self.lot:.1f}", self.name,
                "", "", "", f"{self.tick:.4f}", "NA", "ES", "EQ", self.name.upper())


class ScripMaster:
    """The instruments the simulator knows, keyed by ``(segment, security_id)``.

    ``n_generated``: how many ``SIMEQnnnnn`` NSE equities to add (>= 0).
    Raises ValueError for a negative count."""

    def __init__(self, n_generated: int = 1000, seed: int = 0) -> None:
        if n_generated < 0:
            raise ValueError("n_generated must be >= 0")
        items = [
            Instrument(NIFTY_ID, 0, "NIFTY", "Nifty 50", "INDEX", 5, 0, 2_400_000),
            Instrument(HDFCBANK_ID, 1, "HDFCBANK", "HDFC Bank", "EQUITY", 5, 1, 95_000),
        ]
        for n in range(1, n_generated + 1):
            sid = FIRST_GENERATED_ID + n - 1
            u = float(hash_uniform(seed, sid, 0, 7)[0])
            ref = int(round((50 + 4950 * u * u) * 20)) * 5           # 50 .. 5000 rupees, on the tick
            items.append(Instrument(sid, 1, f"SIMEQ{n:05d}", f"Simulated Equity {n:05d}", "EQUITY", 5, 1, ref))
        self.instruments = items
        self.by_key = {(i.segment, i.security_id): i for i in items}
        self._csv: bytes | None = None

    def get(self, segment: int, security_id: int) -> Instrument | None:
        return self.by_key.get((segment, security_id))

    def csv_bytes(self) -> bytes:
        """The compact scrip master CSV (header + one row per instrument), UTF-8."""
        if self._csv is None:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(SCRIP_HEADER)
            for inst in self.instruments:
                w.writerow(inst.csv_row())
            self._csv = buf.getvalue().encode()
        return self._csv


# ---------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class SimSession:
    """One session: ``day`` its IST trading date, ``open``/``close`` UTC epoch
    seconds (whole minutes, close exclusive), ``kind`` regular|special|early close|virtual."""
    day: dt.date
    open: int
    close: int
    kind: str = "regular"

    @property
    def minutes(self) -> int:
        return (self.close - self.open) // 60

    def contains(self, t: float) -> bool:
        return self.open <= t < self.close


class Sessions:
    """NSE sessions (XNSE calendar), optionally with one virtual session.

    ``virtual``: ``(open_utc_epoch, minutes)`` or None; the virtual session
    takes the place of every calendar session whose IST date it touches."""

    def __init__(self, virtual: tuple[int, int] | None = None) -> None:
        self.calendar = exchange_calendar("XNSE")
        self.virtual: SimSession | None = None
        if virtual is not None:
            self.set_virtual(*virtual)

    def set_virtual(self, open_utc: int, minutes: int) -> SimSession:
        """Install a virtual session opening at ``open_utc`` (rounded down to the minute)."""
        if minutes < 1:
            raise ValueError("a virtual session lasts at least one minute")
        open_utc = int(open_utc) // 60 * 60
        day = dt.datetime.fromtimestamp(open_utc, IST).date()
        self.virtual = SimSession(day, open_utc, open_utc + 60 * minutes, "virtual")
        return self.virtual

    def _virtual_days(self) -> set[dt.date]:
        v = self.virtual
        if v is None:
            return set()
        first = dt.datetime.fromtimestamp(v.open, IST).date()
        last = dt.datetime.fromtimestamp(v.close - 1, IST).date()
        return {first + dt.timedelta(days=i) for i in range((last - first).days + 1)}

    def between(self, first: dt.date, last: dt.date) -> list[SimSession]:
        """Sessions whose IST date is in [first, last], oldest first."""
        out: list[SimSession] = []
        vdays = self._virtual_days()
        for s in self.calendar.sessions(first, last):
            if s.day in vdays:
                continue
            out.append(SimSession(s.day, int(s.open.timestamp()), int(s.close.timestamp()), s.kind))
        v = self.virtual
        if v is not None and first <= v.day <= last:
            out.append(v)
            out.sort(key=lambda s: s.open)
        return out

    def at(self, t: float) -> SimSession | None:
        """The session open at UTC epoch ``t``, or None."""
        v = self.virtual
        if v is not None and v.contains(t):
            return v
        day = dt.datetime.fromtimestamp(t, IST).date()
        for s in self.between(day - dt.timedelta(days=1), day):
            if s.contains(t):
                return s
        return None

    def next_open(self, t: float) -> SimSession | None:
        """The first session with ``close > t`` in the next 15 days (may be open already)."""
        day = dt.datetime.fromtimestamp(t, IST).date()
        for s in self.between(day - dt.timedelta(days=1), day + dt.timedelta(days=15)):
            if s.close > t:
                return s
        return None

    def previous(self, session: SimSession) -> SimSession | None:
        """The session before ``session`` (within 20 days), or None."""
        got = [s for s in self.between(session.day - dt.timedelta(days=20), session.day) if s.open < session.open]
        return got[-1] if got else None


# ---------------------------------------------------------------------------- corporate actions


@dataclass(frozen=True, slots=True)
class CorporateAction:
    """A price adjustment: from ``ex_date`` on prices are ``factor`` times lower
    (a 1:1 bonus or a 1:2 split: factor 2)."""
    security_id: int
    ex_date: dt.date
    factor: int

    @classmethod
    def parse(cls, text: str) -> "CorporateAction":
        """``SECURITY_ID:YYYY-MM-DD:FACTOR`` (e.g. ``1333:2025-08-26:2``); raises ValueError."""
        try:
            sid, day, factor = text.split(":")
            out = cls(int(sid), dt.date.fromisoformat(day), int(factor))
        except ValueError as exc:
            raise ValueError(f"corporate action {text!r} is not SECURITY_ID:YYYY-MM-DD:FACTOR") from exc
        if out.factor < 2:
            raise ValueError(f"corporate action {text!r}: factor must be an integer >= 2")
        return out


def adjust_price(rupees: float, factor: int, tick: float = 0.05) -> float:
    """A price as Dhan serves it after an adjustment by ``factor`` (see the module text)."""
    return round(round(rupees / factor / tick) * tick, 2)


# ---------------------------------------------------------------------------- candles


@dataclass
class Candles:
    """Columnar candles: ``t`` label (UTC epoch s of the start), prices in rupees (float), volume."""
    t: list[int]
    open: list[float]
    high: list[float]
    low: list[float]
    close: list[float]
    volume: list[float]

    @classmethod
    def empty(cls) -> "Candles":
        return cls([], [], [], [], [], [])

    def extend(self, other: "Candles") -> None:
        for name in ("t", "open", "high", "low", "close", "volume"):
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.t)

    def select(self, first: int, last: int) -> "Candles":
        """The candles labelled in [first, last]."""
        idx = [i for i, t in enumerate(self.t) if first <= t <= last]
        return Candles(*([getattr(self, n)[i] for i in idx] for n in ("t", "open", "high", "low", "close", "volume")))

    def adjusted(self, factor: int) -> "Candles":
        return Candles(list(self.t), *([adjust_price(p, factor) for p in getattr(self, n)]
                                       for n in ("open", "high", "low", "close")),
                       [v * factor for v in self.volume])

    def aggregate(self, step_min: int, session_open: int) -> "Candles":
        """Roll up to ``step_min`` minutes, buckets aligned to ``session_open``."""
        if step_min == 1 or not self.t:
            return self
        out = Candles.empty()
        step = 60 * step_min
        for i, t in enumerate(self.t):
            label = session_open + (t - session_open) // step * step
            if out.t and out.t[-1] == label:
                out.high[-1] = max(out.high[-1], self.high[i])
                out.low[-1] = min(out.low[-1], self.low[i])
                out.close[-1] = self.close[i]
                out.volume[-1] += self.volume[i]
            else:
                out.t.append(label)
                out.open.append(self.open[i])
                out.high.append(self.high[i])
                out.low.append(self.low[i])
                out.close.append(self.close[i])
                out.volume.append(self.volume[i])
        return out

    def day_candle(self, label: int) -> "Candles":
        if not self.t:
            return Candles.empty()
        return Candles([label], [self.open[0]], [max(self.high)], [min(self.low)], [self.close[-1]],
                       [float(sum(self.volume))])

    def to_json(self, oi: bool = False) -> dict:
        """Dhan's columnar answer: open, high, low, close, volume, timestamp (+ open_interest)."""
        out = {"open": self.open, "high": self.high, "low": self.low, "close": self.close,
               "volume": [float(v) for v in self.volume], "timestamp": [float(t) for t in self.t]}
        if oi:
            out["open_interest"] = [0.0] * len(self.t)
        return out


def generate_minutes(instruments: Sequence[Instrument], session: SimSession, seed: int,
                     factors: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Generated one-minute candles of ``session`` for several instruments at once.

    Returns arrays of shape (len(instruments), session.minutes): ``open``,
    ``high``, ``low``, ``close`` in paise (int64, multiples of the tick) and
    ``volume`` (int64).  ``factors[i]`` (default 1) multiplies the price level
    (raw prices before a corporate action's ex-date) and divides the volume.
    Row i depends only on (seed, instruments[i], session, factors[i])."""
    n, m = len(instruments), session.minutes
    sid = np.array([i.security_id for i in instruments], dtype=np.int64)[:, None]
    tick = np.array([i.tick for i in instruments], dtype=np.int64)[:, None]
    ref = np.array([i.ref_price for i in instruments], dtype=np.float64)[:, None]
    fac = np.ones((n, 1), dtype=np.int64) if factors is None else np.asarray(factors, dtype=np.int64)[:, None]
    day = session.day.toordinal()
    k = np.arange(m, dtype=np.int64)[None, :]
    start = ref * fac * np.exp(0.01 * hash_normal(seed, sid, day, -1, 11))
    steps = 0.0007 * hash_normal(seed, sid, day, k, 12)
    closes_f = start * np.exp(np.cumsum(steps, axis=1))
    closes = np.maximum(np.rint(closes_f / tick).astype(np.int64), 1) * tick
    first = np.maximum(np.rint(start / tick).astype(np.int64), 1) * tick
    opens = np.concatenate([first, closes[:, :-1]], axis=1)
    hi_wick = np.rint(np.abs(hash_normal(seed, sid, day, k, 13)) * 0.0004 * closes_f / tick).astype(np.int64)
    lo_wick = np.rint(np.abs(hash_normal(seed, sid, day, k, 14)) * 0.0004 * closes_f / tick).astype(np.int64)
    highs = np.maximum(opens, closes) + hi_wick * tick
    lows = np.maximum(np.minimum(opens, closes) - lo_wick * tick, tick)
    vol = (100 + np.floor(hash_uniform(seed, sid, day, k, 15) * 4900)).astype(np.int64) // fac
    is_index = np.array([i.is_index for i in instruments])[:, None]
    vol = np.where(is_index, 0, np.maximum(vol, 50))
    return {"open": opens, "high": highs, "low": lows, "close": closes, "volume": vol}


def minutes_to_candles(arrays: dict[str, np.ndarray], row: int, session: SimSession) -> Candles:
    """Row ``row`` of :func:`generate_minutes` as :class:`Candles` (rupees)."""
    m = session.minutes
    return Candles([session.open + 60 * k for k in range(m)],
                   *((arrays[n][row] / 100.0).tolist() for n in ("open", "high", "low", "close")),
                   arrays["volume"][row].astype(np.float64).tolist())


# ---------------------------------------------------------------------------- recordings


@dataclass
class Recording:
    """One recorded Dhan answer: ``kind`` intraday|historical, ``interval`` (1, 5, 15 ... or None
    for daily), ``adjusted`` (recorded after the corporate action), candles by IST date."""
    name: str
    security_id: int
    segment: int
    kind: str
    interval: int | None
    adjusted: bool
    days: dict[dt.date, Candles]


#: recordings made after HDFCBANK's 1:1 bonus (see shared/data/README.md, dhan/)
RECORDED_ADJUSTED = frozenset({"intraday_15min_hdfcbank_2024-09-11..13.json", "daily_hdfcbank_2024-01.json"})


def load_recordings(data_dir: Path | None) -> list[Recording]:
    """Every ``*.json`` answer of ``data_dir`` with status 200 from the charts APIs.

    A malformed file is logged and skipped."""
    out: list[Recording] = []
    if data_dir is None or not data_dir.is_dir():
        return out
    for path in sorted(data_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            if doc.get("status") != 200:
                continue
            req = doc["request"]
            url = req["url"]
            body = req["body"]
            resp = doc["response"]
            kind = "intraday" if url.endswith("/charts/intraday") else "historical" if url.endswith(
                "/charts/historical") else None
            if kind is None:
                continue
            interval = int(body["interval"]) if kind == "intraday" else None
            days: dict[dt.date, Candles] = {}
            for i, ts in enumerate(resp["timestamp"]):
                t = int(ts)
                day = dt.datetime.fromtimestamp(t, IST).date()
                c = days.setdefault(day, Candles.empty())
                c.t.append(t)
                c.open.append(resp["open"][i])
                c.high.append(resp["high"][i])
                c.low.append(resp["low"][i])
                c.close.append(resp["close"][i])
                c.volume.append(resp["volume"][i])
            out.append(Recording(path.name, int(body["securityId"]), SEGMENTS[body["exchangeSegment"]], kind,
                                 interval, path.name in RECORDED_ADJUSTED, days))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("event=recording_skipped file=%s error=%r", path, exc)
    return out


def split_candle(o: float, h: float, lo: float, c: float, v: float, n: int, seed: int,
                 key: tuple[int, ...], tick: float = 0.05) -> list[tuple[float, float, float, float, float]]:
    """Split one candle into ``n`` consecutive candles that roll up into it exactly
    (first open ``o``, highest high ``h``, lowest low ``lo``, last close ``c``,
    volumes summing to ``v``); used for one-minute candles inside a recorded
    five-minute bar.  Prices stay on ``tick``; deterministic in (seed, key)."""
    if n == 1:
        return [(o, h, lo, c, v)]
    lo_t, hi_t = round(lo / tick), round(h / tick)
    u = hash_uniform(seed, *key, np.arange(n + 2), 21)
    path = [round(o / tick)] + [lo_t + int(x * (hi_t - lo_t + 1)) for x in u[: n - 1]] + [round(c / tick)]
    path = [min(max(p, lo_t), hi_t) for p in path]
    ih, il = int(u[n] * n), int(u[n + 1] * n)
    out = []
    vol_left = int(v)
    for k in range(n):
        po, pc = path[k], path[k + 1]
        ph = hi_t if k == ih else max(po, pc)
        pl = lo_t if k == il else min(po, pc)
        share = vol_left if k == n - 1 else int(v) // n
        vol_left -= share
        out.append((round(po * tick, 2), round(ph * tick, 2), round(pl * tick, 2), round(pc * tick, 2),
                    float(share)))
    return out


# ---------------------------------------------------------------------------- ticks of a minute


@dataclass
class MinutePaths:
    """The trades of one minute for several instruments (vectorised, one row each).

    Built from the minute's candles (paise) and the tick count; ``K`` per row,
    ``ih``/``il`` the trades at the high and at the low.  See the module text."""
    minute: int                 # UTC epoch of the minute's start
    sid: np.ndarray             # security ids (int64)
    tick: np.ndarray            # paise
    o: np.ndarray
    h: np.ndarray
    lo: np.ndarray
    c: np.ndarray
    v: np.ndarray
    k: np.ndarray               # trades this minute per row
    ih: np.ndarray
    il: np.ndarray
    seed: int

    @classmethod
    def build(cls, minute: int, sid, tick, o, h, lo, c, v, ticks_per_minute: int, seed: int) -> "MinutePaths":
        sid = np.asarray(sid, dtype=np.int64)
        v = np.asarray(v, dtype=np.int64)
        kmax = max(4, int(ticks_per_minute))
        k = np.where(v > 0, np.clip(v, 4, kmax), kmax).astype(np.int64)
        mi = minute // 60
        ih = 1 + np.floor(hash_uniform(seed, sid, mi, -1, 31) * (k - 2)).astype(np.int64)
        il = 1 + np.floor(hash_uniform(seed, sid, mi, -1, 32) * (k - 3)).astype(np.int64)
        il = il + (il >= ih)
        return cls(minute, sid, np.asarray(tick, dtype=np.int64), np.asarray(o, dtype=np.int64),
                   np.asarray(h, dtype=np.int64), np.asarray(lo, dtype=np.int64), np.asarray(c, dtype=np.int64),
                   v, k, ih, il, seed)

    def time_of(self, rows: np.ndarray, j: np.ndarray) -> np.ndarray:
        """UTC epoch seconds (float) of trade j of each row."""
        return self.minute + j * 60.0 / self.k[rows]

    def due(self, now: float) -> np.ndarray:
        """How many trades of each row have happened by ``now`` (0 .. K)."""
        e = now - self.minute
        if e < 0:
            return np.zeros(self.k.size, dtype=np.int64)
        return np.minimum(self.k, np.floor(e * self.k / 60.0).astype(np.int64) + 1)

    def price(self, rows: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Price in paise of trade j of each row."""
        k, lo, hi, t = self.k[rows], self.lo[rows], self.h[rows], self.tick[rows]
        u = hash_uniform(self.seed, self.sid[rows], self.minute // 60, j, 33)
        lo_t, hi_t = lo // t, hi // t
        p = (lo_t + np.floor(u * (hi_t - lo_t + 1)).astype(np.int64)) * t
        p = np.where(j == self.ih[rows], hi, p)
        p = np.where(j == self.il[rows], lo, p)
        p = np.where(j == 0, self.o[rows], p)
        return np.where(j == k - 1, self.c[rows], p)

    def cum_qty(self, rows: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Quantity traded in this minute up to and including trade j (0 for j < 0)."""
        k, v = self.k[rows], self.v[rows]
        u = hash_uniform(self.seed, self.sid[rows], self.minute // 60, j, 34)
        g = np.minimum(1.0, (j + 1 + 0.5 * (u - 0.5)) / k)
        g = np.where(j >= k - 1, 1.0, g)
        q = (j + 1) + np.floor(np.maximum(v - k, 0) * g).astype(np.int64)
        q = np.where(v > 0, np.minimum(q, v), 0)
        return np.where(j < 0, 0, q)

    def trades(self, row: int) -> list[tuple[float, int, int]]:
        """All trades of one row: (time, price paise, quantity); for tests and tools."""
        j = np.arange(int(self.k[row]), dtype=np.int64)
        rows = np.full(j.size, row, dtype=np.int64)
        cq = self.cum_qty(rows, j)
        q = np.diff(np.concatenate([[0], cq]))
        return list(zip(self.time_of(rows, j).tolist(), self.price(rows, j).tolist(), q.tolist()))


def fold(trades: Iterable[tuple[float, int, int]]) -> tuple[int, int, int, int, int]:
    """Fold trades (time, price, quantity) into (open, high, low, close, volume)."""
    prices, vol = [], 0
    for _, p, q in trades:
        prices.append(p)
        vol += q
    return prices[0], max(prices), min(prices), prices[-1], vol


# ---------------------------------------------------------------------------- what the charts APIs serve


class CandleSource:
    """The candles the simulated charts APIs serve: recordings where they exist,
    generated candles elsewhere, adjusted for corporate actions while
    :attr:`adjusted` is True.

    ``master``, ``sessions``: the instruments and sessions; ``recordings``:
    from :func:`load_recordings`; ``actions``: :class:`CorporateAction` list
    (one per security id at most: the last wins); ``seed``: of the generated
    candles.  Not thread-safe (use it from the simulator's event loop)."""

    def __init__(self, master: ScripMaster, sessions: Sessions, recordings: list[Recording], *, seed: int = 0,
                 actions: Iterable[CorporateAction] = (), adjusted: bool = False) -> None:
        self.master = master
        self.sessions = sessions
        self.recordings = recordings
        self.seed = seed
        self.actions = {a.security_id: a for a in actions}
        self.adjusted = adjusted
        self._cache: dict[tuple, Candles] = {}

    # -- helpers

    def action_for(self, inst: Instrument, day: dt.date) -> CorporateAction | None:
        """The corporate action whose ex-date is after ``day`` (so ``day``'s raw prices are pre-action)."""
        a = self.actions.get(inst.security_id)
        return a if a is not None and day < a.ex_date else None

    def is_adjusted(self, inst: Instrument, day: dt.date) -> bool:
        """True when ``day``'s candles of ``inst`` are served adjusted now."""
        return self.adjusted and self.action_for(inst, day) is not None

    def _recording(self, inst: Instrument, day: dt.date, kind: str, interval: int | None) -> Recording | None:
        affected = self.action_for(inst, day) is not None
        state = self.is_adjusted(inst, day)
        for rec in self.recordings:
            if (rec.security_id == inst.security_id and rec.segment == inst.segment and rec.kind == kind
                    and rec.interval == interval and day in rec.days
                    and (kind == "historical" or not affected or rec.adjusted == state)):
                return rec
        return None

    def raw_factor(self, inst: Instrument, day: dt.date) -> int:
        a = self.action_for(inst, day)
        return a.factor if a is not None else 1

    def minutes(self, inst: Instrument, session: SimSession) -> Candles:
        """The one-minute candles of a whole session as served now (see the module text)."""
        adjusted = self.is_adjusted(inst, session.day)
        key = (inst.segment, inst.security_id, session.open, session.close, adjusted)
        got = self._cache.get(key)
        if got is not None:
            return got
        raw = None
        for rec in self.recordings:
            if (rec.security_id == inst.security_id and rec.segment == inst.segment and rec.kind == "intraday"
                    and not rec.adjusted and session.day in rec.days):
                if rec.interval == 1:
                    raw = rec.days[session.day]
                    break
                if rec.interval is not None and raw is None:
                    day = rec.days[session.day]
                    raw = Candles.empty()
                    for i, t in enumerate(day.t):
                        n = rec.interval if t + 60 * rec.interval <= session.close else 1
                        for k, (o, h, lo, c, v) in enumerate(split_candle(
                                day.open[i], day.high[i], day.low[i], day.close[i], day.volume[i], n,
                                self.seed, (inst.security_id, t))):
                            raw.t.append(t + 60 * k)
                            raw.open.append(o)
                            raw.high.append(h)
                            raw.low.append(lo)
                            raw.close.append(c)
                            raw.volume.append(v)
        if raw is None:
            arrays = generate_minutes([inst], session, self.seed, [self.raw_factor(inst, session.day)])
            raw = minutes_to_candles(arrays, 0, session)
        out = raw.adjusted(self.action_for(inst, session.day).factor) if adjusted else raw
        if len(self._cache) > 512:
            self._cache.clear()
        self._cache[key] = out
        return out

    # -- the two charts APIs

    def intraday(self, inst: Instrument, interval: int, first: int, last: int, now: float) -> Candles:
        """``POST /v2/charts/intraday``: candles of ``interval`` minutes labelled in
        [first, last] (UTC epoch s), only minutes that ended by ``now``."""
        out = Candles.empty()
        d0 = dt.datetime.fromtimestamp(first, IST).date()
        d1 = dt.datetime.fromtimestamp(last, IST).date()
        for s in self.sessions.between(d0, d1):
            if s.open >= now or s.close <= first or s.open > last:
                continue
            rec = self._recording(inst, s.day, "intraday", interval) if s.close <= now else None
            if rec is not None:
                day = rec.days[s.day]
            else:
                mins = self.minutes(inst, s)
                if s.close > now:
                    mins = mins.select(s.open, int(now) - 60)
                day = mins.aggregate(interval, s.open)
            out.extend(day.select(first, last))
        return out

    def daily(self, inst: Instrument, first_day: dt.date, end_day: dt.date, now: float) -> Candles:
        """``POST /v2/charts/historical``: one candle per finished session with
        ``first_day <= day < end_day`` (toDate is not included), labelled at
        00:00 IST of its day."""
        out = Candles.empty()
        if end_day <= first_day:
            return out
        for s in self.sessions.between(first_day, end_day - dt.timedelta(days=1)):
            if s.close > now:
                continue
            label = int(dt.datetime.combine(s.day, dt.time(0, 0), IST).timestamp())
            rec = self._recording(inst, s.day, "historical", None)
            out.extend(rec.days[s.day] if rec is not None else self.minutes(inst, s).day_candle(label))
        return out

    def prev_close(self, inst: Instrument, session: SimSession) -> float:
        """Close (rupees) of the session before ``session`` as served now (0.0 if none)."""
        prev = self.sessions.previous(session)
        if prev is None:
            return 0.0
        mins = self.minutes(inst, prev)
        return mins.close[-1] if mins.close else 0.0
