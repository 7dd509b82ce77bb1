#!/bin/bash
# System test in a real systemd (tests/sdbox): feed-ibkr, the IBKR live collector, as
# `install.sh --demo` sets it up: the TWS simulator (feed-sim-tws.service) in live mode and
# feed-ibkr pointed at it through the demo drop-in (/etc/feeds/ibkr-demo.toml: no exchange
# calendar, so it collects at any hour). feed-ibkr.timer listed with its next elapse on a
# weekday before the New York open; install.sh started feed-ibkr; the journal shows its
# start-up and a status line; trades, quotes and index ticks in PostgreSQL, and candles;
# `systemctl stop` is clean and writes the open candles (final = false); `systemctl start`
# brings it back.
# Prints PASS/FAIL lines; exit status 0 only if every check passed (77: skipped).
#   SDT_WAIT_5432=SECONDS  wait that long for another test's PostgreSQL to free port 5432
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-ibkr-$$}
export SDTEST_NAME=${SDTEST_NAME:-feedsibkr$$}
source "$(dirname "$0")/lib.sh"
count() { local n; n=$(sql "select count(*) from $1" 2>/dev/null); echo "${n:-0}"; }
growing() { local a b; a=$(count "$1"); sleep "${2:-3}"; b=$(count "$1"); echo "$a -> $b"; [ "$b" -gt "$a" ]; }
has_rows() { [ "$(count "$1")" -gt 0 ]; }

need_port 5432 "a PostgreSQL on the host; the container's own cannot start" "${SDT_WAIT_5432:-0}"
# install.sh --demo starts every simulator: each needs its port on the (shared) host network
need_port 7497 "the TWS simulator unit's"
need_port 19100 "the Binance simulator unit's"
need_port 9300 "the Kite simulator unit's"
boot "$REPO:/opt/src:ro"

install_bundle --demo
grep 'install.sh:' "$SDTEST_DIR/install.log" | sed 's/^/    /'

for u in feed-ibkr.service feed-ibkr.timer feed-sim-tws.service; do
    $I test -f /etc/systemd/system/$u && ok "$u installed" || bad "$u not installed"
done
$I test -x /opt/feeds/bin/feed-ibkr && $I test -f /etc/feeds/ibkr-demo.toml \
    && ok "bin/feed-ibkr and /etc/feeds/ibkr-demo.toml installed" || bad "program or demo configuration missing"
perm=$($I stat -c '%a %G' /etc/feeds/ibkr-demo.toml 2>/dev/null)
[ "$perm" = "640 feeds_ibkr" ] && ok "ibkr-demo.toml mode 640, group feeds_ibkr" || bad "ibkr-demo.toml: '$perm'"
$I grep -q "FEEDS_IBKR_CONFIG=/etc/feeds/ibkr-demo.toml" /etc/systemd/system/feed-ibkr.service.d/demo.conf 2>/dev/null \
    && ok "demo drop-in points feed-ibkr at /etc/feeds/ibkr-demo.toml" || bad "no demo drop-in for feed-ibkr"
out=$($I bash -c 'systemd-analyze verify /etc/systemd/system/feed-ibkr.service /etc/systemd/system/feed-ibkr.timer /etc/systemd/system/feed-sim-tws.service 2>&1')
[ -z "$out" ] && ok "systemd-analyze verify prints nothing for feed-ibkr and feed-sim-tws" \
    || { bad "systemd-analyze verify:"; echo "$out"; }
[ "$(sql "select count(*) from schema_migrations where version in ('0006', '0007')")" = 2 ] \
    && ok "migrations 0006_candles and 0007_ibkr_live applied" || bad "migrations 0006/0007 not applied"

# The other demo collectors are not under test: stop them, so that feed-ibkr has the CPUs.
$I systemctl stop feed-binance.service feed-sim-binance.service feed-zerodha.service feed-sim-kite.service \
    feed-backfill.service feed-zerodha.timer feed-kite-token.timer 2>/dev/null

