"""Baseline for the memory benchmark: the leanest possible uvloop Protocol that holds a stream.

It answers the same request with the same Welcome! head and keeps the connection; no parsing,
no hub, no state. Its RSS per connection is what uvloop itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop

from service.config import raise_nofile_limit

WELCOME = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n9\r\nWelcome!\n\r\n"
)


class Bare(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(WELCOME)  # type: ignore[attr-defined]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    raise_nofile_limit()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    server = await asyncio.get_running_loop().create_server(Bare, sock=sock, backlog=65535)
    print("listening on http", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
