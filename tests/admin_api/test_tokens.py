"""``POST /api/tokens``: the sidecar mints a subscriber token that a real worker accepts for a
private channel (HS256 from the shared secret, ES256 from a private key)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from admin_api.main import create_app
from tests.service.worker_harness import read_until, request, running_worker, status_of, subscribe

from .conftest import AUTH, ThreadedServer, make_settings
from .fake_control import FakeControl

SECRET = "a-shared-secret-of-at-least-32-bytes!"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    return f


def sidecar(fake: FakeControl, **extra: object) -> ThreadedServer:
    return ThreadedServer(create_app(make_settings(fake.path, **extra)))


def test_a_minted_token_opens_a_private_channel(
    fake: FakeControl, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMET_TOKEN_SECRET", SECRET)  # the worker's side of the same secret
    with (
        sidecar(fake, subscriber_secret_file=secret_file, subscriber_token_max_ttl=60) as admin,
        running_worker(private_channels="private-*") as w,
    ):
        r = httpx.post(
            f"{admin.url}/api/tokens",
            headers=AUTH,
            json={"channels": ["private-*"], "ttl": 3600, "sub": "curl"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["alg"] == "HS256"
        assert body["exp"] - time.time() <= 61  # capped by subscriber_token_max_ttl
        claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
        assert claims["sub"] == "curl" and claims["channels"] == ["private-*"]
        s = subscribe(w, f"/sub/private-demo?token={body['token']}")
        assert b"Welcome!" in read_until(s, b"Welcome!")
        s.close()
        other = httpx.post(f"{admin.url}/api/tokens", headers=AUTH, json={"channels": ["team"]})
        tok = other.json()["token"]
        resp = request(
            w.port, f"GET /sub/private-demo?token={tok} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        )
        assert status_of(resp) == 403


def test_a_rotation_signs_with_the_first_line(fake: FakeControl, tmp_path: Path) -> None:
    """The secret file during a rotation (new secret first, the old one after it, as the service
    reads it): minted tokens are signed with the new one only."""
    new = "the-new-secret-of-at-least-32-bytes!!"
    f = tmp_path / "secret"
    f.write_text(f"{new}\n{SECRET}\n")
    with sidecar(fake, subscriber_secret_file=f) as admin:
        r = httpx.post(f"{admin.url}/api/tokens", headers=AUTH, json={"channels": ["p-*"]})
        assert r.status_code == 200, r.text
        tok = r.json()["token"]
        assert jwt.decode(tok, new, algorithms=["HS256"])["channels"] == ["p-*"]
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(tok, SECRET, algorithms=["HS256"])


def test_es256_from_a_private_key(fake: FakeControl, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(pem)
    with sidecar(fake, subscriber_private_key_file=tmp_path / "key.pem") as admin:
        r = httpx.post(f"{admin.url}/api/tokens", headers=AUTH, json={"channels": ["a"]})
    assert r.status_code == 200 and r.json()["alg"] == "ES256"
    jwt.decode(r.json()["token"], key.public_key(), algorithms=["ES256"])


@pytest.fixture
def unconfigured(fake: FakeControl, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedServer]:
    monkeypatch.delenv("COMET_TOKEN_SECRET", raising=False)
    with sidecar(fake) as admin:
        yield admin


def test_without_a_key_it_is_503_naming_the_settings(unconfigured: ThreadedServer) -> None:
    r = httpx.post(f"{unconfigured.url}/api/tokens", headers=AUTH, json={"channels": ["a"]})
    assert r.status_code == 503
    assert "COMET_ADMIN_SUBSCRIBER_SECRET_FILE" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"channels": []},
        {"channels": ["bad name"]},
        {"channels": ["a"], "ttl": 0},
        {"channels": ["a"], "ttl": "5"},
        {"channels": ["a"], "ttl": 5.5},
        {"channels": ["a"], "extra": 1},
    ],
)
def test_bad_requests_are_422(
    fake: FakeControl, secret_file: Path, body: dict[str, object]
) -> None:
    with sidecar(fake, subscriber_secret_file=secret_file) as admin:
        r = httpx.post(f"{admin.url}/api/tokens", headers=AUTH, json=body)
    assert r.status_code == 422, r.text
