"""The broadcast bus: where message ids come from, where recent history lives, who else is there.

The supervisor never numbers a message itself; it asks its bus. ``LocalBus`` numbers messages in
this process, which is all one node needs. ``RedisBus`` (``--bus redis://...``) lets several nodes
share one id sequence, one history and one cluster view; see its docstring for the Redis layout.

Delivery differs in one respect, told by ``delivers_own``: a local bus leaves delivery of a message
to the caller of ``publish``; a Redis bus delivers *every* message, the node's own included, through
the ``on_remote`` callback, in id order. That is what lets every node's workers see messages in the
same order even when two nodes publish at the same instant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from service.bus.store import Store
from service.contracts import Frame, Msg

__all__ = ["Msg", "Bus", "BusUnavailable", "make_bus"]

RemoteHandler = Callable[[Msg], Awaitable[None]]
SeedHandler = Callable[[], Awaitable[None]]
# Awaited when resume_limits() grew (more ids a resume gets a reset for), before the next message.
LimitsHandler = Callable[[], Awaitable[None]]


class BusUnavailable(Exception):
    """The shared bus cannot take a message now; ``str()`` starts with ``bus unavailable:``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"bus unavailable: {reason}")


class Bus(Protocol):
    """What the supervisor needs from a bus backend."""

    kind: str
    # True: publish() only numbers and stores; the message comes back through on_remote.
    delivers_own: bool

    async def start(
        self,
        on_remote: RemoteHandler,
        on_seeded: SeedHandler | None = None,
        on_limits: LimitsHandler | None = None,
    ) -> None:
        """Begin; ``on_seeded`` is awaited if the history arrives only after start() returned
        (Redis was down then), before any message is delivered, so workers can take it;
        ``on_limits`` when ``resume_limits()`` grew while running (Redis lost its data, or
        messages left the feed unread), before the next message is delivered."""
        ...

    async def close(self) -> None: ...

    async def publish(self, data: str, channel: str | None, event: str | None) -> Msg: ...

    @property
    def last_id(self) -> int: ...

    def history(self) -> list[Msg]: ...

    async def committed(self) -> None:
        """Wait until every message published so far is durable (before its id is answered)."""
        ...

    def resume_limits(self) -> dict[str, Any]:
        """What a worker needs beside the history to answer a resume it cannot honour with a
        reset (docs/architecture.md, init): ``pruned`` and ``hole``, or nothing."""
        ...

    def status(self) -> dict[str, Any] | None:
        """Extra frame section (``"bus"``) or None when there is nothing to report."""
        ...

    def delivered(self, msg: Msg) -> None:
        """The supervisor, holding its broadcast lock, is handing ``msg`` to its workers: from
        now on a (re)starting worker must find it in ``history()`` and ``last_id``."""
        ...

    async def publish_frame(self, frame: Frame) -> None:
        """Show this node's latest frame to the cluster (a no-op for one node)."""
        ...

    async def cluster(self, own: Frame | None) -> dict[str, Any]:
        """The cluster view (``cluster_view``); raises BusUnavailable when it cannot be read."""
        ...


def make_bus(
    url: str,
    history_size: int,
    history_max_age: float,
    node_id: str = "",
    node_ttl: float = 5.0,
    store: Store | None = None,
) -> Bus:
    """The bus a ``--bus`` value names (a local one keeps its history in ``store``)."""
    if url == "local":
        from service.bus.local import LocalBus

        return LocalBus(history_size, history_max_age, store=store)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from service.bus.redis import RedisBus

        return RedisBus(url, history_size, history_max_age, node_id or "node", node_ttl)
    raise ValueError(f"bus: expected 'local' or a redis:// URL, got {url!r}")
