"""Live numbers: the latest frame, a once-a-second SSE stream of frames, the channel map."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..control import FrameWatcher, ServiceUnavailable, WatchState
from ..deps import Authorized, ControlDep, WatcherDep
from ..responses import SERVICE_ERRORS, TOKEN_ERRORS

router = APIRouter(
    prefix="/api",
    tags=["stats"],
    dependencies=[Authorized],
    responses={**TOKEN_ERRORS, **SERVICE_ERRORS},
)

# Comment lines keep idle proxies and the browser's fetch() from timing the stream out while the
# service is down and no frames flow.
KEEPALIVE_S = 15.0
# Browsers (EventSource) wait this long before reconnecting a dropped stream.
RETRY_MS = 2000


@router.get("/stats")
async def stats(control: ControlDep) -> dict[str, Any]:
    """The latest FRAME (docs/architecture.md)."""
    return await control.stats()


@router.get("/channels")
async def channels(control: ControlDep) -> dict[str, Any]:
    """Subscribers per channel, across all workers."""
    return {"channels": await control.channels()}


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    # json.dumps never emits a raw newline, so one data: line is always enough.
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _frames(watcher: FrameWatcher, first: WatchState) -> AsyncIterator[bytes]:
    yield f"retry: {RETRY_MS}\n\n".encode()
    last_frame: dict[str, Any] | None = None
    was_connected = first.connected
    last_error = first.error
    async for state in watcher.updates(KEEPALIVE_S):
        if state is None:
            yield b": keepalive\n\n"
            continue
        if state.connected:
            if not was_connected:
                yield _sse({"control_socket": str(watcher.socket_path)}, "reconnected")
            if state.frame is not None and state.frame is not last_frame:
                last_frame = state.frame
                yield _sse(state.frame)
        elif was_connected or state.error != last_error:
            # Tell the page why frames stopped; the sidecar keeps the stream open and resumes.
            yield _sse(
                {"error": state.error, "control_socket": str(watcher.socket_path)}, "unavailable"
            )
        was_connected, last_error = state.connected, state.error


@router.get("/stats/stream", response_class=StreamingResponse)
async def stats_stream(watcher: WatcherDep) -> StreamingResponse:
    """SSE: one ``data: FRAME`` per second from the shared watch connection; an ``unavailable``
    event when the service goes away and ``reconnected`` when it is back."""
    first = await watcher.ready(timeout=3.0)
    if not first.connected:
        raise ServiceUnavailable(watcher.socket_path, first.error or "no frame yet")
    return StreamingResponse(
        _frames(watcher, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
