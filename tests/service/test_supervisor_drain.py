"""SIGTERM with 5,000 live connections: drain within the grace period, clients get a retry hint."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.service import Clients, Service, sources

N = 5_000
GRACE = 6.0


@pytest.mark.timeout(120)
def test_sigterm_drains_5000_sse_clients_within_grace(tmp_path):
    svc = Service(tmp_path, "--workers", "2", "--grace", str(GRACE))
    clients = None
    try:
        svc.wait_up(2)
        clients = Clients(svc.port, N, 2, sources(30, 4), "--sse")
        before = clients.wait("welcomed", N, timeout=60)
        hints_before = before["retries"]
        assert hints_before == N  # the opening `retry:` of each SSE stream

        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(GRACE + 5)
        took = time.monotonic() - t0
        assert code == 0, svc.log()
        assert took <= GRACE + 1.0, f"drain took {took:.1f} s for a grace of {GRACE} s"

        after = clients.wait("closed", N, timeout=10)
        # Every stream got a fresh `retry:` (jittered by the worker) and a reconnect event.
        assert after["retries"] - hints_before == N, after
        assert after["reconnects"] == N, after
        # Jittered: the hints differ, so the reconnects spread instead of arriving at once.
        assert len(set(after["retry_values"])) >= 3, after["retry_values"]
        assert "draining 2 workers" in svc.log()
    finally:
        if clients is not None:
            clients.close()
        svc.stop()


@pytest.mark.timeout(60)
def test_sigint_also_drains_and_exits_0(tmp_path):
    svc = Service(tmp_path, "--workers", "1", "--grace", "3")
    try:
        svc.wait_up(1)
        svc.proc.send_signal(signal.SIGINT)
        assert svc.proc.wait(8) == 0, svc.log()
    finally:
        svc.stop()


@pytest.mark.timeout(120)
def test_sigterm_while_the_workers_start_stops_at_once(tmp_path):
    """SIGTERM after the supervisor is up and before its workers are (a Ctrl-C right after
    the start, a `docker stop` of a container just started): the workers that come up after it
    are told to drain then, instead of running out the grace and being killed."""
    from pathlib import Path

    svc = Service(tmp_path, "--workers", "2", "--grace", "30")
    try:
        cmdline = Path(f"/proc/{svc.proc.pid}/cmdline")
        deadline = time.monotonic() + 20
        # The title is set just before the workers are started (service/proctitle.py).
        while not cmdline.read_bytes().startswith(b"comet-service: supervisor"):
            assert time.monotonic() < deadline and svc.proc.poll() is None, svc.log()
            time.sleep(0.005)
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(30)
        took = time.monotonic() - t0
        log = svc.log()
        assert code == 0, log
        assert took < 10, f"stopping took {took:.1f} s\n{log}"
        assert "did not drain in time" not in log and "killing" not in log, log
    finally:
        svc.stop()
