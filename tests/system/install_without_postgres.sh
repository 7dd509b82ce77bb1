#!/bin/bash
# install.sh --demo on a machine without PostgreSQL: it installs it with apt, starts it, and the
# collector stores rows. Needs root and the Debian package mirror (the container shares the host
# network); opt-in from pytest with FEEDS_SYSTEM_APT=1 because it downloads packages.
set -uo pipefail
export SDTEST_DIR=${SDTEST_DIR:-/tmp/feeds-sdbox-apt-$$} SDTEST_NAME=${SDTEST_NAME:-feedsapt$$}
source "$(dirname "$0")/lib.sh"
need_port 5432 "a PostgreSQL on the host; the container's own cannot start"
boot "$REPO:/opt/src:ro"
$I bash -c 'systemctl stop postgresql; DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "postgresql*" >/dev/null 2>&1;
            rm -rf /var/lib/postgresql /etc/postgresql'
$I test -e /usr/lib/postgresql && bad "PostgreSQL still present" || ok "PostgreSQL removed in the container"
out=$($I bash -c 'cd /opt/src && ./install.sh --demo' 2>&1); rc=$?
[ $rc = 0 ] && ok "install.sh --demo" || { bad "install.sh rc=$rc"; echo "$out" | tail -20; }
contains "$out" "install.sh: installing postgresql" && ok "install.sh installed postgresql with apt" || bad "no apt install line"
[ "$($I systemctl is-active feed-binance)" = active ] && ok "feed-binance active" || bad "feed-binance not active"
sleep 3
n=$($I runuser -u postgres -- psql -qAt feeds -c "select count(*) from binance_agg_trade")
[ "${n:-0}" -gt 0 ] && ok "rows stored: $n aggTrades" || bad "no rows"
echo "system test: $([ $fail = 0 ] && echo all checks passed || echo FAILED)"
exit $fail
