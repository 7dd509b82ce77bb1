"""The simulated Kite instrument master and historical candles.

Instrument master: Kite Connect v3 "Market quotes and instruments", section
"Instrument list" -- a CSV with the header ``instrument_token,
exchange_token, tradingsymbol, name, last_price, expiry, strike, tick_size,
lot_size, instrument_type, segment, exchange``, where ``instrument_token =
exchange_token << 8 | segment``.  The simulator serves the recorded samples
(``instruments_all.csv``, ``instruments_nse.csv``) unchanged, adds a few
reference instruments the recordings and demos use (INFY, RELIANCE, the
NIFTY 50 / NIFTY BANK / SENSEX indices, one currency future) and generates
clearly named NSE equities (``SIMEQ00001`` ...) until the master holds at
least ``min_nse_equities`` of them, for load tests.

Historical candles: Kite Connect v3 "Historical candle data" --
``[timestamp, open, high, low, close, volume(, oi)]`` with timestamps like
``2017-12-15T09:15:00+0530``, candles labelled by their start, sessions in
IST.  Candles are generated deterministically (seeded by instrument and
day) so that the same request always gives the same answer.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timedelta
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .kite_packets import IST, SEGMENT_INDICES

log = logging.getLogger(__name__)

HEADER = (
    "instrument_token", "exchange_token", "tradingsymbol", "name", "last_price", "expiry",
    "strike", "tick_size", "lot_size", "instrument_type", "segment", "exchange",
)

#: Reference instruments added when the recorded samples lack them
#: (instrument_token, exchange_token, tradingsymbol, name, tick_size, lot_size,
#: instrument_type, segment, exchange, reference price).
REFERENCE_INSTRUMENTS = (
    (408065, 1594, "INFY", "INFOSYS", 0.05, 1, "EQ", "NSE", "NSE", 1573.70),
    (738561, 2885, "RELIANCE", "RELIANCE INDUSTRIES", 0.05, 1, "EQ", "NSE", "NSE", 2450.0),
    (256265, 1001, "NIFTY 50", "NIFTY 50", 0.0, 0, "EQ", "INDICES", "NSE", 22000.0),
    (260105, 1016, "NIFTY BANK", "NIFTY BANK", 0.0, 0, "EQ", "INDICES", "NSE", 47000.0),
    (265, 1, "SENSEX", "SENSEX", 0.0, 0, "EQ", "INDICES", "BSE", 73000.0),
)

#: Historical intervals and Kite's maximum span (days) per request.
INTERVAL_MINUTES = {
    "minute": 1, "3minute": 3, "5minute": 5, "10minute": 10, "15minute": 15,
    "30minute": 30, "60minute": 60, "day": None,
}
INTERVAL_MAX_DAYS = {
    "minute": 60, "3minute": 100, "5minute": 100, "10minute": 100, "15minute": 200,
    "30minute": 200, "60minute": 400, "day": 2000,
}

SESSION_OPEN = dtime(9, 15)
SESSION_CLOSE = dtime(15, 30)


@dataclass(frozen=True, slots=True)
class Instrument:
    """One instrument master row.

    ``row`` keeps the CSV cells exactly as served; the typed attributes are
    parsed from it.  ``reference_price`` (rupees) seeds the simulated market;
    0 means "pick one".
    """

    row: tuple[str, ...]
    instrument_token: int
    exchange_token: int
    tradingsymbol: str
    tick_size: float
    segment: str
    exchange: str
    instrument_type: str
    reference_price: float

    @property
    def key(self) -> str:
        """``EXCHANGE:TRADINGSYMBOL``, the key the quote endpoints use."""
        return f"{self.exchange}:{self.tradingsymbol}"

    @property
    def is_index(self) -> bool:
        """True for index instruments (segment 9 tokens)."""
        return self.instrument_token & 0xFF == SEGMENT_INDICES

    @classmethod
    def from_row(cls, row: Iterable[str], reference_price: float | None = None) -> "Instrument":
        """Parse a CSV row in HEADER order; raises ValueError on a malformed row."""
        cells = tuple(row)
        if len(cells) != len(HEADER):
            raise ValueError(f"instrument row has {len(cells)} cells, expected {len(HEADER)}")
        last_price = float(cells[4] or 0)
        return cls(
            row=cells,
            instrument_token=int(cells[0]),
            exchange_token=int(cells[1]),
            tradingsymbol=cells[2],
            tick_size=float(cells[7] or 0),
            segment=cells[10],
            exchange=cells[11],
            instrument_type=cells[9],
            reference_price=last_price if reference_price is None else reference_price,
        )


def _fmt(value: float) -> str:
    return repr(float(value))


def _make(token: int, exchange_token: int, symbol: str, name: str, tick: float, lot: int,
          itype: str, segment: str, exchange: str, ref: float, expiry: str = "", strike: float = 0.0) -> Instrument:
    row = (str(token), str(exchange_token), symbol, name, "0.0", expiry, _fmt(strike), _fmt(tick),
           str(lot), itype, segment, exchange)
    return Instrument.from_row(row, reference_price=ref)


class InstrumentMaster:
    """The instrument list the simulator serves and quotes.

    ``instruments`` keeps serving order; ``by_token`` and ``by_key``
    (``EXCHANGE:TRADINGSYMBOL``) index it.  ``csv_bytes(exchange=None)``
    renders Kite's CSV (cached).
    """

    def __init__(self, instruments: list[Instrument]) -> None:
        self.instruments = instruments
        self.by_token = {i.instrument_token: i for i in instruments}
        self.by_key = {i.key: i for i in instruments}
        self._csv_cache: dict[str | None, bytes] = {}

    @classmethod
    def build(cls, kite_dir: Path | None, *, min_nse_equities: int = 10_000) -> "InstrumentMaster":
        """Load the recorded CSV samples from kite_dir (if any) and complete them.

        Rows are deduplicated by instrument_token (first seen wins); the
        reference instruments are added when absent; generated NSE equities
        fill up to ``min_nse_equities`` NSE ``EQ`` rows.  A malformed CSV
        row raises ValueError naming the file and line.
        """
        seen: dict[int, Instrument] = {}
        if kite_dir is not None:
            for name in ("instruments_all.csv", "instruments_nse.csv"):
                path = kite_dir / name
                if not path.is_file():
                    continue
                with path.open(newline="") as fh:
                    reader = csv.reader(fh)
                    header = next(reader, None)
                    if tuple(header or ()) != HEADER:
                        raise ValueError(f"{path}: header is not Kite's instrument header")
                    for lineno, row in enumerate(reader, start=2):
                        if not row:
                            continue
                        try:
                            inst = Instrument.from_row(row)
                        except ValueError as exc:
                            raise ValueError(f"{path}:{lineno}: {exc}") from exc
                        seen.setdefault(inst.instrument_token, inst)
        keys = {i.key for i in seen.values()}
        for token, et, symbol, name, tick, lot, itype, segment, exchange, ref in REFERENCE_INSTRUMENTS:
            if token not in seen and f"{exchange}:{symbol}" not in keys:
                seen[token] = _make(token, et, symbol, name, tick, lot, itype, segment, exchange, ref)
        # One currency future, to exercise the 10^7 price divisor of segment 3.
        expiry = (date.today().replace(day=1) + timedelta(days=62)).replace(day=1) - timedelta(days=3)
        cds_et = 90_001
        while (cds_et << 8 | 3) in seen:
            cds_et += 1
        seen[cds_et << 8 | 3] = _make(cds_et << 8 | 3, cds_et, "SIMUSDINRFUT", "USDINR", 0.0025, 1,
                                      "FUT", "CDS-FUT", "CDS", 83.25, expiry=expiry.isoformat())
        nse_eq = sum(1 for i in seen.values() if i.exchange == "NSE" and i.instrument_type == "EQ"
                     and not i.is_index)
        et = 100_001
        n = 0
        while nse_eq < min_nse_equities:
            token = et << 8 | 1
            et += 1
            if token in seen:
                continue
            n += 1
            symbol = f"SIMEQ{n:05d}"
            seen[token] = _make(token, et - 1, symbol, f"SIMULATED EQUITY {n:05d}", 0.05, 1,
                                "EQ", "NSE", "NSE", 0.0)
            nse_eq += 1
        return cls(list(seen.values()))

    def csv_bytes(self, exchange: str | None = None) -> bytes:
        """Return the master (or one exchange's rows) as Kite's CSV, UTF-8."""
        if exchange not in self._csv_cache:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(HEADER)
            for inst in self.instruments:
                if exchange is None or inst.exchange == exchange:
                    writer.writerow(inst.row)
            self._csv_cache[exchange] = buf.getvalue().encode()
        return self._csv_cache[exchange]

    @property
    def exchanges(self) -> set[str]:
        """Exchanges present in the master (NSE, BSE, NFO, CDS, ...)."""
        return {i.exchange for i in self.instruments}


# --------------------------------------------------------------------------
# historical candles


class HistoricalError(ValueError):
    """A historical request Kite would refuse (bad interval, dates or span)."""


def parse_kite_datetime(text: str) -> datetime:
    """Parse ``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM[:SS]`` as IST; raises HistoricalError."""
    text = (text or "").strip()
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=IST)
        except ValueError:
            continue
    raise HistoricalError(f"invalid date format: {text!r}")


class SessionCalendar:
    """NSE trading days from pandas_market_calendars (XNSE), cached per year.

    Falls back to Monday-Friday when the calendar cannot be loaded.
    """

    def __init__(self) -> None:
        self._years: dict[int, set[date]] = {}
        self._calendar = None
        self._failed = False

    def _load_year(self, year: int) -> set[date]:
        if not self._failed and self._calendar is None:
            try:
                import pandas_market_calendars as mcal

                self._calendar = mcal.get_calendar("XNSE")
            except Exception as exc:  # pragma: no cover - depends on the installation
                log.warning("event=calendar_unavailable error=%r fallback=weekdays", exc)
                self._failed = True
        if self._calendar is not None:
            sched = self._calendar.schedule(start_date=f"{year}-01-01", end_date=f"{year}-12-31")
            return {ts.date() for ts in sched.index}
        start = date(year, 1, 1)
        return {start + timedelta(days=i) for i in range(366)
                if (start + timedelta(days=i)).year == year and (start + timedelta(days=i)).weekday() < 5}

    def trading_days(self, first: date, last: date) -> list[date]:
        """Trading days in [first, last], ascending."""
        days: list[date] = []
        for year in range(first.year, last.year + 1):
            if year not in self._years:
                self._years[year] = self._load_year(year)
            days.extend(d for d in self._years[year] if first <= d <= last)
        return sorted(days)


def _day_minutes(instrument: Instrument, base_price: float, day: date) -> np.ndarray:
    """Return a (375, 5) float array of minute open/high/low/close/volume for one session."""
    n = 375
    rng = np.random.default_rng([instrument.instrument_token & 0xFFFFFFFF, day.toordinal()])
    tick = instrument.tick_size if instrument.tick_size > 0 else 0.05
    start = base_price * float(np.exp(rng.normal(0.0, 0.01)))
    closes = start * np.exp(np.cumsum(rng.normal(0.0, 0.0007, n)))
    opens = np.concatenate([[start], closes[:-1]])
    wick = np.abs(rng.normal(0.0, 0.0004, (2, n)))
    highs = np.maximum(opens, closes) * (1 + wick[0])
    lows = np.minimum(opens, closes) * (1 - wick[1])
    ohlc = np.rint(np.stack([opens, highs, lows, closes], axis=1) / tick) * tick
    ohlc = np.maximum(ohlc, tick)
    volume = np.zeros(n) if instrument.is_index else rng.integers(50, 5000, n).astype(np.float64)
    return np.column_stack([ohlc, volume])


def historical_candles(
    instrument: Instrument,
    base_price: float,
    interval: str,
    start: datetime,
    end: datetime,
    *,
    calendar: SessionCalendar,
    now: datetime,
    oi: bool = False,
    traded: Callable[[int, int], list] | None = None,
    traded_since: int | None = None,
    divisor: int = 100,
) -> list[list]:
    """Return Kite candles for [start, end] (IST datetimes), at most up to ``now``.

    Each candle is ``[timestamp, open, high, low, close, volume]`` (+ ``oi``
    when asked), timestamps ``YYYY-MM-DDTHH:MM:SS+0530``, prices in rupees
    rounded to the instrument's tick.  Intraday intervals are built from the
    minute candles, aligned to 09:15 IST; ``day`` candles are labelled
    ``T00:00:00``.

    Minutes from ``traded_since`` (epoch s) on are the candles of the trades
    the simulator generated: ``traded(first_s, last_s)`` returns them as
    :class:`feeds.sim.kite_bars.MinuteBar` (prices in units of 1/``divisor``
    rupee); a minute without a trade has no candle.  Earlier minutes (and
    every minute without ``traded``) are generated for the 09:15-15:30 IST
    sessions, deterministically per instrument and day.  Raises
    HistoricalError for an unknown interval, ``start > end`` or a span
    above Kite's maximum.
    """
    if interval not in INTERVAL_MINUTES:
        raise HistoricalError("invalid interval")
    if start > end:
        raise HistoricalError("invalid from/to: from date is after to date")
    max_days = INTERVAL_MAX_DAYS[interval]
    if (end - start) > timedelta(days=max_days):
        raise HistoricalError(f"interval exceeds max limit: {max_days} days")
    end = min(end, now)
    if start > end:
        return []
    decimals = 4 if instrument.tick_size and instrument.tick_size < 0.01 else 2
    step = INTERVAL_MINUTES[interval]
    candles: list[list] = []
    if traded is not None and traded_since is not None:
        cut = datetime.fromtimestamp(traded_since, IST)
        candles = _traded_candles(traded, traded_since, step, start, end, divisor, oi)
        if step is None:
            end = min(end, datetime.combine(cut.date(), dtime(0, 0), tzinfo=IST) - timedelta(seconds=1))
        else:
            end = min(end, cut - timedelta(minutes=step))
        if start > end:
            return candles
    generated: list[list] = []
    for day in calendar.trading_days(start.date(), end.date()):
        minutes = _day_minutes(instrument, base_price, day)
        session_start = datetime.combine(day, SESSION_OPEN, tzinfo=IST)
        if step is None:
            label = datetime.combine(day, dtime(0, 0), tzinfo=IST)
            if not (start.date() <= day <= end.date()):
                continue
            # Only sessions that have finished (or finish before now) are complete.
            available = minutes
            if end < datetime.combine(day, SESSION_CLOSE, tzinfo=IST):
                elapsed = int((end - session_start).total_seconds() // 60) + 1
                available = minutes[:max(0, min(elapsed, len(minutes)))]
            if len(available) == 0:
                continue
            groups = [(label, available)]
        else:
            groups = []
            for first in range(0, len(minutes), step):
                label = session_start + timedelta(minutes=first)
                if label < start or label > end:
                    continue
                groups.append((label, minutes[first:first + step]))
        for label, block in groups:
            candle = [
                label.strftime("%Y-%m-%dT%H:%M:%S%z"),
                round(float(block[0, 0]), decimals),
                round(float(block[:, 1].max()), decimals),
                round(float(block[:, 2].min()), decimals),
                round(float(block[-1, 3]), decimals),
                int(block[:, 4].sum()),
            ]
            if oi:
                candle.append(0)
            generated.append(candle)
    return generated + candles


_DECIMALS = {100: 2, 10_000: 4, 10_000_000: 7}


def _traded_candles(traded: Callable[[int, int], list], since: int, step: int | None, start: datetime,
                    end: datetime, divisor: int, oi: bool) -> list[list]:
    """Kite candles of ``step`` minutes (None: a day) from the simulator's
    minute candles of its generated trades, for labels in [start, end]."""
    first = max(since, int(start.timestamp()) // 60 * 60)
    if step is None:
        first = max(since, int(datetime.combine(start.date(), dtime(0, 0), tzinfo=IST).timestamp()))
    last = int(end.timestamp())
    if step is not None:
        last += 60 * (step - 1)               # a bucket labelled <= end takes minutes after it
    else:
        last = int(datetime.combine(end.date(), dtime(23, 59), tzinfo=IST).timestamp())
    bars = traded(first, last)
    digits = _DECIMALS.get(divisor, 2)
    groups: dict[datetime, list] = {}
    for b in bars:
        t = datetime.fromtimestamp(b.minute, IST)
        if step is None:
            label = datetime.combine(t.date(), dtime(0, 0), tzinfo=IST)
        else:
            open_ = datetime.combine(t.date(), SESSION_OPEN, tzinfo=IST)
            label = open_ + timedelta(minutes=((t - open_) // timedelta(minutes=1)) // step * step)
        groups.setdefault(label, []).append(b)
    out = []
    for label in sorted(groups):
        if step is None:
            if not start.date() <= label.date() <= end.date():
                continue
        elif not start <= label <= end:
            continue
        g = groups[label]
        candle = [label.strftime("%Y-%m-%dT%H:%M:%S%z"), round(g[0].open / divisor, digits),
                  round(max(b.high for b in g) / divisor, digits), round(min(b.low for b in g) / divisor, digits),
                  round(g[-1].close / divisor, digits), sum(b.volume for b in g)]
        if oi:
            candle.append(0)
        out.append(candle)
    return out
