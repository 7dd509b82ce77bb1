#!/bin/bash
# System test in a real systemd (tests/sdbox): the Dhan units against the Dhan simulator, and
# feed-indicators on the candles feed-dhan builds.
# install.sh (--no-start), then a demo setup done here (the simulator unit with a session open
# now, a configuration pointing at it, the simulator's PIN and TOTP secret as 0600 secret files,
# drop-ins): the units verify cleanly; the three timers listed with their next elapse (IST);
# feed-dhan-token gets a token with PIN + TOTP and stores it 0600 for feeds_dhan; feed-dhan
# started (the renewal runs first and finds the token valid): READY, ticks of every mode in
# PostgreSQL, one-minute candles once their minute has closed; feed-indicators started:
# SMA(2) and OBV rows for the Dhan candles, SMA equal to the mean of the stored closes; journal
# and status; a clean stop; an expired token (the simulator's fault) ends feed-dhan with exit 77
# and no restart; starting it again renews the token first (PIN + TOTP) and collects again.
# Prints PASS/FAIL lines; exit status 0 only if every check passed (77: skipped).
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-dhan-$$}
export SDTEST_NAME=${SDTEST_NAME:-feedsdhan$$}
source "$(dirname "$0")/lib.sh"
SHARED=${FEEDS_SHARED_DATA:-$REPO/../shared/data}
# sim_post PATH: POST to the simulator's control endpoint from inside the container
sim_post() { $I /opt/feeds/venv/bin/python -c 'import sys, urllib.request
print(urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:9400" + sys.argv[1], method="POST"),
                             timeout=10).read().decode())' "$1"; }
n_rows() { local n; n=$(sql "select count(*) from $1${2:+ where $2}" 2>/dev/null); echo "${n:-0}"; }
rows_at_least() { [ "$(n_rows "$1" "$3")" -ge "$2" ]; }     # rows_at_least TABLE N [WHERE]

need_port 5432 "a PostgreSQL on the host; the container's own cannot start"
need_port 9400 "the Dhan simulator unit's"
need_port 9850 "feed-dhan's metrics"
need_port 9840 "feed-indicators' metrics"
binds="$REPO:/opt/src:ro"
[ -d "$SHARED/dhan" ] && binds="$binds $(cd "$SHARED" && pwd):/opt/shared-data:ro"
boot "$binds"

install_bundle
units="feed-dhan.service feed-dhan.timer feed-dhan-token.service feed-dhan-token.timer feed-dhan-backfill.service
       feed-dhan-backfill.timer feed-sim-dhan.service feed-indicators.service"
missing=""
for u in $units; do $I test -f /etc/systemd/system/$u || missing="$missing $u"; done
[ -z "$missing" ] && ok "the Dhan units and feed-indicators installed in /etc/systemd/system" || bad "not installed:$missing"
out=$($I bash -c "cd /etc/systemd/system && systemd-analyze verify $(echo $units) 2>&1")
[ -z "$out" ] && ok "systemd-analyze verify prints nothing for the Dhan units and feed-indicators" \
    || { bad "systemd-analyze verify:"; echo "$out"; }

# --- demo setup: the simulator, a configuration pointing at it, its PIN and TOTP secret ----------
$I bash -s <<'EOF'
set -e
install -d /etc/systemd/system/feed-sim-dhan.service.d /etc/systemd/system/feed-indicators.service.d
data=""; [ -d /opt/shared-data/dhan ] && data="--data-dir /opt/shared-data/dhan"
cat > /etc/systemd/system/feed-sim-dhan.service.d/test.conf <<EOT
[Service]
Environment="FEEDS_SIM_DHAN_ARGS=--session-now --instruments 50 --rate 2 --client-id 1000000001 --pin 123456 --totp-secret JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP $data"
EOT
for u in feed-dhan feed-dhan-token feed-dhan-backfill; do
install -d /etc/systemd/system/$u.service.d
cat > /etc/systemd/system/$u.service.d/demo.conf <<EOT
[Unit]
Wants=feed-sim-dhan.service
After=feed-sim-dhan.service
[Service]
Environment=FEEDS_DHAN_CONFIG=/etc/feeds/dhan-demo.toml
EOT
done
sed -e 's|^client_id = .*|client_id = "1000000001"|' \
    -e 's|^api_url = .*|api_url = "http://127.0.0.1:9400"|' \
    -e 's|^auth_url = .*|auth_url = "http://127.0.0.1:9400"|' \
    -e 's|^feed_url = .*|feed_url = "ws://127.0.0.1:9400"|' \
    -e 's|^instrument_list_url = .*|instrument_list_url = "http://127.0.0.1:9400/api-data/api-scrip-master.csv"|' \
    -e 's|^instruments_file = .*|instruments_file = "/etc/feeds/dhan-demo-instruments.txt"|' \
    -e 's|^session_calendar = .*|session_calendar = "none"|' \
    -e 's|^status_interval = .*|status_interval = 2|' \
    -e 's|^method = .*|method = "totp"|' \
    /etc/feeds/dhan.toml > /etc/feeds/dhan-demo.toml
