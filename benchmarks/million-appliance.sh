#!/bin/sh
# The million as a user deploys it (docs/benchmarks.md, "The million through the appliance"):
# ansible-playbook site.yml with the one-box appliance profile tunes this host and runs the
# service, admin and load-generator containers; then benchmarks/million_appliance.py ramps the
# agents to 1,000,000 with `comet-loadgen fleet set n=` in steps, holds 10 minutes while timing the
# admin API, opens the dashboard in Chromium, sends 3 broadcasts with POST /api/broadcast,
# optionally upgrades the service image with every connection held (--upgrade), ramps down, and
# draws the service's memory/CPU graphs from its CSV log volume with comet-plot.
# Not part of the test suite: ~30 minutes and the whole machine (24 GB, both cores). Run as root.
#   benchmarks/million-appliance.sh [OUT_DIR] [million_appliance.py flags...]
# COMET_APPLIANCE_PROFILE names another profile (an A/B of one setting: a copy of the profile
# with it changed); the upgrade then deploys with the same one.
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-million-appliance-out}
[ $# -gt 0 ] && shift
PROFILE=$(realpath "${COMET_APPLIANCE_PROFILE:-ansible/profiles/million-appliance.yml}")
# The dashboard is timed in Debian's Chromium: installed now, not found missing after the hold.
if [ ! -x /usr/bin/chromium ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
(cd ansible && ../.venv/bin/ansible-playbook site.yml -e "@$PROFILE")
.venv/bin/python benchmarks/million_appliance.py --out "$OUT" --profile "$PROFILE" "$@"
.venv/bin/comet-plot -o "$OUT" --title "1,000,000 connections through the containers, one 2-core box" \
    "$OUT"/service-logs/*.csv
