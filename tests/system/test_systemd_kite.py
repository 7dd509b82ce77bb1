"""System test: the Kite units in a real systemd (tests/sdbox), against the simulator."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.system


def test_kite_timers_renewal_collector_journal():
    if os.geteuid() != 0:
        pytest.skip("system tests need root (they boot systemd in namespaces)")
    for tool in ("nsenter", "unshare", "script", "systemd-analyze"):
        if not shutil.which(tool):
            pytest.skip(f"system tests need {tool}")
    p = subprocess.run(["bash", str(ROOT / "tests" / "system" / "kite.sh")], capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    print(out)
    if p.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert p.returncode == 0, "\n".join(ln for ln in out.splitlines() if ln.startswith("FAIL")) or out[-3000:]
    assert "FAIL:" not in out
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
