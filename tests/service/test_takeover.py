"""``--take-over``: a second service on the same run directory (a new container beside the old)
takes the port, every live connection, the history and the control socket from the running
one, which exits 0; clients stay on their TCP connections and miss nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port, long_poll, wait_for
from tests.support.service import Service
from tests.support.stream import Stream, server_ports

CH = "news"


def successor(tmp: Path, old: Service, workers: int, *args: str) -> Service:
    """A service on ``old``'s port, control socket and state, started with --take-over."""
    svc = Service(
        tmp,
        "--workers",
        str(workers),
        "--ping-interval",
        "30",
        "--control-socket",
        old.control_path,
        "--state-dir",
        str(old.log_dir / "state"),
        "--take-over",
        *args,
        port=old.port,
    )
    svc.control_path = old.control_path
    return svc


def fake_predecessor(path: str, answer: Any) -> Any:
    """A Unix server at ``path`` standing in for a running service: every JSON request line
    gets ``answer(op)`` (a dict; None: stop serving). Returns the listening socket."""
    import json
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    reply = answer(json.loads(line)["op"])
                    if reply is None:
                        return
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("before", "after", "planes"),
    [
        (2, 2, ("uvloop", "uvloop")),
        (3, 2, ("uvloop", "uvloop")),
        (1, 2, ("uvloop", "uvloop")),
        # An upgrade that changes --plane: bare sockets handed to uvloop transports, and back.
        (2, 2, ("uvloop", "raw")),
        (2, 2, ("raw", "uvloop")),
    ],
)
def test_a_new_service_takes_over_every_connection_under_a_publisher(
    short_dir: Path, before: int, after: int, planes: tuple[str, str]
) -> None:
    old = Service(
        short_dir / "old", "--workers", str(before), "--ping-interval", "30", "--plane", planes[0]
    )
    new: Service | None = None
    streams: list[Stream] = []
    stop = threading.Event()
    acked: list[int] = []
    current = {"svc": old}
    pub = threading.Thread()
    poll: dict[str, Any] = {}
    try:
        old.wait_up(before)
        for i in range(12):
            streams.append(Stream(old.port, f"/sub/{CH}", sse=i % 2 == 0))
        wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 10, "12 welcomes")
        wait_for(
            lambda: old.ask({"op": "channels"})["channels"].get(CH) == 12, 10, "12 subscribers"
        )
        first = old.ask({"op": "broadcast", "data": "m1", "channel": CH})
        acked.append(int(first["id"]))
        # The longest wait the service grants: on a loaded host the takeover below has taken
        # over 30 s, and a poll that times out before "side" is published answers empty.
        poller = threading.Thread(
            target=lambda: poll.update(
                answer=long_poll(old.port, "side", since=acked[0], timeout=120)
            )
        )
        poller.start()

        def publisher() -> None:
            # Through whichever service answers at the control socket now: during the handover
            # the old one holds its broadcasts back; after it the new one numbers them.
            i = 1
            while not stop.is_set():
                try:
                    answer = current["svc"].ask(
                        {"op": "broadcast", "data": f"m{i + 1}", "channel": CH}
                    )
                except (OSError, ValueError, AssertionError):
                    time.sleep(0.02)
                    continue
                if answer.get("ok"):
                    i += 1
                    acked.append(int(answer["id"]))
                time.sleep(0.05)

        pub = threading.Thread(target=publisher)
        pub.start()
        wait_for(lambda: len(acked) >= 5, 10, "5 messages before the takeover")
        old_pids = set(old.health()["pids"])  # type: ignore[index]
        new = successor(short_dir / "new", old, after, "--plane", planes[1])
        current["svc"] = new

        def taken() -> dict[str, Any] | None:
            assert new is not None and new.proc.poll() is None, "the new service exited"
            h = new.health()  # the old one answers there until the new one has taken over
            return h if h and "took_over" in h and h.get("workers") == after else None

        health = wait_for(taken, 60, "the new service to take over")
        took = health["took_over"]
        assert took["failed"] == 0 and took["workers"] == before, took
        assert took["handed"] >= 13 and took["kept"] == 0, took  # 12 streams + the long-poll
        assert old.proc.wait(30) == 0  # the old service exits 0 once empty
        assert "handover done" in old.log()
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 10, 15, "10 messages after the takeover")
        stop.set()
        pub.join(10)
        assert acked == sorted(set(acked))  # ids never went back
        assert set(new.health()["pids"]).isdisjoint(old_pids)  # type: ignore[index]
        final = f"m{len(acked)}\n".encode()
        wait_for(lambda: all(final in s.data for s in streams), 10, "the last message")
        for s in streams:
            assert not s.closed, "a stream was closed by the takeover"
            assert s.sock.getsockname() == s.local
        for i, s in enumerate(streams):
            if i % 2 == 0:
                assert s.ids() == acked, (s.ids(), acked)  # each once, in order
            else:
                assert s.plain_messages() == [f"m{k}" for k in range(1, len(acked) + 1)]
        assert {s.local[1] for s in streams} <= server_ports(new.proc.pid)
        side = new.ask({"op": "broadcast", "data": "to the poll", "channel": "side"})
        poller.join(20)
        _local, body = poll["answer"]  # it waited through the takeover, on the same connection
        assert [m["id"] for m in body["messages"]] == [side["id"]]
        # New subscribers reach the new service on the same port; the state moved along.
        late = Stream(new.port, f"/sub/{CH}?last_event_id={acked[-3]}", sse=True)
        wait_for(lambda: len(late.ids()) >= 2, 10, "a late resume")
        assert late.ids() == acked[-2:]
        streams.append(late)
        assert new.stop() == 0
    finally:
        stop.set()
        if pub.is_alive():
            pub.join(10)
        for s in streams:
            s.close()
        if new is not None:
            new.stop()
        old.stop()


