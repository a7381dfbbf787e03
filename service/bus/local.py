"""One node's bus: ids from a counter in this process, history here and in the SQLite store."""

from __future__ import annotations

import time
from typing import Any

from service.bus import LimitsHandler, RemoteHandler, SeedHandler
from service.bus.cluster import cluster_view, node_summary
from service.bus.history import History
from service.bus.store import Store
from service.contracts import Frame, Msg


class LocalBus:
    """Single-node bus: ids from a counter in this process, history kept here."""

    kind = "local"
    delivers_own = False

    def __init__(
        self,
        history_size: int,
        history_max_age: float,
        first_id: int = 0,
        store: Store | None = None,
    ) -> None:
        self._last_id = first_id
        self._history = History(history_size, history_max_age)
        self.store = store
        self._limits: dict[str, Any] = {}
        if store is not None:
            loaded = store.open()
            self._last_id = max(first_id, loaded.last_id)
            for msg in loaded.history:
                self._history.add(msg)
            self._limits = {"pruned": loaded.pruned, "hole": loaded.hole}

    async def start(
        self,
        on_remote: RemoteHandler,
        on_seeded: SeedHandler | None = None,
        on_limits: LimitsHandler | None = None,
    ) -> None:
        # One node: nobody else publishes, so there is nothing to listen to.
        return None

    async def close(self) -> None:
        if self.store is not None:
            self.store.close()

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
        if self.store is not None:
            self.store.append(msg)  # committed before the id is answered
        return msg

    def resume_limits(self) -> dict[str, Any]:
        return self._limits

    async def committed(self) -> None:
        if self.store is not None:
            await self.store.committed()

    @property
    def last_id(self) -> int:
        return self._last_id

    def history(self) -> list[Msg]:
        return self._history.snapshot()

    def status(self) -> dict[str, Any] | None:
        return None

    def delivered(self, msg: Msg) -> None:
        # publish() recorded it already, under the same lock.
        return None

    async def publish_frame(self, frame: Frame) -> None:
        return None

    async def cluster(self, own: Frame | None) -> dict[str, Any]:
        return cluster_view([node_summary(own)] if own else [], time.time(), "local")
