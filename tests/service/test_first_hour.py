"""The edges a new user meets first: a busy port, a second instance, a bad flag, Ctrl-C with the
sidecar watching. Each is one line and the right exit status, never a traceback or a loop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from service.config import parse_args
from tests.support.net import free_port, wait_for
from tests.support.service import ROOT, Service


def finish(svc: Service, timeout: float = 20) -> int:
    try:
        return svc.proc.wait(timeout)
    finally:
        svc.stop()


def test_a_port_taken_by_another_program_is_one_line_and_exit_1(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as other:  # no SO_REUSEPORT
        port = other.getsockname()[1]
        svc = Service(tmp_path, "--workers", "1", port=port)
        code = finish(svc)
        log = svc.log()
    assert code == 1, log
    assert "Traceback" not in log and "restarting" not in log
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"port {port} is already in use" in errors[0], log
    assert "--allow-shared-port" in errors[0]


def test_a_second_instance_is_refused_unless_sharing_is_asked_for(tmp_path):
    for name in "abc":
        (tmp_path / name).mkdir()
    first = Service(tmp_path / "a", "--workers", "1")
    try:
        first.wait_up(1)
        second = Service(tmp_path / "b", "--workers", "1", port=first.port)
        code = finish(second)
        assert code == 1
        assert f"port {first.port} is already in use by pid" in second.log()
        # On purpose: both serve the port.
        shared = Service(tmp_path / "c", "--workers", "1", "--allow-shared-port", port=first.port)
        try:
            shared.wait_up(1)
        finally:
            assert shared.stop() == 0, shared.log()
    finally:
        assert first.stop() == 0, first.log()


def test_a_worker_that_cannot_listen_stops_the_service_instead_of_looping(tmp_path):
    # An address this host does not have: the probe fails, so the supervisor says so at once.
    svc = Service(tmp_path, "--workers", "1", "--host", "192.0.2.1")
    code = finish(svc)
    log = svc.log()
    assert code == 1 and "cannot listen on 192.0.2.1" in log and "restarting" not in log, log
    assert "Traceback" not in log


def test_ctrl_c_with_a_watcher_leaves_no_traceback(tmp_path):
    svc = Service(tmp_path, "--workers", "2")
    svc.wait_up(2)
    watcher = svc.control()
    watcher.send_raw(b'{"op":"watch"}\n')
    watcher.read()
    svc.proc.send_signal(signal.SIGINT)
    code = svc.proc.wait(30)
    watcher.close()
    log = svc.log()
    svc.stop()
    assert code == 0
    assert "Traceback" not in log and "ERROR" not in log, log


def test_bad_flag_is_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "service", "--bogus"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "comet-service: unrecognized arguments: --bogus (see comet-service --help)"
    ]


def test_bool_options_parse_as_bools():
    assert parse_args([], environ={}).allow_shared_port is False
    assert parse_args(["--allow-shared-port"], environ={}).allow_shared_port is True
    assert parse_args([], environ={"COMET_ALLOW_SHARED_PORT": "false"}).allow_shared_port is False
    assert parse_args([], environ={"COMET_ALLOW_SHARED_PORT": "yes"}).allow_shared_port is True
    on = {"COMET_ALLOW_SHARED_PORT": "1"}
    assert parse_args(["--no-allow-shared-port"], environ=on).allow_shared_port is False
    with pytest.raises(SystemExit):
        parse_args([], environ={"COMET_ALLOW_SHARED_PORT": "maybe"})


def test_live_screen_keeps_logs_off_the_terminal_and_shows_the_latest(tmp_path):
    out = tmp_path / "screen.out"
    with open(out, "wb") as screen:
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--workers",
                "2",
                "--screen",
                "on",
                "--control-socket",
                str(tmp_path / "s.sock"),
                "--log-dir",
                str(tmp_path / "logs"),
            ],
            cwd=ROOT,
            stdout=screen,
            stderr=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200"},
        )
    try:
        log = tmp_path / "logs" / "comet-service.log"

        def logged(text: str) -> bool:
            return log.exists() and text in log.read_text()

        deadline = time.monotonic() + 30
        # Workers come up in any order: wait for both.
        while not (logged("worker 0 up") and logged("worker 1 up")):
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        pid = next(
            int(line.rsplit("pid ", 1)[1].rstrip(")"))
            for line in log.read_text().splitlines()
            if "worker 0 up" in line
        )
        os.kill(pid, signal.SIGKILL)
        while not logged("worker 0: restarting"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        wait_for(
            lambda: "worker 0: restarting" in out.read_text().split("latest events")[-1],
            10,
            "a frame that lists the restart among its latest events",
        )
        assert logged("listening on 127.0.0.1")  # the workers' own lines go to the file too
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    # Nothing was written over the screen while it was up; the last lines come after it.
    assert "worker 0 up" not in err and "Traceback" not in err
    assert "stopped" in err


def test_the_backlog_log_line_says_capped_only_when_it_is(tmp_path):
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    svc = Service(tmp_path, "--workers", "1", "--backlog", str(min(128, somaxconn)))
    try:
        svc.wait_up(1)
        line = next(ln for ln in svc.log().splitlines() if "listening on" in ln)
        assert f"backlog {min(128, somaxconn)}," in line and "capped" not in line, line
    finally:
        svc.stop()
    svc = Service(tmp_path, "--workers", "1", "--backlog", str(somaxconn + 1))
    try:
        svc.wait_up(1)
        line = next(ln for ln in svc.log().splitlines() if "listening on" in ln)
        assert f"asked {somaxconn + 1}, capped by net.core.somaxconn" in line, line
    finally:
        svc.stop()
