"""The TLS record layer of service/worker/tls.py in one process, against a real OpenSSL client
(Python's ``ssl.SSLObject`` over memory BIOs): after a TLS 1.3 handshake the server keeps no
OpenSSL object, and every record it seals or opens must be what OpenSSL writes and reads —
split or coalesced in any way, past 16 KB, across KeyUpdates, and refused when tampered with."""

from __future__ import annotations

import asyncio
import gc
import json
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from benchmarks.make_test_cert import write
from service.worker.hub import Counters
from service.worker.tls import KeyLog, TlsConn, server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write(tmp_path_factory.mktemp("pki"))


class App(asyncio.Protocol):
    """What a Conn sees: the transport it is given and the bytes it is handed."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.got = b""
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Tcp:
    """The TCP transport under TlsConn: what it was asked to write, and whether it closed."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "a write after close"
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


class Pair:
    """A TlsConn (with its fake TCP side) and an OpenSSL client, bytes moved by hand."""

    def __init__(
        self,
        pki: dict[str, Path],
        offload: bool = True,
        server_class: type[TlsConn] | None = None,
        **client: Any,
    ) -> None:
        """A server of its own context and class, or of ``server_class`` (shared)."""
        self.counters = Counters()
        cls = server_class
        if cls is None:
            ctx = server_context(str(pki["cert"]), str(pki["key"]))
            cls = TlsConn.subclass_for(ctx, App, 5.0, offload, self.counters)
        self.server = cls()
        self.tcp = Tcp()
        self.server.connection_made(self.tcp)  # type: ignore[arg-type]
        cctx = ssl.create_default_context(cafile=str(pki["ca"]))
        for key, value in client.items():
            setattr(cctx, key, value)
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = cctx.wrap_bio(self.cin, self.cout, server_hostname="localhost")

    @property
    def app(self) -> App:
        app = self.server.app
        assert isinstance(app, App)
        return app

    def to_server(self, chunk: Callable[[bytes], list[bytes]] = lambda b: [b]) -> None:
        data = self.cout.read()
        for part in chunk(data):
            if part:
                self.server.data_received(part)

    def to_client(self) -> None:
        self.cin.write(self.tcp.take())

    def handshake(self, with_request: bytes = b"") -> None:
        for _ in range(10):
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.to_server()
                self.to_client()
        else:
            raise AssertionError("no handshake")
        if with_request:  # the request in the same segment as the client's Finished
            self.client.write(with_request)
        self.to_server()

    def client_read(self) -> bytes:
        self.to_client()
        out = b""
        while True:
            try:
                chunk = self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return out
            if not chunk:
                return out
            out += chunk


def run(fn: Callable[[], None]) -> None:
    """TlsConn asks the running loop for its handshake timer."""

    async def main() -> None:
        fn()

    asyncio.run(main())


def live_ssl_objects() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, ssl.SSLObject))


def test_after_the_handshake_openssl_is_gone_and_records_go_both_ways(
    pki: dict[str, Path],
) -> None:
    def body() -> None:
        p = Pair(pki)
        p.handshake(b"GET /sub/x HTTP/1.1\r\n\r\n")
        assert p.server.sslobj is None and p.server.wkey is not None
        assert p.counters.tls_offloaded_total == 1 and p.counters.tls_kept_total == 0
        assert p.app.got == b"GET /sub/x HTTP/1.1\r\n\r\n"  # the request behind the Finished
        p.app.transport.write(b"Welcome!\n")
        p.app.transport.write(b"x" * 40_000)  # three records
        assert p.client_read() == b"Welcome!\n" + b"x" * 40_000
        # Bytes one at a time, then three records in one segment.
        p.client.write(b"one")
        p.to_server(lambda b: [b[i : i + 1] for i in range(len(b))])
        for word in (b"two", b"three", b"four"):
            p.client.write(word)
        p.to_server()
        assert p.app.got.endswith(b"onetwothreefour")
        # The server's close_notify reaches the client as a clean end.
        p.app.transport.close()
        p.to_client()
        assert p.client.read(10) == b""  # the close_notify: the end, not "more to come"
        assert p.tcp.closing and not p.tcp.aborted

    run(body)


