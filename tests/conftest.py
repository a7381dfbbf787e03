"""Fixtures every suite shares; the helpers behind them are in :mod:`tests.support`.

Also the run's last check: nothing a test started may outlive the session. A thread that is not
a daemon keeps the interpreter from exiting after the summary, and a child process keeps CI's
output pipe open; either way CI waits for its time limit with every test passed (it did once,
for 64 minutes, on a sidecar whose shutdown hung). They are named, with where each thread is
stuck, the run fails, and the process exits without waiting for them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.net import short_dir as _short_dir

GRACE = 5.0  # seconds a thread or child still ending at the session's end is given
# Set when threads were left running: pytest_unconfigure then exits without joining them.
_ABANDONED = pytest.StashKey[bool]()


@pytest.fixture
def short_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder under /tmp for tests that put Unix sockets in it (see ``short_dir``)."""
    with _short_dir(f"c1m-{request.node.name[:20]}-") as path:
        yield path


def _threads_left() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def _children_left() -> list[psutil.Process]:
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                left.append(child)
        except psutil.NoSuchProcess:
            pass
    return left


def _describe(threads: list[threading.Thread], children: list[psutil.Process]) -> list[str]:
    lines = []
    frames = sys._current_frames()
    for t in threads:
        lines.append(f"thread {t.name!r}, not a daemon, still running at:\n")
        frame = frames.get(t.ident or -1)
        lines.extend(traceback.format_stack(frame) if frame is not None else ["  (no frame)\n"])
    for child in children:
        try:
            lines.append(f"process {child.pid}: {' '.join(child.cmdline())[:300]}\n")
        except psutil.Error:
            lines.append(f"process {child.pid}: (gone while being described)\n")
    return lines


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + GRACE
    threads, children = _threads_left(), _children_left()
    while (threads or children) and time.monotonic() < deadline:
        time.sleep(0.1)
        threads, children = _threads_left(), _children_left()
    if not threads and not children:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = "".join(_describe(threads, children))
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("=", "left running after the last test: the run fails", red=True)
        reporter.write(text)
    else:
        sys.stderr.write(text)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[_ABANDONED] = bool(threads)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # Threads that would hold the interpreter's exit forever: leave without joining them.
    if config.stash.get(_ABANDONED, False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(pytest.ExitCode.TESTS_FAILED))
