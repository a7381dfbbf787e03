"""``reload``: every worker replaced by a new process that takes over the live connections, on
the same TCP connections, under a publisher; nothing lost, nothing twice, nothing closed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from typing import Any

import psutil
import pytest

from tests.support.net import arrival_ns, long_poll, stamp_arrivals, wait_for
from tests.support.service import Service
from tests.support.stream import Stream, server_ports

CH = "news"


def _recv(conn: socket.socket, maxfds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """The successor's end of the handoff protocol, blocking (a thread of the test plays it)."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, maxfds)
    if not data:
        raise ConnectionError("the giver closed the handoff socket")
    return json.loads(data), fds


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj).encode())


def _successor_socket(short_dir) -> tuple[str, socket.socket]:
    """Where a fake successor (a thread of the test) waits for the giver."""
    path = str(short_dir / "handoff.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(1)
    return path, server


def _hand_over(w, path, server, successor, n) -> tuple[list[Stream], dict[str, Any]]:
    """``n`` SSE streams on the worker ``w``, then its handoff to ``successor`` at ``path``."""
    import asyncio

    streams = [Stream(w.port, f"/sub/{CH}", sse=True) for _ in range(n)]
    wait_for(lambda: w.stats()["conns"] == n, 10, f"{n} streams")
    t = threading.Thread(target=successor)
    t.start()
    assert w.worker is not None
    answer = asyncio.run_coroutine_threadsafe(w.worker.handoff(path), w.loop).result(30)
    t.join(10)
    server.close()
    return streams, answer


@pytest.mark.parametrize("plane", ["uvloop", "raw"])
def test_reload_moves_every_connection_to_new_workers_under_a_publisher(
    tmp_path, plane: str
) -> None:
    svc = Service(tmp_path, "--workers", "2", "--ping-interval", "30", "--plane", plane)
    streams: list[Stream] = []
    stop = threading.Event()
    acked: list[int] = []
    try:
        health = svc.wait_up(2)
        old_pids = set(health["pids"])
        for i in range(12):
            streams.append(Stream(svc.port, f"/sub/{CH}", sse=i % 2 == 0))
        wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 10, "12 welcomes")
        wait_for(
            lambda: svc.ask({"op": "channels"})["channels"].get(CH) == 12, 10, "12 subscribers"
        )

        def publisher() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                answer = svc.ask({"op": "broadcast", "data": f"m{i}", "channel": CH})
                assert answer["ok"], answer
                acked.append(int(answer["id"]))
                time.sleep(0.05)

        pub = threading.Thread(target=publisher)
        pub.start()
        wait_for(lambda: len(acked) >= 5, 10, "5 messages before the reload")
        answer = svc.ask({"op": "reload"})
        assert answer["ok"] and answer["failed"] == 0 and answer["reloaded"] == 2, answer
        assert answer["handed"] >= 12 and answer["kept"] == 0, answer
        n_before = len(acked)
        wait_for(lambda: len(acked) >= n_before + 10, 10, "10 messages after the reload")
        stop.set()
        pub.join(10)
        last = acked[-1]
        final = f"m{len(acked)}\n".encode()  # the last message's data, on every stream
        wait_for(lambda: all(final in s.data for s in streams), 10, "the last message")
        new_pids = set(svc.ask({"op": "health"})["pids"])
        assert new_pids.isdisjoint(old_pids) and len(new_pids) == 2
        for s in streams:
            assert not s.closed, "a stream was closed by the reload"
            if s.sock.getsockname() != s.local:
                raise AssertionError("a client's connection changed")
        sse = [s for i, s in enumerate(streams) if i % 2 == 0]
        plain = [s for i, s in enumerate(streams) if i % 2 == 1]
        for s in sse:
            got = s.ids()
            assert got == acked[: len(got)] and got[-1] == last, (got, acked)  # each once, in order
        for s in plain:
            assert s.plain_messages() == [f"m{i}" for i in range(1, len(acked) + 1)]
        # The same TCP connections, now held by the new processes.
        held = server_ports(svc.proc.pid)
        assert {s.local[1] for s in streams} <= held
        assert svc.stop() == 0
    finally:
        stop.set()
        for s in streams:
            s.close()
        svc.stop()


