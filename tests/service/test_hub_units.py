"""The hub and the connection protocol over a fake transport, as uvicorn tests its protocols:
no sockets, a real event loop, every byte a connection was given checked exactly."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from service.worker import hub as hub_module
from service.worker import wire
from service.worker.hub import Hub
from service.worker.protocol import Conn
from service.worker.states import DONE, PLAIN_CHUNKED, PLAIN_RAW, SSE_CHUNKED, SSE_RAW
from tests.service.worker_harness import make_config


class FakeTransport:
    """What a Conn and the hub use of a transport; ``buffered`` stands for unsent bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proto: Conn) -> None:
        self.loop = loop
        self.proto = proto
        self.writes: list[bytes] = []
        self.buffered = 0
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.proto.connection_lost, None)  # as a real transport does

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class Bench:
    """A Hub on a fresh loop and a way to open connections to it."""

    def __init__(self, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.config = make_config(**overrides)
        self.hub = Hub(self.config, self.loop)
        self.conn_class = Conn.subclass_for(self.hub)  # the worker's own, as it binds it

    def connect(self, request: bytes | None = None) -> tuple[Conn, FakeTransport]:
        conn = self.conn_class()
        t = FakeTransport(self.loop, conn)
        conn.connection_made(cast(asyncio.Transport, t))
        if request is not None:
            conn.data_received(request)
        return conn, t

    def one_turn(self) -> None:
        """Exactly one loop iteration: the callbacks ready now (not those they schedule)."""
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()

    def run(self, seconds: float = 0.0) -> None:
        """Let the loop run its ready callbacks (and timers due within ``seconds``)."""
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.loop.run_until_complete(asyncio.sleep(0))

    def broadcast(self, data: str, channel: str | None = None, msg_id: int | None = None) -> int:
        msg = {
            "id": msg_id if msg_id is not None else self.hub.last_id + 1,
            "channel": channel,
            "event": None,
            "data": data,
            "ts": time.time(),
        }
        return self.loop.run_until_complete(self.hub.broadcast(msg))

    def close(self) -> None:
        self.hub.stop_pings()
        self.hub.stop_deadlines()
        self.hub.stop_admission()
        self.loop.close()


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench(ping_interval=3600.0)
    yield b
    b.close()


def sub(channel: str, sse: bool = False, http11: bool = True) -> bytes:
    accept = "Accept: text/event-stream\r\n" if sse else ""
    version = "1.1" if http11 else "1.0"
    return f"GET /sub/{channel} HTTP/{version}\r\nHost: t\r\n{accept}\r\n".encode()


@pytest.mark.parametrize(
    ("sse", "http11", "fmt"),
    [
        (False, True, PLAIN_CHUNKED),
        (False, False, PLAIN_RAW),
        (True, True, SSE_CHUNKED),
        (True, False, SSE_RAW),
    ],
)
def test_a_stream_gets_its_welcome_then_the_message_encoded_for_its_format(
    bench: Bench, sse: bool, http11: bool, fmt: int
) -> None:
    conn, t = bench.connect(sub("news", sse, http11))
    assert conn.state == fmt
    retry = bench.config.sse_retry_ms
    if sse:  # each SSE stream's own reconnect delay, in [retry, 2 * retry)
        retry = int(t.data.split(b"retry: ", 1)[1].split(b"\n", 1)[0])
        assert bench.config.sse_retry_ms <= retry < 2 * bench.config.sse_retry_ms
    assert t.data == wire.welcome(fmt, retry, bench.hub.cors.headers(None))
    t.writes.clear()
    assert bench.broadcast("hello", "news") == 1
    msg = bench.hub.history_since("news", 0)[0][0].msg
    assert t.data == wire.encode_message(msg)[fmt]
    assert bench.hub.counters.msgs_sent_total == 1 and bench.hub.counters.conns == 1


def test_only_the_channel_gets_it_and_a_message_for_everyone_reaches_all(bench: Bench) -> None:
    _a, ta = bench.connect(sub("a"))
    _b, tb = bench.connect(sub("b"))
    ta.writes.clear()
    tb.writes.clear()
    assert bench.broadcast("to a", "a") == 1
    assert b"to a" in ta.data and tb.writes == []
    assert bench.broadcast("to all") == 2
    assert b"to all" in ta.data and b"to all" in tb.data


def test_queued_broadcasts_reach_a_connection_in_one_write_in_id_order(bench: Bench) -> None:
    _c, t = bench.connect(sub("burst", sse=True))
    t.writes.clear()
    futures = [
        bench.hub.broadcast(
            {"id": i, "channel": "burst", "event": None, "data": f"m{i}", "ts": time.time()}
        )
        for i in range(1, 21)
    ]
    bench.loop.run_until_complete(asyncio.gather(*futures))
    assert len(t.writes) <= 2  # the first job may leave alone; the rest as one batch
    ids = [int(line[4:]) for line in t.data.decode().splitlines() if line.startswith("id: ")]
    assert ids == list(range(1, 21))


def test_a_broadcast_to_many_is_written_in_slices_of_fanout_slice() -> None:
    b = Bench(ping_interval=3600.0, fanout_slice=3)
    try:
        transports = [b.connect(sub("x"))[1] for _ in range(7)]
        for t in transports:
            t.writes.clear()
        done = b.hub.broadcast(
            {"id": 1, "channel": "x", "event": None, "data": "big", "ts": time.time()}
        )
        written = []
        while not done.done():
            b.one_turn()
            written.append(sum(1 for t in transports if t.writes))
        assert done.result() == 7
        assert written == [3, 6, 7]  # a slice a loop turn: the loop serves others between
    finally:
        b.close()


# A write "costs" 1 ms of a fake clock the hub reads; slices are cut at 20 ms. The hub reads its
# clock every _CLOCK_EVERY writes, so a turn writes up to the first reading at or past 20 ms.
BUDGET_MS = 20


def _costly_streams(
    monkeypatch: pytest.MonkeyPatch, n: int, **overrides: Any
) -> tuple[Bench, list[FakeTransport], int]:
    clock = [0.0]
    monkeypatch.setattr(hub_module, "_clock", lambda: clock[0])
    b = Bench(ping_interval=3600.0, fanout_slice_ms=float(BUDGET_MS), **overrides)
    transports = [b.connect(sub("x"))[1] for _ in range(n)]
    for t in transports:
        t.writes.clear()
        t.write = _costing(t.write, clock, 0.001)  # type: ignore[method-assign]
    every = hub_module._CLOCK_EVERY
    return b, transports, every * -(-BUDGET_MS // every)


def _costing(write: Any, clock: list[float], seconds: float) -> Any:
    def costly(data: bytes) -> None:
        clock[0] += seconds
        write(data)

    return costly


def _turns_until(b: Bench, transports: list[FakeTransport], reached: int) -> list[int]:
    """How many transports were written after each loop turn, until ``reached`` were."""
    written = [sum(1 for t in transports if t.writes)]
    while written[-1] < reached:
        b.one_turn()
        written.append(sum(1 for t in transports if t.writes))
    return written


def test_a_broadcast_slice_ends_after_fanout_slice_ms_whatever_its_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a write costs more (another CPU), a slice is cut by time, not by count."""
    b, transports, per_turn = _costly_streams(monkeypatch, 100, fanout_slice=1000)
    try:
        done = b.hub.broadcast(
            {"id": 1, "channel": "x", "event": None, "data": "big", "ts": time.time()}
        )
        assert per_turn < 100
        assert _turns_until(b, transports, 100) == [0, *range(per_turn, 100, per_turn), 100]
        assert done.result() == 100
        assert all(t.data.count(b"big") == 1 for t in transports)
    finally:
        b.close()


def test_a_ping_slice_past_fanout_slice_ms_goes_on_at_the_next_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b, transports, per_turn = _costly_streams(monkeypatch, 150, ping_slice=100)
    try:
        b.hub._ping_start()  # a sweep: 150 streams in slices of 100, a step apart
        assert _turns_until(b, transports, 100) == [*range(per_turn, 100, per_turn), 100]
        b.one_turn()  # the slice is over: the next one waits for its step, not the next turn
        assert sum(1 for t in transports if t.writes) == 100
        handle = b.hub._ping_slice_handle
        assert isinstance(handle, asyncio.TimerHandle)
        assert handle.when() - b.loop.time() == pytest.approx(b.hub._ping_step, abs=1.0)
        assert all(t.data == wire.PING[t.proto.state] for t in transports if t.writes)
    finally:
        b.close()


def test_a_slow_subscriber_is_dropped_and_counted(bench: Bench) -> None:
    conn, t = bench.connect(sub("slow"))
    t.buffered = bench.config.limit_write_buffer + 1
    bench.broadcast("x" * 100, "slow")
    bench.run()
    assert t.aborted and conn.state == DONE
    assert bench.hub.counters.slow_dropped_total == 1 and bench.hub.counters.conns == 0


def test_over_the_cap_a_connection_gets_503_before_anything_is_read(bench: Bench) -> None:
    bench.hub.cap = 1
    bench.connect(sub("a"))
    conn, t = bench.connect()
    assert t.closed and t.data.startswith(b"HTTP/1.1 503 ")
    bench.run()
    assert bench.hub.counters.rejected_total == 1 and bench.hub.counters.conns == 1
    assert conn.state != DONE  # a refused connection never counted as held or closed


def test_a_long_poll_waits_and_gets_the_message(bench: Bench) -> None:
    conn, t = bench.connect(b"GET /poll/p?since=0&timeout=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert t.writes == []
    assert bench.broadcast("polled", "p") == 1
    head, _, body = t.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b'"data": "polled"' in body.replace(
        b'":"', b'": "'
    )


def test_drain_hints_every_stream_then_closes_everything(bench: Bench) -> None:
    _s, ts = bench.connect(sub("d", sse=True))
    _p, tp = bench.connect(b"GET /poll/d?since=0&timeout=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    _h, th = bench.connect(b"GET /sub/d HTTP/1.1\r\n")  # a head still being read
    ts.writes.clear()
    assert bench.hub.counters.conns == 3
    left = bench.loop.run_until_complete(bench.hub.drain(bench.loop.time() + 5))
    assert left == 0 and bench.hub.counters.conns == 0
    assert b"retry: " in ts.data and b"event: reconnect" in ts.data  # the SSE reconnect hint
    assert ts.data.endswith(b"0\r\n\r\n") and ts.closed  # and the chunked body's end
    assert tp.data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in tp.data
    assert th.closed
    assert bench.hub.open_conns() == []
    _late, tl = bench.connect(sub("d"))  # draining: refused at once
    assert tl.closed and tl.data.startswith(b"HTTP/1.1 503 ")


def test_the_counters_are_named_once() -> None:
    """contracts.Counts names the counters; the worker's Counters (slots for speed, annotations
    for mypy) and the stats a worker answers must name exactly the same ones."""
    from service.contracts import COUNTER_NAMES, WorkerStats
    from service.worker.hub import Counters

    assert Counters.__slots__ == COUNTER_NAMES
    assert tuple(Counters.__annotations__) == COUNTER_NAMES
    assert set(WorkerStats.__required_keys__) == {
        *COUNTER_NAMES,
        "pid",
        "index",
        "lag_ms",
        "lag_hist",
    }
    b = Bench()
    try:
        stats = b.hub.counters.as_dict()
        assert tuple(stats) == COUNTER_NAMES and set(stats.values()) == {0}
    finally:
        b.close()


def test_past_the_accept_rate_new_connections_get_a_jittered_503_and_held_ones_stay() -> None:
    """--accept-rate 50: 5 new connections per 100 ms tick; the rest of a storm is told to come
    back at 1..8 s (spread), without being read; the next tick admits again."""
    b = Bench(ping_interval=3600.0, accept_rate=50)
    try:
        b.hub.start_admission()
        first = [b.connect(sub("s")) for _ in range(20)]
        admitted = [t for c, t in first if not t.closed]
        refused = [t for c, t in first if t.closed]
        assert len(admitted) == 5 and len(refused) == 15
        waits = {t.data.split(b"Retry-After: ")[1].split(b"\r\n")[0] for t in refused}
        assert all(t.data.startswith(b"HTTP/1.1 503 ") for t in refused)
        assert len(waits) > 1 and waits <= {str(s).encode() for s in range(1, 9)}  # spread
        b.run(0.12)  # the next tick
        later = [b.connect(sub("s")) for _ in range(6)]
        assert sum(1 for _c, t in later if not t.closed) == 5
        assert b.hub.counters.rejected_total == 16 and b.hub.counters.conns == 10
        assert all(b"Welcome!" in t.data and not t.closed for t in admitted)
    finally:
        b.close()


def test_without_an_accept_rate_nothing_is_refused() -> None:
    b = Bench(ping_interval=3600.0)
    try:
        b.hub.start_admission()
        assert not any(t.closed for _c, t in (b.connect(sub("s")) for _ in range(500)))
        assert b.hub.counters.rejected_total == 0
    finally:
        b.close()


def test_a_poll_for_an_announced_id_that_times_out_keeps_its_place(bench: Bench) -> None:
    """At a million a broadcast's waves take ~20 s: a long-poll from the newest id (taken from a
    worker of an early wave) can land on a worker of a late wave and time out there before the
    message arrives. It must answer "nothing yet, go on from the same id" — not a reset with this
    worker's older last id, which sent the client the message twice (seen at 1,000,000)."""
    bench.broadcast("one", "p")  # id 1 here
    bench.hub.upcoming_id = 2  # the supervisor's quiet: id 2 is on its way in a later wave
    _c, t = bench.connect(b"GET /poll/p?since=2&timeout=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    bench.run(1.3)  # the poll's own timeout passes before the wave comes
    body = json.loads(t.data.partition(b"\r\n\r\n")[2])
    assert body == {"messages": [], "last_id": 2, "reset": False}
    # An id nobody announced is still a reset that sends the client back to the newest.
    _c, t = bench.connect(b"GET /poll/p?since=9&timeout=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    bench.run(1.3)
    body = json.loads(t.data.partition(b"\r\n\r\n")[2])
    assert body == {"messages": [], "last_id": 1, "reset": True}


def test_a_poll_with_no_time_to_wait_from_an_id_ahead_is_answered_at_once(bench: Bench) -> None:
    """timeout=0 from an id past this worker's newest: the answer a timed-out poll gets, at once
    (a reset to the newest; "nothing yet" for an announced id), never a poll left unanswered."""
    bench.broadcast("one", "p")  # id 1 here
    _c, t = bench.connect(b"GET /poll/p?since=9&timeout=0 HTTP/1.1\r\nHost: t\r\n\r\n")
    bench.run(0.05)
    body = json.loads(t.data.partition(b"\r\n\r\n")[2])
    assert body == {"messages": [], "last_id": 1, "reset": True}
    bench.hub.upcoming_id = 2
    _c, t = bench.connect(b"GET /poll/p?since=2&timeout=0 HTTP/1.1\r\nHost: t\r\n\r\n")
    bench.run(0.05)
    body = json.loads(t.data.partition(b"\r\n\r\n")[2])
    assert body == {"messages": [], "last_id": 2, "reset": False}


class _Waiter:
    """What Deadlines needs of a connection: its ``buf`` token and ``on_deadline``."""

    def __init__(self, name: str, fired: list[tuple[str, float]], loop: Any) -> None:
        self.name, self.fired, self.loop = name, fired, loop
        self.buf: object = object()

    def on_deadline(self, token: object) -> None:
        self.fired.append((self.name, self.loop.time()))


def test_ticked_deadlines_fire_in_order_never_early_and_skip_connections_that_moved_on() -> None:
    from service.worker.hub import Deadlines

    loop = asyncio.new_event_loop()
    try:
        dl = Deadlines(loop, tick=0.05)
        fired: list[tuple[str, float]] = []
        due: dict[str, float] = {}
        waiters = {}
        # Added out of order at one frozen instant (so which tick each lands in does not depend
        # on where the clock is within a tick); b and b2 share a tick; one moves on.
        t0 = loop.time()
        loop.time = lambda: t0  # type: ignore[method-assign]
        for name, delay in (("c", 0.30), ("a", 0.10), ("b", 0.20), ("b2", 0.20), ("gone", 0.15)):
            w = waiters[name] = _Waiter(name, fired, loop)
            due[name] = t0 + delay
            dl.add(cast(Conn, w), w.buf, delay)
        del loop.time  # the loop's own clock again
        assert dl.pending == 5 and len(dl.ticks) == 4
        live = {cast(_Waiter, conn).name: when for when, conn, _ in dl.entries()}
        assert set(live) == set(due) and all(live[n] >= due[n] for n in due)
        waiters["gone"].buf = object()  # the connection moved on: its entry is stale
        loop.run_until_complete(asyncio.sleep(0.45))
        names = [n for n, _ in fired]
        assert names[0] == "a" and set(names[1:3]) == {"b", "b2"} and names[3] == "c"
        assert len(names) == 4  # not "gone"
        for name, at in fired:
            assert at >= due[name] - 1e-9, (name, at, due[name])  # never early
        assert dl.pending == 0 and not dl.at and not dl.ticks
    finally:
        loop.close()


def test_stale_ticked_deadlines_are_compacted_when_the_count_doubles() -> None:
    from service.worker.hub import Deadlines

    loop = asyncio.new_event_loop()
    try:
        dl = Deadlines(loop, tick=0.05)
        fired: list[tuple[str, float]] = []
        kept = []
        for i in range(3000):  # an hour away, spread over many ticks
            w = _Waiter(str(i), fired, loop)
            dl.add(cast(Conn, w), w.buf, 3600.0 + i * 0.01)
            if i % 10 == 0:
                kept.append(w)
            else:
                w.buf = None  # closed
        # Compacted at 1024 and again as it doubled: only live entries (and recent ones) stay.
        assert dl.pending < 2 * 1024, dl.pending
        assert len(dl.ticks) == len(dl.at)
        live = [conn for _, conn, _ in dl.entries()]
        assert set(map(id, live)) == set(map(id, kept))
        dl.stop()
        assert dl.pending == 0 and not dl.at
    finally:
        loop.close()
