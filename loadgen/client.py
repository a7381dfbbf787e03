"""The connection-holding engine of the load generator.

Theory of operation
-------------------
An :class:`Engine` keeps ``n`` HTTP streaming connections open to ``host:port/path``. Each
connection is one tiny :class:`StreamConn` protocol object (``__slots__``, no Task, no timer); it
reads every byte the server sends, de-chunks the body, splits it into lines and hands timed lines
(a JSON object with a numeric ``ts`` and an integer ``seq``, see docs/architecture.md) to the
engine, which records ``now - ts`` in a log-bucketed histogram and the time of the last delivery
per ``seq``.

A single 100 ms tick and every connect/close event call :meth:`Engine._fill`, which opens more
connections (at most ``concurrency`` in progress at once) while there are fewer than ``n`` and
aborts the surplus when there are more. Consecutive failures back off exponentially (up to 2 s) so a
restarting server is retried politely, and the engine climbs back to ``n`` once it is up again.

Source addresses: each connect binds to the next address of ``source_ips`` with
``IP_BIND_ADDRESS_NO_PORT`` set, so the kernel picks the source port at connect time per
(source, destination) pair and each source address gives ~28k connections per destination.

One process cannot hold more sockets than its RLIMIT_NOFILE, so :class:`ProcessPool` spreads the
engine over child processes (``python -m loadgen.client --child``) driven by JSON lines over their
stdin/stdout and merges their stats. A child exits when its stdin closes (the parent died).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

# Linux <netinet/in.h>; Python's socket module does not export it.
IP_BIND_ADDRESS_NO_PORT = 24

# File descriptors a client process keeps for itself (pipes, the loop, /proc reads).
FD_RESERVE = 200

# Latency histogram: bucket i covers [BASE**i, BASE**(i+1)) microseconds, ~2 % resolution.
_LAT_BASE = 1.02
_LAT_LOG = math.log(_LAT_BASE)

# Per-seq delivery records kept (oldest dropped), so a long run cannot grow them without bound.
MAX_SEQS = 10_000

CONNECT_TIMEOUT = 10.0
# Clock slack for a timed line's ``ts``: publishers on other hosts have clocks of their own.
TS_SLACK = 1.0


@dataclass
class EngineConfig:
    n: int = 0
    host: str = "127.0.0.1"
    port: int = 8888
    path: str = "/"
    concurrency: int = 100
    # Seconds a connection may wait for the response head before it counts as an error.
    head_timeout: float = 10.0
    # HTTPS: TLS to the target, its certificate checked against tls_ca (a PEM file; "" = the
    # system's CAs) and the host name.
    tls: bool = False
    tls_ca: str = ""

    def target(self) -> tuple[str, int, str, bool]:
        return (self.host, self.port, self.path, self.tls)


_TLS_CONTEXTS: dict[str, ssl.SSLContext] = {}


def tls_context(ca_file: str) -> ssl.SSLContext:
    """One client context per CA file per process (a context per connection would cost ~KBs)."""
    ctx = _TLS_CONTEXTS.get(ca_file)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.set_alpn_protocols(["http/1.1"])
        _TLS_CONTEXTS[ca_file] = ctx
    return ctx


@dataclass
class Stats:
    """Counters of one engine; :meth:`merge` adds another's (for process pools and fleets)."""

    clients: int = 0
    inproc: int = 0
    errors_req: int = 0
    errors_resp: int = 0
    ended_req: int = 0
    msgs_total: int = 0
    bytes_total: int = 0
    timed_total: int = 0
    timed_invalid: int = 0  # timed lines whose ts was before the run or in the future
    lat_max_ms: float = 0.0
    lat_hist: dict[int, int] = field(default_factory=dict)
    last_delivery: dict[int, float] = field(default_factory=dict)
    first_delivery: dict[int, float] = field(default_factory=dict)
    deliveries: dict[int, int] = field(default_factory=dict)

    def merge(self, other: Stats) -> None:
        for name in (
            "clients",
            "inproc",
            "errors_req",
            "errors_resp",
            "ended_req",
            "msgs_total",
            "bytes_total",
            "timed_total",
            "timed_invalid",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lat_max_ms = max(self.lat_max_ms, other.lat_max_ms)
        for b, c in other.lat_hist.items():
            self.lat_hist[b] = self.lat_hist.get(b, 0) + c
        for s, t in other.last_delivery.items():
            if t > self.last_delivery.get(s, 0.0):
                self.last_delivery[s] = t
        for s, t in other.first_delivery.items():
            if t < self.first_delivery.get(s, math.inf):
                self.first_delivery[s] = t
        for s, c in other.deliveries.items():
            self.deliveries[s] = self.deliveries.get(s, 0) + c

    def clear_latency(self) -> None:
        """Forget every latency sample and delivery record (a new run starts)."""
        self.timed_total = self.timed_invalid = 0
        self.lat_max_ms = 0.0
        for record in (self.lat_hist, self.last_delivery, self.first_delivery, self.deliveries):
            record.clear()

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) of delivery latency in ms (upper bucket edge), or None."""
        total = sum(self.lat_hist.values())
        if total == 0:
            return None
        rank = max(1, math.ceil(total * q / 100.0))
        seen = 0
        for b in sorted(self.lat_hist):
            seen += self.lat_hist[b]
            if seen >= rank:
                return min(self.lat_max_ms, _LAT_BASE ** (b + 1) / 1000.0)
        return self.lat_max_ms

    def latency_summary(self) -> dict[str, float | int | None]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "p50": r(self.percentile(50)),
            "p90": r(self.percentile(90)),
            "p99": r(self.percentile(99)),
            "max": r(self.lat_max_ms) if self.timed_total else None,
            "count": self.timed_total,
            "invalid": self.timed_invalid,
        }

    def to_wire(self) -> dict[str, Any]:
        """JSON-safe form (int keys become strings) used between processes."""
        d = asdict(self)
        d["lat_hist"] = {str(k): v for k, v in self.lat_hist.items()}
        d["last_delivery"] = {str(k): v for k, v in self.last_delivery.items()}
        d["first_delivery"] = {str(k): v for k, v in self.first_delivery.items()}
        d["deliveries"] = {str(k): v for k, v in self.deliveries.items()}
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Stats:
        s = cls(
            **{
                k: v
                for k, v in d.items()
                if k not in ("lat_hist", "last_delivery", "first_delivery", "deliveries")
            }
        )
        s.lat_hist = {int(k): int(v) for k, v in d.get("lat_hist", {}).items()}
        s.last_delivery = {int(k): float(v) for k, v in d.get("last_delivery", {}).items()}
        s.first_delivery = {int(k): float(v) for k, v in d.get("first_delivery", {}).items()}
        s.deliveries = {int(k): int(v) for k, v in d.get("deliveries", {}).items()}
        return s

    def public(self, config: EngineConfig, procs: int, restarts: int = 0) -> dict[str, Any]:
        """The agent's ``GET /`` document (docs/architecture.md "Load generator agent")."""
        return {
            "clients": self.clients,
            "inproc": self.inproc,
            "errors_req": self.errors_req,
            "errors_resp": self.errors_resp,
            "ended_req": self.ended_req,
            "msgs_total": self.msgs_total,
            "bytes_total": self.bytes_total,
            "latency_ms": self.latency_summary(),
            "last_delivery": {str(k): v for k, v in sorted(self.last_delivery.items())},
            "deliveries": {str(k): v for k, v in sorted(self.deliveries.items())},
            "procs": procs,
            "engine_restarts": restarts,
            "config": asdict(config),
        }


