"""The sidecar's edges as an attacker or a careless client meets them: text that is not
Unicode, bodies from strangers, oversized and slow request heads, and an OpenAPI document that
says it all."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from admin_api.server import GuardedH11Protocol

from .conftest import AUTH, ThreadedServer
from .fake_control import FakeControl

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body", [b'{"data": "\\ud800"}', b'{"data": "ok \\udfff"}', b'{"data": "\\ud83d x"}']
)
def test_unpaired_surrogate_is_422_naming_the_field(
    client: httpx.Client, fake: FakeControl, body: bytes
) -> None:
    r = client.post("/api/broadcast", headers={**AUTH, **JSON}, content=body)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "data"] and "surrogate" in err["msg"]
    assert fake.broadcasts == []
    # A real pair is fine: it is one character.
    r = client.post(
        "/api/broadcast", headers={**AUTH, **JSON}, content=b'{"data": "\\ud83d\\ude00"}'
    )
    assert r.status_code == 200 and fake.broadcasts[-1]["data"] == "\U0001f600"


def test_invalid_utf8_body_is_422(client: httpx.Client, fake: FakeControl) -> None:
    r = client.post("/api/broadcast", headers={**AUTH, **JSON}, content=b'{"data": "\xff\xfe"}')
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", 10] and "UTF-8" in err["msg"]
    assert fake.broadcasts == []


@pytest.mark.parametrize("body", [b"{not json", b'{"data": "\xff"}', b'{"data": 5}', b"x" * 100])
def test_authentication_comes_before_the_body(client: httpx.Client, body: bytes) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.post("/api/broadcast", headers={**headers, **JSON}, content=body)
        assert r.status_code == 401, (headers, body, r.text)
        assert "detail" in r.json() and "loc" not in r.text  # no parser details for strangers


def raw(admin: ThreadedServer, data: bytes, timeout: float = 15) -> bytes:
    with socket.create_connection(("127.0.0.1", admin.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_oversized_head_is_431(admin: ThreadedServer) -> None:
    big = raw(
        admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 10_000_000 + b"\r\n\r\n"
    )
    assert big.startswith(b"HTTP/1.1 431")
    many = b"".join(b"X-%d: v\r\n" % i for i in range(5000))
    resp = raw(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert resp.startswith(b"HTTP/1.1 431")
    # 101 small fields fit the byte cap; the field count cap answers them.
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(101))
    resp = raw(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert resp.startswith(b"HTTP/1.1 431") and b"header fields" in resp
    ok = raw(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


def test_slow_head_gets_408_and_idle_connection_is_closed(
    admin: ThreadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GuardedH11Protocol, "timeout_header", 1.0)
    with socket.create_connection(("127.0.0.1", admin.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        # Drip a byte every 0.2 s: the deadline does not move.
        resp = b""
        for _ in range(40):
            try:
                s.sendall(b"X")
            except OSError:
                break
            s.settimeout(0.2)
            try:
                resp += s.recv(4096)
            except TimeoutError:
                continue
            if resp:
                break
        assert resp.startswith(b"HTTP/1.1 408"), resp
        assert time.monotonic() - t0 < 4
    with socket.create_connection(("127.0.0.1", admin.port), timeout=10) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b""  # never spoke: closed quietly at the deadline
        assert time.monotonic() - t0 < 4
    # A keep-alive connection's next head is held to the deadline too.
    with socket.create_connection(("127.0.0.1", admin.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
        assert resp.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 4


def test_openapi_names_the_scheme_and_every_status(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    paths = doc["paths"]
    assert set(paths) >= {
        "/healthz",
        "/api/stats",
        "/api/stats/stream",
        "/api/channels",
        "/api/cluster",
        "/api/broadcast",
        "/metrics",
    }
    broadcast = paths["/api/broadcast"]["post"]
    assert broadcast["security"]
    assert set(broadcast["responses"]) >= {"200", "401", "413", "422", "431", "502", "503", "504"}
    for path in ("/api/stats", "/metrics", "/api/cluster"):
        assert set(paths[path]["get"]["responses"]) >= {"200", "401", "503", "504"}, path
