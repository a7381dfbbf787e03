"""Worker internals over real sockets: slicing, ordering, history age, the lag sampler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from service.contracts import LAG_BOUNDS_MS, hist_add, hist_quantile
from service.supervisor.frames import FrameBuilder, WorkerView
from service.worker.lag import LagSampler
from tests.service.worker_harness import (
    channel_count,
    make_config,
    read_all,
    read_for,
    read_until,
    running_worker,
    split_head,
    subscribe,
    wait_for,
)
from tests.support.net import arrival_ns, stamp_arrivals


def test_small_slices_keep_order_and_reach_everyone() -> None:
    # 7 connections written 2 per loop iteration: partial last slices, jobs queued back to back.
    with running_worker(fanout_slice=2, ping_slice=2, ping_interval=0.1) as w:
        socks = [subscribe(w, "/sub/sl?format=sse") for _ in range(7)]
        try:
            for s in socks:
                read_until(s, b"Welcome!")
            wait_for(lambda: channel_count(w, "sl") == 7)
            assert w.worker is not None
            worker = w.worker

            async def burst() -> list[int]:
                futs = [worker.broadcast({"data": f"b{i}", "channel": "sl"}) for i in range(20)]
                return list(await asyncio.gather(*futs))

            counts = asyncio.run_coroutine_threadsafe(burst(), w.loop).result(10)
            assert counts == [7] * 20
            for s in socks:
                got = read_until(s, b"data: b19\n\n")
                got += read_until(s, b": ping")
                datas = re.findall(rb"data: (b\d+)\n", got)
                assert datas == [f"b{i}".encode() for i in range(20)]
        finally:
            for s in socks:
                s.close()


def test_history_age_gives_reset() -> None:
    with running_worker(history_max_age=0.3) as w:
        w.broadcast("old", channel="age")
        time.sleep(0.5)
        w.broadcast("new", channel="age")
        with subscribe(w, "/sub/age?format=sse&last_event_id=0") as s:
            got = read_until(s, b"data: new\n\n")
            assert b"event: reset" in got and b"data: old" not in got
            assert b'"oldest_id": 2' in got


def test_lag_sampler_sees_a_stall() -> None:
    async def go() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        lag = LagSampler(loop)
        lag.start()
        await asyncio.sleep(0.05)
        lag.read()
        # Block the loop: idle, the next sample is due within 50 ms, so it comes >= 70 ms late.
        time.sleep(0.12)
        await asyncio.sleep(0.05)
        out = lag.read()
        lag.stop()
        return out

    out = uvloop.run(go())
    assert out["max"] >= 60 and out["p90"] <= out["max"] and out["avg"] > 0


class FakeLoop:
    """Just enough of a loop for the sampler: a clock the test moves and the timers it set."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Callable[[], None]) -> FakeLoop:
        self.timers.append((when, cb))
        return self  # the handle: the sampler only ever cancels it

    def cancel(self) -> None:
        self.timers.clear()

    def run_next(self, late: float = 0.0) -> float:
        """Run the pending timer ``late`` seconds after it was due; the interval it had."""
        when, cb = self.timers.pop(0)
        start, self.now = self.now, when + late
        cb()
        return when - start


@pytest.mark.parametrize("busy", [False, True])
def test_lag_sampler_slows_down_only_while_idle(busy: bool) -> None:
    """Idle: a sample every 50 ms. Busy (a broadcast or sweep) or after a late sample: 10 ms.
    On a fake clock, so a loaded CI machine cannot change what is asserted."""
    loop = FakeLoop()
    lag = LagSampler(loop, busy=lambda: busy)  # type: ignore[arg-type]
    lag.start()
    loop.run_next()  # the first sample is always 10 ms after start
    intervals = [round(loop.run_next(), 3) for _ in range(5)]
    assert intervals == ([0.01] * 5 if busy else [0.05] * 5)
    # Under libuv's 1 ms timer resolution a sample up to 2 ms late is still idle ...
    loop.run_next(late=0.0015)
    assert round(loop.timers[0][0] - loop.now, 3) == (0.01 if busy else 0.05)
    # ... a later one is a stall: sample every 10 ms until one is on time again.
    loop.run_next(late=0.004)
    assert round(loop.timers[0][0] - loop.now, 3) == 0.01
    loop.run_next()
    assert round(loop.timers[0][0] - loop.now, 3) == (0.01 if busy else 0.05)
    out = lag.read()
    assert out["max"] == 4.0 and lag.pending == 0


