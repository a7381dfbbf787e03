"""benchmarks/nchan_compare.py at a small size: both servers reach every connection, take one
broadcast to all of them, and the script prints the medians and their ratio. (Its clients wait
for each connection to be held before dialling more: Nchan greets no one, so for it the first
bytes are the sign; a run that stops ramping is caught here, not on the day of a benchmark.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_broadcast_to_every_client_of_both_servers() -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "nchan_compare.py"),
            *("--conns", "1500", "--workers", "2", "--runs", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["conns"] == 1500 and summary["workers"] == 2, summary
    for kind in ("comet", "nchan"):
        (last,) = summary["runs"][kind]
        assert 0 < last < 30, summary  # every client got the one broadcast
    assert summary["ratio_comet_to_nchan"] > 0, summary
