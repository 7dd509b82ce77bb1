"""NSE sessions: when feed-zerodha collects, from the XNSE calendar of
:mod:`feeds.calendars` (pandas_market_calendars).

The calendar carries NSE's holidays, early closes and special sessions on
weekdays, such as the Diwali Muhurat session (2024-11-01, 18:00-19:00 IST).
It has no weekend sessions of its own (its week is Monday to Friday), so the
few special sessions NSE held on a Saturday or Sunday are listed in
:data:`feeds.calendars.WEEKEND_SESSIONS` (re-exported here as
:data:`WEEKEND_SESSIONS`); operators add sessions announced later (or remove
days) with ``extra_sessions`` / ``extra_holidays`` in ``kite.toml``.

A run of the collector is planned by :func:`plan_run`: on a day without a
session it ends at once (a holiday is not a failure); before the session it
waits until ``connect_before`` ahead of the open; it stops ``stop_after``
(5 minutes) after the close.  Times are aware datetimes in UTC; NSE's
sessions are written in IST (Asia/Kolkata, no daylight saving time).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import date, datetime, time as dtime, timedelta, timezone

from ..calendars import IST
from .. import calendars
from ..calendars import RunPlan, Session

__all__ = ["IST", "UTC", "WEEKEND_SESSIONS", "Session", "NseCalendar", "RunPlan", "plan_run"]

log = logging.getLogger(__name__)

UTC = timezone.utc

#: Special sessions NSE held on a Saturday or Sunday (NSE circulars), which
#: the Monday-to-Friday XNSE calendar cannot know: date -> (open, close) IST
#: (kept in :data:`feeds.calendars.WEEKEND_SESSIONS`).
WEEKEND_SESSIONS: dict[date, tuple[dtime, dtime]] = calendars.WEEKEND_SESSIONS["XNSE"]


class NseCalendar(calendars.ExchangeCalendar):
    """NSE sessions: the ``XNSE`` calendar of :mod:`feeds.calendars` (with
    :data:`WEEKEND_SESSIONS`) plus the operator's extras from ``kite.toml``.

    ``extra_sessions``: ``{date: (open, close)}`` in IST (replaces the
    calendar's session that day); ``extra_holidays``: dates without a
    session.  :meth:`session` returns the day's
    :class:`~feeds.calendars.Session` (``kind``: ``regular``, ``early
    close`` or ``special`` for a session that does not open at 09:15 IST)
    or None.
    """

    def __init__(self, extra_sessions: dict[date, tuple[dtime, dtime]] | None = None,
                 extra_holidays: Iterable[date] = ()):
        super().__init__("XNSE", extra_sessions=extra_sessions, extra_holidays=extra_holidays)

    def closed_reason(self, day: date) -> str:
        """Why ``day`` has no session: weekend, calendar holiday or configured holiday."""
        reason = super().closed_reason(day)
        if reason == "configured holiday":
            return "holiday in kite.extra_holidays"
        if reason == "weekend":
            return "weekend in the XNSE calendar"
        return "NSE holiday in the XNSE calendar"


def plan_run(now: datetime, calendar: NseCalendar | None, *, connect_before: timedelta = timedelta(minutes=5),
             stop_after: timedelta = timedelta(minutes=5)) -> RunPlan:
    """Plan a run of the collector started at ``now`` (aware); see
    :func:`feeds.calendars.plan_run`.  With ``calendar`` None (no calendar:
    demos against the simulator) it collects at once until stopped;
    otherwise the IST date of ``now`` decides."""
    return calendars.plan_run(now, calendar, exchange="NSE", connect_before=connect_before, stop_after=stop_after)