printf '%s\n' 'NSE_EQ:HDFCBANK full priority' 'NSE_EQ:SIMEQ00001 full' 'NSE_EQ:SIMEQ00002 quote' \
    'NSE_EQ:SIMEQ00003 ticker' 'IDX_I:NIFTY ticker' > /etc/feeds/dhan-demo-instruments.txt
cat > /etc/feeds/indicators-demo.toml <<EOT
# The demo: a two-bar SMA (a value from the second closed candle on) and OBV, on Dhan's one-minute candles.
[indicators]
functions = ["SMA(timeperiod=2)", "OBV"]
venues = ["dhan"]
intervals = [1]
warmup_bars = 50
poll_interval = 1.0
status_interval = 2
EOT
cat > /etc/systemd/system/feed-indicators.service.d/demo.conf <<EOT
[Service]
Environment=FEEDS_INDICATORS_CONFIG=/etc/feeds/indicators-demo.toml
EOT
chown root:feeds_dhan /etc/feeds/dhan-demo.toml /etc/feeds/dhan-demo-instruments.txt
chown root:feeds_indicators /etc/feeds/indicators-demo.toml
chmod 640 /etc/feeds/dhan-demo.toml /etc/feeds/dhan-demo-instruments.txt /etc/feeds/indicators-demo.toml
umask 077
echo 123456 > /etc/feeds/secrets/dhan-pin
echo JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP > /etc/feeds/secrets/dhan-totp-secret
chown feeds_dhan:feeds_dhan /etc/feeds/secrets/dhan-pin /etc/feeds/secrets/dhan-totp-secret
systemctl daemon-reload
systemctl enable --now feed-dhan-token.timer feed-dhan.timer feed-dhan-backfill.timer >/dev/null 2>&1
systemctl start feed-sim-dhan.service
EOF
waitfor 60 $I bash -c 'exec 3<>/dev/tcp/127.0.0.1/9400' && ok "feed-sim-dhan listening on 127.0.0.1:9400" \
    || { bad "simulator not listening"; $I journalctl -u feed-sim-dhan --no-pager | tail -20; }
sess=$($I /opt/feeds/venv/bin/python -c 'import json, urllib.request
s = json.load(urllib.request.urlopen("http://127.0.0.1:9400/sim/session", timeout=10)); print(s.get("open"), s.get("kind"))' 2>&1)
contains "$sess" '^True' && ok "the simulator's session is open now ($sess)" || bad "simulator session: $sess"

# --- timers ---------------------------------------------------------------------------------------
lt=$($I systemctl list-timers --all --no-pager)
for t in feed-dhan-token.timer feed-dhan.timer feed-dhan-backfill.timer; do
    line=$(echo "$lt" | grep " $t ")
    if [ -n "$line" ] && ! contains "$line" '^n/a'; then ok "list-timers: $(echo "$line" | tr -s ' ')"
    else bad "$t not listed with a next elapse"; echo "$lt"; fi
done
next_ist() { TZ=Asia/Kolkata date -d "$(prop "$1" NextElapseUSecRealtime)" '+%a %H:%M'; }
n1=$(next_ist feed-dhan-token.timer); n2=$(next_ist feed-dhan.timer); n3=$(next_ist feed-dhan-backfill.timer)
case "$n1" in *\ 08:00|*\ 21:00) ok "feed-dhan-token.timer next: $n1 IST";;
     *) bad "feed-dhan-token.timer next elapse $n1 IST";; esac
case "$n2" in Mon\ 09:10|Tue\ 09:10|Wed\ 09:10|Thu\ 09:10|Fri\ 09:10) ok "feed-dhan.timer next: $n2 IST";;
     *) bad "feed-dhan.timer next elapse $n2 IST";; esac
