"""Sans-IO request-head parsing and routing: bytes in, a Request/Route or a clean error out."""

from __future__ import annotations

import pytest

from service.worker.http import HttpError, Limits, Request, Route, parse_head, route

L = Limits()


def parse(raw: bytes, limits: Limits = L) -> Request | HttpError | None:
    return parse_head(bytearray(raw), limits)


def status(raw: bytes, limits: Limits = L) -> int | None:
    r = parse(raw, limits)
    if r is None:
        return None
    if isinstance(r, HttpError):
        return r.status
    rt = route(r, limits)
    return rt.status if isinstance(rt, HttpError) else 200


def test_simple_get() -> None:
    r = parse(b"GET /sub/news?format=sse HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(r, Request)
    assert r.method == "GET" and r.http11 and r.keep_alive and not r.has_body
    assert r.target == "/sub/news?format=sse"
    assert r.head_len == len(b"GET /sub/news?format=sse HTTP/1.1\r\nHost: x\r\n\r\n")
    rt = route(r, L)
    assert rt == Route("stream", "news", sse=True)


def test_incomplete_head_needs_more() -> None:
    assert parse(b"") is None
    assert parse(b"GE") is None
    assert parse(b"GET / HTTP/1.1\r\nHost: x\r\n") is None


def test_bytes_after_head_are_not_part_of_it() -> None:
    raw = b"GET / HTTP/1.0\r\n\r\nEXTRA"
    r = parse(raw)
    assert isinstance(r, Request) and not r.http11 and raw[r.head_len :] == b"EXTRA"


def test_request_line_limit_414() -> None:
    small = Limits(request_line=64)
    assert status(b"GET /" + b"a" * 100, small) == 414  # no newline yet, already too long
    assert status(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: t\r\n\r\n", small) == 414
    assert (
        status(b"GET /" + b"a" * 40 + b" HTTP/1.1\r\nHost: t\r\n\r\n", small) == 404
    )  # under: routed
    assert status(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n") == 414


def test_header_bytes_limit_431() -> None:
    big = b"X-Big: " + b"v" * 17000 + b"\r\n"
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n") == 431
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\n" + big) == 431  # incomplete but already too big
    ok = b"X-Big: " + b"v" * 15000 + b"\r\n"
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\n" + ok + b"\r\n") == 200


def test_header_count_limit_431() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(101))
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n") == 431
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\n" + many) == 431
    hundred = b"".join(b"X-%d: v\r\n" % i for i in range(99))  # + Host = 100
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\n" + hundred + b"\r\n") == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"\x00\x01\x02\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\n\n",  # bare LF
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\n: novalue\r\n\r\n",
        b" GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
)
def test_malformed_400(raw: bytes) -> None:
    assert status(raw) == 400


def test_garbage_is_rejected_before_a_newline() -> None:
    assert status(b"\x16\x03\x01\x02") == 400  # a TLS ClientHello on the plain port


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"FOO"])
def test_other_methods_405(method: bytes) -> None:
    assert status(method + b" / HTTP/1.1\r\nHost: t\r\n\r\n") == 405
    # decided as soon as the request line is in
    assert status(method + b" / HTTP/1.1\r\nHost: t\r\n") == 405


def test_head_allowed() -> None:
    r = parse(b"HEAD /sub/a HTTP/1.1\r\nHost: t\r\n\r\n")
    assert isinstance(r, Request) and r.method == "HEAD"


