"""comet-plot from a CSV log written by the real supervisor while an agent held connections."""

from __future__ import annotations

import csv
import subprocess
import sys
import time

from tests.loadgen.conftest import ROOT, wait_for

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

    wait_for(
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


def _write_run(path, start: float, seconds: int, first_step: int = 1) -> None:
    from service.supervisor.csvlog import COLUMNS

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for i in range(seconds):
            row = dict.fromkeys(COLUMNS, "1")
            row.update(step=str(first_step + i), t=str(start + i), conns=str(10 * i))
            w.writerow(row)


def test_two_runs_get_a_pair_of_graphs_each_not_one_stitched_axis(tmp_path):
    from loadgen.plot import read_log, split_runs

    first, second = tmp_path / "comet-a.csv", tmp_path / "comet-b.csv"
    _write_run(first, 1_800_000_000.0, 30)
    _write_run(second, 1_800_000_000.0 + 18 * 60, 20)  # 18 minutes later
    # Given in the wrong order: rows are put in time order, then split at the gap.
    runs = split_runs(read_log([str(second), str(first)]))
    assert [len(r["t"]) for r in runs] == [30, 20]
    out = tmp_path / "plots"
    r = subprocess.run(
        [sys.executable, "-m", "loadgen.plot", str(first), str(second), "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and not (out / "memory.png").exists(), written
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1_800_000_000.0))
    assert f"memory-{stamp}.png" in written and f"cpu-{stamp}.png" in written
    # One run spread over two files (a rotation: the older rows in .1) stays one run.
    older, newer = tmp_path / "comet-c.csv.1", tmp_path / "comet-c.csv"
    _write_run(older, 1_800_000_000.0, 30)
    _write_run(newer, 1_800_000_030.0, 30, first_step=31)
    (run,) = split_runs(read_log([str(newer), str(older)]))
    assert run["step"] == [float(i) for i in range(1, 61)]