case "$n3" in Mon\ 20:00|Tue\ 20:00|Wed\ 20:00|Thu\ 20:00|Fri\ 20:00|Sat\ 20:00) ok "feed-dhan-backfill.timer next: $n3 IST";;
     *) bad "feed-dhan-backfill.timer next elapse $n3 IST";; esac

# --- the token: PIN + TOTP ------------------------------------------------------------------------------
TOKEN=/var/lib/feeds/dhan/access_token.json
t=$(date +%s)
if $I systemctl start feed-dhan-token.service; then
    ok "feed-dhan-token: Result=$(prop feed-dhan-token Result) ($(( $(date +%s) - t ))s)"
else
    bad "feed-dhan-token failed"; $I journalctl -u feed-dhan-token --no-pager | tail -20
fi
jt=$($I journalctl -u feed-dhan-token --no-pager)
grep -q "new access token stored in $TOKEN (client 1000000001, .* from PIN + TOTP" <<< "$jt" \
    && ok "journal: token obtained from the simulator with PIN + TOTP" || { bad "no PIN + TOTP token line"; echo "$jt" | tail -20; }
grep -q "profile check: client 1000000001" <<< "$jt" && ok "journal: the new token checked with the profile endpoint" \
    || bad "no profile check line"
perm=$($I stat -c '%a %U' $TOKEN 2>/dev/null)
[ "$perm" = "600 feeds_dhan" ] && ok "token file mode 0600, owner feeds_dhan" || bad "token file: '$perm'"
{ $I runuser -u feeds_kite -- cat $TOKEN >/dev/null 2>&1 ||
  $I runuser -u feeds_kite -- cat /etc/feeds/secrets/dhan-pin >/dev/null 2>&1 ||
  $I runuser -u feeds_kite -- cat /etc/feeds/secrets/dhan-totp-secret >/dev/null 2>&1; } \
    && bad "feeds_kite reads the Dhan token or secrets" || ok "as feeds_kite, reading the Dhan token and secrets fails"
grep -q -e JBSWY3DPEHPK3PXP -e 'pin=' -e 'totp=' <<< "$jt" && bad "a secret is in the journal" \
    || ok "no credential in the token unit's journal"
$I runuser -u feeds_dhan -- env FEEDS_DHAN_CONFIG=/etc/feeds/dhan-demo.toml /opt/feeds/bin/feed-dhan-token --check \
    >/dev/null 2>&1 && ok "feed-dhan-token --check: valid" || bad "--check"

# --- the collector --------------------------------------------------------------------------------------
t=$(date +%s)
$I systemctl start feed-dhan.service || bad "systemctl start feed-dhan"
[ "$(prop feed-dhan ActiveState)" = active ] \
    && ok "feed-dhan active (Type=notify, READY after the first batch, $(( $(date +%s) - t ))s)" \
    || { bad "feed-dhan not active: $(prop feed-dhan ActiveState)/$(prop feed-dhan SubState)"
         $I journalctl -u feed-dhan --no-pager | tail -30; }
started=$(date +%s)
[ "$(prop feed-dhan User)" = feeds_dhan ] && ok "runs as its own unprivileged user feeds_dhan" \
    || bad "user: $(prop feed-dhan User)"
waitfor 10 jgrep feed-dhan-token "nothing to do" \
    && ok "the renewal ran first (ordered before feed-dhan) and found the token valid" || bad "renewal not re-checked"
n1=$(n_rows dhan_tick_full); sleep 4; n2=$(n_rows dhan_tick_full)
[ "$n2" -gt "$n1" ] && ok "ticks in PostgreSQL, growing: dhan_tick_full $n1 -> $n2" || bad "full ticks not growing ($n1 -> $n2)"
q=$(n_rows dhan_tick_quote); tk=$(n_rows dhan_tick_ticker)
[ "$q" -gt 0 ] && [ "$tk" -gt 0 ] && ok "quote $q rows, ticker $tk rows" || bad "quote/ticker empty ($q/$tk)"
idx=$(n_rows dhan_tick_ticker "exchange_segment = 'IDX_I' and security_id = 13")
[ "$idx" -gt 0 ] && ok "NIFTY 50 (IDX_I 13) ticker rows: $idx" || bad "no NIFTY ticker rows"
pc=$(n_rows dhan_prev_close)
[ "$pc" -gt 0 ] && ok "previous-close rows: $pc" || bad "no dhan_prev_close rows"
di=$(n_rows dhan_instrument "symbol in ('HDFCBANK', 'SIMEQ00001', 'SIMEQ00002', 'SIMEQ00003', 'NIFTY')")
[ "$di" -ge 5 ] && ok "dhan_instrument upserted by role feeds_dhan: $di of 5 rows" || bad "dhan_instrument: $di of 5 rows"
sleep 2
j=$($I journalctl -u feed-dhan --no-pager)
grep -q "feed-dhan starting: config /etc/feeds/dhan-demo.toml, 5 instruments" <<< "$j" && grep -q "status: " <<< "$j" \
    && ok "journalctl -u feed-dhan shows start-up and status" || { bad "journal lacks start-up/status"; echo "$j" | tail; }
