#!/usr/bin/env python3
"""What the host spends on idle sockets that are nobody's traffic: hold N idle loopback TCP
sockets (pairs, no bytes after the handshake) and read, over a window, the host's busy CPU and
the busiest processes. A million-connection run counts the host's idle share against a target;
this separates what the box itself (its init, its agents) spends per open socket from what the
service and the load generator spend.

    .venv/bin/python benchmarks/host_overhead.py --sockets 0,500000,1000000,2000000 --seconds 30

Each count is held by child processes of 9,900 pairs each (19,800 fds, under the 20,000 limit),
each child with a listener of its own and its clients bound to its own 127.1.x.y address. Needs
the host tuned for the count (fs.file-max, the ephemeral range does not matter: every client
binds its own port). Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadgen.bench.record import (  # noqa: E402
    busiest_since,
    host_busy_pct,
    process_cpu,
    softirq_pct,
)
from loadgen.bench.report import cpu_model  # noqa: E402
from service.supervisor.frames import read_sockstat  # noqa: E402

PAIRS_PER_CHILD = 9_900


def child(index: int, pairs: int, kind: str) -> None:
    """Open ``pairs`` idle loopback connections (both ends here), or twice as many descriptors
    of /dev/null with ``kind`` ``files``; say ``ready``, hold."""
    if kind == "files":
        files = [os.open(os.devnull, os.O_RDONLY) for _ in range(2 * pairs)]
        print("ready", flush=True)
        sys.stdin.read()
        del files
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    addr = listener.getsockname()
    source = f"127.1.{index // 250}.{index % 250 + 1}"
    held = []
    for _ in range(pairs):
        c = socket.socket()
        c.bind((source, 0))
        c.connect(addr)
        s, _ = listener.accept()
        held.append((c, s))
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin


def hold(sockets: int, kind: str) -> list[subprocess.Popen[str]]:
    pairs = sockets // 2
    kids = []
    for i in range((pairs + PAIRS_PER_CHILD - 1) // PAIRS_PER_CHILD):
        n = min(PAIRS_PER_CHILD, pairs - i * PAIRS_PER_CHILD)
        kids.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", str(i), str(n), kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for k in kids:
        assert k.stdout is not None
        line = k.stdout.readline()
        if line.strip() != "ready":
            stop(kids)
            raise SystemExit(f"a holder did not get its sockets (exit {k.poll()}): see its stderr")
    return kids


def stop(kids: list[subprocess.Popen[str]]) -> None:
    for k in kids:
        if k.stdin is not None:
            k.stdin.close()
    for k in kids:
        try:
            k.wait(30)
        except subprocess.TimeoutExpired:
            k.kill()
            k.wait(10)


def measure(seconds: float, exclude: set[int]) -> dict[str, object]:
    host0, procs0, t0 = psutil.cpu_times(), process_cpu(), time.time()
    time.sleep(seconds)
    dt = time.time() - t0
    host1 = psutil.cpu_times()
    return {
        "seconds": round(dt, 1),
        "host_busy_pct_of_core": host_busy_pct(host0, host1, dt),
        "softirq_pct_of_core": softirq_pct(host0, host1, dt),
        "busiest": busiest_since(procs0, dt, exclude),
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sockets", default="0,1000000", help="comma-separated counts of descriptors to hold"
    )
    p.add_argument(
        "--kind",
        choices=("sockets", "files"),
        default="sockets",
        help="hold loopback TCP sockets, or as many descriptors of /dev/null (is it the sockets "
        "or the descriptors that cost?)",
    )
    p.add_argument("--seconds", type=float, default=30.0, help="the measuring window per count")
    p.add_argument("--settle", type=float, default=10.0, help="seconds held before measuring")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    try:
        counts = [int(x) for x in args.sockets.split(",")]
    except ValueError:
        p.error(f"--sockets: comma-separated integers, got {args.sockets!r}")
    if any(c < 0 or c > 4_000_000 for c in counts):
        p.error("--sockets: each count within 0-4,000,000")
    rows = []
    for count in counts:
        kids = hold(count, args.kind)
        try:
            time.sleep(args.settle)
            row = {
                "kind": args.kind,
                "count": count,
                "tcp_in_use": read_sockstat().get("TCP", {}).get("inuse", 0),
                **measure(args.seconds, {k.pid for k in kids}),
            }
        finally:
            stop(kids)
        rows.append(row)
        top = ", ".join(f"{b['name']} {b['pct_of_core']}" for b in row["busiest"])  # type: ignore[attr-defined]
        print(
            f"{count:>9,} idle {args.kind} ({row['tcp_in_use']:,} TCP sockets in use): host busy "
            f"{row['host_busy_pct_of_core']} % of a core, softirq {row['softirq_pct_of_core']} %; "
            f"busiest: {top or 'none >= 1 %'}",
            flush=True,
        )
    machine = {"cpu": cpu_model(), "cores": psutil.cpu_count(), "kernel": platform.release()}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}")
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
