"""The control socket over a real Unix socket, against a real supervisor with one worker."""

from __future__ import annotations

import csv
import json
import os
import socket
import stat
import subprocess
import sys
import time
from typing import Any

import pytest

from service.contracts import COUNTER_NAMES
from service.supervisor.csvlog import COLUMNS
from tests.support.net import free_port, wait_for
from tests.support.service import ROOT, Service

FRAME_KEYS = {
    "t",
    "step",
    "uptime_s",
    "target_connections",
    "node_id",
    "frame_ms",
    "totals",
    "system",
    "workers",
}
TOTALS_KEYS = {*COUNTER_NAMES, "rss_bytes", "cpu_percent", "lag_ms", "lag_hist"}  # summed
SYSTEM_KEYS = {"cpu", "mem", "sockstat", "fds", "limits"}
WORKER_KEYS = {
    "pid",
    "index",
    "conns",
    "rss_bytes",
    "cpu_percent",
    "lag_ms",
    "lag_hist",
    "msgs_sent_total",
}


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = Service(
        tmp_path_factory.mktemp("control"), "--workers", "1", "--limit-message-bytes", "65536"
    )
    try:
        service.wait_up(1)
        yield service
    finally:
        assert service.stop() == 0, service.log()


def check_frame(frame: dict[str, Any]) -> None:
    assert FRAME_KEYS <= frame.keys()
    assert TOTALS_KEYS <= frame["totals"].keys()
    assert {"avg", "p90", "max"} <= frame["totals"]["lag_ms"].keys()
    assert SYSTEM_KEYS <= frame["system"].keys()
    assert {"user", "sys", "idle"} <= frame["system"]["cpu"].keys()
    assert {"total", "used", "cached"} <= frame["system"]["mem"].keys()
    assert "TCP" in frame["system"]["sockstat"]
    assert {"open", "limit"} <= frame["system"]["fds"].keys()
    assert frame["system"]["fds"]["open"] > 0
    assert {"nofile", "file_max", "conntrack_max", "port_range"} <= frame["system"]["limits"].keys()
    assert len(frame["system"]["limits"]["port_range"]) == 2
    assert frame["workers"], "no worker rows"
    for w in frame["workers"]:
        assert WORKER_KEYS <= w.keys()
        assert w["rss_bytes"] > 0


def test_watch_yields_frames_every_second(svc):
    c = svc.control()
    try:
        first = c.ask({"op": "watch"})
        assert first["ok"] is True
        frames = [c.read()["frame"] for _ in range(3)]
    finally:
        c.close()
    for f in frames:
        check_frame(f)
    steps = [f["step"] for f in frames]
    assert steps == sorted(steps) and len(set(steps)) == 3
    # The lag histogram counts every sample the worker takes (20-100 a second) and only grows.
    counts = [sum(f["totals"]["lag_hist"]) for f in frames]
    assert counts[0] > 0 and counts[2] - counts[0] >= 20, counts
    assert counts[2] == sum(sum(w["lag_hist"]) for w in frames[2]["workers"])
    gaps = [b["t"] - a["t"] for a, b in zip(frames, frames[1:], strict=False)]
    assert all(0.5 < g < 2.0 for g in gaps), gaps


def test_stats_health_channels(svc):
    c = svc.control()
    try:
        stats = c.ask({"op": "stats"})
        assert stats["ok"] is True
        check_frame(stats["frame"])
        health = c.ask({"op": "health"})
        assert health["ok"] is True and health["workers"] == 1 and health["uptime_s"] >= 0
        assert c.ask({"op": "channels"}) == {"ok": True, "channels": {}}
        b = c.ask({"op": "broadcast", "data": "x", "channel": "news", "event": "update"})
        assert b["ok"] is True and b["recipients"] == 0 and b["id"] >= 1
    finally:
        c.close()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"this is not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"op": "launch"}', "unknown op"),
        (b'{"data": "x"}', "missing field 'op'"),
        (b'{"op": "broadcast"}', "missing field 'data'"),
        (b'{"op": "broadcast", "data": 5}', "'data' must be a string"),
        (b'{"op": "broadcast", "data": "x", "channel": "bad channel!"}', "'channel'"),
        (b'{"op": "broadcast", "data": "x", "event": "a\\nb"}', "'event'"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b'{"op": "broadcast", "data": "\\ud800"}', "unpaired surrogate"),
        (b'{"op": "broadcast", "data": "x", "channel": "news\\n"}', "'channel'"),
    ],
)
def test_bad_requests_get_clean_errors_and_the_connection_stays_usable(svc, raw, error):
    c = svc.control()
    try:
        answer = c.ask(raw)
        assert answer["ok"] is False
        assert error in answer["error"]
        assert "Traceback" not in answer["error"]
        assert c.ask({"op": "health"})["ok"] is True
    finally:
        c.close()


def test_oversized_line_is_refused_and_the_next_request_works(svc):
    c = svc.control()
    try:
        c.send_raw(b'{"op":"broadcast","data":"' + b"x" * (2 * 1024 * 1024) + b'"}\n')
        answer = c.read()
        assert answer == {"ok": False, "code": "bad_request", "error": "request line over 1 MiB"}
        assert c.ask({"op": "health"})["ok"] is True
    finally:
        c.close()


