"""Contracts and one-minute bars served by the TWS API simulator.

Pure data, no sockets: the contract table the simulator answers
``reqContractDetails`` from, NYSE sessions from ``pandas_market_calendars``
(calendar ``XNYS``), the recorded CSV bars, the deterministic generated bars,
and the parsing of ``endDateTime`` / ``durationStr`` / ``barSizeSetting`` the
way the TWS API documents them ("Historical Bar Data" and "Historical Data
Limitations" pages of the TWS API reference).

Bars
----
A :class:`Bar` is one IB historical bar as the wire carries it: the bar start
(epoch seconds, bars are labelled by their start like IB's), open, high, low,
close, volume and WAP as decimal *text* and barCount as an integer.

Recorded bars (CSV, columns ``Date,Open,Close,High,Low,Volume``, local time
of the contract's time zone, bars labelled by their start) are served with the
price and volume text exactly as written in the file.  WAP and barCount are
not in the recording and are derived: ``WAP = round((high + low + close) / 3,
2)`` in decimal arithmetic, ``barCount = ceil(volume / 100)`` (0 when the
volume is 0).  For ``useRTH=1`` only bars inside the exchange session are
served (09:30 to the close, 15:59 being the last bar of a regular day): the
recording of 2019-11-05..07 has an extra 16:00 row that IB's own ``useRTH=1``
answer does not contain, so a regular day answers 390 bars.  ``useRTH=0``
serves every recorded row.

Generated bars are deterministic per (symbol, date): a seeded random walk for
every NYSE session, extended hours 04:00-20:00 US/Eastern (04:00-17:00 on an
early close), regular hours from the session open to the close, so a regular
day has 390 ``useRTH=1`` bars and an early close (13:00) 210; holidays and
weekends have none.  A "thin" contract misses TRADES bars in some minutes (no
trade in that minute), as thinly traded stocks do.

Live mode (:meth:`BarStore.set_live`, used by the simulator's live data):
every minute of every local day -- nights, weekends and holidays included --
has a generated TRADES bar (:func:`generate_live_day`, a seeded random walk
per (symbol, date), and :func:`live_bar`) whose barCount is the trade rate
in force for that minute (:class:`LiveRates`); ``useRTH=1`` keeps only the
exchange session's minutes, recorded (CSV) days stay as recorded.  The
trades of a minute are :func:`bar_trades` of its bar: the one function both
the live ticks and the historical answers come from, so live candles can be
compared with IB's bars minute by minute.  WAP of a live bar stays
``round((H + L + C) / 3, 2)`` (not the trades' VWAP).

MIDPOINT and BID_ASK bars are derived from the same price path: MIDPOINT
uses the trade prices; BID_ASK puts the bid one tick under and the ask one
tick over (open = average bid, high = highest ask, low = lowest bid, close =
average ask, as IB defines BID_ASK bars).  Both carry volume, WAP and barCount
of -1, as IB sends for those bar types.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import functools
import itertools
import logging
import math
import random
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "Bar",
    "ContractSpec",
    "BarStore",
    "Sessions",
    "BAR_SIZES",
    "WHAT_TO_SHOW",
    "parse_duration",
    "parse_end_datetime",
    "EndDateTimeError",
    "DurationError",
    "request_window_start",
    "MAX_ONE_MIN_SECONDS",
    "builtin_contract",
    "format_bar_time",
    "format_utc_dash",
    "LiveRates",
    "MinuteTrades",
    "TradeSlice",
    "MAX_TRADES_PER_MINUTE",
    "bar_trades",
    "generate_live_day",
    "LiveDay",
    "live_bar",
]

#: Legal ``barSizeSetting`` values (as IB lists them in its error 321 text).
BAR_SIZES: tuple[str, ...] = (
    "1 secs", "5 secs", "10 secs", "15 secs", "30 secs", "1 min", "2 mins",
    "3 mins", "5 mins", "10 mins", "15 mins", "20 mins", "30 mins", "1 hour",
    "2 hours", "3 hours", "4 hours", "8 hours", "1 day", "1W", "1M",
)
#: Bar types the simulator serves; IB's wording of each in HMDS messages.
WHAT_TO_SHOW: dict[str, str] = {"TRADES": "Trades", "MIDPOINT": "Midpoint", "BID_ASK": "Bid_Ask"}

#: Longest request for one-minute bars, in seconds (one week).
MAX_ONE_MIN_SECONDS = 7 * 86400

_DAY = 86400
_EXT_OPEN = dt.time(4, 0)
_EXT_CLOSE = dt.time(20, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    """One historical bar as sent on the wire.

    ``t`` is the bar start in epoch seconds (UTC); prices, volume and WAP are
    decimal text; ``count`` is IB's barCount.
    """

    t: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    wap: str
    count: int


@dataclasses.dataclass
class ContractSpec:
    """A contract the simulator knows.

    ``sec_type`` is ``STK`` or ``IND``; ``exchange`` is the exchange answered
    when the request leaves it empty; ``valid_exchanges`` are the exchanges a
    request may name (plus ``primary_exchange``).  ``csv_files`` makes the
    contract serve recorded bars (local times in ``time_zone``); otherwise
    bars are generated.  ``thin`` drops TRADES bars in some minutes;
    ``subscribed=False`` answers historical requests with error 354.
    ``head_timestamp`` (aware datetime) is the first available bar; ``None``
    means the first recorded bar for CSV contracts and two years before today
    for generated ones.  ``con_id`` 0 is replaced by a stable id derived from
    the symbol.
    """

    symbol: str
    sec_type: str = "STK"
    con_id: int = 0
    exchange: str = "SMART"
    primary_exchange: str = "NYSE"
    currency: str = "USD"
    valid_exchanges: tuple[str, ...] = (
        "SMART", "AMEX", "NYSE", "CBOE", "PHLX", "ISE", "CHX", "ARCA", "ISLAND",
        "DRCTEDGE", "BEX", "BATS", "EDGEA", "BYX", "IEX", "PEARL", "MEMX", "LTSE",
    )
    min_tick: str = "0.01"
    long_name: str = ""
    trading_class: str = ""
    industry: str = ""
    category: str = ""
    subcategory: str = ""
    time_zone: str = "US/Eastern"
    csv_files: tuple[Path, ...] = ()
    thin: bool = False
    subscribed: bool = True
    head_timestamp: dt.datetime | None = None
    base_price: float | None = None

    def __post_init__(self) -> None:
        self.symbol = self.symbol.upper()
        self.sec_type = self.sec_type.upper()
        if self.sec_type not in ("STK", "IND"):
            raise ValueError(f"sec_type must be STK or IND, not {self.sec_type!r}")
        if not self.con_id:
            self.con_id = 10_000_000 + zlib.crc32(f"{self.sec_type}:{self.symbol}".encode()) % 89_000_000
        if not self.trading_class:
            self.trading_class = "NMS" if self.primary_exchange == "NASDAQ" else self.symbol
        if not self.long_name:
            self.long_name = f"{self.symbol} {'INDEX' if self.sec_type == 'IND' else 'COMMON STOCK'}"
        self.csv_files = tuple(Path(p) for p in self.csv_files)
        ZoneInfo(self.time_zone)  # raises ZoneInfoNotFoundError on a bad name

    @property
    def tz(self) -> ZoneInfo:
        """The contract's time zone (IB's timeZoneId)."""
        return ZoneInfo(self.time_zone)

    def accepts_exchange(self, exchange: str) -> bool:
        """True when a request naming ``exchange`` (may be empty) matches."""
        if not exchange:
            return True
        ex = exchange.upper()
        return ex in self.valid_exchanges or ex == self.primary_exchange

    def accepts_primary(self, primary: str) -> bool:
        """True when a request's ``primaryExchange`` (may be empty) matches."""
        if not primary:
            return True
        p = primary.upper()
        return p == self.primary_exchange or (self.primary_exchange == "NASDAQ" and p == "ISLAND")