def test_a_reload_during_a_broadcast_in_waves_waits_only_for_the_write_under_way(
    tmp_path,
) -> None:
    """Three workers written to one at a time (``--fanout-parallel 1``), the first of them
    stopped (SIGSTOP) so a broadcast to everyone cannot get past it: a reload asked meanwhile
    hands the other two over at once and ends as soon as that worker answers, before the
    broadcast does; the broadcast's later waves reach the new processes, and every stream gets
    every message once, in order, on the same connection."""
    svc = Service(
        tmp_path,
        "--workers",
        "3",
        "--fanout-parallel",
        "1",
        "--handoff-parallel",
        "3",
        "--ping-interval",
        "30",
    )
    streams: list[Stream] = []
    stopped: int | None = None
    try:
        pids = svc.up(3).ask({"op": "health"})["pids"]
        streams = [Stream(svc.port, f"/sub/{CH}", sse=i % 2 == 0) for i in range(15)]
        wait_for(
            lambda: svc.ask({"op": "channels"})["channels"].get(CH) == 15, 10, "15 subscribers"
        )
        first = svc.ask({"op": "broadcast", "data": "m1", "channel": None})
        assert first["ok"] and first["recipients"] == 15, first
        answers: dict[str, tuple[dict[str, Any], float]] = {}

        def ask(name: str, req: dict[str, Any]) -> None:
            answers[name] = (svc.ask(req), time.monotonic())

        stopped = pids[0]
        os.kill(stopped, signal.SIGSTOP)
        b = threading.Thread(target=ask, args=("broadcast", {"op": "broadcast", "data": "m2"}))
        b.start()
        time.sleep(0.3)  # it is waiting for the stopped worker
        r = threading.Thread(target=ask, args=("reload", {"op": "reload"}))
        r.start()
        # The two running workers hand over while the stopped one holds up the broadcast.
        wait_for(
            lambda: (svc.frame().get("reload") or {}).get("done", 0) >= 2,
            15,
            "two slots reloaded while the broadcast waits for the stopped worker",
        )
        assert "broadcast" not in answers and "reload" not in answers
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        r.join(30)
        b.join(30)
        reload, reloaded_at = answers["reload"]
        broadcast, broadcast_at = answers["broadcast"]
        assert reload["ok"] and reload["reloaded"] == 3 and reload["failed"] == 0, reload
        assert reload["handed"] >= 15 and reload["kept"] == 0, reload
        assert broadcast["ok"] and broadcast["recipients"] == 15, broadcast
        assert reloaded_at <= broadcast_at  # its later waves waited for the reload, not it
        third = svc.ask({"op": "broadcast", "data": "m3", "channel": None})
        assert third["ok"] and third["recipients"] == 15, third
        ids = [first["id"], broadcast["id"], third["id"]]
        wait_for(lambda: all(b"m3\n" in s.data for s in streams), 10, "m3 on every stream")
        time.sleep(0.3)  # a duplicate would have come by now
        for i, s in enumerate(streams):
            assert not s.closed and s.sock.getsockname() == s.local
            if i % 2 == 0:
                assert s.ids() == ids, s.data
            else:
                assert s.plain_messages() == ["m1", "m2", "m3"], s.data
        assert set(svc.ask({"op": "health"})["pids"]).isdisjoint(pids)
        assert svc.stop() == 0
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        for s in streams:
            s.close()
        svc.stop()


