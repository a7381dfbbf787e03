"""Bytes on the wire: response heads, a message encoded for each stream format, long-poll and
error responses (sans-IO).

A stream connection has one of four formats (:mod:`service.worker.states`), an index into every
:data:`Encoded` tuple. A broadcast is encoded once per format (:func:`encode_message`) and the
same bytes object is written to every subscriber of that format. ("Frame" in this project is the
supervisor's stats record, never these bytes.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from service.worker.states import PLAIN_CHUNKED, PLAIN_RAW, SSE_CHUNKED, SSE_RAW

# The same thing for each of the four stream formats, indexed by the format.
Encoded = tuple[bytes, bytes, bytes, bytes]

__all__ = ["PLAIN_CHUNKED", "PLAIN_RAW", "SSE_CHUNKED", "SSE_RAW", "Encoded"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def fmt_index(sse: bool, http11: bool) -> int:
    return (2 if sse else 0) | (0 if http11 else 1)


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (an empty payload would end the body, so callers never pass one)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _both(plain: bytes, sse: bytes) -> Encoded:
    return (chunk(plain), plain, chunk(sse), sse)


def stream_head(fmt: int, extra: bytes = b"") -> bytes:
    """The response head of a stream; ``extra``: more CRLF-terminated header lines (CORS)."""
    sse = fmt >= SSE_CHUNKED
    ctype = b"text/event-stream" if sse else b"text/plain; charset=utf-8"
    if fmt in (PLAIN_CHUNKED, SSE_CHUNKED):
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n"
            b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n" + extra + b"\r\n"
        )
    return (
        b"HTTP/1.0 200 OK\r\nContent-Type: " + ctype + b"\r\nCache-Control: no-cache\r\n"
        b"Connection: close\r\n" + extra + b"\r\n"
    )


def welcome(fmt: int, retry_ms: int, extra: bytes = b"") -> bytes:
    """Response head plus the first body bytes of a new stream."""
    if fmt >= SSE_CHUNKED:
        body = b"retry: %d\n\nevent: welcome\ndata: Welcome!\n\n" % retry_ms
    else:
        body = b"Welcome!\n"
    return stream_head(fmt, extra) + (chunk(body) if fmt in (PLAIN_CHUNKED, SSE_CHUNKED) else body)


PING: Encoded = _both(b"ping\n", b": ping\n\n")
END_CHUNKED = b"0\r\n\r\n"


def sse_event(data: str, event: str | None = None, id_: int | None = None) -> bytes:
    """One SSE event; multi-line data becomes several ``data:`` lines (any of CR, LF, CRLF)."""
    out = []
    if id_ is not None:
        out.append(f"id: {id_}\n")
    if event:
        out.append(f"event: {_one_line(event)}\n")
    for line in _LINE_BREAK.split(data):
        out.append(f"data: {line}\n")
    out.append("\n")
    return "".join(out).encode("utf-8")


def _one_line(text: str) -> str:
    return _LINE_BREAK.sub(" ", text)


def encode_message(msg: Mapping[str, Any]) -> Encoded:
    """A message as bytes for each of the four formats."""
    data = str(msg["data"])
    plain = (data + "\n").encode("utf-8")
    sse = sse_event(data, msg.get("event"), int(msg["id"]))
    return _both(plain, sse)


def encode_reset(last_event_id: int, oldest_id: int | None, newest_id: int) -> Encoded:
    payload = json.dumps(
        {"last_event_id": last_event_id, "oldest_id": oldest_id, "newest_id": newest_id}
    )
    sse = sse_event(payload, "reset")
    return _both(sse, sse)  # only SSE streams resume, the plain slots are never used


def reconnect(fmt: int, retry_ms: int) -> bytes:
    """The last bytes of a stream when the worker drains; chunked streams also end the body."""
    if fmt >= SSE_CHUNKED:
        body = b"retry: %d\nevent: reconnect\ndata: reconnect\n\n" % retry_ms
    else:
        body = b"reconnect\n"
    return _last(fmt, body)


def token_expired(fmt: int) -> bytes:
    """The last bytes of a stream whose subscriber token expired (a reconnect needs a new one)."""
    if fmt >= SSE_CHUNKED:
        body = b"event: token-expired\ndata: token expired\n\n"
    else:
        body = b"token-expired\n"
    return _last(fmt, body)


def _last(fmt: int, body: bytes) -> bytes:
    if fmt in (PLAIN_CHUNKED, SSE_CHUNKED):
        return chunk(body) + END_CHUNKED
    return body


def error_response(
    status: int, reason: str, extra: Iterable[tuple[str, str]] = (), raw: bytes = b""
) -> bytes:
    """A complete plain-text error response that ends with the connection closing (``raw``: more
    CRLF-terminated header lines, e.g. CORS)."""
    body = (reason + "\n").encode("utf-8")
    phrase = HTTPStatus(status).phrase
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines.extend(f"{k}: {v}" for k, v in extra)
    return ("\r\n".join(lines) + "\r\n").encode("latin-1") + raw + b"\r\n" + body


def poll_response(
    payload: Mapping[str, Any], http11: bool, keep_alive: bool, extra: bytes = b""
) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    version = b"HTTP/1.1" if http11 else b"HTTP/1.0"
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        version + b" 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\n"
        b"Content-Length: %d\r\nConnection: %s\r\n%s\r\n" % (len(body), conn, extra)
    ) + body


def poll_head_only(http11: bool, extra: bytes = b"") -> bytes:
    version = b"HTTP/1.1" if http11 else b"HTTP/1.0"
    return (
        version
        + b" 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + extra
        + b"\r\n"
    )
