#!/usr/bin/env bash
# Install (or update) the feeds collectors on a Debian/Ubuntu machine with systemd.
#
#   sudo ./install.sh           collectors pointed at the real venues
#   sudo ./install.sh --demo    also start the Binance, TWS and Kite simulators and point
#                               feed-binance, feed-backfill, feed-ibkr and feed-zerodha at them
#
# Safe to re-run: packages, users, database objects and units are created only when
# missing; configuration in /etc/feeds is never overwritten (a newer default is put
# beside it as *.dist); migrations already applied are skipped.
set -euo pipefail

PREFIX=/opt/feeds
ETC=/etc/feeds
UNITDIR=/etc/systemd/system
DEMO=0
START=1
SRC=$(cd "$(dirname "$0")" && pwd)

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
    case "$arg" in
        --demo) DEMO=1 ;;
        --no-start) START=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (sudo ./install.sh)"
# sd_booted(3): systemd is PID 1 exactly when /run/systemd/system exists.
[ -d /run/systemd/system ] || die "systemd is not running as PID 1 here; the units cannot be installed (nothing was changed)"

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
need_pkg() {  # need_pkg COMMAND PACKAGE...
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
    say "installing ${*:2}"
    apt-get install -y -qq "${@:2}" >/dev/null
}

# --- PostgreSQL -------------------------------------------------------------
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    need_pkg __none__ postgresql
fi
need_pkg psql postgresql-client
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkg __none__ python3-venv
# headless Chromium for the Kite login (feed-kite-token falls back to plain HTTP without it)
[ -x /usr/bin/chromium ] || need_pkg __none__ chromium || say "chromium not installed: feed-kite-token will use the HTTP login"
systemctl enable --now postgresql >/dev/null 2>&1 || true
for c in $(ls /etc/postgresql 2>/dev/null); do
    for n in $(ls "/etc/postgresql/$c" 2>/dev/null); do
        systemctl start "postgresql@$c-$n" 2>/dev/null || true
    done
done
for _ in $(seq 1 60); do
    runuser -u postgres -- psql -qAtc 'select 1' >/dev/null 2>&1 && break
    sleep 1
done
runuser -u postgres -- psql -qAtc 'select 1' >/dev/null 2>&1 || die "PostgreSQL is not answering on its local socket"

# --- users -------------------------------------------------------------------------
# feeds owns the database (feed-migrate, feed-maintain); each collector has its own user,
# which is also its database role (peer authentication): feeds_binance, feeds_kite (feed-zerodha
# and feed-kite-token, the only reader of the Kite secrets), feeds_ibkr (feed-backfill, feed-ibkr),
# feeds_dhan (feed-dhan, feed-dhan-token, feed-dhan-backfill, the only reader of the Dhan secrets),
# feeds_indicators (feed-indicators).
# feeds_ops runs feed-check and feed-alert@, feeds_api feed-api; the group feeds_ops is the
# operators': a member runs feedctl as the read-only database role feeds_ops (its password is
# readable by the group):  usermod -aG feeds_ops alice
install -D -m 644 "$SRC/systemd/feeds.sysusers" /etc/sysusers.d/feeds.conf
install -D -m 644 "$SRC/systemd/feeds.tmpfiles" /etc/tmpfiles.d/feeds.conf
systemd-sysusers /etc/sysusers.d/feeds.conf
systemd-tmpfiles --create /etc/tmpfiles.d/feeds.conf

# --- database roles and database (peer authentication on the local socket) -----------
# sql/0005_roles.sql grants each role what its program needs; the roles are made here, as
# postgres, so that feed-migrate (run as feeds) needs no CREATEROLE.
psql_pg() { runuser -u postgres -- psql -qAt -v ON_ERROR_STOP=1 "$@"; }
for role in feeds:LOGIN feeds_binance:LOGIN feeds_kite:LOGIN feeds_ibkr:LOGIN feeds_reader:NOLOGIN \
            feeds_ops:LOGIN feeds_dhan:LOGIN feeds_indicators:LOGIN; do
    if [ "$(psql_pg -c "select 1 from pg_roles where rolname='${role%%:*}'")" != 1 ]; then
        psql_pg -c "CREATE ROLE ${role%%:*} ${role#*:}"
        say "created database role ${role%%:*}"
    fi
done
if [ "$(psql_pg -c "select 1 from pg_database where datname='feeds'")" != 1 ]; then
    psql_pg -c "CREATE DATABASE feeds OWNER feeds"
    say "created database feeds"
