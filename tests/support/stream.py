"""A raw subscriber held across restarts, reloads and upgrades: every byte it got (read by a
thread), its own local port (the same TCP connection before and after), and whether it ended."""

from __future__ import annotations

import socket
import threading

import psutil


class Stream:
    """``GET path`` on ``host:port`` (SSE with ``sse``), remembering every byte."""

    def __init__(
        self, port: int, path: str, sse: bool, host: str = "127.0.0.1", timeout: float = 10
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        accept = "Accept: text/event-stream\r\n" if sse else ""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{accept}\r\n".encode())
        self.local = self.sock.getsockname()
        self.data = b""
        self.closed = False  # the server ended it
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass
        self.closed = True

    def ids(self) -> list[int]:
        """The SSE ids received, in order."""
        return [int(x) for x in fields(self.data, b"id: ")]

    def plain_messages(self) -> list[str]:
        """The plain stream's message lines (the tests' messages start with ``m``)."""
        return [line for line in lines(self.data) if line.startswith("m")]

    def close(self) -> None:
        self.sock.close()


def lines(data: bytes) -> list[str]:
    return data.decode(errors="replace").splitlines()


def fields(data: bytes, prefix: bytes) -> list[bytes]:
    return [ln[len(prefix) :] for ln in data.split(b"\n") if ln.startswith(prefix)]


def server_ports(pid: int) -> set[int]:
    """The remote ports of the established connections the service's processes hold."""
    out: set[int] = set()
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        try:
            for c in p.net_connections("tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.raddr:
                    out.add(c.raddr.port)
        except psutil.Error:
            continue
    return out
