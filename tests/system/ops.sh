#!/bin/bash
# System test in a real systemd (tests/sdbox): the operations units after install.sh --demo.
#   - the operators' access: users, groups, file modes, the database role feeds_ops; feedctl status
#     as root and as a member of the group feeds_ops, refused cleanly for anyone else;
#   - OnFailure=feed-alert@%n.service on every feed unit (one prefix drop-in), not on the alert
#     units themselves; feed-check.timer enabled and running feed-check.service as feeds_ops;
#   - alerts end to end to a webhook receiver on loopback (a json:// apprise channel):
#     a stopped simulator makes feed-binance's condition hold: one alert, none more while it
#     lasts, one "resolved" after the simulator is back;
#     a stale Kite heartbeat alerts nothing outside NSE hours (and alerts inside them);
#     kill -9 past the restart limit leaves feed-binance failed and feed-alert@ sends one
#     message naming it, with its journal lines;
#   - the oneshot jobs' node_exporter textfile directory;
#   - install.sh again: the feeds_ops password is set back from its file, no mode changes.
# Prints PASS/FAIL lines; exit status 0 only if every check passed.
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-ops-$$}
export SDTEST_NAME=${SDTEST_NAME:-feedsops$$}
source "$(dirname "$0")/lib.sh"
PY=/opt/feeds/venv/bin/python
RECV=/opt/ops-test/received.jsonl
is_state() { [ "$(prop "$1" ActiveState)" = "$2" ]; }

need_port 5432 "a PostgreSQL on the host; the container's own cannot start"
need_port 19100 "the Binance simulator unit's"
need_port 9800 "feed-api's"
boot "$REPO:/opt/src:ro"

install_bundle --demo
grep 'install.sh:' "$SDTEST_DIR/install.log" | sed 's/^/    /'
out=$($I bash -c 'systemd-analyze verify /etc/systemd/system/feed-*.service /etc/systemd/system/feed-*.timer 2>&1')
[ -z "$out" ] && ok "systemd-analyze verify prints nothing (feed-check, feed-alert@ included)" \
    || { bad "systemd-analyze verify:"; echo "$out"; }

# --- users, groups, modes --------------------------------------------------------------------------
ids=$($I bash -c 'id feeds_ops; id feeds_api; getent group feeds_metrics')
members_of_metrics() { local g m; g=$(echo "$ids" | grep '^feeds_metrics:')
                       for m in "$@"; do contains "$g" "[:,]$m\(,\|$\)" || return 1; done; }
contains "$ids" "uid=.*(feeds_ops) gid=.*(feeds_ops) groups=.*(feeds_ops)$" \
    && contains "$ids" "(feeds_api) groups=.*(feeds_ops)" \
    && members_of_metrics feeds feeds_ibkr feeds_kite \
    && ok "users feeds_ops, feeds_api (member of feeds_ops), group feeds_metrics" || { bad "users:"; echo "$ids"; }
modes=$($I bash -c 'stat -c "%U:%G %a %n" /etc/feeds /etc/feeds/secrets /etc/feeds/ops.toml /etc/feeds/alerts.toml \
        /etc/feeds/secrets/feeds-ops.password /etc/feeds/secrets/feed-api.token /var/lib/prometheus/node-exporter')
echo "$modes" | sed 's/^/    /'
contains "$modes" "root:feeds 751 /etc/feeds$" && contains "$modes" "root:feeds 711 /etc/feeds/secrets$" \
    && contains "$modes" "root:feeds_ops 640 /etc/feeds/ops.toml$" && contains "$modes" "root:feeds_ops 640 /etc/feeds/alerts.toml$" \
    && contains "$modes" "root:feeds_ops 640 /etc/feeds/secrets/feeds-ops.password$" \
    && contains "$modes" "feeds_api:feeds_api 600 /etc/feeds/secrets/feed-api.token$" \
    && contains "$modes" "root:feeds_metrics 2775 /var/lib/prometheus/node-exporter$" \
    && ok "modes: /etc/feeds 751, secrets 711, ops.toml, alerts.toml and the feeds_ops password 640 root:feeds_ops, token 600 feeds_api" \
    || bad "modes"
open=$($I find /etc/feeds -type f -perm /o=rwx)
[ -z "$open" ] && ok "no file in /etc/feeds is readable by every user" || bad "readable by others: $open"
before=$($I bash -c 'find /etc/feeds -type f -printf "%u:%g %m %p\n" | sort')
leak=""
for f in /etc/feeds/ops.toml /etc/feeds/alerts.toml /etc/feeds/feeds.toml /etc/feeds/binance.toml /etc/feeds/secrets/feeds-ops.password \
         /etc/feeds/secrets/feed-api.token /etc/feeds/secrets/kite-demo-password; do
    $I runuser -u nobody -- cat "$f" >/dev/null 2>&1 && leak="$leak nobody:$f"
