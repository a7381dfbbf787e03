"""The subscriber wire contract over real sockets against an in-process worker."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from service.contracts import LAG_BOUNDS_MS
from service.worker.http import Route
from service.worker.protocol import HEADS_MAX
from tests.service import worker_harness
from tests.service.worker_harness import (
    ThreadWorker,
    channel_count,
    connect,
    dechunk,
    make_config,
    read_all,
    read_until,
    request,
    running_worker,
    split_head,
    status_of,
    subscribe,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True, params=["uvloop", "raw"])
def plane(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here once on uvloop's transports and once on bare sockets (--plane raw)."""
    worker_harness.PLANE = request.param
    try:
        yield request.param
    finally:
        worker_harness.PLANE = "uvloop"


@pytest.fixture(scope="module")
def w(plane: str) -> Iterator[ThreadWorker]:
    with running_worker(timeout_header=1.0, history_size=5, timeout_keepalive=2.0) as tw:
        yield tw


# -- streams -------------------------------------------------------------------------------------
def test_curl_sees_welcome_and_ping(w: ThreadWorker) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is installed by ./dev test"
    p = subprocess.run(
        [curl, "-sN", "--max-time", "1", f"http://127.0.0.1:{w.port}/"],
        capture_output=True,
        timeout=10,
    )
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "Welcome!"
    assert lines.count("ping") >= 2 and set(lines[1:]) == {"ping"}, lines


