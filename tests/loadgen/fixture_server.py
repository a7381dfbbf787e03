"""A tiny streaming server for the load generator's unit tests (and for ``--target`` tests).

``GET /<anything>`` → 200 chunked ``Welcome!\\n``, ``ping\\n`` every ``--ping`` seconds, and each
published message as a line. ``GET /publish?data=...`` publishes to every stream and answers the
number of recipients. ``--serve N`` answers only the first N streams and leaves later ones
unanswered until their client gives up (a server that stops taking connections: a stalled ramp).
Run: ``python tests/loadgen/fixture_server.py --port P`` (prints the port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from urllib.parse import parse_qs, urlsplit


class Hub:
    def __init__(self, serve: int = 0) -> None:
        self.streams: set[asyncio.StreamWriter] = set()
        self.serve = serve  # 0: every stream
        self.served = 0

    def publish(self, data: str) -> int:
        line = data.encode() + b"\n"
        chunk = b"%x\r\n%s\r\n" % (len(line), line)
        for w in list(self.streams):
            w.write(chunk)
        return len(self.streams)


async def handle(hub: Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    target = head.split(b" ")[1].decode()
    parts = urlsplit(target)
    if parts.path == "/publish":
        data = parse_qs(parts.query).get("data", [""])[0]
        n = hub.publish(data)
        body = f"{n}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        writer.close()
        return
    if parts.path == "/bad":
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()
        return
    hub.served += 1
    if hub.serve and hub.served > hub.serve:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # never answered: until the client gives up
        writer.close()
        return
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n9\r\nWelcome!\n\r\n"
    )
    hub.streams.add(writer)
    try:
        await reader.read()  # until the client closes
    except ConnectionError:
        pass
    finally:
        hub.streams.discard(writer)
        writer.close()


async def main(port: int, ping: float, serve: int) -> None:
    hub = Hub(serve)
    server = await asyncio.start_server(
        lambda r, w: handle(hub, r, w), "127.0.0.1", port, backlog=4096
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def pinger() -> None:
        while True:
            await asyncio.sleep(ping)
            hub.publish("ping")

    task = asyncio.create_task(pinger())
    await stop.wait()
    task.cancel()
    server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ping", type=float, default=1.0)
    p.add_argument("--serve", type=int, default=0, help="answer only the first N streams")
    a = p.parse_args()
    asyncio.run(main(a.port, a.ping, a.serve))
