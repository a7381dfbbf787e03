#!/bin/sh
# The million on one box (docs/benchmarks.md, section "million"): tune the host with the project's
# own playbook, then ramp the service to 1,000,000 connections, hold 10 minutes with pings every
# 20 s, send 3 broadcasts, ramp down, and draw the service's memory/CPU graphs with comet-plot.
# Not part of the test suite: it takes ~23 minutes and the whole machine (24 GB, both cores).
#   benchmarks/million.sh [OUT_DIR] [extra comet-bench flags...]
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-million-out}
[ $# -gt 0 ] && shift
(cd ansible && ../.venv/bin/ansible-playbook tune-host.yml -e @profiles/million-one-box.yml)
# Port 8888: the comet group's host_tuning_notrack_ports, so no connection is tracked.
. benchmarks/million-flags.sh
# shellcheck disable=SC2086 # MILLION_FLAGS is a list of flags
.venv/bin/comet-bench $MILLION_FLAGS --port 8888 --ramp-down --out "$OUT" --no-progress "$@"
.venv/bin/comet-plot -o "$OUT" --title "1,000,000 connections, one 2-core box" \
    "$OUT"/service-logs/*.csv
