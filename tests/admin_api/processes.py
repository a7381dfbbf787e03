"""Real processes for the integration and browser tests: the comet service (``python -m service``),
the sidecar (``python -m admin_api``) and ``curl -N`` streaming clients. Every process started
here is stopped by the same object (context managers), killed if it will not stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

from tests.support import net
from tests.support.net import free_port
from tests.support.service import ROOT, Service

__all__ = [
    "ROOT",
    "free_port",
    "wait_for",
    "stop_process",
    "real_service",
    "Sidecar",
    "CurlClients",
]


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """:func:`tests.support.net.wait_for`, with a server not up yet (refused, HTTP error, no
    JSON yet) counting as not yet."""
    return net.wait_for(
        check, timeout, what, every, tolerate=(OSError, httpx.HTTPError, ValueError)
    )


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def real_service(tmp: Path, workers: int = 1) -> Service:
    """The service as these tests want it (pings every second, a short grace), up with a frame."""
    return Service(
        tmp,
        "--workers",
        str(workers),
        "--ping-interval",
        "1",
        "--grace",
        "3",
        "--target-connections",
        "1000",
    ).up(workers)


class Sidecar:
    """``python -m admin_api`` (the real entry point) on a free loopback port."""

    def __init__(
        self, tmp: Path, control_socket: Path | str, token: str | None = "itest-token", **env: str
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "COMET_ADMIN_CONTROL_SOCKET": str(control_socket),
            "COMET_ADMIN_PORT": str(self.port),
            "COMET_ADMIN_TOKEN_FILE": str(tmp / "admin-token"),
            **env,
        }
        self.env.pop("COMET_ADMIN_TOKEN", None)
        if token is not None:
            self.env["COMET_ADMIN_TOKEN"] = token
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.tmp / "admin.log"

    def __enter__(self) -> Sidecar:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "admin_api"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited: {self.log_path.read_text()[-2000:]}")
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200

        try:
            wait_for(up, 30, "the sidecar to answer /healthz")
            if self.token is None:
                self.token = Path(self.env["COMET_ADMIN_TOKEN_FILE"]).read_text().strip()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class CurlClients:
    """``curl -N`` streaming subscribers, each writing what it receives to its own file."""

    def __init__(self, tmp: Path, url: str, count: int) -> None:
        self.outputs = [tmp / f"curl-{i}.out" for i in range(count)]
        self.url = url
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def __enter__(self) -> CurlClients:
        for path in self.outputs:
            out = open(path, "wb")  # noqa: SIM115 - closed in __exit__
            self._files.append(out)
            self.procs.append(
                subprocess.Popen(
                    ["curl", "-sS", "-N", self.url], stdout=out, stderr=subprocess.STDOUT
                )
            )
        return self

    def texts(self) -> list[str]:
        return [p.read_text(errors="replace") for p in self.outputs]

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            stop_process(proc, grace=5)
        for out in self._files:
            out.close()
