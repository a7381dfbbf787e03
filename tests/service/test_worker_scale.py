"""A worker process driven over the internal supervisor protocol, and 10,000 held connections."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
import uvloop

from service.config import raise_nofile_limit
from tests.service.worker_harness import SubprocessWorker, connect, read_for, read_until
from tests.support.net import wait_for
from tests.support.service import reaped

N_CONNS = 10_000


class _Client(asyncio.Protocol):
    """Counts the connections that saw Welcome! and, later, the marker message."""

    __slots__ = ("transport", "tail", "state", "stats")

    def __init__(self, stats: dict[str, int]) -> None:
        self.tail = b""
        self.state = 0  # 0 waiting welcome, 1 streaming, 2 got marker
        self.stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"GET /sub/scale HTTP/1.1\r\nHost: t\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data
        if self.state == 0 and b"Welcome!" in buf:
            self.state = 1
            self.stats["welcomed"] += 1
        if self.state == 1 and b"MARKER-42" in buf:
            self.state = 2
            self.stats["got"] += 1
        self.tail = buf[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats["lost"] += 1


async def _hold_and_broadcast(w: SubprocessWorker) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stats = {"welcomed": 0, "got": 0, "lost": 0}
    sem = asyncio.Semaphore(200)
    transports: list[asyncio.BaseTransport] = []

    async def one() -> None:
        async with sem:
            for attempt in range(5):
                try:
                    t, _ = await loop.create_connection(lambda: _Client(stats), "127.0.0.1", w.port)
                    transports.append(t)
                    return
                except OSError:
                    await asyncio.sleep(0.05 * (attempt + 1))
            raise AssertionError("could not connect")

    try:
        await asyncio.gather(*(one() for _ in range(N_CONNS)))
        deadline = loop.time() + 60
        while stats["welcomed"] < N_CONNS and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert stats["welcomed"] == N_CONNS, stats
        ch = await loop.run_in_executor(None, lambda: w.ask("channels"))
        assert ch == {"rid": ch["rid"], "ok": True, "channels": {"scale": N_CONNS}}
        msg = {"id": 42, "channel": "scale", "event": None, "data": "MARKER-42", "ts": time.time()}
        t0 = time.perf_counter()
        ans = await loop.run_in_executor(None, lambda: w.ask("broadcast", msg=msg))
        while stats["got"] < N_CONNS and time.perf_counter() - t0 < 30:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        st = await loop.run_in_executor(None, lambda: w.ask("stats"))
        return {"stats": stats, "answer": ans, "elapsed": elapsed, "wstats": st["stats"]}
    finally:
        for t in transports:
            t.close()
        await asyncio.sleep(0.1)


def test_ten_thousand_connections_one_broadcast() -> None:
    # This process holds the 10,000 client sockets: lift the soft fd limit to the hard one.
    assert raise_nofile_limit() > N_CONNS + 100, "needs RLIMIT_NOFILE > 10,100"
    w = SubprocessWorker(ping_interval=30.0, history_size=100)
    try:
        assert w.ready["op"] == "ready" and w.ready["index"] == 3
        assert w.ask("init", last_id=41, history=[])["ok"] is True
        out = uvloop.run(_hold_and_broadcast(w))
        stats = out["stats"]
        assert isinstance(stats, dict) and stats["got"] == N_CONNS, out
        ans = out["answer"]
        assert isinstance(ans, dict) and ans["ok"] is True and ans["recipients"] == N_CONNS
        assert ans["elapsed_ms"] >= 0
        ws = out["wstats"]
        assert isinstance(ws, dict)
        assert ws["conns"] == N_CONNS and ws["accepted_total"] == N_CONNS
        assert ws["msgs_sent_total"] == N_CONNS and ws["bytes_sent_total"] > 0
        assert set(ws["lag_ms"]) == {"avg", "p90", "p99", "max"}
    finally:
        w.stop()


def test_control_protocol_init_stats_broadcast_channels_drain() -> None:
    w = SubprocessWorker(ping_interval=30.0, limit_message_bytes=100)
    try:
        assert w.ready == {"op": "ready", "pid": w.proc.pid, "index": 3}
        history = [
            {"id": 5, "channel": "c", "event": None, "data": "five", "ts": time.time()},
            {"id": 6, "channel": None, "event": "e", "data": "six", "ts": time.time()},
        ]
        assert w.ask("init", last_id=6, history=history) == {"rid": 1, "ok": True}
        # The history from init is replayed to a resuming SSE client.
        with connect(w.port) as s:
            s.sendall(b"GET /sub/c?format=sse&last_event_id=4 HTTP/1.1\r\nHost: t\r\n\r\n")
            got = read_until(s, b"data: six\n\n")
            assert b"id: 5\ndata: five\n\n" in got and b"id: 6\nevent: e\ndata: six" in got
            assert w.ask("channels")["channels"] == {"c": 1}
            st = w.ask("stats")
            assert st["ok"] is True
            keys = {"pid", "conns", "accepted_total", "closed_total", "rejected_total"}
            keys |= {"slow_dropped_total", "msgs_sent_total", "bytes_sent_total", "lag_ms"}
            assert keys <= set(st["stats"]) and st["stats"]["conns"] == 1
            msg = {"id": 7, "channel": "c", "event": None, "data": "seven", "ts": time.time()}
            b = w.ask("broadcast", msg=msg)
            assert b["ok"] is True and b["recipients"] == 1 and "elapsed_ms" in b
            assert b"id: 7\ndata: seven" in read_until(s, b"seven")
            big = {"id": 8, "channel": "c", "event": None, "data": "x" * 101, "ts": 0.0}
            too_big = w.ask("broadcast", msg=big)
            assert too_big["ok"] is False and "limit_message_bytes" in too_big["error"]
            bad = w.ask("nonsense")
            assert bad["ok"] is False and "unknown op" in bad["error"]
            d = w.ask("drain", grace=2)
            assert d["ok"] is True
            tail = read_until(s, b"event: reconnect")
            assert b"retry: " in tail
        assert w.proc.wait(10) == 0
    finally:
        w.stop()


def test_init_with_deliver_writes_what_live_streams_have_not_seen() -> None:
    """A takeover's worker holds live connections before its supervisor's first ``init``: what
    was published in between comes with ``deliver`` and reaches them, once; without it, init
    only keeps history (a fresh worker's streams come later and resume from it)."""
    w = SubprocessWorker(ping_interval=30.0)
    try:
        w.ask("init", last_id=3, history=[])
        with connect(w.port) as s:
            s.sendall(b"GET /sub/c?format=sse HTTP/1.1\r\nHost: t\r\n\r\n")
            read_until(s, b"Welcome!")
            kept = {"id": 4, "channel": "c", "event": None, "data": "four", "ts": time.time()}
            w.ask("init", last_id=4, history=[kept])  # kept, not written
            new = {"id": 5, "channel": "c", "event": None, "data": "five", "ts": time.time()}
            w.ask("init", last_id=5, history=[kept, new], deliver=True)
            got = read_until(s, b"data: five\n\n")
            assert b"four" not in got and got.count(b"id: 5\n") == 1, got
            w.ask("init", last_id=5, history=[kept, new], deliver=True)  # nothing newer: no-op
            msg = {"id": 6, "channel": "c", "event": None, "data": "six", "ts": time.time()}
            assert w.ask("broadcast", msg=msg)["recipients"] == 1
            tail = read_until(s, b"data: six\n\n")
            assert b"five" not in tail, tail  # the second init wrote nothing
    finally:
        w.stop()


def test_control_pipe_closed_means_drain_and_exit() -> None:
    w = SubprocessWorker(ping_interval=30.0)
    try:
        w.ask("init", last_id=0, history=[])  # as the supervisor: it accepts after init
        with connect(w.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            read_until(s, b"Welcome!")
            w.close_control()  # the supervisor went away
            read_until(s, b"reconnect\n")
        assert w.proc.wait(10) == 0
    finally:
        w.stop()


def test_sigterm_drains_and_exits_zero() -> None:
    w = SubprocessWorker(ping_interval=30.0)
    try:
        w.ask("init", last_id=0, history=[])  # as the supervisor: it accepts after init
        with connect(w.port) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            read_until(s, b"Welcome!")
            os.kill(w.proc.pid, signal.SIGTERM)
            read_until(s, b"reconnect\n")
        assert w.proc.wait(10) == 0
    finally:
        w.stop()


def test_standalone_worker_numbers_messages_itself() -> None:
    # No supervisor: the in-process API fills in ids. (Subprocess standalone is covered by
    # `python -m service --workers 1` in the README; here the same Worker object is used.)
    from tests.service.worker_harness import running_worker

    with running_worker() as tw:
        with connect(tw.port) as s:
            s.sendall(b"GET /sub/n?format=sse HTTP/1.1\r\nHost: t\r\n\r\n")
            read_until(s, b"Welcome!")
            deadline = time.monotonic() + 5
            assert tw.worker is not None
            while tw.call(tw.worker.channels).get("n") != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            tw.broadcast("a", channel="n")
            tw.broadcast("b", channel="n")
            got = read_until(s, b"data: b\n\n")
            assert b"id: 1\ndata: a" in got and b"id: 2\ndata: b" in got


def test_standalone_process_with_service_flags() -> None:
    """`python -m service.worker --port P ...` without a supervisor: curl -N sees the stream."""
    import shutil
    import subprocess
    import sys

    from tests.service.worker_harness import ROOT
    from tests.support.net import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ping-interval",
            "0.2",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    with reaped(proc):
        assert proc.stdout is not None
        assert b"listening on http" in proc.stdout.readline()
        curl = shutil.which("curl")
        assert curl
        out = subprocess.run(
            [curl, "-sN", "--max-time", "0.7", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            timeout=10,
        ).stdout.decode()
        assert out.startswith("Welcome!\nping\n"), out
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_quiet_holds_the_pings_for_an_interval() -> None:
    """``quiet`` (sent before a broadcast's later waves) restarts the worker's ping period."""
    w = SubprocessWorker(ping_interval=0.5)
    try:
        w.ask("init", last_id=0, history=[])  # as the supervisor: it accepts after init
        with connect(w.port) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            read_until(s, b"Welcome!")
            read_until(s, b"ping\n", limit=3.0)  # pinging has started
            seen = b""
            for _ in range(8):  # 1.6 s of "quiet" every 0.2 s: 3 pings would fall due
                assert w.ask("quiet") == {"rid": w._rid, "ok": True}
                seen += read_for(s, 0.2)
            assert b"ping" not in seen, seen
            t0 = time.monotonic()
            read_until(s, b"ping\n", limit=3.0)
            assert time.monotonic() - t0 <= 1.0
    finally:
        w.stop()


def test_a_supervised_worker_accepts_only_once_init_has_brought_the_history() -> None:
    # A worker restarted after a crash listens before the supervisor's init arrives; a client
    # resuming in between must get what it missed, not a reset for an id unknown to the
    # worker. Connections queue in the kernel until init, then are answered from the history.
    w = SubprocessWorker(ping_interval=30.0)
    try:
        with connect(w.port) as s:  # the port is bound and listening: the connect succeeds
            _resume_is_answered_only_after_init(w, s)
    finally:
        w.stop()


def test_a_successor_whose_giver_never_came_accepts_only_once_init_has_brought_the_history(
    tmp_path,
) -> None:
    # A takeover's (or reload's) new worker whose giver never came opens a listener of its
    # own; with no history from a giver yet, it must not answer a resume before init either.
    w = SubprocessWorker(
        env={
            "COMET_WORKER_ADOPT": str(tmp_path / "nobody-gives.sock"),
            "COMET_WORKER_ADOPT_WAIT": "0.3",
        },
        ping_interval=30.0,
    )
    try:
        s = wait_for(lambda: _connected(w.port), 10, "the worker's own listener")
        with s:
            _resume_is_answered_only_after_init(w, s)
    finally:
        w.stop()


def _resume_is_answered_only_after_init(w: SubprocessWorker, s: socket.socket) -> None:
    """A resume from id 5 sent on ``s`` gets nothing before init, then m6 and m7 (no reset)."""
    s.sendall(b"GET /sub/xo?format=sse HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 5\r\n\r\n")
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):
        s.recv(1)  # not accepted yet: no answer before init
    s.settimeout(5.0)
    history = [
        {"id": i, "data": f"m{i}", "channel": "xo", "event": None, "ts": time.time()}
        for i in range(1, 8)
    ]
    assert w.ask("init", last_id=7, history=history)["ok"] is True
    got = read_until(s, b"data: m7\n")
    assert b"reset" not in got and b"data: m5\n" not in got
    assert b"data: m6\n" in got


def _connected(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=1)
    except ConnectionRefusedError:
        return None
