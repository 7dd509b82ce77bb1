"""feed-ibkr.timer: every OnCalendar= elapse falls on a New York weekday before the 09:30 open,
winter (EST) and summer (EDT) alike, and never on a Saturday or Sunday (``systemd-analyze calendar``)."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from datetime import datetime, time as dtime, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import ROOT

UTC = timezone.utc
NY = ZoneInfo("America/New_York")
TIMER = ROOT / "systemd" / "feed-ibkr.timer"
OPEN = dtime(9, 30)

pytestmark = pytest.mark.skipif(not TIMER.exists(), reason="systemd/feed-ibkr.timer not present")


def _oncalendar() -> list[str]:
    return re.findall(r"^OnCalendar=(.+)$", TIMER.read_text(), re.M)


def _elapses(expr: str, base: str, n: int) -> list[datetime]:
    """The next ``n`` elapses of ``expr`` after ``base`` (UTC), as aware UTC datetimes."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    out = subprocess.run(["systemd-analyze", "calendar", f"--base-time={base}", f"--iterations={n}", expr],
                         capture_output=True, text=True, timeout=30, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"})
    if "--base-time" in out.stderr or "unrecognized option" in out.stderr:
        pytest.skip("systemd-analyze too old for --base-time")
    assert out.returncode == 0, out.stderr
    stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w{3} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", out.stdout)
    assert len(stamps) == n, out.stdout
    return [datetime.fromisoformat(s).replace(tzinfo=UTC) for s in stamps]


def test_timer_is_written_in_new_york_time():
    exprs = _oncalendar()
    assert exprs, "no OnCalendar= in feed-ibkr.timer"
    for expr in exprs:
        assert "America/New_York" in expr, expr    # right across daylight saving time, whatever the machine's zone
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(TIMER)
    assert cp["Install"]["WantedBy"] == "timers.target"


@pytest.mark.parametrize("base", [
    "2024-01-05 18:00 UTC",     # Friday afternoon in winter (EST): next are Monday..Friday
    "2024-01-06 12:00 UTC",     # Saturday
    "2024-07-05 18:00 UTC",     # Friday afternoon in summer (EDT)
    "2024-03-08 12:00 UTC",     # the Friday before the spring change (second Sunday of March)
    "2024-10-31 20:00 UTC",     # the week of the autumn change (first Sunday of November)
])
def test_next_elapses_are_weekdays_before_the_open(base):
    for expr in _oncalendar():
        got = _elapses(expr, base, 10)
        for t in got:
            ny = t.astimezone(NY)
            assert ny.weekday() < 5, f"{expr}: elapse {t} is a {ny:%A} in New York"
            assert ny.time() < OPEN, f"{expr}: elapse {t} is {ny:%H:%M} New York, not before 09:30"
        days = [t.astimezone(NY).date() for t in got]
        assert len(set(days)) == len(days), f"{expr}: more than one elapse a day: {got}"


def test_every_weekday_has_an_elapse_and_no_weekend_day():
    """Two weeks from a Sunday: exactly the ten weekdays, one elapse each (all lines together)."""
    base = "2024-06-02 12:00 UTC"                      # Sunday
    got = sorted({t.astimezone(NY).date() for expr in _oncalendar() for t in _elapses(expr, base, 10)})
    assert [d.isoweekday() for d in got] == [1, 2, 3, 4, 5] * 2, got
