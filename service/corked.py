"""Writes of one event-loop turn leave together: one ``write`` (one syscall) instead of one each.

The supervisor⇄worker pipes and the control socket carry a JSON line per broadcast. Publishing
thousands of broadcasts a second, one ``send`` per line was a quarter of the supervisor's CPU. The
first line of a loop turn is written at once (a lone request and its answer wait for nothing);
the lines that follow it in the same turn are joined and written at the start of the next turn
(``call_soon``), so a burst costs two writes, and order is kept.
"""

from __future__ import annotations

import asyncio


class Corked:
    __slots__ = ("writer", "_parts", "_scheduled", "_loop")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._parts: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self._scheduled:
            self._parts.append(data)
            return
        # The first line of a turn leaves at once (a lone request/answer waits for nothing);
        # what follows it in the same turn is held and leaves together at the next.
        if not self.writer.is_closing():
            self.writer.write(data)
        self._scheduled = True
        self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is held now (also called by the loop at the start of the next turn)."""
        self._scheduled = False
        parts = self._parts
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        if not self.writer.is_closing():
            self.writer.write(data)

    def is_closing(self) -> bool:
        return self.writer.is_closing()
