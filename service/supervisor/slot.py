"""One worker slot: an index the supervisor keeps for its whole life, and the process filling it.

The slot spawns ``python -m service.worker --control-fd N`` with one end of a socketpair, gates
its start, does the ``init`` handshake, matches requests to answers over the pipe (JSON lines,
docs/architecture.md "Supervisor ⇄ worker"), reaps the process and restarts it after a backoff
that doubles on quick successive deaths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from service.contracts import EXIT_CANNOT_LISTEN, WorkerStats
from service.jsonlines import Message, Peer, PeerGone, Pending
from service.supervisor.frames import WorkerView

if TYPE_CHECKING:
    from service.supervisor.process import Supervisor

log = logging.getLogger("comet.supervisor")

READY_TIMEOUT = 30.0  # a worker that is not listening by then is killed and replaced
STATS_TIMEOUT = 0.8  # stats answers later than this miss the frame (the worker is busy)
BROADCAST_TIMEOUT = 120.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0

STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's backoff
PIPE_LIMIT = 64 * 1024 * 1024  # longest worker answer line (channels of a busy worker)


# The worker's pipe closed (or broke) before it answered.
WorkerGone = PeerGone


class WorkerSlot:
    """One worker index and the process currently filling it."""

    def __init__(self, sup: Supervisor, index: int) -> None:
        self.sup = sup
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.state = "down"
        self.stats: WorkerStats | None = None  # its latest answer to stats
        self.restarts = 0
        self.exit_code: int | None = None
        self.started_at = 0.0
        self._fails = 0
        self.peer: Peer | None = None  # the pipe to the process now in the slot
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._gated = False

    def view(self) -> WorkerView:
        return WorkerView(self.index, self.pid, self.state, self.stats, self.restarts)

    @property
    def usable(self) -> bool:
        return self.state == "up" and self.peer is not None and not self.peer.writer.is_closing()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker-{self.index}")

    async def _run(self) -> None:
        """Keep a process in this slot until the supervisor drains."""
        delay = 0.0
        while not self.sup.stopping:
            if delay:
                await self.sup.sleep_unless_stopping(delay)
                if self.sup.stopping:
                    break
            lived = await self._one_life()
            if self.sup.stopping:
                break
            if self.exit_code == EXIT_CANNOT_LISTEN:
                # Its port is not ours (see the worker's log line): restarting cannot help.
                self.sup.fail(f"worker {self.index} cannot listen on port {self.sup.config.port}")
                break
            self._fails = 0 if lived >= STABLE_AFTER else self._fails + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, self._fails - 1)))
            self.restarts += 1
            log.warning(
                "worker %d: restarting in %.1f s (restart #%d)", self.index, delay, self.restarts
            )
        self._exited.set()

    async def _one_life(self) -> float:
        """Start one process, serve its pipe until it closes; return how long it lived."""
        # Start-up is CPU-bound (imports); 52 workers booting at once on 2 cores would all be
        # slow and could pass the ready timeout, so only a few start at the same time.
        await self.sup.start_gate.acquire()
        self._gated = True
        try:
            return await self._one_life_started()
        finally:
            self._release_gate()

    def _release_gate(self) -> None:
        if self._gated:
            self._gated = False
            self.sup.start_gate.release()

    async def _one_life_started(self) -> float:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["COMET_WORKER_CONFIG"] = self.sup.worker_config.to_json()
        env["COMET_WORKER_INDEX"] = str(self.index)
        self.state = "starting"
        self.stats = None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.worker", "--control-fd", str(child.fileno())],
                pass_fds=[child.fileno()],
                env=env,
                # Own session: a terminal's Ctrl-C reaches only the supervisor, which then
                # drains the workers in order instead of racing them.
                start_new_session=True,
                # Beside a live screen the workers log to its file, not over it.
                stderr=self.sup.screen.worker_stderr if self.sup.screen is not None else None,
            )
        except OSError as exc:
            log.error("worker %d: cannot start: %s", self.index, exc)
            parent.close()
            child.close()
            self.state = "down"
            return 0.0
        finally:
            child.close()
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.monotonic()
        self._ready = asyncio.get_running_loop().create_future()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=PIPE_LIMIT)
        self.peer = peer = Peer(
            reader, writer, {"ready": self._on_ready}, name=f"worker {self.index} pipe"
        )
        read_task = asyncio.create_task(self._read(peer))
        try:
            await self._handshake()
            await read_task
        except (WorkerGone, TimeoutError, ConnectionError, RuntimeError) as exc:
            if not self.sup.stopping:
                log.error("worker %d (pid %d): %s", self.index, proc.pid, exc or type(exc).__name__)
        except Exception:
            # Whatever went wrong, this slot must go on: log it and replace the process.
            log.exception("worker %d (pid %d): supervisor error", self.index, proc.pid)
        finally:
            read_task.cancel()
            with contextlib.suppress(BaseException):
                await read_task
            writer.close()
            self.peer = None
            self._fail_ready()
            code = self.exit_code = await self._reap(proc)
            lived = time.monotonic() - self.started_at
            if not self.sup.stopping:
                log.warning(
                    "worker %d (pid %d) exited with %s after %.1f s",
                    self.index,
                    proc.pid,
                    _describe_exit(code),
                    lived,
                )
            self.sup.frames.retire(self.stats)
            self.stats = None
            self.state = "down"
            self.pid = None
        return lived

    async def _handshake(self) -> None:
        assert self._ready is not None
        ready = await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        if ready.get("pid") not in (None, self.pid):
            log.info(
                "worker %d reports pid %s (started %s)", self.index, ready.get("pid"), self.pid
            )
        bus = self.sup.bus
        # Under the broadcast lock, a message is either in the history sent now or fanned out to
        # this worker after it is up: never both, never neither.
        async with self.sup.broadcast_lock:
            await self.request(
                {
                    "op": "init",
                    "last_id": bus.last_id,
                    "history": bus.history(),
                    **bus.resume_limits(),
                },
                30.0,
            )
            self.state = "up"
        self._release_gate()
        log.info("worker %d up (pid %d)", self.index, self.pid)

    async def _read(self, peer: Peer) -> None:
        gone = await peer.run()  # every request still waiting has failed with ``gone``
        self._fail_ready()  # and the handshake too
        raise gone

    async def _on_ready(self, msg: Message) -> None:
        """``{"op":"ready"}``, the worker's first line: it is listening."""
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(msg)

    def _fail_ready(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerGone("exited before it was ready"))
            self._ready.exception()

    async def _reap(self, proc: subprocess.Popen[bytes]) -> int | None:
        """The pipe is closed; the process should be gone or going. Make sure it is."""
        deadline = time.monotonic() + (self.sup.config.grace if self.sup.stopping else 2.0)
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            log.warning("worker %d (pid %d) still running; killing it", self.index, proc.pid)
            proc.kill()
            while proc.poll() is None:
                await asyncio.sleep(0.02)
        return proc.returncode

    async def request(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request, wait for its answer; raise WorkerGone / TimeoutError."""
        return await self.reply(self.send(body), timeout)

    def send(self, body: dict[str, Any]) -> Pending:
        """Write one request now (requests reach the worker in the order they are sent); what
        to give :meth:`reply`. Raises WorkerGone."""
        if self.peer is None:
            raise WorkerGone("not running")
        return self.peer.call_nowait(body)

    async def reply(self, pending: Pending, timeout: float) -> dict[str, Any]:
        """The answer to a sent request; raise WorkerGone / TimeoutError / RuntimeError."""
        peer = self.peer
        if peer is not None:
            answer = await peer.answer(pending, timeout)
        else:  # the process is gone: its pipe failed every pending request already
            answer = await asyncio.wait_for(pending[1], timeout)
        if not answer.get("ok", False):
            raise RuntimeError(f"worker {self.index}: {answer.get('error', 'request failed')}")
        return answer

    async def drain(self, grace: float) -> None:
        if self.peer is None or self.peer.writer.is_closing():
            return
        self.state = "draining"
        with contextlib.suppress(WorkerGone, TimeoutError, RuntimeError, ConnectionError):
            await self.request({"op": "drain", "grace": grace}, grace + 1.0)

    async def wait_exited(self) -> None:
        await self._exited.wait()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
