"""``python -m loadgen.engine.child``: one engine process of a pool, driven over JSON lines on
stdin/stdout; it exits when its stdin closes (the parent died)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from loadgen.engine.config import EngineConfig
from loadgen.engine.engine import Engine
from loadgen.engine.sources import nofile_capacity, parse_source_ips


async def _child_main(index: int, source_ips: list[str]) -> None:
    nofile_capacity()
    loop = asyncio.get_running_loop()
    engine = Engine(EngineConfig(), source_ips, offset=index * 7)
    engine.start()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "set":
                engine.set_config(
                    EngineConfig(
                        n=int(msg["n"]),
                        host=str(msg["host"]),
                        port=int(msg["port"]),
                        path=str(msg["path"]),
                        concurrency=int(msg["concurrency"]),
                        head_timeout=float(msg["head_timeout"]),
                        tls=bool(msg.get("tls", False)),
                        tls_ca=str(msg.get("tls_ca", "")),
                    )
                )
                answer: dict[str, Any] = {"ok": True}
            elif op == "restart":
                engine.restart()
                answer = {"ok": True}
            elif op == "reset_latency":
                engine.reset_latency()
                answer = {"ok": True}
            elif op == "stats":
                answer = {"ok": True, "stats": engine.stats().to_wire()}
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": str(exc)}
        # Answers are small and the parent reads them at once: a blocking write is fine.
        try:
            out.write(json.dumps(answer).encode() + b"\n")
            out.flush()
        except BrokenPipeError:
            break  # the parent stopped listening (it is shutting down): nothing to answer
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
    try:
        asyncio.run(_child_main(args.index, parse_source_ips(args.source_ips)))
    except KeyboardInterrupt:
        pass
    os._exit(0)


if __name__ == "__main__":
    child_main()
