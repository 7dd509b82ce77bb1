#!/bin/bash
# System test in a real systemd (tests/sdbox): install --demo, the collector runs,
# rows grow, kill -9 restarts it without losing aggTrades, stop is clean; feed-binance's
# user cannot read the Kite secrets, its database role cannot touch other tables, truncate,
# drop or create; install.sh moves an older install's files to the per-venue users.
# Prints PASS/FAIL lines; exit status 0 only if every check passed.
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-$$}
export SDTEST_NAME=${SDTEST_NAME:-feeds$$}
source "$(dirname "$0")/lib.sh"

need_port 5432 "a PostgreSQL on the host; the container's own cannot start"
boot "$REPO:/opt/src:ro"

install_bundle --demo
grep 'install.sh:' "$SDTEST_DIR/install.log" | sed 's/^/    /'

out=$($I bash -c 'systemd-analyze verify /etc/systemd/system/feed-*.service /etc/systemd/system/feed-*.timer 2>&1')
[ -z "$out" ] && ok "systemd-analyze verify prints nothing" || { bad "systemd-analyze verify:"; echo "$out"; }

[ "$(prop feed-binance ActiveState)" = active ] && ok "feed-binance active (Type=notify, READY after first batch)" \
    || bad "feed-binance not active: $(prop feed-binance ActiveState)/$(prop feed-binance SubState)"
[ "$(prop feed-binance User)" = feeds_binance ] && ok "runs as its own unprivileged user feeds_binance" \
    || bad "user: $(prop feed-binance User)"
contains "$($I systemctl list-timers --all --no-pager)" feed-maintain.timer && ok "feed-maintain.timer listed" || bad "timer"

n1=$(sql "select count(*) from binance_agg_trade"); sleep 5; n2=$(sql "select count(*) from binance_agg_trade")
[ "${n2:-0}" -gt "${n1:-0}" ] && ok "rows growing: aggTrade $n1 -> $n2" || bad "rows not growing ($n1 -> $n2)"
bt=$(sql "select count(*) from binance_book_ticker"); mp=$(sql "select count(*) from binance_mark_price")
[ "${bt:-0}" -gt 0 ] && [ "${mp:-0}" -gt 0 ] && ok "bookTicker $bt rows, markPrice $mp rows" || bad "bookTicker/markPrice empty"

j=$($I journalctl -u feed-binance --no-pager)
contains "$j" "feed-binance starting" && contains "$j" "status: " \
    && ok "journalctl -u feed-binance shows start-up and status" || bad "journal lacks start-up/status"
st=$(prop feed-binance StatusText); [ -n "$st" ] && ok "systemctl status line: $st" || bad "no StatusText"

$I /opt/feeds/bin/feedctl status > "$SDTEST_DIR/feedctl.txt" 2>&1 \
    && grep -q "feed-binance.service" "$SDTEST_DIR/feedctl.txt" && ok "feedctl status lists feed-binance" \
    || { bad "feedctl status"; cat "$SDTEST_DIR/feedctl.txt"; }

# --- privileges: feed-binance's OS user and database role ---------------------------------
# The demo has Kite secrets (kite-demo-*) and, after feed-kite-token ran, an access token.
kfiles=$($I bash -c 'ls /etc/feeds/secrets/kite-* /var/lib/feeds/kite/access_token.json 2>/dev/null')
nk=0; leaked=""; unreadable=""
for f in $kfiles; do
    nk=$((nk + 1))
    $I runuser -u feeds_binance -- cat "$f" >/dev/null 2>&1 && leaked="$leaked $f"
    $I runuser -u feeds_kite -- cat "$f" >/dev/null 2>&1 || unreadable="$unreadable $f"
done
[ "$nk" -ge 4 ] && [ -z "$leaked" ] && [ -z "$unreadable" ] \
    && ok "as feeds_binance, reading the Kite secrets and token fails ($nk files; feeds_kite reads them)" \
    || bad "Kite secrets: $nk files, readable by feeds_binance:${leaked:- none}, unreadable by feeds_kite:${unreadable:- none}"
$I runuser -u feeds_binance -- ls /etc/feeds/secrets >/dev/null 2>&1 && bad "feeds_binance lists /etc/feeds/secrets" \
    || ok "as feeds_binance, listing /etc/feeds/secrets fails"
$I runuser -u feeds_binance -- cat /etc/feeds/kite.toml >/dev/null 2>&1 && bad "feeds_binance reads kite.toml" \
    || ok "as feeds_binance, reading /etc/feeds/kite.toml fails"
