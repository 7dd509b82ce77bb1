"""System test: the Dhan units and feed-indicators in a real systemd (tests/sdbox), against the simulator."""
import pytest

from test_systemd import run_script

pytestmark = pytest.mark.system


def test_dhan_timers_token_collector_candles_indicators_journal():
    out = run_script("dhan.sh", timeout=1200)
    passed = [ln for ln in out.splitlines() if ln.startswith("PASS")]
    for check in ("systemd-analyze verify prints nothing for the Dhan units",
                  "list-timers: ", "feed-dhan-token.timer next: ", "feed-dhan.timer next: ",
                  "feed-dhan-backfill.timer next: ",
                  "token obtained from the simulator with PIN + TOTP", "token file mode 0600, owner feeds_dhan",
                  "as feeds_kite, reading the Dhan token and secrets fails", "no credential in the token unit's journal",
                  "feed-dhan active", "runs as its own unprivileged user feeds_dhan", "the renewal ran first",
                  "ticks in PostgreSQL, growing", "quote ", "NIFTY 50 (IDX_I 13) ticker rows",
                  "dhan_instrument upserted by role feeds_dhan", "journalctl -u feed-dhan shows start-up and status",
                  "systemctl status line", "heartbeat row: running", "TRUNCATE dhan_tick_full refused",
                  "feed-indicators active", "one-minute candles in dhan_candle", "final one-minute candles for all",
                  "SMA(timeperiod=2) rows for Dhan candles", "OBV rows for Dhan candles",
                  "every SMA(2) value equals the mean of the two stored closes",
                  "clean exit", "stopped: all rows committed or spooled",
                  "expired token (disconnect 807): exit 77, not restarted", "the disconnect code 807",
                  "feed-dhan-token generated a new token first"):
        assert any(check in ln for ln in passed), check
    assert sum("list-timers: " in ln for ln in passed) == 3