@pytest.mark.parametrize("plane", ["uvloop", "raw"])
def test_a_long_poll_waiting_through_a_reload_gets_its_message(tmp_path, plane: str) -> None:
    svc = Service(tmp_path, "--workers", "1", "--plane", plane)
    try:
        svc.wait_up(1)
        first = svc.ask({"op": "broadcast", "data": "before", "channel": CH})
        result: dict[str, Any] = {}
        t = threading.Thread(
            # The longest wait the service grants, so a slow reload on a loaded host cannot
            # outlast the poll (it would answer empty before "after" is published).
            target=lambda: result.update(
                answer=long_poll(svc.port, CH, since=int(first["id"]), timeout=120)
            )
        )
        t.start()
        time.sleep(0.5)  # the poll is waiting in the old worker
        answer = svc.ask({"op": "reload"})
        assert answer["ok"] and answer["handed"] >= 1, answer
        sent = svc.ask({"op": "broadcast", "data": "after", "channel": CH})
        t.join(20)
        _local, body = result["answer"]
        assert [m["data"] for m in body["messages"]] == ["after"]
        assert body["messages"][0]["id"] == sent["id"]
    finally:
        svc.stop()


@pytest.mark.parametrize("to_every", [False, True], ids=["supervisor", "every-process"])
def test_sighup_reloads_every_worker_and_the_stream_stays(tmp_path, to_every: bool) -> None:
    """SIGHUP to the supervisor reloads. So does one to every process named comet-service
    (`pkill -HUP -f comet-service`: the workers' titles start with it too): the workers ignore
    theirs (killed by SIGHUP's default action, they dropped every connection, and the reload
    then found no worker up)."""
    svc = Service(tmp_path, "--workers", "2")
    try:
        old = set(svc.wait_up(2)["pids"])
        s = Stream(svc.port, f"/sub/{CH}", sse=True)
        wait_for(lambda: b"Welcome!" in s.data, 10, "welcome")
        supervisor = psutil.Process(svc.proc.pid)
        named = [supervisor]
        if to_every:
            named += [
                p
                for p in supervisor.children(recursive=True)
                if "comet-service" in " ".join(p.cmdline())
            ]
            assert len(named) == 3, [p.cmdline() for p in named]  # the supervisor and 2 workers
        for p in named:
            p.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: " in svc.log(), 20, "the reload's log line")
        assert "exited with signal SIGHUP" not in svc.log()
        assert "'reloaded': 2" in svc.log() and "'handed': 1" in svc.log(), svc.log()
        assert set(svc.ask({"op": "health"})["pids"]).isdisjoint(old)
        sent = svc.ask({"op": "broadcast", "data": "x", "channel": CH})
        wait_for(lambda: f"id: {sent['id']}".encode() in s.data, 10, "a message after SIGHUP")
        assert not s.closed
        s.close()
    finally:
        svc.stop()


def test_a_successor_that_fails_mid_way_leaves_the_rest_served_by_the_old_worker(
    short_dir,
) -> None:
    """A successor (here: this test, on the handoff socket) takes the listener and one batch,
    then goes away without saying it adopted it: the worker keeps every connection of that
    batch and of the rest, serves them on, and says what happened."""

    from service.worker import handoff
    from tests.service.worker_harness import running_worker

    path, server = _successor_socket(short_dir)
    got: dict[str, Any] = {}

    def fake_successor() -> None:
        conn, _ = server.accept()
        with conn:
            msg, fds = _recv(conn, 1)
            got["listener"] = msg
            for fd in fds:
                os.close(fd)
            _send(conn, {"ok": True})
            msg, fds = _recv(conn, handoff.BATCH)
            got["batch"] = len(msg["conns"])
            for fd in fds:
                os.close(fd)  # gone before it answers

    with running_worker(ping_interval=30.0) as w:
        streams, answer = _hand_over(w, path, server, fake_successor, 5)
        assert got["batch"] == 5 and answer["handed"] == 0 and "error" in answer, answer
        assert w.stats()["conns"] == 5 and w.stats()["handed_total"] == 0
        assert w.broadcast("still here", CH) == 5
        wait_for(lambda: all(b"data: still here" in s.data for s in streams), 10, "delivery")
        assert not any(s.closed for s in streams)
        late = Stream(w.port, f"/sub/{CH}", sse=True)  # it listens again
        wait_for(lambda: b"Welcome!" in late.data, 10, "a new subscriber welcomed")
        for s in [*streams, late]:
            s.close()