_BUILTIN: dict[str, dict] = {
    # S&P 500 index on CBOE (conId as IB lists it).
    "SPX": dict(sec_type="IND", con_id=416904, exchange="CBOE", primary_exchange="CBOE",
                valid_exchanges=("CBOE",), long_name="S&P 500 Stock Index", trading_class="SPX",
                industry="Indices", category="Broad Range Equity Index", subcategory="*",
                base_price=5000.0),
    "AAPL": dict(con_id=265598, primary_exchange="NASDAQ", long_name="APPLE INC",
                 industry="Technology", category="Computers", subcategory="Computers",
                 base_price=190.0),
    "MSFT": dict(con_id=272093, primary_exchange="NASDAQ", long_name="MICROSOFT CORP",
                 industry="Technology", category="Software", subcategory="Software",
                 base_price=400.0),
    "IBM": dict(con_id=8314, primary_exchange="NYSE", long_name="INTL BUSINESS MACHINES CORP",
                industry="Technology", category="Computers", subcategory="Computer Services",
                base_price=170.0),
    "SPY": dict(con_id=756733, primary_exchange="ARCA", long_name="SPDR S&P 500 ETF TRUST",
                trading_class="SPY", base_price=500.0),
}


def builtin_contract(symbol: str, **overrides) -> ContractSpec:
    """A :class:`ContractSpec` for ``symbol`` with IB's real identifiers when
    the symbol is one of SPX, AAPL, MSFT, IBM, SPY, else generic NYSE stock
    values; ``overrides`` replace any field."""
    base = dict(_BUILTIN.get(symbol.upper(), {}))
    base.update(overrides)
    return ContractSpec(symbol=symbol, **base)


# --------------------------------------------------------------------------
# sessions


