"""Exchange sessions from ``pandas_market_calendars``: one place for every
venue's trading days, holidays, early closes and special sessions.

A calendar is named as in pandas_market_calendars (ISO 10383 MIC style):
``XNYS`` (NYSE; US equities and the S&P 500 index), ``XNSE`` (National Stock
Exchange of India), ``XLON`` and every other name
:func:`calendar_names` lists.

What a calendar gives (:class:`ExchangeCalendar`):

* :meth:`~ExchangeCalendar.session`: the regular session of a local trading
  date, or None on a weekend or holiday.  Open and close are aware UTC
  datetimes (``Session.open``/``Session.close``, the close exclusive) and,
  in the exchange's own time zone, ``Session.open_local``/``close_local``.
  The conversion goes through the exchange's zone for that very date, so
  daylight saving time is right on both sides of a change (NYSE opens at
  14:30 UTC in winter, 13:30 UTC in summer; IST has no DST).
* early closes (``Session.kind == "early close"``: NYSE 13:00 on the day
  after Thanksgiving, 2024-11-29 has 210 minutes) and special sessions
  (``"special"``: a session that opens or closes outside the regular hours,
  such as NSE's Diwali Muhurat session, 2024-11-01 18:00-19:00 IST), as
  pandas_market_calendars knows them (its ``special_opens``/``special_closes``);
* holidays: days of the exchange's week (``weekmask``) without a session;
* sessions the library cannot hold: its week has no Saturday or Sunday, so
  the few weekend sessions an exchange held are listed in
  :data:`WEEKEND_SESSIONS` (per calendar), and a caller may add sessions or
  holidays announced later (``extra_sessions``, ``extra_holidays``).

Schedules are computed one calendar year at a time, once per process and
calendar name, and shared by every :class:`ExchangeCalendar` of that name;
everything here is thread-safe.  Unknown names raise
:class:`UnknownCalendar`.

Venue documents: NYSE "Holidays and Trading Hours"; NSE circulars on
trading holidays and special sessions (Muhurat trading, Saturday sessions).
"""
from __future__ import annotations

import datetime as dt
import functools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

__all__ = ["UTC", "Session", "ExchangeCalendar", "UnknownCalendar", "WEEKEND_SESSIONS", "calendar",
           "calendar_names"]

UTC = dt.timezone.utc
#: the National Stock Exchange of India's time zone (Indian Standard Time, UTC+05:30, no DST)
IST = ZoneInfo("Asia/Kolkata")

#: Sessions held on a Saturday or Sunday, which a Monday-to-Friday calendar
#: of pandas_market_calendars cannot know: calendar -> {local date: (open,
#: close) local time}.  Source: NSE circulars.
WEEKEND_SESSIONS: dict[str, dict[dt.date, tuple[dt.time, dt.time]]] = {
    "XNSE": {
        dt.date(2023, 11, 12): (dt.time(18, 15), dt.time(19, 15)),  # Sunday, Diwali Muhurat session
        dt.date(2024, 1, 20): (dt.time(9, 15), dt.time(15, 30)),    # Saturday, full session (2024-01-22 closed)
        dt.date(2025, 2, 1): (dt.time(9, 15), dt.time(15, 30)),     # Saturday, Union Budget day
    },
}

_WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


class UnknownCalendar(ValueError):
    """No exchange calendar is known for an exchange, or a calendar name is unknown."""