def test_take_over_with_nothing_running_starts_as_usual(short_dir: Path) -> None:
    svc = Service(short_dir, "--workers", "1", "--take-over")
    try:
        health = svc.wait_up(1)
        assert "took_over" not in health
        assert "no service answers" in svc.log()
    finally:
        svc.stop()


def test_a_failed_handover_leaves_the_running_service_as_it_is(short_dir: Path) -> None:
    """A handover to a successor that is not there: the worker keeps its connection and serves
    on, the service stays up and says which worker failed; malformed handovers are refused."""
    old = Service(short_dir / "old", "--workers", "1")
    try:
        old.wait_up(1)
        s = Stream(old.port, f"/sub/{CH}", sse=True)
        wait_for(lambda: b"Welcome!" in s.data, 10, "welcome")
        answer = old.ask({"op": "handover", "to": ["/nonexistent/x.sock"], "listeners": 1})
        # A successor that is not there: the worker keeps its connection and serves on.
        assert answer["ok"] and answer["failed"] == 1 and answer["handed"] == 0, answer
        assert old.proc.poll() is None
        sent = old.ask({"op": "broadcast", "data": "still here", "channel": CH})
        wait_for(lambda: f"id: {sent['id']}".encode() in s.data, 10, "a message after it")
        bad = old.ask({"op": "handover", "to": ["a", "b"], "listeners": 1})
        assert bad["ok"] is False and "2 paths for 1 workers" in bad["error"]
        assert old.ask({"op": "handover", "to": "x"})["ok"] is False
        s.close()
    finally:
        old.stop()


def refused_takeover(short_dir: Path, answer: Any, *args: str, **kw: Any) -> str:
    """A service started with --take-over beside a fake_predecessor giving ``answer``, which
    must exit 1: its log."""
    run = short_dir / "run"
    run.mkdir()
    path = str(run / "control.sock")
    server = fake_predecessor(path, answer)
    svc = Service(short_dir / "new", "--control-socket", path, "--take-over", *args, **kw)
    try:
        assert svc.proc.wait(60) == 1
        return svc.log()
    finally:
        server.close()
        svc.stop()


def test_a_handover_the_running_service_refuses_leaves_nothing_of_the_new_one(
    short_dir: Path,
) -> None:
    """The service at the control socket answers health but refuses the handover (as one in
    the middle of a reload does): the new service stops the workers it started, removes their
    handoff sockets and exits 1, without taking the port."""
    import socket

    import psutil

    port, asked = free_port(), []

    def answer(op: str) -> dict[str, Any]:
        asked.append(op)
        if op == "health":
            return {"ok": True, "workers": 1, "pids": [1], "port": port}
        return {
            "ok": False,
            "code": "bad_request",
            "error": "a reload or handover is under way already",
        }

    log = refused_takeover(short_dir, answer, "--workers", "2", port=port)
    assert "takeover refused by the running service: a reload or handover" in log, log
    assert asked == ["health", "stats", "handover"]
    run = short_dir / "run"
    assert not list(run.glob("takeover-*.sock"))
    workers = [
        p
        for p in psutil.process_iter(["environ"])
        if (p.info["environ"] or {}).get("COMET_WORKER_ADOPT", "").startswith(str(run))
    ]
    assert workers == []
    with socket.socket() as probe:  # nobody of ours listens on the port
        probe.bind(("127.0.0.1", port))


