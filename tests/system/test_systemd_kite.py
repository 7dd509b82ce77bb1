"""System test: the Kite units in a real systemd (tests/sdbox), against the simulator."""
import pytest

from test_systemd import run_script

pytestmark = pytest.mark.system


def test_kite_timers_renewal_collector_journal():
    out = run_script("kite.sh", timeout=600)
    passed = [ln for ln in out.splitlines() if ln.startswith("PASS")]
    for check in ("list-timers: ", "feed-kite-token.timer next: ", "feed-zerodha.timer next: ",
                  "token obtained in headless Chromium", "token file mode 0600, owner feeds_kite",
                  "as feeds_binance, reading the Kite token and secrets fails", "feed-zerodha active",
                  "runs as its own unprivileged user feeds_kite", "heartbeat row: running",
                  "TRUNCATE kite_tick_full refused", "kite_instrument upserted by role feeds_kite",
                  "the renewal ran first", "ticks in PostgreSQL, growing", "journalctl -u feed-zerodha shows start-up",
                  "systemctl status line", "clean exit", "missing token: exit 77, not restarted",
                  "day without a session: exited at once with success"):
        assert any(check in ln for ln in passed), check
    assert sum("list-timers: " in ln for ln in passed) == 2