def test_lag_sampler_on_the_real_loop_samples_less_while_idle() -> None:
    async def count(busy: bool) -> int:
        lag = LagSampler(asyncio.get_running_loop(), busy=lambda: busy)
        lag.start()
        await asyncio.sleep(0.5)
        lag.stop()
        return lag.pending

    idle, busy = uvloop.run(count(False)), uvloop.run(count(True))
    assert 0 < idle < busy, (idle, busy)


def test_housekeeping_prunes_aged_channels_and_keeps_resets_honest() -> None:
    with running_worker(history_max_age=0.2, ping_interval=0.1) as w:
        for i in range(50):
            w.broadcast(f"x{i}", channel=f"tmp{i}")
        assert w.worker is not None
        hub = w.worker.hub
        wait_for(lambda: w.call(lambda: len(hub.rings)) == 0)
        assert w.call(lambda: len(hub.streams) + len(hub.pollers)) == 0
        # Resuming on a pruned channel from before its last message reports the possible gap.
        with subscribe(w, "/sub/tmp3?format=sse&last_event_id=1") as s:
            got = read_until(s, b"event: reset")
            assert b"event: reset" in got


def test_broadcast_to_everyone_restarts_the_ping_period() -> None:
    """A stream that gets a broadcast is not pinged until a full interval of silence later."""
    with running_worker(ping_interval=0.4) as w, subscribe(w, "/sub/a?format=sse") as s:
        read_until(s, b"Welcome!")
        seen = bytearray()
        for i in range(10):  # one broadcast every ~0.15 s for 1.5 s: pings would fall due 3x
            assert w.broadcast(f"m{i}") == 1
            seen += read_for(s, 0.15)
        assert seen.count(b"data: m") == 10
        assert b": ping" not in seen, seen
        quiet_from = time.monotonic()
        read_until(s, b": ping", limit=2.0)
        waited = time.monotonic() - quiet_from
        assert 0.2 <= waited <= 1.0, waited


def test_channel_broadcast_does_not_stand_in_for_the_ping() -> None:
    """Only a broadcast to everyone restarts the period; a channel's own traffic does not."""
    with running_worker(ping_interval=0.3) as w, subscribe(w, "/sub/b?format=sse") as s:
        read_until(s, b"Welcome!")
        wait_for(lambda: channel_count(w, "b") == 1)
        seen = bytearray()
        for i in range(8):
            assert w.broadcast(f"c{i}", channel="b") == 1
            seen += read_for(s, 0.15)
        assert seen.count(b"data: c") == 8 and seen.count(b": ping") >= 2, seen


def test_a_ping_sweep_is_spread_over_a_quarter_of_the_interval() -> None:
    """4 streams, 1 per slice, interval 0.8 s: the sweep's pings come ~50 ms apart, not at once."""
    import selectors

    with running_worker(ping_interval=0.8, ping_slice=1) as w:
        socks = [subscribe(w) for _ in range(4)]
        try:
            for s in socks:
                read_until(s, b"Welcome!")
            wait_for(lambda: w.stats()["conns"] == 4)
            sel = selectors.DefaultSelector()
            for s in socks:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            arrivals: list[float] = []
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                for key, _ in sel.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if b"ping" in sock.recv(4096):
                        arrivals.append(time.monotonic())
            sel.close()
        finally:
            for s in socks:
                s.close()
    # Group into sweeps (sweeps are 0.8 s apart; one sweep spans ~0.15 s).
    sweeps: list[list[float]] = []
    for t in arrivals:
        if sweeps and t - sweeps[-1][-1] < 0.4:
            sweeps[-1].append(t)
        else:
            sweeps.append([t])
    full = [sw for sw in sweeps if len(sw) == 4]
    assert full, sweeps
    for sw in full:
        assert 0.09 <= sw[-1] - sw[0] <= 0.35, [round(t - sw[0], 3) for t in sw]