def _streams_then_lower_the_limit(svc: Service, n: int, nofile: int) -> list[Stream]:
    """``n`` SSE streams on the one worker of ``svc``, then the supervisor's open-files limit
    lowered to ``nofile``: the new process of a reload (forked from a forkserver the supervisor
    starts then) gets it, the running worker keeps its own."""
    svc.wait_up(1)
    streams = [Stream(svc.port, f"/sub/{CH}", sse=True) for _ in range(n)]
    wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 20, f"{n} welcomes")
    psutil.Process(svc.proc.pid).rlimit(psutil.RLIMIT_NOFILE, (nofile, nofile))
    return streams


def test_a_successor_adopts_every_connection_past_its_own_cap(tmp_path) -> None:
    """A new process whose connection cap is lower than what it takes over (here its open-files
    limit, 450: a cap of 1; also fewer workers taking over more, or --limit-connections) adopts
    them all: the cap turns away new clients, never a live connection handed to it (it used
    to write a 503 into 299 of the 300 streams and close them, and the reload said ok)."""
    svc = Service(tmp_path, "--workers", "1", "--ping-interval", "30")
    streams: list[Stream] = []
    try:
        streams = _streams_then_lower_the_limit(svc, 300, 450)
        answer = svc.ask({"op": "reload"})
        assert answer["ok"] and answer["reloaded"] == 1 and answer["handed"] == 300, answer
        assert "connection cap 1" in svc.log()  # the new process's cap
        sent = svc.ask({"op": "broadcast", "data": "after", "channel": CH})
        assert sent["recipients"] == 300, sent
        wait_for(lambda: all(b"data: after" in s.data for s in streams), 10, "delivery")
        assert not any(s.closed or b"HTTP/1.1 503" in s.data for s in streams)
    finally:
        for s in streams:
            s.close()
        svc.stop()


def test_a_successor_out_of_descriptors_mid_way_tells_what_it_took_to_reconnect(
    tmp_path,
) -> None:
    """The new process can take the first batch (200) and not the second (its open-files
    limit, 260: the kernel drops descriptors past it, MSG_CTRUNC). The old process serves on
    with the 100 it kept; the new one, instead of being killed with 200 live connections (which
    closed them without a word), sends each the reconnect hint, closes them and exits; the
    answer and the log say so."""
    svc = Service(tmp_path, "--workers", "1", "--ping-interval", "30")
    streams: list[Stream] = []
    try:
        streams = _streams_then_lower_the_limit(svc, 300, 260)
        supervisor = psutil.Process(svc.proc.pid)
        old = supervisor.children()[0].pid
        answer = svc.ask({"op": "reload"})
        assert answer["ok"] and answer["failed"] == 1 and answer["reloaded"] == 0, answer
        assert answer["reconnecting"] == 200 == answer["slots"][0]["reconnecting"], answer

        def over() -> dict[str, Any] | None:  # frames come once a second (none at first)
            r = (svc.ask({"op": "stats"}).get("frame") or {}).get("reload")
            return r if r and not r["running"] else None

        progress = wait_for(over, 5, "the reload's end in the frame")
        assert (progress["failed"], progress["reconnecting"]) == (1, 200), progress
        assert [c.pid for c in supervisor.children()] == [old]  # the new one is gone
        wait_for(lambda: sum(s.closed for s in streams) == 200, 10, "200 told to reconnect")
        closed = [s for s in streams if s.closed]
        assert all(b"event: reconnect\ndata: reconnect\n\n" in s.data for s in closed)
        sent = svc.ask({"op": "broadcast", "data": "after", "channel": CH})
        assert sent["recipients"] == 100, sent
        held = [s for s in streams if not s.closed]
        wait_for(lambda: all(b"data: after" in s.data for s in held), 10, "delivery")
        log = svc.log()
        assert "MSG_CTRUNC" in log and "open-files limit" in log  # the new process's reason
        assert "reload failed after 200 connections moved" in log
    finally:
        for s in streams:
            s.close()
        svc.stop()


