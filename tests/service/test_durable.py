"""Nothing lost across restarts, against the real service: SIGTERM + start, kill -9 of the whole
tree + start, a wiped state dir, a read-only one; SSE, plain-after-resume and long-poll clients.
Every resuming client gets every message exactly once or an explicit reset, never a reused id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.admin_api.redis_server import RedisServer
from tests.support.net import wait_for
from tests.support.service import Service
from tests.support.stream import Stream

CH = "dur"


def start(tmp: Path, port: int | None = None, *args: str) -> Service:
    svc = Service(tmp, "--workers", "2", *args, port=port)
    svc.wait_up(2)
    return svc


def publish(svc: Service, data: str, channel: str | None = CH) -> int:
    answer = svc.ask({"op": "broadcast", "data": data, "channel": channel, "event": None})
    assert answer["ok"], answer
    return int(answer["id"])


def http(
    port: int, target: str, headers: str = "", until: bytes = b"", timeout: float = 10
) -> bytes:
    """One request; read until ``until`` appears (or the server closes / the timeout passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (until and until in data):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return data


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """id/event/data of every SSE event in a (chunked) response body."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    text = b"".join(
        part for i, part in enumerate(body.split(b"\r\n")) if i % 2 == 1
    ).decode()  # chunk data lines sit at odd positions (size, data, size, data ...)
    events = []
    for block in text.split("\n\n"):
        ev: dict[str, Any] = {}
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                ev[key] = value
        if ev:
            events.append(ev)
    return events


def resume(port: int, last_id: int, count: int) -> list[dict[str, Any]]:
    """SSE with Last-Event-ID, until ``count`` messages (or a reset) have arrived."""
    raw = http(
        port,
        f"/sub/{CH}",
        f"Accept: text/event-stream\r\nLast-Event-ID: {last_id}\r\n",
        until=b"event: reset" if count == 0 else f"data: m{count}".encode(),
        timeout=5,
    )
    return [e for e in sse_events(raw) if e.get("event") != "welcome"]


def poll(port: int, since: int, timeout: float = 0) -> dict[str, Any]:
    raw = http(port, f"/poll/{CH}?since={since}&timeout={timeout}", until=b"}", timeout=10)
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


def test_sigterm_and_start_resume_exactly(tmp_path):
    svc = start(tmp_path)
    port = svc.port
    ids = [publish(svc, f"m{i}") for i in range(1, 21)]
    assert ids == list(range(ids[0], ids[0] + 20))
    assert svc.stop() == 0
    t0 = time.monotonic()
    svc = start(tmp_path, port)
    try:
        health = svc.ask({"op": "health"})
        assert time.monotonic() - t0 < 10
        store = health["store"]
        assert store["durable"] and store["messages"] == 20 and store["newest_id"] == ids[-1]
        # SSE resume: the ten after ids[9], in order, no duplicates, no reset.
        events = resume(port, ids[9], 20)
        assert [int(e["id"]) for e in events] == ids[10:]
        assert [e["data"] for e in events] == [f"m{i}" for i in range(11, 21)]
        # Long-poll resume.
        answer = poll(port, ids[9])
        assert [m["id"] for m in answer["messages"]] == ids[10:] and answer["reset"] is False
        # New ids go on above every id issued before the restart.
        assert publish(svc, "m21") > ids[-1]
        frame = wait_for(lambda: svc.ask({"op": "stats"}).get("frame"), 10, "a frame")
        assert frame["store"]["path"].endswith("history.sqlite3")
    finally:
        assert svc.stop() == 0, svc.log()


def test_kill_9_of_the_whole_tree_loses_nothing_answered(tmp_path):
    svc = start(tmp_path)
    port = svc.port
    ids = [publish(svc, f"m{i}") for i in range(1, 11)]
    tree = [svc.proc.pid] + [c.pid for c in psutil.Process(svc.proc.pid).children(recursive=True)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    svc.proc.wait(10)
    svc.stop()
    svc = start(tmp_path, port)
    try:
        events = resume(port, ids[4], 10)
        assert [int(e["id"]) for e in events] == ids[5:]
        assert publish(svc, "m11") > ids[-1]
    finally:
        svc.stop()


def test_a_wiped_state_dir_gives_reset_not_silence_and_ids_never_go_back(tmp_path):
    svc = start(tmp_path)
    port = svc.port
    ids = [publish(svc, f"m{i}") for i in range(1, 6)]
    assert svc.stop() == 0
    shutil.rmtree(tmp_path / "logs" / "state")
    svc = start(tmp_path, port)
    try:
        events = resume(port, ids[-1], 0)
        assert events and events[0]["event"] == "reset", events
        info = json.loads(events[0]["data"])
        assert info["last_event_id"] == ids[-1] and info["newest_id"] > ids[-1]
        answer = poll(port, ids[-1])
        assert answer["reset"] is True and answer["messages"] == []
        assert publish(svc, "after") > ids[-1]
    finally:
        svc.stop()


def test_an_id_above_the_newest_is_reset_then_the_poll_waits(tmp_path):
    svc = start(tmp_path)
    port = svc.port
    try:
        last = publish(svc, "m1")
        t0 = time.monotonic()
        answer = poll(port, last + 1000, timeout=5)
        assert time.monotonic() - t0 < 2  # told at once ...
        assert answer == {"messages": [], "last_id": last, "reset": True}
        events = resume(port, last + 1000, 0)
        assert events[0]["event"] == "reset"
        assert json.loads(events[0]["data"])["newest_id"] == last
        # ... and the next poll, from the last_id it was given, waits normally.
        t0 = time.monotonic()
        again = poll(port, answer["last_id"], timeout=1)
        assert again == {"messages": [], "last_id": last, "reset": False}
        assert time.monotonic() - t0 >= 0.9
    finally:
        svc.stop()


def test_a_read_only_state_dir_keeps_serving_and_says_durability_is_off(tmp_path):
    state = tmp_path / "ro"
    state.mkdir()
    state.chmod(0o500)
    env_user = os.geteuid() == 0
    try:
        # root ignores directory permissions: make it a file instead, which nobody can mkdir into.
        if env_user:
            state.chmod(0o700)
            shutil.rmtree(state)
            state.write_text("not a directory")
        svc = start(tmp_path, None, "--state-dir", str(state))
        try:
            store = svc.ask({"op": "health"})["store"]
            assert store["durable"] is False and store["last_error"], store
            assert str(state) in store["last_error"]
            assert publish(svc, "live") > 0
            log = svc.log()
            assert log.count("history store unavailable") == 1 and "Traceback" not in log
        finally:
            assert svc.stop() == 0
    finally:
        if state.is_dir():
            state.chmod(0o700)


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_clients_through_a_restart_under_a_publisher_get_every_message_once(tmp_path, how):
    """A publisher at ~20 messages/s runs through SIGTERM (or kill -9 of the whole tree) + start;
    an SSE client and a long-poll client that resume from the last id they saw get the
    acknowledged messages after it, in order, each once. After kill -9 a message may have been
    stored and not yet acknowledged: it is delivered too (never a gap, never a duplicate)."""
    svc = start(tmp_path)
    port = svc.port
    acked: list[int] = []
    stop = threading.Event()
    current = {"svc": svc}

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                acked.append(publish(current["svc"], f"p{i}"))
            except (OSError, AssertionError, ValueError, KeyError):
                pass  # down between the two services: not acknowledged, not expected
            time.sleep(0.05)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        wait_for(lambda: len(acked) >= 10, 10, "10 acknowledged messages")
        seen = acked[-1]
        if how == "sigterm":
            assert svc.stop() == 0
        else:
            root = psutil.Process(svc.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                proc.kill()
            svc.proc.wait(10)
            svc.stop()
        current["svc"] = svc = start(tmp_path, port)
        wait_for(lambda: len(acked) > 0 and acked[-1] > seen + 10, 20, "messages after the restart")
        stop.set()
        thread.join(10)
        expected = [i for i in acked if i > seen]
        raw = http(
            port,
            f"/sub/{CH}",
            f"Accept: text/event-stream\r\nLast-Event-ID: {seen}\r\n",
            until=f"id: {expected[-1]}\n".encode(),
            timeout=10,
        )
        got = [int(e["id"]) for e in sse_events(raw) if "id" in e]
        polled = [m["id"] for m in poll(port, seen)["messages"]]
        assert not any(e.get("event") == "reset" for e in sse_events(raw))
        for ids in (got, polled):
            assert ids == sorted(set(ids)) and ids[-1] >= expected[-1]  # in order, each once
            if how == "sigterm":
                assert ids[: len(expected)] == expected
            else:
                assert set(expected) <= set(ids)
    finally:
        stop.set()
        thread.join(10)
        svc.stop()


def test_long_polls_across_workers_see_each_message_once(tmp_path):
    """A poll from the last_id one worker answered may land on another worker that has not
    got that message yet (a few ms behind): it waits for it instead of answering a reset with
    an older last_id, which sent the client back and the message twice."""
    svc = start(tmp_path)
    port = svc.port
    try:
        since = publish(svc, "first")
        seen: list[int] = []
        stop = threading.Event()

        def poller() -> None:
            nonlocal since
            while not stop.is_set():
                answer = poll(port, since, timeout=2)
                seen.extend(m["id"] for m in answer["messages"])
                since = answer["last_id"]

        t = threading.Thread(target=poller)
        t.start()
        sent = []
        for i in range(60):
            sent.append(publish(svc, f"m{i}"))
            time.sleep(0.03)
        wait_for(lambda: seen and seen[-1] == sent[-1], 10, "the last message polled")
        stop.set()
        t.join(10)
        assert seen == sent  # each once, in order, none missed
    finally:
        svc.stop()


@pytest.mark.redis
def test_redis_restarted_without_its_data_ids_go_on_and_resumes_across_it_get_reset(short_dir):
    """Two nodes on one Redis without persistence, a publisher at ~20/s on the first. Redis is
    killed and started empty: ids go on above every earlier one, the live streams on both nodes
    get every acknowledged message once and in order, neither node reports messages missed
    (the jump to the new floor is not a gap), and a resume from before the loss gets a reset on
    either node (what the old Redis held that a node had not read is unknown), while a resume
    from after it replays exactly."""
    redis = RedisServer(short_dir)
    redis.start()
    nodes: list[Service] = []
    stop = threading.Event()
    acked: list[int] = []
    live: list[Stream] = []
    thread = threading.Thread()
    try:
        for name in ("a", "b"):
            svc = Service(short_dir / name, "--workers", "2", "--bus", redis.url, "--node-id", name)
            nodes.append(svc)
        for svc in nodes:
            svc.wait_up(2, with_frame=True)
        a, b = nodes
        live.extend(Stream(svc.port, f"/sub/{CH}", sse=True) for svc in nodes)

        def publisher() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                answer = a.ask({"op": "broadcast", "data": f"p{i}", "channel": CH})
                if answer.get("ok"):
                    acked.append(int(answer["id"]))
                time.sleep(0.05)

        thread = threading.Thread(target=publisher)
        thread.start()
        wait_for(lambda: len(acked) >= 10, 10, "10 acknowledged messages")
        redis.kill()
        before = acked[-1]
        wait_for(lambda: a.frame()["bus"]["up"] is False, 10, "the bus down on a")
        redis.start()  # same port, empty
        wait_for(lambda: sum(i > before for i in acked) >= 10, 20, "10 messages after")
        stop.set()
        thread.join(10)
        after = [i for i in acked if i > before]
        assert after[0] > before + 1_000_000  # above the clock floor: ids never went back
        for c in live:
            wait_for(lambda c=c: c.ids() and c.ids()[-1] >= acked[-1], 10, "the last message")
            assert c.ids() == sorted(set(c.ids())) and set(acked) <= set(c.ids())
        for svc in nodes:
            assert svc.frame()["bus"]["missed_total"] == 0, svc.frame()["bus"]
            assert "left the feed" not in svc.log()
            for since in (before, acked[0]):
                raw = http(
                    svc.port,
                    f"/sub/{CH}",
                    f"Accept: text/event-stream\r\nLast-Event-ID: {since}\r\n",
                    until=b"event: reset",
                    timeout=5,
                )
                assert [e.get("event") for e in sse_events(raw)][:2] == ["welcome", "reset"], raw
                assert poll(svc.port, since)["reset"] is True
            mid = after[len(after) // 2]
            replay = http(
                svc.port,
                f"/sub/{CH}",
                f"Accept: text/event-stream\r\nLast-Event-ID: {mid}\r\n",
                until=f"id: {after[-1]}\n".encode(),
                timeout=5,
            )
            events = [e for e in sse_events(replay) if e.get("event") != "welcome"]
            assert [int(e["id"]) for e in events] == [i for i in after if i > mid]
            polled = poll(svc.port, mid)
            assert [m["id"] for m in polled["messages"]] == [i for i in after if i > mid], polled
    finally:
        for c in live:
            c.close()
        stop.set()
        if thread.is_alive():
            thread.join(10)
        for svc in nodes:
            svc.stop()
        redis.kill()
