"""TLS on the service port: the server context, and the connection that speaks TLS for a ``Conn``.

Memory per idle TLS connection is what decides whether a million fit. OpenSSL 3.0 keeps ~16.7 KB
per handshaken connection (benchmarks/tls_memory.py: ~9.3 KB before a byte is exchanged), so
with uvloop's SSL transport an idle TLS stream cost ~26 KB against ~1.4 KB in plain HTTP. What
the kernel's TLS offload (kTLS) does, done here in the worker: OpenSSL runs the handshake (all of
the negotiation, certificates and key exchange stay its job), and once a TLS 1.3 handshake is
done the connection keeps only the two traffic secrets and their sequence numbers; each record is
sealed and opened with ``cryptography``'s AEAD (AES-GCM or ChaCha20-Poly1305, OpenSSL's own code)
and the ``SSL`` object is freed. RFC 8446 §5.2 (record protection), §7.1 (HKDF-Expand-Label),
§4.6.3 (KeyUpdate) and §6 (alerts) are all the record layer there is.

Where the secrets come from: Python's ``ssl`` has no call for them, but it has the key log every
TLS tool has (``SSLContext.keylog_filename``, the NSS key log format). The context logs into an
in-memory file (memfd) this worker alone reads, and each handshake step's lines are read right
after the step — one thread, so the lines read after a connection's ``do_handshake`` are that
connection's; their client random ties its steps together.

What stays with OpenSSL: TLS 1.2 connections (their record layer and renegotiation rules are not
reimplemented here) and every connection with ``--tls-offload`` off; ``TlsConn`` then moves
records through the ``SSLObject`` as uvloop's SSL transport does.

Also here: no TLS 1.3 session tickets (``num_tickets = 0``: no ticket and no cached session per
connection, and no record sent under the application keys before the handover), and CPython
builds contexts with ``SSL_MODE_RELEASE_BUFFERS`` (idle connections that stay with OpenSSL free
their ~34 KB of record buffers).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import ssl
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, cast

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from service.worker.hub import Counters

    # TLS 1.3 cipher suite -> (AEAD class, hash of its key schedule, key length)
    Suite: TypeAlias = tuple[type[AESGCM] | type[ChaCha20Poly1305], hashes.HashAlgorithm, int]

log = logging.getLogger("comet.worker")
MAX_PLAINTEXT = 1 << 14  # RFC 8446 §5.1
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256  # §5.2
APPLICATION_DATA, ALERT, HANDSHAKE = 23, 21, 22
KEY_UPDATE = 24
# Alert descriptions (§6): what a peer is told before the connection is closed.
CLOSE_NOTIFY, UNEXPECTED_MESSAGE, BAD_RECORD_MAC, RECORD_OVERFLOW, DECODE_ERROR = 0, 10, 20, 22, 50
# The key log is emptied once this much has been read (~1,000 handshakes): a truncate per
# handshake was one more system call and a page freed and taken again each time.
TRUNCATE_AT = 1 << 20
_TYPE = {t: bytes((t,)) for t in (APPLICATION_DATA, ALERT, HANDSHAKE)}


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context; ValueError names the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.num_tickets = 0
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ValueError(f"tls: cannot read {exc.filename or cert_file}: no such file") from None
    except PermissionError as exc:
        raise ValueError(
            f"tls: cannot read {exc.filename or cert_file}: permission denied"
        ) from None
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls: {cert_file} / {key_file} are not a PEM certificate and its key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ValueError(f"tls: cannot read {cert_file} / {key_file}: {exc}") from None
    return ctx


@functools.cache
def crypto() -> tuple[dict[str, Suite], type[Exception]]:
    """The TLS 1.3 suites sealed here and the AEADs' "does not authenticate" error, imported on
    first use: ``cryptography`` is ~6 MB of a worker's RSS, and only a worker with TLS (or
    adopting TLS connections) needs it — not the 54 plain workers of a million."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    suites: dict[str, Suite] = {
        "TLS_AES_128_GCM_SHA256": (AESGCM, hashes.SHA256(), 16),
        "TLS_AES_256_GCM_SHA384": (AESGCM, hashes.SHA384(), 32),
        "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, hashes.SHA256(), 32),
    }
    return suites, InvalidTag