done
$I runuser -u nobody -- ls /etc/feeds/secrets >/dev/null 2>&1 && leak="$leak nobody:ls-secrets"
$I runuser -u feeds_binance -- cat /etc/feeds/secrets/feeds-ops.password >/dev/null 2>&1 && leak="$leak feeds_binance:password"
$I runuser -u feeds_binance -- cat /etc/feeds/ops.toml >/dev/null 2>&1 && leak="$leak feeds_binance:ops.toml"
$I runuser -u feeds_binance -- cat /etc/feeds/alerts.toml >/dev/null 2>&1 && leak="$leak feeds_binance:alerts.toml"
$I runuser -u feeds_ops -- cat /etc/feeds/secrets/feed-api.token >/dev/null 2>&1 && leak="$leak feeds_ops:token"
[ -z "$leak" ] && ok "nobody reads ops.toml, alerts.toml, feeds.toml or a secret; feeds_binance not the feeds_ops password nor the operators' files; feeds_ops not the API token" \
    || bad "readable:$leak"
$I runuser -u feeds_api -- cat /etc/feeds/secrets/feed-api.token /etc/feeds/secrets/feeds-ops.password /etc/feeds/ops.toml \
    /etc/feeds/alerts.toml >/dev/null 2>&1 && ok "feeds_api reads its token, ops.toml, alerts.toml and the feeds_ops password" \
    || bad "feeds_api cannot read its files"
