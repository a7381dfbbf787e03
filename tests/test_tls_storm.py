"""benchmarks/tls_storm.py at a small size: a TLS storm against --accept-rate, every connection
held in the end, the ones past the rate turned away without a handshake. Run here so the script
cannot rot."""

from __future__ import annotations

import json

import pytest

from tests.support.service import run_benchmark


@pytest.mark.timeout(180)
def test_a_storm_past_the_rate_is_held_in_the_end_with_a_handshake_per_held_connection() -> None:
    run = json.loads(
        run_benchmark("tls_storm.py", "--conns", "200", "--accept-rate", "100", timeout=150)
    )
    assert run["reached"] == 200, run
    assert run["turned_away"] > 0 and run["tls_failed"] == 0, run
    # A handshake only for a connection the rate let in (the rest cost the worker none).
    assert run["handshakes"] == 200, run
    assert run["client_errors"]["errors_req"] == run["turned_away"], run
    assert run["worker_cpu_s"] > 0
