"""Capacity planning: worker count from RLIMIT_NOFILE, the plan line, host-limit warnings."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from service.config import Config, parse_args
from service.supervisor.plan import host_warnings, plan_line
from tests.support.service import ROOT, Service


@pytest.mark.timeout(90)
def test_auto_workers_for_100k_target_under_20000_nofile(tmp_path):
    svc = Service(tmp_path, "--workers", "auto", "--target-connections", "100000", nofile=20000)
    try:
        health = svc.wait_up(6, timeout=60)
        assert health["workers"] >= 6
        assert len(set(health["pids"])) == health["workers"]
        assert "nofile 20000/process → 6 workers for 100,000 target" in svc.log()
    finally:
        assert svc.stop() == 0, svc.log()


def test_plan_line_for_a_million():
    config = parse_args([], environ={})
    assert config.worker_count(nofile=20000, cpus=2) == 54  # 1.05 × 1,000,000 / 19,500
    assert plan_line(config, 20000, 54).startswith(
        "nofile 20000/process → 54 workers for 1,000,000 target"
    )
    assert config.worker_count(nofile=1_048_576, cpus=8) == 8


def test_host_warnings_name_the_sysctl():
    config = Config(target_connections=1_000_000, backlog=65535)
    low = {
        "file_max": 100_000,
        "conntrack_max": 262_144,
        "port_range": [32768, 60999],
        "tcp_mem": [100, 200, 300],
        "somaxconn": 4096,
    }
    text = "\n".join(host_warnings(config, 52, low))
    for name in (
        "fs.file-max",
        "net.netfilter.nf_conntrack_max",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_mem",
        "net.core.somaxconn",
    ):
        assert name in text
    tuned = {
        "file_max": 4_000_000,
        "conntrack_max": 2_000_000,
        "port_range": [1024, 65535],
        "tcp_mem": [1_000_000, 2_000_000, 3_000_000],
        "somaxconn": 65535,
    }
    small = Config(target_connections=50_000, backlog=65535)
    assert host_warnings(small, 4, tuned) == []
    # No conntrack module loaded (None) is not a problem.
    assert host_warnings(small, 4, {**tuned, "conntrack_max": None}) == []
    # Neither is a small table when the port skips tracking (host_tuning_notrack_ports).
    untracked = Config(target_connections=50_000, backlog=65535, port_untracked=True)
    assert host_warnings(untracked, 4, {**tuned, "conntrack_max": 262_144}) == []
    assert host_warnings(small, 4, {**tuned, "conntrack_max": 20_000}) != []


def test_help_lists_every_option_with_its_default():
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    options = out.split("options:", 1)[1]
    entries = {
        e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", options)[1:]
    }
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, f"{flag} missing from --help"
        assert "(default: " in entries[flag], entries[flag]
    for flag, default in (
        ("--workers", "auto"),
        ("--target-connections", "1000000"),
        ("--grace", "30.0"),
        ("--control-socket", "/run/comet/control.sock"),
        ("--screen", "auto"),
        ("--port", "8888"),
    ):
        assert f"(default: {default})" in entries[flag]


def test_environment_configures_the_supervisor():
    config = parse_args([], environ={"COMET_WORKERS": "3", "COMET_GRACE": "5"})
    assert config.worker_count() == 3 and config.grace == 5.0
    assert parse_args(["--workers", "2"], environ={"COMET_WORKERS": "3"}).workers == "2"


def test_defer_accept_defaults_to_one_second_and_a_bad_value_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_args([], environ={}).defer_accept == 1
    assert parse_args([], environ={"COMET_DEFER_ACCEPT": "0"}).defer_accept == 0
    for bad in ("-1", "3601"):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--defer-accept", bad], environ={})
        assert exc.value.code == 2
        assert "defer_accept: must be 0..3600 seconds" in capsys.readouterr().err


def test_handoff_parallel_follows_fanout_parallel_unless_set_and_rejects_a_negative(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_args([], environ={}).handoff_parallel == 0
    assert parse_args([], environ={"COMET_HANDOFF_PARALLEL": "3"}).handoff_parallel == 3
    for flag in ("--handoff-parallel", "--fanout-parallel"):
        with pytest.raises(SystemExit) as exc:
            parse_args([flag, "-1"], environ={})
        assert exc.value.code == 2
        assert "must be 0 (automatic) or more, got -1" in capsys.readouterr().err
