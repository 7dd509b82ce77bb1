"""System test: feed-backfill's timer and oneshot unit in a real systemd (tests/sdbox)."""
import pytest

from test_systemd import run_script

pytestmark = pytest.mark.system


def test_backfill_timer_and_oneshot_run_against_the_simulator():
    out = run_script("backfill.sh", timeout=600)
    passed = [ln for ln in out.splitlines() if ln.startswith("PASS")]
    for check in ("feed-backfill.timer installed", "systemd-analyze verify prints nothing",
                  "list-timers lists feed-backfill.timer", "America/New_York", "18:00 New York, a weekday",
                  "ran to completion", "systemctl status showed progress", "shows progress lines",
                  "journal summary", "none PENDING/ERROR", "second start: 0 requests", "--status as the feeds_ibkr user", "runs as its own user feeds_ibkr",
                  "DROP TABLE ibkr_bar_1min refused"):
        assert any(check in ln for ln in passed), check
