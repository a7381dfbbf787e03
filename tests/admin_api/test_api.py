"""Every route and error case of the sidecar, over real HTTP, against the fake control socket."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from admin_api.main import create_app

from .conftest import AUTH, TOKEN, ThreadedServer, make_settings
from .fake_control import FakeControl

PROTECTED = [
    ("GET", "/api/stats"),
    ("GET", "/api/stats/stream"),
    ("GET", "/api/channels"),
    ("POST", "/api/broadcast"),
    ("POST", "/api/tokens"),
    ("POST", "/api/reload"),
    ("GET", "/metrics"),
]


def test_healthz_needs_no_token_and_reports_the_service(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["service"]["reachable"] is True
    assert body["service"]["workers"] == 2


def test_healthz_says_unreachable_but_stays_200(client: httpx.Client, fake: FakeControl) -> None:
    fake.stop()
    r = client.get("/healthz")
    assert r.status_code == 200
    service = r.json()["service"]
    assert service["reachable"] is False
    assert str(fake.path) in service["error"]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer tëst"},
    ],
    ids=["missing", "wrong", "basic", "empty", "non-ascii"],
)
def test_protected_routes_need_the_token(
    client: httpx.Client, method: str, path: str, headers: dict[str, str]
) -> None:
    try:
        r = client.request(method, path, headers=headers, json={"data": "x"})
    except UnicodeEncodeError:
        # httpx refuses to send non-latin-1 headers; send the raw bytes instead.
        r = client.request(
            method, path, headers={"Authorization": "Bearer tëst".encode()}, json={"data": "x"}
        )
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "detail" in r.json()


def test_stats_returns_the_frame(client: httpx.Client, fake: FakeControl) -> None:
    r = client.get("/api/stats", headers=AUTH)
    assert r.status_code == 200
    frame = r.json()
    assert frame["totals"]["conns"] == 7
    assert [w["conns"] for w in frame["workers"]] == [3, 4]
    for key in ("t", "step", "uptime_s", "target_connections", "system"):
        assert key in frame
    fake.set_conns(10, 20)
    assert client.get("/api/stats", headers=AUTH).json()["totals"]["conns"] == 30


def test_channels(client: httpx.Client, fake: FakeControl) -> None:
    fake.channels["news"] = 5
    r = client.get("/api/channels", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"channels": {"default": 7, "news": 5}}


def test_broadcast_reaches_the_service(client: httpx.Client, fake: FakeControl) -> None:
    r = client.post("/api/broadcast", headers=AUTH, json={"data": "hello\nworld"})
    assert r.status_code == 200
    assert r.json() == {"id": 1, "recipients": 7}
    fake.channels["news"] = 5
    r = client.post(
        "/api/broadcast", headers=AUTH, json={"data": "x", "channel": "news", "event": "tick"}
    )
    assert r.json() == {"id": 2, "recipients": 5}
    assert [(m["data"], m["channel"], m["event"]) for m in fake.broadcasts] == [
        ("hello\nworld", None, None),
        ("x", "news", "tick"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"data": 5}',
        b'{"data": null}',
        b'{"channel": "news"}',
        b'{"data": "x", "channel": "bad channel"}',
        b'{"data": "x", "channel": ""}',
        b'{"data": "x", "channel": "' + b"c" * 65 + b'"}',
        b'{"data": "x", "event": "line\\nbreak"}',
        b'{"data": "x", "channel": 7}',
        b'{"data": "x", "extra": 1}',
    ],
)
def test_broadcast_bad_input_is_422(client: httpx.Client, fake: FakeControl, body: bytes) -> None:
    r = client.post(
        "/api/broadcast", headers={**AUTH, "Content-Type": "application/json"}, content=body
    )
    assert r.status_code == 422, r.text
    assert fake.broadcasts == []


def test_broadcast_channel_names_the_service_accepts(client: httpx.Client) -> None:
    for name in ("a", "A-z_0.9:x", "c" * 64):
        r = client.post("/api/broadcast", headers=AUTH, json={"data": "x", "channel": name})
        assert r.status_code == 200, (name, r.text)


def test_broadcast_over_the_cap_is_413(client: httpx.Client, fake: FakeControl) -> None:
    # make_settings caps data at 1024 bytes; count UTF-8 bytes, not characters.
    assert client.post("/api/broadcast", headers=AUTH, json={"data": "x" * 1024}).status_code == 200
    r = client.post("/api/broadcast", headers=AUTH, json={"data": "x" * 1025})
    assert r.status_code == 413
    assert "1024" in r.json()["detail"]
    r = client.post("/api/broadcast", headers=AUTH, json={"data": "é" * 513})  # 1026 bytes
    assert r.status_code == 413
    assert len(fake.broadcasts) == 1


def test_huge_bodies_are_refused_before_reading(client: httpx.Client, fake: FakeControl) -> None:
    big = json.dumps({"data": "x" * 200_000}).encode()
    r = client.post(
        "/api/broadcast", headers={**AUTH, "Content-Type": "application/json"}, content=big
    )
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit must hold for chunked bodies too
        yield b'{"data": "'
        for _ in range(50):
            yield b"x" * 10_000
        yield b'"}'

    r = client.post(
        "/api/broadcast", headers={**AUTH, "Content-Type": "application/json"}, content=chunks()
    )
    assert r.status_code == 413
    assert fake.broadcasts == []


def test_service_refusal_is_502_with_its_reason(client: httpx.Client, fake: FakeControl) -> None:
    fake.fail_with = "something the sidecar did not expect"
    r = client.post("/api/broadcast", headers=AUTH, json={"data": "x"})
    assert r.status_code == 502
    assert "something the sidecar did not expect" in r.json()["detail"]


@pytest.mark.parametrize("code", ["stopping", "not_ready", "bus_unavailable"])
def test_a_refusal_a_retry_may_cure_is_503_by_its_code(
    client: httpx.Client, fake: FakeControl, code: str
) -> None:
    """The sidecar reads the refusal's ``code``, never its text (which is for people)."""
    fake.fail_with = "bus unavailable: text that no longer decides anything"
    fake.fail_code = code
    r = client.post("/api/broadcast", headers=AUTH, json={"data": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    fake.fail_code = "bad_request"
    assert client.post("/api/broadcast", headers=AUTH, json={"data": "x"}).status_code == 502


def test_reload_answers_what_the_service_did_409_when_it_cannot_and_502_when_unreadable(
    client: httpx.Client, fake: FakeControl
) -> None:
    r = client.post("/api/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {k: v for k, v in fake.reload_answer.items() if k != "ok"}
    assert [q["op"] for q in fake.requests if q.get("op") == "reload"] == ["reload"]
    fake.fail_with, fake.fail_code = "a reload is under way already", "conflict"
    r = client.post("/api/reload", headers=AUTH)
    assert r.status_code == 409 and r.json() == {"detail": "a reload is under way already"}
    fake.fail_with, fake.fail_code = None, "bad_request"
    fake.reload_answer = {"ok": True, "workers": 2}  # a service that answers less than this knows
    r = client.post("/api/reload", headers=AUTH)
    assert r.status_code == 502 and "lacks a field" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("method", "path"), [p for p in PROTECTED if p[1] not in ("/api/stats/stream", "/api/tokens")]
)
def test_unreachable_service_is_503_naming_the_socket(
    client: httpx.Client, fake: FakeControl, method: str, path: str
) -> None:
    fake.stop()
    r = client.request(method, path, headers=AUTH, json={"data": "x"})
    assert r.status_code == 503
    detail = r.json()["detail"]
    assert str(fake.path) in detail
    assert "no such socket" in detail
    assert "Traceback" not in r.text


def test_stale_socket_file_is_503_connection_refused(
    client: httpx.Client, fake: FakeControl
) -> None:
    import socket as socketlib

    fake.stop()
    # A socket file nobody listens on: what a killed supervisor leaves behind.
    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(str(fake.path))
    stale.close()
    r = client.get("/api/stats", headers=AUTH)
    assert r.status_code == 503
    assert "refused" in r.json()["detail"]


def test_stream_503_when_service_is_down(client: httpx.Client, fake: FakeControl) -> None:
    fake.stop()
    r = client.get("/api/stats/stream", headers=AUTH)
    assert r.status_code == 503
    assert str(fake.path) in r.json()["detail"]


class Events:
    """SSE events (dicts of field -> value) read from one streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()

    def read(self, count: int, timeout: float = 10.0) -> list[dict]:
        events: list[dict] = []
        current: dict = {}
        deadline = time.monotonic() + timeout
        for line in self.lines:
            assert time.monotonic() < deadline, f"only {len(events)} events in {timeout} s"
            if line == "":
                if current:
                    events.append(current)
                    current = {}
                    if len(events) >= count:
                        return events
                continue
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
        raise AssertionError("stream ended")


def read_events(response: httpx.Response, count: int, timeout: float = 10.0) -> list[dict]:
    """The next ``count`` events of the stream."""
    if not hasattr(response, "_events"):
        response._events = Events(response)  # type: ignore[attr-defined]
    return response._events.read(count, timeout)  # type: ignore[attr-defined]


def each_event(response: httpx.Response, limit: int, timeout: float = 10.0):
    """Up to ``limit`` events, one at a time (for loops that stop at the one they look for)."""
    deadline = time.monotonic() + timeout
    for _ in range(limit):
        yield read_events(response, 1, max(0.1, deadline - time.monotonic()))[0]


def test_stream_sends_frames(client: httpx.Client, fake: FakeControl) -> None:
    with client.stream("GET", "/api/stats/stream", headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        events = read_events(r, 4)
        assert events[0] == {"retry": "2000"}
        frames = [json.loads(e["data"]) for e in events[1:]]
        steps = [f["step"] for f in frames]
        assert steps == sorted(steps) and len(set(steps)) == 3
        fake.set_conns(50, 60)
        for event in each_event(r, 10):
            if json.loads(event["data"])["totals"]["conns"] == 110:
                break
        else:
            raise AssertionError("the stream never showed the new connection count")


def test_viewers_share_one_watch_connection(client: httpx.Client, fake: FakeControl) -> None:
    with (
        client.stream("GET", "/api/stats/stream", headers=AUTH) as a,
        client.stream("GET", "/api/stats/stream", headers=AUTH) as b,
        client.stream("GET", "/api/stats/stream", headers=AUTH) as c,
    ):
        for r in (a, b, c):
            assert len(read_events(r, 3)) == 3
        assert fake.watchers == 1


def test_stream_survives_a_service_restart(client: httpx.Client, fake: FakeControl) -> None:
    with client.stream("GET", "/api/stats/stream", headers=AUTH) as r:
        read_events(r, 2)
        fake.stop()
        names = []
        for event in each_event(r, 20):
            names.append(event.get("event", "frame"))
            if event.get("event") == "unavailable":
                assert str(fake.path) in event["data"]
                break
        else:
            raise AssertionError(f"no 'unavailable' event, got {names}")
        assert client.get("/api/stats", headers=AUTH).status_code == 503
        fake.set_conns(8, 9)
        fake.start()  # the service comes back on the same socket path
        seen_reconnected = False
        for event in each_event(r, 30, timeout=15):
            if event.get("event") == "reconnected":
                seen_reconnected = True
            elif "event" not in event and seen_reconnected:
                assert json.loads(event["data"])["totals"]["conns"] == 17
                break
        else:
            raise AssertionError("frames did not resume after the restart")
    assert client.get("/api/stats", headers=AUTH).status_code == 200
    assert client.get("/healthz").json()["service"]["reachable"] is True


def test_metrics_parse_as_prometheus_text(client: httpx.Client, fake: FakeControl) -> None:
    fake.set_conns(100, 250)
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(metric: str, **labels: str) -> float:
        for sample in families[metric].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        raise AssertionError(f"{metric}{labels} missing")

    assert families["comet_connections"].type == "gauge"
    assert value("comet_connections") == 350
    assert value("comet_worker_connections", worker="0", pid="40000") == 100
    assert value("comet_worker_connections", worker="1", pid="40001") == 250
    assert families["comet_accepted_connections"].type == "counter"
    assert value("comet_accepted_connections") == fake.accepted_total
    assert families["comet_messages_sent"].type == "counter"
    assert value("comet_resident_memory_bytes") > 0
    assert value("comet_worker_resident_memory_bytes", worker="1") > 0
    assert value("comet_cpu_percent") >= 0
    assert value("comet_worker_cpu_percent", worker="0") == 1.5
    assert value("comet_loop_lag_seconds", stat="p90") == pytest.approx(0.001)
    assert value("comet_worker_loop_lag_seconds", worker="1", stat="max") == pytest.approx(0.0035)
    lag = families["comet_loop_lag_histogram_seconds"]
    assert lag.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in lag.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 900 and buckets["0.002"] == 990 and buckets["5.0"] == 990
    assert buckets["+Inf"] == 1000 and len(buckets) == 17
    assert value("comet_system_cpu_percent", mode="idle") == 80.0
    assert value("comet_system_memory_bytes", kind="total") == 24 * 2**30
    assert value("comet_open_fds") == 390
    assert value("comet_fd_limit") == 20000
    assert value("comet_host_limit", name="ephemeral_ports") == 60999 - 32768 + 1
    assert value("comet_sockstat", key="tcp_inuse") == 355
    assert value("comet_workers") == 2
    assert value("comet_node_info", node_id="fake-node") == 1
    # Each scrape reflects the service now, not state kept in a global registry.
    fake.set_conns(1, 1)
    again = {
        f.name: f for f in text_string_to_metric_families(client.get("/metrics", headers=AUTH).text)
    }
    assert again["comet_connections"].samples[0].value == 2


def test_metrics_tolerate_a_sparse_frame(client: httpx.Client, fake: FakeControl) -> None:
    original = fake.frame
    fake.frame = lambda: {"t": 1.0, "totals": {"conns": 3, "lag_ms": None}, "workers": [7]}
    try:
        r = client.get("/metrics", headers=AUTH)
    finally:
        fake.frame = original
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "comet_connections" in names


def test_dashboard_page_and_vendored_assets(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    for asset in (
        "/static/app.js",
        "/static/app.css",
        "/static/vendor/uPlot.iife.min.js",
        "/static/vendor/uPlot.min.css",
    ):
        assert asset in page
        assert client.get(asset).status_code == 200
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    licence = client.get("/static/vendor/uPlot.LICENSE")
    assert licence.status_code == 200 and "MIT" in licence.text
    assert client.get("/docs").status_code == 404


def test_wedged_service_is_504(fake: FakeControl) -> None:
    fake.hang_ops = {"broadcast"}
    settings = make_settings(fake.path).model_copy(update={"broadcast_timeout": 0.3})
    with ThreadedServer(create_app(settings)) as admin, httpx.Client(base_url=admin.url) as c:
        r = c.post("/api/broadcast", headers=AUTH, json={"data": "x"})
        assert r.status_code == 504
        assert "'broadcast'" in r.json()["detail"]
        assert str(fake.path) in r.json()["detail"]
        # Other requests still work: each has its own connection.
        assert c.get("/api/stats", headers=AUTH).status_code == 200