echo "$j" | grep -m1 "feed-dhan starting" | sed 's/^/      /'
echo "$j" | grep "status: " | tail -1 | sed 's/^/      /'
st=$(prop feed-dhan StatusText); [ -n "$st" ] && ok "systemctl status line: $st" || bad "no StatusText"
hb=$(sql "select state from feed_heartbeat where unit = 'feed-dhan.service'")
[ "$hb" = running ] && ok "heartbeat row: running (written by role feeds_dhan)" || bad "heartbeat: '$hb'"
refused feeds_dhan "insert into kite_tick_ltp (instrument_token, last_price, recv_time) values (1, 1, now())" \
        "permission denied for table kite_tick_ltp" \
    && refused feeds_dhan "truncate dhan_tick_full" "permission denied for table dhan_tick_full" \
    && ok "as role feeds_dhan, INSERT into kite_tick_ltp and TRUNCATE dhan_tick_full refused" \
    || bad "feeds_dhan privileges too wide"

# --- indicators on the Dhan candles -----------------------------------------------------------------------
t=$(date +%s)
$I systemctl start feed-indicators.service || bad "systemctl start feed-indicators"
[ "$(prop feed-indicators ActiveState)" = active ] \
    && ok "feed-indicators active (READY after the warm-up, $(( $(date +%s) - t ))s, user $(prop feed-indicators User))" \
    || { bad "feed-indicators not active: $(prop feed-indicators ActiveState)"; $I journalctl -u feed-indicators --no-pager | tail -20; }
# the minute feed-dhan started in closes at its end + candles.grace; allow two more minutes after
fin="interval_min = 1 and final and source = 'live'"
if waitfor 170 rows_at_least dhan_candle 1 "$fin"; then
    ok "one-minute candles in dhan_candle after their minute closed ($(( $(date +%s) - started ))s after the start)"
    sql "select exchange_segment || ':' || security_id, bar_start, open, high, low, close, volume, ticks from dhan_candle
         where $fin order by bar_start, exchange_segment, security_id limit 5" | sed 's/^/      /'
else
    bad "no final one-minute candle in dhan_candle ($(( $(date +%s) - started ))s after the start)"
    sql "select interval_min, final, source, count(*) from dhan_candle group by 1, 2, 3" | sed 's/^/      /'
fi
nc=$(sql "select count(distinct (exchange_segment, security_id)) from dhan_candle where $fin")
[ "${nc:-0}" -ge 5 ] && ok "final one-minute candles for all $nc instruments" || bad "final candles for ${nc:-0} of 5 instruments"
sma="venue = 'dhan' and indicator = 'SMA(timeperiod=2)' and interval_min = 1"
if waitfor 200 rows_at_least indicator_value 1 "$sma"; then
    ok "SMA(timeperiod=2) rows for Dhan candles in indicator_value ($(( $(date +%s) - started ))s after the start): $(n_rows indicator_value "$sma")"
else
    bad "no SMA(timeperiod=2) row for Dhan candles ($(( $(date +%s) - started ))s after the start)"
    sql "select venue, interval_min, indicator, output, count(*) from indicator_value group by 1, 2, 3, 4" | sed 's/^/      /'
    $I journalctl -u feed-indicators --no-pager | tail -20