def expand_label(
    secret: bytes, label: bytes, length: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    """HKDF-Expand-Label(secret, label, "", length), RFC 8446 §7.1. Every length TLS 1.3 asks
    for here (a key, an IV, a next secret) fits in one hash output, where HKDF-Expand (RFC 5869
    §2.3) is a single HMAC: T(1) = HMAC(secret, info || 0x01) — one call into OpenSSL's HMAC
    through the standard library, ~1 us, against ~10 us for a cryptography HKDFExpand."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00"
    assert length <= algorithm.digest_size
    return hmac.digest(secret, info + b"\x01", algorithm.name)[:length]


class KeyLog:
    """The context's key log, read back from an in-memory file: ``take()`` returns the lines
    OpenSSL wrote since the last call.

    OpenSSL writes them (through CPython's callback, flushed per line, appending) while
    ``do_handshake`` runs; ``take()`` is called after every step and reads what is new. A memfd
    and not a pipe: a write to it never waits, whatever reads it."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        fd = os.memfd_create("comet-tls-keylog", os.MFD_CLOEXEC)
        try:
            ctx.keylog_filename = f"/proc/self/fd/{fd}"  # CPython opens its own descriptor
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.pos = 0  # what has been read; emptied past TRUNCATE_AT, not at every take

    @classmethod
    def open(cls, ctx: ssl.SSLContext) -> KeyLog | None:
        """The key log, or None (with a warning: OpenSSL then keeps every connection) where the
        process cannot open its own descriptors by path (no /proc) or has no memfd."""
        try:
            return cls(ctx)
        except OSError as exc:
            log.warning(
                "tls: no key log (%s): OpenSSL keeps every connection's records "
                "(as with --no-tls-offload)",
                exc,
            )
            return None

    def take(self) -> list[tuple[str, bytes, bytes]]:
        """(label, client random, secret) of every line since the last call, in order; the
        random and the secret as the log's hex."""
        data = os.pread(self.fd, 1 << 16, self.pos)  # one step of one handshake: ~1 KB
        if not data:
            return []
        while len(data) % (1 << 16) == 0:  # more than that: lines no one read before
            more = os.pread(self.fd, 1 << 16, self.pos + len(data))
            if not more:
                break
            data += more
        self.pos += len(data)
        if self.pos >= TRUNCATE_AT:  # all read: OpenSSL's next line goes at offset 0
            os.ftruncate(self.fd, 0)
            self.pos = 0
        out = []
        for line in data.split(b"\n"):
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0].decode("ascii", "replace"), parts[1], parts[2]))
        return out


