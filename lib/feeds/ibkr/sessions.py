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
Sessions, holidays and early closes come from :mod:`feeds.calendars`.

Expected bars: one per minute from the session open up to (not including)
the close, bars being labelled by their start: 390 on a regular NYSE day,
210 on an early close at 13:00.  A weekday without a session is a holiday
(recorded as HOLIDAY, never requested).  Weekends are not sessions and are
not recorded at all.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ..backfill import calendar_days, calendar_span
from ..backfill import request_chunks as _chunks
from ..calendars import ExchangeCalendar, Session, UnknownCalendar, calendar_names

__all__ = ["Session", "SessionCalendar", "calendar_name_for", "calendar_names", "CALENDAR_BY_EXCHANGE",
           "UnknownCalendar", "request_chunks", "duration_days", "duration_str", "consecutive_days"]

#: Exchange (IB's name) -> pandas_market_calendars calendar.
CALENDAR_BY_EXCHANGE: dict[str, str] = {
    "NYSE": "XNYS", "NASDAQ": "XNYS", "ISLAND": "XNYS", "ARCA": "XNYS", "AMEX": "XNYS",
    "BATS": "XNYS", "IEX": "XNYS", "SMART": "XNYS", "CBOE": "XNYS",
}


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


class SessionCalendar(ExchangeCalendar):
    """Sessions and holidays of one exchange calendar (e.g. ``XNYS``), from
    :class:`feeds.calendars.ExchangeCalendar` (cached per year, shared,
    thread-safe), with the backfill's view of the days to consider
    (:meth:`days`).  Raises :class:`UnknownCalendar` for an unknown name.
    """

    def __init__(self, name: str = "XNYS"):
        super().__init__(name)

    def days(self, first: dt.date, last: dt.date) -> list[tuple[dt.date, Session | None]]:
        """Every day of the exchange's week in ``[first, last]`` (and any
        weekend session), newest first, with its session (None on a
        holiday): :func:`feeds.backfill.calendar_days`."""
        return calendar_days(self, first, last)


def duration_days(sessions: Sequence[Session]) -> int:
    """IB's ``durationStr`` days (``"N D"``) of a request ending at the
    close of the newest of ``sessions`` and reaching back to the oldest:
    the calendar days from the oldest session's date to the newest's, both
    included.  For a chunk of :func:`request_chunks` (sessions on
    consecutive weekdays) this is also the number of weekdays and of
    sessions it covers."""
    days = [s.day for s in sessions]
    return (max(days) - min(days)).days + 1


def duration_str(sessions: Sequence[Session]) -> str:
    """``durationStr`` of a request covering ``sessions``: ``"N D"`` (:func:`duration_days`)."""
    return f"{duration_days(sessions)} D"


def consecutive_days(older: Session, newer: Session) -> bool:
    """True when ``older`` is the session of the weekday just before
    ``newer``'s (both Monday to Friday): no weekend, holiday or other day
    lies between them."""
    return (newer.day - older.day).days == 1 and newer.day.weekday() < 5 and older.day.weekday() < 5


def request_chunks(sessions: Sequence[Session], days: int) -> list[list[Session]]:
    """Sessions to fetch (newest first) cut into requests (newest first
    inside) by :func:`feeds.backfill.request_chunks` with IB's rule: a
    request holds at most ``days`` sessions, on consecutive calendar days,
    Monday to Friday (:func:`consecutive_days`), so it never spans a
    weekend, a holiday or a session not to fetch.

    IB's "Historical Data Limitations" page does not say whether ``"N D"``
    counts calendar days, weekdays or trading sessions; on such a chunk
    the three readings are the same N (:func:`duration_days`), so the
    request ending at the newest session's close covers exactly the
    chunk's sessions whichever IB applies.  ``days`` 1: one session a
    request."""
    return _chunks(sessions, days, calendar_span, consecutive_days)
