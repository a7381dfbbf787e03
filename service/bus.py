"""The broadcast bus: where message ids come from and where recent history lives.

The supervisor never numbers a message itself; it asks its bus. ``LocalBus`` numbers messages in
this process, which is all one node needs. A multi-node bus (Redis, a later issue) implements the
same ``Bus`` protocol: ``publish`` takes the id from the shared store, and messages published by
other nodes arrive through the ``on_remote`` callback given to ``start`` so the supervisor fans
them out exactly like its own.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypedDict


class Msg(TypedDict):
    """MSG of docs/architecture.md, the unit a worker writes to its subscribers."""

    id: int
    channel: str | None
    event: str | None
    data: str
    ts: float


RemoteHandler = Callable[[Msg], Awaitable[None]]

# The init message carries the history to a (re)started worker as one JSON line; keep it well
# below anything a worker would refuse, dropping the oldest messages first.
HISTORY_SNAPSHOT_MAX_BYTES = 16 * 1024 * 1024


class Bus(Protocol):
    """What the supervisor needs from a bus backend."""

    kind: str

    async def start(self, on_remote: RemoteHandler) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, data: str, channel: str | None, event: str | None) -> Msg: ...

    @property
    def last_id(self) -> int: ...

    def history(self) -> list[Msg]: ...

    def status(self) -> dict[str, Any] | None:
        """Extra frame section (``"bus"``) or None when there is nothing to report."""
        ...


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


class LocalBus:
    """Single-node bus: ids from a counter in this process, history kept here."""

    kind = "local"

    def __init__(self, history_size: int, history_max_age: float, first_id: int = 0) -> None:
        self._last_id = first_id
        self._history = History(history_size, history_max_age)

    async def start(self, on_remote: RemoteHandler) -> None:
        # One node: nobody else publishes, so there is nothing to listen to.
        return None

    async def close(self) -> None:
        return None

    async def publish(self, data: str, channel: str | None, event: str | None) -> Msg:
        self._last_id += 1
        msg: Msg = {
            "id": self._last_id,
            "channel": channel,
            "event": event,
            "data": data,
            "ts": time.time(),
        }
        self._history.add(msg)
        return msg

    @property
    def last_id(self) -> int:
        return self._last_id

    def history(self) -> list[Msg]:
        return self._history.snapshot()

    def status(self) -> dict[str, Any] | None:
        return None


def make_bus(url: str, history_size: int, history_max_age: float) -> Bus:
    """The bus a ``--bus`` value names."""
    if url == "local":
        return LocalBus(history_size, history_max_age)
    raise ValueError(f"bus: {url!r} is not available in this build (only 'local')")
