"""Event-loop lag sampler: a timer every 10 ms (50 ms to 250 ms while idle) measures how late the
loop ran it.

A worker is one of ~54 processes on two cores at 1,000,000 connections, and on this machine kind
a process's wake-up costs 40-110 µs of CPU however little it does (a virtual machine's timer
interrupt; docs/benchmarks.md, "A wake-up's price"). A 10 ms timer would cost each worker ~0.4 %
of a core while idle, ~20 % of a core in all for measuring nothing. So while the loop is idle (the
last sample was under 2 ms late and ``busy()`` says no broadcast is being written) the step to the
next sample doubles, 50 ms, 100 ms, 200 ms, then 250 ms: 4 wake-ups a second, not 20, once a
worker has been idle for 0.4 s. A late sample switches back to 10 ms, and so does ``hurry()``,
which the hub calls as a broadcast begins, so a broadcast is sampled from its first 10 ms. Idle
samples are ~0 ms, so taking fewer of them can only raise the reported percentiles; the price is
that a stall which begins and ends between two idle samples is not seen (of stalls of 100 ms
in a worker idle for a while, 2 in 5 are).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import deque
from collections.abc import Callable

from service.contracts import LAG_BOUNDS_MS, LagMs

_BOUNDS_S = tuple(b / 1000.0 for b in LAG_BOUNDS_MS)


class LagSampler:
    """Lag = how late a callback scheduled for time T actually ran (seconds → reported in ms).

    ``read()`` returns avg / p90 / p99 / max over the samples since the previous read, so the
    supervisor sees every second's worst stall even when it polls once a second.
    """

    __slots__ = (
        "_loop",
        "_interval",
        "_idle_interval",
        "_idle_max",
        "_idle_step",
        "_busy",
        "_samples",
        "_max",
        "_handle",
        "_due",
        "_hist",
    )

    # A sample later than this keeps the sampler at ``interval``. libuv fires timers on whole
    # milliseconds, so up to ~1 ms of lateness is its resolution, not a stall: at 1 ms an idle
    # worker flipped to 10 ms sampling on ordinary jitter (and a test counting samples flaked).
    IDLE_BELOW = 0.002

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float = 0.01,
        idle_interval: float = 0.05,
        busy: Callable[[], bool] | None = None,
        idle_max: float = 0.25,
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._idle_interval = max(interval, idle_interval)
        self._idle_max = max(self._idle_interval, idle_max)
        self._idle_step = self._idle_interval  # the next idle step; doubles up to _idle_max
        self._busy = busy
        # A reader that stops calling read() must not grow memory: keep the latest minute.
        self._samples: deque[float] = deque(maxlen=int(60 / interval))
        self._max = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        # Every sample since start, by bucket (service/contracts.py LAG_BOUNDS_MS).
        self._hist = [0] * (len(_BOUNDS_S) + 1)

    def start(self) -> None:
        self._due = self._loop.time() + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        self._samples.append(lag)
        self._hist[bisect_left(_BOUNDS_S, lag)] += 1
        if lag > self._max:
            self._max = lag
        if lag < self.IDLE_BELOW and not (self._busy is not None and self._busy()):
            step = self._idle_step
            self._idle_step = min(step * 2, self._idle_max)
        else:
            step = self._interval
            self._idle_step = self._idle_interval
        self._due = now + step
        self._handle = self._loop.call_at(self._due, self._tick)

    def hurry(self) -> None:
        """Work begins (a broadcast): the next sample within ``interval``, not at an idle step's
        end, and idle steps start again from the shortest."""
        self._idle_step = self._idle_interval
        if self._handle is None:
            return
        due = self._loop.time() + self._interval
        if due < self._due:
            self._handle.cancel()
            self._due = due
            self._handle = self._loop.call_at(due, self._tick)

    @property
    def pending(self) -> int:
        """Samples taken since the previous ``read()``."""
        return len(self._samples)

    def read(self) -> LagMs:
        """Lag in ms since the previous read: {"avg", "p90", "p99", "max"} (zeros before a sample).

        p99 is what the broadcast target is stated in; with 100 samples a second it is the
        second-worst sample of that second, so one stall does not set it but two do.
        """
        samples = sorted(self._samples)
        peak = self._max
        self._samples.clear()
        self._max = 0.0
        if not samples:
            return {"avg": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
        p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        return {
            "avg": round(1000 * sum(samples) / len(samples), 3),
            "p90": round(1000 * p90, 3),
            "p99": round(1000 * p99, 3),
            "max": round(1000 * peak, 3),
        }

    def histogram(self) -> list[int]:
        """Every sample since start, counted by LAG_BOUNDS_MS (a sample of exactly a bound in
        that bound's bucket), trailing empty buckets left off."""
        counts = self._hist
        n = len(counts)
        while n and not counts[n - 1]:
            n -= 1
        return counts[:n]
