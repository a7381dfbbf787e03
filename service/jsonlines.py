"""One JSON-lines peer: both ends of the supervisor ⇄ worker pipe and of a load generator's engine
processes speak through it (docs/architecture.md, "Supervisor ⇄ worker").

Each line is one JSON object. A line with an ``op`` is a request: the handler for that op (the
dispatch table given to the peer) runs as a task, in the order the requests were read, and what
it returns is answered as ``{"rid": R, "ok": true, ...}`` with the request's ``rid`` (a request
without a ``rid`` gets no answer). A line with a ``rid`` and no ``op`` answers a :meth:`Peer.call`.
A handler's ValueError, TypeError or KeyError is the caller's mistake and comes back as
``{"ok": false, "error": "<op>: <message>"}``; any other exception is logged and answered as an
internal error, so the caller never waits for an answer that will not come. When the other side
closes (or sends a line over the reader's limit), every call still waiting fails with
:class:`PeerGone`. Writes of one loop turn leave together (:class:`service.corked.Corked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from service.corked import Corked

log = logging.getLogger("comet.jsonlines")

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None]]
Pending = tuple[int, "asyncio.Future[Message]"]


class PeerGone(Exception):
    """The other side closed the stream (or broke it) before answering."""


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """The object on ``line``; ValueError naming what is wrong."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    return obj


class Peer:
    """One end of a JSON-lines stream: :meth:`call` the other side, serve its requests."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handlers: Mapping[str, Handler] | None = None,
        name: str = "peer",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handlers: Mapping[str, Handler] = handlers or {}
        self.name = name
        self.gone: PeerGone | None = None
        self._out = Corked(writer)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._rids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the reading side ------------------------------------------------------------------
    async def run(self) -> PeerGone:
        """Read and dispatch until the other side is gone; then fail every call still waiting.
        Returns why it ended."""
        try:
            while True:
                try:
                    line = await self.reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self.gone = PeerGone(f"{self.name}: a line over the limit")
                    break
                except ConnectionError as exc:
                    self.gone = PeerGone(f"{self.name}: {exc}")
                    break
                if not line:
                    self.gone = PeerGone(f"{self.name}: closed")
                    break
                self._received(line)
        finally:
            if self.gone is None:
                self.gone = PeerGone(f"{self.name}: stopped reading")
            self.fail_pending(self.gone)
        return self.gone

    def _received(self, line: bytes) -> None:
        try:
            msg = decode(line)
        except ValueError as exc:
            log.error("%s: a bad line (%s): %.200r", self.name, exc, line)
            if self.handlers:
                self.send({"rid": None, "ok": False, "error": f"bad JSON line: {exc}"})
            return
        op = msg.get("op")
        if op is None:
            fut = self._pending.pop(msg.get("rid"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        task = asyncio.get_running_loop().create_task(self._serve(op, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, op: Any, msg: Message) -> None:
        rid = msg.get("rid")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        answer: Message | None
        if handler is None:
            answer = {"ok": False, "error": f"unknown op {op!r}"}
        else:
            try:
                result = await handler(msg)
                answer = None if result is None else {"ok": True, **result}
            except (ValueError, TypeError, KeyError) as exc:
                answer = {"ok": False, "error": f"{op}: {exc}"}
            except Exception as exc:  # the caller must not wait for an answer that never comes
                log.exception("%s: request %r failed", self.name, op)
                answer = {"ok": False, "error": f"{op}: internal error: {exc}"}
        if answer is not None and rid is not None:
            with contextlib.suppress(PeerGone):
                self.send({"rid": rid, **answer})

    def fail_pending(self, exc: PeerGone) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # a caller that timed out already must not leave it unretrieved
        self._pending.clear()

    # ---- the writing side ------------------------------------------------------------------
    def send(self, obj: Mapping[str, Any]) -> None:
        """Write one line (with the other lines of this loop turn). Raises PeerGone."""
        if self.gone is not None or self._out.is_closing():
            raise self.gone or PeerGone(f"{self.name}: closed")
        self._out.write(encode(obj))

    def call_nowait(self, body: Mapping[str, Any]) -> Pending:
        """Send a request now (requests reach the other side in the order sent); what to give
        :meth:`answer`. Raises PeerGone."""
        rid = next(self._rids)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.send({"rid": rid, **body})
        self._pending[rid] = fut
        return rid, fut

    async def answer(self, pending: Pending, timeout: float) -> Message:
        """The answer to a sent request; raises PeerGone or TimeoutError."""
        rid, fut = pending
        try:
            await self.writer.drain()
            async with asyncio.timeout(timeout):
                return await fut
        except ConnectionError as exc:
            raise PeerGone(f"{self.name}: {exc}") from None
        finally:
            self._pending.pop(rid, None)

    async def call(self, body: Mapping[str, Any], timeout: float) -> Message:
        return await self.answer(self.call_nowait(body), timeout)

    async def flush(self) -> None:
        """Everything written so far handed to the kernel."""
        self._out.flush()
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def close(self) -> None:
        self._out.flush()
        self.writer.close()
