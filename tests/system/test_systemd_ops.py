"""System test: the operations units in a real systemd (tests/sdbox): alerts end to end to a
webhook receiver (OnFailure=, feed-check), the operators' access, feedctl status, Prometheus
scraping the collectors with the shipped configuration and dashboard, feed-api through D-Bus
and polkit."""
import pytest

from test_systemd import run_script

pytestmark = pytest.mark.system


def test_ops_alerts_access_status():
    out = run_script("ops.sh", timeout=1800)
    passed = [ln for ln in out.splitlines() if ln.startswith("PASS")]
    for check in ("systemd-analyze verify prints nothing",
                  "users feeds_ops, feeds_api (member of feeds_ops), group feeds_metrics",
                  "modes: /etc/feeds 751, secrets 711", "no file in /etc/feeds is readable by every user",
                  "nobody reads ops.toml", "database role feeds_ops: LOGIN, member of feeds_reader",
                  "feeds_ops logs in over 127.0.0.1", "as role feeds_ops, DELETE refused",
                  "OnFailure of feed-binance", "feed-alert@x.service has no OnFailure",
                  "feed-check.timer enabled and active", "feed-check.timer started feed-check.service",
                  "feed-check.service runs as feeds_ops and succeeds",
                  "feed-maintain (user feeds, group feeds_metrics) wrote its textfile",
                  "node_exporter's user prometheus reads it",
                  "feedctl status as root", "feedctl status as alice, a member of feeds_ops",
                  "feedctl status as bob, not a member, fails cleanly",
                  "feedctl alert --test (as feeds_ops) reaches the receiver",
                  "simulator stopped: alert after", "exactly one alert while the simulator is down",
                  "simulator back: one resolved", "no further message naming feed-binance after it recovered",
                  "outside NSE hours): nothing held or sent for feed-zerodha",
                  "stale:feed-zerodha.service holds and is sent",
                  "kill -9: feed-binance failed", "and the receiver got: feeds: feed-binance.service failed on",
                  "exactly one failure message for feed-binance.service",
                  "the message names feed-binance.service, what to do, and its last journal lines",
                  "the channel URL is not in feed-alert@'s journal",
                  "re-run: the password file and the API token kept",
                  "feedctl status as alice works again",
                  "re-run: every file in /etc/feeds keeps its owner, group and mode",
                  "re-run: the [alerts] section of an older ops.toml moved to alerts.toml",
                  "Prometheus scrapes feed-binance, feed-zerodha, feed-ibkr",
                  "queries of the shipped dashboard return data through Prometheus's HTTP API",
                  "feed-api.service active as feeds_api", "GET /health without a token",
                  "no token / a wrong token: 401", "GET /status with the token lists feed-binance.service",
                  "POST /stop feed-binance.service: 200, unit inactive",
                  "POST /start feed-binance.service: 200, unit active",
                  "POST /restart feed-binance.service: 200, new MainPID",
                  "refused: postgresql.service 403", "systemctl stop postgresql.service is refused by polkit",
                  "GET /config: 200, no secret in it"):
        assert any(check in ln for ln in passed), check
