"""A real redis-server for the scale-out tests, on a free loopback port in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import IO

import pytest

from .processes import free_port, wait_for

REDIS_BIN = "/usr/bin/redis-server"


def ensure_redis_server() -> str:
    found = shutil.which("redis-server") or (REDIS_BIN if os.path.exists(REDIS_BIN) else None)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("redis-server is not installed (apt-get install redis-server, or ./dev test)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
        check=True,
        env=env,
        timeout=300,
    )
    # The package may start its own instance (no systemd here: usually not); ours has its own port.
    return REDIS_BIN


class RedisServer:
    """One redis-server on a loopback port, without persistence: a restart loses the data, the
    harder case for the nodes (the id sequence must not start again from 1)."""

    def __init__(self, tmp: Path, persist: bool = False) -> None:
        self.binary = ensure_redis_server()
        self.tmp = tmp
        self.persist = persist
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.tmp / "redis.log", "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.tmp),
                "--daemonize",
                "no",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._pong, 15, f"redis-server on port {self.port}")

    def _pong(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.tmp / 'redis.log').read_text()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def kill(self) -> None:
        """SIGKILL: the nodes see their connections reset, as in a crash."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
