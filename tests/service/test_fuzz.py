"""Hypothesis fuzz of request parsing: any bytes give None, a Request or a clean status."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.worker.http import HttpError, Limits, Request, Route, parse_head, route

CLEAN = {400, 404, 405, 414, 431}
SMALL = Limits(request_line=64, headers_bytes=128, headers_count=4)

_methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"G\x00T", b"", b"get"])
_targets = st.one_of(
    st.sampled_from([b"/", b"/sub/a", b"/poll/a?since=1&timeout=2", b"/sub/a?format=sse"]),
    st.binary(max_size=80),
)
_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1", b""])
_header = st.tuples(st.binary(max_size=20), st.binary(max_size=40)).map(
    lambda kv: kv[0] + b": " + kv[1] + b"\r\n"
)
_structured = st.builds(
    lambda m, t, v, hs, tail: m + b" " + t + b" " + v + b"\r\n" + b"".join(hs) + b"\r\n" + tail,
    _methods,
    _targets,
    _versions,
    st.lists(_header, max_size=8),
    st.binary(max_size=10),
)


def check(raw: bytes, limits: Limits) -> None:
    # Feed in two arbitrary pieces as the socket would, then the rest.
    for cut in (len(raw) // 2, len(raw)):
        r = parse_head(bytearray(raw[:cut]), limits)
        if r is None:
            continue
        if isinstance(r, HttpError):
            assert r.status in CLEAN, r
            return
        assert isinstance(r, Request)
        assert 0 < r.head_len <= len(raw)
        out = route(r, limits)
        assert isinstance(out, Route) or out.status in CLEAN, out
        return


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_structured, st.binary(max_size=300)))
def test_parse_never_raises_default_limits(raw: bytes) -> None:
    check(raw, Limits())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_structured)
def test_parse_never_raises_small_limits(raw: bytes) -> None:
    check(raw, SMALL)