fi
obv=$(n_rows indicator_value "venue = 'dhan' and indicator = 'OBV' and interval_min = 1")
[ "$obv" -gt 0 ] && ok "OBV rows for Dhan candles: $obv" || bad "no OBV rows for Dhan candles"
# each SMA(2) value = the mean of the two stored closes (the newest revision of each final candle)
bad_sma=$(sql "with c as (select distinct on (exchange_segment, security_id, bar_start)
                                 exchange_segment || ':' || security_id as instrument, bar_start, close
                            from dhan_candle where interval_min = 1 and final
                           order by exchange_segment, security_id, bar_start, recorded_at desc),
                    e as (select instrument, bar_start,
                                 (close + lag(close) over (partition by instrument order by bar_start)) / 2 as want
                            from c)
               select count(*) filter (where e.want is null or abs(i.value - e.want::float8) > 1e-9 * abs(e.want::float8)),
                      count(*)
                 from indicator_latest i left join e using (instrument, bar_start)
                where i.venue = 'dhan' and i.indicator = 'SMA(timeperiod=2)' and i.interval_min = 1")
[ -n "$bad_sma" ] && [ "${bad_sma%%|*}" = 0 ] && [ "${bad_sma#*|}" -gt 0 ] \
    && ok "every SMA(2) value equals the mean of the two stored closes (${bad_sma#*|} values)" \
    || bad "SMA(2) values differ from the stored closes (differing|total: '$bad_sma')"
ji=$($I journalctl -u feed-indicators --no-pager)
grep -q "feed-indicators starting: config /etc/feeds/indicators-demo.toml" <<< "$ji" && grep -q "status: " <<< "$ji" \
    && ok "journalctl -u feed-indicators shows start-up and status" || { bad "feed-indicators journal"; echo "$ji" | tail; }

# --- a clean stop ---------------------------------------------------------------------------------------
$I systemctl stop feed-dhan
res=$(prop feed-dhan Result); code=$(prop feed-dhan ExecMainStatus)
[ "$res" = success ] && [ "$code" = 0 ] && ok "systemctl stop: clean exit (Result=$res, status $code)" \
    || bad "stop: Result=$res status=$code"
waitfor 10 jgrep feed-dhan "stopped: all rows committed or spooled" \
    && ok "journal: buffer flushed at stop (stopped: all rows committed or spooled)" || bad "no flush line at stop"

# --- an expired token: Dhan's 807, one clear line, exit 77, no restart ------------------------------------------
$I systemctl start feed-dhan.service || bad "systemctl start feed-dhan (again)"
state_is feed-dhan active || bad "feed-dhan not active again: $(prop feed-dhan ActiveState)"
nr0=$(prop feed-dhan NRestarts)
out=$(sim_post /sim/fault/expire_token 2>&1)
contains "$out" '"affected":[1-9]' || bad "expire_token fault: $out"
waitfor 60 state_is feed-dhan failed
sleep 8     # RestartSec=5: a restart would have happened by now
code=$(prop feed-dhan ExecMainStatus); nr=$(prop feed-dhan NRestarts); as=$(prop feed-dhan ActiveState)
[ "$code" = 77 ] && [ "$nr" = "$nr0" ] && [ "$as" = failed ] \
    && ok "expired token (disconnect 807): exit 77, not restarted (NRestarts $nr, $as)" \
    || bad "expired token: status $code, NRestarts $nr0 -> $nr, $as"
waitfor 10 jgrep feed-dhan "Dhan disconnected it with code 807" \
    && ok "journal: the disconnect code 807 with its meaning" || bad "no 807 line"
waitfor 10 jgrep feed-dhan "Dhan refused the access token during the session; run feed-dhan-token" \
    && ok "journal: one line telling to run feed-dhan-token" || bad "no token-refused line"
$I journalctl -u feed-dhan --no-pager | grep -e "807" -e "refused the access token" | tail -3 | sed 's/^/      /'

# --- started again: the renewal generates a new token first, collection resumes ---------------------------------
$I systemctl reset-failed feed-dhan
$I systemctl start feed-dhan.service
state_is feed-dhan active && waitfor 10 jgrep feed-dhan-token "generating a new access token with PIN + TOTP: Dhan refused the stored token" \
    && ok "systemctl start feed-dhan after the expiry: feed-dhan-token generated a new token first, feed-dhan active" \
    || { bad "no recovery after the expiry: feed-dhan $(prop feed-dhan ActiveState)"; $I journalctl -u feed-dhan-token --no-pager | tail -8; }
$I systemctl stop feed-dhan feed-indicators
res=$(prop feed-indicators Result); code=$(prop feed-indicators ExecMainStatus)
[ "$res" = success ] && [ "$code" = 0 ] && ok "feed-indicators stopped cleanly (Result=$res, status $code)" \
    || bad "feed-indicators stop: Result=$res status=$code"

echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