role=$(sql "select rolcanlogin, pg_has_role('feeds_ops', 'feeds_reader', 'member'), rolsuper, rolcreaterole
            from pg_roles where rolname = 'feeds_ops'")
[ "$role" = "t|t|f|f" ] && ok "database role feeds_ops: LOGIN, member of feeds_reader, nothing more" || bad "role feeds_ops: $role"
pw_sql() { $I bash -c "PGPASSWORD=\$(cat /etc/feeds/secrets/feeds-ops.password) psql -qAtw -v ON_ERROR_STOP=1 \
                       'host=127.0.0.1 dbname=feeds user=feeds_ops' -c \"$1\" 2>&1"; }
n=$(pw_sql "select current_user, count(*) >= 0 from binance_agg_trade")
[ "$n" = "feeds_ops|t" ] && ok "feeds_ops logs in over 127.0.0.1 with the generated password and reads binance_agg_trade" \
    || bad "feeds_ops login: $n"
w=$(pw_sql "delete from binance_agg_trade where false")
contains "$w" "permission denied" && ok "as role feeds_ops, DELETE refused (read-only)" || bad "feeds_ops may write: $w"

# --- units: OnFailure drop-ins, the timer -----------------------------------------------------------
of() { $I systemctl show -P OnFailure "$1"; }
[ "$(of feed-binance.service)" = "feed-alert@feed-binance.service.service" ] \
    && [ "$(of feed-zerodha.service)" = "feed-alert@feed-zerodha.service.service" ] \
    && [ "$(of feed-check.service)" = "feed-alert@feed-check.service.service" ] \
    && [ "$(of feed-binance@1of2.service)" = "feed-alert@feed-binance@1of2.service.service" ] \
    && ok "OnFailure of feed-binance, feed-zerodha, feed-check, feed-binance@1of2: feed-alert@<unit>.service" \
    || bad "OnFailure: '$(of feed-binance.service)' '$(of feed-check.service)' '$(of feed-binance@1of2.service)'"
[ -z "$(of feed-alert@x.service)" ] && [ -z "$(of feed-alert@feed-binance.service.service)" ] \
    && ok "feed-alert@x.service has no OnFailure (no recursion)" || bad "feed-alert@ OnFailure: '$(of feed-alert@x.service)'"
[ "$(prop feed-alert@feed-binance@1of2.service.service LoadState)" = loaded ] \
    && ok "feed-alert@feed-binance@1of2.service.service loads (a template instance's alert unit)" \
    || bad "alert unit of a template instance: $(prop feed-alert@feed-binance@1of2.service.service LoadState)"
[ "$($I systemctl is-enabled feed-check.timer)" = enabled ] && is_state feed-check.timer active \
    && ok "feed-check.timer enabled and active (next: $(prop feed-check.timer NextElapseUSecRealtime))" \
    || bad "feed-check.timer: $($I systemctl is-enabled feed-check.timer) $(prop feed-check.timer ActiveState)"
ran() { [ -n "$(prop feed-check.service ExecMainExitTimestamp)" ]; }
waitfor 75 ran && ok "feed-check.timer started feed-check.service (Result=$(prop feed-check.service Result), status $(prop feed-check.service ExecMainStatus))" \
    || bad "feed-check.service never ran from its timer"
[ "$(prop feed-check.service User)" = feeds_ops ] && [ "$(prop feed-check.service Result)" = success ] \
    && ok "feed-check.service runs as feeds_ops and succeeds" \
    || { bad "feed-check.service: $(prop feed-check.service User) $(prop feed-check.service Result)"; $I journalctl -u feed-check --no-pager | tail -20; }
$I test -d /var/lib/feeds/alerts && [ "$($I stat -c '%U %a' /var/lib/feeds/alerts)" = "feeds_ops 700" ] \
    && ok "alert state in /var/lib/feeds/alerts (feeds_ops, 700)" || bad "/var/lib/feeds/alerts: $($I stat -c '%U %a' /var/lib/feeds/alerts)"

# --- node_exporter textfiles of the oneshot jobs ------------------------------------------------------
$I systemctl start feed-maintain.service
tf=$($I bash -c 'stat -c "%U:%G %a %n" /var/lib/prometheus/node-exporter/feeds_*.prom 2>/dev/null')
if contains "$tf" "^feeds:.* /var/lib/prometheus/node-exporter/feeds_maintain.prom$"; then
    ok "feed-maintain (user feeds, group feeds_metrics) wrote its textfile: $(echo "$tf" | grep maintain)"
    $I runuser -u prometheus -- cat /var/lib/prometheus/node-exporter/feeds_maintain.prom >/dev/null 2>&1 \
        && ok "node_exporter's user prometheus reads it" || bad "prometheus cannot read the textfile"
else
    bad "no feeds_maintain.prom after feed-maintain: '$tf' $($I journalctl -u feed-maintain --no-pager | tail -3)"
fi

# --- feedctl status: root, an operator, anyone else ---------------------------------------------------
$I bash -c 'useradd alice && usermod -aG feeds_ops alice && useradd bob' || bad "useradd"
st_root=$($I feedctl status 2>&1); rc_root=$?
contains "$st_root" "feed-binance.service" && ! contains "$st_root" "authentication failed\|Traceback" \
    && ok "feedctl status as root (exit $rc_root) lists feed-binance.service" || { bad "feedctl status as root (exit $rc_root):"; echo "$st_root" | head -20; }
echo "$st_root" | head -12 | sed 's/^/    /'
st_alice=$($I runuser -u alice -- feedctl status 2>&1); rc_alice=$?
contains "$st_alice" "feed-binance.service" && ! contains "$st_alice" "authentication failed\|Traceback" \
    && ok "feedctl status as alice, a member of feeds_ops (exit $rc_alice), lists feed-binance.service" \
    || { bad "feedctl status as alice (exit $rc_alice):"; echo "$st_alice" | head -20; }
if ! $I grep -q '^dsn = ".*user=feeds_ops' /etc/feeds/ops.toml || ! $I grep -q '^password_file = ' /etc/feeds/ops.toml; then
    bad "the shipped ops.toml does not connect as feeds_ops over 127.0.0.1 with its password: $($I grep -e '^dsn' -e '^password_file' /etc/feeds/ops.toml | tr '\n' ' ')"
    # the access model itself, with a dsn that does
    $I bash -c 'sed -e "s|^dsn = .*|dsn = \"host=127.0.0.1 dbname=feeds user=feeds_ops\"\npassword_file = \"/etc/feeds/secrets/feeds-ops.password\"|" \
                /etc/feeds/ops.toml > /etc/feeds/ops-tcp.toml && chown root:feeds_ops /etc/feeds/ops-tcp.toml && chmod 640 /etc/feeds/ops-tcp.toml'
    st=$($I runuser -u alice -- feedctl --config /etc/feeds/ops-tcp.toml status 2>&1); rc=$?
    contains "$st" "feed-binance.service" && ! contains "$st" "authentication failed\|Traceback" \
        && ok "with dsn host=127.0.0.1 user=feeds_ops and password_file (a copy of ops.toml): feedctl status as alice works (exit $rc)" \
        || { bad "alice with the copy (exit $rc):"; echo "$st" | head; }
    $I rm -f /etc/feeds/ops-tcp.toml
fi
st_bob=$($I runuser -u bob -- feedctl status 2>&1); rc_bob=$?
[ $rc_bob != 0 ] && [ $rc_bob -lt 128 ] && ! contains "$st_bob" "Traceback" && ! contains "$st_bob" "feed-binance.service" \
    && ok "feedctl status as bob, not a member, fails cleanly (exit $rc_bob): $(echo "$st_bob" | tail -1)" \
    || { bad "feedctl status as bob (exit $rc_bob):"; echo "$st_bob" | head -20; }

# --- the alert channel: a webhook receiver on loopback --------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$I bash -s "$port" <<'EOF' || bad "receiver setup"
set -e
mkdir -p /opt/ops-test
cat > /opt/ops-test/receiver.py <<'EOT'
"""Appends each POST body (one JSON line: path, body) to a file; answers 200."""
import http.server
import json
import sys

port, out = int(sys.argv[1]), sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body}) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
EOT
: > /opt/ops-test/received.jsonl
systemd-run -q --unit=ops-test-receiver /opt/feeds/venv/bin/python /opt/ops-test/receiver.py "$1" /opt/ops-test/received.jsonl
( umask 077; echo "json://127.0.0.1:$1/" > /etc/feeds/secrets/alert-test.url )
chown feeds_ops:feeds_ops /etc/feeds/secrets/alert-test.url
sed -i 's|^url_files = \[\]|url_files = ["/etc/feeds/secrets/alert-test.url"]|' /etc/feeds/alerts.toml
grep -q '^url_files = \["/etc/feeds/secrets/alert-test.url"\]' /etc/feeds/alerts.toml
EOF
waitfor 20 $I bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" || bad "receiver not listening"
cat > "$SDTEST_DIR/alerts.py" <<'EOF'
"""Messages received so far, one line each: TYPE|CONDITION|TITLE (CONDITION: its 'condition:' line or -)."""
import json
import re
import sys