def test_connections_move_with_the_cyclic_collector_off_and_it_is_restored_after() -> None:
    """A handoff runs with gc off (adoptions make long-lived objects the collector would walk
    again and again); on success and on failure it is back as it was, also when it was off."""
    import gc

    from service.worker.handoff import _collector_paused

    seen: list[bool] = []

    @_collector_paused
    async def move(fail: bool) -> int:
        seen.append(gc.isenabled())
        await asyncio.sleep(0)  # other callbacks run in between, still with it off
        seen.append(gc.isenabled())
        if fail:
            raise ConnectionError("the successor went away")
        return 7

    assert gc.isenabled()
    assert asyncio.run(move(False)) == 7
    assert gc.isenabled()
    with pytest.raises(ConnectionError):
        asyncio.run(move(True))
    assert gc.isenabled() and seen == [False] * 4
    gc.disable()
    try:
        asyncio.run(move(False))
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_a_handed_descriptor_is_the_same_socket_with_or_without_its_family() -> None:
    """The giver names the family so the successor need not ask the kernel; a giver of an
    older release does not, and its descriptors are wrapped by asking."""
    import os

    from service.worker.handoff import _wrap

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            for family in (socket.AF_INET, None):
                with _wrap(os.dup(accepted.fileno()), family) as s:
                    assert (s.family, s.type, s.proto) == (
                        socket.AF_INET,
                        socket.SOCK_STREAM,
                        socket.IPPROTO_TCP,
                    )
                    assert s.getpeername() == client.getsockname()


def test_lag_sampler_counts_every_sample_in_its_histogram_bucket() -> None:
    """Buckets by LAG_BOUNDS_MS, kept for the worker's life: read() empties the second's
    samples, not the histogram."""
    loop = FakeLoop()
    lag = LagSampler(loop)  # type: ignore[arg-type]
    lag.start()
    for late in (0.0, 0.0005, 0.0009, 0.003, 0.045, 0.0505, 7.0):
        loop.run_next(late=late)
    lag.read()
    assert lag.histogram() == [3, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert len(lag.histogram()) == len(LAG_BOUNDS_MS) + 1
    loop.run_next(late=0.0)
    assert lag.histogram()[0] == 4 and sum(lag.histogram()) == 8
    assert hist_quantile(lag.histogram(), 0.5) == 1.0
    assert hist_quantile(lag.histogram(), 0.8) == 75.0
    assert hist_quantile(lag.histogram(), 0.99) == float("inf")
    assert hist_quantile([], 0.99) is None


def test_a_slots_lag_histogram_never_goes_back_when_its_worker_is_replaced() -> None:
    frames = FrameBuilder(target_connections=10, node_id="n")

    def view(pid: int, hist: list[int] | None) -> WorkerView:
        stats = None if hist is None else {"pid": pid, "index": 0, "lag_hist": hist}
        return WorkerView(index=0, pid=pid, state="up", stats=stats)  # type: ignore[arg-type]

    assert frames.build([view(1, [5, 1])], None)["totals"]["lag_hist"] == [5, 1]
    assert frames.build([view(1, [9, 1, 2])], None)["workers"][0]["lag_hist"] == [9, 1, 2]
    assert frames.build([view(2, None)], None)["totals"]["lag_hist"] == [9, 1, 2]  # restarting
    frame = frames.build([view(2, [3])], None)  # the new process's own samples come on top
    assert frame["totals"]["lag_hist"] == [12, 1, 2] == frame["workers"][0]["lag_hist"]
    assert hist_add([1, 2], [3, 4, 5]) == [4, 6, 5]


def test_a_receiver_told_the_handover_ended_stops_at_once_after_serving_the_givers_queued(
    tmp_path: Path,
) -> None:
    """A successor with two givers to wait for: one (another process) connects and finishes,
    the other never comes. Once told the handover has ended, the successor stops waiting at
    once (its accept is woken, not left to its 1-s tick), having served the giver that came."""
    import sys

    from service.worker.handoff import Receiver

    path = str(tmp_path / "handoff.sock")
    giver = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect(sys.argv[1])\n"
        "s.send(b'{\"done\": true}')\n"
        "s.recv(1)\n"  # returns once the successor has served it and closed its end
    )

    async def main() -> tuple[list[bool], float]:
        ended: list[bool] = []
        done = asyncio.Event()

        async def on_end(got_listener: bool) -> None:
            ended.append(got_listener)
            done.set()

        async def unused(*args: object) -> None:
            raise AssertionError("nothing is handed in this test")

        r = Receiver(path, unused, unused, givers=2, on_end=on_end, wait=30.0)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", giver, path)
        try:
            async with asyncio.timeout(20):
                assert await proc.wait() == 0  # the first giver was served to its end
            assert not done.is_set()  # still waiting for the second
            t0 = time.monotonic()
            r.stop_waiting()
            async with asyncio.timeout(10):
                await done.wait()
            return ended, time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    ended, took = uvloop.run(main())
    assert ended == [False]
    # With only the tick it would take up to a second; the wake-up takes a few milliseconds.
    assert took < 0.5, took
    assert not os.path.exists(path)  # closed and unlinked


