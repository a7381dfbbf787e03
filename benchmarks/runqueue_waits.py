#!/usr/bin/env python3
"""How long the service's workers wait for a CPU while they are runnable, around broadcasts.

A worker's loop lag (the frames' ``lag_ms``) is how late its timer ran; on a box where more
processes want the cores than there are cores, most of that is time spent runnable on a run
queue. The kernel counts it per process in ``/proc/PID/schedstat`` (on-CPU ns, run-queue wait
ns, timeslices). ``sample`` reads it for every ``comet-service: worker`` process on the host
(bare or in a container) every 0.25 s; ``report`` cuts the samples by the broadcast windows of a
bench.json (``comet-bench`` or ``million_appliance.py``):

    .venv/bin/python benchmarks/runqueue_waits.py sample --seconds 300 --out waits.jsonl &
    .venv/bin/comet-bench ... --out OUT            # or benchmarks/million_appliance.py
    .venv/bin/python benchmarks/runqueue_waits.py report OUT/bench.json waits.jsonl

Per broadcast: the wait per timeslice averaged over all workers, and the most one worker waited
within a quarter of a second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

Samples = list[tuple[float, dict[str, list[int]]]]


def worker_pids(port: int | None) -> list[int]:
    """The workers' pids by their process title (``comet-service: worker N :PORT``)."""
    pattern = f"^comet-service: worker [0-9]+ :{port if port else '[0-9]+'}( |$)"
    res = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(p) for p in res.stdout.split()]


def sample(seconds: float, out: Path, port: int | None = None) -> None:
    end = time.time() + seconds
    pids, found_at = worker_pids(port), time.time()
    with out.open("w") as f:
        while time.time() < end:
            if time.time() - found_at > 5:  # workers come and go (a reload, a new container)
                pids, found_at = worker_pids(port), time.time()
            row: dict[str, list[int]] = {}
            for pid in pids:
                try:
                    row[str(pid)] = [
                        int(x) for x in Path(f"/proc/{pid}/schedstat").read_text().split()
                    ]
                except OSError:
                    continue
            f.write(json.dumps([time.time(), row]) + "\n")
            f.flush()
            time.sleep(0.25)


def report(bench: Path, samples_file: Path) -> list[dict[str, float]]:
    rows: Samples = [tuple(json.loads(line)) for line in samples_file.open()]  # type: ignore[misc]
    out = []
    for b in json.loads(bench.read_text()).get("broadcasts", []):
        start = float(b["published"])
        end = start + float(b.get("last_delivery_ms") or 0) / 1000
        window = [r for r in rows if start <= r[0] <= end]
        if len(window) < 2:
            continue
        first, last = window[0][1], window[-1][1]
        waited = sum(last[p][1] - first[p][1] for p in last if p in first)
        slices = sum(last[p][2] - first[p][2] for p in last if p in first)
        worst = max(
            (
                b1[p][1] - a1[p][1]
                for (_, a1), (_, b1) in zip(window, window[1:], strict=False)
                for p in b1
                if p in a1
            ),
            default=0,
        )
        out.append(
            {
                "seq": b.get("seq"),
                "seconds": round(end - start, 2),
                "lag_p99_worker_ms": b.get("lag_p99_worker_ms"),
                "wait_per_slice_ms": round(waited / max(1, slices) / 1e6, 2),
                "worst_quarter_second_wait_ms": round(worst / 1e6, 1),
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="read the workers' schedstat every 0.25 s")
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--out", type=Path, required=True, help="JSON lines file to write")
    s.add_argument("--port", type=int, default=None, help="only the workers of the service on it")
    r = sub.add_parser("report", help="the waits in each broadcast window of a bench.json")
    r.add_argument("bench", type=Path)
    r.add_argument("samples", type=Path)
    args = p.parse_args()
    if args.cmd == "sample":
        sample(args.seconds, args.out, args.port)
        return 0
    for row in report(args.bench, args.samples):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
