"""``python -m loadgen.engine.child``: one engine process of a pool, driven over JSON lines on
stdin/stdout; it exits when its stdin closes (the parent died)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from loadgen.engine.config import EngineConfig
from loadgen.engine.engine import Engine
from loadgen.engine.sources import nofile_capacity, parse_source_ips
from service.jsonlines import Handler, Message, Peer
from service.proctitle import set_name


class ChildOps:
    """What the pool asks an engine process (JSON lines over stdin/stdout, :class:`Peer`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def table(self) -> dict[str, Handler]:
        return {
            "set": self.set,
            "restart": self.restart,
            "reset_latency": self.reset_latency,
            "stats": self.stats,
        }

    async def set(self, msg: Message) -> Message:
        self.engine.set_config(
            EngineConfig(
                n=int(msg["n"]),
                host=str(msg["host"]),
                port=int(msg["port"]),
                path=str(msg["path"]),
                concurrency=int(msg["concurrency"]),
                head_timeout=float(msg["head_timeout"]),
                tls=bool(msg.get("tls", False)),
                tls_ca=str(msg.get("tls_ca", "")),
                coalesce=float(msg.get("coalesce", 0.0)),
            )
        )
        return {}

    async def restart(self, msg: Message) -> Message:
        self.engine.restart()
        return {}

    async def reset_latency(self, msg: Message) -> Message:
        self.engine.reset_latency()
        return {}

    async def stats(self, msg: Message) -> Message:
        return {"stats": self.engine.stats().to_wire()}


async def _child_main(index: int, source_ips: list[str]) -> None:
    nofile_capacity()
    loop = asyncio.get_running_loop()
    engine = Engine(EngineConfig(), source_ips, offset=index * 7)
    engine.start()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    peer = Peer(reader, writer, ChildOps(engine).table(), name=f"engine process {index}")
    await peer.run()  # until the parent closes our stdin (or dies)
    await engine.close()


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass


def child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen.engine.child", description="internal: one engine process of a pool"
    )
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--source-ips", default="none")
    args = parser.parse_args(argv)
    # A terminal's Ctrl-C or hang-up reaches the whole process group: the parent decides, and
    # stops its engine processes by closing their stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    install_uvloop()
    set_name(f"comet-engine {args.index}")  # top's column; `ps -o args` keeps the command line
    try:
        asyncio.run(_child_main(args.index, parse_source_ips(args.source_ips)))
    except KeyboardInterrupt:
        pass
    os._exit(0)


if __name__ == "__main__":
    child_main()
