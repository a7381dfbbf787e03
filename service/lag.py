"""Event-loop lag sampler: one timer every 10 ms measures how late the loop ran it."""

from __future__ import annotations

import asyncio
from collections import deque


class LagSampler:
    """Lag = how late a callback scheduled for time T actually ran (seconds → reported in ms).

    ``read()`` returns avg / p90 / p99 / max over the samples since the previous read, so the
    supervisor sees every second's worst stall even when it polls once a second.
    """

    __slots__ = ("_loop", "_interval", "_samples", "_max", "_handle", "_due")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.01) -> None:
        self._loop = loop
        self._interval = interval
        # A reader that stops calling read() must not grow memory: keep the latest minute.
        self._samples: deque[float] = deque(maxlen=int(60 / interval))
        self._max = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

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
        if lag > self._max:
            self._max = lag
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def read(self) -> dict[str, float]:
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