def test_oversized_line_is_answered_before_its_newline_arrives(svc):
    c = svc.control()
    try:
        c.send_raw(b"y" * (1024 * 1024 + 200_000))  # no newline yet
        assert c.read() == {"ok": False, "code": "bad_request", "error": "request line over 1 MiB"}
        c.send_raw(b"y" * 1000 + b"\n")  # the end of that same line: no second answer
        assert c.ask({"op": "health"})["ok"] is True
    finally:
        c.close()


def test_surrogate_data_leaves_no_traceback_in_the_log(svc):
    c = svc.control()
    try:
        answer = c.ask(b'{"op": "broadcast", "data": "a\\udfffb"}')
        assert answer == {
            "ok": False,
            "code": "bad_request",
            "error": "field 'data': unpaired surrogate at character 1: not valid Unicode text",
        }
    finally:
        c.close()
    assert "Traceback" not in svc.log() and "UnicodeEncodeError" not in svc.log()


def test_data_over_the_message_cap_is_refused(svc):
    c = svc.control()
    try:
        answer = c.ask({"op": "broadcast", "data": "x" * 70_000})
        assert answer == {
            "ok": False,
            "code": "bad_request",
            "error": "field 'data' is over 65536 bytes",
        }
        assert c.ask({"op": "health"})["ok"] is True
    finally:
        c.close()


def test_socket_mode_is_0660(svc):
    mode = stat.S_IMODE(os.stat(svc.control_path).st_mode)
    assert mode == 0o660


def test_csv_has_header_and_one_row_per_second(svc):
    logs = list(svc.log_dir.glob("comet-*.csv"))
    assert len(logs) == 1
    time.sleep(3.2)
    with open(logs[0], newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS
    body = rows[1:]
    assert len(body) >= 3
    ts = [float(r[COLUMNS.index("t")]) for r in body]
    uptime = ts[-1] - ts[0]
    # One row per second: as many rows as seconds covered, give or take one.
    assert abs((len(body) - 1) - uptime) <= 1.0, (len(body), uptime)
    steps = [int(r[0]) for r in body]
    assert steps == list(range(steps[0], steps[0] + len(steps)))
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    assert all(0.5 < g < 2.0 for g in gaps), gaps
    assert all(float(r[COLUMNS.index("elapsed_ms")]) < 2000 for r in body[1:])


def test_watch_sent_before_the_first_frame_still_gets_only_frame_lines(tmp_path):
    svc = Service(tmp_path, "--workers", "1")
    c = None
    try:
        wait_for(lambda: svc.health() is not None, 20, "the control socket")
        c = svc.control()
        c.send_raw(b'{"op":"watch"}\n')
        lines = [c.read() for _ in range(2)]
        assert all(line["ok"] is True and "frame" in line for line in lines), lines
    finally:
        if c is not None:
            c.close()
        assert svc.stop() == 0, svc.log()


def test_stale_socket_file_is_replaced_and_a_live_one_is_not_stolen(tmp_path):
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: what a killed supervisor leaves behind
    assert path.exists()
    svc = Service(tmp_path, "--workers", "1")
    try:
        svc.wait_up(1)
        assert "removing stale control socket" in svc.log()
        # A second supervisor on the same socket refuses to start instead of stealing it.
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "service",
                "--workers",
                "1",
                "--port",
                str(free_port()),
                "--control-socket",
                str(path),
                "--log-dir",
                str(tmp_path / "logs2"),
                "--screen",
                "off",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode != 0
        assert "another supervisor is serving" in second.stderr
        health = svc.health()
        assert health is not None and health["workers"] == 1
    finally:
        assert svc.stop() == 0, svc.log()
    wait_for(lambda: not path.exists(), 5, "the socket file removed at exit")


def test_the_ask_command_talks_to_the_socket(svc):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.ask",
            "--socket",
            svc.control_path,
            '{"op":"health"}',
            '{"op":"channels"}',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    health, channels = (json.loads(line) for line in r.stdout.splitlines())
    assert health["ok"] and health["workers"] == 1 and channels["ok"]
    bad = subprocess.run(
        [sys.executable, "-m", "service.ask", "--socket", svc.control_path, "{nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "not JSON" in bad.stderr


def test_requests_pipeline_and_answers_come_back_in_request_order(svc):
    """Many lines in one write (a publisher with a window): each is answered once, in order,
    with a bad line and a health request in between keeping their places."""
    lines = [
        json.dumps({"op": "broadcast", "data": f"p{i}", "channel": "pipe"}).encode()
        for i in range(300)  # more than the 256 a connection may have in flight
    ]
    lines.insert(10, b"not json")
    lines.insert(150, json.dumps({"op": "health"}).encode())
    c = svc.control()
    try:
        c.send_raw(b"\n".join(lines) + b"\n")
        answers = [c.read() for _ in lines]
    finally:
        c.close()
    assert answers[10] == {"ok": False, "code": "bad_request", "error": "request is not valid JSON"}
    assert answers[150]["ok"] and answers[150]["workers"] == 1
    ids = [a["id"] for i, a in enumerate(answers) if i not in (10, 150)]
    assert ids == list(range(ids[0], ids[0] + 300))  # numbered in the order they were sent
    assert all(a["ok"] for i, a in enumerate(answers) if i != 10)