class Sessions:
    """Exchange sessions from ``pandas_market_calendars`` (default ``XNYS``).

    :meth:`session` gives ``(open_epoch, close_epoch)`` for a local date or
    ``None`` on weekends and holidays.  Schedules are computed one calendar
    year at a time and cached; thread-safe.
    """

    def __init__(self, calendar: str = "XNYS") -> None:
        self.calendar = calendar
        self._years: dict[int, dict[dt.date, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def _year(self, year: int) -> dict[dt.date, tuple[int, int]]:
        got = self._years.get(year)
        if got is not None:
            return got
        with self._lock:
            got = self._years.get(year)
            if got is None:
                got = _schedule_year(self.calendar, year)
                self._years[year] = got
        return got

    def session(self, day: dt.date) -> tuple[int, int] | None:
        """Regular session of ``day`` as epoch seconds, or ``None``."""
        return self._year(day.year).get(day)


@functools.lru_cache(maxsize=256)
def _schedule_year(calendar: str, year: int) -> dict[dt.date, tuple[int, int]]:
    import pandas_market_calendars as mcal  # heavy import, only when needed

    cal = mcal.get_calendar(calendar)
    sched = cal.schedule(start_date=f"{year}-01-01", end_date=f"{year}-12-31")
    out: dict[dt.date, tuple[int, int]] = {}
    for day, o, c in zip(sched.index, sched["market_open"], sched["market_close"]):
        out[day.date()] = (int(o.timestamp()), int(c.timestamp()))
    return out


# --------------------------------------------------------------------------
# request parameters


class EndDateTimeError(ValueError):
    """``endDateTime`` is not one of the forms the TWS API accepts."""


class DurationError(ValueError):
    """``durationStr`` is not ``"<N> <S|D|W|M|Y>"`` with N >= 1."""


_END_RE = re.compile(r"^(?:(\d{8})\s+)?(\d{1,2}):(\d{2}):(\d{2})(?:\s+(\S+))?$")
_END_UTC_RE = re.compile(r"^(\d{8})-(\d{2}):(\d{2}):(\d{2})$")
_DUR_RE = re.compile(r"^(\d+) ([SDWMY])$")


def parse_end_datetime(text: str, login_tz: ZoneInfo, now: float) -> tuple[float, bool]:
    """Parse a TWS ``endDateTime``.

    Accepted (TWS API reference, reqHistoricalData): ``""`` (now),
    ``"yyyymmdd hh:mm:ss <tz>"`` (an IANA/IB zone name such as US/Eastern or
    UTC), ``"yyyymmdd-hh:mm:ss"`` (UTC), and the deprecated forms without a
    zone (``login_tz`` is used) or without a date (today in the zone).
    Returns ``(epoch_seconds, implied_zone)``; ``implied_zone`` is True when
    no zone was given (TWS then warns with 2174).  Raises
    :class:`EndDateTimeError`.
    """
    s = text.strip()
    if not s:
        return now, False
    m = _END_UTC_RE.match(s)
    try:
        if m:
            d = dt.datetime.strptime(m.group(1), "%Y%m%d")
            t = d.replace(hour=int(m.group(2)), minute=int(m.group(3)), second=int(m.group(4)),
                          tzinfo=dt.timezone.utc)
            return t.timestamp(), False
        m = _END_RE.match(s)
        if not m:
            raise EndDateTimeError(f"invalid end date/time {text!r}")
        date_s, hh, mm, ss, zone = m.groups()
        tz = login_tz
        if zone:
            try:
                tz = ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise EndDateTimeError(f"unknown time zone {zone!r}") from exc
        if date_s:
            day = dt.datetime.strptime(date_s, "%Y%m%d").date()
        else:
            day = dt.datetime.fromtimestamp(now, tz).date()
        t = dt.datetime.combine(day, dt.time(int(hh), int(mm), int(ss)), tzinfo=tz)
        return t.timestamp(), zone is None
    except ValueError as exc:  # bad month/day/hour
        if isinstance(exc, EndDateTimeError):
            raise
        raise EndDateTimeError(f"invalid end date/time {text!r}") from exc


def parse_duration(text: str) -> tuple[int, str]:
    """Parse ``durationStr`` ``"N S|D|W|M|Y"`` into ``(N, unit)``; raises
    :class:`DurationError`."""
    m = _DUR_RE.match(text.strip())
    if not m or int(m.group(1)) < 1:
        raise DurationError(f"invalid duration {text!r}")
    return int(m.group(1)), m.group(2)


def duration_seconds_upper(n: int, unit: str) -> int:
    """Upper bound of a duration in seconds (D counts as 24 h, M as 31 D,
    Y as 366 D), used for the bar size's maximum duration check."""
    return n * {"S": 1, "D": _DAY, "W": 7 * _DAY, "M": 31 * _DAY, "Y": 366 * _DAY}[unit]


def request_window_start(end: float, n: int, unit: str, tz: ZoneInfo) -> float:
    """Start (epoch seconds) of the window ``[start, end)`` a request covers.

    ``N S``: N seconds before end; ``N W``: N * 7 days before end; ``N D``:
    the N most recent weekdays (Monday to Friday in the contract's time zone)
    whose day has begun before ``end`` -- weekends are skipped, exchange
    holidays count as days without bars, so a one-day request ending on a
    holiday finds no data while one ending on a Sunday returns Friday.
    """
    if unit == "S":
        return end - n
    if unit == "W":
        return end - n * 7 * _DAY
    if unit != "D":
        raise DurationError(f"unit {unit!r} has no window here")
    local = dt.datetime.fromtimestamp(end, tz)
    day = local.date()
    if _midnight(day, tz) >= end:
        day -= dt.timedelta(days=1)
    counted = 0
    first = day
    while counted < n:
        if day.weekday() < 5:
            counted += 1
            first = day
        day -= dt.timedelta(days=1)
    return _midnight(first, tz)


def _midnight(day: dt.date, tz: ZoneInfo) -> float:
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=tz).timestamp()


def format_bar_time(t: int, tz: ZoneInfo, tz_name: str) -> str:
    """``"yyyymmdd hh:mm:ss <tz_name>"`` of epoch ``t`` in ``tz`` (formatDate 1)."""
    return dt.datetime.fromtimestamp(t, tz).strftime("%Y%m%d %H:%M:%S") + " " + tz_name


def format_utc_dash(t: float) -> str:
    """``"yyyymmdd-hh:mm:ss"`` in UTC (the TWS API's explicit UTC form)."""
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).strftime("%Y%m%d-%H:%M:%S")


# --------------------------------------------------------------------------
# bar sources

_CENT = Decimal("0.01")


