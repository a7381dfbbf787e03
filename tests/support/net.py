"""Free loopback ports and bounded waits."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    every: float = 0.1,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """``check()``'s first truthy value, polled every ``every`` s for at most ``timeout`` s; an
    AssertionError naming ``what`` and the last value after that. Exceptions in ``tolerate``
    count as a falsy value (a server not up yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def short_dir(prefix: str = "c1m-") -> Iterator[Path]:
    """A fresh folder under /tmp, removed after: short enough for AF_UNIX socket paths (at most
    107 bytes), which pytest's tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def long_poll(
    port: int, channel: str, since: int, timeout: float = 30
) -> tuple[tuple[str, int], dict[str, Any]]:
    """One long-poll (``GET /poll/<channel>``) on a connection of its own: its local address
    and the JSON answer."""
    import json

    with socket.create_connection(("127.0.0.1", port), timeout=timeout + 10) as s:
        local = s.getsockname()
        s.sendall(
            f"GET /poll/{channel}?since={since}&timeout={timeout} HTTP/1.1\r\nHost: t\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return local, dict(json.loads(body))


# Linux's SO_TIMESTAMPNS: Python 3.11's socket module does not name it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def stamp_arrivals(s: socket.socket) -> None:
    """Have the kernel stamp what ``s`` receives from now on (read with :func:`arrival_ns`).

    The first socket on the host to ask for stamps turns them on through a kernel work item
    (``net_enable_timestamp`` defers the switch), so segments that arrive just after the option is
    set can still come unstamped. Return only once a probe segment sent now is seen stamped."""
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    deadline = time.monotonic() + 5.0
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname(), timeout=5) as probe:
            sender, _ = listener.accept()
            with sender:
                probe.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                while True:
                    sender.sendall(b".")
                    _data, ancdata, _flags, _addr = probe.recvmsg(16, socket.CMSG_SPACE(16))
                    if any(kind == SO_TIMESTAMPNS for _level, kind, _raw in ancdata):
                        return
                    assert time.monotonic() < deadline, "the kernel never stamped a probe segment"
                    time.sleep(0.001)


def arrival_ns(s: socket.socket, until: bytes) -> int:
    """When the kernel received the bytes that completed ``until`` on ``s`` (SO_TIMESTAMPNS)."""
    got = b""
    at = 0
    s.settimeout(5)
    while until not in got:
        data, ancdata, _flags, _addr = s.recvmsg(4096, socket.CMSG_SPACE(16))
        assert data, f"closed before {until!r}: {got!r}"
        got += data
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", raw[:16])
                at = sec * 1_000_000_000 + nsec
    assert at, "no receive timestamp"
    return at


def bench_namespaces() -> list[str]:
    """The network namespaces comet-bench's --netns made (``cbench*``) that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith("cbench"))