@dataclass(frozen=True, slots=True)
class Session:
    """One session of an exchange.

    ``day``: the local trading date; ``open``/``close``: aware UTC
    datetimes (the close is exclusive: the last one-minute bar starts one
    minute before it); ``tz``: the exchange's time zone;
    ``regular_open``/``regular_close``: the exchange's regular hours on that
    date (local wall clock), against which ``kind`` is decided.
    """

    day: dt.date
    open: dt.datetime
    close: dt.datetime
    tz: ZoneInfo
    regular_open: dt.time
    regular_close: dt.time

    @property
    def open_local(self) -> dt.datetime:
        """The open in the exchange's time zone (aware)."""
        return self.open.astimezone(self.tz)

    @property
    def close_local(self) -> dt.datetime:
        """The close in the exchange's time zone (aware)."""
        return self.close.astimezone(self.tz)

    @property
    def minutes(self) -> int:
        """Whole minutes in ``[open, close)``: 390 on a regular NYSE day, 210 on a 13:00 close."""
        return int((self.close - self.open).total_seconds() // 60)

    @property
    def expected_bars(self) -> int:
        """One-minute bars labelled by their start in ``[open, close)`` (= :attr:`minutes`)."""
        return self.minutes

    @property
    def kind(self) -> str:
        """``regular``; ``early close`` (regular open, earlier close); or
        ``special`` (opens other than at the regular open, or closes after
        the regular close: e.g. a Muhurat session)."""
        o, c = self.open_local.time(), self.close_local.time()
        if o != self.regular_open or c > self.regular_close:
            return "special"
        return "regular" if c == self.regular_close else "early close"

    @property
    def early_close(self) -> bool:
        """True when the session closes before the regular close of its date."""
        return self.close_local.time() < self.regular_close

    def started(self, now: dt.datetime) -> bool:
        """True once the session has opened (``now`` aware)."""
        return now >= self.open

    def settled(self, now: dt.datetime, settle: dt.timedelta) -> bool:
        """True once ``settle`` has passed after the close (``now`` aware)."""
        return now >= self.close + settle

    def contains(self, t: dt.datetime) -> bool:
        """True when the aware time ``t`` is in ``[open, close)``."""
        return self.open <= t < self.close

    def describe(self) -> str:
        """``2024-11-01 18:00-19:00 IST (special)``: local times and the zone's abbreviation."""
        o, c = self.open_local, self.close_local
        return f"{self.day} {o:%H:%M}-{c:%H:%M} {o:%Z} ({self.kind})"


@functools.lru_cache(maxsize=1)
def calendar_names() -> frozenset[str]:
    """Every calendar name pandas_market_calendars knows."""
    import pandas_market_calendars as mcal

    return frozenset(mcal.get_calendar_names())


class _Schedule:
    """The library's calendar of one name and its sessions, one year at a time (shared, thread-safe)."""

    def __init__(self, name: str):
        import pandas_market_calendars as mcal

        self.name = name
        self.cal = mcal.get_calendar(name)
        self.tz = ZoneInfo(str(self.cal.tz))
        self.weekdays = frozenset(_WEEKDAYS[d[:3].lower()] for d in str(self.cal.weekmask).split())
        self._opens = _regular_times(self.cal.regular_market_times["market_open"])
        self._closes = _regular_times(self.cal.regular_market_times["market_close"])
        self._years: dict[int, dict[dt.date, Session]] = {}
        self._lock = threading.Lock()

    def regular_hours(self, day: dt.date) -> tuple[dt.time, dt.time]:
        """The regular open and close (local) in force on ``day``."""
        return _in_force(self._opens, day), _in_force(self._closes, day)

    def make(self, day: dt.date, open_utc: dt.datetime, close_utc: dt.datetime) -> Session:
        ro, rc = self.regular_hours(day)
        return Session(day, open_utc, close_utc, self.tz, ro, rc)

    def year(self, year: int) -> dict[dt.date, Session]:
        got = self._years.get(year)
        if got is None:
            with self._lock:
                got = self._years.get(year)
                if got is None:
                    got = self._years[year] = self._build(year)
        return got

    def _build(self, year: int) -> dict[dt.date, Session]:
        sched = self.cal.schedule(start_date=f"{year}-01-01", end_date=f"{year}-12-31")
        out: dict[dt.date, Session] = {}
        for day, o, c in zip(sched.index, sched["market_open"], sched["market_close"], strict=True):
            d = day.date()
            out[d] = self.make(d, o.to_pydatetime().astimezone(UTC), c.to_pydatetime().astimezone(UTC))
        return out


def _regular_times(entries) -> list[tuple[dt.date | None, dt.time]]:
    """pandas_market_calendars' ``((since, time[, day offset]), ...)`` as ``[(since date or None, time)]``."""
    out = []
    for entry in entries:
        since, t = entry[0], entry[1]
        out.append((dt.date.fromisoformat(since) if since else None, t.replace(tzinfo=None)))
    return out


def _in_force(times: list[tuple[dt.date | None, dt.time]], day: dt.date) -> dt.time:
    current = times[0][1]
    for since, t in times:
        if since is None or since <= day:
            current = t
    return current


_schedules: dict[str, _Schedule] = {}
_schedules_lock = threading.Lock()


def _schedule(name: str) -> _Schedule:
    got = _schedules.get(name)
    if got is None:
        if name not in calendar_names():
            raise UnknownCalendar(f"unknown calendar {name!r} (pandas_market_calendars names, e.g. XNYS, XNSE)")
        with _schedules_lock:
            got = _schedules.get(name)
            if got is None:
                got = _schedules[name] = _Schedule(name)
    return got


class ExchangeCalendar:
    """Sessions and holidays of the exchange calendar ``name`` (e.g. ``XNYS``).

    ``extra_sessions``: ``{local date: (open, close)}`` in local wall-clock
    time; each replaces the calendar's session of that date (or adds one).
    ``extra_holidays``: local dates without a session.  Both apply on top
    of the library's calendar and :data:`WEEKEND_SESSIONS`.

    Attributes: ``name``, ``tz`` (ZoneInfo), ``weekdays`` (the exchange's
    week: ``{0..4}`` for Monday to Friday), ``regular_open`` and
    ``regular_close`` (today's regular hours, local).  Thread-safe.
    Raises :class:`UnknownCalendar` for an unknown name and ``ValueError``
    for an extra session that does not close after it opens.
    """

    def __init__(self, name: str, *, extra_sessions: Mapping[dt.date, tuple[dt.time, dt.time]] | None = None,
                 extra_holidays: Iterable[dt.date] = ()):
        self._s = _schedule(name)
        self.name = name
        self.tz: ZoneInfo = self._s.tz
        self.weekdays: frozenset[int] = self._s.weekdays
        self.regular_open, self.regular_close = self._s.regular_hours(dt.date.today())
        self.extra_holidays: frozenset[dt.date] = frozenset(extra_holidays)
        self.extra_sessions: dict[dt.date, tuple[dt.time, dt.time]] = {
            **WEEKEND_SESSIONS.get(name, {}), **(extra_sessions or {})}
        self._extra: dict[dt.date, Session] = {}
        for day, (o, c) in self.extra_sessions.items():
            o_utc = dt.datetime.combine(day, o, self.tz).astimezone(UTC)
            c_utc = dt.datetime.combine(day, c, self.tz).astimezone(UTC)
            if c_utc <= o_utc:
                raise ValueError(f"{name} session {day}: close {c:%H:%M} is not after open {o:%H:%M}")
            self._extra[day] = self._s.make(day, o_utc, c_utc)

    def session(self, day: dt.date) -> Session | None:
        """The session of local date ``day``, or None (weekend or holiday)."""
        if day in self.extra_holidays:
            return None
        extra = self._extra.get(day)
        if extra is not None:
            return extra
        return self._s.year(day.year).get(day)

    def sessions(self, first: dt.date, last: dt.date) -> list[Session]:
        """Every session from ``first`` to ``last`` inclusive, oldest first."""
        out, day = [], first
        while day <= last:
            s = self.session(day)
            if s is not None:
                out.append(s)
            day += dt.timedelta(days=1)
        return out

    def is_trading_week_day(self, day: dt.date) -> bool:
        """True for a day of the exchange's week (Monday to Friday for most)."""
        return day.weekday() in self.weekdays

    def is_holiday(self, day: dt.date) -> bool:
        """A day of the exchange's week without a session."""
        return self.is_trading_week_day(day) and self.session(day) is None

    def holidays(self, first: dt.date, last: dt.date) -> list[dt.date]:
        """The holidays (see :meth:`is_holiday`) from ``first`` to ``last`` inclusive, oldest first."""
        out, day = [], first
        while day <= last:
            if self.is_holiday(day):
                out.append(day)
            day += dt.timedelta(days=1)
        return out

    def closed_reason(self, day: dt.date) -> str:
        """Why ``day`` has no session: ``"configured holiday"``, ``"weekend"``
        or ``"holiday"`` (of the library's calendar); ``""`` when it has one."""
        if day in self.extra_holidays:
            return "configured holiday"
        if self.session(day) is not None:
            return ""
        return "holiday" if self.is_trading_week_day(day) else "weekend"

    def last_finished(self, now: dt.datetime, settle: dt.timedelta = dt.timedelta(0),
                      look_back_days: int = 30) -> Session | None:
        """The newest session whose close + ``settle`` is not after the aware
        ``now``; None when there is none in the last ``look_back_days`` days."""
        day = now.astimezone(self.tz).date()
        for _ in range(look_back_days):
            s = self.session(day)
            if s is not None and s.settled(now, settle):
                return s
            day -= dt.timedelta(days=1)
        return None


_shared: dict[str, ExchangeCalendar] = {}
_shared_lock = threading.Lock()


def calendar(name: str) -> ExchangeCalendar:
    """The process-wide :class:`ExchangeCalendar` ``name`` without extras
    (created once, thread-safe).  Raises :class:`UnknownCalendar`."""
    got = _shared.get(name)
    if got is None:
        with _shared_lock:
            got = _shared.get(name)
            if got is None:
                got = _shared[name] = ExchangeCalendar(name)
    return got


# ----------------------------------------------------------------------------- planning a collector's run

@dataclass(frozen=True)
class RunPlan:
    """What a market-hours collector started at ``now`` does.

    ``action``: ``collect`` (connect at ``start``, which may be in the
    future: wait until then; stop at ``stop``, None = until stopped),
    ``none`` (no session today: ``reason``) or ``over`` (today's collection
    window has ended).  ``window``: the collection window ``(open, close)``
    (aware UTC; extended hours included), None without a calendar;
    ``session``: the day's exchange session."""
    action: str
    reason: str
    start: dt.datetime | None = None
    stop: dt.datetime | None = None
    window: tuple[dt.datetime, dt.datetime] | None = None
    session: Session | None = None


def plan_run(now: dt.datetime, cal: ExchangeCalendar | None, *, exchange: str,
             connect_before: dt.timedelta, stop_after: dt.timedelta,
             window=None, reasons: Mapping[str, str] | None = None) -> RunPlan:
    """Plan a run started at the aware ``now``; the exchange's local date
    decides.  No session -> ``none`` ("no ``exchange`` session on <day>
    (<why>)", ``why`` from :meth:`ExchangeCalendar.closed_reason`, renamed
    by ``reasons``); past the window's close + ``stop_after`` -> ``over``;
    else ``collect`` from ``max(now, window open - connect_before)`` to
    ``window close + stop_after``.  ``window(session) -> (open, close)``
    (default: the session's hours) widens it, e.g. to extended hours.
    Without a calendar: collect at once until stopped.  Raises
    ``ValueError`` for a naive ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if cal is None:
        return RunPlan("collect", "no session calendar: collecting until stopped", now, None)
    day = now.astimezone(cal.tz).date()
    s = cal.session(day)
    if s is None:
        why = cal.closed_reason(day)
        return RunPlan("none", f"no {exchange} session on {day:%A %Y-%m-%d} ({(reasons or {}).get(why, why)})")
    w = window(s) if window is not None else (s.open, s.close)
    what = f"session {s.describe()}"
    if w != (s.open, s.close):
        what += f", extended hours {w[0].astimezone(cal.tz):%H:%M}-{w[1].astimezone(cal.tz):%H:%M}"
    stop = w[1] + stop_after
    if now >= stop:
        return RunPlan("over", f"today's {what} has ended", session=s, window=w)
    return RunPlan("collect", what, max(now, w[0] - connect_before), stop, w, s)