def _dec(s: str) -> Decimal:
    return Decimal(s)


def _wap(h: Decimal, l: Decimal, c: Decimal) -> str:
    return str(((h + l + c) / 3).quantize(_CENT, rounding=ROUND_HALF_EVEN))


def _count_from_volume(v: Decimal) -> int:
    return int(math.ceil(v / 100)) if v > 0 else 0


def load_csv_bars(paths: Sequence[Path], tz: ZoneInfo) -> dict[dt.date, list[Bar]]:
    """Read recorded one-minute bars (``Date,Open,Close,High,Low,Volume``,
    local times in ``tz``) into ``{local date: [Bar, ...]}`` sorted by time.

    Price and volume text is kept as written.  Rows that do not parse are
    skipped with one log line each.  Raises ``FileNotFoundError`` /
    ``ValueError`` (missing columns).
    """
    seen: dict[int, Bar] = {}
    for path in paths:
        with open(path, newline="") as fh:
            rows = csv.DictReader(fh)
            need = {"Date", "Open", "Close", "High", "Low", "Volume"}
            if not rows.fieldnames or not need <= set(rows.fieldnames):
                raise ValueError(f"{path}: columns must include {sorted(need)}, got {rows.fieldnames}")
            for lineno, row in enumerate(rows, start=2):
                try:
                    local = dt.datetime.strptime(row["Date"].strip(), "%Y-%m-%d %H:%M:%S")
                    t = int(local.replace(tzinfo=tz).timestamp())
                    o, c, h, l, v = (row[k].strip() for k in ("Open", "Close", "High", "Low", "Volume"))
                    hd, ld, cd, vd = _dec(h), _dec(l), _dec(c), _dec(v)
                    _dec(o)
                except (ValueError, InvalidOperation, KeyError, AttributeError) as exc:
                    log.warning("csv row skipped file=%s line=%d error=%s", path, lineno, exc)
                    continue
                seen[t] = Bar(t, o, h, l, c, v, _wap(hd, ld, cd), _count_from_volume(vd))
    by_day: dict[dt.date, list[Bar]] = {}
    for t in sorted(seen):
        by_day.setdefault(dt.datetime.fromtimestamp(t, tz).date(), []).append(seen[t])
    return by_day


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _base_price(spec: ContractSpec) -> float:
    if spec.base_price:
        return float(spec.base_price)
    return 20.0 + _seed("base", spec.symbol) % 280


def _cents(x: float) -> int:
    return max(1, int(round(x * 100)))


def generate_day(spec: ContractSpec, day: dt.date, session: tuple[int, int]) -> list[tuple[int, int, int, int, int, int, bool]]:
    """Deterministic minute path of ``spec`` on ``day``.

    Returns ``(t, open, high, low, close, volume, traded)`` per minute of the
    extended day (04:00 to 20:00 local, 17:00 after an early close), prices
    in integer cents; ``traded`` is False for minutes without a TRADES bar
    (thin contracts only).  Same output for the same (symbol, date).
    """
    tz = spec.tz
    rng = random.Random(_seed("v1", spec.symbol, day.isoformat()))
    rth_open, rth_close = session
    ext_open = int(dt.datetime.combine(day, _EXT_OPEN, tzinfo=tz).timestamp())
    ext_close = int(dt.datetime.combine(day, _EXT_CLOSE, tzinfo=tz).timestamp())
    regular_close = int(dt.datetime.combine(day, dt.time(16, 0), tzinfo=tz).timestamp())
    if rth_close < regular_close:  # early close: post-market ends 4 h after
        ext_close = rth_close + 4 * 3600
    base = _base_price(spec)
    drift = 0.15 * math.sin(day.toordinal() / 40.0) + 0.05 * math.sin(day.toordinal() / 7.0)
    price = base * math.exp(drift + rng.gauss(0.0, 0.01))
    out = []
    vol_base = 2000 + _seed("vol", spec.symbol) % 20000
    for t in range(ext_open, ext_close, 60):
        rth = rth_open <= t < rth_close
        sigma = 0.0008 if rth else 0.0003
        o = _cents(price)
        price = price * math.exp(rng.gauss(0.0, sigma))
        c = _cents(price)
        h = max(o, c) + int(abs(rng.gauss(0.0, sigma)) * price * 100 * 0.6)
        l = max(1, min(o, c) - int(abs(rng.gauss(0.0, sigma)) * price * 100 * 0.6))
        if rth:
            m = (t - rth_open) / 60.0
            left = (rth_close - t) / 60.0
            shape = 1.0 + 2.0 * math.exp(-m / 30.0) + 1.5 * math.exp(-left / 20.0)
            vol = int(vol_base * shape * rng.lognormvariate(0.0, 0.4))
        else:
            vol = int(vol_base * 0.03 * rng.lognormvariate(0.0, 0.8))
        traded = True
        if spec.thin:
            vol = vol // 20
            traded = rng.random() >= (0.35 if rth else 0.8)
        vol = max(vol, 100 if rth and not spec.thin else 1)
        out.append((t, o, h, l, c, vol, traded))
    return out


def _c(x: int) -> str:
    return f"{x // 100}.{x % 100:02d}"


# --------------------------------------------------------------------------
# live mode: a bar for every minute, trades derived from the bar

#: Largest trades-per-minute rate (one trade per millisecond of the minute).
MAX_TRADES_PER_MINUTE = 60_000


_RATE_VERSIONS = itertools.count(1)


