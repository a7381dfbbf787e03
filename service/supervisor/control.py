"""The control socket of docs/architecture.md: JSON lines over a Unix socket for the sidecar.

Each request line gets exactly one answer line, in order. A bad line (not JSON, unknown op,
missing field, over 1 MiB) is answered with ``{"ok": false, "error": ...}`` and the connection
stays usable: an oversized line is skipped up to its newline rather than cutting the stream.
A ``watch`` makes the connection also receive every new frame until it closes.

Requests pipeline: a client may send the next line before the answer to the previous one. Each
request is started as soon as its line is read (up to ``LIMIT_IN_FLIGHT`` per connection; past
that the connection is not read until the oldest answers), and the answers are written in request
order. One publisher with a window of broadcasts in flight thus gets what many connections would,
and the supervisor numbers, stores and hands out every line read in one loop turn together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from service.bus import BusUnavailable
from service.contracts import NAME_RE, NAME_RULE, ErrorCode, Frame, text_problem
from service.corked import Corked

log = logging.getLogger("comet.control")

LIMIT_LINE = 1024 * 1024
# A watcher that stops reading is dropped once this much is queued for it.
LIMIT_WATCH_BUFFER = 4 * 1024 * 1024
# Requests of one connection being answered at once (the pipelining window).
LIMIT_IN_FLIGHT = 256
# Seconds close() lets requests under way finish and answer before it cuts connections.
LIMIT_CLOSE_WAIT = 2.0

Answer = dict[str, Any] | None


class RequestError(Exception):
    """A request the server refuses; the message and its ``code`` go back to the client."""

    def __init__(self, message: str, code: str = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def refused(message: str, code: str = ErrorCode.BAD_REQUEST) -> dict[str, Any]:
    """The answer to a refused request (docs/architecture.md, control socket)."""
    return {"ok": False, "code": code, "error": message}


def _refused_by(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, RequestError):
        return refused(str(exc), exc.code)
    if isinstance(exc, BusUnavailable):
        return refused(str(exc), ErrorCode.BUS_UNAVAILABLE)
    log.error("control request failed", exc_info=exc)  # never a traceback to the client
    return refused(f"internal error: {type(exc).__name__}", ErrorCode.INTERNAL)


class Backend(Protocol):
    """What the control socket asks of the supervisor."""

    def latest_frame(self) -> Frame | None: ...

    async def broadcast(
        self, data: str, channel: str | None, event: str | None
    ) -> dict[str, Any]: ...

    async def channels(self) -> dict[str, int]: ...

    async def cluster(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def handover(self, to: list[str], listeners: int) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    def __init__(self, path: str, backend: Backend, limit_message_bytes: int) -> None:
        self.path = path
        self.backend = backend
        self.limit_message_bytes = limit_message_bytes
        self._server: asyncio.AbstractServer | None = None
        self._watchers: set[asyncio.StreamWriter] = set()
        self._conns: set[asyncio.Task[None]] = set()
        self._answering: set[_InOrder] = set()
        self._closing = False
        self._inode: int | None = None  # the socket file this server bound (close removes only it)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self, replace: bool = False) -> None:
        """Bind the socket; ``replace``: take the path over from a live supervisor (a takeover:
        it keeps its connections, new ones come here)."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        if replace:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Create the file 0660 from the start instead of chmod-ing a briefly wider socket.
        old = os.umask(0o117)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=LIMIT_LINE + 64 * 1024
        )
        log.info("control socket %s (mode 0660)", self.path)

    def _remove_stale(self) -> None:
        """Replace a socket left by a dead supervisor; refuse to steal a live one."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"control socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.warning("removing stale control socket %s", self.path)
            os.unlink(self.path)
            return
        except OSError as exc:
            log.warning("removing unusable control socket %s (%s)", self.path, exc)
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise RuntimeError(f"another supervisor is serving {self.path}")

    async def close(self) -> None:
        """Stop: refuse new requests, let those under way answer (bounded), then close."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for w in list(self._watchers):
            w.close()
        # A broadcast already numbered and stored must get its answer, or its publisher would
        # think it lost and send it again under a new id.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LIMIT_CLOSE_WAIT
        while any(a.busy for a in self._answering) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task
        # Only our own file: after a takeover the path is the new supervisor's.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    # ---- frames ---------------------------------------------------------------------------------
    def publish_frame(self, frame: Frame) -> None:
        """Send one frame to every watcher (serialised once)."""
        if not self._watchers:
            return
        line = _dump({"ok": True, "frame": frame})
        for w in list(self._watchers):
            if w.is_closing():
                self._watchers.discard(w)
                continue
            if w.transport.get_write_buffer_size() > LIMIT_WATCH_BUFFER:
                log.warning("dropping a control watcher that stopped reading")
                self._watchers.discard(w)
                w.close()
                continue
            w.write(line)

    # ---- connections ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve_lines(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close() cancels the connections it shuts down. Ending the task normally matters:
            # on 3.11, asyncio's stream callback calls exception() on a cancelled handler task
            # and logs a CancelledError traceback at every Ctrl-C.
            pass
        finally:
            self._conns.discard(task)
            self._watchers.discard(writer)
            writer.close()

    async def _serve_lines(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        answers = _InOrder(writer)
        self._answering.add(answers)
        buf = bytearray()
        skipping = False  # inside an oversized line, dropping bytes until its newline
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    # The client is gone; what it asked for still happens (a broadcast it
                    # sent is published), nobody reads the answers.
                    await answers.wait_all()
                    return
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > LIMIT_LINE:
                            # Answer now (the client may be waiting), then drop the rest of the
                            # line up to its newline without answering it a second time.
                            if not skipping:
                                skipping = True
                                answers.put(refused("request line over 1 MiB"))
                            buf.clear()
                        break
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if skipping:
                        skipping = False
                        continue
                    if len(line) > LIMIT_LINE:
                        answers.put(refused("request line over 1 MiB"))
                        continue
                    if not line.strip():
                        continue
                    started = self._start(line, writer)
                    if not isinstance(started, Coroutine):
                        answers.put(started)
                    elif answers.in_flight == 0 and b"\n" not in buf:
                        # Nothing else asked or waiting: answer inline, without a task (and the
                        # loop turn a new task waits for before its first step).
                        answers.inline = True
                        try:
                            answer = await started
                        finally:
                            answers.inline = False
                        answers.put(answer)
                    else:
                        answers.put_task(asyncio.ensure_future(started))
                    if answers.in_flight >= LIMIT_IN_FLIGHT:
                        await answers.wait_oldest()
                # What was answered at once leaves now, before any later frame of a watch.
                answers.flush()
                await writer.drain()
        finally:
            self._answering.discard(answers)
            answers.flush()  # answers held for the next turn leave before the close
            answers.cancel()

    def _start(
        self, line: bytes, writer: asyncio.StreamWriter
    ) -> Answer | Coroutine[Any, Any, Answer]:
        """Answer a request that needs no waiting at once; the others as a coroutine to run."""
        try:
            if self._closing:
                raise RequestError(
                    "the service is stopping; send it again to the new one", ErrorCode.STOPPING
                )
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise RequestError("request is not valid JSON") from None
            if not isinstance(req, dict):
                raise RequestError("request must be a JSON object")
            op = req.get("op")
            if op is None:
                raise RequestError("missing field 'op'")
            if op == "stats":
                frame = self.backend.latest_frame()
                if frame is None:
                    raise RequestError("no frame yet, try again in a second", ErrorCode.NOT_READY)
                return {"ok": True, "frame": frame}
            if op == "watch":
                self._watchers.add(writer)
                frame = self.backend.latest_frame()
                # Every watch line carries a frame: before the first tick, the first frame
                # published is the answer.
                return None if frame is None else {"ok": True, "frame": frame}
            if op == "health":
                return {"ok": True, **self.backend.health()}
            if op == "broadcast":
                data, channel, event = self._broadcast_args(req)
                return self._waited(self.backend.broadcast(data, channel, event), None)
            if op == "channels":
                return self._waited(self.backend.channels(), "channels")
            if op == "cluster":
                return self._waited(self.backend.cluster(), "cluster")
            if op == "reload":
                return self._waited(self.backend.reload(), None)
            if op == "handover":
                to = req.get("to")
                listeners = req.get("listeners")
                if (
                    not isinstance(to, list)
                    or not to
                    or not all(isinstance(p, str) and p for p in to)
                ):
                    raise RequestError("handover needs 'to': a list of handoff socket paths")
                if not isinstance(listeners, int) or isinstance(listeners, bool) or listeners < 1:
                    raise RequestError("handover needs 'listeners': a positive integer")
                return self._waited(self.backend.handover(to, listeners), None)
            raise RequestError(
                f"unknown op {op!r}; expected stats, watch, broadcast, channels, health, "
                "cluster, reload, handover"
            )
        except Exception as exc:
            return _refused_by(exc)

    @staticmethod
    async def _waited(work: Awaitable[Any], key: str | None) -> Answer:
        """The answer of a request that waits on the supervisor (``key``: where its result goes;
        None: the result is the answer's fields)."""
        try:
            result = await work
        except Exception as exc:
            return _refused_by(exc)
        return {"ok": True, **result} if key is None else {"ok": True, key: result}

    def _broadcast_args(self, req: dict[str, Any]) -> tuple[str, str | None, str | None]:
        if "data" not in req:
            raise RequestError("missing field 'data'")
        data = req["data"]
        if not isinstance(data, str):
            raise RequestError("field 'data' must be a string")
        problem = text_problem(data)
        if problem is not None:
            raise RequestError(f"field 'data': {problem}")
        if len(data.encode()) > self.limit_message_bytes:
            raise RequestError(f"field 'data' is over {self.limit_message_bytes} bytes")
        channel = req.get("channel")
        if channel is not None and (not isinstance(channel, str) or not NAME_RE.fullmatch(channel)):
            raise RequestError(f"field 'channel' must be null or match {NAME_RULE}")
        event = req.get("event")
        if event is not None and (not isinstance(event, str) or not NAME_RE.fullmatch(event)):
            raise RequestError(f"field 'event' must be null or match {NAME_RULE}")
        return data, channel, event


class _InOrder:
    """The answers of one connection, written in request order as each becomes ready."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._out = Corked(writer)  # answers of one loop turn leave in one write
        self._queue: deque[asyncio.Future[Answer] | Answer] = deque()
        self.in_flight = 0
        self.inline = False  # a request is being answered in the connection's own task

    @property
    def busy(self) -> bool:
        return self.inline or self.in_flight > 0

    def put(self, answer: Answer) -> None:
        self._queue.append(answer)
        self._flush()

    def put_task(self, task: asyncio.Future[Answer]) -> None:
        self.in_flight += 1
        self._queue.append(task)
        task.add_done_callback(self._done)

    def _done(self, _task: asyncio.Future[Answer]) -> None:
        self.in_flight -= 1
        self._flush()

    def _flush(self) -> None:
        q = self._queue
        while q:
            head = q[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    return
                answer = None if head.cancelled() else head.result()
            else:
                answer = head
            q.popleft()
            if answer is not None and not self.writer.is_closing():
                self._out.write(_dump(answer))

    def flush(self) -> None:
        self._out.flush()

    async def wait_oldest(self) -> None:
        for item in self._queue:
            if isinstance(item, asyncio.Future) and not item.done():
                await asyncio.wait([item])
                return

    async def wait_all(self) -> None:
        pending = [f for f in self._queue if isinstance(f, asyncio.Future) and not f.done()]
        if pending:
            await asyncio.wait(pending)

    def cancel(self) -> None:
        """The connection is closing (the supervisor stops): stop what it still waits for."""
        for item in self._queue:
            if isinstance(item, asyncio.Future):
                item.cancel()
