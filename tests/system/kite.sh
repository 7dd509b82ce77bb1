#!/bin/bash
# System test in a real systemd (tests/sdbox): the Kite units against the Kite simulator.
# install.sh (--no-start), then a demo setup done here (simulator unit, a configuration
# pointing at it, the simulator's demo credentials as 0600 secret files, drop-ins):
# both timers listed with their next elapse at 08:00 / 09:10 IST; feed-kite-token logs in
# with headless Chromium and stores the token; feed-zerodha started (the renewal runs
# first and finds the token valid); ticks in PostgreSQL; journal and status; a missing
# token refused with exit 77 and no restart; a day without a session ends at once with
# success; a clean stop.
# Prints PASS/FAIL lines; exit status 0 only if every check passed (77: skipped).
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-kite-$$}
export SDTEST_NAME=${SDTEST_NAME:-feedskite$$}
source "$(dirname "$0")/lib.sh"
SHARED=${FEEDS_SHARED_DATA:-$REPO/../shared/data}

need_port 5432 "a PostgreSQL on the host; the container's own cannot start"
need_port 9300 "the Kite simulator unit's"
[ -x /usr/bin/chromium ] || { echo "SKIP: /usr/bin/chromium not installed (apt-get install chromium)"; exit 77; }
binds="$REPO:/opt/src:ro"
[ -d "$SHARED/kite" ] && binds="$binds $(cd "$SHARED" && pwd):/opt/shared-data:ro"
boot "$binds"

install_bundle
out=$($I bash -c 'systemd-analyze verify /etc/systemd/system/feed-zerodha.* /etc/systemd/system/feed-kite-token.* /etc/systemd/system/feed-sim-kite.service 2>&1')
[ -z "$out" ] && ok "systemd-analyze verify prints nothing for the Kite units" || { bad "systemd-analyze verify:"; echo "$out"; }

# --- demo setup: the simulator, a configuration pointing at it, its demo credentials ------------
$I bash -s <<'EOF'
set -e
install -d /etc/systemd/system/feed-sim-kite.service.d /etc/systemd/system/feed-zerodha.service.d \
           /etc/systemd/system/feed-kite-token.service.d
data=""; [ -d /opt/shared-data/kite ] && data="--data-dir /opt/shared-data"
cat > /etc/systemd/system/feed-sim-kite.service.d/test.conf <<EOT
[Service]
Environment="FEEDS_SIM_KITE_ARGS=--rate 2 --heartbeat-interval 1 --min-nse-equities 200 $data"
EOT
for u in feed-zerodha feed-kite-token; do
cat > /etc/systemd/system/$u.service.d/demo.conf <<EOT
[Unit]
Wants=feed-sim-kite.service
After=feed-sim-kite.service
[Service]
Environment=FEEDS_KITE_CONFIG=/etc/feeds/kite-demo.toml
EOT
done
sed -e 's|^api_key = .*|api_key = "simkey"|' \
    -e 's|^api_url = .*|api_url = "http://127.0.0.1:9300"|' \
    -e 's|^ticker_url = .*|ticker_url = "ws://127.0.0.1:9300/"|' \
    -e 's|^login_url = .*|login_url = "http://127.0.0.1:9300"|' \
    -e 's|^instruments_file = .*|instruments_file = "/etc/feeds/kite-demo-instruments.txt"|' \
    -e 's|^session_calendar = .*|session_calendar = "none"|' \
    -e 's|^status_interval = .*|status_interval = 2|' \
    /etc/feeds/kite.toml > /etc/feeds/kite-demo.toml
printf 'NSE:INFY full\nNSE:RELIANCE quote\nNSE:NIFTY 50 full\nNSE:SIMEQ00001 ltp\n' > /etc/feeds/kite-demo-instruments.txt
chown root:feeds_kite /etc/feeds/kite-demo.toml /etc/feeds/kite-demo-instruments.txt
chmod 640 /etc/feeds/kite-demo.toml /etc/feeds/kite-demo-instruments.txt
umask 077
echo simsecret > /etc/feeds/secrets/kite-api-secret
echo simpassword > /etc/feeds/secrets/kite-password
echo JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP > /etc/feeds/secrets/kite-totp-secret
chown feeds_kite:feeds_kite /etc/feeds/secrets/kite-*
systemctl daemon-reload
systemctl enable --now feed-kite-token.timer feed-zerodha.timer >/dev/null 2>&1
systemctl start feed-sim-kite.service
EOF
waitfor 30 $I bash -c 'exec 3<>/dev/tcp/127.0.0.1/9300' && ok "feed-sim-kite listening on 127.0.0.1:9300" \
    || bad "simulator not listening"

