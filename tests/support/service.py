"""The real service (``python -m service``) and client processes, for every test suite.

``Service`` runs the supervisor on a free loopback port with its control socket and logs in a
test folder, in a process group of its own: ``stop()`` (or leaving the ``with``) SIGTERMs it,
waits, and SIGKILLs whatever of the group is left, so no worker outlives its test. ``Clients``
runs benchmarks/comet_clients.py processes (one process holds < 20,000 sockets) connecting from
127.0.0.x source addresses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil

from tests.support.control import Control
from tests.support.net import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "benchmarks" / "comet_clients.py"


def kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM the process group ``proc`` leads, wait up to ``grace`` s for ``proc``, then SIGKILL
    the group (workers a killed supervisor left behind included). ``proc``'s exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[Any], *, group: bool = False) -> Iterator[subprocess.Popen[Any]]:
    """``proc`` for the block; on leaving it, SIGKILL it (its whole process group with ``group``)
    if it still runs, wait for it and close its pipes, so no test leaves a process or a pipe
    behind whatever it asserted."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


class Service:
    """``python -m service`` on ``port`` (a free one by default), started at construction.

    ``args`` are more service flags (a later flag wins, so ``--host`` may be overridden);
    ``nofile`` sets the supervisor's RLIMIT_NOFILE; ``env`` adds environment variables; ``code``
    runs the ``service`` package found in that folder instead of the repository's.
    """

    def __init__(
        self,
        tmp: Path,
        *args: str,
        port: int | None = None,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
        code: Path | None = None,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.port = port if port is not None else free_port()
        self.control_path = str(tmp / "run" / "control.sock")
        self.log_dir = tmp / "logs"
        self.log_path = tmp / "service.log"
        cmd = [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--control-socket",
            self.control_path,
            "--log-dir",
            str(self.log_dir),
            "--screen",
            "off",
            *args,
        ]

        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self._log: IO[bytes] | None = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_from = self._log.tell()  # a service restarted in the same folder appends
        where = str(code or ROOT)  # `python -m` looks in the working folder first
        self.proc = subprocess.Popen(
            cmd,
            cwd=where,
            env={**os.environ, "PYTHONPATH": where, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
            start_new_session=True,
        )
        self.pids_seen: set[int] = set()

    def log(self) -> str:
        """What this service (not an earlier one in the same folder) wrote."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace")

    def control(self) -> Control:
        return Control(self.control_path)

    def ask(self, req: dict[str, Any] | bytes) -> dict[str, Any]:
        with self.control() as c:
            return c.ask(req)

    def health(self) -> dict[str, Any] | None:
        try:
            h = self.ask({"op": "health"})
        except OSError:
            return None
        self.pids_seen.update(p for p in h.get("pids", []) if p)
        return h

    def frame(self) -> dict[str, Any]:
        answer = self.ask({"op": "stats"})
        assert answer["ok"], answer
        return dict(answer["frame"])

    def wait_up(
        self, workers: int, timeout: float = 30.0, with_frame: bool = False
    ) -> dict[str, Any]:
        """The health answer once ``workers`` workers are up (and a stats frame is out, with
        ``with_frame``); fails at once, with the log, if the service exits."""

        def up() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"service exited:\n{self.log()[-3000:]}"
            h = self.health()
            if not h or h.get("workers") != workers:
                return None
            if with_frame and not self.ask({"op": "stats"}).get("ok"):
                return None
            return h

        return dict(wait_for(up, timeout, f"{workers} workers up"))

    def up(self, workers: int, timeout: float = 30.0) -> Service:
        """``wait_up`` with a frame out, for a ``with Service(...).up(n) as svc`` line."""
        try:
            self.wait_up(workers, timeout, with_frame=True)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL every process of the service at once: a crash, not a shutdown.

        The workers run in sessions of their own (a terminal's Ctrl-C is the supervisor's), so
        the supervisor's group alone is not the service: a worker that outlives its supervisor
        drains, sending each stream its reconnect hint, which is a shutdown. Every process is
        stopped first (SIGSTOP), so none sees another die and reacts, then all are killed."""
        tree = self._tree()
        for _ in range(2):  # twice: a worker forked while the first round was being stopped
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGSTOP)
            tree = self._tree()
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc.wait(10)
        psutil.wait_procs([p for p in tree if p.pid != self.proc.pid], timeout=10)

    def _tree(self) -> list[psutil.Process]:
        """The supervisor, its descendants (the workers are its children: it is their subreaper)
        and any worker pid a health answer named."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(self.proc.pid)
            found[top.pid] = top
            for child in top.children(recursive=True):
                found[child.pid] = child
        for p in self._seen_alive():
            found.setdefault(p.pid, p)
        return list(found.values())

    def _seen_alive(self) -> list[psutil.Process]:
        """The pids a health answer named that are still a comet-service process: a pid the
        kernel has given to something else since is left alone."""
        alive = []
        for pid in self.pids_seen:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if " ".join(p.cmdline()).startswith("comet-service"):
                    alive.append(p)
        return alive

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL what is left; the supervisor's exit status."""
        code = kill_group(self.proc, timeout)
        for p in self._seen_alive():  # a worker that left the group cannot hide
            with contextlib.suppress(psutil.Error):
                p.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(code if code is not None else -1)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Clients:
    """``procs`` client processes holding ``n`` connections in total."""

    def __init__(
        self,
        port: int,
        n: int,
        procs: int,
        sources: list[str],
        *extra: str,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []
        per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        for i, count in enumerate(per):
            srcs = ",".join(sources[i::procs] or sources)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(CLIENTS),
                        "--port",
                        str(port),
                        "--n",
                        str(count),
                        "--sources",
                        srcs,
                        *extra,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=ROOT,
                    preexec_fn=preexec_fn,
                )
            )

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"stats\n")
            p.stdin.flush()
            one = json.loads(p.stdout.readline())
            for k, v in one.items():
                if isinstance(v, list):
                    total[k] = sorted(set(total.get(k, [])) | set(v))
                elif isinstance(v, dict):
                    kinds = total.setdefault(k, {})
                    for kind, count in v.items():
                        kinds[kind] = kinds.get(kind, 0) + count
                elif k.endswith("_t"):
                    total[k] = max(total.get(k, 0.0), v)
                else:
                    total[k] = total.get(k, 0) + v
        return total

    def wait(self, key: str, value: int, timeout: float, every: float = 0.25) -> dict[str, Any]:
        """The summed stats once ``key`` reached ``value`` (polled every ``every`` s)."""

        def reached() -> dict[str, Any] | None:
            s = self.stats()
            return s if s[key] >= value else None

        return dict(wait_for(reached, timeout, f"clients {key} >= {value}", every=every))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                try:
                    p.stdin.write(b"quit\n")
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def ran_ns(pids: list[int]) -> int:
    """The time ``pids`` (every thread) have run on a CPU so far, in ns, as the scheduler counts
    it (``/proc/PID/task/*/schedstat``). Not ``tree_cpu_s``: its clock ticks (10 ms) are 5 % of a
    broadcast to 18,000."""
    total = 0
    for pid in pids:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def tree_cpu_s(pid: int, reaped: bool = False) -> float:
    """User + system CPU seconds of a process and its live descendants; with ``reaped``, also
    of the children it has waited for (a reload's old workers)."""
    import psutil

    root = psutil.Process(pid)
    t = root.cpu_times()
    total = t.user + t.system + (t.children_user + t.children_system if reaped else 0.0)
    for p in root.children(recursive=True):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            continue
    return total


def sources(first: int, count: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(first, first + count)]


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository root, its output captured as text.
    ``env``: the whole environment (default: this one)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=os.environ.copy() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def benchmark(script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<script> args`` from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def run_benchmark(script: str, *args: str, timeout: float) -> str:
    """``benchmarks/<script> args`` from the repository root, which must exit 0: the last line
    of its output (the scripts end with their result)."""
    res = benchmark(script, *args, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]