def test_a_new_process_killed_during_its_handoff_costs_only_what_it_had_taken(
    tmp_path,
) -> None:
    """kill -9 of a reload's new process in the middle of taking 8,000 streams over (the old
    worker is paused with SIGSTOP once the new one holds five batches, so the kill lands
    between batches). No connection is owned by nobody: the old worker serves every one it did
    not hand (a broadcast reaches exactly those), the ones the dead process had taken are the
    answer's ``reconnecting`` and exactly the client sockets that see their end, and nothing
    is left behind."""
    n = 8000
    svc = Service(tmp_path, "--workers", "1", "--ping-interval", "30")
    socks: list[socket.socket] = []
    try:
        svc.wait_up(1, with_frame=True)
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", svc.port))
            s.sendall(b"GET /sub/news HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
            socks.append(s)
        wait_for(lambda: svc.frame()["totals"]["conns"] == n, 60, f"{n} streams")
        supervisor = psutil.Process(svc.proc.pid)
        old = supervisor.children()[0].pid
        moved: dict[str, int] = {}

        def kill_the_new_one_mid_way() -> None:
            deadline = time.monotonic() + 30
            new = None
            while new is None and time.monotonic() < deadline:
                with contextlib.suppress(psutil.Error):  # the forkserver is a child too
                    new = next(
                        (
                            p.pid
                            for p in supervisor.children(recursive=True)
                            if p.pid != old and p.name().startswith("comet-worker")
                        ),
                        None,
                    )
            base = None
            while new is not None and time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError):
                    fds = len(os.listdir(f"/proc/{new}/fd"))
                    base = fds if base is None else base
                    # Five batches in: the giver sends a fifth only once the first is answered
                    # (handoff.WINDOW = 4), so at least 200 are this process's own by now.
                    if fds >= base + 5 * 200 + 5:
                        os.kill(old, signal.SIGSTOP)
                        moved["fds"] = fds - base
                        os.kill(new, signal.SIGKILL)
                        os.kill(old, signal.SIGCONT)
                        return

        killer = threading.Thread(target=kill_the_new_one_mid_way)
        killer.start()
        answer = svc.ask({"op": "reload"})
        killer.join(40)
        assert moved, "the new process never held a batch"
        lost = answer.get("reconnecting", 0)
        assert answer["ok"] and answer["failed"] == 1 and 200 <= lost < n, (moved, answer)
        assert [c.pid for c in supervisor.children()] == [old]
        sent = svc.ask({"op": "broadcast", "data": "after", "channel": "news"})
        assert sent["recipients"] == n - lost, (sent, answer)

        def ended() -> int:
            count = 0
            for s in socks:
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while s.recv(65536):
                        pass
                    count += 1  # b"": the other end closed
            return count

        wait_for(lambda: ended() == lost, 10, f"{lost} streams ended")
        assert not list(tmp_path.glob("run/handoff-*")), "handoff sockets left behind"
    finally:
        for s in socks:
            s.close()
        svc.stop()


