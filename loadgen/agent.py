"""The load-generator agent: a pool of engines behind the classic fleet control API.

``GET /`` → stats JSON, ``GET /set?n=&host=&port=&path=&concurrency=`` → the new config,
``GET /restart`` → drop every connection and reconnect to ``n``. A bad parameter gets a 400 with a
JSON error naming it; the control server never sends a traceback.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from loadgen.client import EngineConfig, Pool, install_uvloop, make_pool

_HOST_RE = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,253}$")
_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,2047}$")
MAX_N = 10_000_000
MAX_HEAD = 16384


class BadParam(ValueError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadParam(name, f"expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadParam(name, f"must be {lo}..{hi}, got {value}")
    return value


def apply_params(config: EngineConfig, params: list[tuple[str, str]]) -> EngineConfig:
    """A copy of ``config`` with the query parameters applied; BadParam names the first bad one."""
    changes: dict[str, Any] = {}
    for name, raw in params:
        if name == "n":
            changes["n"] = _int(name, raw, 0, MAX_N)
        elif name == "host":
            if not _HOST_RE.match(raw):
                raise BadParam(name, f"not a host name or address: {raw!r}")
            changes["host"] = raw.strip("[]")
        elif name == "port":
            changes["port"] = _int(name, raw, 1, 65535)
        elif name == "path":
            if not _PATH_RE.match(raw):
                raise BadParam(name, f"must start with '/' and be printable ASCII: {raw!r}")
            changes["path"] = raw
        elif name == "concurrency":
            changes["concurrency"] = _int(name, raw, 1, 100_000)
        else:
            raise BadParam(name, "unknown parameter (use n, host, port, path, concurrency)")
    return replace(config, **changes)


class Agent:
    """The control API over one pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.server: asyncio.Server | None = None

    async def start(self, bind: str, port: int) -> int:
        # Control port first: if it is taken, fail before any connection is opened.
        self.server = await asyncio.start_server(self._handle, bind, port, limit=MAX_HEAD)
        await self.pool.start()
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self.pool.close()

    async def stats(self) -> dict[str, Any]:
        stats = await self.pool.stats()
        restarts = getattr(self.pool, "respawned", 0)
        return stats.public(self.pool.config, self.pool.procs, restarts)

    async def route(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        """Answer one request: (status, JSON body)."""
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"method {method} not allowed (use GET)"}
        parts = urlsplit(target)
        try:
            params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            return 400, {"error": f"query: {exc}"}
        if parts.path == "/":
            return 200, await self.stats()
        if parts.path == "/set":
            try:
                new = apply_params(self.pool.config, params)
            except BadParam as exc:
                return 400, {"error": str(exc), "param": exc.name}
            await self.pool.set_config(new)
            return 200, asdict(new)
        if parts.path == "/restart":
            await self.pool.restart()
            return 200, {"ok": True, "config": asdict(self.pool.config)}
        return 404, {"error": f"unknown path {parts.path!r} (use /, /set, /restart)"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            except (
                TimeoutError,
                asyncio.LimitOverrunError,
                asyncio.IncompleteReadError,
                ConnectionError,
            ):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, body = 400, {"error": "malformed request line"}
                method = "GET"
            else:
                method = parts[0]
                try:
                    status, body = await self.route(method, parts[1])
                except Exception as exc:  # noqa: BLE001 - the client gets a clean 500, never a traceback
                    status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(body).encode() + b"\n"
            reason = {
                200: "OK",
                400: "Bad Request",
                404: "Not Found",
                405: "Method Not Allowed",
                500: "Internal Server Error",
            }[status]
            head_out = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nAccess-Control-Allow-Origin: *\r\n"
                "Cache-Control: no-cache\r\nConnection: close\r\n"
            )
            if status == 405:
                head_out += "Allow: GET, HEAD\r\n"
            writer.write(head_out.encode() + b"\r\n" + (b"" if method == "HEAD" else data))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def run_agent(
    config: EngineConfig,
    source_ips: list[str],
    procs: str | int,
    bind: str,
    port: int,
    ready: asyncio.Event | None = None,
) -> None:
    """Run an agent until SIGINT/SIGTERM."""
    agent = Agent(make_pool(config, source_ips, procs))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        actual = await agent.start(bind, port)
        print(
            f"comet-loadgen agent: control API on http://{bind}:{actual}/ "
            f"(target {config.host}:{config.port}{config.path}, n={config.n})",
            flush=True,
        )
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await agent.close()


def main_agent(
    config: EngineConfig, source_ips: list[str], procs: str | int, bind: str, port: int
) -> None:
    install_uvloop()
    asyncio.run(run_agent(config, source_ips, procs, bind, port))
