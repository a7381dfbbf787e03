#!/bin/sh
# The floor at a million on one box (docs/benchmarks.md, section "headroom"): what the least a
# server can do — benchmarks/bare_server.py, no parsing, no hub, no metrics — makes of the
# million's own run. The host is tuned as for benchmarks/million.sh, FLOOR_PROCS copies of the bare
# server (default 54, as many as the service's workers; each under the 20,000 open-files limit)
# share port 8888 with SO_REUSEPORT and ping every 20 s, and comet-bench drives them with the same
# clients, rate, hold and broadcasts as the million: each broadcast is a timed line the bench
# writes to a file and the bare servers send on SIGUSR1. Its ramp, idle share and last delivery
# are what a server that writes each connection with a system call can reach on this box.
# Not part of the test suite at this size: it takes the whole machine for ~10 minutes with --hold 60
# (tests/test_floor_million.py runs it small: FLOOR_PROCS, FLOOR_PORT, FLOOR_PING seconds between
# pings (default 20, the million's), FLOOR_TUNE=0 leaves the host's tuning alone).
# With --netns N among the flags the clients are in N network namespaces, as the service's
# `--netns N` run: the bare servers listen on the bridge's address (10.77.0.1, comet-bench's
# loadgen.bench.options.BRIDGE_ADDRESS, bound before the bench adds it) instead of loopback.
# Not with --service-netns (the floor runs on the host).
#   benchmarks/floor_million.sh [OUT_DIR] [extra comet-bench flags...]
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-floor-million-out}
[ $# -gt 0 ] && shift
PROCS=${FLOOR_PROCS:-54}
PORT=${FLOOR_PORT:-8888}
HOST=127.0.0.1
BIND=""
for arg in "$@"; do
    case $arg in
    --netns | --netns=*) HOST=10.77.0.1 BIND=--freebind ;;
    esac
done
if ss -ltnH "sport = :$PORT" | grep -q .; then
    echo "floor_million: port $PORT is in use (a service still running?)" >&2
    exit 2
fi
if [ "${FLOOR_TUNE:-1}" != 0 ]; then
    (cd ansible && ../.venv/bin/ansible-playbook tune-host.yml -e @profiles/million-one-box.yml)
fi
MSG=$(mktemp /tmp/floor-message.XXXXXX)
PIDS=""
cleanup() {
    # shellcheck disable=SC2086 # a list of pids
    [ -z "$PIDS" ] || kill $PIDS 2>/dev/null || true
    rm -f "$MSG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$OUT"
i=0
while [ "$i" -lt "$PROCS" ]; do
    .venv/bin/python benchmarks/bare_server.py --host "$HOST" ${BIND:+"$BIND"} --port "$PORT" \
        --reuseport --ping "${FLOOR_PING:-20}" --message-file "$MSG" >>"$OUT/floor-servers.log" 2>&1 &
    PIDS="$PIDS $!"
    i=$((i + 1))
done
waited=0
until [ "$(ss -ltnH "sport = :$PORT" | wc -l)" -ge "$PROCS" ]; do
    waited=$((waited + 1))
    if [ "$waited" -gt 120 ]; then
        echo "floor_million: $PROCS bare servers not listening after 60 s (see $OUT/floor-servers.log)" >&2
        exit 1
    fi
    sleep 0.5
done
. benchmarks/million-flags.sh
# shellcheck disable=SC2086 # MILLION_FLAGS is a list of flags
.venv/bin/comet-bench --target "http://$HOST:$PORT/" \
    --publish-cmd "printf '%s' \"\$COMET_BENCH_DATA\" > $MSG && kill -USR1 $PIDS" \
    $MILLION_FLAGS --out "$OUT" --no-progress "$@"