# ---- source addresses -------------------------------------------------------------------------


def parse_source_ips(spec: str | None, host: str = "127.0.0.1") -> list[str]:
    """``a,b,c`` or ``first-last`` (IPv4 range) or ``auto`` / ``none``.

    ``auto`` is 127.0.0.2-127.0.0.41 when the target is loopback, else no binding (kernel's choice).
    Raises ValueError with a clear message on bad input.
    """
    if spec is None or spec == "auto":
        try:
            loop_target = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            loop_target = False
        return [f"127.0.0.{i}" for i in range(2, 42)] if loop_target else []
    if spec in ("", "none"):
        return []
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a_s, b_s = part.split("-", 1)
            try:
                a, b = ipaddress.IPv4Address(a_s.strip()), ipaddress.IPv4Address(b_s.strip())
            except ValueError as exc:
                raise ValueError(f"source-ips: bad range {part!r}: {exc}") from None
            if int(b) < int(a) or int(b) - int(a) > 65535:
                raise ValueError(f"source-ips: bad range {part!r} (empty or over 65536 addresses)")
            out.extend(str(ipaddress.IPv4Address(i)) for i in range(int(a), int(b) + 1))
        else:
            try:
                out.append(str(ipaddress.ip_address(part)))
            except ValueError as exc:
                raise ValueError(f"source-ips: {exc}") from None
    return out


