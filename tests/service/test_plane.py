"""--plane raw (service/worker/plane.py): what only the bare-socket plane does itself — keeping
what the kernel did not take and sending it in order, ending connections without leaving a
descriptor or an epoll entry — over real sockets against an in-process worker. The wire contract
on this plane is test_worker_wire.py's (each test there runs on both planes); reloads and
takeovers across planes are in test_reload.py and test_takeover.py."""

from __future__ import annotations

import os
import socket
import time

import pytest

from service.worker.plane import Plane
from tests.service.worker_harness import (
    ThreadWorker,
    channel_count,
    read_all,
    read_until,
    running_worker,
    subscribe,
    wait_for,
)


def _plane(w: ThreadWorker) -> Plane:
    assert w.worker is not None
    plane = w.worker._plane
    assert plane is not None and w.worker._server is plane
    return plane


def _unsent(w: ThreadWorker) -> int:
    return int(w.call(lambda: sum(t.get_write_buffer_size() for t in _plane(w).conns.values())))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_what_the_kernel_does_not_take_is_kept_and_sent_in_order() -> None:
    # No ping within the test (the harness pings every 0.2 s): one written after the last
    # message would leave the stream ending with it, and the loop below waiting for its end.
    with running_worker(
        plane="raw", limit_write_buffer=4 << 20, limit_message_bytes=200_000, ping_interval=60
    ) as w:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", w.port))
        with s:
            s.sendall(b"GET /sub/full HTTP/1.0\r\n\r\n")  # HTTP/1.0: no chunk framing
            read_until(s, b"Welcome!\n")
            wait_for(lambda: channel_count(w, "full") == 1)
            sent: list[bytes] = []
            for i in range(40):  # bounded: ~4 MB offered to a client not reading
                body = (b"%03d" % i) * 33_000
                sent.append(body + b"\n")
                w.broadcast(body.decode(), channel="full")
                if _unsent(w) > 200_000:
                    break
            assert _unsent(w) > 200_000, "the kernel took everything: nothing was kept"
            s.settimeout(10)
            got = bytearray()
            want = b"".join(sent)
            deadline = time.monotonic() + 15
            while not got.endswith(want[-100:]) or len(got) < len(want):
                assert time.monotonic() < deadline, (len(got), len(want))
                chunk = s.recv(1 << 20)
                assert chunk, "closed before everything arrived"
                got += chunk
            # A ping (none is due before 3 s) may fall between messages, never inside one.
            assert got.replace(b"ping\n", b"") == want
            wait_for(lambda: _unsent(w) == 0, 5)
            assert w.stats()["slow_dropped_total"] == 0


def test_a_first_answer_the_kernel_does_not_take_at_once_is_sent_once_watched() -> None:
    # A connection is watched only after its first step (head read, welcome and resumed
    # history written): what that step could not send must still go out, in order.
    # No ping within the test (the harness pings every 0.2 s): one written meanwhile would be
    # queued after the history, and the stream would no longer end with the last body.
    with running_worker(
        plane="raw", limit_write_buffer=8 << 20, limit_message_bytes=200_000, ping_interval=60
    ) as w:
        first = 0
        bodies = []
        for i in range(60):  # ~6 MB of history on a channel nobody listens to yet (the kernel
            # took ~2.9 MB of it at once here, with tcp_wmem's maximum at 16 MB)
            bodies.append((b"%03d" % i) * 33_000)
            w.broadcast(bodies[-1].decode(), channel="big")
            if i == 0:
                assert w.worker is not None
                first = int(w.call(lambda: w.worker.hub.last_id))
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", w.port))
        with s:
            s.sendall(
                f"GET /sub/big?format=sse&last_event_id={first - 1} HTTP/1.0\r\n\r\n".encode()
            )
            wait_for(lambda: _unsent(w) > 0)  # kept, and the connection watched for room
            s.settimeout(10)
            got = bytearray()
            last = b"data: " + bodies[-1] + b"\n\n"
            deadline = time.monotonic() + 15
            while True:  # until the last body has come, whatever follows it
                assert time.monotonic() < deadline, len(got)
                chunk = s.recv(1 << 20)
                assert chunk, "closed before everything arrived"
                got += chunk
                if last in got[-(len(last) + len(chunk)) :]:
                    break
            datas = [ln[6:] for ln in got.split(b"\n") if ln.startswith(b"data: ")]
            assert datas == [b"Welcome!", *bodies]
            wait_for(lambda: _unsent(w) == 0, 5)
            assert w.stats()["conns"] == 1 and w.stats()["slow_dropped_total"] == 0


