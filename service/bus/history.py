"""The supervisor's copy of recent messages, in per-channel rings: what a (re)started worker is
given so it can serve resumes from before it started."""

from __future__ import annotations

import time
from collections import deque

from service.contracts import Msg

# The init message carries the history to a (re)started worker as one JSON line; keep it well
# below anything a worker would refuse, dropping the oldest messages first.
HISTORY_SNAPSHOT_MAX_BYTES = 16 * 1024 * 1024


class History:
    """Per-channel rings, the same shape the workers keep, so a restarted worker can serve resumes.

    A message for every channel (``channel`` None) lives in its own ring, since every channel's
    history includes it.
    """

    __slots__ = ("size", "max_age", "_rings")

    def __init__(self, size: int, max_age: float) -> None:
        self.size = size
        self.max_age = max_age
        self._rings: dict[str | None, deque[Msg]] = {}

    def add(self, msg: Msg) -> None:
        ring = self._rings.get(msg["channel"])
        if ring is None:
            ring = self._rings[msg["channel"]] = deque(maxlen=self.size)
        ring.append(msg)

    def snapshot(self, now: float | None = None) -> list[Msg]:
        """Every message still resumable, oldest first, capped in total size."""
        cutoff = (time.time() if now is None else now) - self.max_age
        for key in list(self._rings):
            ring = self._rings[key]
            while ring and ring[0]["ts"] < cutoff:
                ring.popleft()
            if not ring:
                del self._rings[key]
        msgs = sorted((m for ring in self._rings.values() for m in ring), key=lambda m: m["id"])
        total = 0
        keep = len(msgs)
        for i in range(len(msgs) - 1, -1, -1):
            total += len(msgs[i]["data"]) + 100
            if total > HISTORY_SNAPSHOT_MAX_BYTES:
                break
            keep = i
        return msgs[keep:]
