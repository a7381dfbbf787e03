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

``--raw`` is a second floor, below uvloop's transports: the loop watches the listener and one
``select.epoll`` of all the held sockets, and each connection is its socket and nothing else
(``accept``, one ``recv`` of the head, one ``send`` of the answer, ``epoll_ctl`` to hear its
close). It is what a Python accept path outside uvloop's transports could not go below (issue 14
asks the service for half its CPU per accept; docs/benchmarks.md, "Below uvloop's transports").
A write the kernel does not take whole is dropped there (the floor has no buffers).
"""

from __future__ import annotations

import _socket
import argparse
import asyncio
import random
import select
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
IP_FREEBIND = 15  # linux/in.h; the socket module does not export it
HELD: set[asyncio.BaseTransport] = set()
RAW: dict[int, _socket.socket] = {}  # --raw: the held sockets by descriptor


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


class Raw:
    """--raw: every connection a bare socket in one epoll; no transport, no protocol object."""

    def __init__(self, sock: socket.socket) -> None:
        self.listener = sock
        self.epoll = select.epoll()
        self.waiting: set[int] = set()  # accepted, head not here yet (no TCP_DEFER_ACCEPT)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self.on_accept)
        loop.add_reader(self.epoll.fileno(), self.on_events)

    @staticmethod
    def greet(s: _socket.socket) -> bool:
        """Read the head (whatever came) and answer it; False if nothing came yet."""
        try:
            data = s.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not data:
            raise ConnectionResetError
        s.send(WELCOME, socket.MSG_DONTWAIT)
        return True

    def on_accept(self) -> None:
        accept, register, greet = self.listener._accept, self.epoll.register, self.greet
        family = self.listener.family
        for _ in range(256):  # then let the loop turn
            try:
                fd, _ = accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: the floor just stops taking more
                print(f"accept: {exc}", flush=True)
                return
            s = _socket.socket(family, socket.SOCK_STREAM, 0, fd)  # no detection: 3 syscalls
            try:
                if not greet(s):
                    self.waiting.add(fd)
            except OSError:
                s.close()
                continue
            RAW[fd] = s
            register(fd, select.EPOLLIN | select.EPOLLRDHUP)

    def on_events(self) -> None:
        for fd, ev in self.epoll.poll(0, 1024):
            s = RAW.get(fd)
            if s is None:
                continue
            if fd in self.waiting and not ev & (select.EPOLLRDHUP | select.EPOLLHUP):
                try:
                    if self.greet(s):
                        self.waiting.discard(fd)
                    continue
                except OSError:
                    pass
            # A stream client only listens: bytes or its end close the connection.
            self.waiting.discard(fd)
            self.epoll.unregister(fd)
            del RAW[fd]
            s.close()


def send_all(data: bytes) -> int:
    """Write ``data`` to every held connection; how many there are."""
    for t in HELD:
        t.write(data)  # type: ignore[attr-defined]
    for s in RAW.values():
        try:
            s.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass  # full or gone: its close comes through the epoll
    return len(HELD) + len(RAW)


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
    held = send_all(message)
    print(f"broadcast {held} {(time.perf_counter() - t0) * 1000:.1f}", flush=True)


def ping(loop: asyncio.AbstractEventLoop, every: float) -> None:
    send_all(PING)
    loop.call_later(every, ping, loop, every)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, required=True, help="port to listen on")
    ap.add_argument("--ping", type=float, default=0.0, help="seconds between pings (0: none)")
    ap.add_argument("--reuseport", action="store_true", help="share the port (SO_REUSEPORT)")
    ap.add_argument(
        "--freebind",
        action="store_true",
        help="listen on --host before the address exists (IP_FREEBIND): comet-bench --netns "
        "adds the bridge's address only when its run starts",
    )
    ap.add_argument(
        "--raw",
        action="store_true",
        help="hold bare sockets in one epoll instead of uvloop transports (the lower floor)",
    )
    ap.add_argument(
        "--defer-accept",
        type=int,
        default=0,
        metavar="S",
        help="TCP_DEFER_ACCEPT seconds on the listener, as the service's --defer-accept (0: off)",
    )
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
    if args.freebind:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    if args.defer_accept:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, args.defer_accept)
    sock.bind((args.host, args.port))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, broadcast, args.message_file)
    if args.ping > 0:
        # The first ping at a random phase of the interval, as each service worker's first
        # sweep: neither starts by pinging everything at one instant of a measurement.
        loop.call_later(random.uniform(0, args.ping), ping, loop, args.ping)
    if args.raw:
        sock.listen(65535)
        Raw(sock).start(loop)
        print("listening on http (raw)", flush=True)
        await asyncio.Event().wait()
        return
    server = await loop.create_server(Bare, sock=sock, backlog=65535)
    print("listening on http", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