class TlsConn(asyncio.Protocol):
    """One TLS connection: the protocol of its TCP transport, and the transport of its ``Conn``.

    States: handshaking (``sslobj`` set, ``app`` None); then either *offloaded* (``wkey`` set:
    records sealed and opened here, ``sslobj`` freed) or *kept* (``sslobj`` set: OpenSSL moves
    the records). A connection ``adopted`` from another process starts offloaded. ``app`` (the
    ``Conn``) is made when the handshake is done, as uvloop's SSL transport makes it, so a
    connection that never finishes one costs the hub nothing."""

    __slots__ = (
        "tcp", "app", "sslobj", "inbio", "outbio", "timer", "logged",
        "suite", "wsec", "wkey", "wiv", "wseq", "rsec", "rkey", "riv", "rseq", "rbuf",
    )  # fmt: skip

    # Bound per worker by a subclass (see subclass_for), as Conn's are.
    context: ClassVar[ssl.SSLContext | None]
    keylog: ClassVar[KeyLog | None]  # None: --tls-offload off
    app_class: ClassVar[type[asyncio.Protocol]]
    handshake_timeout: ClassVar[float]
    counters: ClassVar[Counters]
    # The worker's hub: --accept-rate is charged when the TCP connection arrives (see
    # connection_made); None: no admission here (tests).
    admission: ClassVar[Any]
    suites: ClassVar[dict[str, Suite]]  # crypto()'s, bound with the rest
    invalid_tag: ClassVar[type[Exception]]

    tcp: asyncio.Transport
    app: asyncio.Protocol | None
    sslobj: ssl.SSLObject | None
    inbio: ssl.MemoryBIO | None
    outbio: ssl.MemoryBIO | None
    timer: asyncio.TimerHandle | None
    logged: dict[str, tuple[bytes, bytes]] | None  # key log lines while handshaking
    suite: Suite
    wsec: bytes  # the server's traffic secret, and the key, IV and sequence from it
    wkey: bytes | None
    wiv: int
    wseq: int
    rsec: bytes  # the client's
    rkey: bytes | None
    riv: int
    rseq: int
    rbuf: bytes | None  # the start of a record not all in yet

    def __init__(self) -> None:
        self.app = None  # made when the handshake is done, or given by adopted()
        self.wkey = self.rkey = None

    @classmethod
    def adopted(cls, app: asyncio.Protocol, state: dict[str, Any]) -> TlsConn:
        """A connection offloaded in another process (``handoff_state``), going on here: no
        handshake, the same keys and sequence numbers, ``app`` made when the socket is."""
        conn = cls()
        conn.app = app
        conn.suite = cls.suites[state["suite"]]
        conn.wsec = bytes.fromhex(state["wsec"])
        conn.rsec = bytes.fromhex(state["rsec"])
        conn._set_write_keys()
        conn._set_read_keys()
        conn.wseq = int(state["wseq"])
        conn.rseq = int(state["rseq"])
        return conn

    def handoff_state(self) -> dict[str, Any] | None:
        """What another process needs to go on sealing and opening this connection's records;
        None if it cannot move (OpenSSL keeps it, or the start of a record is waiting here)."""
        if self.wkey is None or self.app is None or self.rbuf:
            return None
        name = next(n for n, suite in self.suites.items() if suite is self.suite)
        return {
            "suite": name,
            "wsec": self.wsec.hex(),
            "rsec": self.rsec.hex(),
            "wseq": self.wseq,
            "rseq": self.rseq,
        }

    @classmethod
    def subclass_for(
        cls,
        context: ssl.SSLContext | None,
        app_class: type[asyncio.Protocol],
        handshake_timeout: float,
        offload: bool,
        counters: Counters,
        admission: Any = None,
    ) -> type[TlsConn]:
        """The class of this worker's TLS connections. Without a ``context`` (a successor whose
        new configuration has no TLS) it only adopts connections offloaded elsewhere."""
        suites, invalid_tag = crypto()
        return type(
            "TlsConn",
            (cls,),
            {
                "__slots__": (),
                "context": context,
                "keylog": KeyLog.open(context) if offload and context is not None else None,
                "app_class": app_class,
                "handshake_timeout": handshake_timeout,
                "counters": counters,
                "admission": admission,
                "suites": suites,
                "invalid_tag": invalid_tag,
            },
        )

    # -- the TCP side (asyncio.Protocol) --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.rbuf = None
        self.logged = None
        self.timer = None
        self.sslobj = self.inbio = self.outbio = None
        if self.app is not None:  # adopted(): the keys are set, the Conn goes on
            self.app.connection_made(cast(asyncio.Transport, self))
            return
        assert self.context is not None, "a TLS class without a context only adopts"
        hub = self.admission
        if hub is not None:
            # --accept-rate is charged here, before the handshake: the handshake (~0.5 ms of
            # CPU, most of a TLS accept) is what a reconnect storm must not pile up, and a Conn
            # (which charges it for plain connections) exists only after it. No 503 can be
            # sent before a handshake: a connection past the rate is closed at once, and the
            # client retries it as a network error.
            if hub.accept_tokens <= 0:
                self.counters.rejected_total += 1
                transport.close()
                return
            hub.accept_tokens -= 1
        self.wsec = self.rsec = b""
        self.inbio = ssl.MemoryBIO()
        self.outbio = ssl.MemoryBIO()
        self.sslobj = self.context.wrap_bio(self.inbio, self.outbio, server_side=True)
        self.timer = asyncio.get_running_loop().call_later(
            self.handshake_timeout, self._handshake_timed_out
        )

    def data_received(self, data: bytes) -> None:
        if self.wkey is not None:
            self._open_records(data)
            return
        sslobj = self.sslobj
        if sslobj is None:  # closed
            return
        assert self.inbio is not None
        self.inbio.write(data)
        if self.app is None:
            self._handshake(sslobj)
        else:
            self._read_kept(sslobj)

    def eof_received(self) -> bool | None:
        # The Conn decides (a long-poll still answers a half-closed client); before it exists,
        # a client that stops sending is done.
        return self.app.eof_received() if self.app is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_ssl()
        self._drop_keys()
        app, self.app = self.app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -- the handshake ----------------------------------------------------------------------------
    def _handshake(self, sslobj: ssl.SSLObject) -> None:
        done = False
        try:
            sslobj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._flush()  # OpenSSL's alert, if it made one
            self.counters.tls_failed_total += 1
            log.debug("tls handshake from %s failed: %s", self.tcp.get_extra_info("peername"), exc)
            self._drop_ssl()
            self.tcp.close()
            return
        finally:
            if self.keylog is not None:
                self._note_secrets(self.keylog.take())
        self._flush()
        if done:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._handshake_done(sslobj)

    def _note_secrets(self, lines: list[tuple[str, bytes, bytes]]) -> None:
        """Keep this connection's lines. Its first step that logs anything (a TLS 1.3 server's
        first flight always does) wrote the last lines read after it: their client random is
        this connection's, and later lines are kept only with it (lines no one read before,
        of another handshake on the same context, are left out)."""
        if not lines:
            return
        logged = self.logged
        if logged is None:
            logged = self.logged = {"": (lines[-1][1], b"")}
        mine = logged[""][0]
        for label, random, secret in lines:
            if random == mine:
                logged[label] = (random, secret)

    def _handshake_timed_out(self) -> None:
        self.timer = None
        if self.app is None and not self.tcp.is_closing():
            self.counters.tls_failed_total += 1
            self._drop_ssl()
            self.tcp.abort()

    def _handshake_done(self, sslobj: ssl.SSLObject) -> None:
        assert self.inbio is not None
        suite = (
            self.suites.get((sslobj.cipher() or ("",))[0])
            if sslobj.version() == "TLSv1.3"
            else None
        )
        logged, self.logged = self.logged, None
        secrets = self._traffic_secrets(logged) if suite is not None and logged else None
        rest = b""
        if suite is not None and secrets is not None and sslobj.pending() == 0:
            rest = self.inbio.read()  # records the client sent after its Finished
            self.suite = suite
            self.wsec, self.rsec = secrets
            self._set_write_keys()
            self._set_read_keys()
            self._drop_ssl()  # OpenSSL's per-connection state goes here
            self.counters.tls_offloaded_total += 1
        else:
            self.counters.tls_kept_total += 1
        app = self.app = self.app_class()
        if self.admission is not None:
            self.admission.accept_tokens += 1  # charged at the TCP accept: the Conn charges it
        app.connection_made(cast(asyncio.Transport, self))  # the part of one a Conn uses
        if self.wkey is not None:
            if rest:
                self._open_records(rest)
        elif self.sslobj is not None:
            self._read_kept(self.sslobj)

    @staticmethod
    def _traffic_secrets(logged: dict[str, tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
        """(server, client) application traffic secrets, if the log has both."""
        server = logged.get("SERVER_TRAFFIC_SECRET_0")
        client = logged.get("CLIENT_TRAFFIC_SECRET_0")
        if server is None or client is None:
            return None
        return bytes.fromhex(server[1].decode()), bytes.fromhex(client[1].decode())

    def _drop_ssl(self) -> None:
        self.sslobj = self.inbio = self.outbio = None

    # -- records, offloaded ----------------------------------------------------------------------
    def _keys(self, secret: bytes) -> tuple[bytes, int]:
        """The key and the IV (as an int, xor-ed with each sequence) of a traffic secret."""
        _, algorithm, key_len = self.suite
        iv = expand_label(secret, b"iv", 12, algorithm)
        return expand_label(secret, b"key", key_len, algorithm), int.from_bytes(iv, "big")

    def _set_write_keys(self) -> None:
        self.wkey, self.wiv = self._keys(self.wsec)
        self.wseq = 0

    def _set_read_keys(self) -> None:
        self.rkey, self.riv = self._keys(self.rsec)
        self.rseq = 0

    def _seal(self, content_type: int, data: bytes) -> bytes:
        """One record: ``data`` (≤ 16 KB) of ``content_type`` under the write key (§5.2)."""
        seq = self.wseq
        self.wseq = seq + 1
        n = len(data) + 17  # the content type byte and the 16-byte tag
        header = bytes((APPLICATION_DATA, 3, 3, n >> 8, n & 255))
        # The AEAD is made per record (~1 us): an idle connection keeps its 32-byte key, not
        # the ~2.3 KB cipher context an AESGCM object holds.
        key = self.wkey
        assert key is not None
        aead = self.suite[0](key)
        return header + aead.encrypt(
            (self.wiv ^ seq).to_bytes(12, "big"), data + _TYPE[content_type], header
        )

    def _open_records(self, data: bytes) -> None:
        buf = self.rbuf + data if self.rbuf else data
        self.rbuf = None
        pos = 0
        end = len(buf)
        while end - pos >= 5 and self.wkey is not None:
            outer = buf[pos]
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if outer != APPLICATION_DATA:
                return self._fatal(
                    UNEXPECTED_MESSAGE, f"a record of type {outer} after the handshake"
                )
            if length > MAX_CIPHERTEXT:
                return self._fatal(RECORD_OVERFLOW, f"a record of {length} bytes")
            if end - pos < 5 + length:
                break
            header = buf[pos : pos + 5]
            body = buf[pos + 5 : pos + 5 + length]
            pos += 5 + length
            seq = self.rseq
            self.rseq = seq + 1
            key = self.rkey
            assert key is not None
            try:
                plain = self.suite[0](key).decrypt(
                    (self.riv ^ seq).to_bytes(12, "big"), body, header
                )
            except self.invalid_tag:
                return self._fatal(BAD_RECORD_MAC, "a record that does not authenticate")
            plain = plain.rstrip(b"\x00")  # §5.4: padding, then the real content type
            if not plain:
                return self._fatal(UNEXPECTED_MESSAGE, "a record with no content type")
            inner = plain[-1]
            content = plain[:-1]
            if inner == APPLICATION_DATA:
                if content and self.app is not None:
                    self.app.data_received(content)
            elif inner == ALERT:
                if len(content) == 2 and content[1] == CLOSE_NOTIFY:
                    self.close()
                else:
                    self._drop_keys()
                    self.tcp.close()
                return None
            elif inner == HANDSHAKE:
                if not self._post_handshake(content):
                    return None
            else:
                return self._fatal(UNEXPECTED_MESSAGE, f"content of type {inner}")
            if self.tcp.is_closing():
                return None
        if pos < end and self.wkey is not None:
            self.rbuf = buf[pos:]
        return None

    def _post_handshake(self, content: bytes) -> bool:
        """KeyUpdate (§4.6.3) is the one message a client may send after the handshake."""
        pos = 0
        while pos < len(content):
            if len(content) - pos < 4:
                self._fatal(DECODE_ERROR, "a truncated handshake message")
                return False
            kind = content[pos]
            length = int.from_bytes(content[pos + 1 : pos + 4], "big")
            body = content[pos + 4 : pos + 4 + length]
            pos += 4 + length
            if kind != KEY_UPDATE or length != 1 or len(body) != 1 or body[0] > 1:
                self._fatal(UNEXPECTED_MESSAGE, f"handshake message {kind} after the handshake")
                return False
            _, algorithm, _ = self.suite
            self.rsec = expand_label(self.rsec, b"traffic upd", algorithm.digest_size, algorithm)
            self._set_read_keys()
            if body[0] == 1:  # update_requested: answer under the old key, then move on
                self.tcp.write(self._seal(HANDSHAKE, b"\x18\x00\x00\x01\x00"))
                self.wsec = expand_label(
                    self.wsec, b"traffic upd", algorithm.digest_size, algorithm
                )
                self._set_write_keys()
        return True

    def _fatal(self, description: int, why: str) -> None:
        log.debug("tls: %s from %s: closing", why, self.tcp.get_extra_info("peername"))
        if not self.tcp.is_closing():
            self.tcp.write(self._seal(ALERT, bytes((2, description))))
            self.tcp.close()
        self._drop_keys()

    def _drop_keys(self) -> None:
        self.wkey = self.rkey = None
        self.wsec = self.rsec = b""
        self.rbuf = None

    # -- records, kept in OpenSSL ----------------------------------------------------------------
    def _read_kept(self, sslobj: ssl.SSLObject) -> None:
        while self.sslobj is sslobj and self.app is not None:
            try:
                chunk = sslobj.read(MAX_PLAINTEXT)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client's close_notify
                chunk = b""
            except ssl.SSLError as exc:
                log.debug("tls: %s from %s: closing", exc, self.tcp.get_extra_info("peername"))
                self._flush()
                self._drop_ssl()
                self.tcp.close()
                return
            if not chunk:  # the client's close_notify (no data raises SSLWantReadError)
                self.close()
                return
            self.app.data_received(chunk)
        self._flush()

    def _flush(self) -> None:
        out = self.outbio.read() if self.outbio is not None else b""
        if out and not self.tcp.is_closing():
            self.tcp.write(out)

    # -- the Conn's side (asyncio.Transport) -----------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.wkey is not None:
            tcp = self.tcp
            if len(data) <= MAX_PLAINTEXT:
                tcp.write(self._seal(APPLICATION_DATA, bytes(data)))
            else:
                view = memoryview(data)
                for i in range(0, len(view), MAX_PLAINTEXT):
                    tcp.write(self._seal(APPLICATION_DATA, bytes(view[i : i + MAX_PLAINTEXT])))
        elif self.sslobj is not None and self.app is not None:
            self.sslobj.write(data)
            self._flush()

    def close(self) -> None:
        if self.tcp.is_closing():
            return
        if self.wkey is not None:
            self.tcp.write(self._seal(ALERT, bytes((1, CLOSE_NOTIFY))))
            self._drop_keys()
        elif self.sslobj is not None and self.app is not None:
            try:
                self.sslobj.unwrap()  # queues our close_notify
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
            self._drop_ssl()
        self.tcp.close()

    def abort(self) -> None:
        self._drop_keys()
        self._drop_ssl()
        self.tcp.abort()

    def is_closing(self) -> bool:
        return self.tcp.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size()

    def pause_reading(self) -> None:
        self.tcp.pause_reading()

    def resume_reading(self) -> None:
        self.tcp.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self.context
        if name == "ssl_object":
            return self.sslobj
        return self.tcp.get_extra_info(name, default)