class LiveRates:
    """Trades per minute per contract as a schedule of ``(from_epoch, rate)``
    steps: the rate of minute ``t`` is the last step with ``from <= t``, the
    first step's rate before it.  Thread-safe for one writer."""

    def __init__(self, rate: int) -> None:
        self._steps: list[tuple[int, int]] = [(-(2 ** 62), _check_rate(rate))]
        self.version = next(_RATE_VERSIONS)

    def set_from(self, t: int, rate: int) -> None:
        """Minutes starting at or after epoch ``t`` use ``rate``."""
        rate = _check_rate(rate)
        steps = [s for s in self._steps if s[0] < t]
        steps.append((t, rate))
        self._steps = steps
        self.version = next(_RATE_VERSIONS)

    def at(self, t: int) -> int:
        steps = self._steps
        for start, rate in reversed(steps):
            if start <= t:
                return rate
        return steps[0][1]

    @property
    def current(self) -> int:
        return self._steps[-1][1]


def _check_rate(rate: int) -> int:
    rate = int(rate)
    if not 1 <= rate <= MAX_TRADES_PER_MINUTE:
        raise ValueError(f"trades per minute must be 1..{MAX_TRADES_PER_MINUTE}, not {rate}")
    return rate


@dataclasses.dataclass(frozen=True, eq=False)
class LiveDay:
    """The deterministic minute path of one contract on one local day in
    live mode (numpy arrays, one entry per minute from local midnight):
    ``o``/``h``/``l``/``c`` integer cents, ``factor`` the minute's volume
    factor, ``traded`` False where a thin contract has no trade."""

    start: int
    o: Any
    h: Any
    l: Any
    c: Any
    factor: Any
    traded: Any

    def __len__(self) -> int:
        return len(self.o)

    def row(self, i: int) -> tuple[int, int, int, int, int, float, bool]:
        """``(t, open, high, low, close, size_factor, traded)`` of minute ``i``."""
        return (self.start + 60 * i, int(self.o[i]), int(self.h[i]), int(self.l[i]), int(self.c[i]),
                float(self.factor[i]), bool(self.traded[i]))


def generate_live_day(spec: ContractSpec, day: dt.date) -> LiveDay:
    """Deterministic minute path of ``spec`` for live mode: every minute of
    the local ``day`` (00:00 to 24:00 in the contract's zone, weekends and
    holidays included; 23 or 25 hours on DST change days), a seeded random
    walk whose minute opens at the previous close.  Same output for the same
    (symbol, date), independent of the trade rate."""
    import numpy as np

    tz = spec.tz
    rng = np.random.default_rng(_seed("live-v1", spec.symbol, day.isoformat()))
    start = int(dt.datetime.combine(day, dt.time(0, 0), tzinfo=tz).timestamp())
    end = int(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0, 0), tzinfo=tz).timestamp())
    n = (end - start) // 60
    sigma = 0.0006
    drift = 0.15 * math.sin(day.toordinal() / 40.0) + 0.05 * math.sin(day.toordinal() / 7.0)
    p0 = _base_price(spec) * math.exp(drift + rng.normal(0.0, 0.01))
    path = p0 * np.exp(np.cumsum(rng.normal(0.0, sigma, n)))
    prev = np.concatenate(([p0], path[:-1]))
    o = np.maximum(1, np.rint(prev * 100)).astype(np.int64)
    c = np.maximum(1, np.rint(path * 100)).astype(np.int64)
    up = (np.abs(rng.normal(0.0, sigma, n)) * path * 60).astype(np.int64)
    down = (np.abs(rng.normal(0.0, sigma, n)) * path * 60).astype(np.int64)
    h = np.maximum(o, c) + up
    l = np.maximum(1, np.minimum(o, c) - down)
    factor = rng.lognormal(0.0, 0.3, n)
    traded = rng.random(n) >= 0.35 if spec.thin else np.ones(n, dtype=bool)
    return LiveDay(start, o, h, l, c, factor, traded)


def _mean_size(spec: ContractSpec) -> int:
    return 20 + _seed("size", spec.symbol) % 180


def live_bar(spec: ContractSpec, row: tuple[int, int, int, int, int, float, bool], count: int) -> Bar | None:
    """The TRADES bar of one live minute ``row`` (see
    :func:`generate_live_day`) with ``count`` trades, or None (no trade).

    barCount = ``count``; volume = ``count`` x the contract's mean trade size
    x the minute's size factor (at least one share per trade; ``"0"`` for an
    index, whose ticks have no size); high and low are narrowed when the
    count is too small to reach them (1 trade: o=h=l=c; 2: h/l = max/min of
    open and close; 3: only one of high/low beyond open and close), so that
    :func:`bar_trades` can always hit open, high, low and close exactly."""
    t, o, h, l, c, factor, traded = row
    if not traded or count <= 0:
        return None
    if count == 1:
        c = o
    if count <= 2:
        h, l = max(o, c), min(o, c)
    elif count == 3 and h > max(o, c) and l < min(o, c):
        l = min(o, c)
    if spec.sec_type == "IND":
        vol = 0
    else:
        vol = max(count, int(count * _mean_size(spec) * factor))
    wap = _wap(Decimal(h) / 100, Decimal(l) / 100, Decimal(c) / 100)
    return Bar(t, _c(o), _c(h), _c(l), _c(c), str(vol), wap, count)


