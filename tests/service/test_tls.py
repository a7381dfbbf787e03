"""HTTPS on the service port: the real supervisor with a test CA's certificate (trustme), curl and
the load generator as clients, and the start-up errors of a bad certificate."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.make_test_cert import write
from loadgen.engine.config import EngineConfig
from loadgen.engine.engine import Engine
from tests.support.net import wait_for
from tests.support.service import Service


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_service(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]
) -> Iterator[Service]:
    svc = Service(
        tmp_path_factory.mktemp("tls"),
        "--workers",
        "2",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
    )
    try:
        svc.wait_up(2)
        yield svc
    finally:
        svc.stop()


def curl(*args: str, timeout: float = 20.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", str(timeout), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def read_until(proc: subprocess.Popen[bytes], marker: bytes) -> bytes:
    assert proc.stdout is not None
    out = b""
    while marker not in out:
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        out += chunk
    return out


def test_curl_with_the_test_ca_gets_welcome_and_a_broadcast(
    tls_service: Service, pki: dict[str, Path]
) -> None:
    url = f"https://localhost:{tls_service.port}/sub/secure"
    proc = curl("--cacert", str(pki["ca"]), url, timeout=8)
    try:
        wait_for(
            lambda: tls_service.ask({"op": "channels"})["channels"].get("secure", 0) == 1,
            10,
            "the curl subscriber",
        )
        answer = tls_service.ask({"op": "broadcast", "data": "over tls", "channel": "secure"})
        assert answer["ok"] and answer["recipients"] == 1
        out = read_until(proc, b"over tls\n")  # curl's --max-time bounds the wait
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert out.startswith(b"Welcome!\n"), (out, err)
    assert b"over tls\n" in out
    wait_for(lambda: totals(tls_service).get("tls_offloaded_total", 0) >= 1, 10, "offloaded")
    # Without the CA, curl refuses the certificate; plain HTTP on the TLS port gets no stream.
    bad = curl(url, timeout=5)
    out, err = bad.communicate(timeout=15)
    assert bad.returncode == 60 and b"Welcome" not in out, err  # 60: certificate problem
    plain = curl(f"http://127.0.0.1:{tls_service.port}/", timeout=5)
    out, _ = plain.communicate(timeout=15)
    assert b"Welcome" not in out


def totals(svc: Service) -> dict[str, int]:
    """The frame's totals; {} until the service's first frame (``not_ready``)."""
    answer = svc.ask({"op": "stats"})
    return answer["frame"]["totals"] if answer["ok"] else {}  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "args,offloaded",
    [
        (["--tls13-ciphers", "TLS_AES_128_GCM_SHA256"], True),
        (["--tls13-ciphers", "TLS_AES_256_GCM_SHA384"], True),
        (["--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"], True),
        (["--tls-max", "1.2"], False),  # TLS 1.2 stays with OpenSSL
    ],
)
def test_every_tls13_suite_is_offloaded_and_tls12_kept(
    tls_service: Service, pki: dict[str, Path], args: list[str], offloaded: bool
) -> None:
    """curl (its own OpenSSL) as the client: each suite gets the welcome and a broadcast, and
    the counters say which side seals the records."""
    key = "tls_offloaded_total" if offloaded else "tls_kept_total"
    wait_for(lambda: "tls_kept_total" in totals(tls_service), 10, "a stats frame")
    before = totals(tls_service)[key]
    channel = "suite-" + args[-1].replace(".", "-")
    url = f"https://localhost:{tls_service.port}/sub/{channel}"
    proc = curl("--cacert", str(pki["ca"]), *args, url, timeout=8)
    try:
        wait_for(
            lambda: tls_service.ask({"op": "channels"})["channels"].get(channel, 0) == 1,
            10,
            "the curl subscriber",
        )
        answer = tls_service.ask({"op": "broadcast", "data": "sealed", "channel": channel})
        assert answer["recipients"] == 1
        wait_for(lambda: totals(tls_service)[key] >= before + 1, 10, key)
        out = read_until(proc, b"sealed\n")  # curl's --max-time bounds the wait
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert out.startswith(b"Welcome!\n") and b"sealed\n" in out, (out, err)


def test_key_updates_both_ways_with_openssl_s_client(
    tls_service: Service, pki: dict[str, Path]
) -> None:
    """RFC 8446 §4.6.3 against OpenSSL's own client: `K` sends a KeyUpdate that asks for ours,
    `k` one that does not; long-polls on the same connection are answered after each."""
    tls_service.ask({"op": "broadcast", "data": "before", "channel": "ku"})
    request = b"GET /poll/ku?since=0 HTTP/1.1\r\nHost: x\r\n\r\n"
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_service.port}"]
        + ["-CAfile", str(pki["ca"]), "-tls1_3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        got = b""
        for command in (b"", b"K\n", b"k\n", b"K\n"):
            proc.stdin.write(command)
            proc.stdin.flush()
            time.sleep(0.3)
            proc.stdin.write(request)
            proc.stdin.flush()
            deadline = time.monotonic() + 10
            want = got.count(b"HTTP/1.1 200 OK") + 1
            while got.count(b"HTTP/1.1 200 OK") < want and time.monotonic() < deadline:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                got += chunk
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert got.count(b"KEYUPDATE") == 3, got
    assert got.count(b"HTTP/1.1 200 OK") == 4 and got.count(b'"data":"before"') == 4, got


def test_the_load_generator_holds_https_streams(tls_service: Service, pki: dict[str, Path]) -> None:
    async def run() -> tuple[int, int]:
        engine = Engine(
            EngineConfig(
                30, "127.0.0.1", tls_service.port, "/sub/lg", tls=True, tls_ca=str(pki["ca"])
            ),
            [],
        )
        engine.start()
        try:
            deadline = time.monotonic() + 20
            while engine.stats().clients < 30 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            held = engine.stats().clients
            answer = await asyncio.to_thread(
                tls_service.ask, {"op": "broadcast", "data": "lg", "channel": "lg"}
            )
            deadline = time.monotonic() + 10
            while engine.stats().msgs_total < 30 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert answer["recipients"] == 30
            return held, engine.stats().msgs_total
        finally:
            await engine.close()

    held, msgs = asyncio.run(run())
    assert held == 30 and msgs >= 30


def test_a_bad_certificate_path_is_a_clear_start_up_error(tmp_path: Path) -> None:
    svc = Service(
        tmp_path, "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k")
    )
    code = svc.proc.wait(30)
    log = svc.log()
    svc.stop()
    assert code == 2
    assert f"cannot read {tmp_path / 'missing.pem'}" in log and "Traceback" not in log


def served_certificate(port: int, ca: Path) -> bytes:
    """The certificate a new TLS connection gets (DER), verified against ``ca``."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_renewed_certificate_is_served_after_a_reload_with_every_stream_held(
    tmp_path: Path,
) -> None:
    """The certificate renewed in place (new files at the same paths), then `reload`: new
    connections get the new one, a TLS 1.3 stream opened before goes on on its connection. A
    renewal gone wrong (the new certificate with the old key) is refused with the reason and
    the workers serve on with what they have."""
    old, new = write(tmp_path / "old"), write(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert", "key"):
        shutil.copy(old[name], live / f"{name}.pem")
    svc = Service(
        tmp_path / "svc",
        *("--workers", "2", "--tls-cert", str(live / "cert.pem")),
        *("--tls-key", str(live / "key.pem")),
    )
    held: subprocess.Popen[bytes] | None = None
    try:
        svc.wait_up(2, with_frame=True)
        held = curl(
            "--cacert", str(old["ca"]), f"https://localhost:{svc.port}/sub/renew", timeout=30
        )
        wait_for(
            lambda: svc.ask({"op": "channels"})["channels"].get("renew", 0) == 1, 10, "the stream"
        )
        before = served_certificate(svc.port, old["ca"])
        for name in ("cert", "key"):  # as certbot does: new files, renamed into place
            shutil.copy(new[name], live / f"{name}.tmp")
            (live / f"{name}.tmp").rename(live / f"{name}.pem")
        answer = svc.ask({"op": "reload"})
        assert answer["ok"] and answer["reloaded"] == 2 and answer["handed"] == 1, answer
        after = served_certificate(svc.port, new["ca"])
        assert after != before
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(svc.port, old["ca"])

        # The certificate of the next renewal with the key of this one: refused, nothing moves.
        shutil.copy(old["cert"], live / "cert.pem")
        pids = svc.wait_up(2)["pids"]
        refused = svc.ask({"op": "reload"})
        assert refused["ok"] is False and refused["code"] == "conflict", refused
        assert "reload refused, every worker serves on as it is" in refused["error"]
        assert "KEY_VALUES_MISMATCH" in refused["error"], refused
        assert svc.wait_up(2)["pids"] == pids
        assert served_certificate(svc.port, new["ca"]) == after

        # A worker that dies meanwhile cannot start on those files: one line, and it comes
        # back once they are put right.
        def idle_worker() -> int | None:
            """The pid of the worker without the stream, once a frame counts only it."""
            rows = svc.frame()["workers"]
            if sum(r["conns"] for r in rows) != 1 or {r["pid"] for r in rows} != set(pids):
                return None  # a frame from before the reload, or with the checks' connections
            return next(r["pid"] for r in rows if r["conns"] == 0)

        idle = wait_for(idle_worker, 10, "a frame with the one stream")
        os.kill(idle, signal.SIGKILL)
        wait_for(lambda: "cannot start: tls: " in svc.log(), 15, "the worker's one line")
        shutil.copy(new["cert"], live / "cert.pem")
        wait_for(
            lambda: (h := svc.health()) and h["workers"] == 2 and idle not in h["pids"],
            30,
            "the slot back",
        )
        assert served_certificate(svc.port, new["ca"]) == after

        sent = svc.ask({"op": "broadcast", "data": "still here", "channel": "renew"})
        assert sent["ok"] and sent["recipients"] == 1, sent
        out = read_until(held, b"still here\n")
        assert out.count(b"Welcome!") == 1 and out.endswith(b"still here\n"), out
        assert "Traceback" not in svc.log()
    finally:
        if held is not None:
            held.terminate()
            held.communicate(timeout=10)
        svc.stop()


def test_past_the_accept_rate_a_tls_connection_is_closed_before_its_handshake(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """--accept-rate with TLS: charged when the TCP connection arrives, so a storm past the rate
    costs no handshakes (most of a TLS accept's CPU); those connections are closed at once (no
    503 can be sent before a handshake). Every handshake done is an admitted connection."""
    svc = Service(
        tmp_path,
        *("--workers", "1", "--accept-rate", "1", "--ping-interval", "30"),
        *("--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])),
    )
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    results: list[str] = []

    def one() -> None:
        try:
            with socket.create_connection(("127.0.0.1", svc.port), timeout=15) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    got = b""
                    while b"Welcome!" not in got and (chunk := tls.recv(4096)):
                        got += chunk
                    results.append("welcome" if b"Welcome!" in got else f"answer {got!r}")
        except OSError as exc:  # reset or EOF in the handshake
            results.append(f"closed {type(exc).__name__}")

    try:
        svc.wait_up(1, with_frame=True)
        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        welcomed = results.count("welcome")
        closed = [r for r in results if r.startswith("closed")]
        assert len(results) == 20 and welcomed + len(closed) == 20, results
        assert welcomed >= 1 and len(closed) >= 5, results  # one per 100 ms tick gets in

        def counted() -> dict[str, int] | None:
            t = totals(svc)
            done = t.get("tls_offloaded_total", 0) + t.get("tls_kept_total", 0)
            return t if done == welcomed and t.get("rejected_total") == len(closed) else None

        t = wait_for(counted, 10, "the counters")
        assert t["tls_failed_total"] == 0, t  # no handshake was started for the closed ones
        assert "Traceback" not in svc.log() and "Exception" not in svc.log()
    finally:
        svc.stop()
