"""The engine: keeps ``n`` streaming connections open and counts what arrives.

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

With ``coalesce`` > 0 the first read of a loop turn arms a nap: a blocking sleep, run as the
loop's next callback, until ``coalesce`` seconds after that read. The loop then polls once for
everything that arrived meanwhile, so a busy engine wakes at most once per ``coalesce`` and an
idle one never (:meth:`Engine.arm_nap`). An engine with connections in progress does not nap:
a ramp goes as fast as without.

Source addresses: each connect binds to the next address of ``source_ips`` with
``IP_BIND_ADDRESS_NO_PORT`` set, so the kernel picks the source port at connect time per
(source, destination) pair and each source address gives ~28k connections per destination.

One process cannot hold more sockets than its RLIMIT_NOFILE, so :class:`ProcessPool` spreads the
engine over child processes (``python -m loadgen.engine.child``) driven by JSON lines over their
stdin/stdout and merges their stats. A child exits when its stdin closes (the parent died).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import Iterable

from loadgen.engine.config import EngineConfig, tls_context
from loadgen.engine.connection import _DONE, _HEAD, StreamConn
from loadgen.engine.stats import _LAT_LOG, MAX_SEQS, Stats

# Linux <netinet/in.h>; Python's socket module does not export it.
IP_BIND_ADDRESS_NO_PORT = 24

CONNECT_TIMEOUT = 10.0
# Clock slack for a timed line's ``ts``: publishers on other hosts have clocks of their own.
TS_SLACK = 1.0
_now = time.time
_log = math.log


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
        # Coalescing (config.coalesce): True while data arriving should arm a nap.
        self.nap_ready = config.coalesce > 0
        self._nap_from = 0.0

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
        napping = self.config.coalesce > 0 and not self.nap_ready
        self.config = new
        self.nap_ready = new.coalesce > 0 and not napping
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
        self.nap_ready = False
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
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (c.host, c.port))
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

    # Coalescing

    def arm_nap(self) -> None:
        """Data came in: before the loop polls again, let more gather (``config.coalesce``).

        Each poll that finds a few ready sockets is a wake-up, and on a box the clients share
        with the server a wake-up costs more than the reads it serves (docs/benchmarks.md, "A
        wake-up's price"). The nap runs as the loop's next callback, after this round's reads:
        the loop then polls once for everything that arrived meanwhile, so a busy engine wakes
        at most once per ``coalesce`` seconds and an idle one not at all.
        """
        self.nap_ready = False
        self._nap_from = time.monotonic()
        assert self._loop is not None
        self._loop.call_soon(self._nap)

    def _nap(self) -> None:
        left = self._nap_from + self.config.coalesce - time.monotonic()
        # Not while connections are being made: each takes a few loop turns (connected, the
        # request, the response head), and napping through every turn held the one-box
        # million's ramp to ~3,500 connects a second with 100-ms naps (598.5 s against ~400).
        if left > 0 and not (self.connecting or self.pending):
            time.sleep(left)  # blocking on purpose: the loop must not poll before
        self.nap_ready = self.config.coalesce > 0 and not self._closed

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
        now = _now()
        if not self.run_started - TS_SLACK <= ts <= now + TS_SLACK:
            # Published before this run (a replay, a stale message) or by a clock in the future:
            # folded into the percentiles, one such sample moved the p50 to 1.8e12 ms.
            self.timed_invalid += 1
            return
        # Once per message on every subscriber: locals, no builtins called where a comparison
        # does (the same figures as max(0, ...) and log(max(us, 1))).
        ms = (now - ts) * 1000.0
        if ms < 0.0:
            ms = 0.0
        self.timed_total += 1
        if ms > self.lat_max_ms:
            self.lat_max_ms = ms
        us = ms * 1000.0
        b = int(_log(us) / _LAT_LOG) if us > 1.0 else 0
        hist = self.lat_hist
        hist[b] = hist.get(b, 0) + 1
        self.last_delivery[seq] = now
        first = self.first_delivery
        if seq not in first:
            first[seq] = now
        deliveries = self.deliveries
        deliveries[seq] = deliveries.get(seq, 0) + 1
        if len(deliveries) > MAX_SEQS:
            oldest = min(deliveries)
            deliveries.pop(oldest, None)
            self.last_delivery.pop(oldest, None)
            first.pop(oldest, None)


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
