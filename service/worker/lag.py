"""Event-loop lag sampler: a timer every 10 ms (50 ms while idle) measures how late the loop ran it.

A worker is one of ~54 processes on two cores at 1,000,000 connections, and a 10 ms timer costs
each of them ~0.4 % of a core while idle (a wake-up, a Python call, a new timer): ~20 % of a core
in all for measuring nothing. So while the loop is idle (the last sample was under 2 ms late and
``busy()`` says no broadcast is being written) the next sample is taken 50 ms later;
a late sample or a broadcast switches it back to 10 ms. Idle samples are ~0 ms, so taking fewer of
them can only raise the reported percentiles, never hide a stall. Sampling less while idle (4 a
second) was tried: it saved CPU at 100,000 idle, and cost the million's hold and broadcasts more
(docs/benchmarks.md, "A wake-up's price").
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
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._idle_interval = max(interval, idle_interval)
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
        idle = lag < self.IDLE_BELOW and not (self._busy is not None and self._busy())
        self._due = now + (self._idle_interval if idle else self._interval)
        self._handle = self._loop.call_at(self._due, self._tick)

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
