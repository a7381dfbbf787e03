"""What one idle TLS connection costs inside OpenSSL, without sockets, uvloop or the service.

    .venv/bin/python benchmarks/tls_memory.py [--n 3000]

Makes N server/client pairs of ``ssl.SSLObject`` over ``MemoryBIO``s with the service's own server
context (service/worker/tls.py: TLS 1.2+, no compression, no session tickets) and a test
certificate (trustme, EC P-256), handshakes each in memory, sends one request and one
``Welcome!`` through it (so the record layer has been used and its buffers released), then drops
the clients. Heap bytes in use (glibc ``mallinfo2``: allocated, not merely mapped, so
fragmentation does not count) per pair, and per server side once the clients are freed. That
server-side figure is the floor under the service's RSS per idle TLS connection as long as TLS is
terminated by Python's ``ssl`` module with this OpenSSL: the rest is uvloop's SSL protocol and
the service's own connection.

It also prints what a fresh server ``SSLObject`` with its two ``MemoryBIO``s costs before any
handshake (``SSL_new`` and Python's wrappers): the part of that floor no handshake, cipher or
option choice can shrink.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import ssl
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from make_test_cert import write  # noqa: E402  (this folder is on sys.path as a script)

from service.worker.tls import server_context  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    gc.collect()
    _libc.malloc_trim(0)
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def pair(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """A handshaken server/client pair, one request and one answer sent through it."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    for _ in range(10):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
        if done == 2 and not c_out.pending and not s_out.pending:
            break
    else:
        raise RuntimeError("the in-memory handshake did not finish")
    c.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    s_in.write(c_out.read())
    s.read(4096)
    s.write(b"Welcome!\n")
    c_in.write(s_out.read())
    c.read(4096)
    return (s, s_in, s_out), (c, c_in, c_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="connection pairs")
    ap.add_argument(
        "--tls12-cipher",
        default="",
        help="the clients offer only TLS 1.2 with this OpenSSL cipher name "
        "(e.g. ECDHE-ECDSA-CHACHA20-POLY1305); default: TLS 1.3, as a browser",
    )
    args = ap.parse_args()
    files = write(Path(tempfile.mkdtemp(prefix="tls-memory-")))
    server = server_context(str(files["cert"]), str(files["key"]))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(str(files["ca"]))
    if args.tls12_cipher:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        client.set_ciphers(args.tls12_cipher)
    base = heap_in_use()
    fresh = [
        server.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True) for _ in range(args.n)
    ]
    fresh_bytes = heap_in_use() - base
    del fresh
    base = heap_in_use()
    pairs = [pair(server, client) for _ in range(args.n)]
    both = heap_in_use()
    servers = [p[0] for p in pairs]
    del pairs
    server_side = heap_in_use()
    first = servers[0][0]
    assert isinstance(first, ssl.SSLObject)
    print(
        f"{ssl.OPENSSL_VERSION}, {first.version()} {first.cipher()[0]}, n={args.n}: "  # type: ignore[index]
        f"pair {(both - base) / args.n:,.0f} B, "
        f"server side {(server_side - base) / args.n:,.0f} B; "
        f"a fresh server SSLObject before its handshake {fresh_bytes / args.n:,.0f} B"
    )


if __name__ == "__main__":
    main()
