"""Real-process helpers for the supervisor and control-socket tests.

``Service`` runs ``python -m service`` with a temp control socket and log dir on a free port;
``Clients`` runs benchmarks/comet_clients.py processes (one process holds < 20,000 sockets) that
connect from 127.0.0.x source addresses. Both clean up every process they started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "benchmarks" / "comet_clients.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Control:
    """A JSON-lines connection to the control socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rwb")

    def send_raw(self, raw: bytes) -> None:
        self.file.write(raw)
        self.file.flush()

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "control socket closed"
        return dict(json.loads(line))

    def ask(self, req: dict[str, Any] | bytes) -> dict[str, Any]:
        raw = req if isinstance(req, bytes) else json.dumps(req).encode()
        self.send_raw(raw + b"\n")
        return self.read()

    def close(self) -> None:
        # A line still buffered when the service went away makes file.close() raise
        # (its flush fails): close the socket anyway, or it leaks until GC warns.
        try:
            self.file.close()
        finally:
            self.sock.close()


class Service:
    def __init__(
        self,
        tmp: Path,
        *args: str,
        port: int | None = None,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.port = port if port is not None else free_port()
        self.control_path = str(tmp / "run" / "control.sock")
        self.log_dir = tmp / "logs"
        self.stderr_path = tmp / "supervisor.err"
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
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}

        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            preexec_fn=limit,
        )
        self.pids_seen: set[int] = set()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def control(self) -> Control:
        return Control(self.control_path)

    def ask(self, req: dict[str, Any] | bytes) -> dict[str, Any]:
        c = self.control()
        try:
            return c.ask(req)
        finally:
            c.close()

    def health(self) -> dict[str, Any] | None:
        try:
            h = self.ask({"op": "health"})
        except OSError:
            return None
        self.pids_seen.update(p for p in h.get("pids", []) if p)
        return h

    def wait_up(self, workers: int, timeout: float = 30.0) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"supervisor exited:\n{self.log()}"
            h = self.health()
            return h if h and h["workers"] == workers else None

        return dict(wait_for(up, timeout, f"{workers} workers up"))

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_leftovers()
        self._err.close()
        return int(self.proc.returncode)

    def _kill_leftovers(self) -> None:
        for pid in self.pids_seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError:
                continue


class Clients:
    """``procs`` client processes holding ``n`` connections in total."""

    def __init__(self, port: int, n: int, procs: int, sources: list[str], *extra: str) -> None:
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
                elif k.endswith("_t"):
                    total[k] = max(total.get(k, 0.0), v)
                else:
                    total[k] = total.get(k, 0) + v
        return total

    def wait(self, key: str, value: int, timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            s = self.stats()
            return s if s[key] >= value else None

        return dict(wait_for(reached, timeout, f"clients {key} >= {value}", every=0.25))

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


def sources(first: int, count: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(first, first + count)]