def test_past_the_cap_a_request_read_with_its_accept_is_answered_503_and_never_watched() -> None:
    with running_worker(plane="raw", limit_connections=2) as w:
        plane = _plane(w)
        held = [subscribe(w, "/sub/cap") for _ in range(2)]
        try:
            for s in held:
                read_until(s, b"Welcome!")
            for _ in range(3):
                s = subscribe(w, "/sub/cap")  # its head is read with its accept (defer-accept)
                with s:
                    got = read_all(s)
                assert got.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in got, got[:80]
            assert w.call(lambda: len(plane.conns)) == 2
            stats = w.stats()
            assert stats["conns"] == 2 and stats["rejected_total"] == 3
        finally:
            for s in held:
                s.close()


def test_no_descriptor_or_epoll_entry_outlives_its_connection() -> None:
    with running_worker(plane="raw", timeout_header=0.5, defer_accept=0) as w:
        plane = _plane(w)
        before = _fds()
        streams = [subscribe(w, "/sub/fd") for _ in range(20)]
        for s in streams:
            read_until(s, b"Welcome!")
        wait_for(lambda: channel_count(w, "fd") == 20)
        assert _fds() >= before + 40  # both ends are in this process
        for s in streams[:10]:  # ended by the client
            s.close()
        for s in streams[10:15]:  # ended by the server: bytes after a subscribe request
            s.sendall(b"x")
        silent = [socket.create_connection(("127.0.0.1", w.port)) for _ in range(5)]  # 408s
        bad = socket.create_connection(("127.0.0.1", w.port))
        bad.sendall(b"BREW / HTTP/1.1\r\n\r\n")  # 405
        assert read_all(bad).startswith(b"HTTP/1.1 405")
        bad.close()
        for s in silent:
            assert read_all(s).startswith(b"HTTP/1.1 408")
            s.close()
        for s in streams[10:15]:
            read_all(s)
            s.close()
        wait_for(lambda: w.stats()["conns"] == 5, 5)
        assert w.call(lambda: len(plane.conns)) == 5
        for s in streams[15:]:
            s.close()
        wait_for(lambda: w.stats()["conns"] == 0, 5)
        wait_for(lambda: _fds() <= before, 5)
        assert w.call(lambda: len(plane.conns)) == 0


def test_a_drain_reaches_and_closes_every_raw_connection() -> None:
    with running_worker(plane="raw") as w:
        streams = [subscribe(w, "/sub/drain") for _ in range(5)]
        for s in streams:
            read_until(s, b"Welcome!")
        t0 = time.monotonic()
        w.drain(3.0)
        for s in streams:
            data = read_all(s)  # the reconnect hint, then the server's close
            assert b"reconnect" in data, data
            s.close()
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plane", "udp"], "plane: expected uvloop|raw, got 'udp'"),
        (["--plane", "raw", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "plain HTTP only"),
    ],
)
def test_a_plane_the_service_cannot_run_is_one_line_at_start(args, message) -> None:
    import subprocess
    import sys

    from tests.service.worker_harness import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_accept_error_pauses_accepting_instead_of_spinning(monkeypatch) -> None:
    """EMFILE (or any accept error but 'nothing queued'): the listener is left alone for
    _ACCEPT_RETRY_S, then watched again, and a connection queued meanwhile is served."""
    from service.worker import plane as plane_mod

    monkeypatch.setattr(plane_mod, "_ACCEPT_RETRY_S", 0.3)
    with running_worker(plane="raw") as w:
        plane = _plane(w)
        listener = plane.sockets[0]
        calls: list[float] = []
        real = listener._accept  # type: ignore[attr-defined]

        class Listener:  # the real one, whose next accept fails once with EMFILE
            def __getattr__(self, name: str) -> object:
                return getattr(listener, name)

            def _accept(self) -> tuple[int, object]:
                calls.append(time.monotonic())
                if len(calls) == 1:
                    raise OSError(24, "Too many open files")
                return real()

        w.call(lambda: plane.sockets.__setitem__(0, Listener()))
        s = subscribe(w, "/sub/emfile")
        data = read_until(s, b"Welcome!")
        assert data.startswith(b"HTTP/1.1 200 OK"), data
        assert len(calls) >= 2 and calls[1] - calls[0] >= 0.25, calls  # waited, did not spin
        s.close()
