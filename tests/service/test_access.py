"""Who may listen: CORS answers, subscriber tokens (PyJWT, HS256 / RS256 / ES256), expiry while
connected, and the start-up errors of a bad key, against a real worker over real sockets."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.config import Config, parse_args
from service.worker.auth import Keys, TokenCheck, _glob_regex, _patterns
from service.worker.http import HttpError
from tests.service.worker_harness import (
    connect,
    dechunk,
    read_all,
    read_until,
    request,
    running_worker,
    split_head,
    status_of,
    subscribe,
    wait_for,
)

SECRET = "s" * 40


def token(
    channels: Any = ("private-*",),
    exp_in: float | None = 300.0,
    key: Any = SECRET,
    alg: str = "HS256",
    **claims: Any,
) -> str:
    body: dict[str, Any] = {"sub": "alice", "channels": list(channels)}
    if exp_in is not None:
        body["exp"] = int(time.time() + exp_in)
    return jwt.encode({**body, **claims}, key, algorithm=alg)


def crit_token() -> str:
    """A correctly signed token that asks for a JWS extension we do not implement."""
    claims = {"channels": ["private-*"], "exp": int(time.time()) + 60}
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"crit": ["exp"]})


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_TOKEN_SECRET", SECRET)


def get(port: int, path: str, headers: str = "", method: str = "GET") -> bytes:
    raw = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n"
    return request(port, raw.encode())


def head_of(resp: bytes) -> str:
    return split_head(resp)[0].decode("latin-1")


# ---- CORS ----------------------------------------------------------------------------------------
def test_any_origin_gets_a_star_and_no_credentials() -> None:
    with running_worker() as w:
        s = subscribe(w, "/sub/news", "Origin: http://app.example\r\nAccept: text/event-stream\r\n")
        head = read_until(s, b"Welcome!").decode()
        s.close()
        assert "Access-Control-Allow-Origin: *\r\n" in head
        assert "Allow-Credentials" not in head
        # Without an Origin (curl, the load generator) nothing is added.
        s = subscribe(w, "/sub/news")
        assert b"Access-Control" not in read_until(s, b"Welcome!")
        s.close()


def test_preflight_answers_204_with_the_subscriber_headers() -> None:
    with running_worker() as w:
        resp = get(
            w.port,
            "/sub/news",
            "Origin: http://app.example\r\nAccess-Control-Request-Method: GET\r\n"
            "Access-Control-Request-Headers: last-event-id, authorization\r\n",
            method="OPTIONS",
        )
        head = head_of(resp)
        assert status_of(resp) == 204, resp
        assert "Access-Control-Allow-Origin: *" in head
        allowed = head.split("Access-Control-Allow-Headers: ")[1].split("\r\n")[0]
        for name in ("Last-Event-ID", "Authorization", "Cache-Control"):
            assert name in allowed
        assert "GET" in head.split("Access-Control-Allow-Methods: ")[1]
        # A preflight of a path that is no route is still a 404, and one without Origin a 403.
        assert status_of(get(w.port, "/nope", "Origin: http://a\r\n", method="OPTIONS")) == 404
        assert status_of(get(w.port, "/", method="OPTIONS")) == 403


def test_an_origin_list_echoes_only_listed_origins_with_credentials() -> None:
    with running_worker(cors_origins="http://app.example, http://other.example") as w:
        s = subscribe(w, "/", "Origin: http://app.example\r\n")
        head = read_until(s, b"Welcome!").decode()
        s.close()
        assert "Access-Control-Allow-Origin: http://app.example\r\n" in head
        assert "Access-Control-Allow-Credentials: true\r\n" in head
        assert "Vary: Origin\r\n" in head
        s = subscribe(w, "/", "Origin: http://evil.example\r\n")
        head = read_until(s, b"Welcome!").decode()
        s.close()
        assert "Access-Control-Allow-Origin" not in head
        resp = get(w.port, "/", "Origin: http://evil.example\r\n", method="OPTIONS")
        assert status_of(resp) == 403 and b"not allowed" in resp
        resp = get(w.port, "/poll/x?timeout=0", "Origin: http://other.example\r\n")
        assert "Access-Control-Allow-Origin: http://other.example" in head_of(resp)


def test_cors_off_sends_no_headers() -> None:
    with running_worker(cors_origins="") as w:
        s = subscribe(w, "/", "Origin: http://app.example\r\n")
        assert b"Access-Control" not in read_until(s, b"Welcome!")
        s.close()
        assert status_of(get(w.port, "/", "Origin: http://a\r\n", method="OPTIONS")) == 403


# ---- tokens --------------------------------------------------------------------------------------
def test_public_channels_need_no_token(secret_env: None) -> None:
    with running_worker(private_channels="private-*") as w:
        s = subscribe(w, "/sub/news")
        assert b"Welcome!" in read_until(s, b"Welcome!")
        s.close()


@pytest.mark.parametrize(
    ("make", "status", "reason", "counter"),
    [
        (lambda: None, 401, "needs a token", "token_missing_total"),
        (lambda: token(exp_in=-5), 403, "token expired", "token_expired_total"),
        (lambda: token(key="k" * 40), 403, "signature", "token_invalid_total"),
        (lambda: token(channels=["public-*"]), 403, "does not grant", "token_forbidden_total"),
        (lambda: "not.a.jwt", 403, "not base64url", "token_invalid_total"),
        (lambda: token(exp_in=None), 403, "no 'exp' claim", "token_invalid_total"),
        (lambda: token(alg="HS512", key=SECRET * 2), 403, "not accepted", "token_invalid_total"),
        (lambda: token(nbf=int(time.time()) + 600), 403, "not valid yet", "token_invalid_total"),
        (lambda: token(exp="soon"), 403, "not a number", "token_invalid_total"),
        (lambda: token(key=None, alg="none"), 403, "not accepted", "token_invalid_total"),
        (lambda: crit_token(), 403, "critical", "token_invalid_total"),
        (lambda: token()[:-3] + "*" + token()[-2:], 403, "base64url", "token_invalid_total"),
        (lambda: token() + ".x", 403, "three parts", "token_invalid_total"),
    ],
    ids=[
        "none",
        "expired",
        "wrong-key",
        "wrong-channel",
        "garbage",
        "no-exp",
        "other-alg",
        "not-yet",
        "exp-text",
        "alg-none",
        "crit",
        "bad-base64",
        "four-parts",
    ],
)
def test_a_private_channel_refuses_bad_tokens(
    secret_env: None,
    caplog: pytest.LogCaptureFixture,
    make: Any,
    status: int,
    reason: str,
    counter: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    tok = make()
    with running_worker(private_channels="private-*") as w:
        query = f"?token={tok}" if tok else ""
        for path in (f"/sub/private-a{query}", f"/poll/private-a{query}"):
            resp = get(w.port, path)
            assert status_of(resp) == status, resp
            body = split_head(resp)[1].decode()
            assert reason in body and body.count("\n") == 1
        assert w.stats()[counter] == 2
        # HEAD follows the same rule.
        assert status_of(get(w.port, f"/sub/private-a{query}", method="HEAD")) == status
    if tok:
        assert tok not in caplog.text


def test_a_good_token_subscribes_by_query_and_by_bearer_header(secret_env: None) -> None:
    tok = token(channels=["private-a", "team-*"])
    with running_worker(private_channels="private-*,team-*") as w:
        a = subscribe(w, f"/sub/private-a?format=sse&token={tok}")
        b = subscribe(w, "/sub/team-7", f"Authorization: Bearer {tok}\r\n")
        read_until(a, b"Welcome!")
        read_until(b, b"Welcome!")
        wait_for(lambda: w.stats()["conns"] == 2)
        assert w.broadcast("for a", "private-a") == 1
        assert b"data: for a" in read_until(a, b"for a")
        a.close()
        b.close()
        resp = get(w.port, "/poll/team-7?since=0&timeout=0", f"Authorization: Bearer {tok}\r\n")
        assert status_of(resp) == 200


def test_require_token_covers_every_channel(secret_env: None) -> None:
    with running_worker(require_token=True) as w:
        assert status_of(get(w.port, "/")) == 401
        assert status_of(get(w.port, "/sub/news")) == 401
        s = subscribe(w, f"/?token={token(channels=['default'])}")
        assert b"Welcome!" in read_until(s, b"Welcome!")
        s.close()


def test_channel_lists_match_as_fnmatch_does() -> None:
    """Plain names are a set look-up and only globs a regex: the same answers fnmatch gives."""
    lists = ["private-42", "private-*", "team-?", "room-[ab]", "x[", "a.b", "private-42, team-*"]
    names = ["private-42", "private-420", "private-4", "private-", "team-7", "team-77", "room-a"]
    names += ["room-c", "x[", "x", "a.b", "axb", "Private-42", ""]
    for text in lists:
        allowed = _patterns(text)
        assert allowed is not None
        for name in names:
            want = any(fnmatch.fnmatchcase(name, p.strip()) for p in text.split(","))
            assert allowed.match(name) is want, (text, name)
    assert _patterns(" , ") is None


def test_a_token_per_user_compiles_no_pattern_of_its_own() -> None:
    """Each user's token granting its own channel: checked by name, no regex made per token
    (one was: ~100 µs of every first-time check), and one user's token opens no one else's."""
    check = TokenCheck("private-*", False, Keys((SECRET.encode(),), None))
    before = _glob_regex.cache_info()
    for i in range(2000):
        tok = token(channels=[f"private-{i}", "team-*"], sub=f"user-{i}")
        assert isinstance(check.check(f"private-{i}", tok), float)
        assert isinstance(check.check("team-7", tok), float)
        refused = check.check(f"private-{i + 1}", tok)
        assert isinstance(refused, HttpError) and refused.status == 403
    after = _glob_regex.cache_info()
    assert after.currsize - before.currsize <= 1  # ("team-*",), once


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_tokens(tmp_path: Path, kind: str) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    other: Any = ec.generate_private_key(ec.SECP256R1()) if kind == "ES256" else None
    with running_worker(
        private_channels="private-*", token_public_key_file=str(tmp_path / "pub.pem")
    ) as w:
        good = token(key=private, alg=kind)
        s = subscribe(w, f"/sub/private-x?token={good}")
        assert b"Welcome!" in read_until(s, b"Welcome!")
        s.close()
        # An HS256 token signed with the public key's text must not pass (algorithm confusion).
        forged = jwt.encode(
            {"channels": ["private-*"], "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256"
        )
        assert status_of(get(w.port, f"/sub/private-x?token={forged}")) == 403
        if other is not None:
            wrong = token(key=other, alg=kind)
            assert status_of(get(w.port, f"/sub/private-x?token={wrong}")) == 403


@pytest.mark.parametrize("sse", [True, False])
def test_a_stream_ends_when_its_token_expires(secret_env: None, sse: bool) -> None:
    with running_worker(private_channels="private-*", ping_interval=30.0) as w:
        tok = token(exp_in=1.5)
        fmt = "&format=sse" if sse else ""
        s = subscribe(w, f"/sub/private-e?token={tok}{fmt}")
        s.settimeout(10)
        t0 = time.monotonic()
        got = read_all(s)
        took = time.monotonic() - t0
        s.close()
        body = dechunk(split_head(got)[1])
        assert 0.4 < took < 4.0, took  # exp is whole seconds: 1 to 1.5 s away
        if sse:
            assert body.endswith(b"event: token-expired\ndata: token expired\n\n"), body
        else:
            assert body.endswith(b"token-expired\n"), body
        assert got.endswith(b"0\r\n\r\n")  # the chunked body is ended properly
        assert w.stats()["token_expired_total"] == 1
        # A public stream on the same worker is untouched.
        p = subscribe(w, "/sub/news")
        read_until(p, b"Welcome!")
        assert w.broadcast("still here", "news") == 1
        p.close()


def test_many_expiring_streams_leave_no_stale_deadlines(secret_env: None) -> None:
    """Entries of closed private streams are dropped from the deadline buckets as they grow."""
    with running_worker(private_channels="private-*") as w:
        tok = token(exp_in=3600)
        for _ in range(3):
            socks = []
            for _ in range(400):
                s = connect(w.port)
                s.sendall(f"GET /sub/private-h?token={tok} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                socks.append(s)
            for s in socks:
                read_until(s, b"Welcome!")
            for s in socks:
                s.close()
            wait_for(lambda: w.stats()["conns"] == 0)
        assert w.worker is not None
        held = w.call(lambda: w.worker.hub.deadlines.pending)  # type: ignore[union-attr]
        assert held <= 1024, held


# ---- configuration -------------------------------------------------------------------------------
def test_tokens_without_a_key_are_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COMET_TOKEN_SECRET", raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--private-channels", "private-*"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no key to check tokens with" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--token-secret-file", "/nonexistent/secret"], {}, "cannot read /nonexistent/secret"),
        ([], {"COMET_TOKEN_SECRET": "short"}, "at least 32 bytes"),
        (["--token-public-key-file", "/etc/hostname"], {}, "not a PEM public key"),
        (["--tls-cert", "/nonexistent/cert.pem"], {}, "give both or neither"),
        (
            ["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"],
            {},
            "cannot read /nonexistent/c.pem",
        ),
        (["--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname"], {}, "not a PEM"),
    ],
)
def test_bad_key_and_certificate_paths_are_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    monkeypatch.delenv("COMET_TOKEN_SECRET", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit):
        parse_args(args)
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_the_secret_is_never_a_flag() -> None:
    assert not hasattr(Config(), "token_secret")
    with pytest.raises(SystemExit):
        parse_args(["--token-secret", SECRET])


def test_secret_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMET_TOKEN_SECRET", raising=False)
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    with running_worker(private_channels="p-*", token_secret_file=str(f)) as w:
        s = subscribe(w, f"/sub/p-1?token={token(channels=['p-*'])}")
        assert b"Welcome!" in read_until(s, b"Welcome!")
        s.close()
        stats = w.stats()
        assert json.dumps(stats).count("token_") == 4


def test_a_rotation_accepts_the_old_secret_on_the_second_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret file with the new secret first and the old one after it: tokens signed with
    either subscribe, one signed with neither is refused; a short line is a one-line error."""
    monkeypatch.delenv("COMET_TOKEN_SECRET", raising=False)
    new, old = "n" * 40, SECRET
    f = tmp_path / "secret"
    f.write_text(f"{new}\n{old}\n")
    with running_worker(private_channels="p-*", token_secret_file=str(f)) as w:
        for key in (new, old):
            s = subscribe(w, f"/sub/p-1?token={token(channels=['p-*'], key=key)}")
            assert b"Welcome!" in read_until(s, b"Welcome!"), key
            s.close()
        stranger = token(channels=["p-*"], key="x" * 40)
        resp = get(w.port, f"/sub/p-1?token={stranger}")
        assert status_of(resp) == 403 and b"signature does not verify" in resp
    f.write_text(f"{new}\nshort\n")
    with pytest.raises(ValueError, match=r"token secret \(line 2\): at least 32 bytes"):
        Config(private_channels="p-*", token_secret_file=str(f)).validate_access()


def test_a_worker_without_tokens_does_not_load_pyjwt() -> None:
    """PyJWT and cryptography cost ~10 MB of RSS a process: only a worker that checks tokens
    (or speaks TLS) loads them (54 workers at a million). The whole worker is imported, as the
    forkserver does: a module-level import anywhere in it would load them in every worker."""
    import subprocess
    import sys

    code = (
        "import sys; from service.config import Config; from service.worker.hub import Hub; "
        "import service.worker.process, service.worker.forkserver, service.worker.handoff; "
        "import asyncio; Hub(Config(), asyncio.new_event_loop()); "
        "print('jwt' in sys.modules, 'cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out


def test_a_public_key_of_another_kind_is_a_start_up_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ed.pem").write_bytes(pem)
    with pytest.raises(SystemExit):
        parse_args(
            ["--private-channels", "p-*", "--token-public-key-file", str(tmp_path / "ed.pem")]
        )
    assert "must be an RSA (RS256) or EC P-256 (ES256) public key" in capsys.readouterr().err