# --- the timer: Mon..Fri, before the 09:30 New York open ---------------------------------------------
lt=$($I systemctl list-timers --all --no-pager feed-ibkr.timer)
line=$(echo "$lt" | grep " feed-ibkr.timer ")
[ -n "$line" ] && ! contains "$line" '^n/a' && ok "list-timers: $(echo "$line" | tr -s ' ')" \
    || { bad "feed-ibkr.timer not listed with a next elapse"; echo "$lt"; }
cal=$(prop feed-ibkr.timer TimersCalendar)
contains "$cal" "America/New_York" && ok "OnCalendar written in America/New_York: $cal" || bad "calendar: $cal"
next=$(prop feed-ibkr.timer NextElapseUSecRealtime)
ny=$(TZ=America/New_York date -d "$next" '+%a %H%M' 2>/dev/null)
case "${ny%% *}" in Mon|Tue|Wed|Thu|Fri) weekday=1 ;; *) weekday=0 ;; esac
[ "$weekday" = 1 ] && [ "$((10#${ny#* }))" -lt 930 ] \
    && ok "feed-ibkr.timer next elapse $next = $(TZ=America/New_York date -d "$next" '+%a %H:%M %Z') (a weekday, before 09:30 New York)" \
    || bad "feed-ibkr.timer next elapse $next = '$ny'"
[ "$(prop feed-ibkr.timer ActiveState)" = active ] && ok "feed-ibkr.timer active (enabled by install.sh)" \
    || bad "timer state $(prop feed-ibkr.timer ActiveState)"

# --- the simulator in live mode ---------------------------------------------------------------------------
waitfor 30 $I bash -c 'ss -ltn | grep -q 127.0.0.1:7497' && ok "feed-sim-tws listening on 127.0.0.1:7497" \
    || bad "feed-sim-tws not listening ($(prop feed-sim-tws ActiveState))"
contains "$(prop feed-sim-tws ExecStart)$(prop feed-sim-tws Environment)" "--live-rate" \
    && ok "feed-sim-tws runs in live mode (--live-rate)" || bad "feed-sim-tws without --live-rate"

# --- the collector, started by install.sh --demo -----------------------------------------------------------
waitfor 120 state_is feed-ibkr active
[ "$(prop feed-ibkr ActiveState)" = active ] \
    && ok "feed-ibkr active after install.sh --demo (READY after the first batch)" \
    || bad "feed-ibkr not active: $(prop feed-ibkr ActiveState)/$(prop feed-ibkr SubState) Result=$(prop feed-ibkr Result)"
[ "$(prop feed-ibkr User)" = feeds_ibkr ] && ok "runs as its own unprivileged user feeds_ibkr" \
    || bad "user: $(prop feed-ibkr User)"

r=$(growing ibkr_trade 4) && ok "ticks in PostgreSQL, growing: ibkr_trade $r" || bad "ibkr_trade not growing ($r)"
waitfor 30 has_rows ibkr_quote && ok "ibkr_quote: $(count ibkr_quote) rows" || bad "ibkr_quote empty"
waitfor 30 has_rows ibkr_index_tick && ok "ibkr_index_tick: $(count ibkr_index_tick) rows (SPX)" \
    || bad "ibkr_index_tick empty"
syms=$(sql "select string_agg(distinct symbol, ',' order by symbol) from ibkr_trade")
[ -n "$syms" ] && ok "trades for $syms" || bad "no symbols in ibkr_trade"
# The minute feed-ibkr started in gives an incomplete candle (final = false, written at the stop);
# the next one closes at its end plus the grace (2 s): at most two minutes and some away.
live_final="ibkr_candle where source = 'live' and final and interval_min = 1"
waitfor 150 has_rows "$live_final" && ok "closed one-minute candles in ibkr_candle: $(count "$live_final") (source live, final)" \
    || { bad "no final live candle in ibkr_candle"; sql "select symbol, interval_min, bar_start, final, source from ibkr_candle limit 10"; }
