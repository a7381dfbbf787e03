"""The engine's pieces on bytes alone: de-chunking, line splitting, timed messages, stats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadgen.engine.config import EngineConfig
from loadgen.engine.connection import StreamConn
from loadgen.engine.engine import Engine
from loadgen.engine.pool import split_n
from loadgen.engine.sources import auto_procs, parse_source_ips
from loadgen.engine.stats import Stats


class FakeTransport:
    """Records writes; the engine only writes, aborts and closes."""

    def __init__(self) -> None:
        self.closed = False
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def feed(pieces: list[bytes], engine: Engine | None = None) -> tuple[Engine, StreamConn]:
    engine = engine or Engine(EngineConfig(n=1))
    engine.connecting = 1
    conn = StreamConn(engine)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    for p in pieces:
        conn.data_received(p)
    return engine, conn


def chunked(lines: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in lines)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_of_a_chunked_stream_gives_the_same_lines(cuts):
    now = time.time()
    timed = json.dumps({"ts": now, "seq": 7}).encode()
    body = [b"Welcome!\n", b"ping\n", timed + b"\n", b"two\nlines\n", b"split ", b"line\n"]
    engine, conn = feed(split_at(chunked(body), cuts))
    assert engine.msgs_total == 6  # Welcome, ping, timed, two, lines, "split line"
    assert engine.timed_total == 1 and engine.deliveries == {7: 1}
    assert len(engine.conns) == 1 and not engine.pending
    assert engine.bytes_total == len(chunked(body))


def lines_seen(pieces: list[bytes]) -> tuple[list[bytes], StreamConn]:
    """``feed``, with every line the engine was handed, in order."""
    engine = Engine(EngineConfig(n=1))
    seen: list[bytes] = []
    engine.on_lines = seen.extend  # type: ignore[method-assign]
    _, conn = feed(pieces, engine)
    return seen, conn


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=8),
    st.sampled_from([b"", b";ext=1"]),
)
def test_a_chunk_a_segment_gives_what_a_byte_a_segment_gives(bodies, ext):
    """The one-whole-chunk fast path (a broadcast's usual segment) against the general
    parser fed one byte at a time: the same lines, the same partial line left over."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [b"%x%s\r\n%s\r\n" % (len(b), ext, b) for b in bodies if b]
    whole, conn_whole = lines_seen([head, *chunks])
    data = head + b"".join(chunks)
    single, conn_single = lines_seen([data[i : i + 1] for i in range(len(data))])
    assert whole == single
    assert conn_whole.lbuf == conn_single.lbuf


def test_identity_body_and_sse_lines():
    ts = time.time()
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    sse = (
        b"retry: 3000\n\nevent: welcome\ndata: Welcome!\n\n"
        + b"data: "
        + json.dumps({"ts": ts, "seq": 3}).encode()
        + b"\n\n"
    )
    engine, _ = feed([head + sse])
    assert engine.timed_total == 1 and 3 in engine.last_delivery


def test_non_200_is_a_response_error_and_closes():
    engine, conn = feed([b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n"])
    assert engine.errors_resp == 1 and conn.transport.closed  # type: ignore[union-attr]
    assert not engine.conns


def test_last_chunk_ends_the_stream():
    engine, conn = feed([chunked([b"Welcome!\n"]) + b"0\r\n\r\n"])
    assert conn.transport.closed  # type: ignore[union-attr]


def test_untimed_json_is_ignored():
    lines = [b'{"ts": "x", "seq": 1}\n', b'{"ts": 1.5, "seq": true}\n', b"{not json\n", b"[1,2]\n"]
    engine, _ = feed([chunked(lines)])
    assert engine.timed_total == 0 and engine.msgs_total == 4


def test_stats_merge_and_percentiles():
    a, b = Stats(clients=2, lat_max_ms=5.0), Stats(clients=3, lat_max_ms=50.0)
    a.lat_hist = {100: 9}
    b.lat_hist = {300: 1}
    a.timed_total, b.timed_total = 9, 1
    a.last_delivery, b.last_delivery = {1: 10.0}, {1: 12.0, 2: 3.0}
    a.merge(Stats.from_wire(b.to_wire()))
    assert a.clients == 5 and a.timed_total == 10 and a.last_delivery == {1: 12.0, 2: 3.0}
    p50, p99 = a.percentile(50), a.percentile(99)
    assert p50 is not None and p99 is not None and p50 < p99 <= 50.0
    assert Stats().latency_summary()["p50"] is None


def test_source_ips_and_procs():
    assert parse_source_ips("127.0.0.2-127.0.0.4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_source_ips("auto", "127.0.0.1")[0] == "127.0.0.2"
    assert len(parse_source_ips("auto", "localhost")) == 40
    assert parse_source_ips("none") == []
    assert parse_source_ips("10.0.0.1, 10.0.0.2") == ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(ValueError, match="source-ips"):
        parse_source_ips("127.0.0.9-127.0.0.2")
    with pytest.raises(ValueError, match="source-ips"):
        parse_source_ips("nope")
    assert auto_procs(100_000, 19_800) == 6 and auto_procs(0, 19_800) == 1
    assert split_n(10, 3) == [4, 3, 3] and sum(split_n(100_001, 6)) == 100_001


def test_a_slow_engine_process_keeps_its_connections(fixture_server):
    """An engine that does not answer in time (stopped here; on a saturated host, busy) is slow,
    not gone: the pool reports its last counters and neither kills nor replaces it, so its
    connections stay up; a dead one is still replaced (test_agent)."""
    import asyncio
    import dataclasses
    import os
    import signal

    from loadgen.engine.config import EngineConfig
    from loadgen.engine.pool import ProcessPool

    async def wait_clients(pool: ProcessPool, n: int) -> None:
        for _ in range(100):
            if (await pool.stats()).clients == n:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"never {n} clients")

    async def go() -> None:
        pool = ProcessPool(EngineConfig(n=20, port=fixture_server), [], procs=2)
        pool.call_timeout = 1.0
        await pool.start()
        slow = pool.children[0].proc
        try:
            await wait_clients(pool, 20)
            for child in pool.children:  # top's name; the command line is kept for ps
                proc = Path(f"/proc/{child.proc.pid}")
                assert (proc / "comm").read_text().strip() == f"comet-engine {child.index}"
                assert b"loadgen.engine.child" in (proc / "cmdline").read_bytes()
            os.kill(slow.pid, signal.SIGSTOP)
            st = await pool.stats()  # one call_timeout for the stopped one
            assert st.clients == 20 and pool.respawned == 0, st
            await pool.set_config(dataclasses.replace(pool.config, n=24))
            assert pool.children[0].proc is slow and slow.returncode is None
            os.kill(slow.pid, signal.SIGCONT)
            await wait_clients(pool, 24)
            assert pool.respawned == 0 and pool.children[0].proc is slow
        finally:
            if slow.returncode is None:
                os.kill(slow.pid, signal.SIGCONT)
            await pool.close()

    asyncio.run(go())


def _reads_and_lines(port: int, coalesce: float, conns: int, seconds: float) -> tuple[int, int]:
    """An engine in this process holds ``conns`` streams of the fixture server (another
    process, pinging every 4 ms) for ``seconds``: how many reads it made, and lines it got."""
    import asyncio

    import uvloop

    reads = 0
    plain = StreamConn.data_received

    def counted(self: StreamConn, data: bytes) -> None:
        nonlocal reads
        reads += 1
        plain(self, data)

    async def go() -> tuple[int, int]:
        nonlocal reads
        engine = Engine(EngineConfig(n=conns, port=port, coalesce=coalesce))
        engine.start()
        try:
            for _ in range(200):
                if len(engine.conns) == conns:
                    break
                await asyncio.sleep(0.05)
            assert len(engine.conns) == conns
            await asyncio.sleep(0.2)
            reads, lines = 0, engine.msgs_total
            await asyncio.sleep(seconds)
            return reads, engine.msgs_total - lines
        finally:
            await engine.close()

    StreamConn.data_received = counted  # type: ignore[method-assign]
    try:
        return uvloop.run(go())
    finally:
        StreamConn.data_received = plain  # type: ignore[method-assign]


def test_a_coalescing_engine_reads_everything_in_fewer_wake_ups() -> None:
    """--client-coalesce-ms: while data flows, the loop polls at most once per ``coalesce``, so
    each connection's pings arrive as one read per nap, none lost; without it, a read each."""
    from tests.loadgen.conftest import running_fixture_server

    conns, seconds = 5, 1.0
    with running_fixture_server("--ping", "0.004") as port:
        plain_reads, plain_lines = _reads_and_lines(port, 0.0, conns, seconds)
        napping_reads, napping_lines = _reads_and_lines(port, 0.1, conns, seconds)
    # ~250 pings a connection-second either way (a loaded host's timers fire late, not never)
    assert plain_lines > conns * seconds * 100 and napping_lines > conns * seconds * 100
    # 10 naps a second, a read per connection each (a couple more at the edges of the window)
    assert napping_reads <= conns * (seconds / 0.1 + 3), napping_reads
    assert plain_reads > 2 * conns * (seconds / 0.1 + 3), plain_reads


def test_coalescing_turned_off_between_naps_naps_no_more() -> None:
    import asyncio

    async def go() -> None:
        engine = Engine(EngineConfig(n=0, coalesce=0.01))
        engine.start()
        assert engine.nap_ready
        engine.arm_nap()
        assert not engine.nap_ready
        engine.set_config(EngineConfig(n=0, coalesce=0.0))
        assert not engine.nap_ready  # the nap already due decides, and it is off now
        await asyncio.sleep(0.05)
        assert not engine.nap_ready
        engine.set_config(EngineConfig(n=0, coalesce=0.01))
        assert engine.nap_ready
        await engine.close()
        assert not engine.nap_ready

    asyncio.run(go())


def test_a_coalescing_engine_does_not_nap_while_it_connects() -> None:
    """Each connection takes a few loop turns; napping through them would pace a ramp by the
    naps (the one-box million's ramp took 598.5 s with 100-ms naps instead of ~400)."""
    import asyncio

    import uvloop

    from tests.loadgen.conftest import running_fixture_server

    async def ramp(port: int) -> float:
        engine = Engine(EngineConfig(n=200, port=port, concurrency=5, coalesce=0.1))
        start = time.monotonic()
        engine.start()
        try:
            while len(engine.conns) < 200:
                assert time.monotonic() - start < 30, len(engine.conns)
                await asyncio.sleep(0.01)
            return time.monotonic() - start
        finally:
            await engine.close()

    # The connections made first receive pings every 4 ms all through the ramp.
    with running_fixture_server("--ping", "0.004") as port:
        took = uvloop.run(ramp(port))
    # 40 rounds of 5 connects; napping 100 ms at each of their ~3 loop turns: ~12 s
    assert took < 4.0, took
