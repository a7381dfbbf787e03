"""benchmarks/runqueue_waits.py reads the real workers' run-queue waits and cuts them by the
broadcast windows of a bench.json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.support.service import ROOT, Service

TOOL = ROOT / "benchmarks" / "runqueue_waits.py"


def test_samples_the_workers_of_one_service_and_reports_a_broadcast_window(tmp_path: Path) -> None:
    with Service(tmp_path / "svc", "--workers", "2") as svc:
        workers = {str(p) for p in svc.wait_up(2)["pids"]}
        other = Service(tmp_path / "other", "--workers", "1")  # not sampled: another port
        try:
            other.wait_up(1)
            out = tmp_path / "waits.jsonl"
            started = time.time()
            res = subprocess.run(
                [sys.executable, str(TOOL), "sample", "--seconds", "1.5", "--out", str(out),
                 "--port", str(svc.port)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert res.returncode == 0, res.stderr
        finally:
            other.stop()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 4  # every 0.25 s
    for t, row in rows:
        assert started <= t <= started + 10
        assert set(row) == workers, (row, workers)
        assert all(len(v) == 3 and min(v) >= 0 for v in row.values())
    first, last = rows[0][1], rows[-1][1]
    assert all(last[p][0] >= first[p][0] and last[p][2] >= first[p][2] for p in workers)
    bench = tmp_path / "bench.json"
    window = {"seq": 1, "published": started, "last_delivery_ms": 1400, "lag_p99_worker_ms": 10}
    bench.write_text(json.dumps({"broadcasts": [window]}))
    rep = subprocess.run(
        [sys.executable, str(TOOL), "report", str(bench), str(out)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    (line,) = rep.stdout.splitlines()
    got = json.loads(line)
    assert got["seq"] == 1 and got["lag_p99_worker_ms"] == 10
    assert got["wait_per_slice_ms"] >= 0 and got["worst_quarter_second_wait_ms"] >= 0