bad_ohlc=$(count "ibkr_candle where not (low <= least(open, close) and high >= greatest(open, close) and ticks > 0)")
[ "$bad_ohlc" = 0 ] && ok "every candle has low <= open, close <= high and ticks > 0" || bad "$bad_ohlc candles with bad OHLC"
spx=$(sql "select count(*), count(volume) from ibkr_candle where symbol = 'SPX'")
[ "${spx%%|*}" -gt 0 ] 2>/dev/null && [ "${spx#*|}" = 0 ] && ok "SPX (an index) candles without volume (${spx%%|*} rows)" \
    || echo "    (SPX candles: ${spx:-none} rows|with volume)"

sleep 2
j=$($I journalctl -u feed-ibkr --no-pager -o cat)
contains "$j" "feed-ibkr starting" && contains "$j" "status: " \
    && ok "journalctl -u feed-ibkr shows start-up and status" || { bad "journal lacks start-up/status"; echo "$j" | tail -20; }
echo "$j" | grep -m1 "feed-ibkr starting" | sed 's/^/    /'
echo "$j" | grep "status: " | tail -1 | sed 's/^/    /'
st=$(prop feed-ibkr StatusText); [ -n "$st" ] && ok "systemctl status line: $st" || bad "no StatusText"
hb=$(sql "select state from feed_heartbeat where unit = 'feed-ibkr.service'")
[ "$hb" = running ] && ok "heartbeat row: running (written by role feeds_ibkr)" || bad "heartbeat: '$hb'"
refused feeds_ibkr "truncate ibkr_trade" "permission denied for table ibkr_trade" \
    && refused feeds_ibkr "drop table ibkr_candle" "must be owner of table ibkr_candle" \
    && ok "as role feeds_ibkr, TRUNCATE ibkr_trade and DROP TABLE ibkr_candle refused" || bad "feeds_ibkr privileges too wide"

# --- a clean stop writes the open candles ---------------------------------------------------------------------
before=$(count "ibkr_candle where not final")
t=$(date +%s)
$I systemctl stop feed-ibkr 2>/dev/null     # (systemctl warns that the timer may start it again)
res=$(prop feed-ibkr Result); code=$(prop feed-ibkr ExecMainStatus)
[ "$res" = success ] && [ "$code" = 0 ] && ok "systemctl stop: clean exit (Result=$res, status $code, $(( $(date +%s) - t ))s)" \
    || bad "stop: Result=$res status=$code"
waitfor 10 jgrep feed-ibkr "stopped: all rows committed or spooled" \
    && ok "journal, clean stop line: $($I journalctl -u feed-ibkr --no-pager -o cat | grep 'stopped: ' | tail -1 | sed 's/.*stopped: /stopped: /')" \
    || bad "no clean stop line"
after=$(count "ibkr_candle where not final")
open_iv=$(sql "select string_agg(distinct interval_min::text, ',' order by interval_min::text) from ibkr_candle where not final and source = 'live'")
[ "$after" -gt "$before" ] && ok "open candles written at stop with final = false: $before -> $after rows (intervals ${open_iv:-none})" \
    || bad "no final = false candles written at stop ($before -> $after)"
stopped_at=$(sql "select max(recv_time) from ibkr_trade")

# --- and back -----------------------------------------------------------------------------------------------------
$I systemctl start feed-ibkr || bad "systemctl start feed-ibkr"
[ "$(prop feed-ibkr ActiveState)" = active ] && ok "systemctl start feed-ibkr: active again" \
    || bad "not active after start: $(prop feed-ibkr ActiveState)/$(prop feed-ibkr SubState)"
waitfor 30 has_rows "ibkr_trade where recv_time > '$stopped_at'" && ok "ticks stored again after the restart" \
    || bad "no ticks after the restart"
[ "$(echo "$($I journalctl -u feed-ibkr --no-pager -o cat)" | grep -c 'feed-ibkr starting')" -ge 2 ] \
    && ok "journal: a second start-up line" || bad "no second start-up line"
$I systemctl stop feed-ibkr 2>/dev/null
[ "$(prop feed-ibkr Result)" = success ] && ok "second stop clean" || bad "second stop: $(prop feed-ibkr Result)"

echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