@pytest.mark.parametrize("path", [b"/nope", b"/sub", b"/subx/a", b"/poll", b"/favicon.ico"])
def test_unknown_path_404(path: bytes) -> None:
    assert status(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n") == 404


@pytest.mark.parametrize(
    "target",
    [b"/sub/", b"/sub/a/b", b"/sub/" + b"a" * 65, b"/sub/%41", b"/sub/a b", b"/poll/bad!"],
)
def test_bad_channel_400(target: bytes) -> None:
    assert status(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n") in (400,)


def test_body_and_cl_te_400() -> None:
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello") == 400
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n") == 400
    both = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert status(both) == 400
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n") == 200
    assert status(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n") == 400


def test_routes() -> None:
    def rt(raw: bytes) -> Route:
        r = parse(raw)
        assert isinstance(r, Request)
        out = route(r, L)
        assert isinstance(out, Route), out
        return out

    assert rt(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == Route("stream", "default")
    sse = rt(
        b"GET /sub/a HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nLast-Event-ID: 7\r\n\r\n"
    )
    assert sse == Route("stream", "a", sse=True, last_event_id=7)
    q = rt(b"GET /sub/a.b:c-d_e?format=sse&last_event_id=9 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert q == Route("stream", "a.b:c-d_e", sse=True, last_event_id=9)
    plain = rt(b"GET /sub/a?format=plain HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
    assert not plain.sse
    p = rt(b"GET /poll/a?since=3&timeout=1.5 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert p == Route("poll", "a", since=3, timeout=1.5)
    assert rt(b"GET /poll/a HTTP/1.1\r\nHost: t\r\n\r\n") == Route(
        "poll", "a", since=None, timeout=30.0
    )
    assert rt(b"GET /poll/a?timeout=999 HTTP/1.1\r\nHost: t\r\n\r\n").timeout == 120.0


@pytest.mark.parametrize(
    "target",
    [
        b"/sub/a?format=xml",
        b"/sub/a?last_event_id=abc",
        b"/sub/a?last_event_id=-1",
        b"/poll/a?since=x",
        b"/poll/a?timeout=-1",
        b"/poll/a?timeout=nan",
    ],
)
def test_bad_parameters_400(target: bytes) -> None:
    assert status(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n") == 400


def test_bad_last_event_id_header_400() -> None:
    assert status(b"GET /sub/a HTTP/1.1\r\nHost: t\r\nLast-Event-ID: nope\r\n\r\n") == 400


def test_http10_keepalive_flags() -> None:
    r = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(r, Request) and not r.http11 and not r.keep_alive
    r = parse(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert isinstance(r, Request) and not r.keep_alive


def test_byte_by_byte_feed_matches_whole() -> None:
    raw = b"GET /sub/x?format=sse HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
    buf = bytearray()
    results = []
    for i in range(len(raw)):
        buf += raw[i : i + 1]
        results.append(parse_head(buf, L))
    assert all(r is None for r in results[:-1])
    assert results[-1] == parse(raw)


def test_host_header_rules() -> None:
    # RFC 9112 3.2: an HTTP/1.1 request carries exactly one Host; HTTP/1.0 may omit it.
    assert status(b"GET / HTTP/1.1\r\n\r\n") == 400
    assert status(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == 400
    assert status(b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n") == 400
    assert status(b"GET / HTTP/1.0\r\n\r\n") == 200
    err = parse(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert isinstance(err, HttpError) and "Host" in err.reason


@pytest.mark.parametrize(
    "query",
    [
        "format=sse&format=plain",
        "last_event_id=1&last_event_id=2",
        "format=sse&x=1&x=2",
    ],
)
def test_repeated_query_parameter_is_400(query: str) -> None:
    raw = f"GET /sub/a?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    r = parse(raw)
    assert isinstance(r, Request)
    err = route(r, L)
    assert isinstance(err, HttpError) and err.status == 400 and "more than once" in err.reason
    poll = parse(b"GET /poll/a?since=1&since=2 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert isinstance(poll, Request)
    assert isinstance(route(poll, L), HttpError)


@pytest.mark.parametrize(
    ("target", "want"),
    [
        # Unescaped targets take the short way (no URL parser); escaped ones the parser's: the
        # same answers either way.
        ("/sub/x?format=sse&&last_event_id=5", ("stream", "x", True, 5, None)),
        ("/sub/x?format=%73se&last_event_id=5", ("stream", "x", True, 5, None)),
        ("/sub/x?token=a.b_c-d", ("stream", "x", False, None, "a.b_c-d")),
        ("/sub/x?token=a%2Eb", ("stream", "x", False, None, "a.b")),
        ("/sub/x?", ("stream", "x", False, None, None)),
        ("/?last_event_id=", ("stream", "default", False, None, None)),
        ("/sub/x?format=sse&format=plain", 400),
        ("/sub/x?format=sse&format=%70lain", 400),
        ("/sub/x?format=bogus", 400),
        ("/nope?a=b", 404),
    ],
)
def test_route_reads_the_query_the_same_with_or_without_escapes(target: str, want: object) -> None:
    req = parse_head(f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode(), L)
    assert isinstance(req, Request)
    r = route(req, L)
    if isinstance(want, int):
        assert isinstance(r, HttpError) and r.status == want, r
    else:
        assert isinstance(r, Route), r
        assert (r.kind, r.channel, r.sse, r.last_event_id, r.token) == want
