"""Starting worker processes: one import per batch, not one per worker.

Every worker used to be ``python -m service.worker --control-fd N``, a fresh interpreter that
imports the worker (~0.2 s of CPU). Slots that ask for a process in the same loop turn (the
first start's, a reload's six, a takeover's fifty-four, a crash's restarts) are started together by
one ``python -m service.worker.forkserver`` (service/worker/forkserver.py): it imports the code
on disk once, forks one child per slot and exits, and the children are re-parented to this
process, which made itself a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) for that, so
it waits for them and reads their exit codes as it does for processes it started itself.
Measured on the 2-core AMD EPYC box (docs/benchmarks.md, issue 14's section): 54 workers up
5.5 → 0.8 s; a reload's 54 new processes ready 7.0 → 0.5 s, its six at 100,000 held 0.9–1.4 →
0.4 s.

Where the kernel has no child subreapers (not Linux), each worker is started on its own as
before. A forkserver that fails (the code on disk does not import, say) fails the slots it had
not forked for, which the callers already handle as a process that could not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger("comet.supervisor")

PR_SET_CHILD_SUBREAPER = 36
FORKSERVER_TIMEOUT = 60.0  # imports and forks of a batch; a hung one is killed


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ≥ 3.4); False if not."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Forked:
    """A worker forked by a forkserver and re-parented to this process: the part of
    ``subprocess.Popen`` the supervisor uses (``pid``, ``poll``, ``returncode``, ``kill``,
    ``send_signal``, ``wait``). Its pid stays this process's child, so it is not reused before
    ``poll`` has reaped it: signalling it until then cannot reach another process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        code = self._reap(0)
        assert code is not None  # waitpid without WNOHANG returns once it has exited
        return code

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = -int(signal.SIGKILL)
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = subprocess.Popen[bytes] | Forked


@dataclass
class _Ask:
    control_fd: int
    env: dict[str, str]
    done: asyncio.Future[Process | None]


class Spawner:
    """Starts the workers asked for in one loop turn together (see the module's text)."""

    def __init__(
        self, stderr: Callable[[], IO[Any] | None] = lambda: None, batched: bool | None = None
    ) -> None:
        self.stderr = stderr  # where the workers' stderr goes now (a live screen's log file)
        self.batched = batched  # None: decided by the first spawn (a subreaper, or not)
        self.command = [sys.executable, "-m", "service.worker.forkserver"]
        self._asks: list[_Ask] = []
        self._batches: set[asyncio.Task[None]] = set()

    def forking(self) -> bool:
        """Whether workers are forked in batches (decided once: this process a subreaper)."""
        if self.batched is None:
            self.batched = become_subreaper()
        return self.batched

    async def spawn(self, control_fd: int, env: dict[str, str]) -> Process | None:
        """A worker process with ``control_fd`` and ``env`` over this process's environment;
        None if it could not start. The caller closes its ``control_fd`` when this returns (or
        is cancelled): a batch works on a duplicate of its own, so the number cannot be
        closed and reused under it before its forkserver has the descriptor."""
        if not self.forking():
            return self._popen(control_fd, env)
        loop = asyncio.get_running_loop()
        ask = _Ask(os.dup(control_fd), env, loop.create_future())
        if not self._asks:
            loop.call_soon(self._start_batch)  # after every slot of this turn has asked
        self._asks.append(ask)
        try:
            return await asyncio.shield(ask.done)
        except asyncio.CancelledError:
            # Nobody will serve or reap what the batch starts for this ask: stop it and reap it.
            ask.done.add_done_callback(_abandon)
            raise

    def _popen(self, control_fd: int, env: dict[str, str]) -> Process | None:
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "service.worker", "--control-fd", str(control_fd)],
                pass_fds=[control_fd],
                env={**os.environ, **env},
                # Own session: a terminal's Ctrl-C reaches only the supervisor, which then
                # drains the workers in order instead of racing them. (And a share of a busy CPU
                # per worker under autogroup scheduling: docs/architecture.md, "Worker
                # processes".)
                start_new_session=True,
                # Beside a live screen the workers log to its file, not over it.
                stderr=self.stderr(),
            )
        except OSError as exc:
            log.error("cannot start a worker: %s", exc)
            return None

    def _start_batch(self) -> None:
        asks, self._asks = self._asks, []
        task = asyncio.get_running_loop().create_task(self._batch(asks))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _batch(self, asks: list[_Ask]) -> None:
        pids: dict[int, int] = {}
        try:
            pids = await asyncio.get_running_loop().run_in_executor(None, self._fork, asks)
        except Exception as exc:
            log.error("cannot start %d worker(s): %s", len(asks), exc)
        for i, ask in enumerate(asks):
            if not ask.done.done():
                ask.done.set_result(Forked(pids[i]) if i in pids else None)

    def _fork(self, asks: list[_Ask]) -> dict[int, int]:
        """In a thread: run one forkserver for ``asks``; {place in asks: pid} of what it forked
        (its children are this process's once it has exited, which this waits for)."""
        report_r, report_w = os.pipe()
        batch = {"workers": [{"control_fd": a.control_fd, "env": a.env} for a in asks]}
        try:
            proc = subprocess.Popen(
                [*self.command, "--report-fd", str(report_w)],
                stdin=subprocess.PIPE,
                pass_fds=[report_w, *(a.control_fd for a in asks)],
                start_new_session=True,  # a terminal's Ctrl-C is the supervisor's to handle
                stderr=self.stderr(),
            )
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
            for a in asks:  # the duplicates: the forkserver has its own now (or failed)
                os.close(a.control_fd)
        pids: dict[int, int] = {}
        try:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it failed at once: its code says why
                proc.stdin.write(json.dumps(batch).encode())
                proc.stdin.close()
            deadline = time.monotonic() + FORKSERVER_TIMEOUT
            data = b""
            while True:  # until EOF: it and every child have closed their end
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([report_r], [], [], left)[0]:
                    raise TimeoutError(f"the forkserver took over {FORKSERVER_TIMEOUT:g} s")
                chunk = os.read(report_r, 4096)
                if not chunk:
                    break
                *lines, data = (data + chunk).split(b"\n")
                for line in lines:  # as they come: a forkserver killed later left these to us
                    i, pid = (int(x) for x in line.split())
                    pids[i] = pid
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except BaseException:
            proc.kill()
            proc.wait()
            for pid in pids.values():  # ours now that it is gone; nobody else will reap them
                child = Forked(pid)
                child.kill()
                child.wait()
            raise
        finally:
            os.close(report_r)
        if code != 0 or len(pids) != len(asks):
            log.error(
                "the forkserver exited with %s after forking %d of %d worker(s)",
                code,
                len(pids),
                len(asks),
            )
        return pids


def _abandon(done: asyncio.Future[Process | None]) -> None:
    """A process started for a caller that is gone: killed, and reaped in a thread."""
    if done.cancelled() or done.exception() is not None:
        return
    proc = done.result()
    if proc is not None:
        proc.kill()
        asyncio.get_running_loop().run_in_executor(None, proc.wait)
