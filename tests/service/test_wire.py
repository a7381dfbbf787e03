"""Sans-IO wire bytes: the exact bytes each format puts on the wire."""

from __future__ import annotations

import json

from service.worker import wire
from service.worker.wire import PLAIN_CHUNKED, PLAIN_RAW, SSE_CHUNKED, SSE_RAW


def test_fmt_index() -> None:
    assert wire.fmt_index(False, True) == PLAIN_CHUNKED
    assert wire.fmt_index(False, False) == PLAIN_RAW
    assert wire.fmt_index(True, True) == SSE_CHUNKED
    assert wire.fmt_index(True, False) == SSE_RAW


def test_chunk() -> None:
    assert wire.chunk(b"ping\n") == b"5\r\nping\n\r\n"
    assert wire.chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"


def test_welcome_plain_chunked() -> None:
    w = wire.welcome(PLAIN_CHUNKED, 3000)
    head, _, body = w.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; charset=utf-8" in head
    assert b"Transfer-Encoding: chunked" in head and b"Cache-Control: no-cache" in head
    assert body == b"9\r\nWelcome!\n\r\n"


def test_welcome_http10_is_close_delimited() -> None:
    w = wire.welcome(PLAIN_RAW, 3000)
    head, _, body = w.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and b"chunked" not in head
    assert body == b"Welcome!\n"


def test_welcome_sse() -> None:
    head, _, body = wire.welcome(SSE_RAW, 2500).partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream" in head
    assert body == b"retry: 2500\n\nevent: welcome\ndata: Welcome!\n\n"


def test_ping_frames() -> None:
    assert wire.PING[PLAIN_RAW] == b"ping\n"
    assert wire.PING[SSE_RAW] == b": ping\n\n"
    assert wire.PING[PLAIN_CHUNKED] == b"5\r\nping\n\r\n"
    assert wire.PING[SSE_CHUNKED] == b"8\r\n: ping\n\n\r\n"


def test_message_frames_multiline_and_event() -> None:
    f = wire.encode_message({"id": 7, "event": "news", "data": "a\nb\r\nc\rd", "channel": None})
    assert f[PLAIN_RAW] == b"a\nb\r\nc\rd\n"
    assert f[SSE_RAW] == b"id: 7\nevent: news\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert f[SSE_CHUNKED] == wire.chunk(f[SSE_RAW])
    assert f[PLAIN_CHUNKED] == wire.chunk(f[PLAIN_RAW])


def test_message_without_event_has_no_event_line() -> None:
    f = wire.encode_message({"id": 1, "event": None, "data": "héllo"})
    assert f[SSE_RAW] == "id: 1\ndata: héllo\n\n".encode()
    assert f[PLAIN_RAW] == "héllo\n".encode()


def test_event_name_cannot_inject_lines() -> None:
    f = wire.encode_message({"id": 1, "event": "x\ndata: evil", "data": "d"})
    assert f[SSE_RAW] == b"id: 1\nevent: x data: evil\ndata: d\n\n"


def test_reset_frame() -> None:
    body = wire.encode_reset(3, 10, 12)[SSE_RAW]
    assert body.startswith(b"event: reset\ndata: ")
    payload = json.loads(body.split(b"data: ", 1)[1])
    assert payload == {"last_event_id": 3, "oldest_id": 10, "newest_id": 12}


def test_reconnect() -> None:
    assert wire.reconnect(PLAIN_RAW, 3000) == b"reconnect\n"
    assert wire.reconnect(PLAIN_CHUNKED, 3000) == b"a\r\nreconnect\n\r\n0\r\n\r\n"
    assert wire.reconnect(SSE_RAW, 4000) == (b"retry: 4000\nevent: reconnect\ndata: reconnect\n\n")


def test_error_response() -> None:
    r = wire.error_response(405, "method not allowed", [("Allow", "GET, HEAD")])
    head, _, body = r.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"Connection: close" in head and b"Allow: GET, HEAD" in head
    assert b"Content-Length: %d" % len(body) in head and body == b"method not allowed\n"


def test_poll_response() -> None:
    r = wire.poll_response({"messages": [], "last_id": 0, "reset": False}, True, True)
    head, _, body = r.partition(b"\r\n\r\n")
    assert b"Connection: keep-alive" in head and b"application/json" in head
    assert json.loads(body) == {"messages": [], "last_id": 0, "reset": False}
