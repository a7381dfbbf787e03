"""Fixtures: a fake control socket (real Unix server) and the sidecar on a real uvicorn port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from admin_api.main import create_app
from admin_api.server import AdminServer, server_config
from admin_api.settings import AdminSettings

from .fake_control import FakeControl

TOKEN = "test-token-5c1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeControl]:
    control = FakeControl(short_dir / "control.sock", workers=2, interval=0.2).start()
    control.set_conns(3, 4)
    yield control
    control.close()


class ThreadedServer:
    """uvicorn serving an app in a thread, on a socket bound to a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The sidecar's own protocol and limits (comet-admin's configuration).
        config = server_config(app, "127.0.0.1", self.port, "warning")
        config.timeout_graceful_shutdown = 1
        self.server = AdminServer(config, app)
        # A daemon: one that does not stop fails its test below instead of holding up the exit.
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn thread died"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the sidecar did not shut down within 15 s"


def make_settings(socket_path: Path, **extra: object) -> AdminSettings:
    return AdminSettings(
        token=SecretStr(TOKEN),
        control_socket=socket_path,
        max_message_bytes=1024,
        control_timeout=2.0,
        broadcast_timeout=2.0,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
def admin(fake: FakeControl) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(make_settings(fake.path))) as server:
        yield server


@pytest.fixture
def client(admin: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admin.url, timeout=10) as http:
        yield http
