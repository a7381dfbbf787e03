"""The floor: the leanest uvloop Protocol that holds a stream and writes to all of them.

It answers any request with the same Welcome! head and keeps the connection; no parsing, no
hub, no state. SIGUSR1 writes one chunk, ``BCAST\n``, to every connection it holds, in one loop
turn, and prints the milliseconds it took; with ``--message-file PATH`` the chunk is that file's
contents as one line instead (so a load generator can time it: benchmarks/floor_million.sh).
``--ping S`` writes ``ping\n`` to every connection every S seconds, also in one loop turn (the
least a server can do to keep idle streams alive, as the service does every --ping-interval),
the first at a random phase of the interval like the service's. ``--reuseport`` lets several
copies share the port, as the service's workers do. Its RSS and CPU per connection are what
uvloop and the kernel cost; benchmarks/worker_bench.py gives every figure of the service as a
ratio to this one's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import time

import uvloop

from service.config import raise_nofile_limit

WELCOME = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n9\r\nWelcome!\n\r\n"
)


MESSAGE = b"6\r\nBCAST\n\r\n"
PING = b"5\r\nping\n\r\n"
HELD: set[asyncio.BaseTransport] = set()


class Bare(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        HELD.add(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(WELCOME)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        HELD.discard(self.transport)


def chunk(line: bytes) -> bytes:
    """One line (newline added) as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\n\r\n" % (len(line) + 1, line)


def broadcast(message_file: str | None) -> None:
    t0 = time.perf_counter()
    message = MESSAGE
    if message_file is not None:
        try:
            with open(message_file, "rb") as f:
                message = chunk(f.read().strip())
        except OSError as e:
            print(f"broadcast: cannot read --message-file: {e}", flush=True)
            return
    for t in HELD:
        t.write(message)  # type: ignore[attr-defined]
    print(f"broadcast {len(HELD)} {(time.perf_counter() - t0) * 1000:.1f}", flush=True)


def ping(loop: asyncio.AbstractEventLoop, every: float) -> None:
    for t in HELD:
        t.write(PING)  # type: ignore[attr-defined]
    loop.call_later(every, ping, loop, every)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, required=True, help="port to listen on")
    ap.add_argument("--ping", type=float, default=0.0, help="seconds between pings (0: none)")
    ap.add_argument("--reuseport", action="store_true", help="share the port (SO_REUSEPORT)")
    ap.add_argument(
        "--message-file",
        metavar="PATH",
        help="SIGUSR1 sends this file's contents as one line (default: BCAST)",
    )
    args = ap.parse_args()
    raise_nofile_limit()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, broadcast, args.message_file)
    if args.ping > 0:
        # The first ping at a random phase of the interval, as each service worker's first
        # sweep: neither starts by pinging everything at one instant of a measurement.
        loop.call_later(random.uniform(0, args.ping), ping, loop, args.ping)
    server = await loop.create_server(Bare, sock=sock, backlog=65535)
    print("listening on http", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