def test_a_receiver_refuses_a_step_it_does_not_know_and_closes_what_came_with_it(
    tmp_path: Path,
) -> None:
    """A giver of newer code sends a step this successor does not know, with a descriptor.
    The successor answers with an error naming it and closes the descriptor (kept, it would
    hold that connection open behind the giver's back: the giver keeps serving it and closes it
    one day, and the client would never see the end), then ends this giver."""
    import subprocess
    import sys

    from service.worker.handoff import Receiver

    path = str(tmp_path / "handoff.sock")
    giver = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect(sys.argv[1])\n"
        "mine, sent = socket.socketpair()\n"
        "socket.send_fds(s, [json.dumps({'future_step': [{}]}).encode()], [sent.fileno()])\n"
        "sent.close()\n"
        "answer = s.recv(65536)\n"
        "mine.settimeout(10)\n"
        "print(answer.decode(), mine.recv(1) == b'')\n"  # b'': every copy of `sent` is closed
    )

    async def main() -> tuple[str, list[bool]]:
        ended: list[bool] = []

        async def on_end(got_listener: bool) -> None:
            ended.append(got_listener)

        async def unused(*args: object) -> None:
            raise AssertionError("nothing is adopted in this test")

        Receiver(path, unused, unused, givers=1, on_end=on_end, wait=30.0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", giver, path, stdout=subprocess.PIPE
        )
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.01)
        return out.decode(), ended

    out, ended = uvloop.run(main())
    answer, closed = out.rsplit(" ", 1)
    assert json.loads(answer) == {"error": "unknown handoff step (future_step)"}
    assert closed.strip() == "True"
    assert ended == [False]


_STREAM = {"kind": "stream", "fmt": 0, "channel": "news", "last_id": 0, "expires_in": 0.0}


def _accepted_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """``n`` loopback TCP connections: the client ends, and the accepted ends as a successor
    receives them (non-blocking socket objects over descriptors of their own)."""
    from service.worker.handoff import _wrap

    clients, handed = [], []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(n):
            clients.append(socket.create_connection(listener.getsockname()))
            accepted, _ = listener.accept()
            handed.append(_wrap(accepted.detach(), socket.AF_INET))
    return clients, handed


def test_a_batch_is_adopted_without_a_task_each() -> None:
    """Worker._adopt steps each connect_accepted_socket by hand: every stream of the batch is
    made, counted and subscribed, on its client's connection; nothing is left in ADOPTING."""
    from service.worker.process import Worker
    from service.worker.protocol import ADOPTING

    async def go() -> None:
        worker = Worker(make_config(ping_interval=3600.0), asyncio.get_running_loop())
        clients, handed = _accepted_pairs(50)
        await worker._adopt([(s, dict(_STREAM)) for s in handed])
        assert worker.hub.counters.adopted_total == worker.hub.counters.conns == 50
        subscribed = worker.hub.stream_set("news")
        assert len(subscribed) == 50
        assert not ADOPTING
        for conn in subscribed:  # each one's transport is its client's connection
            conn.transport.write(b"through the adopted transport")
        await asyncio.sleep(0.05)
        for c in clients:
            c.settimeout(5)
            assert c.recv(4096) == b"through the adopted transport"
            c.close()
        for conn in list(subscribed):
            conn.transport.abort()
        await asyncio.sleep(0.05)

    uvloop.run(go())