@dataclasses.dataclass(slots=True)
class TradeSlice:
    """Python lists of some consecutive trades of a :class:`MinuteTrades`:
    ``times_ms`` epoch milliseconds, ``prices`` integers in units of
    ``10**-decimals``, ``texts`` the same as decimal text, ``sizes`` shares
    (0 for an index), ``bids``/``asks`` (text) and ``bid_sizes``/``ask_sizes``
    the quote in force at each trade, ``cum_volume`` the day's volume up to
    and including each trade, ``vwap`` the day's VWAP at each trade (text,
    empty for an index)."""

    times_ms: list[int]
    prices: list[int]
    texts: list[str]
    sizes: list[int]
    bids: list[str]
    asks: list[str]
    bid_sizes: list[int]
    ask_sizes: list[int]
    cum_volume: list[int]
    vwap: list[str]

    def __len__(self) -> int:
        return len(self.times_ms)


class MinuteTrades:
    """The trades of one minute of one contract, derived from its TRADES bar
    by :func:`bar_trades`, sorted by time; kept as numpy arrays (about 80
    bytes a trade) and handed out as :class:`TradeSlice` lists by
    :meth:`slice`.  The full lists are also attributes (``times_ms``,
    ``prices``, ``texts``, ``sizes``, ``bids``, ``asks``, ``bid_sizes``,
    ``ask_sizes``, ``cum_volume``, ``vwap``)."""

    __slots__ = ("symbol", "t", "decimals", "_arr", "_table", "_base", "_index")

    def __init__(self, symbol: str, t: int, decimals: int, arrays: dict, table: list[str], base: int,
                 index: bool) -> None:
        self.symbol = symbol
        self.t = t
        self.decimals = decimals
        self._arr = arrays
        self._table = table
        self._base = base
        self._index = index

    def __len__(self) -> int:
        return len(self._arr["t"])

    def count_until(self, ms: int) -> int:
        """How many trades have a time <= ``ms``."""
        import numpy as np

        return int(np.searchsorted(self._arr["t"], ms, side="right"))

    def count_after(self, ms: int) -> int:
        """Index of the first trade with a time > ``ms``."""
        return self.count_until(ms)

    def slice(self, i0: int = 0, i1: int | None = None) -> TradeSlice:
        """Trades ``i0 .. i1 - 1`` as Python lists."""
        a = self._arr
        tb, base = self._table, self._base
        sl = slice(i0, i1)
        prices = a["p"][sl].tolist()
        vw = a["vw"][sl].tolist()
        return TradeSlice(
            a["t"][sl].tolist(), prices, [tb[p - base] for p in prices], a["s"][sl].tolist(),
            [tb[p - base] for p in a["b"][sl].tolist()], [tb[p - base] for p in a["a"][sl].tolist()],
            a["bs"][sl].tolist(), a["as"][sl].tolist(), a["cum"][sl].tolist(),
            [""] * len(vw) if self._index else [f"{v:.6f}" for v in vw],
        )

    def __getattr__(self, name: str):
        if name in TradeSlice.__dataclass_fields__:
            return getattr(self.slice(), name)
        raise AttributeError(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MinuteTrades):
            return NotImplemented
        return (self.symbol, self.t, self.decimals) == (other.symbol, other.t, other.decimals) \
            and self.slice() == other.slice()

    __hash__ = None  # type: ignore[assignment]


def _scaled(text: str, decimals: int) -> int:
    return int((Decimal(text) * (10 ** decimals)).to_integral_value())


def _fmt_scaled(x: int, decimals: int) -> str:
    if decimals == 0:
        return str(x)
    sign = "-" if x < 0 else ""
    x = abs(x)
    q, r = divmod(x, 10 ** decimals)
    return f"{sign}{q}.{r:0{decimals}d}"


