"""Exchange sessions for the IBKR backfill, from ``pandas_market_calendars``.

A contract's calendar is chosen from its exchange (for STK the primary
exchange when given, since ``SMART`` is a router, not a market):

* NYSE, NASDAQ (ISLAND), ARCA, AMEX, BATS, IEX, SMART stocks: ``XNYS``
  (US equities share the NYSE holidays and half days).
* IND ``SPX`` (exchange CBOE): ``XNYS`` as well.  The S&P 500 is computed
  from its constituents' prices while the NYSE is open, so its one-minute
  TRADES bars exist exactly during the NYSE regular session: 09:30-16:00
  America/New_York, 09:30-13:00 on early closes.  CBOE's own calendars in
  pandas_market_calendars describe the index *options* hours (to 16:15),
  which would expect 15 bars IB never sends for the index.  IB's
  ``useRTH=1`` answer for SPX on a regular day is 390 bars, 09:30 to 15:59.

The contracts file may name another calendar in its ``calendar`` column.

Expected bars: one per minute from the session open up to (not including)
the close, bars being labelled by their start: 390 on a regular NYSE day,
210 on an early close at 13:00.  A weekday without a session is a holiday
(recorded as HOLIDAY, never requested).  Weekends are not sessions and are
not recorded at all.
"""
from __future__ import annotations

import datetime as dt
import functools
import threading
from dataclasses import dataclass
from zoneinfo import ZoneInfo

__all__ = ["Session", "SessionCalendar", "calendar_name_for", "calendar_names", "CALENDAR_BY_EXCHANGE",
           "UnknownCalendar"]

#: Exchange (IB's name) -> pandas_market_calendars calendar.
CALENDAR_BY_EXCHANGE: dict[str, str] = {
    "NYSE": "XNYS", "NASDAQ": "XNYS", "ISLAND": "XNYS", "ARCA": "XNYS", "AMEX": "XNYS",
    "BATS": "XNYS", "IEX": "XNYS", "SMART": "XNYS", "CBOE": "XNYS",
}


class UnknownCalendar(ValueError):
    """No exchange calendar is known for an exchange, or a calendar name is unknown."""


@dataclass(frozen=True, slots=True)
class Session:
    """One regular session of an exchange.

    ``day``: the local trading date; ``open``/``close``: aware UTC datetimes
    (the close is exclusive: the last one-minute bar starts one minute
    before it); ``regular_close``: the calendar's usual close time (local);
    ``tz``: the calendar's time zone.
    """

    day: dt.date
    open: dt.datetime
    close: dt.datetime
    tz: ZoneInfo
    regular_close: dt.time

    @property
    def expected_bars(self) -> int:
        """One-minute bars in [open, close): 390 regular, 210 on a 13:00 close."""
        return int((self.close - self.open).total_seconds() // 60)

    @property
    def early_close(self) -> bool:
        """True when the session closes before the calendar's regular close."""
        return self.close.astimezone(self.tz).time() < self.regular_close

    def settled(self, now: dt.datetime, settle: dt.timedelta) -> bool:
        """True once ``settle`` has passed after the close (IB's bars are final)."""
        return now >= self.close + settle

    def started(self, now: dt.datetime) -> bool:
        return now >= self.open


@functools.lru_cache(maxsize=1)
def calendar_names() -> frozenset[str]:
    """Every calendar name pandas_market_calendars knows."""
    import pandas_market_calendars as mcal

    return frozenset(mcal.get_calendar_names())


def calendar_name_for(sec_type: str, exchange: str, primary_exchange: str = "", override: str = "") -> str:
    """The calendar for a contract (see the module docstring).

    Raises :class:`UnknownCalendar` when ``override`` is not a known
    calendar, or no calendar is mapped for the exchange.
    """
    if override:
        if override not in calendar_names():
            raise UnknownCalendar(f"unknown calendar {override!r} (pandas_market_calendars names, e.g. XNYS)")
        return override
    for ex in ((primary_exchange, exchange) if sec_type == "STK" else (exchange, primary_exchange)):
        name = CALENDAR_BY_EXCHANGE.get(ex.upper()) if ex else None
        if name:
            return name
    raise UnknownCalendar(f"no exchange calendar known for exchange {exchange!r}"
                          f"{f' / primaryExchange {primary_exchange!r}' if primary_exchange else ''}; "
                          "name one in the calendar column")


class SessionCalendar:
    """Sessions and holidays of one exchange calendar (e.g. ``XNYS``).

    Schedules are computed one calendar year at a time and cached;
    thread-safe.  Raises :class:`UnknownCalendar` for an unknown name.
    """

    def __init__(self, name: str = "XNYS"):
        import pandas_market_calendars as mcal

        if name not in calendar_names():
            raise UnknownCalendar(f"unknown calendar {name!r}")
        self.name = name
        self._cal = mcal.get_calendar(name)
        self.tz = ZoneInfo(str(self._cal.tz))
        self.regular_close: dt.time = self._cal.close_time
        self._years: dict[int, dict[dt.date, Session]] = {}
        self._lock = threading.Lock()

    def _year(self, year: int) -> dict[dt.date, Session]:
        got = self._years.get(year)
        if got is None:
            with self._lock:
                got = self._years.get(year)
                if got is None:
                    got = self._years[year] = self._build(year)
        return got

    def _build(self, year: int) -> dict[dt.date, Session]:
        sched = self._cal.schedule(start_date=f"{year}-01-01", end_date=f"{year}-12-31")
        out: dict[dt.date, Session] = {}
        for day, o, c in zip(sched.index, sched["market_open"], sched["market_close"], strict=True):
            out[day.date()] = Session(day.date(), o.to_pydatetime().astimezone(dt.timezone.utc),
                                      c.to_pydatetime().astimezone(dt.timezone.utc), self.tz,
                                      self.regular_close)
        return out

    def session(self, day: dt.date) -> Session | None:
        """The session of local date ``day``, or None (weekend or holiday)."""
        return self._year(day.year).get(day)

    def is_holiday(self, day: dt.date) -> bool:
        """A weekday without a session."""
        return day.weekday() < 5 and self.session(day) is None

    def days(self, first: dt.date, last: dt.date) -> list[tuple[dt.date, Session | None]]:
        """Every weekday in ``[first, last]``, newest first, with its session
        (None on a holiday)."""
        out = []
        day = last
        while day >= first:
            if day.weekday() < 5:
                out.append((day, self.session(day)))
            day -= dt.timedelta(days=1)
        return out

    def last_finished(self, now: dt.datetime, settle: dt.timedelta = dt.timedelta(0)) -> Session | None:
        """The newest session whose close + ``settle`` is not after ``now``
        (aware); None when none in the last 30 days."""
        day = now.astimezone(self.tz).date()
        for _ in range(30):
            s = self.session(day)
            if s is not None and s.settled(now, settle):
                return s
            day -= dt.timedelta(days=1)
        return None
