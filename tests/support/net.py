"""Free loopback ports and bounded waits."""

from __future__ import annotations

import contextlib
import shutil
import socket
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
