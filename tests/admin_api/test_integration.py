"""The sidecar's real entry point against the real comet service (no test doubles)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.service import Service

from .processes import CurlClients, Sidecar, real_service, wait_for

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (./dev test)")


@pytest.fixture
def service(short_dir: Path) -> Iterator[Service]:
    with real_service(short_dir) as svc:
        yield svc


@pytest.fixture
def sidecar(short_dir: Path, service: Service) -> Iterator[Sidecar]:
    with Sidecar(short_dir, service.control_path) as admin:
        yield admin


def conns(admin: Sidecar) -> int:
    return int(httpx.get(admin.url + "/api/stats", headers=admin.auth).json()["totals"]["conns"])


def test_stats_broadcast_metrics_against_the_real_service(
    short_dir: Path, service: Service, sidecar: Sidecar
) -> None:
    health = httpx.get(sidecar.url + "/healthz").json()
    assert health["service"] == {**health["service"], "reachable": True, "workers": 1}
    with CurlClients(short_dir, f"http://127.0.0.1:{service.port}/", 3) as curls:
        wait_for(lambda: conns(sidecar) == 3, 20, "3 connections in the frame")
        wait_for(lambda: all("Welcome!" in t for t in curls.texts()), 10, "welcome lines")
        channels = httpx.get(sidecar.url + "/api/channels", headers=sidecar.auth).json()
        assert channels["channels"].get("default") == 3
        r = httpx.post(
            sidecar.url + "/api/broadcast", headers=sidecar.auth, json={"data": "integration-hello"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["recipients"] == 3 and r.json()["id"] >= 1
        wait_for(
            lambda: all("integration-hello\n" in t for t in curls.texts()),
            10,
            "the broadcast on every curl client",
        )
        text = httpx.get(sidecar.url + "/metrics", headers=sidecar.auth).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["comet_connections"].samples[0].value == 3
        worker = families["comet_worker_connections"].samples[0]
        assert worker.labels["worker"] == "0" and worker.value == 3
        assert families["comet_resident_memory_bytes"].samples[0].value > 1_000_000
        if "comet_worker_up" in families:  # the real supervisor reports slot state too
            assert families["comet_worker_up"].samples[0].value == 1


def test_stream_and_restart_of_the_real_service(
    short_dir: Path, service: Service, sidecar: Sidecar
) -> None:
    with httpx.Client(base_url=sidecar.url, headers=sidecar.auth, timeout=15) as client:
        with client.stream("GET", "/api/stats/stream") as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            frames = []
            for line in lines:
                if line.startswith("data: "):
                    frames.append(json.loads(line[6:]))
                    if len(frames) == 2:
                        break
            assert frames[1]["step"] > frames[0]["step"]
            assert frames[0]["workers"][0]["pid"] > 0

            service.stop()
            events = []
            for line in lines:
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events[-1] == "unavailable":
                        break
            assert "unavailable" in events
            r503 = client.get("/api/stats")
            assert r503.status_code == 503
            assert str(service.control_path) in r503.json()["detail"]

            # Same socket path, a new supervisor.
            with real_service(short_dir):
                resumed = None
                for line in lines:
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        if "step" in data:  # a frame, not the reconnected event's payload
                            resumed = data
                            break
                assert resumed is not None and resumed["uptime_s"] < 30
                ok = httpx.get(sidecar.url + "/api/stats", headers=sidecar.auth)
                assert ok.status_code == 200


def test_reload_through_the_api_moves_the_curl_clients(
    short_dir: Path, service: Service, sidecar: Sidecar
) -> None:
    """POST /api/reload answers what the reload did: the worker replaced, three curl streams
    handed over on their TCP connections (each curl still running and getting a broadcast
    after it)."""
    url = sidecar.url + "/api/reload"
    assert httpx.post(url).status_code == 401
    with CurlClients(short_dir, f"http://127.0.0.1:{service.port}/", 3) as curls:
        wait_for(lambda: conns(sidecar) == 3, 20, "3 connections in the frame")
        wait_for(lambda: all("Welcome!" in t for t in curls.texts()), 10, "welcome lines")
        before = set(service.ask({"op": "health"})["pids"])
        r = httpx.post(url, headers=sidecar.auth, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert {k: body[k] for k in ("workers", "reloaded", "handed", "failed")} == {
            "workers": 1,
            "reloaded": 1,
            "handed": 3,
            "failed": 0,
        }, body
        assert body["skipped"] == body["reconnecting"] == 0 and body["slots"][0]["handed"] == 3
        assert set(service.ask({"op": "health"})["pids"]).isdisjoint(before)
        sent = httpx.post(
            sidecar.url + "/api/broadcast", headers=sidecar.auth, json={"data": "after-reload"}
        )
        assert sent.status_code == 200 and sent.json()["recipients"] == 3, sent.text
        wait_for(lambda: all("after-reload\n" in t for t in curls.texts()), 10, "the broadcast")
        assert all(p.poll() is None for p in curls.procs)  # no stream ended