def bar_trades(spec: ContractSpec, bar: Bar, day_volume: int = 0, day_pv: float = 0.0) -> MinuteTrades:
    """Derive the trades of one minute from its TRADES bar -- the single
    source of the live trades and of the bars ``reqHistoricalData`` serves.

    Deterministic per (symbol, bar start).  ``bar.count`` trades at distinct
    millisecond times inside ``[t, t + 60 s)``: the first at ``open``, the
    last at ``close``, one at ``high`` and one at ``low`` (others uniform
    between low and high), sizes >= 1 summing to ``volume`` (all 0 for an
    index).  Each trade has the quote in force: the trade is at the bid or
    at the ask, the spread 1 to 3 ticks.  ``day_volume``/``day_pv`` are the
    volume and sum of price x volume of the day's earlier minutes (for the
    cumulative volume and VWAP of RTVolume).  Raises ``ValueError`` when the
    bar cannot carry its trades (volume < barCount for a stock, barCount >
    60,000)."""
    import numpy as np

    n = int(bar.count)
    decimals = max(2, *(len(x.partition(".")[2]) for x in (bar.open, bar.high, bar.low, bar.close)))
    o, h, l, c = (_scaled(x, decimals) for x in (bar.open, bar.high, bar.low, bar.close))
    index = spec.sec_type == "IND"
    vol = 0 if index else int(Decimal(bar.volume))
    if n <= 0:
        empty = {k: np.zeros(0, dtype=np.int64) for k in ("t", "p", "s", "b", "a", "bs", "as", "cum")}
        empty["vw"] = np.zeros(0)
        return MinuteTrades(spec.symbol, bar.t, decimals, empty, [], 0, index)
    if n > MAX_TRADES_PER_MINUTE:
        raise ValueError(f"barCount {n} > {MAX_TRADES_PER_MINUTE}")
    if not index and vol < n:
        raise ValueError(f"volume {vol} < barCount {n}")
    rng = np.random.default_rng(_seed("trades-v1", spec.symbol, bar.t))
    offs = np.sort(rng.choice(60_000, size=n, replace=False)) if n > 1 else np.array([rng.integers(0, 60_000)])
    prices = rng.integers(l, h + 1, size=n)
    prices[0] = o
    prices[-1] = c
    if n >= 4:
        ih, il = rng.choice(np.arange(1, n - 1), size=2, replace=False)
        prices[ih] = h
        prices[il] = l
    elif n == 3:
        prices[1] = h if h > max(o, c) else l
    if index:
        sizes = np.zeros(n, dtype=np.int64)
    else:
        sizes = rng.multinomial(vol - n, np.full(n, 1.0 / n)) + 1
    tick = max(1, _scaled(spec.min_tick, decimals))
    spread = rng.integers(1, 4, size=n) * tick
    at_ask = rng.integers(0, 2, size=n).astype(bool)
    bids = np.where(at_ask, np.maximum(prices - spread, tick), prices)
    asks = np.where(at_ask, prices, prices + spread)
    bsz = rng.integers(1, 30, size=n) * 100
    asz = rng.integers(1, 30, size=n) * 100
    cum = np.cumsum(sizes) + day_volume
    if index:
        vwap = np.zeros(n)
    else:
        vwap = (np.cumsum(prices.astype(np.float64) * sizes) / (10 ** decimals) + day_pv) / cum
    # every price of the minute lies in [low - 3 ticks, high + 3 ticks]: format that range once
    base = min(l, int(bids.min()))
    table = [_fmt_scaled(x, decimals) for x in range(base, max(h, int(asks.max())) + 1)]
    arrays = {"t": offs.astype(np.int64) + bar.t * 1000, "p": prices.astype(np.int64), "s": sizes.astype(np.int64),
              "b": bids.astype(np.int64), "a": asks.astype(np.int64), "bs": bsz.astype(np.int64),
              "as": asz.astype(np.int64), "cum": cum.astype(np.int64), "vw": vwap.astype(np.float64)}
    return MinuteTrades(spec.symbol, bar.t, decimals, arrays, table, base, index)


