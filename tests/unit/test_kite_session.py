"""NSE sessions from the XNSE calendar, the run plan, and the two timers'
schedules (``systemd-analyze calendar``)."""
from __future__ import annotations

import re
import shutil
import subprocess
from datetime import date, datetime, time as dtime, timedelta, timezone

import pytest

from conftest import ROOT
from feeds.kite.session import IST, WEEKEND_SESSIONS, NseCalendar, Session, plan_run

UTC = timezone.utc


@pytest.fixture(scope="module")
def cal():
    return NseCalendar()


def ist(*a) -> datetime:
    return datetime(*a, tzinfo=IST)


def test_2024_skips_the_november_holidays_and_keeps_the_muhurat_session(cal):
    days = [s.day for s in cal.sessions(date(2024, 11, 1), date(2024, 11, 22))]
    assert date(2024, 11, 15) not in days and date(2024, 11, 20) not in days
    assert date(2024, 11, 14) in days and date(2024, 11, 18) in days and date(2024, 11, 21) in days
    muhurat = cal.session(date(2024, 11, 1))
    assert muhurat.open == ist(2024, 11, 1, 18, 0) and muhurat.close == ist(2024, 11, 1, 19, 0)
    assert muhurat.kind == "special" and muhurat.describe() == "2024-11-01 18:00-19:00 IST (special)"
    regular = cal.session(date(2024, 11, 14))
    assert (regular.open, regular.close, regular.kind) == (ist(2024, 11, 14, 9, 15), ist(2024, 11, 14, 15, 30),
                                                           "regular")
    assert regular.open.tzinfo == UTC


def test_2024_holidays_give_no_run_at_the_timer_time(cal):
    for d in (date(2024, 11, 15), date(2024, 11, 20)):
        p = plan_run(datetime.combine(d, dtime(9, 10), IST), cal)
        assert p.action == "none" and p.start is None
        assert p.reason == f"no NSE session on {d:%A %Y-%m-%d} (NSE holiday in the XNSE calendar)"
    p = plan_run(ist(2024, 11, 16, 9, 10), cal)
    assert p.action == "none" and "weekend" in p.reason


def test_muhurat_day_waits_for_the_evening_session_and_stops_5_minutes_after(cal):
    p = plan_run(ist(2024, 11, 1, 9, 10), cal)
    assert p.action == "collect"
    assert p.start == ist(2024, 11, 1, 17, 55)       # connect 5 minutes before the 18:00 open
    assert p.stop == ist(2024, 11, 1, 19, 5)         # stop 5 minutes after the 19:00 close
    during = plan_run(ist(2024, 11, 1, 18, 30), cal)
    assert during.action == "collect" and during.start == ist(2024, 11, 1, 18, 30) and during.stop == p.stop
    assert plan_run(ist(2024, 11, 1, 19, 5), cal).action == "over"


def test_regular_day_plan(cal):
    p = plan_run(ist(2024, 11, 18, 9, 10), cal)
    assert (p.action, p.start, p.stop) == ("collect", ist(2024, 11, 18, 9, 10), ist(2024, 11, 18, 15, 35))
    late = plan_run(ist(2024, 11, 18, 12, 0), cal)       # restarted mid-session
    assert late.start == ist(2024, 11, 18, 12, 0) and late.stop == p.stop
    after = plan_run(ist(2024, 11, 18, 16, 0), cal)
    assert after.action == "over" and "2024-11-18 09:15-15:30 IST (regular) has ended" in after.reason
    early = plan_run(ist(2024, 11, 18, 7, 0), cal, connect_before=timedelta(minutes=10))
    assert early.start == ist(2024, 11, 18, 9, 5)


def test_2024_has_the_published_number_of_sessions(cal):
    sessions = cal.sessions(date(2024, 1, 1), date(2024, 12, 31))
    # 262 weekdays less the 16 weekday closures of 2024, plus the Saturday session of
    # 2024-01-20 (the DR-drill Saturday sessions are not trading days for the collector)
    assert len(sessions) == 247
    assert all(s.open < s.close for s in sessions)
    assert [s.day for s in sessions if s.kind == "special"] == [date(2024, 11, 1)]


