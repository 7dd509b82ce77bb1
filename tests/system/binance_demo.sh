#!/bin/bash
# System test in a real systemd (tests/sdbox): install --demo, the collector runs,
# rows grow, kill -9 restarts it without losing aggTrades, stop is clean.
# Prints PASS/FAIL lines; exit status 0 only if every check passed.
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-$$}
export SDTEST_NAME=${SDTEST_NAME:-feeds$$}
source "$(dirname "$0")/lib.sh"

need_port 5432 "a PostgreSQL on the host; the container's own cannot start"
boot "$REPO:/opt/src:ro"

waitfor 60 $I runuser -u postgres -- pg_isready -q || bad "postgresql in the container"
t=$(date +%s)
if $I bash -c 'cd /opt/src && ./install.sh --demo' > "$SDTEST_DIR/install.log" 2>&1; then
    ok "install.sh --demo ($(( $(date +%s) - t ))s)"
else
    bad "install.sh --demo"; tail -30 "$SDTEST_DIR/install.log"
fi
grep 'install.sh:' "$SDTEST_DIR/install.log" | sed 's/^/    /'

out=$($I bash -c 'systemd-analyze verify /etc/systemd/system/feed-*.service /etc/systemd/system/feed-*.timer 2>&1')
[ -z "$out" ] && ok "systemd-analyze verify prints nothing" || { bad "systemd-analyze verify:"; echo "$out"; }

[ "$(prop feed-binance ActiveState)" = active ] && ok "feed-binance active (Type=notify, READY after first batch)" \
    || bad "feed-binance not active: $(prop feed-binance ActiveState)/$(prop feed-binance SubState)"
[ "$(prop feed-binance User)" = feeds ] && ok "runs as the unprivileged user feeds" || bad "user"
contains "$($I systemctl list-timers --all --no-pager)" feed-maintain.timer && ok "feed-maintain.timer listed" || bad "timer"

n1=$(sql "select count(*) from binance_agg_trade"); sleep 5; n2=$(sql "select count(*) from binance_agg_trade")
[ "${n2:-0}" -gt "${n1:-0}" ] && ok "rows growing: aggTrade $n1 -> $n2" || bad "rows not growing ($n1 -> $n2)"
bt=$(sql "select count(*) from binance_book_ticker"); mp=$(sql "select count(*) from binance_mark_price")
[ "${bt:-0}" -gt 0 ] && [ "${mp:-0}" -gt 0 ] && ok "bookTicker $bt rows, markPrice $mp rows" || bad "bookTicker/markPrice empty"

j=$($I journalctl -u feed-binance --no-pager)
contains "$j" "feed-binance starting" && contains "$j" "status: " \
    && ok "journalctl -u feed-binance shows start-up and status" || bad "journal lacks start-up/status"
st=$(prop feed-binance StatusText); [ -n "$st" ] && ok "systemctl status line: $st" || bad "no StatusText"

$I runuser -u feeds -- /opt/feeds/bin/feedctl status > "$SDTEST_DIR/feedctl.txt" 2>&1 \
    && grep -q "feed-binance.service" "$SDTEST_DIR/feedctl.txt" && ok "feedctl status lists feed-binance" \
    || { bad "feedctl status"; cat "$SDTEST_DIR/feedctl.txt"; }

# kill -9: systemd restarts it, the aggTrades of the downtime are filled from REST
r0=$(prop feed-binance NRestarts); p0=$(prop feed-binance MainPID)
$I kill -9 "$p0"
restarted() { [ "$(prop feed-binance NRestarts)" -gt "$r0" ] && [ "$(prop feed-binance ActiveState)" = active ] &&
              [ "$(prop feed-binance MainPID)" != "$p0" ]; }
waitfor 90 restarted && ok "kill -9 -> restarted (NRestarts $r0 -> $(prop feed-binance NRestarts))" || bad "no restart after kill -9"
sleep 12
gaps() { sql "select coalesce(sum(max_id - min_id + 1 - n), -1) from (select symbol, min(agg_id) min_id,
              max(agg_id) max_id, count(*) n from binance_agg_trade group by symbol) s"; }
waitfor 60 test "$(gaps)" = 0 && ok "aggTrade ids contiguous per symbol after the kill (nothing lost)" \
    || bad "missing aggTrade ids after kill: $(gaps)"
dups=$(sql "select count(*) - count(distinct (symbol, agg_id)) from binance_agg_trade")
[ "$dups" = 0 ] && ok "no duplicate aggTrades" || bad "duplicates: $dups"

# systemctl stop: clean exit with everything flushed
$I systemctl stop feed-binance
res=$(prop feed-binance Result); code=$(prop feed-binance ExecMainStatus)
[ "$res" = success ] && [ "$code" = 0 ] && ok "systemctl stop: clean exit (Result=$res, status $code)" \
    || bad "stop: Result=$res status=$code"
jgrep feed-binance "stopped: all rows committed or spooled" \
    && ok "journal: buffer flushed at stop" || bad "no flush line at stop"
c1=$(sql "select count(*) from binance_agg_trade"); sleep 2; c2=$(sql "select count(*) from binance_agg_trade")
[ "$c1" = "$c2" ] && [ "$(gaps)" = 0 ] && ok "after stop: $c2 aggTrades, contiguous" || bad "after stop $c1/$c2 gaps $(gaps)"
spooled=$($I bash -c 'ls /var/lib/feeds/binance/spool-*.bin 2>/dev/null | wc -l')
[ "$spooled" = 0 ] && ok "spool empty after stop" || bad "spool files left: $spooled"

# install.sh again is safe
$I bash -c 'cd /opt/src && ./install.sh --demo' > "$SDTEST_DIR/install2.log" 2>&1 && ok "install.sh re-run" \
    || { bad "install.sh re-run"; tail -20 "$SDTEST_DIR/install2.log"; }
[ "$(prop feed-binance ActiveState)" = active ] && ok "feed-binance active after re-install" || bad "not active after re-install"

# the template unit: two instances share the symbols
$I systemctl stop feed-binance
$I systemctl start feed-binance@1of2 feed-binance@2of2 \
    && [ "$(prop feed-binance@1of2 ActiveState)" = active ] && [ "$(prop feed-binance@2of2 ActiveState)" = active ] \
    && ok "feed-binance@1of2 and @2of2 active" || bad "template instances not active"
n1=$($I journalctl -u feed-binance@1of2 --no-pager | grep -o 'collecting [0-9]* symbols' | tail -1)
n2=$($I journalctl -u feed-binance@2of2 --no-pager | grep -o 'collecting [0-9]* symbols' | tail -1)
[ "$n1" = "collecting 10 symbols" ] && [ "$n2" = "collecting 10 symbols" ] \
    && ok "symbols split between instances: $n1 / $n2 (of 20)" || bad "split: '$n1' '$n2'"
hb2() { [ "$(sql "select count(*) from feed_heartbeat where unit like 'feed-binance@%of2.service' and state = 'running'")" = 2 ]; }
waitfor 30 hb2 && ok "both instances write heartbeats (state running)" \
    || bad "instance heartbeats: $(sql "select unit, state from feed_heartbeat")"
$I systemctl stop feed-binance@1of2 feed-binance@2of2

echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
