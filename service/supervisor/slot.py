"""One worker slot: an index the supervisor keeps for its whole life, and the process filling it.

The slot starts a worker process (``python -m service.worker --control-fd N``, or its equal
forked by a forkserver together with the other slots starting in the same loop turn:
service/supervisor/spawn.py) with one end of a socketpair, gates its start, does the ``init``
handshake, matches requests to answers over the pipe (JSON lines, docs/architecture.md
"Supervisor ⇄ worker"), reaps the process and restarts it after a backoff that doubles on quick
successive deaths.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from service.contracts import EXIT_CANNOT_LISTEN, Msg, WorkerStats
from service.jsonlines import Message, Peer, PeerGone, Pending
from service.supervisor.frames import WorkerView
from service.supervisor.spawn import Process

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

RETIRE_TIMEOUT = 10.0  # a reload's new process draining what it took before a failure
HANDOFF_TIMEOUT = 120.0  # a worker's handoff of its connections (a few seconds at 20,000)
_seq = itertools.count(1)


@dataclass
class WorkerProcess:
    """One worker process of a slot and its pipe."""

    proc: Process
    peer: Peer
    writer: asyncio.StreamWriter
    ready: asyncio.Future[Message]  # its {"op": "ready"}
    reading: asyncio.Task[None]  # the pipe's reader; ends (raising) when the pipe closes
    started_at: float


class WorkerSlot:
    """One worker index and the process currently filling it."""

    def __init__(self, sup: Supervisor, index: int) -> None:
        self.sup = sup
        self.index = index
        self.proc: Process | None = None
        self.pid: int | None = None
        self.state = "down"
        self.stats: WorkerStats | None = None  # its latest answer to stats
        self.restarts = 0
        self.exit_code: int | None = None
        self.started_at = 0.0
        self._fails = 0
        self.peer: Peer | None = None  # the pipe to the process now in the slot
        self._current: WorkerProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._gated = False
        # Held while something must reach this slot's process in order with a handoff: one
        # message being written (and answered, in a fan-out's wave) or the whole handoff of a
        # reload. A reload waits only for the message being written to this slot, and a
        # message reaching a slot in a reload waits for that slot's handoff, not for the others.
        self.lock = asyncio.Lock()
        # The highest message id this slot's process has been given (init or broadcast): where
        # a successor's history must end, so that a message is written to it once, either from
        # that history or as a broadcast after the handoff.
        self.seen_id = 0

    def view(self) -> WorkerView:
        return WorkerView(self.index, self.pid, self.state, self.stats, self.restarts)

    @property
    def usable(self) -> bool:
        return self.state == "up" and self.peer is not None and not self.peer.writer.is_closing()

    def start(self, first: WorkerProcess | None = None) -> None:
        """Keep a process in this slot; ``first``: one already started (a takeover's)."""
        self._task = asyncio.create_task(self._run(first), name=f"worker-{self.index}")

    async def _run(self, first: WorkerProcess | None = None) -> None:
        """Keep a process in this slot until the supervisor drains."""
        delay = 0.0
        while not self.sup.stopping:
            if delay:
                await self.sup.sleep_unless_stopping(delay)
                if self.sup.stopping:
                    break
            lived = await self._one_life(first)
            first = None
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

    async def _one_life(self, first: WorkerProcess | None = None) -> float:
        """Start one process, serve its pipe until it closes; return how long it lived."""
        # Only as many slots start at once as the supervisor's start gate lets (every slot when
        # workers are forked from one import; a few when each imports on its own).
        await self.sup.start_gate.acquire()
        self._gated = True
        try:
            return await self._one_life_started(first)
        finally:
            self._release_gate()

    def _release_gate(self) -> None:
        if self._gated:
            self._gated = False
            self.sup.start_gate.release()

    async def _spawn(
        self, adopt: str | None = None, givers: int = 1, wait: float | None = None
    ) -> WorkerProcess | None:
        """Start ``python -m service.worker`` for this slot and open its pipe; None if it could
        not be started. With ``adopt``, it takes over from the process now in the slot (or from
        ``givers`` workers of a service being taken over)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {
            "COMET_WORKER_CONFIG": self.sup.worker_config.to_json(),
            "COMET_WORKER_INDEX": str(self.index),
        }
        if adopt is not None:
            env["COMET_WORKER_ADOPT"] = adopt
            env["COMET_WORKER_ADOPT_GIVERS"] = str(givers)
            if wait is not None:
                env["COMET_WORKER_ADOPT_WAIT"] = f"{wait:g}"
        try:
            # Started with the other slots asking in this loop turn (service/supervisor/spawn.py).
            proc = await self.sup.spawner.spawn(child.fileno(), env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        if proc is None:
            log.error("worker %d: cannot start", self.index)
            parent.close()
            return None
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Message] = loop.create_future()

        async def on_ready(msg: Message) -> None:
            """``{"op":"ready"}``, the worker's first line: it is listening."""
            if not ready.done():
                ready.set_result(msg)

        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=PIPE_LIMIT)
        peer = Peer(reader, writer, {"ready": on_ready}, name=f"worker {self.index} pipe")

        async def read() -> None:
            gone = await peer.run()  # every request still waiting has failed with ``gone``
            if not ready.done():  # and the handshake too
                ready.set_exception(WorkerGone("exited before it was ready"))
                ready.exception()
            raise gone

        return WorkerProcess(proc, peer, writer, ready, loop.create_task(read()), time.monotonic())

    async def _one_life_started(self, first: WorkerProcess | None = None) -> float:
        self.state = "starting"
        self.stats = None
        p = first if first is not None else await self._spawn()
        if p is None:
            self.state = "down"
            return 0.0
        self._use(p)
        started = p.started_at
        handshake = True
        while True:
            try:
                if handshake:
                    await self._handshake(p, deliver=first is not None)
                await p.reading
            except (WorkerGone, TimeoutError, ConnectionError, RuntimeError) as exc:
                if not self.sup.stopping and self._current is p:
                    why = str(exc) or type(exc).__name__
                    log.error("worker %d (pid %d): %s", self.index, p.proc.pid, why)
            except Exception:
                # Whatever went wrong, this slot must go on: log it and replace the process.
                log.exception("worker %d (pid %d): supervisor error", self.index, p.proc.pid)
            finally:
                p.reading.cancel()
                with contextlib.suppress(BaseException):
                    await p.reading
                p.writer.close()
            successor = self._current
            if successor is not None and successor is not p:
                # A reload handed everything to the successor and told this one to go: the slot
                # lives on in the successor's process.
                code = await self._reap(p.proc)
                log.info(
                    "worker %d: previous process %d exited with %s after the handoff",
                    self.index,
                    p.proc.pid,
                    _describe_exit(code),
                )
                p = successor
                handshake = False
                continue
            break
        self.peer = None
        code = self.exit_code = await self._reap(p.proc)
        lived = time.monotonic() - started
        if not self.sup.stopping:
            log.warning(
                "worker %d (pid %d) exited with %s after %.1f s",
                self.index,
                p.proc.pid,
                _describe_exit(code),
                lived,
            )
        self.sup.frames.retire(self.stats)
        self.stats = None
        self.state = "down"
        self.pid = None
        return lived

    def _use(self, p: WorkerProcess) -> None:
        """From now on requests go to ``p``'s process."""
        self._current = p
        self.proc = p.proc
        self.pid = p.proc.pid
        self.peer = p.peer
        self.started_at = p.started_at

    async def prepare_reload(
        self, run_dir: str, wait: float | None = None
    ) -> tuple[WorkerProcess, str] | dict[str, Any]:
        """Start the process that will take over this slot and wait until it is ready (its
        imports take a while: the supervisor starts every slot's at once). The process and its
        handoff path, or the answer saying why not."""
        if self.state != "up" or self._current is None or self.peer is None:
            return {"index": self.index, "skipped": f"worker is {self.state}"}
        path = os.path.join(run_dir, f"handoff-{self.index}-{os.getpid()}-{next(_seq)}.sock")
        new = await self._spawn(adopt=path, wait=wait)
        if new is None:
            return {"index": self.index, "error": "cannot start a new worker process"}
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                ready = await asyncio.shield(new.ready)
        except Exception as exc:
            await self._discard(new, path)
            return {"index": self.index, "error": f"new process not ready: {exc}"}
        log.info("worker %d: new process %s ready", self.index, ready.get("pid"))
        return new, path

    async def reload(self, new: WorkerProcess, path: str) -> dict[str, Any]:
        """Hand this slot's listener and live connections to ``new`` (service/worker/handoff.py)
        and serve it from then on. If it fails, the old process keeps serving what it still
        holds; the answer says what happened. The caller holds this slot's lock: nothing is
        written to it while the connections move, and the new process's history ends at the last
        message the old one was given (a message numbered meanwhile reaches the new one after)."""
        old = self._current
        if old is None or self.peer is None or self.state != "up":
            await self._discard(new, path)
            return {"index": self.index, "skipped": f"worker is {self.state}"}
        moved = 0  # connections the new process took before the handoff failed
        try:
            bus = self.sup.bus
            init = self._init_request(upto=self.seen_id)
            announced = bus.last_id
            if announced > self.seen_id:  # numbered, waiting for this handoff: announced
                init["upcoming"] = announced
            answer = await new.peer.call(init, 30.0)
            if not answer.get("ok"):
                raise RuntimeError(f"init: {answer.get('error')}")
            t0 = time.monotonic()
            handed = await self.request({"op": "handoff", "to": path}, HANDOFF_TIMEOUT)
            if handed.get("error"):
                moved = int(handed.get("handed", 0))
                raise RuntimeError(handed["error"])
            self._use(new)
            if bus.last_id > announced:
                self.announce(bus.last_id)  # numbered during the handoff: to the new process
            # The old process's counters go into the node's totals now; the new one's stats
            # come with the next frame.
            final = handed.get("stats")
            self.sup.frames.retire(
                cast(WorkerStats, final) if isinstance(final, dict) else self.stats
            )
            self.stats = None
            old.peer.call_nowait({"op": "drain", "grace": 1.0})
            result = {
                "index": self.index,
                "pid": new.proc.pid,
                "previous_pid": old.proc.pid,
                "handed": int(handed.get("handed", 0)),
                "kept": int(handed.get("kept", 0)),
                "seconds": round(time.monotonic() - t0, 3),
            }
            log.info("worker %d reloaded: %s", self.index, result)
            return result
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            if not moved:
                log.error(
                    "worker %d: reload failed, the old process serves on: %s", self.index, error
                )
                await self._discard(new, path)
                return {"index": self.index, "error": error}
            # The new process holds live connections it took before the handoff stopped (its
            # open-files limit, a successor of older code that cannot take TLS ones, a stall):
            # killing it would close them without a word. The old process serves on with the
            # rest; the new one sends its connections the reconnect hint (streams resume from
            # their last id through the old one), closes them and exits.
            log.error(
                "worker %d: reload failed after %d connections moved; the old process serves on "
                "and %s: %s",
                self.index,
                moved,
                "the new one tells those to reconnect"
                if new.proc.poll() is None
                else "the new one is gone, and those with it (their clients reconnect)",
                error,
            )
            await self._retire(new, path)
            return {"index": self.index, "error": error, "reconnecting": moved}

    async def _retire(self, new: WorkerProcess, path: str) -> None:
        """A new process that took connections but will not serve this slot: drained (each gets
        the reconnect hint, as in a stop), then reaped; killed if it has not exited by then. A
        second or two with the slot's lock held: a failed reload's answer comes once it is gone."""
        try:
            new.peer.call_nowait({"op": "drain", "grace": 1.0})
            async with asyncio.timeout(RETIRE_TIMEOUT):
                await asyncio.shield(new.reading)
        except PeerGone:
            pass  # it drained and exited: its pipe closed
        except Exception as exc:  # still running at the timeout (killed below), or its pipe broke
            log.warning("worker %d: the new process did not drain by itself: %r", self.index, exc)
        finally:
            await self._discard(new, path)

    async def start_for_takeover(
        self, path: str | None, givers: int, wait: float | None = None
    ) -> WorkerProcess | None:
        """A process for this slot that adopts from ``givers`` workers of the service being
        taken over (at ``path``, waiting up to ``wait`` s for them), or listens by itself when
        none gives to it; ready or None."""
        p = await self._spawn(path, givers, wait) if path else await self._spawn()
        if p is None:
            return None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.shield(p.ready)
        except Exception as exc:
            log.error("worker %d: new process not ready: %s", self.index, exc)
            await self.discard(p, path)
            return None
        return p

    async def give_away(self, path: str, listener: bool) -> dict[str, Any]:
        """Hand this slot's listener (or close it), history and connections to a worker of the
        service taking this one over; the worker keeps what it could not hand."""
        if self.state != "up" or self.peer is None:
            return {"index": self.index, "skipped": f"worker is {self.state}"}
        t0 = time.monotonic()
        try:
            handed = await self.request(
                {"op": "handoff", "to": path, "listener": listener, "history": True},
                HANDOFF_TIMEOUT,
            )
        except Exception as exc:
            return {"index": self.index, "error": str(exc) or type(exc).__name__}
        result: dict[str, Any] = {
            "index": self.index,
            "pid": self.pid,
            "handed": int(handed.get("handed", 0)),
            "kept": int(handed.get("kept", 0)),
            "seconds": round(time.monotonic() - t0, 3),
        }
        if handed.get("error"):
            result["error"] = str(handed["error"])
        return result

    async def discard(self, new: WorkerProcess, path: str | None) -> None:
        await self._discard(new, path)

    async def _discard(self, new: WorkerProcess, path: str | None) -> None:
        """A new process that will not take over: stopped, its pipe and socket gone."""
        new.proc.kill()
        new.reading.cancel()
        with contextlib.suppress(BaseException):
            await new.reading
        new.writer.close()
        await self._reap(new.proc)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _init_request(self, deliver: bool = False, upto: int | None = None) -> dict[str, Any]:
        """``init``: the bus's last id and history, for a process about to serve this slot.
        ``deliver``: the process holds live connections already (a takeover's), so what it has
        not seen of the history is written to them too, not only kept. ``upto``: the history
        ends at that id (a reload's successor: what the slot's process was given so far)."""
        bus = self.sup.bus
        history = bus.history()
        last_id = bus.last_id
        if upto is not None and upto < last_id:
            history = [m for m in history if m["id"] <= upto]
            last_id = upto
        return {
            "op": "init",
            "last_id": last_id,
            "history": history,
            **bus.resume_limits(),
            **({"deliver": True} if deliver else {}),
        }

    async def _handshake(self, p: WorkerProcess, deliver: bool = False) -> None:
        async with asyncio.timeout(READY_TIMEOUT):
            ready = await asyncio.shield(p.ready)
        if ready.get("pid") not in (None, self.pid):
            log.info(
                "worker %d reports pid %s (started %s)", self.index, ready.get("pid"), self.pid
            )
        # Under the broadcast lock, a message is either in the history sent now or fanned out to
        # this worker after it is up: never both, never neither. A takeover's worker took its
        # connections before this supervisor's control socket opened: a message published since
        # reaches them only through this init, so it is delivered, not only kept.
        async with self.sup.broadcast_lock:
            init = self._init_request(deliver)
            await self.request(init, 30.0)
            self.seen_id = init["last_id"]
            self.state = "up"
        self._release_gate()
        log.info("worker %d up (pid %d)", self.index, self.pid)
        if self.sup.stopping:
            # Told to stop while this process was starting (SIGTERM right after the start):
            # the supervisor's drain found no process here to ask, and this one would otherwise
            # run until the grace is over and be killed.
            await self.drain(max(0.5, self.sup.config.grace - 1.5))

    async def _reap(self, proc: Process) -> int | None:
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

    def send_message(self, msg: Msg) -> Pending:
        """Write a numbered message (``broadcast``) now; the caller holds :attr:`lock`."""
        pending = self.send({"op": "broadcast", "msg": msg})
        self.seen_id = max(self.seen_id, int(msg["id"]))
        return pending

    def announce(self, msg_id: int) -> None:
        """While the slot's lock keeps ``msg_id`` from being written to it (a reload), tell the
        process now in the slot that it is numbered and on its way (``quiet``: a long-poll from
        it waits for it instead of getting a reset). No answer is asked for (no ``rid``)."""
        if self.lock.locked() and self.peer is not None:
            with contextlib.suppress(WorkerGone):
                self.peer.send({"op": "quiet", "upcoming": msg_id})

    async def request_in_order(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A request that must not overtake or be overtaken by a handoff (``init``, ``limits``)."""
        async with self.lock:
            return await self.request(body, timeout)

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
            async with asyncio.timeout(timeout):
                answer = await pending[1]
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
