"""``./dev run`` as a new user meets it: a bad flag, Ctrl-C. Exit status, output, and nothing of
what it started left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.net import free_port  # noqa: E402
from tests.support.service import reaped  # noqa: E402


def dev_env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        # The virtualenv running the tests (sys.prefix; resolving sys.executable's symlink would
        # name the system Python and make ./dev install into it).
        "COMET_VENV": sys.prefix,
        "COMET_PORT": str(free_port()),
        "COMET_ADMIN_PORT": str(free_port()),
        "COMET_CONTROL_SOCKET": str(tmp / "c.sock"),
        "COMET_ADMIN_TOKEN_FILE": str(tmp / "token"),
        "COMET_LOG_DIR": str(tmp / "logs"),
        "COMET_SCREEN": "off",
        "COMET_WORKERS": "1",
    }


def session_left(sid: int) -> list[str]:
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.info["cmdline"] or []))
        except (OSError, psutil.Error):
            pass
    return left


def session_left_after(sid: int, timeout: float = 10.0) -> list[str]:
    """What is still running in session ``sid`` once it empties or ``timeout`` s have passed (the
    processes a stopped ./dev signalled may take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while (left := session_left(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_bad_flag_is_one_line_exit_2_and_starts_nothing(tmp_path):
    proc = subprocess.Popen(
        ["./dev", "run", "--bogus"],
        cwd=ROOT,
        env=dev_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "unbound variable" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "comet-service: unrecognized arguments: --bogus (see comet-service --help)"
    )
    assert session_left_after(proc.pid) == []


def test_ctrl_c_stops_service_and_sidecar_with_130(tmp_path):
    env = dev_env(tmp_path)
    proc = subprocess.Popen(
        ["./dev", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # A terminal's shell starts with SIGINT at its default. Launched from a job that ignores
        # it (a background job of a non-interactive shell: `cmd &`), the ignore is inherited down
        # to ./dev's bash, which then cannot trap INT at all and exits 0.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    with reaped(proc, group=True):
        import httpx

        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "./dev run did not come up"
            try:
                service = httpx.get(f"http://127.0.0.1:{env['COMET_PORT']}/poll/x?timeout=0")
                admin = httpx.get(f"http://127.0.0.1:{env['COMET_ADMIN_PORT']}/healthz")
                if service.status_code == 200 and admin.json()["service"]["reachable"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "unbound variable" not in out and "Traceback" not in out and "ERROR" not in out, out
    assert session_left_after(proc.pid) == []
    # The sidecar's log went to its file, not over the service's screen.
    assert (tmp_path / "logs" / "admin.log").read_text()
