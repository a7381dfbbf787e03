"""uvicorn as the sidecar runs it: h11 with a cap on a request head's bytes and a deadline for it,
and a shutdown that ends the open SSE streams first.

uvicorn has neither a header deadline nor (with httptools) a header size cap: a 10 MB header was
read whole, and a client dripping header bytes held its connection open forever. h11 caps the
bytes it buffers while waiting for a head (``h11_max_incomplete_event_size``); this protocol
answers that with 431 instead of h11's generic 400, and a head that is not complete
``timeout_header`` seconds after its first byte (or after the connection opened) with 408.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .control import FrameWatcher

LIMIT_HEAD_BYTES = 16 * 1024
TIMEOUT_HEADER = 10.0
# Seconds a refused connection is read (and the bytes dropped) before it is closed.
LINGER = 2.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a 431 for an oversized head."""

    timeout_header = TIMEOUT_HEADER
    limit_head_bytes = LIMIT_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per-connection state
        self.timeout_header_task: asyncio.TimerHandle | None = None
        self.discarding = False  # answered and closing: the rest of the request is dropped

    # Protocol interface
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Called when a client connects: its first request head is due within the deadline."""
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Called when the connection closes."""
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Called with request bytes; a head still being read is held to its size cap."""
        if self.discarding:
            return
        if self.conn.their_state is h11.IDLE:
            buffered = len(self.conn.trailing_data[0]) + len(data)
            if buffered > self.limit_head_bytes and self._head_bytes(data) > self.limit_head_bytes:
                self._refuse(431, "Request Header Fields Too Large", "request head too large")
                return
            if self.timeout_header_task is None:
                self._arm_header_deadline()  # the next request on a keep-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_deadline()  # the head is in

    def _head_bytes(self, data: bytes) -> int:
        """Bytes of the head being read (buffered + ``data``, up to its blank line if there)."""
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n")
        return len(buffered) if end < 0 else end

    # Header deadline
    def _arm_header_deadline(self) -> None:
        self.timeout_header_task = self.loop.call_later(
            self.timeout_header, self._on_header_deadline
        )

    def _cancel_header_deadline(self) -> None:
        if self.timeout_header_task is not None:
            self.timeout_header_task.cancel()
            self.timeout_header_task = None

    def _on_header_deadline(self) -> None:
        self.timeout_header_task = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self._refuse(408, "Request Timeout", "request head not received in time")
        else:
            self.transport.close()  # an idle connection that never spoke: close quietly

    def _refuse(self, status: int, phrase: str, message: str) -> None:
        """Answer a head we will not read further (h11 cannot: no request yet), then close.

        A close with the client's bytes still unread sends a reset that can destroy the answer
        in flight, so the answer is followed by a FIN and the rest is read and dropped for a
        moment before the close (nginx's lingering close)."""
        self._cancel_header_deadline()
        self.discarding = True
        body = f'{{"detail":"{message}"}}'.encode()
        self.transport.write(
            f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)


class AdminServer(uvicorn.Server):
    """uvicorn that ends the open SSE streams first when it shuts down, so that a restart of the
    sidecar takes milliseconds instead of the whole graceful-shutdown timeout."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.admin_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        watcher = getattr(self.admin_app.state, "watcher", None)
        if isinstance(watcher, FrameWatcher):
            watcher.close_viewers()
        await super().shutdown(sockets)


def server_config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    """The uvicorn configuration of the sidecar (also used by the tests)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=2,
        http=GuardedH11Protocol,
        h11_max_incomplete_event_size=LIMIT_HEAD_BYTES,
    )
