"""4 real workers, 15,000 real connections: one broadcast through the control socket reaches all."""

from __future__ import annotations

import time

import pytest

from tests.support.net import wait_for
from tests.support.service import Clients, Service, sources

N = 15_000


@pytest.mark.timeout(180)
def test_broadcast_reaches_15000_connections_on_4_workers(tmp_path):
    svc = Service(tmp_path, "--workers", "4")
    clients = None
    try:
        health = svc.wait_up(4, with_frame=True)  # a stats question before it: not_ready
        assert len(set(health["pids"])) == 4
        clients = Clients(svc.port, N, 3, sources(2, 6), "--concurrency", "300")
        clients.wait("welcomed", N, timeout=90)

        def all_counted():
            frame = svc.ask({"op": "stats"})["frame"]
            return frame if frame["totals"]["conns"] == N else None

        frame = wait_for(all_counted, 15, "the frame to count every connection")
        per_worker = [w["conns"] for w in frame["workers"]]
        assert sum(per_worker) == N
        # SO_REUSEPORT hashes connections over the listeners: every worker holds a share.
        assert all(c > N // 10 for c in per_worker), per_worker

        answer = svc.ask({"op": "broadcast", "data": "BCAST hello", "channel": None, "event": None})
        assert answer["ok"] is True
        assert answer["recipients"] == N
        assert isinstance(answer["id"], int) and answer["id"] >= 1
        stats = clients.wait("msgs", N, timeout=30)
        assert stats["msgs"] == N

        channels = svc.ask({"op": "channels"})
        assert channels == {"ok": True, "channels": {"default": N}}

        # A second broadcast gets the next id, so every worker numbers alike.
        again = svc.ask({"op": "broadcast", "data": "BCAST again"})
        assert again["id"] == answer["id"] + 1 and again["recipients"] == N
        clients.wait("msgs", 2 * N, timeout=30)
        time.sleep(0.2)
        assert clients.stats()["msgs"] == 2 * N  # no duplicates
    finally:
        if clients is not None:
            clients.close()
        assert svc.stop() == 0, svc.log()