def records(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        n = int.from_bytes(data[3:5], "big")
        out.append((data[:5], data[5 : 5 + n]))
        data = data[5 + n :]
    return out


def keys(secret: bytes) -> tuple[AESGCM, bytes]:
    """TLS_AES_256_GCM_SHA384's key and IV of a traffic secret (RFC 8446 §7.3), worked out here
    from the RFC and not from the code under test."""

    def label(name: bytes, n: int) -> bytes:
        info = struct.pack("!HB", n, 6 + len(name)) + b"tls13 " + name + b"\x00"
        return HKDFExpand(hashes.SHA384(), n, info).derive(secret)

    return AESGCM(label(b"key", 32)), label(b"iv", 12)


def nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


def next_secret(secret: bytes) -> bytes:
    info = struct.pack("!HB", 48, 6 + 11) + b"tls13 traffic upd\x00"
    return HKDFExpand(hashes.SHA384(), 48, info).derive(secret)


def test_a_key_update_that_asks_for_ours_is_answered_and_the_keys_move_on(
    pki: dict[str, Path],
) -> None:
    """Python's ssl has no call that sends a KeyUpdate (the s_client test in test_tls.py sends
    real ones); here the client's KeyUpdate(update_requested) is sealed by hand, and the server's
    answer is checked record by record: a KeyUpdate under its old key, then data under the new
    one, which the OpenSSL client reads."""

    def body() -> None:
        p = Pair(pki)
        p.handshake()
        assert p.server.suite[0] is AESGCM and p.server.suite[2] == 32  # AES-256 by default
        client_secret, server_secret = p.server.rsec, p.server.wsec
        aead, iv = keys(client_secret)
        header = b"\x17\x03\x03\x00\x16"  # 5 + 1 + 16
        key_update = b"\x18\x00\x00\x01\x01" + b"\x16"
        p.server.data_received(header + aead.encrypt(nonce(iv, 0), key_update, header))
        p.app.transport.write(b"after")
        out = p.tcp.take()
        (h1, r1), (h2, r2) = records(out)
        old, old_iv = keys(server_secret)
        new, new_iv = keys(next_secret(server_secret))
        assert old.decrypt(nonce(old_iv, 0), r1, h1) == b"\x18\x00\x00\x01\x00\x16"
        assert new.decrypt(nonce(new_iv, 0), r2, h2) == b"after\x17"
        p.cin.write(out)
        assert p.client.read(100) == b"after"  # OpenSSL took the KeyUpdate too
        # And the server reads with the client's next key.
        aead, iv = keys(next_secret(client_secret))
        header = b"\x17\x03\x03\x00\x13"
        p.server.data_received(header + aead.encrypt(nonce(iv, 0), b"hi\x17", header))
        assert p.app.got == b"hi" and not p.tcp.closing

    run(body)


def test_tls12_stays_with_openssl(pki: dict[str, Path]) -> None:
    def body() -> None:
        p = Pair(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        p.handshake(b"GET / HTTP/1.1\r\n\r\n")
        assert p.server.sslobj is not None and p.server.wkey is None
        assert p.counters.tls_kept_total == 1 and p.counters.tls_offloaded_total == 0
        assert p.app.got == b"GET / HTTP/1.1\r\n\r\n"
        p.app.transport.write(b"Welcome!\n")
        assert p.client_read() == b"Welcome!\n"
        p.app.transport.close()
        p.to_client()
        assert p.client.read(10) == b""  # the close_notify: the end, not "more to come"

    run(body)


def test_offload_off_keeps_every_connection_with_openssl(pki: dict[str, Path]) -> None:
    def body() -> None:
        p = Pair(pki, offload=False)
        p.handshake()
        assert p.server.sslobj is not None and p.counters.tls_kept_total == 1
        p.app.transport.write(b"kept")
        assert p.client_read() == b"kept"

    run(body)


def test_a_tampered_record_ends_the_connection_with_an_alert(pki: dict[str, Path]) -> None:
    def body() -> None:
        p = Pair(pki)
        p.handshake()
        p.client.write(b"GET / HTTP/1.1\r\n\r\n")
        record = bytearray(p.cout.read())
        record[-1] ^= 1  # one bit of the tag
        p.server.data_received(bytes(record))
        assert p.app.got == b"" and p.tcp.closing
        p.to_client()
        with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC|bad record mac"):
            p.client.read(10)

    run(body)


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"\x16\x03\x03\x00\x01\x00", "a handshake record in the clear"),
        (b"\x17\x03\x03\x48\x01" + b"\x00" * 5, "a record longer than TLS allows"),
    ],
)
def test_records_tls13_forbids_after_the_handshake_are_refused(
    pki: dict[str, Path], raw: bytes, why: str
) -> None:
    def body() -> None:
        p = Pair(pki)
        p.handshake()
        p.server.data_received(raw)
        assert p.tcp.closing, why
        p.to_client()
        with pytest.raises(ssl.SSLError):
            p.client.read(10)

    run(body)


