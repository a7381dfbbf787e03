"""Real processes for the integration and browser tests: the comet service (``python -m service``),
the sidecar (``python -m admin_api``) and ``curl -N`` streaming clients. Every process started
here is stopped by the same object (context managers), killed if it will not stop."""

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
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, httpx.HTTPError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def control_ask(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(json.loads(data))


class RealService:
    """``python -m service --workers 1`` on a free port with its control socket in ``tmp``."""

    def __init__(self, tmp: Path, workers: int = 1) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.control_socket = tmp / "control.sock"
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.tmp / "service.log"

    def start(self) -> RealService:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--workers",
                str(self.workers),
                "--port",
                str(self.port),
                "--control-socket",
                str(self.control_socket),
                "--ping-interval",
                "1",
                "--log-dir",
                str(self.tmp / "logs"),
                "--screen",
                "off",
                "--grace",
                "3",
                "--target-connections",
                "1000",
            ],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._healthy, 30, f"the service to answer on {self.control_socket}")
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"service exited: {self.log_path.read_text()[-2000:]}")
        if not self.control_socket.exists():
            return False
        answer = control_ask(self.control_socket, {"op": "stats"})
        return bool(answer.get("ok")) and answer.get("frame", {}).get("workers") is not None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RealService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sidecar:
    """``python -m admin_api`` (the real entry point) on a free loopback port."""

    def __init__(
        self, tmp: Path, control_socket: Path, token: str | None = "itest-token", **env: str
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
