"""A client of the service's control socket (JSON lines, docs/architecture.md)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class Control:
    """One JSON-lines connection to the control socket, for several requests or a watch."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
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

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(path: str | Path, req: dict[str, Any] | bytes, timeout: float = 10.0) -> dict[str, Any]:
    """One request on a fresh connection."""
    with Control(path, timeout) as c:
        return c.ask(req)
