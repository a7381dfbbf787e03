"""benchmarks/tls_storm.py at a small size: a TLS storm against --accept-rate, every connection
held in the end, the ones past the rate turned away without a handshake. Run here so the script
cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_a_storm_past_the_rate_is_held_in_the_end_with_a_handshake_per_held_connection() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tls_storm.py")]
        + ["--conns", "200", "--accept-rate", "100"],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert run["reached"] == 200, run
    assert run["turned_away"] > 0 and run["tls_failed"] == 0, run
    # A handshake only for a connection the rate let in (the rest cost the worker none).
    assert run["handshakes"] == 200, run
    assert run["client_errors"]["errors_req"] == run["turned_away"], run
    assert run["worker_cpu_s"] > 0
