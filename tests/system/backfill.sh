#!/bin/bash
# System test in a real systemd (tests/sdbox): feed-backfill.timer installed and listed with
# its next elapse at 18:00 America/New_York; `systemctl start feed-backfill` runs to completion
# against the TWS simulator (feed-sim-tws.service) with progress in STATUS= and the journal and
# a summary line; a second start requests nothing already complete.
# Prints PASS/FAIL lines; exit status 0 only if every check passed, 77 when it cannot run here.
#   SDT_WAIT_5432=SECONDS  wait that long for another test's PostgreSQL to free port 5432
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-bf-$$}
export SDTEST_NAME=${SDTEST_NAME:-feedsbf$$}
source "$(dirname "$0")/lib.sh"

need_port 5432 "a PostgreSQL on the host; the container's own cannot start" "${SDT_WAIT_5432:-0}"
need_port 7497 "the TWS simulator's"
boot "$REPO:/opt/src:ro"

install_bundle

for u in feed-backfill.service feed-backfill.timer feed-sim-tws.service; do
    $I test -f /etc/systemd/system/$u && ok "$u installed" || bad "$u not installed"
done
$I test -x /opt/feeds/bin/feed-backfill && $I test -f /etc/feeds/contracts.csv && $I test -f /etc/feeds/ibkr.toml \
    && ok "bin/feed-backfill, /etc/feeds/contracts.csv and ibkr.toml installed" || bad "program or configuration missing"
out=$($I bash -c 'systemd-analyze verify /etc/systemd/system/feed-backfill.* /etc/systemd/system/feed-sim-tws.service 2>&1')
[ -z "$out" ] && ok "systemd-analyze verify prints nothing for the three units" || { bad "systemd-analyze verify:"; echo "$out"; }
[ "$(sql "select count(*) from schema_migrations where version = '0003'")" = 1 ] \
    && ok "migration 0003_ibkr applied" || bad "migration 0003 not applied"

# What install.sh --demo does for the backfill: the simulator, and feed-backfill pointed at it
# (its pacing windows scaled like the simulator's, the last 20 days).
$I bash -c 'mkdir -p /etc/systemd/system/feed-backfill.service.d && cat > /etc/systemd/system/feed-backfill.service.d/demo.conf <<EOF
[Unit]
Wants=feed-sim-tws.service
After=feed-sim-tws.service
[Service]
Environment=FEEDS_IBKR_PACING_SCALE=0.01
Environment="FEEDS_BACKFILL_ARGS=--from 20d"
EOF
cat > /etc/systemd/system/feed-backfill.service.d/test.conf <<EOF
[Service]
Environment="FEEDS_BACKFILL_ARGS=--from 20d --status-interval 2"
EOF
systemctl daemon-reload && systemctl enable --now feed-backfill.timer'
$I systemctl start feed-sim-tws
waitfor 30 $I bash -c 'ss -ltn | grep -q 127.0.0.1:7497' && ok "feed-sim-tws listening on 127.0.0.1:7497" \
    || bad "feed-sim-tws not listening ($(prop feed-sim-tws ActiveState))"

# the timer: listed, with its next elapse at 18:00 New York time on a weekday
lt=$($I systemctl list-timers --all --no-pager feed-backfill.timer)
contains "$lt" "feed-backfill.timer" && ok "systemctl list-timers lists feed-backfill.timer" \
    || { bad "timer not listed"; echo "$lt"; }
$I env TZ=America/New_York systemctl list-timers --all --no-pager feed-backfill.timer | sed -n '1,2p' | sed 's/^/    /'
cal=$(prop feed-backfill.timer TimersCalendar)
contains "$cal" "America/New_York" && ok "OnCalendar written in America/New_York: $cal" || bad "calendar: $cal"
next=$(prop feed-backfill.timer NextElapseUSecRealtime)
ny=$(TZ=America/New_York date -d "$next" '+%a %H:%M %Z' 2>/dev/null)
case "$ny" in
    Mon\ 18:00\ E?T|Tue\ 18:00\ E?T|Wed\ 18:00\ E?T|Thu\ 18:00\ E?T|Fri\ 18:00\ E?T)
        ok "next elapse $next = $ny (18:00 New York, a weekday)" ;;
    *) bad "next elapse $next = '$ny'" ;;
esac
[ "$(prop feed-backfill.timer Persistent)" = yes ] && [ "$(prop feed-backfill.timer ActiveState)" = active ] \
    && ok "timer active, Persistent=yes" || bad "timer state $(prop feed-backfill.timer ActiveState)"

