# Shared helpers of the system tests; source it after choosing SDTEST_DIR and SDTEST_NAME.
# Every test boots its own container with the host network (so install.sh can reach the
# package registries) and the container's own PostgreSQL on port 5432.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
H=$REPO/tests/sdbox
I="$H/in.sh"
export SDTEST_NET=host
# With the host network, the image's own servers that would start at boot and take host ports are
# masked (the image's PostgreSQL is not: each test uses it, on port 5432).
export SDT_MASK_HOSTNET="prometheus.service prometheus-node-exporter.service mosquitto.service"
fail=0
ok()  { echo "PASS: $*"; }
bad() { echo "FAIL: $*"; fail=1; }
# waitfor SECONDS CMD...: poll CMD every 0.5 s until it succeeds or time runs out
waitfor() { local end=$(( $(date +%s) + $1 )); shift
            until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge $end ] && return 1; sleep 0.5; done; }
prop() { $I systemctl show -P "$2" "$1"; }
state_is() { [ "$(prop "$1" ActiveState)" = "$2" ]; }       # state_is UNIT STATE
sql()  { $I runuser -u postgres -- psql -qAt feeds -c "$1"; }
# sql_as USER SQL: as the OS user USER, hence (peer authentication) as the database role USER
sql_as() { $I runuser -u "$1" -- psql -qAt -v ON_ERROR_STOP=1 "host=/run/postgresql dbname=feeds" -c "$2" 2>&1; }
# refused USER SQL PATTERN: the statement fails for USER with an error matching PATTERN
refused() { local out; out=$(sql_as "$1" "$2") && return 1; contains "$out" "$3"; }
# Never "cmd | grep -q": with pipefail, grep's early exit can fail the pipe by SIGPIPE.
contains() { grep -q -- "$2" <<< "$1"; }               # contains TEXT PATTERN
jgrep() { contains "$($I journalctl -u "$1" --no-pager)" "$2"; }
ports() { ss -ltn 2>/dev/null; }
dump() { echo "----- journal (last ${1:-150} lines)"; $I journalctl -b --no-pager | tail -"${1:-150}"; }
# need_port PORT WHAT [WAIT_SECONDS]: exit 77 (skip) if PORT stays taken on the host
need_port() {
    local end=$(( $(date +%s) + ${3:-0} ))
    while contains "$(ports)" ":$1 " && [ "$(date +%s)" -lt $end ]; do sleep 5; done
    if contains "$(ports)" ":$1 "; then echo "SKIP: port $1 ($2) is taken on the host"; exit 77; fi
}
# boot BINDS: boot the container (torn down at exit, journal dumped on failure)
boot() {
    trap '[ $fail = 0 ] || dump; $H/teardown.sh >/dev/null 2>&1' EXIT
    SDT_BIND="$1" "$H/boot.sh" || { echo "FAIL: boot"; exit 1; }
}
# install_bundle [ARGS]: wait for the container's PostgreSQL, then run install.sh ARGS
# (default --no-start) from the bound source; its output goes to $SDTEST_DIR/install.log
install_bundle() {
    local args=${1:---no-start} t
    waitfor 60 $I runuser -u postgres -- pg_isready -q || bad "postgresql in the container"
    t=$(date +%s)
    if $I bash -c "cd /opt/src && ./install.sh $args" > "$SDTEST_DIR/install.log" 2>&1; then
        ok "install.sh $args ($(( $(date +%s) - t ))s)"
    else
        bad "install.sh $args"; tail -30 "$SDTEST_DIR/install.log"
    fi
}
