"""Exchange calendars (feeds.calendars): sessions in UTC and exchange time, holidays, early closes,
special sessions, daylight saving time, extras, the shared thread-safe cache."""
from __future__ import annotations

import datetime as dt
import threading
from zoneinfo import ZoneInfo

import pytest

from feeds import calendars
from feeds.calendars import ExchangeCalendar, Session, UnknownCalendar, calendar

NY = ZoneInfo("America/New_York")
IST = ZoneInfo("Asia/Kolkata")
LONDON = ZoneInfo("Europe/London")
UTC = dt.timezone.utc
D = dt.date


def utc(*a) -> dt.datetime:
    return dt.datetime(*a, tzinfo=UTC)


@pytest.fixture(scope="module")
def xnys():
    return calendar("XNYS")


@pytest.fixture(scope="module")
def xnse():
    return calendar("XNSE")


def test_nyse_early_close_2024_11_29_is_210_minutes(xnys):
    s = xnys.session(D(2024, 11, 29))
    assert (s.open, s.close) == (utc(2024, 11, 29, 14, 30), utc(2024, 11, 29, 18, 0))
    assert (s.open_local.time(), s.close_local.time()) == (dt.time(9, 30), dt.time(13, 0))
    assert s.minutes == s.expected_bars == 210
    assert s.kind == "early close" and s.early_close
    assert s.describe() == "2024-11-29 09:30-13:00 EST (early close)"
    regular = xnys.session(D(2024, 11, 27))
    assert regular.minutes == 390 and regular.kind == "regular" and not regular.early_close


def test_nyse_holidays_and_weekends(xnys):
    assert xnys.session(D(2024, 11, 28)) is None                  # Thanksgiving
    assert xnys.is_holiday(D(2024, 11, 28)) and xnys.closed_reason(D(2024, 11, 28)) == "holiday"
    assert xnys.session(D(2024, 11, 30)) is None and not xnys.is_holiday(D(2024, 11, 30))
    assert xnys.closed_reason(D(2024, 11, 30)) == "weekend" and xnys.closed_reason(D(2024, 11, 29)) == ""
    assert xnys.holidays(D(2024, 1, 1), D(2024, 12, 31)) == [
        D(2024, 1, 1), D(2024, 1, 15), D(2024, 2, 19), D(2024, 3, 29), D(2024, 5, 27), D(2024, 6, 19),
        D(2024, 7, 4), D(2024, 9, 2), D(2024, 11, 28), D(2024, 12, 25)]
    assert len(xnys.sessions(D(2024, 1, 1), D(2024, 12, 31))) == 252
    assert xnys.session(D(2025, 1, 9)) is None                    # national day of mourning (special closure)


def test_xnse_muhurat_session_2024_11_01(xnse):
    s = xnse.session(D(2024, 11, 1))
    assert (s.open, s.close) == (utc(2024, 11, 1, 12, 30), utc(2024, 11, 1, 13, 30))
    assert s.open_local == dt.datetime(2024, 11, 1, 18, 0, tzinfo=IST)
    assert s.close_local == dt.datetime(2024, 11, 1, 19, 0, tzinfo=IST)
    assert s.minutes == 60 and s.kind == "special" and not s.early_close
    assert s.describe() == "2024-11-01 18:00-19:00 IST (special)"
    assert s.contains(utc(2024, 11, 1, 12, 30)) and not s.contains(utc(2024, 11, 1, 13, 30))
    assert xnse.is_holiday(D(2024, 11, 15)) and xnse.session(D(2024, 11, 14)).kind == "regular"


def test_xnse_weekend_sessions_and_regular_hours_of_their_time(xnse):
    sat = xnse.session(D(2024, 1, 20))                            # a Saturday session (NSE circular)
    assert sat.open_local.time() == dt.time(9, 15) and sat.kind == "regular"
    assert set(calendars.WEEKEND_SESSIONS["XNSE"]) <= {s.day for s in xnse.sessions(D(2023, 1, 1), D(2025, 12, 31))}
    assert xnse.is_holiday(D(2024, 1, 22)) and not xnse.is_holiday(D(2024, 1, 21))
    assert xnse.session(D(2023, 11, 12)).describe() == "2023-11-12 18:15-19:15 IST (special)"
    # before 2010-10-18 NSE opened earlier: a session at the hours then in force is regular
    old = xnse.session(D(2009, 6, 1))
    assert old.regular_open == old.open_local.time() != dt.time(9, 15) and old.kind == "regular"


