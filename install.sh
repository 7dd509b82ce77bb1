#!/usr/bin/env bash
# Install (or update) the feeds collectors on a Debian/Ubuntu machine with systemd.
#
#   sudo ./install.sh           collectors pointed at the real venues
#   sudo ./install.sh --demo    also start the Binance, TWS and Kite simulators and point
#                               feed-binance, feed-backfill and feed-zerodha at them
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

# --- user ---------------------------------------------------------------------
install -D -m 644 "$SRC/systemd/feeds.sysusers" /etc/sysusers.d/feeds.conf
install -D -m 644 "$SRC/systemd/feeds.tmpfiles" /etc/tmpfiles.d/feeds.conf
systemd-sysusers /etc/sysusers.d/feeds.conf
systemd-tmpfiles --create /etc/tmpfiles.d/feeds.conf

# --- database role and database (peer authentication on the local socket) -----
psql_pg() { runuser -u postgres -- psql -qAt -v ON_ERROR_STOP=1 "$@"; }
if [ "$(psql_pg -c "select 1 from pg_roles where rolname='feeds'")" != 1 ]; then
    psql_pg -c "CREATE ROLE feeds LOGIN"
    say "created database role feeds"
fi
if [ "$(psql_pg -c "select 1 from pg_database where datname='feeds'")" != 1 ]; then
    psql_pg -c "CREATE DATABASE feeds OWNER feeds"
    say "created database feeds"
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
install -d -m 750 -o root -g feeds "$ETC"
install -d -m 750 -o feeds -g feeds "$ETC/secrets"
for f in "$SRC"/etc/*; do
    dst="$ETC/$(basename "$f")"
    if [ ! -e "$dst" ]; then
        install -m 640 -o root -g feeds "$f" "$dst"
        say "installed $dst"
    elif ! cmp -s "$f" "$dst"; then
        install -m 640 -o root -g feeds "$f" "$dst.dist"
        say "kept your $dst (the shipped default is in $dst.dist)"
    fi
done

# --- migrations ------------------------------------------------------------------------
runuser -u feeds -- "$PREFIX/bin/feed-migrate" --sql-dir "$PREFIX/sql"

# --- units -------------------------------------------------------------------------------
for u in "$SRC"/systemd/*.service "$SRC"/systemd/*.timer; do
    install -m 644 "$u" "$UNITDIR/$(basename "$u")"
done
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
if [ $DEMO = 1 ]; then
    # the Kite simulator's demo credentials, written once, readable only by the service user
    for pair in api-secret:simsecret password:simpassword totp-secret:JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP; do
        f="$ETC/secrets/kite-demo-${pair%%:*}"
        [ -e "$f" ] || ( umask 077; printf '%s\n' "${pair#*:}" > "$f"; chown feeds:feeds "$f"; chmod 600 "$f" )
    done
fi
systemctl daemon-reload

verify=$(systemd-analyze verify "$UNITDIR"/feed-*.service "$UNITDIR"/feed-*.timer 2>&1 || true)
[ -z "$verify" ] || { echo "$verify" >&2; die "systemd-analyze verify reported problems"; }

systemctl enable --now feed-maintain.timer >/dev/null 2>&1
systemctl enable --now feed-backfill.timer >/dev/null 2>&1
kite_ready() { ! grep -q '^api_key = "your_api_key"' "$ETC/kite.toml" &&
               for s in api-secret password totp-secret; do [ -s "$ETC/secrets/kite-$s" ] || return 1; done; }
if [ $DEMO = 1 ] || kite_ready; then
    systemctl enable --now feed-kite-token.timer feed-zerodha.timer >/dev/null 2>&1
else
    say "Kite not configured (api_key in $ETC/kite.toml, $ETC/secrets/kite-{api-secret,password,totp-secret}): its timers stay disabled"
fi
systemctl enable feed-binance.service >/dev/null 2>&1
if [ $START = 1 ]; then
    if [ $DEMO = 1 ]; then
        systemctl enable feed-sim-binance.service feed-sim-tws.service feed-sim-kite.service >/dev/null 2>&1
        systemctl restart feed-sim-binance.service feed-sim-tws.service feed-sim-kite.service
        systemctl start --no-block feed-backfill.service
        systemctl start feed-kite-token.service && systemctl restart --no-block feed-zerodha.service \
            || say "feed-kite-token failed: journalctl -u feed-kite-token"
    else
        systemctl disable --now feed-sim-binance.service feed-sim-tws.service feed-sim-kite.service >/dev/null 2>&1 || true
    fi
    systemctl restart feed-binance.service
    say "feed-binance: $(systemctl is-active feed-binance.service)"
fi
say "done. Status: systemctl status feed-binance; journalctl -u feed-binance -f; feedctl status;"
say "      systemctl list-timers 'feed-*'; journalctl -u feed-backfill"