def test_batches_go_ahead_of_their_answers_and_only_answered_ones_are_let_go(
    short_dir, monkeypatch
) -> None:
    """The giver sends up to WINDOW batches before the first answer (a successor always has the
    next batch to adopt); when the successor goes away with batches unanswered, the giver lets
    go of the answered batch only and serves every other connection on."""

    from service.worker import handoff
    from tests.service.worker_harness import running_worker

    monkeypatch.setattr(handoff, "BATCH", 2)
    path, server = _successor_socket(short_dir)
    adopted: list[socket.socket] = []
    got: dict[str, Any] = {}

    def successor() -> None:
        conn, _ = server.accept()
        with conn:
            _msg, fds = _recv(conn, 1)
            adopted.extend(socket.socket(fileno=fd) for fd in fds)  # the listener
            _send(conn, {"ok": True})
            batches = []
            for _ in range(handoff.WINDOW):  # all of these come before any answer
                msg, fds = _recv(conn, handoff.BATCH)
                batches.append((msg["conns"], fds))
            got["ahead"] = len(batches)
            first, first_fds = batches[0]
            adopted.extend(socket.socket(fileno=fd) for fd in first_fds)
            _send(conn, {"adopted": len(first)})
            msg, fds = _recv(conn, handoff.BATCH)  # the next batch, sent after the answer
            got["after"] = len(msg["conns"])
            for _conns, fds_of in [*batches[1:], (msg["conns"], fds)]:
                for fd in fds_of:
                    os.close(fd)  # gone without answering these

    with running_worker(ping_interval=30.0) as w:
        streams, answer = _hand_over(w, path, server, successor, 12)
        assert got == {"ahead": handoff.WINDOW, "after": 2}, got
        assert answer["handed"] == 2 and answer["kept"] == 10 and "error" in answer, answer
        assert w.stats()["conns"] == 10
        assert w.broadcast("still here", CH) == 10
        wait_for(lambda: sum(b"data: still here" in s.data for s in streams) == 10, 10, "delivery")
        assert not any(s.closed for s in streams)
        for s in streams:
            s.close()
    for a in adopted:
        a.close()


@pytest.mark.parametrize("plane", ["uvloop", "raw"])
def test_ten_reloads_in_a_row_leak_no_descriptors_and_keep_the_streams(
    tmp_path, plane: str
) -> None:
    svc = Service(tmp_path, "--workers", "2", "--ping-interval", "30", "--plane", plane)
    streams: list[Stream] = []
    try:
        svc.wait_up(2)
        streams = [Stream(svc.port, f"/sub/{CH}", sse=True) for _ in range(8)]
        wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 10, "welcomes")
        supervisor = psutil.Process(svc.proc.pid)
        fds: list[int] = []
        for _ in range(10):
            answer = svc.ask({"op": "reload"})
            assert answer["ok"] and answer["failed"] == 0 and answer["handed"] == 8, answer
            wait_for(lambda: len(supervisor.children()) == 2, 10, "the old processes gone")
            fds.append(supervisor.num_fds())
        assert fds[-1] <= fds[0], fds  # the supervisor holds no more descriptors than before
        sent = svc.ask({"op": "broadcast", "data": "after ten", "channel": CH})
        assert sent["recipients"] == 8
        wait_for(lambda: all(b"data: after ten" in s.data for s in streams), 10, "delivery")
        assert not any(s.closed for s in streams)
        assert not list(tmp_path.glob("run/handoff-*")), "handoff sockets left behind"

        def counted() -> dict[str, Any] | None:
            f = svc.frame()
            t = f["totals"]
            return f if t["handed_total"] == 80 and t["adopted_total"] == 80 else None

        frame = wait_for(counted, 10, "80 handed and adopted in the frame's totals")
        assert frame["reload"]["running"] is False and frame["reload"]["done"] == 2
        assert frame["reload"]["handed"] == 8 and frame["reload"]["failed"] == 0
        assert frame["totals"]["closed_total"] == 0  # a handed connection is not a closed one
    finally:
        for s in streams:
            s.close()
        svc.stop()


