"""Benchmark client process: holds N idle streaming connections, reports when a marker arrives.

Driven by benchmarks/worker_bench.py over stdin/stdout (one line each way):
  stdout "READY <n>"           once every connection has read its first body bytes
  stdin  "WAIT <marker>"       start watching for <marker>
  stdout "GOT <n> <t_last>"    when all n saw it (or on timeout); t_last = time.time() of the last
  stdin  "QUIT"                close everything and exit
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import socket
import ssl
import sys
import time
from typing import Any

import uvloop

IP_BIND_ADDRESS_NO_PORT = 24


class Client(asyncio.Protocol):
    __slots__ = ("transport", "state", "tail", "__dict__")
    marker = b""
    counts = {"ready": 0, "got": 0}
    t_last = 0.0
    request = b""
    expect = 0
    all_got: asyncio.Event | None = None

    def __init__(self, request: bytes | None = None) -> None:
        if request is not None:
            self.request = request  # type: ignore[misc]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.state = 0
        self.tail = b""
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.state == 0:
            self.state = 1
            Client.counts["ready"] += 1
        if self.state == 1 and Client.marker:
            buf = self.tail + data
            if Client.marker in buf:
                self.state = 2
                Client.counts["got"] += 1
                Client.t_last = time.time()
                if Client.counts["got"] >= Client.expect and Client.all_got is not None:
                    Client.all_got.set()
            self.tail = buf[-64:]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--src", default="127.0.0.2", help="source address to bind")
    ap.add_argument("--path", default="/")
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument(
        "--tokens-file", help="one subscriber token a line; connection i adds ?token=<line i>"
    )
    ap.add_argument("--tls", action="store_true", help="HTTPS (the certificate is not checked)")
    args = ap.parse_args()
    Client.request = f"GET {args.path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    tokens: list[str] = []
    if args.tokens_file:
        with open(args.tokens_file) as f:
            tokens = [t.strip() for t in f if t.strip()]
    ctx = None
    if args.tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    count = itertools.count()
    sem = asyncio.Semaphore(args.concurrency)
    transports: list[asyncio.BaseTransport] = []

    async def one() -> None:
        async with sem:
            for attempt in range(20):
                s = socket.socket()
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((args.src, 0))
                s.setblocking(False)
                try:
                    await loop.sock_connect(s, ("127.0.0.1", args.port))
                except OSError:
                    s.close()
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                factory: Any = Client
                if tokens:
                    tok = tokens[next(count) % len(tokens)]
                    req = f"GET {args.path}?token={tok} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                    factory = functools.partial(Client, req)
                t, _ = await loop.create_connection(
                    factory, sock=s, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
                )
                transports.append(t)
                return
            raise SystemExit("could not connect")

    await asyncio.gather(*(one() for _ in range(args.n)))
    while Client.counts["ready"] < args.n:
        await asyncio.sleep(0.01)
    print(f"READY {args.n}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "QUIT":
            break
        if line[0] == "WAIT":
            Client.counts["got"] = 0
            Client.expect = args.n
            Client.all_got = asyncio.Event()
            Client.marker = line[1].encode()
            try:
                await asyncio.wait_for(Client.all_got.wait(), 30)
            except TimeoutError:
                pass
            print(f"GOT {Client.counts['got']} {Client.t_last:.6f}", flush=True)
    for t in transports:
        t.abort()  # type: ignore[attr-defined]


if __name__ == "__main__":
    uvloop.run(main())
