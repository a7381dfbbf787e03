"""Real processes for the load generator's tests: the comet1m service, a fixture server, agents.

Every process is started in its own session and its whole process group is killed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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

from loadgen.bench.service import free_port  # below the ephemeral range: see its docstring
from tests.support.control import ask as control
from tests.support.net import wait_for
from tests.support.service import ROOT, Service, kill_group, run_module

__all__ = [
    "ROOT",
    "Agent",
    "Service",
    "bench",
    "control",
    "free_port",
    "get_json",
    "kill_group",
    "wait_for",
]

FIXTURE = Path(__file__).with_name("fixture_server.py")


def get_json(url: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def port_listeners(port: int) -> set[int]:
    from loadgen.bench.service import listening_pids

    return set(listening_pids(port))


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

        return dict(wait_for(ok, timeout, f"{n} clients", every=0.2))

    def stop(self) -> None:
        kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m loadgen.bench args``, with a terminal wide enough for its tables."""
    return run_module("loadgen.bench", *args, env={**os.environ, "COLUMNS": "160"}, timeout=timeout)


def start_service(tmp: Path, port: int | None = None) -> Service:
    """The service the agents are aimed at, up, and alone on its port (a stranger sharing it
    through SO_REUSEPORT would take some of the agents' connections)."""
    svc = Service(
        tmp,
        "--workers",
        "1",
        "--target-connections",
        "1000",
        "--ping-interval",
        "1",
        "--grace",
        "2",
        port=port or free_port(),
    ).up(1, timeout=60)
    ours = {svc.proc.pid} | {c.pid for c in psutil.Process(svc.proc.pid).children(True)}
    try:
        wait_for(lambda: port_listeners(svc.port) & ours, 30, "the service's listener")
        strangers = port_listeners(svc.port) - ours
        assert not strangers, f"port {svc.port} shared with other processes {strangers}"
    except BaseException:
        svc.stop()
        raise
    return svc


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with start_service(tmp_path) as svc:
        yield svc


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


@contextlib.contextmanager
def running_fixture_server(*args: str) -> Iterator[int]:
    """tests/loadgen/fixture_server.py on a free port (pings every 0.5 s, ``args`` added)."""
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURE), "--port", "0", "--ping", "0.5", *args],
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


@pytest.fixture
def fixture_server() -> Iterator[int]:
    with running_fixture_server() as port:
        yield port
