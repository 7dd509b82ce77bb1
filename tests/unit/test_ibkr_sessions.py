"""Exchange calendar checks: 390 bars on a regular NYSE day, 210 on an early close, holidays."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from feeds.ibkr.sessions import SessionCalendar, UnknownCalendar, calendar_name_for

NY = ZoneInfo("America/New_York")
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def xnys():
    return SessionCalendar("XNYS")


def test_regular_session_390_bars_in_utc(xnys):
    s = xnys.session(dt.date(2019, 11, 5))
    assert s.expected_bars == 390 and not s.early_close
    assert s.open == dt.datetime(2019, 11, 5, 14, 30, tzinfo=UTC)   # 09:30 EST
    assert s.close == dt.datetime(2019, 11, 5, 21, 0, tzinfo=UTC)   # 16:00 EST
    summer = xnys.session(dt.date(2024, 6, 3))
    assert summer.open.astimezone(NY).time() == dt.time(9, 30) and summer.open.hour == 13  # EDT
    assert summer.expected_bars == 390


@pytest.mark.parametrize("day", ["2024-07-03", "2024-11-29", "2024-12-24", "2019-11-29", "2019-12-24"])
def test_early_closes_210_bars(xnys, day):
    s = xnys.session(dt.date.fromisoformat(day))
    assert s.expected_bars == 210 and s.early_close
    assert s.close.astimezone(NY).time() == dt.time(13, 0)


@pytest.mark.parametrize("day", ["2024-01-01", "2024-01-15", "2024-02-19", "2024-03-29", "2024-05-27",
                                 "2024-06-19", "2024-07-04", "2024-09-02", "2024-11-28", "2024-12-25",
                                 "2025-01-09"])
def test_holidays(xnys, day):
    d = dt.date.fromisoformat(day)
    assert xnys.session(d) is None and xnys.is_holiday(d)


def test_year_2024_counts_and_order(xnys):
    days = xnys.days(dt.date(2024, 1, 1), dt.date(2024, 12, 31))
    assert [d for d, _ in days] == sorted((d for d, _ in days), reverse=True)   # newest first
    assert all(d.weekday() < 5 for d, _ in days)                               # weekends not listed
    sessions = [s for _, s in days if s is not None]
    assert len(sessions) == 252 and len(days) - len(sessions) == 10
    assert sorted(s.day.isoformat() for s in sessions if s.early_close) == ["2024-07-03", "2024-11-29", "2024-12-24"]
    assert sum(s.expected_bars for s in sessions) == 249 * 390 + 3 * 210


def test_last_finished_and_settle(xnys):
    # Friday 2024-07-05 16:10 New York: Friday's session closed 10 minutes ago.
    now = dt.datetime(2024, 7, 5, 16, 10, tzinfo=NY)
    assert xnys.last_finished(now).day == dt.date(2024, 7, 5)
    assert xnys.last_finished(now, dt.timedelta(minutes=30)).day == dt.date(2024, 7, 3)  # 07-04 holiday
    # Sunday: Friday's session
    assert xnys.last_finished(dt.datetime(2024, 7, 7, 12, 0, tzinfo=NY)).day == dt.date(2024, 7, 5)
    s = xnys.session(dt.date(2024, 7, 5))
    assert s.started(now) and not s.settled(now, dt.timedelta(minutes=30)) and s.settled(now, dt.timedelta(0))


def test_calendar_choice():
    assert calendar_name_for("STK", "SMART", "NASDAQ") == "XNYS"
    assert calendar_name_for("STK", "SMART", "ARCA") == "XNYS"
    assert calendar_name_for("STK", "NYSE") == "XNYS"
    assert calendar_name_for("IND", "CBOE") == "XNYS"   # SPX: NYSE regular hours, 390 bars
    assert calendar_name_for("STK", "LSE", "", "XLON") == "XLON"
    with pytest.raises(UnknownCalendar):
        calendar_name_for("STK", "LSE")
    with pytest.raises(UnknownCalendar):
        calendar_name_for("STK", "SMART", "NASDAQ", "NOT_A_CALENDAR")
