"""Shared helpers for the worker tests: an in-process worker on its own uvloop thread, and
blocking-socket HTTP clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import uvloop

from service.config import Config
from service.worker.process import Worker
from tests.support import net
from tests.support.net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# The worker's --plane for make_config (test_worker_wire.py runs its module once with each).
PLANE = "uvloop"


def make_config(**overrides: Any) -> Config:
    base = Config(
        host="127.0.0.1", port=0, ping_interval=0.2, grace=3.0, timeout_header=2.0, plane=PLANE
    )
    return dataclasses.replace(base, **overrides)


class ThreadWorker:
    """A Worker running on a uvloop loop in a background thread, driven from blocking tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.worker: Worker | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.worker = Worker(self.config, self.loop)
            self.loop.run_until_complete(self.worker.start())
        except BaseException as exc:  # surfaced in start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_until_complete(self.worker.stopped)
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()

    def start(self) -> ThreadWorker:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        assert self.worker is not None
        return self.worker.port

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the worker's loop and return its result."""
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(10)

    def broadcast(self, data: str, channel: str | None = None, event: str | None = None) -> int:
        assert self.worker is not None
        w = self.worker

        async def go() -> int:
            return await w.broadcast({"data": data, "channel": channel, "event": event})

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(30)

    def stats(self) -> dict[str, Any]:
        assert self.worker is not None
        return dict(self.call(self.worker.stats))

    def drain(self, grace: float = 3.0) -> None:
        assert self.worker is not None
        asyncio.run_coroutine_threadsafe(self.worker.drain(grace), self.loop).result(grace + 10)

    def stop(self) -> None:
        if self._thread.is_alive() and self.worker is not None:
            self.drain(1.0)
        self._thread.join(10)


@contextmanager
def running_worker(**overrides: Any) -> Iterator[ThreadWorker]:
    tw = ThreadWorker(make_config(**overrides)).start()
    try:
        yield tw
    finally:
        tw.stop()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


def request(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes; returns everything received."""
    with connect(port, timeout) as s:
        s.sendall(raw)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        out += b
    return bytes(out)


def read_for(s: socket.socket, seconds: float) -> bytes:
    """Everything the socket receives in the next ``seconds``."""
    out = bytearray()
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            b = s.recv(65536)
        except TimeoutError:
            break
        if not b:
            break
        out += b
    s.settimeout(5.0)
    return bytes(out)


def read_until(s: socket.socket, needle: bytes, limit: float = 5.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + limit
    while needle not in out:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not received; got {bytes(out)!r}")
        b = s.recv(65536)
        if not b:
            raise AssertionError(f"closed before {needle!r}; got {bytes(out)!r}")
        out += b
    return bytes(out)


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def dechunk(body: bytes) -> bytes:
    """Decode a (possibly incomplete) chunked body."""
    out = bytearray()
    pos = 0
    while True:
        nl = body.find(b"\r\n", pos)
        if nl < 0:
            break
        size = int(body[pos:nl], 16)
        if size == 0:
            break
        start = nl + 2
        if len(body) < start + size + 2:
            break
        out += body[start : start + size]
        pos = start + size + 2
    return bytes(out)


def split_head(resp: bytes) -> tuple[bytes, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    return head, body


class SubprocessWorker:
    """``python -m service.worker --control-fd N`` in a subprocess, driven over the internal
    supervisor protocol exactly as the supervisor does (socketpair, JSON lines)."""

    def __init__(self, env: dict[str, str] | None = None, **overrides: Any) -> None:
        self.config = make_config(port=free_port(), **overrides)
        self.port = self.config.port
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl = ours
        self._rfile = ours.makefile("rb")
        self._rid = 0
        env = {
            **os.environ,
            "COMET_WORKER_CONFIG": self.config.to_json(),
            "COMET_WORKER_INDEX": "3",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--control-fd", str(theirs.fileno())],
            cwd=ROOT,
            pass_fds=[theirs.fileno()],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        ours.settimeout(30)
        self.ready = self.read_line()

    def read_line(self) -> dict[str, Any]:
        line = self._rfile.readline()
        if not line:
            raise AssertionError("control pipe closed")
        return dict(json.loads(line))

    def send(self, obj: dict[str, Any]) -> int:
        self._rid += 1
        self.ctl.sendall(json.dumps({"rid": self._rid, **obj}).encode() + b"\n")
        return self._rid

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        rid = self.send({"op": op, **kw})
        while True:
            ans = self.read_line()
            if ans.get("rid") == rid:
                return ans

    def close_control(self) -> None:
        # makefile() holds its own reference: the fd closes only when both are closed.
        self._rfile.close()
        self.ctl.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close_control()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def wait_for(pred: Callable[[], Any], limit: float = 5.0) -> None:
    """:func:`tests.support.net.wait_for` at the pace of a worker in this process."""
    net.wait_for(pred, limit, "the condition", every=0.01)


def subscribe(
    w: ThreadWorker, path: str = "/", headers: str = "", ver: str = "1.1"
) -> socket.socket:
    s = connect(w.port)
    s.sendall(f"GET {path} HTTP/{ver}\r\nHost: t\r\n{headers}\r\n".encode())
    return s


def channel_count(w: ThreadWorker, channel: str) -> int:
    assert w.worker is not None
    return int(w.call(w.worker.channels).get(channel, 0))