@pytest.mark.parametrize("offload", [True, False])
def test_the_client_close_notify_closes_cleanly(pki: dict[str, Path], offload: bool) -> None:
    def body() -> None:
        p = Pair(pki, offload=offload)
        p.handshake()
        with pytest.raises(ssl.SSLWantReadError):
            p.client.unwrap()
        p.to_server()
        assert p.tcp.closing and not p.tcp.aborted
        p.to_client()
        p.client.unwrap()  # our close_notify answered it

    run(body)


def test_a_handshake_that_fails_costs_nothing_and_is_counted(pki: dict[str, Path]) -> None:
    def body() -> None:
        p = Pair(pki)
        p.server.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on the TLS port
        assert p.tcp.closing and p.server.app is None
        assert p.counters.tls_failed_total == 1
        p.server.connection_lost(None)  # no Conn was made: nothing to tell

    run(body)


def test_no_ssl_object_outlives_an_offloaded_handshake(pki: dict[str, Path]) -> None:
    def body() -> None:
        gc.collect()
        before = live_ssl_objects()
        pairs = [Pair(pki) for _ in range(20)]
        for p in pairs:
            p.handshake()
        del p
        for pair in pairs:  # the client objects are ours; only the server's must be gone
            pair.client = None  # type: ignore[assignment]
        gc.collect()
        assert live_ssl_objects() == before
        assert all(pair.server.sslobj is None for pair in pairs)

    run(body)


def test_a_connection_goes_on_in_another_tlsconn_from_its_handoff_state(
    pki: dict[str, Path],
) -> None:
    """What a reload moves: the state (JSON-able: it crosses the handoff socket) makes a
    TlsConn that seals and opens where the first one stopped, with no handshake."""

    def body() -> None:
        p = Pair(pki)
        p.handshake()
        p.app.transport.write(b"before")
        p.client.write(b"up")
        p.to_server()
        assert p.client_read() == b"before"
        state = json.loads(json.dumps(p.server.handoff_state()))
        p.server.abort()  # the giver lets go (sends nothing)
        assert p.tcp.take() == b""
        successor_cls = TlsConn.subclass_for(None, App, 5.0, True, Counters())
        app = App()
        moved = successor_cls.adopted(app, state)
        tcp = Tcp()
        moved.connection_made(tcp)  # type: ignore[arg-type]
        assert app.transport is moved and moved.sslobj is None
        app.transport.write(b"after")
        p.cin.write(tcp.take())
        assert p.client.read(100) == b"after"
        p.client.write(b"down")
        moved.data_received(p.cout.read())
        assert app.got == b"down"

    run(body)


def test_a_connection_openssl_keeps_has_no_handoff_state(pki: dict[str, Path]) -> None:
    def body() -> None:
        p = Pair(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        p.handshake()
        assert p.server.handoff_state() is None
        q = Pair(pki)
        q.handshake()
        q.client.write(b"partial")
        q.server.data_received(q.cout.read()[:7])  # the start of a record only
        assert q.server.handoff_state() is None

    run(body)


def test_without_a_key_log_openssl_keeps_every_connection(
    pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the key log cannot be opened (no /proc), TLS still works: as --no-tls-offload."""

    def no_proc(self: KeyLog, ctx: ssl.SSLContext) -> None:
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/fd/9")

    monkeypatch.setattr(KeyLog, "__init__", no_proc)

    def body() -> None:
        p = Pair(pki)
        p.handshake()
        assert p.server.sslobj is not None and p.counters.tls_kept_total == 1
        p.app.transport.write(b"still tls")
        assert p.client_read() == b"still tls"

    run(body)
    assert "no key log" in caplog.text and "OpenSSL keeps" in caplog.text


def test_handshakes_nobody_reads_the_key_log_of_never_block(pki: dict[str, Path]) -> None:
    """Two classes on one context (as in a test or a future refactor): the one without a key log
    of its own still makes OpenSSL log, and nothing drains those lines. Into a pipe they would
    block the worker at ~60 handshakes; the memfd takes them, and the next offloaded handshake
    keeps only its own lines (its client random): its records open on the client."""

    def body() -> None:
        ctx = server_context(str(pki["cert"]), str(pki["key"]))
        offloading = TlsConn.subclass_for(ctx, App, 5.0, True, Counters())
        keeping = TlsConn.subclass_for(ctx, App, 5.0, False, Counters())
        for _ in range(150):  # ~150 KB of lines nobody reads
            p = Pair(pki, server_class=keeping)
            p.handshake()
            assert p.server.sslobj is not None
        for _ in range(2):
            p = Pair(pki, server_class=offloading)
            p.handshake()
            assert p.server.sslobj is None
            p.app.transport.write(b"right keys")
            assert p.client_read() == b"right keys"

    run(body)
