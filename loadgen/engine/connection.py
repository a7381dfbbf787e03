"""One streaming connection: a tiny asyncio protocol that de-chunks, splits lines and hands
timed lines to its engine."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from loadgen.engine.engine import Engine


_HEAD = 0  # waiting for the response head
_BODY = 1  # streaming
_DONE = 2  # closed or being closed


class StreamConn(asyncio.Protocol):
    """One streaming subscriber: reads every byte, de-chunks, splits lines."""

    __slots__ = (
        "engine",
        "transport",
        "state",
        "buf",
        "lbuf",
        "chunked",
        "chunk_left",
        "t0",
        "aborted",
        "made",
    )

    def __init__(self, engine: Engine) -> None:
        # Shared engine state
        self.engine = engine
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.buf = b""  # unparsed head or chunk-size line
        self.lbuf = b""  # partial body line
        self.chunked = False
        self.chunk_left = 0  # >0 data bytes left in chunk; <0 CRLF bytes to skip after it
        self.t0 = time.monotonic()
        self.aborted = False  # True when the engine closed it on purpose (not an error)
        self.made = False  # connection_made ran (it then moved the count to ``pending``)

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called when the socket is connected: send the request."""
        # uvloop's transports are not asyncio.Transport subclasses, but have the same interface.
        self.transport = cast(asyncio.Transport, transport)
        # From "connecting" to "pending" in one step, so _fill never counts this one twice
        # (counting it twice made it abort fresh connections as surplus).
        self.made = True
        self.engine.connecting -= 1
        self.engine.pending.add(self)
        self.transport.write(self.engine.request)

    def data_received(self, data: bytes) -> None:
        """Called for every received segment; everything is consumed at once."""
        engine = self.engine
        engine.bytes_total += len(data)
        if engine.nap_ready:
            engine.arm_nap()
        if self.state == _BODY:
            self._body(data)
        elif self.state == _HEAD:
            self._head(data)

    def eof_received(self) -> bool:
        """The server half-closed: let the transport close (counted in connection_lost)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called once when the connection closes, for whatever reason."""
        self.engine.on_lost(self)

    # Parser

    def _head(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self._fail()
            else:
                self.buf = buf
            return
        head = buf[:end]
        self.buf = b""
        status_line, _, headers = head.partition(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or parts[1] != b"200":
            self._fail()
            return
        self.chunked = b"transfer-encoding: chunked" in headers.lower()
        self.state = _BODY
        self.engine.on_established(self)
        rest = buf[end + 4 :]
        if rest:
            self._body(rest)

    def _fail(self) -> None:
        self.engine.errors_resp += 1
        self.engine.back_off()
        self.state = _DONE
        self.aborted = True
        self.engine.pending.discard(self)
        self.engine.conns.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def _body(self, data: bytes) -> None:
        if not self.chunked:
            self._lines(data)
            return
        if not (self.buf or self.chunk_left or self.lbuf):
            # A broadcast's (and a ping's) usual segment: one whole chunk of whole lines. A
            # million subscribers on the service's box read one each; the loop below costs about
            # twice as much Python.
            eol = data.find(b"\r\n", 0, 10)
            if eol > 0:
                start = eol + 2
                try:
                    end = start + int(data[:eol], 16)
                except ValueError:
                    end = start
                if end > start and end + 2 == len(data) and data.endswith(b"\n\r\n"):
                    self.engine.on_lines(data[start : end - 1].split(b"\n"))
                    return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos, size = 0, len(data)
        while pos < size:
            left = self.chunk_left
            if left > 0:
                take = min(left, size - pos)
                self._lines(data[pos : pos + take])
                pos += take
                self.chunk_left = left - take if take < left else -2
            elif left < 0:
                # Skip the CRLF after a chunk's data (it may arrive split).
                skip = min(-left, size - pos)
                pos += skip
                self.chunk_left = left + skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > 1024:
                        self._fail()
                    else:
                        self.buf = data[pos:]
                    return
                try:
                    n = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self._fail()
                    return
                pos = eol + 2
                if n == 0:
                    # Last chunk: the server ended the stream.
                    self.state = _DONE
                    if self.transport is not None:
                        self.transport.close()
                    return
                self.chunk_left = n

    def _lines(self, seg: bytes) -> None:
        if self.lbuf:
            seg = self.lbuf + seg
        if b"\n" not in seg:
            self.lbuf = seg if len(seg) <= 1 << 20 else b""
            return
        lines = seg.split(b"\n")
        self.lbuf = lines.pop()
        self.engine.on_lines(lines)