def test_plain_chunked_stream_gets_broadcast(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/plain1") as s:
        head = read_until(s, b"Welcome!\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
        wait_for(lambda: channel_count(w, "plain1") == 1)
        assert w.broadcast("hello\nworld", channel="plain1") == 1
        data = read_until(s, b"world\n")
        assert b"hello\nworld\n" in dechunk(split_head(data)[1] if b"\r\n\r\n" in data else data)


def test_http10_close_delimited(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/old", ver="1.0") as s:
        data = read_until(s, b"Welcome!\n")
        head, body = split_head(data)
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
        assert body == b"Welcome!\n"
        wait_for(lambda: channel_count(w, "old") == 1)
        w.broadcast("m1", channel="old")
        assert read_until(s, b"m1\n").endswith(b"m1\n")


def test_broadcast_to_all_reaches_every_channel(w: ThreadWorker) -> None:
    with (
        subscribe(w, "/sub/ga") as a,
        subscribe(w, "/sub/gb", "Accept: text/event-stream\r\n") as b,
    ):
        read_until(a, b"Welcome!")
        read_until(b, b"Welcome!")
        wait_for(lambda: channel_count(w, "ga") == 1 and channel_count(w, "gb") == 1)
        n = w.broadcast("to-all", event="note")
        assert n >= 2
        assert b"to-all\n" in read_until(a, b"to-all\n")
        got = read_until(b, b"data: to-all\n\n")
        assert b"event: note\ndata: to-all\n\n" in got


def test_channel_isolation(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/iso1") as a, subscribe(w, "/sub/iso2") as b:
        read_until(a, b"Welcome!")
        read_until(b, b"Welcome!")
        wait_for(lambda: channel_count(w, "iso1") == 1)
        assert w.broadcast("only-1", channel="iso1") == 1
        read_until(a, b"only-1")
        # b keeps getting pings; read it for a while and make sure the message is not there.
        b.settimeout(0.1)
        seen = bytearray()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                seen += b.recv(4096)
            except TimeoutError:
                pass
        assert b"only-1" not in seen and b"ping" in seen


def test_sse_format_and_multiline(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/ssefmt?format=sse") as s:
        data = read_until(s, b"data: Welcome!\n\n")
        head, body = split_head(data)
        assert b"Content-Type: text/event-stream" in head
        text = dechunk(body)
        # A ping (every 0.2 s here) may come in the same read, after the welcome.
        text = text[: text.index(b"data: Welcome!\n\n") + len(b"data: Welcome!\n\n")]
        assert text.startswith(b"retry: ") and text.endswith(
            b"\n\nevent: welcome\ndata: Welcome!\n\n"
        )
        assert 3000 <= int(text[7:].split(b"\n")[0]) < 6000  # jittered per connection
        wait_for(lambda: channel_count(w, "ssefmt") == 1)
        w.broadcast("l1\nl2", channel="ssefmt", event="ev")
        got = read_until(s, b"data: l2\n\n")
        assert b"event: ev\ndata: l1\ndata: l2\n\n" in got
        assert b": ping\n\n" in read_until(s, b": ping\n\n")


def _sse_ids(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"(?m)^id: (\d+)$", raw)]


def test_sse_resume_no_gap_no_duplicate(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/res", "Accept: text/event-stream\r\n") as s:
        read_until(s, b"Welcome!")
        wait_for(lambda: channel_count(w, "res") == 1)
        w.broadcast("r1", channel="res")
        w.broadcast("r2", channel="res")
        got = read_until(s, b"data: r2\n\n")
        last = _sse_ids(got)[-1]
    # While disconnected: two more on the channel, one to everyone.
    w.broadcast("r3", channel="res")
    w.broadcast("r4-all")
    w.broadcast("other", channel="elsewhere")
    with subscribe(w, "/sub/res", f"Accept: text/event-stream\r\nLast-Event-ID: {last}\r\n") as s:
        got = read_until(s, b"data: r4-all\n\n")
        wait_for(lambda: channel_count(w, "res") == 1)
        w.broadcast("r5", channel="res")
        got += read_until(s, b"data: r5\n\n")
        body = dechunk(split_head(got)[1])
        assert b"event: reset" not in body
        datas = [ln[6:] for ln in body.split(b"\n") if ln.startswith(b"data: ")]
        assert datas == [b"Welcome!", b"r3", b"r4-all", b"r5"]
        ids = _sse_ids(got)
        assert ids == sorted(ids) and len(set(ids)) == 3 and ids[0] == last + 1


def test_a_head_seen_before_is_served_from_the_worker_s_parsed_heads(w: ThreadWorker) -> None:
    # Reconnecting SSE clients resuming from the same id send the same bytes: the second is
    # answered from the first one's parse, with the same history replayed.
    assert w.worker is not None
    heads = w.worker.protocol_class.heads
    w.broadcast("h1", channel="hc")
    last = w.call(lambda: w.worker.hub.last_id)
    w.broadcast("h2", channel="hc")
    hdrs = f"Accept: text/event-stream\r\nLast-Event-ID: {last}\r\n"
    head = f"GET /sub/hc HTTP/1.1\r\nHost: t\r\n{hdrs}\r\n".encode()
    for _ in range(2):
        with subscribe(w, "/sub/hc", hdrs) as s:
            body = dechunk(split_head(read_until(s, b"data: h2\n\n"))[1])
            assert [ln for ln in body.split(b"\n") if ln.startswith(b"data: ")] == [
                b"data: Welcome!",
                b"data: h2",
            ]
            assert w.call(lambda: head in heads)
    # A plain stream's welcome is kept with its head, and is the one its HTTP version needs.
    for ver, chunked in [("1.1", True), ("1.0", False)]:
        for _ in range(2):
            with subscribe(w, "/sub/hcp", ver=ver) as s:
                head_bytes, body = split_head(read_until(s, b"Welcome!\n"))
                assert (b"Transfer-Encoding: chunked" in head_bytes) is chunked
                assert (dechunk(body) if chunked else body) == b"Welcome!\n"
    # The entry is what a hit uses: pointed elsewhere, the same bytes subscribe there.
    req, r, *more = w.call(lambda: heads[head])
    assert r.channel == "hc" and r.sse and r.last_event_id == last
    moved = (req, Route("stream", "hc-moved", sse=True), *more)
    w.call(lambda: heads.__setitem__(head, moved))
    try:
        with subscribe(w, "/sub/hc", hdrs) as s:
            read_until(s, b"Welcome!")
            wait_for(lambda: channel_count(w, "hc-moved") == 1)
            assert channel_count(w, "hc") == 0
    finally:
        w.call(lambda: heads.pop(head, None))
    # Not kept: a head with a subscriber token (one per user, and a secret), one with bytes
    # after it, one that failed.
    for path, extra, status in [
        ("/sub/hc?token=abc", "", None),
        ("/sub/hc", "\r\nX", 400),
        ("/sub/bad%20name", "", 400),
    ]:
        plain = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        with connect(w.port) as s:
            s.sendall(plain + extra.encode())
            got = read_until(s, b"Welcome!") if status is None else read_all(s)
            assert status is None or status_of(got) == status, got[:80]
            assert not w.call(lambda k=plain: k in heads), path
    # Bounded: as many distinct heads as it keeps, and one more, leave at most that many.
    for i in range(HEADS_MAX + 1):
        got = request(w.port, f"HEAD /sub/hc{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert status_of(got) == 200
    assert 0 < w.call(lambda: len(heads)) <= HEADS_MAX


def test_sse_resume_query_param(w: ThreadWorker) -> None:
    w.broadcast("q1", channel="resq")
    n_id = w.stats()["msgs_sent_total"]  # any read; ids come from the hub below
    assert n_id >= 0
    assert w.worker is not None
    last = w.call(lambda: w.worker.hub.last_id)
    w.broadcast("q2", channel="resq")
    with subscribe(w, f"/sub/resq?format=sse&last_event_id={last}") as s:
        got = dechunk(split_head(read_until(s, b"data: q2\n\n"))[1])
        assert b"data: q1" not in got and f"id: {last + 1}\ndata: q2".encode() in got


def test_sse_reset_when_history_lost(w: ThreadWorker) -> None:
    # history_size=5 on this worker: 8 messages push the first 3 out of the ring.
    assert w.worker is not None
    start = w.call(lambda: w.worker.hub.last_id)
    for i in range(8):
        w.broadcast(f"h{i}", channel="reset1")
    with subscribe(
        w, "/sub/reset1", f"Accept: text/event-stream\r\nLast-Event-ID: {start + 1}\r\n"
    ) as s:
        got = dechunk(split_head(read_until(s, b"data: h7\n\n"))[1])
        assert b"event: reset\ndata: " in got
        reset_line = got.split(b"event: reset\ndata: ", 1)[1].split(b"\n", 1)[0]
        info = json.loads(reset_line)
        # oldest_id: the first message still held after the asked id (what is replayed next)
        assert info == {
            "last_event_id": start + 1,
            "oldest_id": start + 4,
            "newest_id": start + 8,
        }
        datas = [ln[6:] for ln in got.split(b"\n") if ln.startswith(b"data: h")]
        assert datas == [b"h3", b"h4", b"h5", b"h6", b"h7"]
        assert got.index(b"event: reset") < got.index(b"data: h3")


def test_head_request(w: ThreadWorker) -> None:
    resp = request(w.port, b"HEAD /sub/x HTTP/1.1\r\nHost: t\r\n\r\n")
    head, body = split_head(resp)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/plain" in head and body == b""


def test_tcp_nodelay_on_accepted_sockets(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/nodelay") as s:
        read_until(s, b"Welcome!")
        wait_for(lambda: channel_count(w, "nodelay") == 1)
        assert w.worker is not None

        def nodelay() -> int:
            (c,) = w.worker.hub.streams["nodelay"]  # type: ignore[union-attr]
            sock = c.transport.get_extra_info("socket")
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        assert w.call(nodelay) == 1


def test_bytes_after_request_close_stream(w: ThreadWorker) -> None:
    with subscribe(w, "/sub/chatty") as s:
        read_until(s, b"Welcome!")
        s.sendall(b"hello?")
        rest = read_all(s)  # the server closes
        assert b"hello" not in rest
    with connect(w.port) as s:  # pipelined bytes together with the request
        s.sendall(b"GET /sub/chatty HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = read_all(s)
        # A clear 400 before the close, not a silent one.
        assert status_of(resp) == 400 and b"Welcome" not in resp
        assert b"bytes after a subscribe request" in resp


def test_stream_client_that_closes_is_gone_at_once() -> None:
    # A long ping interval, so only the client's FIN (not a failed ping write) can end the stream.
    with running_worker(ping_interval=60.0) as tw, subscribe(tw, "/sub/leaver") as s:
        read_until(s, b"Welcome!")
        wait_for(lambda: channel_count(tw, "leaver") == 1)
        s.close()
        wait_for(lambda: channel_count(tw, "leaver") == 0, limit=2.0)
        assert tw.stats()["conns"] == 0
        assert tw.broadcast("nobody", channel="leaver") == 0


# -- long-poll -------------------------------------------------------------------------------------
def _poll(s: socket.socket, path: str) -> dict:  # type: ignore[type-arg]
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = read_until(s, b"\r\n\r\n")
    head, body = split_head(data)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in head
    return dict(json.loads(body))


def test_long_poll_immediate_wait_and_keepalive(w: ThreadWorker) -> None:
    w.broadcast("p1", channel="lp")
    assert w.worker is not None
    last = w.call(lambda: w.worker.hub.last_id)
    with connect(w.port) as s:
        r = _poll(s, f"/poll/lp?since={last - 1}&timeout=5")
        assert [m["data"] for m in r["messages"]] == ["p1"] and r["last_id"] == last
        assert r["messages"][0]["channel"] == "lp" and isinstance(r["messages"][0]["ts"], float)
        # Same connection: wait for the next one.
        t0 = time.monotonic()
        s.sendall(f"GET /poll/lp?since={last}&timeout=5 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        time.sleep(0.2)
        w.broadcast("p2", channel="lp")
        data = read_until(s, b"p2")
        assert time.monotonic() - t0 < 3
        assert b'"data":"p2"' in data
        # timeout with nothing new -> empty list
        t0 = time.monotonic()
        r = _poll(s, f"/poll/lp?since={last + 1}&timeout=0.3")
        assert r["messages"] == [] and 0.25 < time.monotonic() - t0 < 3


def test_long_poll_answered_after_client_half_close(w: ThreadWorker) -> None:
    with connect(w.port) as s:
        s.sendall(b"GET /poll/lphc?timeout=5 HTTP/1.1\r\nHost: t\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        w.broadcast("after-eof", channel="lphc")
        assert b'"data":"after-eof"' in read_until(s, b"after-eof")


def test_long_poll_since_absent_means_only_new(w: ThreadWorker) -> None:
    w.broadcast("old", channel="lpn")
    with connect(w.port) as s:
        s.sendall(b"GET /poll/lpn?timeout=0.3 HTTP/1.1\r\nHost: t\r\n\r\n")
        body = split_head(read_until(s, b"}"))[1]
        assert json.loads(body)["messages"] == []


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"garbage\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nabc",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"GET /sub/bad%20name HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /sub/x?format=sse&format=plain HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"v" * 17000 + b"\r\n\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\n"
            + b"".join(b"H%d: v\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
    ],
)
def test_bad_input_status_and_close(w: ThreadWorker, raw: bytes, code: int) -> None:
    resp = request(w.port, raw)
    assert status_of(resp) == code
    head, body = split_head(resp)
    assert b"Connection: close" in head and body.endswith(b"\n") and b"Traceback" not in body
    if code == 405:
        assert b"Allow: GET, HEAD" in head


def test_header_deadline_408_drip_cannot_extend(w: ThreadWorker) -> None:
    # timeout_header=1.0: drip one byte every 0.1 s forever; the deadline is absolute.
    t0 = time.monotonic()
    with connect(w.port) as s:
        s.settimeout(0.1)
        got = b""
        for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200:
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                got = s.recv(4096)
                if got:
                    break
            except TimeoutError:
                continue
        s.settimeout(5)
        got += read_all(s)
    assert status_of(got) == 408
    assert time.monotonic() - t0 < 2.5


def test_silent_connection_gets_408(w: ThreadWorker) -> None:
    with connect(w.port) as s:
        t0 = time.monotonic()
        resp = read_all(s)
        assert status_of(resp) == 408 and 0.8 < time.monotonic() - t0 < 3


def test_error_paths_leave_counters_consistent(w: ThreadWorker) -> None:
    st = w.stats()
    assert st["conns"] >= 0 and st["accepted_total"] >= st["closed_total"]
    assert set(st["lag_ms"]) == {"avg", "p90", "p99", "max"}
    assert len(st["lag_hist"]) <= len(LAG_BOUNDS_MS) + 1 and sum(st["lag_hist"]) > 0


# -- slow consumer, cap, drain --------------------------------------------------------------------
def test_slow_consumer_is_dropped() -> None:
    with running_worker(limit_write_buffer=64 * 1024, limit_message_bytes=200_000) as w:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", w.port))
        with s:
            s.sendall(b"GET /sub/slow HTTP/1.1\r\nHost: t\r\n\r\n")
            read_until(s, b"Welcome!")
            wait_for(lambda: channel_count(w, "slow") == 1)
            big = "x" * 100_000
            dropped = False
            for _ in range(50):  # bounded: at most ~5 MB offered
                w.broadcast(big, channel="slow")
                if w.stats()["slow_dropped_total"] >= 1:
                    dropped = True
                    break
            assert dropped
            assert channel_count(w, "slow") == 0
            wait_for(lambda: w.stats()["conns"] == 0)


def test_over_cap_503_held_connections_unaffected() -> None:
    with running_worker(limit_connections=3) as w:
        held = [subscribe(w, "/sub/cap") for _ in range(3)]
        try:
            for s in held:
                read_until(s, b"Welcome!")
            resp = request(w.port, b"GET /sub/cap HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status_of(resp) == 503 and b"Retry-After: " in resp
            assert w.stats()["rejected_total"] == 1
            assert w.broadcast("still-here", channel="cap") == 3
            for s in held:
                read_until(s, b"still-here")
        finally:
            for s in held:
                s.close()
        wait_for(lambda: w.stats()["conns"] == 0)
        # Room again once they are gone.
        with subscribe(w, "/sub/cap") as s:
            read_until(s, b"Welcome!")


def test_drain_sends_reconnect_and_closes() -> None:
    w = ThreadWorker(make_config()).start()
    plain = subscribe(w, "/sub/d")
    sse = subscribe(w, "/sub/d?format=sse")
    old = subscribe(w, "/sub/d", ver="1.0")
    idle = connect(w.port)
    idle.sendall(b"GET /sub/d HTTP/1.1\r\n")  # accepted, its head never finished
    try:
        first = {s: read_until(s, b"Welcome!") for s in (plain, sse, old)}
        wait_for(lambda: channel_count(w, "d") == 3)
        t0 = time.monotonic()
        w.drain(3.0)
        assert time.monotonic() - t0 < 3.5
        raw = first[plain] + read_all(plain)
        assert raw.endswith(b"0\r\n\r\n")  # chunked body properly ended
        assert dechunk(split_head(raw)[1]).endswith(b"reconnect\n")
        sb = dechunk(split_head(first[sse] + read_all(sse))[1])
        assert b"event: reconnect\n" in sb
        retry = int(sb.rsplit(b"retry: ", 1)[1].split(b"\n")[0])
        assert 3000 <= retry < 6000
        assert read_all(old).endswith(b"reconnect\n")
        assert read_all(idle) == b""
        with pytest.raises(OSError):
            connect(w.port, timeout=1).close()
    finally:
        for s in (plain, sse, old, idle):
            s.close()
        w.stop()


def test_a_silent_connection_waits_in_the_kernel_until_it_speaks_or_defer_accept_passes() -> None:
    """TCP_DEFER_ACCEPT (--defer-accept, default 1 s): the worker is woken for a connection
    once its request is there; a silent one still reaches it after about the defer time (where
    the request-head deadline then applies); with 0 it is accepted at once."""
    with running_worker() as w:
        silent, speaking = connect(w.port), connect(w.port)
        try:
            time.sleep(0.3)  # the kernel's first SYN-ACK retransmit is 1 s away
            assert w.stats()["conns"] == 0
            speaking.sendall(b"GET /sub/defer HTTP/1.1\r\nHost: t\r\n\r\n")
            read_until(speaking, b"Welcome!")
            assert w.stats()["conns"] == 1
            wait_for(lambda: w.stats()["conns"] == 2, 10)  # the silent one, about 1 s later
        finally:
            silent.close()
            speaking.close()
    with running_worker(defer_accept=0) as w:
        silent = connect(w.port)
        try:
            wait_for(lambda: w.stats()["conns"] == 1, 0.9)  # accepted at once
        finally:
            silent.close()


def test_a_burst_of_small_broadcasts_arrives_in_order_in_few_writes() -> None:
    """Broadcasts queued in one loop turn to a small channel are written together: every
    subscriber gets every message once, in id order, and the worker makes far fewer writes."""
    with running_worker(ping_interval=30.0) as w:
        assert w.worker is not None
        worker = w.worker
        socks = [subscribe(w, "/sub/burst?format=sse") for _ in range(3)]
        plain = subscribe(w, "/sub/burst")
        for s in [*socks, plain]:
            read_until(s, b"Welcome!")
        wait_for(lambda: channel_count(w, "burst") == 4)
        writes = {"n": 0}

        class Counting:
            """The connection's transport, counting writes."""

            def __init__(self, t: object) -> None:
                self._t = t

            def write(self, data: bytes) -> None:
                writes["n"] += 1
                self._t.write(data)  # type: ignore[attr-defined]

            def __getattr__(self, name: str) -> object:
                return getattr(self._t, name)

        def burst() -> list[object]:
            for c in worker.hub.streams["burst"]:
                c.transport = Counting(c.transport)  # type: ignore[assignment]
            return [worker.broadcast({"data": f"b{i}", "channel": "burst"}) for i in range(40)]

        futures = w.call(burst)
        last = int(w.call(lambda: worker.hub.last_id))
        for s in socks:
            raw = read_until(s, f"id: {last}\n".encode())
            ids = [int(x) for x in re.findall(rb"id: (\d+)\n", raw)]
            assert ids == list(range(last - 39, last + 1))
        body = dechunk(read_until(plain, b"b39\n"))
        assert body.endswith(b"".join(b"b%d\n" % i for i in range(40)))
        assert all(f.done() and f.result() == 4 for f in futures)  # type: ignore[attr-defined]
        assert writes["n"] <= 8, writes  # 4 connections: one write each per batch, not 160
        for s in [*socks, plain]:
            s.close()
