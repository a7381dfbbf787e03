"""What the service spends holding nothing: the CPU of the supervisor and each worker of a service
with no connections at all, over a window, from ``/proc/PID/task/*/schedstat``.

    .venv/bin/python benchmarks/idle_cost.py --workers 6 --seconds 20
    .venv/bin/python benchmarks/idle_cost.py --workers 54 --seconds 20

This is the fixed part of every "holding" figure (``worker_bench.py``'s
``idle_cpu_ns_per_conn_s``): each worker's loop-lag samples (every 50 ms while idle, each a
wake-up: ``wakeup_price.py``), its stats answer once a second, and the supervisor's frame (the
workers' stats and /proc readings) once a second. The floor (``bare_server.py``) has none of it, so
at 100,000 connections on 6 workers this part alone sets much of the service's ratio to the floor.
Prints one line per process kind and the total, in ms of CPU a second, and how long the
supervisor took to build a frame (``frame_ms``, from its CSV log).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

from tests.support.service import Service, ran_ns  # noqa: E402


def frame_times(log_dir: Path, seconds: float) -> list[float]:
    """``frame_ms`` of the frames of the last ``seconds`` (the supervisor's CSV log)."""
    rows: list[dict[str, str]] = []
    for path in sorted(log_dir.glob("*.csv")):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return [float(r["frame_ms"]) for r in rows[-int(seconds) :] if r.get("frame_ms")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=6, help="the service's --workers (%(default)s)")
    ap.add_argument(
        "--seconds", type=float, default=20.0, help="the window measured (%(default)s s)"
    )
    ap.add_argument(
        "--settle", type=float, default=5.0, help="seconds after start-up before it (%(default)s)"
    )
    args = ap.parse_args()
    if args.workers < 1 or args.seconds <= 0 or args.settle < 0:
        ap.error("--workers must be 1 or more, --seconds above 0 and --settle 0 or more")
    from loadgen.bench.report import cpu_model

    with tempfile.TemporaryDirectory(prefix="idle-cost-") as tmp:
        svc = Service(Path(tmp), "--workers", str(args.workers))
        try:
            svc.wait_up(args.workers, timeout=120)
            time.sleep(args.settle)
            sup = svc.proc.pid
            workers = [p.pid for p in psutil.Process(sup).children()]
            before = {pid: ran_ns([pid]) for pid in [sup, *workers]}
            t0 = time.monotonic()
            time.sleep(args.seconds)
            after = {pid: ran_ns([pid]) for pid in before}
            span = time.monotonic() - t0
            frame_ms = frame_times(svc.log_dir, args.seconds)
        finally:
            svc.stop()
    ms = {pid: (after[pid] - before[pid]) / 1e6 / span for pid in before}
    per_worker = [ms[pid] for pid in workers]
    print(f"cpu: {cpu_model()}, {os.cpu_count()} CPUs; {args.workers} workers, no connections")
    frame = f"{statistics.median(frame_ms):.2f} ms (median)" if frame_ms else "not logged"
    print(f"supervisor: {ms[sup]:6.2f} ms of CPU a second; building a frame took {frame}")
    print(
        f"workers:    {sum(per_worker):6.2f} ms of CPU a second in all, "
        f"{statistics.median(per_worker):.2f} each (median; "
        f"{min(per_worker):.2f}-{max(per_worker):.2f})"
    )
    print(f"total:      {sum(ms.values()):6.2f} ms of CPU a second")


if __name__ == "__main__":
    main()