b=$(sql_as feeds_binance "select count(*) from binance_agg_trade")
[ "${b:-0}" -gt 0 ] 2>/dev/null && ok "as role feeds_binance (peer authentication): $b aggTrades readable" \
    || bad "feeds_binance cannot read its own table: $b"
refused feeds_binance "insert into kite_tick_ltp (instrument_token, last_price, recv_time, seq) values (1, 1, now(), 0)" \
        "permission denied for table kite_tick_ltp" \
    && ok "as role feeds_binance, INSERT into kite_tick_ltp refused" || bad "INSERT into a Kite table: $(sql_as feeds_binance "insert into kite_tick_ltp values (1, 1, now(), 0)")"
refused feeds_binance "insert into ibkr_bar_1min values ('AAPL', now(), 1, 1, 1, 1, 1, 1, 1, 1)" \
        "permission denied for table ibkr_bar_1min" \
    && ok "as role feeds_binance, INSERT into ibkr_bar_1min refused" || bad "INSERT into an IBKR table not refused"
refused feeds_binance "truncate binance_agg_trade" "permission denied for table binance_agg_trade" \
    && ok "as role feeds_binance, TRUNCATE binance_agg_trade refused" || bad "TRUNCATE not refused"
refused feeds_binance "drop table binance_agg_trade" "must be owner of table binance_agg_trade" \
    && ok "as role feeds_binance, DROP TABLE binance_agg_trade refused" || bad "DROP not refused"
refused feeds_binance "drop table kite_tick_full" "must be owner of table kite_tick_full" \
    && ok "as role feeds_binance, DROP TABLE kite_tick_full refused" || bad "DROP of a Kite table not refused"
refused feeds_binance "create table mine (x int)" "permission denied for schema public" \
    && ok "as role feeds_binance, CREATE TABLE refused" || bad "CREATE TABLE not refused"
refused feeds_binance "update feed_heartbeat set state = 'stopping' where unit = 'feed-binance.service';
        insert into feed_heartbeat (unit, host, pid, started_at, updated_at, state, status)
        values ('feed-zerodha.service', 'x', 1, now(), now(), 'running', 'x')
        on conflict (unit) do update set state = excluded.state" "row-level security" \
    && ok "as role feeds_binance, a heartbeat row for feed-zerodha.service refused" || bad "foreign heartbeat not refused"
[ "$(sql "select count(*) from pg_tables where tablename in ('binance_agg_trade', 'kite_tick_full')")" = 2 ] \
    && ok "the tables are still there" || bad "a table was dropped"
n3=$(sql "select count(*) from binance_agg_trade"); sleep 3; n4=$(sql "select count(*) from binance_agg_trade")
[ "${n4:-0}" -gt "${n3:-0}" ] && [ "$(prop feed-binance ActiveState)" = active ] \
    && ok "feed-binance still collecting as feeds_binance: aggTrade $n3 -> $n4" || bad "rows not growing ($n3 -> $n4)"
hb=$(sql "select state from feed_heartbeat where unit = 'feed-binance.service'")
[ "$hb" = running ] && ok "its own heartbeat row written by role feeds_binance: $hb" || bad "heartbeat: '$hb'"
# the owner's units, hardened like the collectors, still do their work as feeds
[ "$(prop feed-migrate ActiveState)" = active ] && [ "$(prop feed-migrate Result)" = success ] \
    && [ "$(prop feed-migrate User)" = feeds ] && ok "feed-migrate.service ran as feeds (pulled in by feed-binance)" \
    || bad "feed-migrate: $(prop feed-migrate ActiveState) $(prop feed-migrate Result)"
ahead="binance_agg_trade_p$(date -u -d '+3 days' +%Y%m%d)"
sql "drop table $ahead" >/dev/null
$I systemctl start feed-maintain.service
[ "$(prop feed-maintain Result)" = success ] \
    && [ "$(sql "select relowner::regrole from pg_class where relname = '$ahead'")" = feeds ] \
    && ok "feed-maintain.service ran as feeds: partition $ahead created again, owned by feeds" \
    || bad "feed-maintain: $(prop feed-maintain Result) $($I journalctl -u feed-maintain --no-pager | tail -3)"
for u in feed-sim-binance feed-sim-kite feed-sim-tws; do
    [ "$(prop $u DynamicUser)" = yes ] && [ "$(prop $u ActiveState)" = active ] || bad "$u: DynamicUser=$(prop $u DynamicUser) $(prop $u ActiveState)"
done
ok "the simulators run with DynamicUser=yes"

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

