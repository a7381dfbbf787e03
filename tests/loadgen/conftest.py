"""Real processes for the load generator's tests: the comet1m service, a fixture server, agents.

Every process is started in its own session and its whole process group is killed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).with_name("fixture_server.py")


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def get_json(url: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_port() -> int:
    from loadgen.bench import free_port as pick

    return pick()


def port_listeners(port: int) -> set[int]:
    from loadgen.bench import listening_pids

    return set(listening_pids(port))


def kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL the group and every descendant still alive."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    psutil.wait_procs(tree, timeout=5)


def control(sock: str, req: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "control socket closed"
            buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


class Service:
    """``python -m service`` on a free port, with its control socket and log dir."""

    def __init__(self, tmp: Path, workers: int = 1, port: int | None = None) -> None:
        self.tmp = tmp
        self.workers = workers
        self.port = port or free_port()
        self.sock = str(tmp / "control.sock")
        self.log_dir = tmp / "logs"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        cmd = [
            sys.executable,
            "-m",
            "service",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--target-connections",
            "1000",
            "--control-socket",
            self.sock,
            "--log-dir",
            str(self.log_dir),
            "--screen",
            "off",
            "--ping-interval",
            "1",
            "--grace",
            "2",
        ]
        log = open(self.tmp / "service.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    "service exited:\n" + (self.tmp / "service.log").read_text()[-3000:]
                )
            try:
                return bool(control(self.sock, {"op": "health"}).get("ok"))
            except OSError:
                return False

        wait_until(up, 60, "the service's control socket")
        ours = {self.proc.pid} | {c.pid for c in psutil.Process(self.proc.pid).children(True)}
        wait_until(lambda: port_listeners(self.port) & ours, 30, "the service's listener")
        strangers = port_listeners(self.port) - ours
        assert not strangers, f"port {self.port} shared with other processes {strangers}"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


class Agent:
    """``comet-loadgen agent`` on a free control port."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / f"agent-{time.monotonic_ns()}.log"
        cmd = [
            sys.executable,
            "-m",
            "loadgen",
            "agent",
            "--control-port",
            "0",
            "--bind",
            "127.0.0.1",
            *args,
        ]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        m = re.search(r"http://[^:]+:(\d+)/", line)
        assert m, f"agent did not start: {line!r} {self.log.read_text()}"
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str = "/") -> tuple[int, dict[str, Any]]:
        return get_json(self.url + path)

    def stats(self) -> dict[str, Any]:
        status, body = self.get("/")
        assert status == 200, body
        return body

    def wait_clients(self, n: int, timeout: float = 60) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            s = self.stats()
            return s if s["clients"] == n and s["inproc"] == 0 else None

        return wait_until(ok, timeout, f"{n} clients", step=0.2)  # type: ignore[no-any-return]

    def stop(self) -> None:
        kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path).start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def make(*args: str) -> Agent:
        a = Agent(tmp_path, *args)
        started.append(a)
        return a

    try:
        yield make
    finally:
        for a in started:
            a.stop()


@pytest.fixture
def fixture_server() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURE), "--port", "0", "--ping", "0.5"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port
    finally:
        kill_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