# a run, as the timer would start it: progress in STATUS= while it runs, then success
t=$(date +%s)
$I systemctl start --no-block feed-backfill
seen_status=""
end=$(( t + 200 ))
while [ "$(date +%s)" -lt $end ]; do
    st=$(prop feed-backfill ActiveState)
    s=$(prop feed-backfill StatusText)
    case "$s" in progress:*) seen_status=$s ;; esac
    [ "$st" = activating ] || [ "$st" = active ] || { [ "$(date +%s)" -gt $(( t + 3 )) ] && break; }
    sleep 0.5
done
res=$(prop feed-backfill Result); code=$(prop feed-backfill ExecMainStatus); st=$(prop feed-backfill ActiveState)
[ "$st" = inactive ] && [ "$res" = success ] && [ "$code" = 0 ] \
    && ok "systemctl start feed-backfill ran to completion ($(( $(date +%s) - t ))s, Result=$res, status $code)" \
    || bad "feed-backfill: ActiveState=$st Result=$res status=$code"
[ -n "$seen_status" ] && ok "systemctl status showed progress: $seen_status" || bad "no progress STATUS= seen"

j=$($I journalctl -u feed-backfill --no-pager -o cat)
contains "$j" "progress: sessions " && ok "journalctl -u feed-backfill shows progress lines ($(echo "$j" | grep -c 'progress: sessions '))" \
    || bad "no progress line in the journal"
summary=$(echo "$j" | grep "summary: run 1 finished" | tail -1)
[ -n "$summary" ] && ok "journal summary: ${summary#*summary: }" || bad "no summary line in the journal"
contains "$j" "validated but not fetched" && ok "FUT/OPT rows validated, not fetched" || bad "FUT/OPT rows not reported"

complete=$(sql "select count(*) from ibkr_session_status where status in ('COMPLETE', 'EARLY_CLOSE')")
others=$(sql "select count(*) from ibkr_session_status where status not in ('COMPLETE', 'EARLY_CLOSE', 'HOLIDAY')")
bars=$(sql "select count(*) from ibkr_bar_1min"); want=$(sql "select coalesce(sum(actual_bars), 0) from ibkr_session_status")
syms=$(sql "select count(distinct symbol) from ibkr_session_status")
[ "${complete:-0}" -ge 50 ] && [ "$others" = 0 ] && [ "$syms" = 5 ] && [ "$bars" = "$want" ] \
    && ok "$complete sessions COMPLETE for $syms contracts, $bars bars (= status rows' actual_bars), none PENDING/ERROR" \
    || bad "tables: complete=$complete others=$others symbols=$syms bars=$bars want=$want"
[ "$(prop feed-backfill User)" = feeds_ibkr ] && ok "feed-backfill runs as its own user feeds_ibkr" \
    || bad "user: $(prop feed-backfill User)"
refused feeds_ibkr "delete from binance_agg_gap" "permission denied for table binance_agg_gap" \
    && refused feeds_ibkr "drop table ibkr_bar_1min" "must be owner of table ibkr_bar_1min" \
    && ok "as role feeds_ibkr, DELETE from binance_agg_gap and DROP TABLE ibkr_bar_1min refused" \
    || bad "feeds_ibkr privileges too wide"
[ "$(sql "select state from ibkr_backfill_run where run_id = 1")" = finished ] && ok "run log: run 1 finished" \
    || bad "run log: $(sql 'select run_id, state from ibkr_backfill_run')"

# a second run: nothing completed is requested again
$I timeout 120 systemctl start feed-backfill
s2=$($I journalctl -u feed-backfill --no-pager -o cat | grep "summary: run 2 " | tail -1)
contains "$s2" " 0 requests" && [ "$(prop feed-backfill Result)" = success ] \
    && ok "second start: 0 requests (${s2#*summary: })" || bad "second run: $s2"

# the operator's view
$I runuser -u feeds_ibkr -- /opt/feeds/bin/feed-backfill --status > "$SDTEST_DIR/status.txt" 2>&1 \
    && grep -q "^AAPL " "$SDTEST_DIR/status.txt" && grep -q "last run 2: finished" "$SDTEST_DIR/status.txt" \
    && ok "feed-backfill --status as the feeds_ibkr user" || { bad "--status"; cat "$SDTEST_DIR/status.txt"; }
sed 's/^/    /' "$SDTEST_DIR/status.txt"

echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