# --- timers ---------------------------------------------------------------------------------------
lt=$($I systemctl list-timers --all --no-pager)
for t in feed-kite-token.timer feed-zerodha.timer; do
    line=$(echo "$lt" | grep " $t ")
    if [ -n "$line" ] && ! contains "$line" '^n/a'; then ok "list-timers: $(echo "$line" | tr -s ' ')"
    else bad "$t not listed with a next elapse"; echo "$lt"; fi
done
next_ist() { TZ=Asia/Kolkata date -d "$(prop "$1" NextElapseUSecRealtime)" '+%a %H:%M'; }
n1=$(next_ist feed-kite-token.timer); n2=$(next_ist feed-zerodha.timer)
case "$n1" in Mon\ 08:00|Tue\ 08:00|Wed\ 08:00|Thu\ 08:00|Fri\ 08:00) ok "feed-kite-token.timer next: $n1 IST";;
     *) bad "feed-kite-token.timer next elapse $n1 IST";; esac
case "$n2" in Mon\ 09:10|Tue\ 09:10|Wed\ 09:10|Thu\ 09:10|Fri\ 09:10) ok "feed-zerodha.timer next: $n2 IST";;
     *) bad "feed-zerodha.timer next elapse $n2 IST";; esac

# --- the renewal in headless Chromium -----------------------------------------------------------------
t=$(date +%s)
if $I systemctl start feed-kite-token.service; then
    ok "feed-kite-token: Result=$(prop feed-kite-token Result) ($(( $(date +%s) - t ))s)"
else
    bad "feed-kite-token failed"; $I journalctl -u feed-kite-token --no-pager | tail -20
fi
jt=$($I journalctl -u feed-kite-token --no-pager)
grep -q "new access token stored in /var/lib/feeds/kite/access_token.json (user AB1234, .* by browser" <<< "$jt" \
    && ok "journal: token obtained in headless Chromium and validated" || { bad "no browser login line"; echo "$jt" | tail -20; }
perm=$($I stat -c '%a %U' /var/lib/feeds/kite/access_token.json 2>/dev/null)
[ "$perm" = "600 feeds_kite" ] && ok "token file mode 0600, owner feeds_kite" || bad "token file: '$perm'"
{ $I runuser -u feeds_binance -- cat /var/lib/feeds/kite/access_token.json >/dev/null 2>&1 ||
  $I runuser -u feeds_binance -- cat /etc/feeds/secrets/kite-password >/dev/null 2>&1; } \
    && bad "feeds_binance reads the Kite token or secrets" || ok "as feeds_binance, reading the Kite token and secrets fails"
grep -q -e simpassword -e JBSWY3DPEHPK3PXP -e simsecret <<< "$jt" && bad "a secret is in the journal" \
    || ok "no credential in the renewal's journal"
$I runuser -u feeds_kite -- env FEEDS_KITE_CONFIG=/etc/feeds/kite-demo.toml /opt/feeds/bin/feed-kite-token --check \
    >/dev/null 2>&1 && ok "feed-kite-token --check: valid" || bad "--check"

# --- the collector --------------------------------------------------------------------------------------
t=$(date +%s)
$I systemctl start feed-zerodha.service || bad "systemctl start feed-zerodha"
[ "$(prop feed-zerodha ActiveState)" = active ] && ok "feed-zerodha active (Type=notify, READY after the first batch, $(( $(date +%s) - t ))s)" \
    || bad "feed-zerodha not active: $(prop feed-zerodha ActiveState)/$(prop feed-zerodha SubState)"
[ "$(prop feed-zerodha User)" = feeds_kite ] && ok "runs as its own unprivileged user feeds_kite" \
    || bad "user: $(prop feed-zerodha User)"
waitfor 10 jgrep feed-kite-token "nothing to do" \
    && ok "the renewal ran first (ordered before feed-zerodha) and found the token valid" || bad "renewal not re-checked"
n1=$(sql "select count(*) from kite_tick_full"); sleep 4; n2=$(sql "select count(*) from kite_tick_full")
[ "${n2:-0}" -gt "${n1:-0}" ] && ok "ticks in PostgreSQL, growing: kite_tick_full $n1 -> $n2" || bad "full ticks not growing ($n1 -> $n2)"
ki=$(sql "select count(*) from kite_instrument")
[ "${ki:-0}" -ge 4 ] && ok "kite_instrument upserted by role feeds_kite: $ki rows" || bad "kite_instrument: '$ki' rows"
q=$(sql "select count(*) from kite_tick_quote"); l=$(sql "select count(*) from kite_tick_ltp")
[ "${q:-0}" -gt 0 ] && [ "${l:-0}" -gt 0 ] && ok "quote $q rows, ltp $l rows" || bad "quote/ltp empty ($q/$l)"
if $I test -d /opt/shared-data/kite; then
    infy=$(sql "select last_price, exchange_timestamp from kite_tick_full where instrument_token = 408065 limit 1")
    [ "$infy" = "1573.70|2021-07-05 05:11:27+00" ] && ok "recorded INFY full tick stored: $infy" || bad "INFY row: '$infy'"
