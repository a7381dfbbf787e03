"""The load-generator agent: a pool of engines behind the classic fleet control API.

``GET /`` → stats JSON, ``GET /healthz`` → whether every engine process runs (cheap: no engine
is asked), ``GET /set?n=&host=&port=&path=&concurrency=&head_timeout=&tls=`` (``ip`` is
an alias of ``host``, as in the classic fleet scripts) → the new config, ``GET /restart`` → drop
every connection and reconnect to ``n``. A bad parameter gets a 400 with a JSON error naming it;
the control server never sends a traceback.

Every request passes the agent's :class:`~loadgen.guard.Guard` first: a token when one is
configured (``Authorization: Bearer`` or ``?token=``), no cross-site browser requests, and every
new target must be on the allow-list and ``n`` within what the host can hold.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from loadgen.engine.child import install_uvloop
from loadgen.engine.config import MAX_COALESCE, EngineConfig
from loadgen.engine.pool import Pool, ProcessPool, make_pool
from loadgen.guard import Guard, Refusal, resolve

_HOST_RE = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,253}$")
_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,2047}$")
MAX_N = 10_000_000
MAX_HEAD = 16384
MAX_HEADERS = 100
TIMEOUT_HEAD = 10.0
PARAMS = ("n", "host", "ip", "port", "path", "concurrency", "head_timeout", "tls", "coalesce")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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


def _seconds(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise BadParam(name, f"expected seconds, got {raw!r}") from None
    if not lo <= value <= hi:  # also refuses nan
        raise BadParam(name, f"must be {lo:g}..{hi:g} seconds, got {raw}")
    return value


def apply_params(config: EngineConfig, params: list[tuple[str, str]]) -> EngineConfig:
    """A copy of ``config`` with the query parameters applied; BadParam names the first bad one."""
    changes: dict[str, Any] = {}
    seen: set[str] = set()
    for name, raw in params:
        if name in seen or (name in ("host", "ip") and {"host", "ip"} & seen):
            raise BadParam(name, "given more than once")
        seen.add(name)
        if name == "n":
            changes["n"] = _int(name, raw, 0, MAX_N)
        elif name in ("host", "ip"):
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
        elif name == "head_timeout":
            changes["head_timeout"] = _seconds(name, raw, 0.1, 600)
        elif name == "coalesce":
            changes["coalesce"] = _seconds(name, raw, 0, MAX_COALESCE)
        elif name == "tls":
            if raw not in ("0", "1"):
                raise BadParam(name, f"expected 0 or 1, got {raw!r}")
            changes["tls"] = raw == "1"
        else:
            raise BadParam(name, f"unknown parameter (use {', '.join(PARAMS)})")
    return replace(config, **changes)


@dataclass
class AgentOptions:
    """Everything ``comet-loadgen agent`` was told, made once from the command line."""

    config: EngineConfig
    source_ips: list[str]
    procs: str | int = "auto"
    bind: str = "127.0.0.1"
    port: int = 8889
    guard: Guard = field(default_factory=Guard)


def _header_lines(head: bytes) -> tuple[str, dict[str, str]] | Refusal:
    """The request line and the headers (names lower-cased) of a head, or why it is refused."""
    lines = head[:-4].split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        return Refusal(431, f"more than {MAX_HEADERS} request headers")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not name or name != name.strip():
            return Refusal(400, "malformed header line")
        key = name.decode("latin-1").lower()
        if key in headers and key in ("authorization", "host", "origin", "sec-fetch-site"):
            return Refusal(400, f"header {key} given more than once")
        headers[key] = value.strip().decode("latin-1")
    return lines[0].decode("latin-1"), headers


class Agent:
    """The control API over one pool, behind a :class:`Guard`."""

    def __init__(self, pool: Pool, guard: Guard | None = None) -> None:
        self.pool = pool
        self.guard = guard or Guard()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, bind: str, port: int) -> int:
        # The starting target passes the same checks as a /set.
        refusal = await self._check_config(self.pool.config)
        if refusal is not None:
            raise ValueError(refusal.error)
        # Control port first: if it is taken, fail before any connection is opened.
        self.server = await asyncio.start_server(self._handle, bind, port, limit=MAX_HEAD)
        await self.pool.start()
        sock = self.server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self.pool.close()

    def health(self) -> tuple[int, dict[str, Any]]:
        """Whether every engine process runs, without asking any of them: ``GET /`` merges
        every engine's counters, which took over the container health check's 5 s at a
        million on a busy host."""
        children = self.pool.children if isinstance(self.pool, ProcessPool) else []
        dead = sum(1 for c in children if c.proc.returncode is not None)
        body = {"ok": dead == 0, "procs": self.pool.procs, "dead": dead, "n": self.pool.config.n}
        return (200 if dead == 0 else 503), body

    async def stats(self) -> dict[str, Any]:
        stats = await self.pool.stats()
        restarts = getattr(self.pool, "respawned", 0)
        return stats.public(self.pool.config, self.pool.procs, restarts)

    def config_answer(self, config: EngineConfig) -> dict[str, Any]:
        """The config as JSON, with the classic fleet scripts' keys (``ip``, ``controlPort``)."""
        return {**asdict(config), "ip": config.host, "controlPort": self.port}

    async def _check_config(self, config: EngineConfig, held: int = 0) -> Refusal | None:
        loop = asyncio.get_running_loop()
        try:
            addresses = await loop.run_in_executor(None, resolve, config.host)
        except OSError:
            addresses = []
        return self.guard.check_config(config, addresses, held)

    async def route(
        self, method: str, target: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request: (status, JSON body)."""
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"method {method} not allowed (use GET)"}
        parts = urlsplit(target)
        try:
            params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            return 400, {"error": f"query: {exc}"}
        tokens = [v for k, v in params if k == "token"]
        if len(tokens) > 1:
            return 400, {"error": "token: given more than once", "param": "token"}
        params = [(k, v) for k, v in params if k != "token"]
        refusal = self.guard.check_request(headers or {}, tokens[0] if tokens else None)
        if refusal is not None:
            return refusal.status, {"error": refusal.error}
        if parts.path == "/":
            return 200, await self.stats()
        if parts.path == "/healthz":
            return self.health()
        if parts.path == "/set":
            try:
                new = apply_params(self.pool.config, params)
            except BadParam as exc:
                return 400, {"error": str(exc), "param": exc.name}
            # What is open already is in use already: a step from 900,000 to 1,000,000 needs
            # memory for 100,000 more, not for a million.
            held = (await self.pool.stats()).clients
            refusal = await self._check_config(new, held)
            if refusal is not None:
                return refusal.status, {"error": refusal.error, "param": refusal.param}
            await self.pool.set_config(new)
            # The latency counters are per run, and a /set starts one.
            await self.pool.reset_latency()
            return 200, self.config_answer(new)
        if parts.path == "/restart":
            await self.pool.restart()
            return 200, {"ok": True, "config": self.config_answer(self.pool.config)}
        return 404, {"error": f"unknown path {parts.path!r} (use /, /set, /restart, /healthz)"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            try:
                async with asyncio.timeout(TIMEOUT_HEAD):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                status, body = 408, {"error": f"request head not received in {TIMEOUT_HEAD:g} s"}
            except asyncio.LimitOverrunError:
                status, body = 431, {"error": f"request head over {MAX_HEAD} bytes"}
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            else:
                status, body, method = await self._answer(head)
            data = json.dumps(body).encode() + b"\n"
            head_out = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n"
                "Cache-Control: no-cache\r\nConnection: close\r\n"
            )
            if status == 405:
                head_out += "Allow: GET, HEAD\r\n"
            elif status == 401:
                head_out += "WWW-Authenticate: Bearer\r\n"
            writer.write(head_out.encode() + b"\r\n" + (b"" if method == "HEAD" else data))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[int, dict[str, Any], str]:
        parsed = _header_lines(head)
        if isinstance(parsed, Refusal):
            return parsed.status, {"error": parsed.error}, "GET"
        request_line, headers = parsed
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, {"error": "malformed request line"}, "GET"
        method = parts[0]
        try:
            status, body = await self.route(method, parts[1], headers)
        except Exception as exc:  # noqa: BLE001 - the client gets a clean 500, never a traceback
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
        return status, body, method


async def run_agent(options: AgentOptions, ready: asyncio.Event | None = None) -> None:
    """Run an agent until SIGINT, SIGTERM or SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers before anything is spawned: a signal during start-up still stops the agent.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    options.guard.resolve_names()
    agent = Agent(make_pool(options.config, options.source_ips, options.procs), options.guard)
    try:
        starting = asyncio.ensure_future(agent.start(options.bind, options.port))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            return
        stopping.cancel()
        actual = starting.result()
        c = options.config
        auth = "token required" if options.guard.token else "no token"
        print(
            f"comet-loadgen agent: control API on http://{options.bind}:{actual}/ "
            f"(target {c.host}:{c.port}{c.path}, n={c.n}; {auth}; targets allowed: "
            f"{', '.join(str(r) for r in options.guard.rules)})",
            flush=True,
        )
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await agent.close()


def main_agent(options: AgentOptions) -> None:
    install_uvloop()
    asyncio.run(run_agent(options))
