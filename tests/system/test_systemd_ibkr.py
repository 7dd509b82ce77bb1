"""System test: feed-ibkr (IBKR live ticks and candles) in a real systemd (tests/sdbox), as
``install.sh --demo`` sets it up against the TWS simulator."""
import pytest

from test_systemd import run_script

pytestmark = pytest.mark.system


def test_ibkr_live_demo_start_journal_ticks_candles_stop():
    out = run_script("ibkr_live.sh", timeout=900)
    passed = [ln for ln in out.splitlines() if ln.startswith("PASS")]
    for check in ("install.sh --demo", "feed-ibkr.service installed", "feed-ibkr.timer installed",
                  "demo drop-in points feed-ibkr at /etc/feeds/ibkr-demo.toml",
                  "systemd-analyze verify prints nothing", "migrations 0006_candles and 0007_ibkr_live applied",
                  "list-timers: ", "OnCalendar written in America/New_York",
                  "a weekday, before 09:30 New York", "feed-sim-tws runs in live mode",
                  "feed-ibkr active after install.sh --demo", "runs as its own unprivileged user feeds_ibkr",
                  "ticks in PostgreSQL, growing: ibkr_trade", "ibkr_quote: ", "ibkr_index_tick: ",
                  "closed one-minute candles in ibkr_candle", "every candle has low <= open",
                  "journalctl -u feed-ibkr shows start-up and status", "systemctl status line: ",
                  "heartbeat row: running", "DROP TABLE ibkr_candle refused",
                  "systemctl stop: clean exit", "journal, clean stop line: stopped: all rows committed or spooled",
                  "open candles written at stop with final = false",
                  "systemctl start feed-ibkr: active again", "ticks stored again after the restart",
                  "second stop clean"):
        assert any(check in ln for ln in passed), check