# install.sh again is safe, and moves an install from before the per-venue users to them:
# files of the former shared user feeds, venue files in the group feeds, the dsn naming user=feeds
old_cfg=$(git -C "$REPO" show 14d3845:etc/feeds.toml 2>/dev/null)
# a collector instance still running as feeds (as the former units ran it)
$I bash -c 'mkdir -p /etc/systemd/system/feed-binance@.service.d &&
            printf "[Service]\nUser=feeds\nGroup=feeds\nSupplementaryGroups=feeds_binance\n" \
                > /etc/systemd/system/feed-binance@.service.d/old-user.conf &&
            systemctl daemon-reload && systemctl start feed-binance@1of2 &&
            rm /etc/systemd/system/feed-binance@.service.d/old-user.conf'
uid_of() { $I stat -c %U "/proc/$(prop "$1" MainPID)" 2>/dev/null; }
[ "$(uid_of feed-binance@1of2)" = feeds ] || bad "feed-binance@1of2 not running as feeds: $(uid_of feed-binance@1of2)"
$I bash -c 'chown -R feeds:feeds /var/lib/feeds/kite /var/lib/feeds/binance /etc/feeds/secrets/kite-* &&
            chown feeds:feeds /etc/feeds/secrets && chmod 750 /etc/feeds/secrets &&
            chgrp feeds /etc/feeds/binance.toml /etc/feeds/kite.toml /etc/feeds/contracts.csv' || bad "old layout"
if [ -n "$old_cfg" ]; then printf '%s\n' "$old_cfg" | $I bash -c 'cat > /etc/feeds/feeds.toml'
else $I sed -i 's|^dsn = .*|dsn = "host=/run/postgresql dbname=feeds user=feeds"|' /etc/feeds/feeds.toml; fi
$I grep -q 'user=feeds' /etc/feeds/feeds.toml || bad "old feeds.toml not in place"
$I bash -c 'cd /opt/src && ./install.sh --demo' > "$SDTEST_DIR/install2.log" 2>&1 && ok "install.sh re-run" \
    || { bad "install.sh re-run"; tail -20 "$SDTEST_DIR/install2.log"; }
grep 'install.sh:' "$SDTEST_DIR/install2.log" | sed 's/^/    /'
owners=$($I bash -c 'stat -c "%U:%G %a %n" /var/lib/feeds/kite/access_token.json /etc/feeds/secrets/kite-* /var/lib/feeds/binance \
                     /etc/feeds/binance.toml /etc/feeds/kite.toml /etc/feeds/contracts.csv /etc/feeds/feeds.toml /etc/feeds/secrets')
echo "$owners" | sed 's/^/    /'
contains "$owners" "^feeds:feeds " && bad "files still owned by feeds:feeds" \
    || ok "re-run moved the former feeds files to their users (token and secrets feeds_kite 600, spool feeds_binance)"
contains "$owners" "feeds_kite:feeds_kite 600 /var/lib/feeds/kite/access_token.json" \
    && contains "$owners" "feeds_binance:feeds_binance 700 /var/lib/feeds/binance" \
    && contains "$owners" "root:feeds_binance 640 /etc/feeds/binance.toml" \
    && contains "$owners" "root:feeds_ibkr 640 /etc/feeds/contracts.csv" \
    && contains "$owners" "root:feeds 640 /etc/feeds/feeds.toml" \
    && contains "$owners" "root:feeds 711 /etc/feeds/secrets" || bad "owners after the re-run"
$I grep -q 'user=feeds' /etc/feeds/feeds.toml && bad "feeds.toml still names user=feeds" \
    || ok "feeds.toml dsn no longer names user=feeds"
is_active() { [ "$(prop "$1" ActiveState)" = active ]; }
runs_as() { [ "$(uid_of "$1")" = "$2" ] && is_active "$1"; }
contains "$(cat "$SDTEST_DIR/install2.log")" "restarted feed-binance@1of2.service as its own user" \
    && waitfor 60 runs_as feed-binance@1of2 feeds_binance \
    && ok "re-run restarted feed-binance@1of2, found running as feeds, as feeds_binance" \
    || bad "feed-binance@1of2 after the re-run: $(uid_of feed-binance@1of2) $(prop feed-binance@1of2 ActiveState)"
waitfor 60 is_active feed-binance && ok "feed-binance active after re-install" \
    || bad "not active after re-install"
r1=$(sql "select count(*) from binance_agg_trade"); sleep 3; r2=$(sql "select count(*) from binance_agg_trade")
[ "${r2:-0}" -gt "${r1:-0}" ] && ok "rows growing after re-install: $r1 -> $r2" || bad "rows not growing after re-install"

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
