"""What one wake-up of an otherwise idle process costs on this machine: CPU time (from
/proc/self/schedstat, in nanoseconds) per wake-up of a process that sleeps and wakes on a timer
and does nothing else, through ``time.sleep`` and through a uvloop timer.

    .venv/bin/python benchmarks/wakeup_price.py [--seconds 10] [--interval 0.05 ...]
    .venv/bin/python benchmarks/wakeup_price.py --interval 0.05 --processes 6 [--grid]

``--processes N`` measures N such processes at once, as a service's workers idle side by side
(each line then gives the median and range of the N). ``--grid`` sets every uvloop timer on a
grid of the interval on the monotonic clock, the same instants in every process, so the N wake
together instead of at random phases.

A service that holds connections idle spends what its timers wake it for: on a virtual machine a
timer interrupt and the switch back to the process can cost tens of microseconds of the process's
own CPU, whatever the callback does (docs/benchmarks.md, "A wake-up's price, and a lag sampler
that woke less": fewer wake-ups saved CPU at 100,000 idle, and cost CPU at a million).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import uvloop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository's shared helpers

from tests.support.service import ran_ns  # noqa: E402


def on_cpu_ns() -> int:
    """This process's time on a CPU (ns), as the scheduler counts it."""
    return ran_ns([os.getpid()])


def sleeps(interval: float, seconds: float) -> tuple[int, int]:
    n = max(1, int(seconds / interval))
    c0 = on_cpu_ns()
    for _ in range(n):
        time.sleep(interval)
    return on_cpu_ns() - c0, n


def timers(interval: float, seconds: float, grid: bool = False) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        count = 0

        def tick() -> None:
            nonlocal count
            count += 1
            again()

        def again() -> None:
            if grid:  # the next grid point: round(), as a timer may fire a little early
                loop.call_at((round(loop.time() / interval) + 1) * interval, tick)
            else:
                loop.call_later(interval, tick)

        again()
        c0 = on_cpu_ns()
        await asyncio.sleep(seconds)
        return on_cpu_ns() - c0, count

    return uvloop.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long each measurement runs")
    ap.add_argument(
        "--interval",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 0.25],
        help="seconds between wake-ups (several: one measurement each)",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="processes measured at once, each its own wake-ups (the median and range printed)",
    )
    ap.add_argument(
        "--grid",
        action="store_true",
        help="uvloop timers on a shared grid of the interval: every process wakes at once",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child of --processes: one measurement
    args = ap.parse_args()
    if args.seconds <= 0 or any(i <= 0 for i in args.interval):
        ap.error("--seconds and every --interval must be above 0")
    if args.processes < 1:
        ap.error("--processes must be 1 or more")
    hows = {"time.sleep": sleeps, "uvloop timer": lambda i, s: timers(i, s, args.grid)}
    if args.one is not None:  # in a child: one measurement, as "ns n"
        ns, n = hows[args.one](args.interval[0], args.seconds)
        print(ns, n)
        return
    for interval in args.interval:
        for name in hows:
            if args.processes == 1:
                ns, n = hows[name](interval, args.seconds)
                per = [ns / n]
            else:
                per = together(name, interval, args)
            a_wake = statistics.median(per) / 1000
            spread = "" if len(per) == 1 else f" ({min(per) / 1000:.1f}-{max(per) / 1000:.1f})"
            print(
                f"{name:12s} every {interval * 1000:6.1f} ms: {a_wake:6.1f} µs of CPU a "
                f"wake-up{spread}, {a_wake / interval / 1000:6.2f} ms of CPU a second",
                flush=True,
            )


def together(name: str, interval: float, args: argparse.Namespace) -> list[float]:
    """``args.processes`` children measuring at once: each one's ns of CPU a wake-up."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name]
    cmd += ["--interval", str(interval), "--seconds", str(args.seconds)]
    cmd += ["--grid"] if args.grid else []
    children = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)
    ]
    per = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            sys.exit(f"a measuring process failed (exit {child.returncode})")
        ns, n = map(int, out.split())
        per.append(ns / n)
    return per


if __name__ == "__main__":
    main()
