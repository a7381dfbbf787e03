"""The Python a worker spends on one new subscriber, without sockets: a ``Conn`` of a real
worker's class (``Conn.subclass_for`` on a real ``Hub``) is made, told of its connection and
given a request head, with a transport that only counts what it is given.

    .venv/bin/python benchmarks/conn_path.py [--n 50000] [--rounds 5] [--head RAW]

Two paths are timed, each over fresh connections kept until the round ends (as a worker keeps
its streams): ``connection_made`` then ``data_received`` (uvloop's transports call these), and
``Conn.accepted`` (the raw plane's one step). The first connection of each round parses the head
and every later one finds it in the worker's ``Conn.heads``; ``--fresh`` empties that cache
before each connection, so every one parses (the cost of heads that never repeat).
(docs/benchmarks.md, "A head seen before".)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository's packages

from service.config import Config  # noqa: E402
from service.worker.hub import Hub  # noqa: E402
from service.worker.protocol import Conn  # noqa: E402

DEFAULT_HEAD = "GET / HTTP/1.1\\r\\nHost: 127.0.0.1:8888\\r\\n\\r\\n"  # comet_clients.py's


class CountingTransport:
    """What ``Conn`` calls of a transport; it keeps only the number of bytes written."""

    __slots__ = ("written", "closing")

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def one_round(cls: type[Conn], head: bytes, n: int, path: str, fresh: bool) -> float:
    """Microseconds per connection over ``n`` new ones."""
    kept: list[Any] = []
    heads = cls.heads
    t0 = time.perf_counter()
    for _ in range(n):
        if fresh:
            heads.clear()
        t = CountingTransport()
        c = cls()
        if path == "accepted":
            c.accepted(t, head)  # type: ignore[arg-type]
        else:
            c.connection_made(t)  # type: ignore[arg-type]
            c.data_received(head)
        kept.append(c)
    us = (time.perf_counter() - t0) / n * 1e6
    if not kept[-1].transport.written or kept[-1].transport.closing:
        raise SystemExit(f"the head was not answered with a stream: {head!r}")
    return us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="connections per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per path (medians reported)")
    ap.add_argument(
        "--head",
        default=DEFAULT_HEAD,
        help="the request head, with \\r\\n written as such (default: the load generator's)",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="no head found in the cache: every one is parsed"
    )
    args = ap.parse_args()
    if args.n < 1 or args.rounds < 1:
        ap.error("--n and --rounds must be at least 1")
    head = args.head.encode().decode("unicode_escape").encode("latin-1")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    hub = Hub(Config(limit_connections=10 * args.n * args.rounds), loop)
    for path in ("connection_made + data_received", "accepted"):
        times = []
        for _ in range(args.rounds):
            cls = Conn.subclass_for(hub)  # a fresh cache: the first head of a round parses
            hub.streams.clear()
            hub.counters.conns = 0
            times.append(one_round(cls, head, args.n, path, args.fresh))
        print(
            f"{path}: median {statistics.median(times):.2f} µs per connection "
            f"(min {min(times):.2f}, {args.rounds} rounds of {args.n})",
            flush=True,
        )
    loop.close()


if __name__ == "__main__":
    main()