@pytest.mark.parametrize("how", ["a socket uvloop refuses", "cancelled"])
def test_a_batch_that_fails_or_is_cancelled_leaves_nothing_here(how: str) -> None:
    """All or nothing: the giver gets no answer for the batch and keeps every connection of it,
    so none may stay with the successor — not the ones already made (let go), not the ones
    still waiting (closed before connection_made). Nothing is left subscribed, counted or in
    ADOPTING; here the given descriptors were the only ones, so every client sees the end."""
    from service.worker.process import Worker
    from service.worker.protocol import ADOPTING

    async def go() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(make_config(ping_interval=3600.0), loop)
        clients, handed = _accepted_pairs(20)
        batch = [(s, dict(_STREAM)) for s in handed]
        if how == "cancelled":
            task = loop.create_task(worker._adopt(batch))
            await asyncio.sleep(0)  # every transport made, connection_made scheduled
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            batch.insert(10, (udp, dict(_STREAM)))
            with pytest.raises(ValueError, match="Stream Socket"):
                await worker._adopt(batch)
            udp.close()
        await asyncio.sleep(0.05)  # the let-go transports' connection_lost
        assert not ADOPTING
        assert not worker.hub.stream_set("news")
        assert worker.hub.counters.conns == 0
        for c in clients:
            c.settimeout(5)
            assert c.recv(4096) == b""
            c.close()

    uvloop.run(go())


def _poll_state(since: int, left: float) -> dict[str, object]:
    return {
        "kind": "poll",
        "since": since,
        "channel": "news",
        "http11": True,
        "keep_alive": False,
        "cors": "",
        "left": left,
        "buf": "",
    }


def _answer_of(client: socket.socket, timeout: float) -> dict[str, object] | None:
    """The JSON body of a long-poll answer on ``client`` (closed after it: no keep-alive), or
    None if none came in time."""
    client.settimeout(timeout)
    try:
        return dict(json.loads(split_head(read_all(client))[1]))
    except TimeoutError:
        return None


def test_a_handed_long_poll_from_an_announced_id_waits_for_it_and_an_unknown_one_is_answered():
    """A reload's successor may adopt a long-poll from an id that another worker delivered and
    that reaches this one only after the handoff: announced (init's ``upcoming``), it waits for
    it and gets it; not announced, it is answered within AHEAD_WAIT (never left unanswered)."""
    from service.worker.process import Worker
    from service.worker.protocol import AHEAD_WAIT

    async def go() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(make_config(ping_interval=3600.0), loop)
        ts = time.time()
        worker.init(5, [{"id": i, "data": f"m{i}", "channel": None, "ts": ts} for i in (4, 5)])
        worker.hub.upcoming_id = 6
        (announced, unknown), handed = _accepted_pairs(2)
        await worker._adopt([(handed[0], _poll_state(6, 30.0)), (handed[1], _poll_state(7, 30.0))])
        t0 = loop.time()
        got_unknown = await asyncio.to_thread(_answer_of, unknown, AHEAD_WAIT + 2.0)
        assert got_unknown is not None, "a long-poll from an id nobody announced was left waiting"
        assert got_unknown["messages"] == [] and got_unknown["reset"] is True, got_unknown
        assert AHEAD_WAIT - 0.1 <= loop.time() - t0 < AHEAD_WAIT + 1.5
        assert await asyncio.to_thread(_answer_of, announced, 0.2) is None  # still waiting
        # 6 arrives: the client had it already (from another worker), so nothing twice and
        # no reset: it goes on from 6.
        await worker.broadcast({"id": 6, "data": "m6", "channel": None, "ts": ts})
        got = await asyncio.to_thread(_answer_of, announced, 5.0)
        assert got == {"messages": [], "last_id": 6, "reset": False}, got
        for c in (announced, unknown):
            c.close()
        await asyncio.sleep(0.05)

    uvloop.run(go())