def test_a_tls13_connection_moves_and_a_tls12_one_is_told_to_reconnect(tmp_path) -> None:
    """A TLS 1.3 stream whose records the worker seals moves with its keys and sequence numbers:
    the same TLS connection goes on reading every message, in order, from the new process (and a
    byte it sends checks the successor's read side). A TLS 1.2 one (its session
    inside OpenSSL in the old process) gets the reconnect hint and is closed."""
    import ssl

    from benchmarks.make_test_cert import write

    pki = write(tmp_path / "pki")
    svc = Service(
        tmp_path / "svc",
        *("--workers", "1", "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])),
    )

    def subscribe(tls12: bool) -> tuple[ssl.SSLSocket, bytes]:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        raw = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(
            f"GET /sub/{CH} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        data = b""
        while b"Welcome!" not in data:
            data += s.recv(65536)
        return s, data

    def read_until(s: ssl.SSLSocket, data: bytes, marker: bytes) -> bytes:
        while marker not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    opened: list[ssl.SSLSocket] = []
    try:
        svc.wait_up(1)
        s13, got13 = subscribe(tls12=False)
        s12, got12 = subscribe(tls12=True)
        opened += [s13, s12]
        assert s13.version() == "TLSv1.3" and s12.version() == "TLSv1.2"
        port13 = s13.getsockname()[1]
        wait_for(lambda: svc.ask({"op": "channels"})["channels"].get(CH) == 2, 10, "two streams")
        svc.ask({"op": "broadcast", "data": "one", "channel": CH})
        got13 = read_until(s13, got13, b"data: one")
        answer = svc.ask({"op": "reload"})
        assert answer["ok"] and answer["handed"] == 1 and answer["kept"] == 1, answer
        s12.settimeout(10)
        try:
            got12 = read_until(s12, got12, b"event: reconnect")
        except (ssl.SSLError, OSError):
            pass  # the server closed: an abrupt TLS close is fine here
        assert b"event: reconnect" in got12
        s12.close()
        wait_for(lambda: svc.ask({"op": "channels"})["channels"].get(CH) == 1, 10, "moved")
        for word in ("two", "three"):
            svc.ask({"op": "broadcast", "data": word, "channel": CH})
        got13 = read_until(s13, got13, b"data: three")
        assert s13.getsockname()[1] == port13  # the same TCP (and TLS) connection
        assert [line for line in got13.split(b"\n") if line.startswith(b"data: ")] == [
            b"data: Welcome!", b"data: one", b"data: two", b"data: three",
        ]  # fmt: skip
        assert b"reconnect" not in got13

        def counted() -> dict[str, Any] | None:
            a = svc.ask({"op": "stats"})  # not_ready until the new worker's first frame
            return a["frame"] if a["ok"] and a["frame"]["totals"]["adopted_total"] >= 1 else None

        frame = wait_for(counted, 10, "the adopted stream in the frame")
        assert frame["totals"]["tls_offloaded_total"] >= 1
        # A stream's client only listens: a byte from it ends the stream with the server's
        # close_notify (recv gives b""), which the successor sends only if it could open the
        # record, i.e. its read keys and sequence are right (else: a bad_record_mac alert).
        s13.sendall(b"x")
        while s13.recv(65536):
            pass
    finally:
        for s in opened:
            s.close()
        svc.stop()


def test_nothing_answers_a_connection_while_it_is_being_handed(short_dir) -> None:
    """A long-poll whose timeout falls while its batch is on the way must not be answered by
    the old worker (the successor answers it): once the snapshot is taken the old worker's
    deadlines hold. Here the successor (this test) takes 1.5 s to adopt a poll due at 1 s."""
    import asyncio

    from service.worker import handoff
    from tests.service.worker_harness import running_worker

    path, server = _successor_socket(short_dir)
    kept: list[socket.socket] = []

    def slow_successor() -> None:
        conn, _ = server.accept()
        with conn:
            msg, fds = _recv(conn, 1)
            kept.extend(socket.socket(fileno=fd) for fd in fds)
            _send(conn, {"ok": True})
            msg, fds = _recv(conn, handoff.BATCH)
            kept.extend(socket.socket(fileno=fd) for fd in fds)
            time.sleep(1.5)  # past the poll's deadline
            _send(conn, {"adopted": len(msg["conns"])})
            _recv(conn)  # done

    with running_worker(ping_interval=30.0) as w:
        c = socket.create_connection(("127.0.0.1", w.port), timeout=5)
        c.sendall(f"GET /poll/{CH}?since=0&timeout=1 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        wait_for(lambda: w.stats()["conns"] == 1, 5, "the poll waiting")
        t = threading.Thread(target=slow_successor)
        t.start()
        assert w.worker is not None
        answer = asyncio.run_coroutine_threadsafe(w.worker.handoff(path), w.loop).result(30)
        t.join(10)
        assert answer["handed"] == 1 and "error" not in answer, answer
        c.settimeout(0.5)
        try:
            got = c.recv(65536)
        except TimeoutError:
            got = b""
        finally:
            c.close()
        assert got == b"", got  # the old worker said nothing; it is the successor's to answer
    for s in kept:
        s.close()
    server.close()


def _slots_at_once(tmp_path, parallel: int) -> int:
    """Reload 3 workers holding 6 SSE streams with ``--handoff-parallel``; how many slots were
    under way together when the first one ended. Every stream stays open and gets a broadcast."""
    svc = Service(tmp_path, "--workers", "3", "--handoff-parallel", str(parallel))
    try:
        svc.wait_up(3)
        streams = [Stream(svc.port, f"/sub/{CH}", sse=True) for _ in range(6)]
        wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 10, "welcomes")
        answer = svc.ask({"op": "reload"})
        assert answer["reloaded"] == 3 and answer["handed"] == 6, answer
        first_end = min(r["ended_s"] for r in answer["slots"])
        at_once = sum(r["began_s"] < first_end for r in answer["slots"])
        sent = svc.ask({"op": "broadcast", "data": "after", "channel": CH})
        mark = f"id: {sent['id']}".encode()
        wait_for(lambda: all(mark in s.data for s in streams), 10, "the broadcast after it")
        assert not any(s.closed for s in streams)
        for s in streams:
            s.close()
        return at_once
    finally:
        svc.stop()


def test_handoff_parallel_sets_how_many_slots_hand_over_at_once(tmp_path) -> None:
    """``--handoff-parallel 1``: one slot at a time; ``3``: all three at once (the default on
    this 2-core box would be two)."""
    assert _slots_at_once(tmp_path / "one", 1) == 1
    assert _slots_at_once(tmp_path / "three", 3) == 3


def test_a_reload_keeps_the_order_subscribers_are_served_in(tmp_path) -> None:
    """A broadcast serves a channel's subscribers in the order they subscribed; the successor
    adopts them in that order, so after a reload it is the same (kernel receive times)."""
    from tests.service.worker_harness import connect, read_until

    svc = Service(tmp_path, "--workers", "1")
    order: list[socket.socket] = []
    try:
        svc.wait_up(1)

        def join() -> None:
            s = connect(svc.port, timeout=10)
            s.sendall(f"GET /sub/{CH} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            read_until(s, b"Welcome!", limit=10)
            order.append(s)

        for _ in range(10):
            join()
        for i in (1, 4):  # leave, subscribe again: last
            order.pop(i).close()
            join()
        answer = svc.ask({"op": "reload"})
        assert answer.get("ok") and answer.get("reloaded") == 1, answer
        for s in order:
            stamp_arrivals(s)
        sent = svc.ask({"op": "broadcast", "data": "after-reload", "channel": CH})
        assert sent.get("ok"), sent
        arrived = [arrival_ns(s, b"after-reload\n") for s in order]
        assert arrived == sorted(arrived)
    finally:
        for s in order:
            s.close()
        svc.stop()
