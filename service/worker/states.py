"""A connection's state: one small int in ``Conn.state``, named here.

0..3 are the stream formats, and also the index into every :data:`service.worker.wire.Encoded`
tuple, so the fan-out loop uses a stream's state as the index of its bytes directly. Anything
above :data:`LAST_STREAM` is not a stream (any more).
"""

from __future__ import annotations

PLAIN_CHUNKED = 0  # text/plain, HTTP/1.1 chunked
PLAIN_RAW = 1  # text/plain, HTTP/1.0 close-delimited
SSE_CHUNKED = 2  # text/event-stream, HTTP/1.1 chunked
SSE_RAW = 3  # text/event-stream, HTTP/1.0 close-delimited
LAST_STREAM = SSE_RAW

HEAD = 4  # reading a request head
POLL = 5  # a long-poll waiting for a message
DONE = 6  # closing or closed
REJECTED = 7  # refused at accept time (over the cap or draining); never counted as held
HANDED = 8  # given to the successor process (service/worker/handoff.py); not counted as closed


def is_stream(state: int) -> bool:
    return state <= LAST_STREAM


def is_sse(fmt: int) -> bool:
    return fmt >= SSE_CHUNKED


def is_chunked(fmt: int) -> bool:
    return fmt in (PLAIN_CHUNKED, SSE_CHUNKED)