def test_weekend_sessions_and_operator_extras():
    base = NseCalendar()
    assert base.session(date(2024, 1, 20)).open == ist(2024, 1, 20, 9, 15)
    assert base.session(date(2023, 11, 12)).describe() == "2023-11-12 18:15-19:15 IST (special)"
    assert set(WEEKEND_SESSIONS) <= {s.day for s in base.sessions(date(2023, 1, 1), date(2025, 12, 31))}
    cal = NseCalendar(extra_sessions={date(2030, 1, 5): (dtime(10, 0), dtime(11, 0))},
                      extra_holidays=[date(2024, 11, 18)])
    assert cal.session(date(2024, 11, 18)) is None
    assert plan_run(ist(2024, 11, 18, 9, 10), cal).reason == \
        "no NSE session on Monday 2024-11-18 (holiday in kite.extra_holidays)"
    extra = cal.session(date(2030, 1, 5))
    assert isinstance(extra, Session)
    assert (extra.day, extra.open, extra.close, extra.kind) == (date(2030, 1, 5), ist(2030, 1, 5, 10, 0),
                                                                ist(2030, 1, 5, 11, 0), "special")
    assert NseCalendar().session(date(2030, 1, 5)) is None      # the extras belong to that calendar only


def test_no_calendar_collects_until_stopped():
    now = datetime.now(UTC)
    p = plan_run(now, None)
    assert (p.action, p.start, p.stop) == ("collect", now, None)
    with pytest.raises(ValueError):
        plan_run(datetime(2024, 1, 1), None)


# ---------------------------------------------------------------------------- timers

def _oncalendar(unit: str) -> list[str]:
    text = (ROOT / "systemd" / unit).read_text()
    return re.findall(r"^OnCalendar=(.+)$", text, re.M)


def _elapses(expr: str, base: str, n: int) -> list[datetime]:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    out = subprocess.run(["systemd-analyze", "calendar", f"--base-time={base}", f"--iterations={n}", expr],
                         capture_output=True, text=True, timeout=30, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w{3} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", out.stdout)
    return [datetime.fromisoformat(s).replace(tzinfo=UTC) for s in stamps]


def test_feed_zerodha_timer_mon_to_fri_0910_ist():
    assert _oncalendar("feed-zerodha.timer") == ["Mon..Fri 09:10 Asia/Kolkata"]
    got = _elapses("Mon..Fri 09:10 Asia/Kolkata", "2024-11-14 10:00 UTC", 6)
    want = [ist(2024, 11, d, 9, 10) for d in (15, 18, 19, 20, 21, 22)]     # Fri, then Mon..Fri
    assert got == want
    assert all(t.astimezone(UTC).strftime("%H:%M") == "03:40" for t in got)
    assert "Persistent=true" in (ROOT / "systemd" / "feed-zerodha.timer").read_text()


def test_feed_kite_token_timer_mon_to_fri_0800_ist_persistent():
    assert _oncalendar("feed-kite-token.timer") == ["Mon..Fri 08:00 Asia/Kolkata"]
    got = _elapses("Mon..Fri 08:00 Asia/Kolkata", "2024-11-01 12:00 UTC", 3)
    assert got == [ist(2024, 11, 4, 8, 0), ist(2024, 11, 5, 8, 0), ist(2024, 11, 6, 8, 0)]
    text = (ROOT / "systemd" / "feed-kite-token.timer").read_text()
    assert "Persistent=true" in text
    # the renewal (08:00) comes before the collector (09:10) on the same day
    z = _elapses("Mon..Fri 09:10 Asia/Kolkata", "2024-11-01 12:00 UTC", 1)[0]
    assert got[0] < z and z - got[0] == timedelta(hours=1, minutes=10)


def test_units_order_the_renewal_before_the_collector():
    z = (ROOT / "systemd" / "feed-zerodha.service").read_text()
    t = (ROOT / "systemd" / "feed-kite-token.service").read_text()
    assert re.search(r"^After=.*feed-kite-token\.service", z, re.M)
    assert re.search(r"^RestartPreventExitStatus=77 78$", z, re.M)
    assert re.search(r"^Before=feed-zerodha\.service", t, re.M) and "Type=oneshot" in t
    for text in (z, t):       # no secrets in units: only the config file path
        assert not re.search(r"(?i)password|totp_secret|api_secret|access_token=", text.replace("token renewal", ""))