_GIVER = """
import json, socket, sys, time
# A giver (another process: the successor tells its own wake-up call by the peer pid) speaking
# handoff.py's protocol: three batches of 200 streams, done; its clients close when told.
listener = socket.create_server(("127.0.0.1", 0))
clients, handed = [], []
for _ in range(600):
    clients.append(socket.create_connection(listener.getsockname()))
    handed.append(listener.accept()[0])
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
for i in range(0, 600, 200):
    batch = handed[i:i + 200]
    msg = {"conns": [json.loads(sys.argv[2])] * len(batch), "family": int(socket.AF_INET)}
    socket.send_fds(s, [json.dumps(msg).encode()], [b.fileno() for b in batch])
    assert json.loads(s.recv(65536)) == {"adopted": len(batch)}
    for b in batch:
        b.close()
s.send(b'{"done": true}')
s.recv(1)  # the successor closed its end
sys.stdin.readline()  # the successor has looked at what it adopted
for c in clients:
    c.close()
"""

_FROZEN_ADOPTION = """
import asyncio, gc, json, subprocess, sys, weakref
import uvloop
from tests.service.test_worker_units import _GIVER, _STREAM
from tests.service.worker_harness import make_config
from service.worker.handoff import Receiver
from service.worker.process import Worker

async def go():
    worker = Worker(make_config(ping_interval=3600.0), asyncio.get_running_loop())
    ended = asyncio.Event()

    async def on_end(got_listener):
        ended.set()

    async def unused(*args):
        raise AssertionError("no listener in this test")

    path = sys.argv[1]
    Receiver(path, unused, worker._adopt, givers=1, on_end=on_end, wait=30.0)
    giver = subprocess.Popen(
        [sys.executable, "-c", _GIVER, path, json.dumps(_STREAM)], stdin=subprocess.PIPE
    )
    async with asyncio.timeout(30):
        await ended.wait()
    conns = list(worker.hub.stream_set("news"))
    tracked = {id(o) for o in gc.get_objects()}
    walked = sum(id(c) in tracked for c in conns)
    refs = [weakref.ref(c.transport) for c in conns]
    n = len(conns)
    del conns, tracked
    giver.communicate(b"close them\\n", timeout=30)
    assert giver.returncode == 0  # and its clients are closed
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not any(r() for r in refs):
            break
    print(n, gc.isenabled(), walked, sum(r() is not None for r in refs), worker.hub.counters.conns)

uvloop.run(go())
"""


def test_a_successors_adopted_connections_are_out_of_the_collectors_walks_and_freed_when_closed(
    tmp_path: Path,
) -> None:
    """A successor's adopted connections are frozen (no collection walks them: the first full
    collection after a reload stalled the new worker's loop), and closing them still frees
    them. In a process of its own: gc.freeze is process-wide."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FROZEN_ADOPTION, str(tmp_path / "handoff.sock")],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    adopted, enabled, walked, alive, conns = out.stdout.split()
    assert adopted == "600"
    assert enabled == "True"  # the collector is back on for what comes next
    assert walked == "0"  # none of the 600 adopted Conn objects is in a generation it walks
    assert (alive, conns) == ("0", "0")  # closed: every transport freed by reference counts


def test_a_broadcast_reaches_subscribers_in_the_order_they_subscribed() -> None:
    """First subscribed, first served: the hub keeps a channel's subscribers in the order they
    came (one that leaves and comes back is last), and a broadcast writes them in that order,
    as read from the kernel's receive time on each client's socket. (The order of their
    objects in memory, which a set gave, put a returning subscriber back in its old place.)"""
    with running_worker(ping_interval=3600.0) as w:
        order: list[socket.socket] = []
        try:
            for _ in range(12):
                s = subscribe(w, "/sub/order")
                read_until(s, b"Welcome!")
                order.append(s)
            for gone in (order[2], order[5], order[7]):  # leave, subscribe again: last
                order.remove(gone)
                gone.close()
                wait_for(lambda: channel_count(w, "order") == 11)
                s = subscribe(w, "/sub/order")
                read_until(s, b"Welcome!")
                order.append(s)
            assert channel_count(w, "order") == 12
            assert w.worker is not None
            hub = w.worker.hub
            ports = w.call(
                lambda: [c.transport.get_extra_info("peername")[1] for c in hub.stream_set("order")]
            )
            assert ports == [s.getsockname()[1] for s in order]
            for s in order:
                stamp_arrivals(s)
            assert w.broadcast("in-order", "order") == 12
            arrived = [arrival_ns(s, b"in-order\n") for s in order]
            assert arrived == sorted(arrived)
        finally:
            for s in order:
                s.close()
