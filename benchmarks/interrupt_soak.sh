#!/usr/bin/env bash
# Run comet-bench's interrupt tests N times in a row (default 20) with both cores kept busy by
# background CPU burners, the condition under which a signal lost in a start-up window shows up.
# Bounded: N runs, each with pytest's own timeouts; the burners die with this script.
#   benchmarks/interrupt_soak.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
burners=()
cleanup() { for p in "${burners[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq "$(nproc)"); do
    nice -n 5 python3 -c 'while True: pass' &
    burners+=($!)
done
for i in $(seq "$runs"); do
    if ! .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/loadgen/test_bench.py -k interrupted >"/tmp/interrupt-soak-$i.log" 2>&1; then
        echo "run $i/$runs FAILED (log /tmp/interrupt-soak-$i.log)"
        tail -30 "/tmp/interrupt-soak-$i.log"
        exit 1
    fi
    echo "run $i/$runs: $(tail -1 "/tmp/interrupt-soak-$i.log")"
done
echo "$runs runs in a row passed under load"
