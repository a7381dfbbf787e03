"""comet-plot from a CSV log written by the real supervisor while an agent held connections."""

from __future__ import annotations

import csv
import subprocess
import sys
import time

from tests.loadgen.conftest import ROOT, wait_until

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_from_a_real_supervisor_log(service, agents, tmp_path):
    a = agents("--port", str(service.port), "--n", "100", "--procs", "0")
    a.wait_clients(100)
    time.sleep(1.5)
    a.get("/set?n=300")
    a.wait_clients(300)

    def rows() -> list[dict[str, str]]:
        logs = sorted(service.log_dir.glob("*.csv"))
        if not logs:
            return []
        with open(logs[-1], newline="") as f:
            return list(csv.DictReader(f))

    wait_until(
        lambda: len(rows()) >= 4 and int(rows()[-1]["conns"]) == 300,
        20,
        "4 log rows ending at 300 connections",
    )
    log = sorted(service.log_dir.glob("*.csv"))[-1]
    out = tmp_path / "plots"
    r = subprocess.run(
        [sys.executable, "-m", "loadgen.plot", str(log), "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    for name in ("memory.png", "cpu.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
        assert str(out / name) in r.stdout


def test_plot_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = subprocess.run(
        [sys.executable, "-m", "loadgen.plot", str(bad), "-o", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "missing columns" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "loadgen.plot", str(tmp_path / "none.csv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "No such file" in r.stderr
