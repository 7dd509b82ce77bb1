"""NSE sessions: when feed-zerodha collects, from the XNSE calendar of
pandas_market_calendars.

The calendar carries NSE's holidays, early closes and special sessions on
weekdays, such as the Diwali Muhurat session (2024-11-01, 18:00-19:00 IST).
It has no weekend sessions at all (its week is Monday to Friday), so the few
special sessions NSE held on a Saturday or Sunday are listed here in
:data:`WEEKEND_SESSIONS`; operators add sessions announced later (or remove
days) with ``extra_sessions`` / ``extra_holidays`` in ``kite.toml``.

A run of the collector is planned by :func:`plan_run`: on a day without a
session it ends at once (a holiday is not a failure); before the session it
waits until ``connect_before`` ahead of the open; it stops ``stop_after``
(5 minutes) after the close.  Times are aware datetimes in UTC; NSE's
sessions are written in IST (Asia/Kolkata, no daylight saving time).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timedelta, timezone
from zoneinfo import ZoneInfo

log = logging.getLogger(__name__)

IST = ZoneInfo("Asia/Kolkata")
UTC = timezone.utc

#: Special sessions NSE held on a Saturday or Sunday (NSE circulars), which
#: the Monday-to-Friday XNSE calendar cannot know: date -> (open, close) IST.
WEEKEND_SESSIONS: dict[date, tuple[dtime, dtime]] = {
    date(2023, 11, 12): (dtime(18, 15), dtime(19, 15)),   # Sunday, Diwali Muhurat session
    date(2024, 1, 20): (dtime(9, 15), dtime(15, 30)),     # Saturday, full session (2024-01-22 closed instead)
    date(2025, 2, 1): (dtime(9, 15), dtime(15, 30)),      # Saturday, Union Budget day
}


@dataclass(frozen=True)
class Session:
    """One trading session: ``day`` (IST date), ``open`` and ``close``
    (aware UTC datetimes) and ``kind`` (``regular``, ``early close``,
    ``special`` for a session that does not open at 09:15 IST)."""
    day: date
    open: datetime
    close: datetime
    kind: str = "regular"

    def describe(self) -> str:
        o, c = self.open.astimezone(IST), self.close.astimezone(IST)
        return f"{self.day} {o:%H:%M}-{c:%H:%M} IST ({self.kind})"


class NseCalendar:
    """NSE sessions from pandas_market_calendars' ``XNSE`` plus
    :data:`WEEKEND_SESSIONS` and the operator's extras.

    ``extra_sessions``: ``{date: (open, close)}`` in IST (replaces the
    calendar's session that day); ``extra_holidays``: dates without a
    session.  :meth:`session` returns the day's :class:`Session` or None.
    """

    REGULAR_OPEN = dtime(9, 15)
    REGULAR_CLOSE = dtime(15, 30)

    def __init__(self, extra_sessions: dict[date, tuple[dtime, dtime]] | None = None,
                 extra_holidays: Iterable[date] = ()):
        import pandas_market_calendars as pmc
        self._cal = pmc.get_calendar("XNSE")
        self.extra_sessions = {**WEEKEND_SESSIONS, **(extra_sessions or {})}
        self.extra_holidays = set(extra_holidays)

    @functools.lru_cache(maxsize=8)
    def _year(self, year: int) -> dict[date, tuple[datetime, datetime]]:
        sched = self._cal.schedule(f"{year}-01-01", f"{year}-12-31")
        out = {}
        for day, row in sched.iterrows():
            out[day.date()] = (row["market_open"].to_pydatetime().astimezone(UTC),
                               row["market_close"].to_pydatetime().astimezone(UTC))
        return out

    def session(self, day: date) -> Session | None:
        """The session on ``day`` (an IST date), or None (weekend, holiday)."""
        if day in self.extra_holidays:
            return None
        extra = self.extra_sessions.get(day)
        if extra is not None:
            o = datetime.combine(day, extra[0], IST).astimezone(UTC)
            c = datetime.combine(day, extra[1], IST).astimezone(UTC)
            return Session(day, o, c, self._kind(o, c))
        oc = self._year(day.year).get(day)
        if oc is None:
            return None
        return Session(day, oc[0], oc[1], self._kind(*oc))

    def closed_reason(self, day: date) -> str:
        """Why ``day`` has no session: weekend, calendar holiday or configured holiday."""
        if day in self.extra_holidays:
            return "holiday in kite.extra_holidays"
        if day.weekday() >= 5:
            return "weekend in the XNSE calendar"
        return "NSE holiday in the XNSE calendar"

    def _kind(self, o: datetime, c: datetime) -> str:
        oi, ci = o.astimezone(IST).time(), c.astimezone(IST).time()
        if oi != self.REGULAR_OPEN:
            return "special"
        return "regular" if ci == self.REGULAR_CLOSE else "early close"

    def sessions(self, first: date, last: date) -> list[Session]:
        """Every session from ``first`` to ``last`` inclusive, in order."""
        out, d = [], first
        while d <= last:
            s = self.session(d)
            if s is not None:
                out.append(s)
            d += timedelta(days=1)
        return out


@dataclass(frozen=True)
class RunPlan:
    """What a run started at ``now`` does.

    ``action``: ``collect`` (from ``start`` to ``stop``; ``start`` may be in
    the future: wait until then), ``none`` (no session today: ``reason``),
    or ``over`` (today's session has ended).  ``session`` is today's session
    when there is one.  ``stop`` None means "until stopped".
    """
    action: str
    reason: str
    start: datetime | None = None
    stop: datetime | None = None
    session: Session | None = None


def plan_run(now: datetime, calendar: NseCalendar | None, *, connect_before: timedelta = timedelta(minutes=5),
             stop_after: timedelta = timedelta(minutes=5)) -> RunPlan:
    """Plan a run of the collector started at ``now`` (aware).

    With ``calendar`` None (no calendar: demos against the simulator) it
    collects at once until stopped.  Otherwise the IST date of ``now``
    decides: no session -> ``none``; past ``close + stop_after`` ->
    ``over``; else ``collect`` from ``max(now, open - connect_before)`` to
    ``close + stop_after``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if calendar is None:
        return RunPlan("collect", "no session calendar: collecting until stopped", now, None)
    day = now.astimezone(IST).date()
    s = calendar.session(day)
    if s is None:
        return RunPlan("none", f"no NSE session on {day:%A %Y-%m-%d} ({calendar.closed_reason(day)})")
    stop = s.close + stop_after
    if now >= stop:
        return RunPlan("over", f"today's session {s.describe()} has ended", session=s)
    start = max(now, s.open - connect_before)
    return RunPlan("collect", f"session {s.describe()}", start, stop, s)