fi
# Only the owner creates tables (PostgreSQL before 15 lets every role create them in public).
psql_pg -d feeds -c "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
# feedctl, feed-check and feed-api read every table (SELECT only) as feeds_ops.
if [ "$(psql_pg -c "select pg_has_role('feeds_ops', 'feeds_reader', 'member')")" != t ]; then
    psql_pg -c "GRANT feeds_reader TO feeds_ops"
fi

# --- package in its own venv -------------------------------------------------------
install -d -m 755 "$PREFIX" "$PREFIX/bin"
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# build from a copy: the source tree may be read-only
tar -C "$SRC" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build -cf - . | tar -C "$build" -xf -
say "installing the feeds package into $PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --disable-pip-version-check --upgrade "$build" 2>&1 | grep -v '^WARNING: Location' || true
"$PREFIX/venv/bin/python" -c 'import feeds' || die "the feeds package did not install"
for f in "$SRC"/bin/*; do
    name=$(basename "$f")
    sed "1s|^#!.*python.*$|#!$PREFIX/venv/bin/python3|" "$f" > "$PREFIX/bin/$name.new"
    chmod 755 "$PREFIX/bin/$name.new"
    mv "$PREFIX/bin/$name.new" "$PREFIX/bin/$name"
done
ln -sf "$PREFIX/bin/feedctl" /usr/local/bin/feedctl
rm -rf "$PREFIX/sql"; cp -r "$SRC/sql" "$PREFIX/sql"
install -m 644 "$SRC/README.md" "$PREFIX/README.md"

# --- configuration: never overwrite the operator's copy ------------------------
# /etc/feeds is readable by the group feeds (every service user is a member: feeds.toml);
# each venue's files by that venue's user only; a secret by the one user that needs it.
cfg_group() {  # cfg_group FILE: the group that reads a configuration file
    case "$(basename "$1")" in
        binance*) echo feeds_binance ;;
        kite*) echo feeds_kite ;;
        dhan*) echo feeds_dhan ;;
        indicators*) echo feeds_indicators ;;
        ibkr*|contracts*) echo feeds_ibkr ;;
        ops*|alerts*) echo feeds_ops ;;
        *) echo feeds ;;
    esac
}
# The operators (group feeds_ops) and feeds_api open ops.toml, alerts.toml and the password of feeds_ops by
# name: both directories are searchable by every user, listable as before only by the group
# feeds (/etc/feeds) or nobody (secrets). Each file keeps its own mode and group; one that every
# user could read (only the directory's mode hid it) is made private to its owner and group.
if [ -d "$ETC" ]; then
    while IFS= read -r -d '' f; do
        chmod o-rwx "$f"
        say "$f: no longer readable by every user (mode $(stat -c %a "$f"))"
    done < <(find "$ETC" -type f -perm /o=rwx -print0)
fi
install -d -m 751 -o root -g feeds "$ETC"
# traversable, not listable; each secret file is 0600 of its user (0640 to a group that shares it)
install -d -m 711 -o root -g feeds "$ETC/secrets"
# An install from before the per-venue users: its feeds.toml named user=feeds in the dsn; now
# each program connects as its own role. The former default is replaced; an edited copy loses
# just that user=feeds.
old_dsn='dsn = "host=/run/postgresql dbname=feeds user=feeds"'
if [ -f "$ETC/feeds.toml" ] && [ "$(sha256sum < "$ETC/feeds.toml" | cut -c1-64)" = \
     6ef47603b59e67ebb69e459c205bc0cd2324aed54137b0c00b81b3a7084ad398 ]; then
    install -m 640 -o root -g feeds "$SRC/etc/feeds.toml" "$ETC/feeds.toml"
    say "$ETC/feeds.toml: the former default replaced (no user= in the dsn: each program is its own role)"
elif [ -f "$ETC/feeds.toml" ] && grep -qxF "$old_dsn" "$ETC/feeds.toml"; then
    sed -i "s|^$old_dsn\$|dsn = \"host=/run/postgresql dbname=feeds\"|" "$ETC/feeds.toml"
    say "$ETC/feeds.toml: user=feeds removed from the dsn (each program connects as its own role)"
elif [ -f "$ETC/feeds.toml" ] && grep -q '^dsn = .*user=feeds[" ]' "$ETC/feeds.toml"; then
    say "WARNING: $ETC/feeds.toml: the dsn names user=feeds: remove it, so that each program connects as its own role"
fi
# The demo Binance simulator left port 9100 (node_exporter's) for 19100: an older demo file follows.
if [ -f "$ETC/binance-demo.toml" ] && grep -q '127\.0\.0\.1:9100"' "$ETC/binance-demo.toml"; then
    sed -i 's#127\.0\.0\.1:9100"#127.0.0.1:19100"#g' "$ETC/binance-demo.toml"
    say "$ETC/binance-demo.toml: the demo simulator is now on 127.0.0.1:19100 (9100 is node_exporter's)"
fi
# An ops.toml of the release that kept the alerts in it: its [alerts] section moves to alerts.toml
# (or, when an alerts.toml exists already, to alerts.toml.from-ops for the operator to compare).
if [ -f "$ETC/ops.toml" ] && grep -qx '\[alerts\]' "$ETC/ops.toml"; then
    to="$ETC/alerts.toml"; [ -e "$to" ] && to="$ETC/alerts.toml.from-ops"
    { echo "# The [alerts] section of $ETC/ops.toml, moved here by install.sh on $(date -u +%F)."
      awk '/^\[/ { a = ($0 == "[alerts]") } a' "$ETC/ops.toml"; } > "$to.new"
    awk '/^\[/ { a = ($0 == "[alerts]") } !a' "$ETC/ops.toml" > "$ETC/ops.toml.new"
    chown root:feeds_ops "$to.new" "$ETC/ops.toml.new"; chmod 640 "$to.new" "$ETC/ops.toml.new"
    mv "$to.new" "$to"; mv "$ETC/ops.toml.new" "$ETC/ops.toml"
    say "$ETC/ops.toml: its [alerts] section moved to $to"
fi
for f in "$SRC"/etc/*; do
    dst="$ETC/$(basename "$f")"
    if [ ! -e "$dst" ]; then
        install -m 640 -o root -g "$(cfg_group "$f")" "$f" "$dst"
        say "installed $dst"
    elif ! cmp -s "$f" "$dst"; then
        install -m 640 -o root -g "$(cfg_group "$f")" "$f" "$dst.dist"
        say "kept your $dst (the shipped default is in $dst.dist)"
    fi
done
# An install from before the per-venue users: venue files still in the group feeds move to the
# venue's group; the Kite secrets and token, and each collector's spool, move to its user.
for f in "$ETC"/*; do
    [ -f "$f" ] && [ "$(stat -c %G "$f")" = feeds ] && [ "$(cfg_group "$f")" != feeds ] || continue
    chgrp "$(cfg_group "$f")" "$f"
    say "$f: now readable by the group $(cfg_group "$f") only"
done
for f in "$ETC"/secrets/kite-* "$ETC"/secrets/dhan-*; do
    [ -f "$f" ] || continue
    u=feeds_kite; case "$(basename "$f")" in dhan-*) u=feeds_dhan ;; esac
    if [ "$(stat -c '%U %a' "$f")" != "$u 600" ]; then
        chown "$u:$u" "$f"; chmod 600 "$f"
        say "$f: now owned by $u, mode 600"
    fi
done
own_state() {  # own_state DIR USER: give a StateDirectory (and what is in it) to its unit's user
    [ -d "$1" ] || return 0
    [ -n "$(find "$1" ! -user "$2" -print -quit)" ] || return 0
    chown -R "$2:$2" "$1"
    say "$1: now owned by $2"
}
own_state /var/lib/feeds/kite feeds_kite
own_state /var/lib/feeds/zerodha feeds_kite
own_state /var/lib/feeds/dhan feeds_dhan
own_state /var/lib/feeds/indicators feeds_indicators
for d in /var/lib/feeds/binance /var/lib/feeds/binance-*; do own_state "$d" feeds_binance; done

# --- operators: feedctl, feed-check, feed-alert@, feed-api ---------------------------------
# The database role feeds_ops logs in over 127.0.0.1 with a password generated here once, kept in
# a file readable by the group feeds_ops (root, the operators, feed-check, feed-api).
# new_secret FILE OWNER:GROUP MODE EXPR WHAT: FILE generated once (python3's secrets.EXPR); an
# existing one is kept, its owner and mode put right.
new_secret() {
    local f=$1 og=$2 mode=$3 expr=$4 what=$5
    if [ ! -s "$f" ]; then
        ( umask 077; python3 -c "import secrets; print(secrets.$expr)" > "$f.new" )
        chown "$og" "$f.new"; chmod "$mode" "$f.new"; mv "$f.new" "$f"
        say "generated $what in $f"
    elif [ "$(stat -c '%U:%G %a' "$f")" != "$og $mode" ]; then
        chown "$og" "$f"; chmod "$mode" "$f"
        say "$f: now $og, mode $mode"
    fi
}
ops_pw=$ETC/secrets/feeds-ops.password
new_secret "$ops_pw" root:feeds_ops 640 'token_hex(24)' "the password of the database role feeds_ops"
ops_login() { PGPASSWORD=$(head -n1 "$ops_pw") PGCONNECT_TIMEOUT=10 \
              psql -qAtw "host=127.0.0.1 dbname=feeds user=feeds_ops" -c 'select 1' >/dev/null 2>&1; }
if ! ops_login; then
    # a new role, or a password file kept from another machine or install: the file wins
    # (given on standard input: never on a command line)
    printf "ALTER ROLE feeds_ops PASSWORD '%s'\n" "$(head -n1 "$ops_pw")" | psql_pg
    say "database role feeds_ops: password set from $ops_pw"
    ops_login || say "WARNING: feeds_ops cannot log in over 127.0.0.1 with its password: feedctl needs" \
                     "'host all all 127.0.0.1/32 scram-sha-256' in pg_hba.conf (Debian's default)"
fi
# feed-api's bearer token, readable by feeds_api only.
new_secret "$ETC/secrets/feed-api.token" feeds_api:feeds_api 600 'token_urlsafe(32)' "feed-api's bearer token"

# --- migrations ------------------------------------------------------------------------
runuser -u feeds -- "$PREFIX/bin/feed-migrate" --sql-dir "$PREFIX/sql"

# --- units -------------------------------------------------------------------------------
for u in "$SRC"/systemd/*.service "$SRC"/systemd/*.timer; do
    install -m 644 "$u" "$UNITDIR/$(basename "$u")"
done
# Drop-ins: feed-.service.d/on-failure.conf gives every feed-*.service OnFailure=feed-alert@%n.service;
# feed-alert@.service.d/ takes it away from the alert units themselves.
for d in "$SRC"/systemd/*.service.d; do
    for f in "$d"/*.conf; do
        install -D -m 644 "$f" "$UNITDIR/$(basename "$d")/$(basename "$f")"
    done
done
# feed-api manages feed-* units through systemd's D-Bus API: polkit lets its user do exactly that.
if [ -f "$SRC/systemd/feeds-api.polkit.rules" ]; then
    [ -x /usr/lib/polkit-1/polkitd ] || need_pkg __none__ polkitd
    install -D -m 644 "$SRC/systemd/feeds-api.polkit.rules" /etc/polkit-1/rules.d/60-feeds-api.rules
fi
# demo_dropin UNIT SIMULATOR SETTING...: with --demo, point UNIT at SIMULATOR through a drop-in
# carrying the Environment= settings; without --demo, remove that drop-in.
demo_dropin() {
    local unit=$1 sim=$2 dir="$UNITDIR/$1.d"; shift 2
    if [ $DEMO = 1 ]; then
        install -d "$dir"
        {
            echo "# Written by install.sh --demo: $unit uses $sim on loopback."
            printf '[Unit]\nWants=%s\nAfter=%s\n[Service]\n' "$sim" "$sim"
            for setting in "$@"; do echo "Environment=\"$setting\""; done
        } > "$dir/demo.conf"
    else
        rm -f "$dir/demo.conf"
    fi
}
demo_dropin feed-binance.service feed-sim-binance.service "FEEDS_BINANCE_CONFIG=$ETC/binance-demo.toml"
demo_dropin feed-binance@.service feed-sim-binance.service "FEEDS_BINANCE_CONFIG=$ETC/binance-demo.toml"
demo_dropin feed-zerodha.service feed-sim-kite.service "FEEDS_KITE_CONFIG=$ETC/kite-demo.toml"
demo_dropin feed-kite-token.service feed-sim-kite.service "FEEDS_KITE_CONFIG=$ETC/kite-demo.toml"
# the TWS simulator's pacing windows are scaled to 1/100; the demo fetches the last 20 days
demo_dropin feed-backfill.service feed-sim-tws.service "FEEDS_IBKR_PACING_SCALE=0.01" "FEEDS_BACKFILL_ARGS=--from 20d"
# feed-ibkr: the simulator's live ticks, collected around the clock (no exchange calendar)
demo_dropin feed-ibkr.service feed-sim-tws.service "FEEDS_IBKR_CONFIG=$ETC/ibkr-demo.toml"
if [ $DEMO = 1 ]; then
    # the Kite simulator's demo credentials, written once, readable only by feeds_kite
    for pair in api-secret:simsecret password:simpassword totp-secret:JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP; do
        f="$ETC/secrets/kite-demo-${pair%%:*}"
        [ -e "$f" ] || ( umask 077; printf '%s\n' "${pair#*:}" > "$f"; chown feeds_kite:feeds_kite "$f"; chmod 600 "$f" )
    done
fi
systemctl daemon-reload
# Collectors still running as the former shared user feeds: restart them as their own user
# (a clean stop flushes every buffered row first).
for u in $(systemctl list-units --state=active --plain --no-legend 'feed-binance*.service' feed-zerodha.service \
           | awk '{print $1}'); do
    pid=$(systemctl show -P MainPID "$u")
    if [ "${pid:-0}" -gt 0 ] && [ "$(stat -c %U "/proc/$pid" 2>/dev/null)" = feeds ]; then
        systemctl restart --no-block "$u"
        say "restarted $u as its own user"
    fi
done

verify=$(systemd-analyze verify "$UNITDIR"/feed-*.service "$UNITDIR"/feed-*.timer 2>&1 || true)
[ -z "$verify" ] || { echo "$verify" >&2; die "systemd-analyze verify reported problems"; }

systemctl enable --now feed-maintain.timer >/dev/null 2>&1
systemctl enable --now feed-backfill.timer >/dev/null 2>&1
systemctl enable --now feed-ibkr.timer >/dev/null 2>&1
systemctl enable --now feed-check.timer >/dev/null 2>&1
kite_ready() { ! grep -q '^api_key = "your_api_key"' "$ETC/kite.toml" &&
               for s in api-secret password totp-secret; do [ -s "$ETC/secrets/kite-$s" ] || return 1; done; }
if [ $DEMO = 1 ] || kite_ready; then
    systemctl enable --now feed-kite-token.timer feed-zerodha.timer >/dev/null 2>&1
else
    say "Kite not configured (api_key in $ETC/kite.toml, $ETC/secrets/kite-{api-secret,password,totp-secret}): its timers stay disabled"
fi
dhan_ready() { ! grep -q '^client_id = "your_client_id"' "$ETC/dhan.toml" &&
               { [ -s /var/lib/feeds/dhan/access_token.json ] || [ -s "$ETC/secrets/dhan-initial-token" ] ||
                 { [ -s "$ETC/secrets/dhan-pin" ] && [ -s "$ETC/secrets/dhan-totp-secret" ]; }; }; }
if dhan_ready; then
    systemctl enable --now feed-dhan-token.timer feed-dhan.timer feed-dhan-backfill.timer >/dev/null 2>&1
else
    say "Dhan not configured (client_id in $ETC/dhan.toml; $ETC/secrets/dhan-initial-token, or dhan-pin and dhan-totp-secret with login.method = \"totp\"): its timers stay disabled"
fi
systemctl enable feed-binance.service >/dev/null 2>&1
systemctl enable feed-indicators.service >/dev/null 2>&1
if [ $START = 1 ]; then
    if [ $DEMO = 1 ]; then
        systemctl enable feed-sim-binance.service feed-sim-tws.service feed-sim-kite.service >/dev/null 2>&1
        systemctl restart feed-sim-binance.service feed-sim-tws.service feed-sim-kite.service
        systemctl start --no-block feed-backfill.service
        # the demo collects at any hour: started now, not only by its timer before the New York open
        systemctl restart --no-block feed-ibkr.service
        systemctl start feed-kite-token.service && systemctl restart --no-block feed-zerodha.service \
            || say "feed-kite-token failed: journalctl -u feed-kite-token"
    else
        systemctl disable --now feed-sim-binance.service feed-sim-tws.service feed-sim-kite.service >/dev/null 2>&1 || true
        # a feed-ibkr left running by a demo install: now against TWS / IB Gateway of ibkr.toml
        systemctl try-restart --no-block feed-ibkr.service
    fi
    systemctl restart feed-binance.service
    say "feed-binance: $(systemctl is-active feed-binance.service)"
    systemctl restart --no-block feed-indicators.service
fi
if [ -f "$UNITDIR/feed-api.service" ]; then
    systemctl enable feed-api.service >/dev/null 2>&1
    [ $START = 0 ] || systemctl restart feed-api.service || say "feed-api did not start: journalctl -u feed-api"
fi
say "done. Status: systemctl status feed-binance; journalctl -u feed-binance -f; feedctl status;"
say "      systemctl list-timers 'feed-*'; journalctl -u feed-backfill; journalctl -u feed-ibkr"
say "      alerts: channels in $ETC/alerts.toml (alerts.url_files), then feedctl alert --test;"
say "      operators: usermod -aG feeds_ops alice (feedctl as the read-only role feeds_ops)"