def nofile_capacity() -> int:
    """Connections one client process can hold: raised soft RLIMIT_NOFILE minus a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(1, int(limit) - FD_RESERVE)


def auto_procs(n: int, capacity: int | None = None) -> int:
    cap = capacity if capacity is not None else nofile_capacity()
    return max(1, math.ceil(n / cap))


# ---- one connection ---------------------------------------------------------------------------

_HEAD = 0  # waiting for the response head
_BODY = 1  # streaming
_DONE = 2  # closed or being closed


class StreamConn(asyncio.Protocol):
    """One streaming subscriber: reads every byte, de-chunks, splits lines."""

    __slots__ = (
        "engine",
        "transport",
        "state",
        "buf",
        "lbuf",
        "chunked",
        "chunk_left",
        "t0",
        "aborted",
        "made",
    )

    def __init__(self, engine: Engine) -> None:
        # Shared engine state
        self.engine = engine
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.buf = b""  # unparsed head or chunk-size line
        self.lbuf = b""  # partial body line
        self.chunked = False
        self.chunk_left = 0  # >0 data bytes left in chunk; <0 CRLF bytes to skip after it
        self.t0 = time.monotonic()
        self.aborted = False  # True when the engine closed it on purpose (not an error)
        self.made = False  # connection_made ran (it then moved the count to ``pending``)

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called when the socket is connected: send the request."""
        # uvloop's transports are not asyncio.Transport subclasses, but have the same interface.
        self.transport = cast(asyncio.Transport, transport)
        # From "connecting" to "pending" in one step, so _fill never counts this one twice
        # (counting it twice made it abort fresh connections as surplus).
        self.made = True
        self.engine.connecting -= 1
        self.engine.pending.add(self)
        self.transport.write(self.engine.request)

    def data_received(self, data: bytes) -> None:
        """Called for every received segment; everything is consumed at once."""
        self.engine.bytes_total += len(data)
        if self.state == _BODY:
            self._body(data)
        elif self.state == _HEAD:
            self._head(data)

    def eof_received(self) -> bool:
        """The server half-closed: let the transport close (counted in connection_lost)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called once when the connection closes, for whatever reason."""
        self.engine.on_lost(self)

    # Parser

    def _head(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self._fail()
            else:
                self.buf = buf
            return
        head = buf[:end]
        self.buf = b""
        status_line, _, headers = head.partition(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or parts[1] != b"200":
            self._fail()
            return
        self.chunked = b"transfer-encoding: chunked" in headers.lower()
        self.state = _BODY
        self.engine.on_established(self)
        rest = buf[end + 4 :]
        if rest:
            self._body(rest)

    def _fail(self) -> None:
        self.engine.errors_resp += 1
        self.engine.back_off()
        self.state = _DONE
        self.aborted = True
        self.engine.pending.discard(self)
        self.engine.conns.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def _body(self, data: bytes) -> None:
        if not self.chunked:
            self._lines(data)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos, size = 0, len(data)
        while pos < size:
            left = self.chunk_left
            if left > 0:
                take = min(left, size - pos)
                self._lines(data[pos : pos + take])
                pos += take
                self.chunk_left = left - take if take < left else -2
            elif left < 0:
                # Skip the CRLF after a chunk's data (it may arrive split).
                skip = min(-left, size - pos)
                pos += skip
                self.chunk_left = left + skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > 1024:
                        self._fail()
                    else:
                        self.buf = data[pos:]
                    return
                try:
                    n = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self._fail()
                    return
                pos = eol + 2
                if n == 0:
                    # Last chunk: the server ended the stream.
                    self.state = _DONE
                    if self.transport is not None:
                        self.transport.close()
                    return
                self.chunk_left = n

    def _lines(self, seg: bytes) -> None:
        if self.lbuf:
            seg = self.lbuf + seg
        if b"\n" not in seg:
            self.lbuf = seg if len(seg) <= 1 << 20 else b""
            return
        lines = seg.split(b"\n")
        self.lbuf = lines.pop()
        self.engine.on_lines(lines)


# ---- the engine -------------------------------------------------------------------------------


class Engine:
    """Holds ``config.n`` connections in this process's event loop."""

    def __init__(
        self, config: EngineConfig, source_ips: Iterable[str] = (), offset: int = 0
    ) -> None:
        self.config = config
        self.source_ips = list(source_ips)
        self.src_next = offset
        self.request = b""
        self._set_request()
        self.conns: set[StreamConn] = set()  # established (200 received)
        self.pending: set[StreamConn] = set()  # connected, waiting for the response head
        self.connecting = 0
        self.errors_req = 0
        self.errors_resp = 0
        self.ended_req = 0
        self.msgs_total = 0
        self.bytes_total = 0
        self.reset_latency()
        self.fail_streak = 0
        self.retry_at = 0.0
        self._last_line = b""
        self._last_timed: tuple[float, int] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def reset_latency(self) -> None:
        """Start a new run of the latency counters: a sample older than this is invalid."""
        self.run_started = time.time()
        self.timed_total = 0
        self.timed_invalid = 0
        self.lat_max_ms = 0.0
        self.lat_hist: dict[int, int] = {}
        self.last_delivery: dict[int, float] = {}
        self.first_delivery: dict[int, float] = {}
        self.deliveries: dict[int, int] = {}

    def _set_request(self) -> None:
        c = self.config
        host = f"[{c.host}]" if ":" in c.host else c.host
        self.request = (
            f"GET {c.path} HTTP/1.1\r\nHost: {host}:{c.port}\r\n"
            "User-Agent: comet-loadgen\r\nAccept: */*\r\n\r\n"
        ).encode()

    # Control

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        assert self._loop is not None
        self._tick = self._loop.call_later(0.1, self._on_tick)

    def _on_tick(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        # Response heads that never came: the only per-connection deadline, swept here.
        limit = self.config.head_timeout
        for c in [c for c in self.pending if now - c.t0 > limit]:
            c._fail()
        self._fill()
        self._schedule_tick()

    def set_config(self, new: EngineConfig) -> None:
        retarget = new.target() != self.config.target()
        self.config = new
        if retarget:
            self._set_request()
            self.drop_all()
        self._fill()

    def drop_all(self) -> None:
        """Abort every connection (not counted as errors or ended)."""
        for c in list(self.conns) + list(self.pending):
            self._abort(c)
        self.fail_streak = 0
        self.retry_at = 0.0

    def restart(self) -> None:
        self.drop_all()
        self._fill()

    async def close(self) -> None:
        self._closed = True
        if self._tick is not None:
            self._tick.cancel()
        c = self.config
        self.config = EngineConfig(0, c.host, c.port, c.path, tls=c.tls, tls_ca=c.tls_ca)
        self.drop_all()
        await asyncio.sleep(0)

    def stats(self) -> Stats:
        return Stats(
            clients=len(self.conns),
            inproc=self.connecting + len(self.pending),
            errors_req=self.errors_req,
            errors_resp=self.errors_resp,
            ended_req=self.ended_req,
            msgs_total=self.msgs_total,
            bytes_total=self.bytes_total,
            timed_total=self.timed_total,
            timed_invalid=self.timed_invalid,
            lat_max_ms=self.lat_max_ms,
            lat_hist=dict(self.lat_hist),
            last_delivery=dict(self.last_delivery),
            first_delivery=dict(self.first_delivery),
            deliveries=dict(self.deliveries),
        )

    # Raising and lowering

    def _abort(self, c: StreamConn) -> None:
        c.aborted = True
        c.state = _DONE
        self.conns.discard(c)
        self.pending.discard(c)
        if c.transport is not None:
            c.transport.abort()

    def _fill(self) -> None:
        if self._closed or self._loop is None:
            return
        n = self.config.n
        have = len(self.conns) + len(self.pending) + self.connecting
        if have > n:
            surplus = have - n
            # Drop half-open ones first: they cost the least to redo.
            for group in (self.pending, self.conns):
                while surplus > 0 and group:
                    self._abort(next(iter(group)))
                    surplus -= 1
            return
        if have == n or time.monotonic() < self.retry_at:
            return
        room = self.config.concurrency - self.connecting - len(self.pending)
        for _ in range(min(n - have, room)):
            self.connecting += 1
            self._loop.create_task(self._connect_one())

    def _next_source(self) -> str | None:
        if not self.source_ips:
            return None
        ip = self.source_ips[self.src_next % len(self.source_ips)]
        self.src_next += 1
        return ip

    async def _connect_one(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.config
        sock: socket.socket | None = None
        made: list[StreamConn] = []

        def factory() -> StreamConn:
            conn = StreamConn(self)
            made.append(conn)
            return conn

        try:
            family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            src = self._next_source()
            if src is not None and family == socket.AF_INET:
                # Without this, bind() reserves a port for all destinations and runs out at ~28k.
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (c.host, c.port)), CONNECT_TIMEOUT)
            if c.tls:
                await loop.create_connection(
                    factory,
                    sock=sock,
                    ssl=tls_context(c.tls_ca),
                    server_hostname=c.host,
                    ssl_handshake_timeout=CONNECT_TIMEOUT,
                )
            else:
                await loop.create_connection(factory, sock=sock)
            sock = None
            if made and self.config.target() != c.target():
                self._abort(made[0])  # retargeted while this one was connecting
        except (TimeoutError, OSError):  # ssl.SSLError (a bad certificate) is an OSError
            self.errors_req += 1
            self.back_off()
        finally:
            if sock is not None:
                sock.close()
            if not (made and made[0].made):
                self.connecting -= 1  # connection_made never ran: it did not take over the count
        self._fill()

    def back_off(self) -> None:
        """A connect or a response head failed: while the target refuses us (restarting, or not
        an HTTP streaming server at all) retry after 50 ms, doubling to 2 s."""
        self.fail_streak += 1
        c = self.config
        # A round is as many failures as connections are attempted at once.
        per_round = max(1, min(c.concurrency, c.n))
        delay = min(2.0, 0.05 * 2 ** min(6, self.fail_streak // per_round))
        self.retry_at = time.monotonic() + delay

    # Callbacks from connections

    def on_established(self, c: StreamConn) -> None:
        self.fail_streak = 0
        self.pending.discard(c)
        self.conns.add(c)
        self._fill()

    def on_lost(self, c: StreamConn) -> None:
        if not c.aborted:
            if c.state == _HEAD:
                self.errors_resp += 1
                self.back_off()
            else:
                self.ended_req += 1
        c.state = _DONE
        self.conns.discard(c)
        self.pending.discard(c)
        c.transport = None
        if not self._closed and self._loop is not None:
            # Not from inside the transport callback: let the loop finish closing first.
            self._loop.call_soon(self._fill)

    def on_lines(self, lines: list[bytes]) -> None:
        self.msgs_total += len(lines)
        for line in lines:
            if line[:1] == b"{" or line[:7] == b"data: {":
                self._timed(line)

    def _timed(self, line: bytes) -> None:
        # Every subscriber gets the same bytes for a broadcast: parse each distinct line once.
        if line == self._last_line:
            parsed = self._last_timed
        else:
            parsed = _parse_timed(line[6:] if line[:1] == b"d" else line)
            self._last_line, self._last_timed = line, parsed
        if parsed is None:
            return
        ts, seq = parsed
        now = time.time()
        if not self.run_started - TS_SLACK <= ts <= now + TS_SLACK:
            # Published before this run (a replay, a stale message) or by a clock in the future:
            # folded into the percentiles, one such sample moved the p50 to 1.8e12 ms.
            self.timed_invalid += 1
            return
        ms = max(0.0, (now - ts) * 1000.0)
        self.timed_total += 1
        if ms > self.lat_max_ms:
            self.lat_max_ms = ms
        b = int(math.log(max(ms * 1000.0, 1.0)) / _LAT_LOG)
        self.lat_hist[b] = self.lat_hist.get(b, 0) + 1
        self.last_delivery[seq] = now
        if seq not in self.first_delivery:
            self.first_delivery[seq] = now
        self.deliveries[seq] = self.deliveries.get(seq, 0) + 1
        if len(self.deliveries) > MAX_SEQS:
            oldest = min(self.deliveries)
            self.deliveries.pop(oldest, None)
            self.last_delivery.pop(oldest, None)
            self.first_delivery.pop(oldest, None)


def _parse_timed(raw: bytes) -> tuple[float, int] | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    ts, seq = obj.get("ts"), obj.get("seq")
    if (
        isinstance(ts, (int, float))
        and not isinstance(ts, bool)
        and isinstance(seq, int)
        and not isinstance(seq, bool)
    ):
        return float(ts), seq
    return None


# ---- many processes ---------------------------------------------------------------------------


def split_n(n: int, parts: int) -> list[int]:
    """Spread n over parts as evenly as possible."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Child:
    __slots__ = ("proc", "index", "lock", "last", "broken")

    def __init__(self, proc: asyncio.subprocess.Process, index: int) -> None:
        self.proc = proc
        self.index = index
        self.lock = asyncio.Lock()
        self.last = Stats()  # its latest answer, kept if it dies
        self.broken = False

    async def call(self, msg: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"client process {self.index} (pid {self.proc.pid}) exited")
        answer: dict[str, Any] = json.loads(line)
        return answer


class ProcessPool:
    """Spreads an engine over child processes; same interface as a single engine.

    ``procs`` = None means auto: grow to ceil(n / capacity) processes whenever n rises.
    """

    def __init__(
        self,
        config: EngineConfig,
        source_ips: list[str],
        procs: int | None = None,
        capacity: int | None = None,
    ) -> None:
        self.config = config
        self.source_ips = source_ips
        self.fixed = procs
        self.capacity = capacity if capacity is not None else nofile_capacity()
        self.children: list[_Child] = []
        self.retired = Stats()  # counters of engine processes that died and were replaced
        self.respawned = 0
        self._lock = asyncio.Lock()

    @property
    def procs(self) -> int:
        return len(self.children)

    async def start(self) -> None:
        await self.apply(self.config)

    async def _spawn_one(self, i: int) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadgen.client",
            "--child",
            "--index",
            str(i),
            "--source-ips",
            ",".join(self.source_ips) or "none",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        child = _Child(proc, i)
        hello = await child.call({"op": "stats"}, timeout=30.0)
        if not hello.get("ok"):
            raise RuntimeError(f"client process {i} did not start: {hello}")
        return child

    async def grow(self, count: int) -> None:
        """Start engine processes until there are ``count`` (idle until :meth:`apply`)."""
        while len(self.children) < count:
            self.children.append(await self._spawn_one(len(self.children)))

    async def _heal(self) -> None:
        """Replace engine processes that died (OOM, kill): keep their counters, reconnect."""
        async with self._lock:
            shares = split_n(self.config.n, len(self.children)) if self.children else []
            for i, c in enumerate(self.children):
                if c.proc.returncode is None and not c.broken:
                    continue
                if c.proc.returncode is None:
                    c.proc.kill()
                    await c.proc.wait()
                gone = c.last
                gone.clients = gone.inproc = 0
                self.retired.merge(gone)
                self.respawned += 1
                fresh = await self._spawn_one(i)
                self.children[i] = fresh
                await fresh.call({"op": "set", **asdict(self.config), "n": shares[i]})

    async def _call_all(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """``msg`` to every engine; one that fails is replaced and asked again."""
        for attempt in (1, 2):
            results = await asyncio.gather(
                *(c.call(msg) for c in self.children), return_exceptions=True
            )
            failed = False
            for c, r in zip(self.children, results, strict=True):
                if isinstance(r, BaseException):
                    c.broken = True
                    failed = True
            if not failed:
                return [r for r in results if isinstance(r, dict)]
            if attempt == 2:
                break
            await self._heal()
        raise RuntimeError("engine processes keep failing; see the agent's stderr")

    async def apply(self, config: EngineConfig) -> None:
        async with self._lock:
            self.config = config
            want = self.fixed if self.fixed else auto_procs(config.n, self.capacity)
            await self.grow(max(want, len(self.children)))
            shares = split_n(config.n, len(self.children))
            base = asdict(config)
            results = await asyncio.gather(
                *(
                    c.call({"op": "set", **base, "n": share})
                    for c, share in zip(self.children, shares, strict=True)
                ),
                return_exceptions=True,
            )
            for c, r in zip(self.children, results, strict=True):
                if isinstance(r, BaseException):
                    c.broken = True
        if any(c.broken for c in self.children):
            await self._heal()

    async def set_config(self, config: EngineConfig) -> None:
        await self.apply(config)

    async def restart(self) -> None:
        await self._call_all({"op": "restart"})

    async def reset_latency(self) -> None:
        self.retired.clear_latency()
        await self._call_all({"op": "reset_latency"})

    async def stats(self) -> Stats:
        if any(c.proc.returncode is not None for c in self.children):
            await self._heal()
        total = Stats()
        total.merge(self.retired)
        for c, a in zip(self.children, await self._call_all({"op": "stats"}), strict=True):
            c.last = Stats.from_wire(a["stats"])
            total.merge(c.last)
        return total

    async def close(self) -> None:
        for c in self.children:
            if c.proc.returncode is None and c.proc.stdin is not None:
                c.proc.stdin.close()  # the child drops its connections and exits
        for c in self.children:
            try:
                await asyncio.wait_for(c.proc.wait(), 5.0)
            except TimeoutError:
                c.proc.kill()
                await c.proc.wait()
        self.children = []


class InlinePool:
    """One engine in this process, behind the pool interface (for ``--procs 0``)."""

    def __init__(self, config: EngineConfig, source_ips: list[str]) -> None:
        self.engine = Engine(config, source_ips)
        self.procs = 0

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    async def start(self) -> None:
        self.engine.start()
        self.engine.set_config(self.engine.config)

    async def set_config(self, config: EngineConfig) -> None:
        self.engine.set_config(config)

    async def restart(self) -> None:
        self.engine.restart()

    async def reset_latency(self) -> None:
        self.engine.reset_latency()

    async def stats(self) -> Stats:
        return self.engine.stats()

    async def close(self) -> None:
        await self.engine.close()


Pool = ProcessPool | InlinePool


def make_pool(config: EngineConfig, source_ips: list[str], procs: str | int) -> Pool:
    """``procs``: 'auto', 0 (in this process) or a fixed number of child processes."""
    if procs == "auto":
        return ProcessPool(config, source_ips, None)
    count = int(procs)
    if count == 0:
        return InlinePool(config, source_ips)
    return ProcessPool(config, source_ips, count)


# ---- child process entry point ----------------------------------------------------------------


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
        prog="python -m loadgen.client", description="internal: one engine process of a pool"
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