fi
sleep 3
j=$($I journalctl -u feed-zerodha --no-pager)
grep -q "feed-zerodha starting" <<< "$j" && grep -q "status: " <<< "$j" \
    && ok "journalctl -u feed-zerodha shows start-up and status" || { bad "journal lacks start-up/status"; echo "$j" | tail; }
st=$(prop feed-zerodha StatusText); [ -n "$st" ] && ok "systemctl status line: $st" || bad "no StatusText"
hb=$(sql "select state from feed_heartbeat where unit = 'feed-zerodha.service'")
[ "$hb" = running ] && ok "heartbeat row: running (written by role feeds_kite)" || bad "heartbeat: '$hb'"
refused feeds_kite "insert into binance_kline (symbol, interval, open_time, close_time, open, high, low, close,
        volume, trade_count, quote_volume, taker_buy_volume, taker_buy_quote_volume, recv_time, source)
        values ('X', '1m', now(), now(), 1, 1, 1, 1, 1, 1, 1, 1, 1, now(), 'ws')" "permission denied for table binance_kline" \
    && refused feeds_kite "truncate kite_tick_full" "permission denied for table kite_tick_full" \
    && ok "as role feeds_kite, INSERT into binance_kline and TRUNCATE kite_tick_full refused" \
    || bad "feeds_kite privileges too wide"

$I systemctl stop feed-zerodha
res=$(prop feed-zerodha Result); code=$(prop feed-zerodha ExecMainStatus)
[ "$res" = success ] && [ "$code" = 0 ] && ok "systemctl stop: clean exit (Result=$res, status $code)" \
    || bad "stop: Result=$res status=$code"
waitfor 10 jgrep feed-zerodha "stopped: all rows committed or spooled" \
    && ok "journal: buffer flushed at stop" || bad "no flush line at stop"

# --- a missing token: one clear line, exit 77, no restart -------------------------------------------------
$I mv /var/lib/feeds/kite/access_token.json /var/lib/feeds/kite/access_token.json.keep
$I systemctl reset-failed feed-zerodha 2>/dev/null
$I systemctl start --job-mode=ignore-dependencies feed-zerodha 2>/dev/null
waitfor 20 state_is feed-zerodha failed
code=$(prop feed-zerodha ExecMainStatus); nr=$(prop feed-zerodha NRestarts)
[ "$code" = 77 ] && [ "$nr" = 0 ] && ok "missing token: exit 77, not restarted (NRestarts $nr)" \
    || bad "missing token: status $code, NRestarts $nr, $(prop feed-zerodha ActiveState)"
waitfor 10 jgrep feed-zerodha "feed-zerodha: no access token in /var/lib/feeds/kite/access_token.json: run feed-kite-token" \
    && ok "journal: one line naming the token file" || bad "no missing-token line"
$I mv /var/lib/feeds/kite/access_token.json.keep /var/lib/feeds/kite/access_token.json

# --- a day without a session: ends at once, successfully -----------------------------------------------------
today=$(TZ=Asia/Kolkata date +%F)
$I bash -c "sed -e 's|^session_calendar = .*|session_calendar = \"XNSE\"|' -e 's|^extra_holidays = .*|extra_holidays = [\"$today\"]|' \
    /etc/feeds/kite-demo.toml > /etc/feeds/kite-holiday.toml && chown root:feeds_kite /etc/feeds/kite-holiday.toml && chmod 640 /etc/feeds/kite-holiday.toml
    printf '[Service]\nEnvironment=FEEDS_KITE_CONFIG=/etc/feeds/kite-holiday.toml\n' > /etc/systemd/system/feed-zerodha.service.d/zz-holiday.conf
    systemctl daemon-reload; systemctl reset-failed feed-zerodha"
t=$(date +%s)
$I systemctl start --job-mode=ignore-dependencies feed-zerodha
waitfor 30 state_is feed-zerodha inactive
res=$(prop feed-zerodha Result); code=$(prop feed-zerodha ExecMainStatus)
[ "$res" = success ] && [ "$code" = 0 ] && ok "day without a session: exited at once with success ($(( $(date +%s) - t ))s)" \
    || bad "no-session day: Result=$res status=$code $(prop feed-zerodha ActiveState)"
waitfor 10 jgrep feed-zerodha "no NSE session on .* $today (.*): nothing to collect, exiting" \
    && ok "journal: the no-session line" || bad "no holiday line"

echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
