"""What one wake-up of an otherwise idle process costs on this machine: CPU time (from
/proc/self/schedstat, in nanoseconds) per wake-up of a process that sleeps and wakes on a timer
and does nothing else, through ``time.sleep`` and through a uvloop timer.

    .venv/bin/python benchmarks/wakeup_price.py [--seconds 10] [--interval 0.05 ...]

A service that holds connections idle spends what its timers wake it for: on a virtual machine a
timer interrupt and the switch back to the process can cost tens of microseconds of the process's
own CPU, whatever the callback does (docs/benchmarks.md, "A wake-up's price, and a lag sampler
that woke less": fewer wake-ups saved CPU at 100,000 idle, and cost CPU at a million).
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


def timers(interval: float, seconds: float) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        count = 0

        def tick() -> None:
            nonlocal count
            count += 1
            loop.call_later(interval, tick)

        loop.call_later(interval, tick)
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
    args = ap.parse_args()
    if args.seconds <= 0 or any(i <= 0 for i in args.interval):
        ap.error("--seconds and every --interval must be above 0")
    for interval in args.interval:
        for name, how in (("time.sleep", sleeps), ("uvloop timer", timers)):
            ns, n = how(interval, args.seconds)
            print(
                f"{name:12s} every {interval * 1000:6.1f} ms: {ns / n / 1000:6.1f} µs of CPU a "
                f"wake-up, {ns / 1e6 / args.seconds:6.2f} ms of CPU a second",
                flush=True,
            )


if __name__ == "__main__":
    main()
