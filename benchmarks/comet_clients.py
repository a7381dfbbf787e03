"""Hold N Comet subscriber connections from one process; report counts on request.

The observer the tests and the server benchmarks use (loadgen's engine is the load generator:
it keeps n connections open and reconnects; this one never reconnects and counts raw bytes, so
a test sees exactly what the server sent: welcomes, markers, drain hints, ``retry:`` values).
Run one per
~15,000 connections (a process cannot hold more than its RLIMIT_NOFILE of sockets) and spread
them over 127.0.0.x source addresses with IP_BIND_ADDRESS_NO_PORT, so the 64k ports of one
source address never run out.

    python benchmarks/comet_clients.py --port 8888 --n 10000 --sources 127.0.0.2,127.0.0.3

Reads commands on stdin, one per line, and answers each with one JSON line on stdout:
``stats`` → counts; ``quit`` (or end of input) → close everything and exit.
Counted in the stream: the first body bytes (``ready``), ``Welcome!``, the marker (default
``BCAST``, one per broadcast that carries it; a marker followed by a number, ``BCAST 7``, must
come 1, 2, 3... on every connection, and ``seq_gaps`` / ``seq_dups`` count where it did not),
the drain hint (SSE ``event: reconnect``, plain
``reconnect`` line) and ``retry:`` lines. ``--tls`` speaks HTTPS (the certificate is not
checked: a benchmark's throw-away one); ``--tokens-file`` gives connection i the token on line
i (``?token=``), as an application's users would each have their own.

``--resume`` (SSE) makes it a well-behaved EventSource instead: a connection that ends (the
service crashed, restarted, drained) comes back after its last ``retry:`` delay, or after
``Retry-After`` when refused with a 503, with ``Last-Event-ID`` set to the last id it saw, and
its numbered markers must go on without a gap across it. Counted then: ``up`` (welcomed and
open now), ``resumes``, ``refused_503``, ``connect_failures``, ``resets`` (``event: reset``)
and ``last_welcome_t`` (when the last connection came back).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import re
import resource
import socket
import ssl
import sys
import time
from typing import Any, ClassVar

IP_BIND_ADDRESS_NO_PORT = 24
RETRY_RE = re.compile(rb"retry: ?(\d+)\n")


class Counts:
    __slots__ = (
        "connected",
        "ready",
        "welcomed",
        "closed",
        "errors",
        "msgs",
        "first_msg_t",
        "last_msg_t",
        "reconnects",
        "retries",
        "ramp_done_t",
        "start_t",
        "bytes",
        "retry_values",
        "seq_gaps",
        "seq_dups",
        "up",
        "resumes",
        "refused_503",
        "connect_failures",
        "resets",
        "last_welcome_t",
        "error_kinds",
        "early_ends",
    )

    def __init__(self) -> None:
        self.connected = self.ready = self.welcomed = self.closed = self.errors = 0
        self.msgs = self.reconnects = self.retries = self.bytes = 0
        self.first_msg_t = self.last_msg_t = 0.0
        self.ramp_done_t = 0.0
        self.retry_values: set[int] = set()  # distinct `retry:` hints seen (jitter check)
        # Markers followed by a number ("BCAST 7"): per connection they must come 1, 2, 3...
        self.seq_gaps = self.seq_dups = 0
        self.start_t = time.time()
        self.up = self.resumes = self.refused_503 = self.connect_failures = self.resets = 0
        self.last_welcome_t = 0.0
        self.error_kinds: collections.Counter[str] = collections.Counter()  # why, by errno name
        self.early_ends = 0  # connections that ended before their welcome (tried again)


class Slot:
    """What a resuming subscriber keeps across its connections (``--resume``)."""

    __slots__ = ("seq", "last_id", "retry_ms", "retry_after", "lost", "lives", "first")

    def __init__(self) -> None:
        self.seq = 0  # the last numbered marker seen, over every connection
        self.last_id: int | None = None  # the last SSE id seen (Last-Event-ID)
        self.retry_ms = 3000  # the latest retry: hint
        self.retry_after = 0.0  # a 503's Retry-After, for the next attempt only
        self.lost: asyncio.Future[None] | None = None
        self.lives = 0
        # While connecting (not --resume): True at the welcome, False if it ended before one.
        self.first: asyncio.Future[bool] | None = None


CONNECT_ATTEMPTS = 8
ID_RE = re.compile(rb"\nid: (\d+)\n")
RETRY_AFTER_RE = re.compile(rb"\r\nRetry-After: (\d+)\r\n")


class Client(asyncio.Protocol):
    __slots__ = ("counts", "marker", "hint", "tail", "welcomed", "transport", "request", "slot")
    # What makes a connection held (--welcome); b"" is its first bytes, for a server that
    # greets no one (Nchan's raw stream sends its head and then nothing until a message).
    welcome: ClassVar[bytes] = b"Welcome!"

    def __init__(
        self, counts: Counts, marker: bytes, hint: bytes, request: bytes, slot: Slot | None = None
    ) -> None:
        self.counts = counts
        self.marker = marker
        self.hint = hint
        self.request = request
        self.tail: bytes | None = None  # None until the first bytes arrive
        self.welcomed = False
        # The last numbered marker (and SSE id, retry hint) this subscriber got: kept across
        # connections with --resume, this connection's own otherwise.
        self.slot = slot if slot is not None else Slot()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.counts.connected += 1
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        c = self.counts
        c.bytes += len(data)
        slot = self.slot
        if self.tail is None:
            self.tail = b""
            c.ready += 1
            if data.startswith(b"HTTP/1.1 503"):
                c.refused_503 += 1
                m = RETRY_AFTER_RE.search(data)
                slot.retry_after = float(m.group(1)) if m else 1.0
        # Keep a few bytes of the previous chunk so a pattern split across reads still counts.
        buf = self.tail + data
        head = len(self.tail)
        self.tail = buf[-16:]
        if not self.welcomed and self.welcome in buf:
            self.welcomed = True
            c.welcomed += 1
            c.up += 1
            c.last_welcome_t = time.time()
            if slot.lives > 1:
                c.resumes += 1
            if slot.first is not None:
                slot.first.set_result(True)
                slot.first = None
        if b"id: " in buf:
            for m in ID_RE.finditer(buf):
                if m.end() > head:
                    slot.last_id = int(m.group(1))
        c.resets += buf.count(b"event: reset") - _count_in_head(buf, b"event: reset", head)
        n = buf.count(self.marker) - _count_in_head(buf, self.marker, head)
        if n:
            for m in re.finditer(re.escape(self.marker) + rb" (\d+)\n", buf):
                if m.end() <= head:
                    continue  # wholly in the carried-over tail: seen with the previous chunk
                got = int(m.group(1))
                if got <= slot.seq:
                    c.seq_dups += 1
                elif got != slot.seq + 1:
                    c.seq_gaps += 1
                slot.seq = max(slot.seq, got)
            now = time.time()
            c.msgs += n
            if not c.first_msg_t:
                c.first_msg_t = now
            c.last_msg_t = max(c.last_msg_t, now)
        c.reconnects += buf.count(self.hint) - _count_in_head(buf, self.hint, head)
        retries = buf.count(b"retry:") - _count_in_head(buf, b"retry:", head)
        if retries:
            c.retries += retries
            for m in RETRY_RE.finditer(buf):
                slot.retry_ms = int(m.group(1))
                if len(c.retry_values) < 1000:
                    c.retry_values.add(slot.retry_ms)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot.first is not None:  # ended before its welcome: connect_all tries again
            self.counts.connected -= 1
            self.counts.early_ends += 1
            self.slot.first.set_result(False)
            self.slot.first = None
            return
        self.counts.closed += 1
        if self.welcomed:
            self.counts.up -= 1
        lost = self.slot.lost
        if lost is not None and not lost.done():
            lost.set_result(None)


def _count_in_head(buf: bytes, pat: bytes, head: int) -> int:
    """Occurrences lying wholly inside the carried-over tail (already counted last time)."""
    return buf[:head].count(pat) if head >= len(pat) else 0


async def connect_all(
    args: argparse.Namespace, counts: Counts, keep: set[asyncio.Transport]
) -> None:
    loop = asyncio.get_running_loop()
    sources = args.sources.split(",")
    headers = f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
    if args.sse:
        headers += "Accept: text/event-stream\r\n"
    marker = args.marker.encode()
    Client.welcome = args.welcome.encode()
    tokens: list[str] = []
    if args.tokens_file:
        with open(args.tokens_file) as f:
            tokens = [t.strip() for t in f if t.strip()]
    ctx = None
    if args.tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

    def request(i: int, last_id: int | None = None) -> bytes:
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        if not tokens:
            return (headers + resume + "\r\n").encode()
        sep = "&" if "?" in args.path else "?"
        line = f"GET {args.path}{sep}token={tokens[i % len(tokens)]} HTTP/1.1\r\n"
        return (line + headers.split("\r\n", 1)[1] + resume + "\r\n").encode()

    # The drain hint: an SSE `reconnect` event, or the plain stream's final `reconnect` line.
    hint = b"event: reconnect\n" if args.sse else b"reconnect\n"
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> None:
        async with sem:
            for attempt in range(CONNECT_ATTEMPTS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((sources[i % len(sources)], 0))
                    await loop.sock_connect(sock, (args.host, args.port))
                    slot = Slot()
                    welcomed = slot.first = loop.create_future()
                    transport, _ = await loop.create_connection(
                        lambda slot=slot: Client(counts, marker, hint, request(i), slot),
                        sock=sock,
                        ssl=ctx,
                        server_hostname=args.host if ctx else None,
                    )
                except OSError as exc:
                    sock.close()
                    kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                    counts.error_kinds[kind] += 1
                    if attempt == CONNECT_ATTEMPTS - 1:
                        counts.errors += 1
                        return
                    # A storm of connects (a million at once) overflows accept queues now and
                    # then: back off, doubling, up to 3 s (~15 s in all).
                    await asyncio.sleep(min(3.0, 0.2 * 2**attempt))
                    continue
                keep.add(transport)
                # Held once welcomed. In a storm of connects a request can reach the server
                # after its head deadline (a dropped ACK's data retransmitted seconds later):
                # the 408 ends it before the welcome, and a client tries again.
                if await welcomed:
                    return
                keep.discard(transport)
                counts.error_kinds["ended before the welcome"] += 1
                if attempt == CONNECT_ATTEMPTS - 1:
                    counts.errors += 1

    async def dial(i: int, slot: Slot) -> asyncio.Transport | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((sources[i % len(sources)], 0))
            await loop.sock_connect(sock, (args.host, args.port))
            slot.lives += 1
            transport, _ = await loop.create_connection(
                lambda: Client(counts, marker, hint, request(i, slot.last_id), slot),
                sock=sock,
                ssl=ctx,
                server_hostname=args.host if ctx else None,
            )
        except OSError:
            sock.close()
            counts.connect_failures += 1
            return None
        return transport

    again: contextlib.AbstractAsyncContextManager[Any] = (
        asyncio.Semaphore(args.reconnect_concurrency)
        if args.reconnect_concurrency > 0
        else contextlib.nullcontext()
    )

    async def resuming(i: int) -> None:
        """An EventSource: connect, and after every end come back with Last-Event-ID."""
        slot = Slot()
        first = True
        while True:
            slot.lost = loop.create_future()
            async with sem if first else again:
                transport = await dial(i, slot)
            if transport is not None:
                if first:
                    first = False
                keep.add(transport)
                await slot.lost
                keep.discard(transport)
            if slot.retry_after:
                delay, slot.retry_after = slot.retry_after, 0.0
            else:
                delay = slot.retry_ms / 1000
            await asyncio.sleep(delay)

    if args.resume:
        await asyncio.gather(*(resuming(i) for i in range(args.n)))
        return
    await asyncio.gather(*(one(i) for i in range(args.n)))
    counts.ramp_done_t = time.time()


def stats(counts: Counts, args: argparse.Namespace) -> dict[str, object]:
    return {
        "n": args.n,
        "connected": counts.connected,
        "ready": counts.ready,
        "welcomed": counts.welcomed,
        "open": counts.connected - counts.closed,
        "closed": counts.closed,
        "errors": counts.errors,
        "msgs": counts.msgs,
        "first_msg_t": counts.first_msg_t,
        "last_msg_t": counts.last_msg_t,
        "reconnects": counts.reconnects,
        "retries": counts.retries,
        "retry_values": sorted(counts.retry_values),
        "seq_gaps": counts.seq_gaps,
        "seq_dups": counts.seq_dups,
        "bytes": counts.bytes,
        "start_t": counts.start_t,
        "ramp_done_t": counts.ramp_done_t,
        "up": counts.up,
        "resumes": counts.resumes,
        "refused_503": counts.refused_503,
        "connect_failures": counts.connect_failures,
        "resets": counts.resets,
        "last_welcome_t": counts.last_welcome_t,
        "error_kinds": counts.error_kinds,
        "early_ends": counts.early_ends,
    }


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    counts = Counts()
    keep: set[asyncio.Transport] = set()
    ramp = asyncio.create_task(connect_all(args, counts, keep))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        cmd = line.decode().strip()
        if not line or cmd == "quit":
            break
        if cmd == "stats":
            sys.stdout.write(json.dumps(stats(counts, args)) + "\n")
            sys.stdout.flush()
    ramp.cancel()
    for t in keep:
        t.abort()
    await asyncio.sleep(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--host", default="127.0.0.1", help="the server's address (default: %(default)s)"
    )
    p.add_argument("--port", type=int, required=True, help="the server's port")
    p.add_argument("--path", default="/", help="the path every connection asks for (default: /)")
    p.add_argument("--n", type=int, required=True, help="connections to open and hold")
    p.add_argument("--sources", default="127.0.0.1", help="comma-separated source addresses")
    p.add_argument("--sse", action="store_true", help="ask for text/event-stream")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight at once")
    p.add_argument("--marker", default="BCAST", help="bytes counted as one received message")
    p.add_argument(
        "--welcome",
        default="Welcome!",
        help="what makes a connection held; '' is its first bytes (a server that greets no one)",
    )
    p.add_argument("--tls", action="store_true", help="HTTPS, the certificate not checked")
    p.add_argument("--tokens-file", help="subscriber tokens, one a line: connection i uses line i")
    p.add_argument(
        "--resume",
        action="store_true",
        help="come back after every end, as EventSource does (retry:, Retry-After, Last-Event-ID)",
    )
    p.add_argument(
        "--reconnect-concurrency",
        type=int,
        default=0,
        help="with --resume: reconnects in flight at once in this process (0: no limit, each "
        "subscriber on its own as browsers are; a few client processes standing in for a "
        "million browsers on one box starve their own loops without one)",
    )
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
