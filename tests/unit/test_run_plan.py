"""The run planner shared by the market-hours collectors (feeds.calendars.plan_run) and what a
program does with its plan before connecting (feeds.service.run_time / plan_or_exit)."""
import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from feeds import service
from feeds.calendars import ExchangeCalendar, plan_run
from feeds.config import ConfigError

NY = ZoneInfo("America/New_York")
IST = ZoneInfo("Asia/Kolkata")
MIN = dt.timedelta(minutes=1)


def test_run_time_reads_a_naive_at_in_the_exchange_zone_and_names_the_option_when_bad():
    assert service.run_time("2026-11-27T09:20", NY) == dt.datetime(2026, 11, 27, 9, 20, tzinfo=NY)
    assert service.run_time("2026-11-27T09:20+00:00", NY).utcoffset() == dt.timedelta(0)
    assert service.run_time(None, NY).tzinfo is not None
    with pytest.raises(ConfigError) as e:
        service.run_time("Friday", NY)
    assert "--at" in str(e.value) and "Friday" in str(e.value)


def test_at_prints_the_early_close_plan_in_the_exchange_zone_and_exits_0(capsys):
    plan = plan_run(dt.datetime(2026, 11, 27, 9, 20, tzinfo=NY), ExchangeCalendar("XNYS"), exchange="NYSE",
                    connect_before=10 * MIN, stop_after=5 * MIN)
    with pytest.raises(SystemExit) as e:
        service.plan_or_exit(plan, "2026-11-27T09:20", NY, "New York")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "early close" in out and out.rstrip().endswith(
        "connect at 2026-11-27 09:20 New York, stop at 2026-11-27 13:05 New York")


def test_a_holiday_exits_0_with_the_reason_and_a_session_day_goes_on(capsys):
    cal = ExchangeCalendar("XNSE")
    holiday = plan_run(dt.datetime(2024, 11, 15, 9, 10, tzinfo=IST), cal, exchange="NSE",
                       connect_before=5 * MIN, stop_after=5 * MIN)
    assert holiday.action == "none" and holiday.reason.startswith("no NSE session on Friday 2024-11-15")
    with pytest.raises(SystemExit) as e:
        service.plan_or_exit(holiday, None, IST, "IST")
    assert e.value.code == 0
    day = plan_run(dt.datetime(2024, 11, 18, 9, 10, tzinfo=IST), cal, exchange="NSE",
                   connect_before=5 * MIN, stop_after=5 * MIN)
    assert day.action == "collect" and day.start == dt.datetime(2024, 11, 18, 9, 10, tzinfo=IST)
    assert day.stop == dt.datetime(2024, 11, 18, 15, 35, tzinfo=IST)
    assert service.plan_or_exit(day, None, IST, "IST") is None


def test_a_wider_window_is_described_and_planned_from_its_own_edges():
    cal = ExchangeCalendar("XNYS")
    day = dt.datetime(2026, 12, 1, 3, 0, tzinfo=NY)
    p = plan_run(day, cal, exchange="NYSE", connect_before=10 * MIN, stop_after=0 * MIN,
                 window=lambda s: (s.open - 330 * MIN, s.close + 240 * MIN))
    assert p.reason.endswith("extended hours 04:00-20:00")
    assert p.start == dt.datetime(2026, 12, 1, 3, 50, tzinfo=NY) and p.stop == dt.datetime(2026, 12, 1, 20, 0, tzinfo=NY)
    over = plan_run(dt.datetime(2026, 12, 1, 20, 0, tzinfo=NY), cal, exchange="NYSE", connect_before=10 * MIN,
                    stop_after=0 * MIN, window=lambda s: (s.open - 330 * MIN, s.close + 240 * MIN))
    assert over.action == "over"
    with pytest.raises(ValueError):
        plan_run(dt.datetime(2026, 12, 1, 9, 0), cal, exchange="NYSE", connect_before=MIN, stop_after=MIN)
