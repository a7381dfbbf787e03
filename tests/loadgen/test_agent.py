"""The agent against the real service: ramps, control API, latency, reconnect after a restart."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import psutil

from tests.loadgen.conftest import Service, control, get_json, start_service, wait_for


def server_conns(svc: Service) -> int:
    frame = control(svc.control_path, {"op": "stats"}).get("frame") or {}
    return int((frame.get("totals") or {}).get("conns", -1))


def test_agent_ramps_up_down_and_to_zero_against_the_service(service, agents):
    a = agents(
        "--host", "127.0.0.1", "--port", str(service.port), "--n", "300", "--concurrency", "50"
    )
    s = a.wait_clients(300)
    assert s["errors_req"] == 0 and s["errors_resp"] == 0
    assert s["procs"] == 1  # auto: 300 connections fit in one engine process
    wait_for(lambda: server_conns(service) == 300, 15, "the service to count 300")
    # Every stream starts with Welcome! and pings every second (--ping-interval 1).
    before = a.stats()["msgs_total"]
    assert before >= 300
    wait_for(lambda: a.stats()["msgs_total"] >= before + 300, 10, "pings to arrive")

    status, cfg = a.get("/set?n=100")
    assert status == 200 and cfg["n"] == 100
    s = a.wait_clients(100)
    assert s["ended_req"] == 0  # the surplus was aborted by us, not ended by the server
    wait_for(lambda: server_conns(service) == 100, 15, "the service to count 100")

    status, cfg = a.get("/set?n=0")
    assert status == 200
    a.wait_clients(0)
    wait_for(lambda: server_conns(service) == 0, 15, "the service to count 0")

    status, _ = a.get("/set?n=250&concurrency=10")
    assert status == 200
    s = a.wait_clients(250)
    assert s["config"]["concurrency"] == 10


def test_timed_broadcasts_give_latency_and_last_delivery(service, agents):
    a = agents("--port", str(service.port), "--n", "200")
    a.wait_clients(200)
    sent = []
    for seq in (1, 2, 3):
        ts = time.time()
        answer = control(
            service.control_path,
            {
                "op": "broadcast",
                "channel": None,
                "event": None,
                "data": json.dumps({"ts": ts, "seq": seq}),
            },
        )
        assert answer["ok"] and answer["recipients"] >= 200
        sent.append(ts)
    control(
        service.control_path,
        {"op": "broadcast", "data": "not timed", "channel": None, "event": None},
    )
    s = wait_for(
        lambda: (st := a.stats())["latency_ms"]["count"] >= 600 and st, 15, "600 timed deliveries"
    )
    lat = s["latency_ms"]
    assert lat["count"] == 600
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 10_000
    assert set(s["last_delivery"]) == {"1", "2", "3"}
    assert s["deliveries"] == {"1": 200, "2": 200, "3": 200}
    for seq, ts in zip((1, 2, 3), sent, strict=True):
        assert ts <= s["last_delivery"][str(seq)] < ts + 10
    # Coalescing engines (an agent on the service's own box) still read every delivery.
    status, config = a.get("/set?coalesce=0.05")
    assert status == 200 and config["coalesce"] == 0.05 and config["n"] == 200, config
    ts = time.time()
    control(
        service.control_path,
        {
            "op": "broadcast",
            "channel": None,
            "event": None,
            "data": json.dumps({"ts": ts, "seq": 4}),
        },
    )
    s = wait_for(lambda: (st := a.stats())["deliveries"].get("4") == 200 and st, 15, "seq 4")
    assert s["config"]["coalesce"] == 0.05 and ts <= s["last_delivery"]["4"] < ts + 10


def test_control_api_and_bad_input(fixture_server, agents):
    a = agents("--port", str(fixture_server), "--n", "20", "--procs", "0")
    a.wait_clients(20)
    s = a.stats()
    for key in (
        "clients",
        "inproc",
        "errors_req",
        "errors_resp",
        "ended_req",
        "msgs_total",
        "bytes_total",
        "latency_ms",
        "last_delivery",
        "config",
    ):
        assert key in s
    assert s["config"] == {
        "n": 20,
        "host": "127.0.0.1",
        "port": fixture_server,
        "path": "/",
        "concurrency": 100,
        "head_timeout": 10.0,
        "tls": False,
        "tls_ca": "",
        "coalesce": 0.0,
    }
    for query, name in (
        ("tls=yes", "tls"),
        ("coalesce=0.5", "coalesce"),
        ("coalesce=soon", "coalesce"),
        ("n=abc", "n"),
        ("n=-1", "n"),
        ("port=0", "port"),
        ("port=x", "port"),
        ("concurrency=0", "concurrency"),
        ("path=nope", "path"),
        ("host=a%20b", "host"),
        ("bogus=1", "bogus"),
    ):
        status, body = a.get(f"/set?{query}")
        assert status == 400, query
        assert body["param"] == name and body["error"].startswith(name + ":"), body
    # A rejected /set changes nothing.
    assert a.stats()["config"]["n"] == 20
    status, body = a.get("/nope")
    assert status == 404 and "error" in body
    status, body = a.get("/healthz")
    assert status == 200 and body["ok"] and body["dead"] == 0 and body["n"] == 20, body
    req = urllib.request.Request(a.url + "/set?n=1", method="POST")
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("POST accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and e.headers["Allow"] == "GET, HEAD"
    # /restart drops and reconnects: the fixture sees new connections, the agent gets back to n.
    status, body = a.get("/restart")
    assert status == 200 and body["ok"]
    a.wait_clients(20)
    # Retargeting to a path the server rejects counts response errors, not clients.
    status, _ = a.get("/set?path=/bad")
    assert status == 200
    wait_for(lambda: a.stats()["errors_resp"] >= 20, 10, "404s counted as errors_resp")
    assert a.stats()["clients"] == 0


def test_connections_come_from_the_source_range(fixture_server, agents):
    a = agents("--port", str(fixture_server), "--n", "60", "--source-ips", "127.0.0.2-127.0.0.4")
    a.wait_clients(60)
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"dport = :{fixture_server}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sources = {line.split()[2].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}
    assert sources == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}


def test_fixed_procs_spread_the_connections(fixture_server, agents):
    a = agents("--port", str(fixture_server), "--n", "90", "--procs", "3")
    s = a.wait_clients(90)
    assert s["procs"] == 3
    children = psutil.Process(a.proc.pid).children()
    assert len(children) == 3


def test_a_killed_engine_process_is_replaced(fixture_server, agents):
    a = agents("--port", str(fixture_server), "--n", "100", "--procs", "2")
    a.wait_clients(100)
    victim = psutil.Process(a.proc.pid).children()[0]
    victim.kill()
    # /healthz asks no engine, so it sees the dead one until a GET / replaces it.
    wait_for(lambda: a.get("/healthz")[0] == 503, 10, "/healthz reporting the dead engine")
    assert a.get("/healthz")[1]["dead"] == 1
    s = a.wait_clients(100, timeout=30)
    assert s["procs"] == 2 and s["engine_restarts"] == 1
    assert a.get("/healthz") == (200, {"ok": True, "procs": 2, "dead": 0, "n": 100})
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert s["msgs_total"] >= 100  # the dead process's counts are kept


def test_service_restart_mid_run_agent_reconnects_to_n(tmp_path, agents):
    svc = start_service(tmp_path)
    try:
        a = agents("--port", str(svc.port), "--n", "200", "--concurrency", "50")
        a.wait_clients(200)
        svc.stop()  # SIGTERM: the workers drain and close every stream
        wait_for(lambda: a.stats()["clients"] == 0, 20, "the agent to see the streams end")
        ended = a.stats()["ended_req"]
        assert ended >= 200
        # The agent retries (and counts errors_req) while nothing listens.
        wait_for(lambda: a.stats()["errors_req"] > 0, 10, "the agent to count refused connects")
        svc = start_service(tmp_path, port=svc.port)
        s = a.wait_clients(200, timeout=60)
        assert s["ended_req"] == ended
        wait_for(lambda: server_conns(svc) == 200, 15, "the new service to count 200")

        # A worker crash: the supervisor restarts it and the agent climbs back to n again.
        assert svc.proc is not None
        worker = psutil.Process(svc.proc.pid).children()[0]
        worker.kill()
        wait_for(lambda: a.stats()["ended_req"] >= ended + 200, 20, "the streams to end")
        a.wait_clients(200, timeout=60)
    finally:
        svc.stop()


def test_agent_help_and_bad_flags():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "loadgen", "agent", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--n",
        "--host",
        "--port",
        "--path",
        "--concurrency",
        "--control-port",
        "--procs",
        "--source-ips",
    ):
        assert flag in out
    bad = subprocess.run(
        [sys.executable, "-m", "loadgen", "agent", "--source-ips", "1.2.3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "source-ips" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unreachable_target_counts_errors(agents):
    from tests.loadgen.conftest import free_port

    a = agents("--port", str(free_port()), "--n", "10", "--procs", "0")
    wait_for(lambda: a.stats()["errors_req"] >= 10, 10, "connect errors")
    s = a.stats()
    assert s["clients"] == 0
    # Backoff: failures are retried politely, not in a hot loop.
    e1 = s["errors_req"]
    time.sleep(2)
    assert a.stats()["errors_req"] - e1 < 200
    _, body = get_json(a.url + "/")
    assert body["config"]["n"] == 10
