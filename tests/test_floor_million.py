"""benchmarks/floor_million.sh at a small size: the bare servers share one port, comet-bench
drives them as it drives the service, and each timed broadcast it publishes (a line in a file,
then SIGUSR1) reaches every client. The bench reads the bare servers as "the service" (the
processes listening on the port), so the floor's CPU while holding is reported like the
service's. Nothing is left listening afterwards."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from loadgen.bench.service import listening_pids
from tests.support.net import bench_namespaces, free_port, wait_for
from tests.support.service import ROOT, reaped


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "netns",
    [
        pytest.param(0, id="loopback"),
        pytest.param(
            2,
            id="netns",
            marks=pytest.mark.skipif(
                os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"
            ),
        ),
    ],
)
def test_the_floor_takes_the_million_runs_broadcasts(tmp_path, netns: int) -> None:
    """With --netns the clients are in namespaces of their own and the bare servers listen on
    the bridge's address, bound before the bench adds it."""
    port = free_port()
    out = tmp_path / "floor"
    env = {
        **os.environ,
        **{"FLOOR_PROCS": "3", "FLOOR_PORT": str(port), "FLOOR_PING": "0.5", "FLOOR_TUNE": "0"},
    }
    size = (
        "--conns", "1500", "--rate", "3000", "--concurrency", "50", "--procs", "2",
        "--hold", "2", "--broadcasts", "2", "--broadcast-gap", "0.5",
        "--broadcast-timeout", "20", "--ramp-timeout", "60",
    )  # fmt: skip
    if netns:
        size += ("--netns", str(netns))
    res = subprocess.run(
        [str(ROOT / "benchmarks" / "floor_million.sh"), str(out), *size],
        capture_output=True,
        text=True,
        timeout=160,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    host = "10.77.0.1" if netns else "127.0.0.1"
    assert report["held"] == 1500 and report["target"] == f"http://{host}:{port}/", report
    if netns:
        assert report["netns"]["namespaces"] == netns and report["client_procs"] == 2, report
    assert len(report["broadcasts"]) == 2
    for b in report["broadcasts"]:
        # Timed by the clients: the bare servers sent the bench's own line, not their BCAST.
        assert b["delivered"] == 1500 and 0 < b["last_delivery_ms"] < 20_000, b
    # The three bare servers are what the bench measured as the server: their pings (every
    # 0.5 s here) cost them CPU through the hold, and the clients reading them too.
    hc = report["hold_cpu"]
    assert hc["service_pct_of_core"] > 0 and hc["load_generator_pct_of_core"] > 0, hc
    wait_for(lambda: not listening_pids(port), 10, "the script's bare servers to be gone")
    assert bench_namespaces() == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_busy_port_is_named_before_anything_starts(tmp_path) -> None:
    port = free_port()
    script = (
        f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen();"
        " print('up', flush=True); time.sleep(60)"
    )
    with reaped(
        subprocess.Popen(["python3", "-c", script], stdout=subprocess.PIPE, text=True)
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        env = {**os.environ, "FLOOR_PORT": str(port), "FLOOR_TUNE": "0"}
        res = subprocess.run(
            [str(ROOT / "benchmarks" / "floor_million.sh"), str(tmp_path / "x")],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=env,
        )
    assert res.returncode == 2 and f"port {port} is in use" in res.stderr, res.stderr