class BarStore:
    """Bars of every configured contract, by contract, local date and bar type.

    ``day_bars(spec, day, what, use_rth)`` returns the list of :class:`Bar`
    for one local date (empty on weekends, holidays, or days without
    recording).  Generated days are cached (LRU, ``cache_days`` entries of
    about 0.4 MB each).  Thread-safe.
    """

    def __init__(self, sessions: Sessions | None = None, cache_days: int = 64) -> None:
        self.sessions = sessions or Sessions()
        self._csv: dict[str, dict[dt.date, list[Bar]]] = {}
        self._cache: OrderedDict[tuple, tuple[tuple[Bar, ...], tuple[Bar, ...]]] = OrderedDict()
        self._cache_days = cache_days
        self._lock = threading.Lock()
        self.live: LiveRates | None = None

    # recorded -------------------------------------------------------------
    def load(self, spec: ContractSpec) -> int:
        """Load ``spec.csv_files`` (if any); returns the number of bars."""
        if not spec.csv_files:
            return 0
        data = load_csv_bars(spec.csv_files, spec.tz)
        self._csv[spec.symbol] = data
        return sum(len(v) for v in data.values())

    def first_bar_time(self, spec: ContractSpec, use_rth: bool) -> int | None:
        """Epoch of the first bar a request could ever get (recorded data only)."""
        data = self._csv.get(spec.symbol)
        if not data:
            return None
        for day in sorted(data):
            bars = self._rth_filter(data[day], day) if use_rth else data[day]
            if bars:
                return bars[0].t
        return None

    def _rth_filter(self, bars: Iterable[Bar], day: dt.date) -> list[Bar]:
        sess = self.sessions.session(day)
        if sess is None:
            return []
        o, c = sess
        return [b for b in bars if o <= b.t < c]

    # generated ------------------------------------------------------------
    def _generated(self, spec: ContractSpec, day: dt.date, what: str) -> tuple[tuple[Bar, ...], tuple[Bar, ...]]:
        key = (spec.symbol, spec.thin, spec.base_price, spec.min_tick, spec.time_zone, day, what)
        with self._lock:
            got = self._cache.get(key)
            if got is not None:
                self._cache.move_to_end(key)
                return got
        sess = self.sessions.session(day)
        got = ((), ()) if sess is None else self._shape(spec, generate_day(spec, day, sess), what, sess)
        with self._lock:
            self._cache[key] = got
            while len(self._cache) > self._cache_days:
                self._cache.popitem(last=False)
        return got

    def _shape(self, spec: ContractSpec, path, what: str, sess) -> tuple[tuple[Bar, ...], tuple[Bar, ...]]:
        tick = _cents_from_text(spec.min_tick)
        all_bars: list[Bar] = []
        for t, o, h, l, c, vol, traded in path:
            if what == "TRADES":
                if not traded:
                    continue
                vd = Decimal(vol)
                bar = Bar(t, _c(o), _c(h), _c(l), _c(c), str(vol),
                          _wap(Decimal(h) / 100, Decimal(l) / 100, Decimal(c) / 100), _count_from_volume(vd))
            elif what == "MIDPOINT":
                bar = Bar(t, _c(o), _c(h), _c(l), _c(c), "-1", "-1", -1)
            else:  # BID_ASK
                avg = (o + c) // 2
                bar = Bar(t, _c(max(1, avg - tick)), _c(h + tick), _c(max(1, l - tick)), _c(avg + tick), "-1", "-1", -1)
            all_bars.append(bar)
        o_, c_ = sess
        rth = tuple(b for b in all_bars if o_ <= b.t < c_)
        return tuple(all_bars), rth

    # live -----------------------------------------------------------------
    def set_live(self, rates: LiveRates | None, cache_days: int | None = None) -> None:
        """Switch live mode on (``rates``) or off (None).  In live mode every
        minute of every day has a generated TRADES bar (weekends, holidays
        and nights included; ``useRTH=1`` still keeps the exchange session
        only) whose barCount is the rate in force for that minute; recorded
        (CSV) days are served as recorded."""
        with self._lock:
            self.live = rates
            if cache_days:
                self._cache_days = max(self._cache_days, cache_days)

    def _live_day(self, spec: ContractSpec, day: dt.date) -> tuple[LiveDay, Any, Any]:
        """``(path, volume before each minute, price x volume before each
        minute)`` of one live day (cached per rate schedule version)."""
        import numpy as np

        rates = self.live
        key = ("live", spec.symbol, spec.thin, spec.base_price, spec.sec_type, spec.time_zone, day, rates.version)
        with self._lock:
            got = self._cache.get(key)
            if got is not None:
                self._cache.move_to_end(key)
                return got
        path = generate_live_day(spec, day)
        n = len(path)
        counts = np.array([rates.at(path.start + 60 * i) for i in range(n)], dtype=np.int64)
        counts = np.where(path.traded, counts, 0)
        if spec.sec_type == "IND":
            vols = np.zeros(n, dtype=np.int64)
        else:
            vols = np.where(counts > 0, np.maximum(counts, (counts * _mean_size(spec) * path.factor).astype(np.int64)), 0)
        pv = vols * (path.h + path.l + path.c) / 300.0
        before_v = np.concatenate(([0], np.cumsum(vols)[:-1]))
        before_pv = np.concatenate(([0.0], np.cumsum(pv)[:-1]))
        got = (path, before_v, before_pv)
        with self._lock:
            self._cache[key] = got
            while len(self._cache) > self._cache_days:
                self._cache.popitem(last=False)
        return got

    def _live_bars(self, spec: ContractSpec, day: dt.date) -> tuple[Bar, ...]:
        path = self._live_day(spec, day)[0]
        rates = self.live
        out = []
        for i in range(len(path)):
            row = path.row(i)
            bar = live_bar(spec, row, rates.at(row[0]))
            if bar is not None:
                out.append(bar)
        return tuple(out)

    def _is_live(self, spec: ContractSpec, day: dt.date) -> bool:
        if self.live is None:
            return False
        return not (spec.csv_files and self._csv.get(spec.symbol, {}).get(day))

    def minute_bar(self, spec: ContractSpec, t: int) -> tuple[Bar | None, int, float]:
        """Live mode: ``(TRADES bar of the minute starting at epoch t or
        None, day volume before it, day price x volume before it)``."""
        day = dt.datetime.fromtimestamp(t, spec.tz).date()
        if not self._is_live(spec, day):
            for b in self.day_bars(spec, day, "TRADES", False):
                if b.t == t:
                    return b, 0, 0.0
            return None, 0, 0.0
        path, before_v, before_pv = self._live_day(spec, day)
        i = (t - path.start) // 60
        if not 0 <= i < len(path) or path.start + 60 * i != t:
            return None, 0, 0.0
        row = path.row(i)
        return live_bar(spec, row, self.live.at(t)), int(before_v[i]), float(before_pv[i])

    # both -----------------------------------------------------------------
    def day_bars(self, spec: ContractSpec, day: dt.date, what: str, use_rth: bool) -> Sequence[Bar]:
        """Bars of ``spec`` for local date ``day``, bar type ``what``
        (TRADES/MIDPOINT/BID_ASK), regular hours only when ``use_rth``."""
        if self._is_live(spec, day):
            bars: Sequence[Bar] = self._live_bars(spec, day)
            if use_rth:
                bars = self._rth_filter(bars, day)
            if what != "TRADES":
                bars = [_derive(b, what, _cents_from_text(spec.min_tick)) for b in bars]
            return bars
        if spec.csv_files:
            bars = self._csv.get(spec.symbol, {}).get(day, [])
            if use_rth:
                bars = self._rth_filter(bars, day)
            if what != "TRADES":
                bars = [_derive(b, what, _cents_from_text(spec.min_tick)) for b in bars]
            return bars
        all_bars, rth = self._generated(spec, day, what)
        return rth if use_rth else all_bars


def _cents_from_text(s: str) -> int:
    return max(1, int((Decimal(s) * 100).to_integral_value()))


def _derive(b: Bar, what: str, tick_cents: int) -> Bar:
    """MIDPOINT / BID_ASK bar derived from a recorded TRADES bar."""
    if what == "MIDPOINT":
        return Bar(b.t, b.open, b.high, b.low, b.close, "-1", "-1", -1)
    tick = Decimal(tick_cents) / 100
    o, h, l, c = (Decimal(x) for x in (b.open, b.high, b.low, b.close))
    avg = ((o + c) / 2).quantize(_CENT, rounding=ROUND_HALF_EVEN)
    low = max(l - tick, tick)
    return Bar(b.t, str(max(avg - tick, tick)), str(h + tick), str(low), str(avg + tick), "-1", "-1", -1)