def test_a_takeover_to_another_port_is_refused_before_anything_starts(short_dir: Path) -> None:
    """The running service serves one port, the new one is set to another: the listener would
    come with the connections (the workers serving the old port, a restarted worker the new
    one), so the new service says so and exits 1 without asking for a handover."""
    running_port, port, asked = free_port(), free_port(), []

    def answer(op: str) -> dict[str, Any]:
        asked.append(op)
        return {"ok": True, "workers": 1, "pids": [1], "port": running_port}

    log = refused_takeover(short_dir, answer, "--workers", "1", port=port)
    assert (
        f"serves port {running_port} and this one is set to --port {port}; a takeover "
        f"keeps the port. Start this one with --port {running_port}" in log
    ), log
    assert asked == ["health"]


def test_a_takeover_by_too_few_workers_to_hold_the_connections_is_refused(
    short_dir: Path,
) -> None:
    """The running service's two workers hold 15,000 connections each; one worker here (open
    files 20,000, less the 500 reserve) could not hold 30,000: its handoff would fail mid-way
    and leave both services serving part of the clients. Refused before anything starts,
    naming how many workers would do."""
    port, asked = free_port(), []

    def answer(op: str) -> dict[str, Any]:
        asked.append(op)
        if op == "stats":
            return {"ok": True, "frame": {"workers": [{"conns": 15000}, {"conns": 15000}]}}
        return {"ok": True, "workers": 2, "pids": [1, 2], "port": port}

    log = refused_takeover(short_dir, answer, "--workers", "1", port=port, nofile=20000)
    assert (
        "holds 30000 connections on 2 workers; with 1 workers here one would take 30000, "
        "more than the 19500 it can hold (RLIMIT_NOFILE 20000 less --fd-reserve 500). "
        "Start this one with --workers 2 or more" in log
    ), log
    assert asked == ["health", "stats"]


def test_workers_whose_giver_never_comes_listen_once_the_handover_has_ended(
    short_dir: Path,
) -> None:
    """The predecessor answers the handover without handing anything (as one whose workers
    failed would, or one that answers late): the new workers are told the handover has ended
    (``adopt_end``) and listen by themselves at once, not after waiting out their giver (120 s
    and more: the wait grows with the rounds of a big handover)."""
    import os
    import socket

    from service.contracts import GIVER_TIMEOUT, adopt_wait

    assert adopt_wait(1, 2) == GIVER_TIMEOUT
    assert adopt_wait(54, 2) == GIVER_TIMEOUT + 26 * 30  # 27 rounds of two
    run = short_dir / "run"
    run.mkdir()
    path = str(run / "control.sock")
    port = free_port()
    answered = threading.Event()

    def answer(op: str) -> dict[str, Any]:
        if op == "health":
            return {"ok": True, "workers": 2, "pids": [1, 2], "port": port}
        time.sleep(1.0)
        # Gone, as a predecessor is once it has handed over (the answer still leaves).
        server.close()
        os.unlink(path)
        answered.set()
        return {"ok": True, "workers": 2, "handed": 0, "kept": 0, "failed": 0, "seconds": 1.0}

    server = fake_predecessor(path, answer)
    svc = Service(
        short_dir / "new", "--workers", "2", "--control-socket", path, "--take-over", port=port
    )
    try:
        wait_for(answered.is_set, 60, "the handover request")
        t0 = time.monotonic()

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 30, "the new workers listening by themselves")
        s = Stream(port, f"/sub/{CH}", sse=False, timeout=30)
        wait_for(lambda: b"Welcome!" in s.data, 30, "a welcome from the new service")
        assert time.monotonic() - t0 < 20
        s.close()
        # adopt_end wakes each worker's wait for its giver (handoff.py's stop_waiting): both
        # open their own listener, not only the one whose log line happened to come first.
        wait_for(
            lambda: svc.log().count("no listener was handed over; opening one") == 2,
            5,
            "both workers to open their own listener",
        )
        log = svc.log()
        assert log.count("the handover ended without this worker's giver") == 2, log
    finally:
        if not answered.is_set():
            server.close()
        svc.stop()