for ln in sys.stdin:
    if not ln.strip():
        continue
    m = json.loads(json.loads(ln)["body"])
    key = re.search(r"^condition: (\S+)$", m.get("message", ""), re.M)
    print("|".join([str(m.get("type")), key.group(1) if key else "-", str(m.get("title"))]))
EOF
alerts() { $I cat "$RECV" | python3 "$SDTEST_DIR/alerts.py"; }          # every message so far
since() { alerts | tail -n +$(( $1 + 1 )); }                            # since N messages
count() { alerts | wc -l; }
body_of() { $I cat "$RECV" | python3 -c 'import json, sys
for ln in sys.stdin:
    m = json.loads(json.loads(ln)["body"])
    if sys.argv[1] in m.get("title", ""): print(m["message"]); print("=====")' "$1"; }
out=$($I runuser -u feeds_ops -- feedctl alert --test 2>&1)
waitfor 20 contains "$(alerts)" "feeds: test alert from" && ok "feedctl alert --test (as feeds_ops) reaches the receiver" \
    || { bad "test alert not received: $out"; }
check() { $I systemctl start feed-check.service; }
spaced_check() { sleep 10; check; }       # as the timer would, not faster than the heartbeats

# --- a stopped simulator: one alert, none more while it lasts, one resolved ---------------------------
waitfor 150 is_state feed-binance active || bad "feed-binance not active: $(prop feed-binance ActiveState)"
last_check() { $I journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$(prop feed-check.service InvocationID)"; }
quiet() { check; ! contains "$(last_check | grep '^holds')" "feed-binance"; }
waitfor 120 quiet || echo "    (a condition about feed-binance still holds before the simulator stops)"
n0=$(count)
pre=$(since 0 | grep -c 'feed-binance' || true)
hb_age() { sql "select round(extract(epoch from now() - updated_at)) from feed_heartbeat where unit = 'feed-binance.service'"; }
echo "    before: feed-binance $(prop feed-binance ActiveState), heartbeat $(hb_age)s old, $pre earlier message(s) naming it"
# kept from starting as well as stopped: feed-binance's restarts would start it again (Wants=)
$I bash -c 'mkdir -p /run/systemd/system/feed-sim-binance.service.d &&
            printf "[Unit]\nConditionPathExists=/nonexistent/ops-test\n" > /run/systemd/system/feed-sim-binance.service.d/down.conf &&
            systemctl daemon-reload && systemctl stop feed-sim-binance.service'
t0=$(date +%s)
fired() { spaced_check; since "$n0" | grep -v '^success|' | grep -q 'feed-binance.service'; }
if waitfor 300 fired; then
    first=$(since "$n0" | grep 'feed-binance')
    ok "simulator stopped: alert after $(( $(date +%s) - t0 ))s: $(echo "$first" | head -1)"
    echo "    feed-binance: $(prop feed-binance ActiveState)/$(prop feed-binance SubState), heartbeat $(hb_age)s old"
    last_check | grep -e '^holds' -e '^sent' | sed 's/^/    check: /'
    spaced_check; spaced_check
    m=$(since "$n0" | grep 'feed-binance')
    echo "$m" | sed 's/^/    received: /'
    nf=$(echo "$m" | grep -vc '^success|' || true)
    keys=$(echo "$m" | cut -d'|' -f2 | sort -u)
    [ "$nf" = 1 ] && ok "exactly one alert while the simulator is down, none on the next two checks ($keys)" \
        || bad "$nf alerts naming feed-binance while the simulator is down"
else
    bad "no alert naming feed-binance.service within 300s of stopping the simulator"
    $I journalctl -u feed-check --no-pager | tail -30
    keys=""
fi
$I bash -c 'rm /run/systemd/system/feed-sim-binance.service.d/down.conf && systemctl daemon-reload'
$I systemctl start feed-sim-binance.service
n1=$(count)
resolved() { spaced_check; [ -n "$keys" ] && for k in $keys; do contains "$(since "$n1")" "^success|$k|" || return 1; done; }
if [ -n "$keys" ] && waitfor 300 resolved; then
    ok "simulator back: one resolved for $keys ($(since "$n1" | grep "^success|" | grep -m1 'feed-binance' | cut -d'|' -f3))"
    spaced_check
    r=$(since "$n1" | grep 'feed-binance')
    [ "$(echo "$r" | grep -c '^success|')" = "$(echo "$keys" | wc -w)" ] && [ "$(echo "$r" | grep -vc '^success|')" = 0 ] \
        && ok "no further message naming feed-binance after it recovered" || { bad "after recovery:"; echo "$r"; }
else
    bad "no resolved alert after the simulator came back: $(since "$n1")"
fi

# --- Prometheus scrapes the collectors; every dashboard query returns data -------------------------------
# Debian's prometheus with the shipped scrape configuration (intervals shortened to 2 s), and
# node_exporter for the oneshot jobs' textfiles, both as the user prometheus, on free ports (the
# node target of the configuration is moved there: the host's own node_exporter may hold 9100).
read -r pport nport <<< "$(python3 -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')"
$I systemctl start feed-backfill.service feed-kite-token.service 2>/dev/null   # their textfiles, if not yet
$I bash -s "$pport" "$nport" <<'EOF' || bad "prometheus setup"
set -e
sed -e 's/scrape_interval: 15s/scrape_interval: 2s/' -e 's/evaluation_interval: 15s/evaluation_interval: 2s/' \
    -e 's/scrape_timeout: 10s/scrape_timeout: 2s/' -e "s/127.0.0.1:9100/127.0.0.1:$2/" \
    /etc/feeds/prometheus-feeds.yml > /opt/ops-test/prometheus.yml
chmod 644 /opt/ops-test/prometheus.yml
install -d -o prometheus -g prometheus /var/lib/ops-test-prometheus
systemd-run -q --unit=ops-test-node-exporter -p User=prometheus /usr/bin/prometheus-node-exporter \
    --web.listen-address=127.0.0.1:$2 --collector.disable-defaults --collector.textfile \
    --collector.textfile.directory=/var/lib/prometheus/node-exporter
systemd-run -q --unit=ops-test-prometheus -p User=prometheus /usr/bin/prometheus \
    --config.file=/opt/ops-test/prometheus.yml --storage.tsdb.path=/var/lib/ops-test-prometheus \
    --web.listen-address=127.0.0.1:$1
EOF
cat > "$SDTEST_DIR/promq.py" <<'EOF'
"""promq.py PORT: checks the feeds' targets and every query of the shipped dashboard against the
Prometheus on 127.0.0.1:PORT; prints PASS/FAIL lines (waits up to 120 s for the scrapes)."""
import json
import sys
import time
import urllib.parse
import urllib.request

from feeds.ops.metrics import dashboard_queries

base = f"http://127.0.0.1:{sys.argv[1]}/api/v1/"


def query(expr):
    try:
        with urllib.request.urlopen(base + "query?" + urllib.parse.urlencode({"query": expr}), timeout=5) as r:
            return json.loads(r.read())
    except Exception as e:
        return {"status": "error", "error": str(e)}


def series(expr):
    r = query(expr)
    return r["data"]["result"] if r.get("status") == "success" else []


want = {"127.0.0.1:9810", "127.0.0.1:9820", "127.0.0.1:9830"}
end = time.time() + 120
while time.time() < end:
    up = {s["metric"]["instance"] for s in series('count_over_time(up{job="feeds"}[1m]) >= 3')}
    now_up = {s["metric"]["instance"] for s in series('up{job="feeds"} == 1')}
    if want <= up and want <= now_up and series('count_over_time(up{job="node"}[1m]) >= 3'):
        break
    time.sleep(2)
ups = {s["metric"]["instance"]: s["value"][1] for s in series('up{job="feeds"}')}
units = sorted({s["metric"].get("unit") for s in series("feeds_health_score")})
if all(ups.get(t) == "1" for t in want) and series('up{job="node"} == 1'):
    print(f"PASS: Prometheus scrapes feed-binance, feed-zerodha, feed-ibkr (up: {ups}) and node_exporter; units {units}")
else:
    node = series('up{job="node"}')
    print(f"FAIL: targets: {ups}, node: {node}")
queries = dashboard_queries("/opt/src/etc/grafana-feeds.json")
empty = []
for q in queries:
    r = query(q)
    if r.get("status") != "success" or not r["data"]["result"]:
        empty.append((q, r.get("error", "no data")))
if queries and not empty:
    print(f"PASS: all {len(queries)} queries of the shipped dashboard return data through Prometheus's HTTP API")
for q, why in empty:
    print(f"FAIL: dashboard query without data: {q} ({why})")
EOF
$I bash -c 'cat > /opt/ops-test/promq.py' < "$SDTEST_DIR/promq.py"
$I "$PY" /opt/ops-test/promq.py "$pport" 2>&1 | tee "$SDTEST_DIR/promq.log"
grep -q '^FAIL' "$SDTEST_DIR/promq.log" && fail=1
grep -q '^PASS: all' "$SDTEST_DIR/promq.log" || fail=1
$I systemctl stop ops-test-prometheus.service ops-test-node-exporter.service 2>/dev/null

# --- feed-api: start, stop, restart through D-Bus and polkit as feeds_api; refusals ----------------------
api() {  # api METHOD PATH [TOKEN] [JSON]: prints the HTTP status, then the body
    $I curl -s -o /opt/ops-test/api.out -w '%{http_code}\n' -X "$1" ${3:+-H "Authorization: Bearer $3"} \
        ${4:+-H 'Content-Type: application/json' --data "$4"} "http://127.0.0.1:9800$2"
    $I cat /opt/ops-test/api.out; echo
}
code() { api "$@" | head -1; }
tok=$($I head -n1 /etc/feeds/secrets/feed-api.token)
waitfor 30 is_state feed-api active && [ "$(prop feed-api User)" = feeds_api ] \
    && ok "feed-api.service active as feeds_api" || bad "feed-api: $(prop feed-api ActiveState) $(prop feed-api User)"
h=$(api GET /health)
[ "$(echo "$h" | head -1)" = 200 ] && ok "GET /health without a token: $(echo "$h" | tail -n +2 | head -c 200)" \
    || bad "GET /health: $h"
[ "$(code GET /status)" = 401 ] && [ "$(code GET /status wrong-token)" = 401 ] \
    && [ "$(code POST /stop "" '{"unit": "feed-binance.service"}')" = 401 ] \
    && [ "$(code POST /stop wrong-token '{"unit": "feed-binance.service"}')" = 401 ] && is_state feed-binance active \
    && ok "no token / a wrong token: 401 (GET /status, POST /stop), feed-binance still active" \
    || bad "token refusals: $(code GET /status) $(code GET /status wrong-token) $(code POST /stop wrong-token '{"unit": "feed-binance.service"}')"
st=$(api GET /status "$tok")
[ "$(echo "$st" | head -1)" = 200 ] && contains "$st" "feed-binance.service" \
    && ok "GET /status with the token lists feed-binance.service" || bad "GET /status: $(echo "$st" | head -c 300)"
p0=$(prop feed-binance MainPID)
c=$(code POST /stop "$tok" '{"unit": "feed-binance.service"}')
[ "$c" = 200 ] && waitfor 100 is_state feed-binance inactive && ok "POST /stop feed-binance.service: 200, unit inactive" \
    || bad "POST /stop: $c $(prop feed-binance ActiveState) $($I cat /opt/ops-test/api.out)"
c=$(code POST /start "$tok" '{"unit": "feed-binance.service"}')
[ "$c" = 200 ] && waitfor 130 is_state feed-binance active && ok "POST /start feed-binance.service: 200, unit active" \
    || bad "POST /start: $c $(prop feed-binance ActiveState) $($I cat /opt/ops-test/api.out)"
p1=$(prop feed-binance MainPID)
c=$(code POST /restart "$tok" '{"unit": "feed-binance.service"}')
newmain() { is_state feed-binance active && [ "$(prop feed-binance MainPID)" != "$p1" ]; }
[ "$c" = 200 ] && waitfor 130 newmain && ok "POST /restart feed-binance.service: 200, new MainPID ($p0 -> $p1 -> $(prop feed-binance MainPID))" \
    || bad "POST /restart: $c $($I cat /opt/ops-test/api.out)"
c1=$(code POST /stop "$tok" '{"unit": "postgresql.service"}'); c2=$(code POST /stop "$tok" '{"unit": "feed-nonesuch.service"}')
c3=$(code POST /stop "$tok" '{"unit": "../x"}'); c4=$(code POST /stop "$tok" '{"unit": "feed-check.timer"}')
[ "$c1" = 403 ] && [ "$c2" = 404 ] && [ "$c3" = 400 ] && [ "$c4" = 403 ] \
    && $I runuser -u postgres -- pg_isready -q && is_state feed-check.timer active \
    && ok "refused: postgresql.service 403, feed-nonesuch.service 404, a malformed name 400, feed-check.timer 403; nothing stopped" \
    || bad "refusals: postgresql $c1, unknown $c2, malformed $c3, timer $c4"
pk=$($I runuser -u feeds_api -- systemctl stop postgresql.service 2>&1)
[ $? != 0 ] && $I runuser -u postgres -- pg_isready -q \
    && ok "as feeds_api, systemctl stop postgresql.service is refused by polkit: $(echo "$pk" | head -1)" \
    || bad "feeds_api may stop postgresql: $pk"
cf=$(api GET /config "$tok")
leaks=""
for f in /etc/feeds/secrets/feeds-ops.password /etc/feeds/secrets/feed-api.token /etc/feeds/secrets/kite-demo-password \
         /etc/feeds/secrets/kite-demo-api-secret /etc/feeds/secrets/kite-demo-totp-secret; do
    v=$($I head -n1 "$f" 2>/dev/null); [ -n "$v" ] && contains "$cf" "$v" && leaks="$leaks $f"
done
contains "$cf" "json://127.0.0.1" && leaks="$leaks alert-url"
[ "$(echo "$cf" | head -1)" = 200 ] && [ -z "$leaks" ] && contains "$cf" "ops.toml" \
    && ok "GET /config: 200, no secret in it (feeds_ops password, API token, Kite secrets, alert URL)" \
    || bad "GET /config: $(echo "$cf" | head -1) leaks:${leaks:- none}"

# --- Kite: a stale heartbeat outside NSE hours alerts nothing -------------------------------------------
$I systemctl stop feed-zerodha.service 2>/dev/null
sql "update feed_heartbeat set updated_at = now() - interval '3 hours', state = 'running'
      where unit = 'feed-zerodha.service'" >/dev/null
[ "$(sql "select count(*) from feed_heartbeat where unit = 'feed-zerodha.service' and updated_at < now() - interval '1 hour'")" = 1 ] \
    || sql "insert into feed_heartbeat (unit, host, pid, started_at, updated_at, state, status)
            values ('feed-zerodha.service', 'x', 1, now() - interval '4 hours', now() - interval '3 hours', 'running', 'x')
            on conflict (unit) do update set updated_at = excluded.updated_at" >/dev/null
# two instants of the next NSE session after tomorrow (XNSE calendar), whatever the real clock:
# 5 hours after its close (outside NSE hours) and 2 hours after its open (inside); each run with
# its own state
read -r outside inside <<< "$($I "$PY" -c 'import datetime as d
from feeds.calendars import calendar
from feeds.ops.checks import next_session
s = next_session(d.datetime.now(d.timezone.utc) + d.timedelta(days=1), calendar("XNSE"))
print((s.close + d.timedelta(hours=5)).isoformat(), (s.open + d.timedelta(hours=2)).isoformat())')"
if $I feedctl check --help 2>&1 | grep -q -- '--now' || $I feedctl check --now "$outside" --help >/dev/null 2>&1; then
    kite_run() {  # kite_run NAME INSTANT: feedctl check as feeds_ops at INSTANT, own state file
        $I bash -c "sed 's|^\[alerts\]|[alerts]\nstate_file = \"/var/lib/feeds/alerts/$1/state.json\"|' /etc/feeds/alerts.toml \
                    > /etc/feeds/alerts-$1.toml && chown root:feeds_ops /etc/feeds/alerts-$1.toml && chmod 640 /etc/feeds/alerts-$1.toml"
        $I runuser -u feeds_ops -- feedctl --alerts-config "/etc/feeds/alerts-$1.toml" check --now "$2" 2>&1
    }
    k0=$(count)
    o=$(kite_run kite-outside "$outside")
    sleep 2
    if ! contains "$o" "^holds .*feed-zerodha\|^sent .*feed-zerodha" && ! contains "$(since "$k0")" "feed-zerodha"; then
        ok "stale Kite heartbeat (3 h old, unit stopped) at $outside (outside NSE hours): nothing held or sent for feed-zerodha"
    else
        bad "Kite outside NSE hours:"; echo "$o"; since "$k0"
    fi
    k1=$(count)
    o=$(kite_run kite-inside "$inside")
    sleep 2
    contains "$o" "holds .*stale:feed-zerodha.service" && contains "$(since "$k1")" "|stale:feed-zerodha.service|" \
        && ok "the same at $inside (in an NSE session): stale:feed-zerodha.service holds and is sent" \
        || { bad "Kite in NSE hours: no stale alert"; echo "$o" | tail -10; }
else
    bad "feedctl check has no --now option: cannot judge Kite outside NSE hours"
fi
$I rm -f /etc/feeds/alerts-kite-outside.toml /etc/feeds/alerts-kite-inside.toml

# --- kill -9 past the restart limit: feed-binance failed, feed-alert@ tells -----------------------------
# The limit (10 starts in 300 s) is lowered to 3 by a test drop-in, for speed.
$I bash -c 'mkdir -p /etc/systemd/system/feed-binance.service.d &&
            printf "[Unit]\nStartLimitIntervalSec=300\nStartLimitBurst=3\n[Service]\nRestartSec=1\n" \
                > /etc/systemd/system/feed-binance.service.d/zz-test-limit.conf && systemctl daemon-reload'
$I systemctl reset-failed feed-binance.service 2>/dev/null
waitfor 120 is_state feed-binance active || bad "feed-binance not active before the kills"
a0=$(count); kills=0
for _ in $(seq 1 15); do
    is_state feed-binance failed && break
    pid=$(prop feed-binance MainPID)
    if [ "${pid:-0}" -gt 0 ]; then
        $I kill -9 "$pid" 2>/dev/null && kills=$((kills + 1))
        newpid() { is_state feed-binance failed || { p=$(prop feed-binance MainPID); [ "${p:-0}" -gt 0 ] && [ "$p" != "$pid" ]; }; }
        waitfor 60 newpid
    else
        sleep 1
    fi
done
is_state feed-binance failed && ok "after $kills kill -9: feed-binance failed (Result=$(prop feed-binance Result), NRestarts $(prop feed-binance NRestarts))" \
    || bad "feed-binance not failed after $kills kills: $(prop feed-binance ActiveState)/$(prop feed-binance SubState)"
AU=feed-alert@feed-binance.service.service
told() { contains "$(since "$a0")" "|feeds: feed-binance.service failed on"; }
waitfor 60 told && ok "$AU ran (as $(prop $AU User), Result=$(prop $AU Result)) and the receiver got: $(since "$a0" | grep -m1 'failed on' | cut -d'|' -f3)" \
    || { bad "no failure message; $AU: $(prop $AU ActiveState) $(prop $AU Result)"; $I journalctl -u "$AU" --no-pager | tail -20; }
sleep 3
nm=$(since "$a0" | grep -c "|feeds: feed-binance.service failed on" || true)
[ "$nm" = 1 ] && ok "exactly one failure message for feed-binance.service" || bad "$nm failure messages"
b=$(body_of "feeds: feed-binance.service failed on")
echo "$b" | head -12 | sed 's/^/    | /'
contains "$b" "journal lines:" && contains "$b" "systemctl status feed-binance.service" \
    && contains "$b" "feed-binance.service: Main process exited, code=killed, status=9/KILL\|status=9/KILL\|feed-binance" \
    && ok "the message names feed-binance.service, what to do, and its last journal lines ($(echo "$b" | grep -c 'T[0-9][0-9]:[0-9][0-9]') lines)" \
    || bad "message body lacks the unit's journal lines"
contains "$($I journalctl -u "$AU" --no-pager)" "127.0.0.1:$port" && bad "the channel URL is in feed-alert@'s journal" \
    || ok "the channel URL is not in feed-alert@'s journal"
[ "$(prop $AU OnFailure)" = "" ] && ok "$AU itself has no OnFailure" || bad "$AU OnFailure: $(prop $AU OnFailure)"
$I bash -c 'rm /etc/systemd/system/feed-binance.service.d/zz-test-limit.conf && systemctl daemon-reload &&
            systemctl reset-failed feed-binance.service && systemctl start feed-binance.service' \
    && ok "feed-binance started again" || bad "feed-binance does not start again"

# --- install.sh again: the password file wins, nothing else changes -------------------------------------------
pw_sum=$($I sha256sum /etc/feeds/secrets/feeds-ops.password /etc/feeds/secrets/feed-api.token)
sql "alter role feeds_ops password 'not-the-file'" >/dev/null
contains "$($I runuser -u alice -- feedctl status 2>&1)" "authentication failed" \
    || bad "feedctl as alice still connects after the role's password changed"
# an ops.toml of the release that kept the [alerts] section in it, and no alerts.toml
$I bash -c 'awk "/^\\[api\\]/ { while ((getline l < \"/etc/feeds/alerts.toml\") > 0) if (l !~ /^#/) print l; print \"\" } 1" \
                /etc/feeds/ops.toml > /tmp/ops.old && cat /tmp/ops.old > /etc/feeds/ops.toml && rm /etc/feeds/alerts.toml /tmp/ops.old'
$I grep -qx '\[alerts\]' /etc/feeds/ops.toml && $I grep -q '^url_files = \["/etc/feeds/secrets/alert-test.url"\]' /etc/feeds/ops.toml \
    || bad "could not make an ops.toml with an [alerts] section: $($I cat /etc/feeds/ops.toml)"
$I bash -c 'cd /opt/src && ./install.sh --demo' > "$SDTEST_DIR/install2.log" 2>&1 && ok "install.sh --demo re-run" \
    || { bad "install.sh re-run"; tail -20 "$SDTEST_DIR/install2.log"; }
grep 'install.sh:' "$SDTEST_DIR/install2.log" | sed 's/^/    /'
contains "$(cat "$SDTEST_DIR/install2.log")" "database role feeds_ops: password set from /etc/feeds/secrets/feeds-ops.password" \
    && [ "$($I sha256sum /etc/feeds/secrets/feeds-ops.password /etc/feeds/secrets/feed-api.token)" = "$pw_sum" ] \
    && ok "re-run: the password file and the API token kept; the role's password set back from the file" \
    || bad "re-run: password/token"
st=$($I runuser -u alice -- feedctl status 2>&1)
contains "$st" "feed-binance.service" && ! contains "$st" "authentication failed" \
    && ok "feedctl status as alice works again" || { bad "alice after re-run:"; echo "$st" | head; }
after=$($I bash -c 'find /etc/feeds -type f -printf "%u:%g %m %p\n" | sort')
al=$($I stat -c '%U:%G %a' /etc/feeds/alerts.toml)
contains "$(cat "$SDTEST_DIR/install2.log")" "/etc/feeds/ops.toml: its \[alerts\] section moved to /etc/feeds/alerts.toml" \
    && [ "$al" = "root:feeds_ops 640" ] && ! $I grep -qx '\[alerts\]' /etc/feeds/ops.toml \
    && $I grep -q '^url_files = \["/etc/feeds/secrets/alert-test.url"\]' /etc/feeds/alerts.toml \
    && contains "$($I runuser -u feeds_ops -- feedctl alert --test 2>&1)" "alert-test.url: accepted" \
    && ok "re-run: the [alerts] section of an older ops.toml moved to alerts.toml ($al), its channel still reached" \
    || { bad "[alerts] of an older ops.toml: alerts.toml $al"; $I cat /etc/feeds/ops.toml /etc/feeds/alerts.toml | sed 's/^/    /'; }
d=$(diff <(echo "$before" | grep -v alert-test.url) <(echo "$after" | grep -v -e alert-test.url -e '\.dist$'))
[ -z "$d" ] && ok "re-run: every file in /etc/feeds keeps its owner, group and mode" || { bad "modes changed:"; echo "$d"; }

echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