def test_daylight_saving_time_changes(xnys):
    # New York: EST -> EDT on 2024-03-10, EDT -> EST on 2024-11-03; 09:30 local all along
    for day, open_utc in ((D(2024, 3, 8), 14), (D(2024, 3, 11), 13), (D(2024, 11, 1), 13), (D(2024, 11, 4), 14)):
        s = xnys.session(day)
        assert s.open == dt.datetime.combine(day, dt.time(open_utc, 30), UTC), day
        assert s.open_local.time() == dt.time(9, 30) and s.close_local.time() == dt.time(16, 0)
        assert s.minutes == 390
    assert xnys.session(D(2024, 3, 8)).describe().endswith("EST (regular)")
    assert xnys.session(D(2024, 3, 11)).describe().endswith("EDT (regular)")
    # London changes on another date (2024-03-31): in between, New York is on summer time and London is not
    xlon = calendar("XLON")
    assert xlon.session(D(2024, 3, 28)).open == utc(2024, 3, 28, 8, 0)
    assert xlon.session(D(2024, 4, 2)).open == utc(2024, 4, 2, 7, 0)
    assert xlon.session(D(2024, 4, 2)).open_local == dt.datetime(2024, 4, 2, 8, 0, tzinfo=LONDON)
    # India has no daylight saving time
    xnse = calendar("XNSE")
    assert {xnse.session(d).open.time() for d in (D(2024, 1, 2), D(2024, 7, 2))} == {dt.time(3, 45)}


def test_last_finished_started_and_settled(xnys):
    now = dt.datetime(2024, 7, 5, 16, 10, tzinfo=NY)              # 10 minutes after Friday's close
    assert xnys.last_finished(now).day == D(2024, 7, 5)
    assert xnys.last_finished(now, dt.timedelta(minutes=30)).day == D(2024, 7, 3)   # 07-04 is a holiday
    s = xnys.session(D(2024, 7, 5))
    assert s.started(now) and s.settled(now, dt.timedelta(0)) and not s.settled(now, dt.timedelta(minutes=30))


def test_extras_replace_add_and_remove_sessions_of_one_calendar_only(xnys):
    cal = ExchangeCalendar("XNYS", extra_sessions={D(2024, 7, 6): (dt.time(10, 0), dt.time(11, 0)),
                                                   D(2024, 7, 5): (dt.time(9, 30), dt.time(12, 0))},
                           extra_holidays=[D(2024, 7, 3)])
    assert cal.session(D(2024, 7, 3)) is None and cal.closed_reason(D(2024, 7, 3)) == "configured holiday"
    sat = cal.session(D(2024, 7, 6))
    assert (sat.open, sat.close, sat.kind) == (utc(2024, 7, 6, 14, 0), utc(2024, 7, 6, 15, 0), "special")
    fri = cal.session(D(2024, 7, 5))
    assert fri.kind == "early close" and fri.minutes == 150
    # the shared calendar is untouched
    assert xnys.session(D(2024, 7, 3)).kind == "early close" and xnys.session(D(2024, 7, 6)) is None
    assert xnys.session(D(2024, 7, 5)).minutes == 390
    with pytest.raises(ValueError, match="not after open"):
        ExchangeCalendar("XNYS", extra_sessions={D(2024, 7, 6): (dt.time(11, 0), dt.time(10, 0))})


def test_unknown_calendar():
    with pytest.raises(UnknownCalendar, match="NOT_A_CALENDAR"):
        ExchangeCalendar("NOT_A_CALENDAR")
    with pytest.raises(ValueError):                               # UnknownCalendar is a ValueError
        calendar("NOT_A_CALENDAR")


def test_cache_is_shared_and_each_year_built_once_under_concurrent_use(monkeypatch):
    assert calendar("XNYS") is calendar("XNYS")
    monkeypatch.setattr(calendars, "_schedules", {})              # a fresh cache for this test
    built = []
    real_build = calendars._Schedule._build

    def counting_build(self, year):
        built.append((self.name, year))
        return real_build(self, year)

    monkeypatch.setattr(calendars._Schedule, "_build", counting_build)
    start = threading.Barrier(8)
    results: list[Session | None] = [None] * 8

    def look(i: int) -> None:
        cal = ExchangeCalendar("XNYS")
        start.wait()
        results[i] = cal.session(D(2031, 6, 2))

    threads = [threading.Thread(target=look, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [("XNYS", 2031)]
    assert results[0] is not None and all(r is results[0] for r in results)
    assert len(calendars._schedules) == 1
