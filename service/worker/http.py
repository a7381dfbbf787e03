"""Sans-IO request-head parsing and routing for the worker.

Bytes in, a :class:`Request` / :class:`Route` or a clean :class:`HttpError` out; no socket here, so
every limit is tested with bytes alone (tests/service/test_http.py, test_fuzz.py).

httptools (llhttp) does the HTTP grammar, but it has no cap on header size or count and it would
keep a parser object alive per connection. So the worker frames the head itself: it accumulates
bytes until the blank line while enforcing the request-line (414) and header (431) limits on the
raw bytes, rejects a bad request line or method as soon as the first line is in, and only then hands
the complete head to a short-lived httptools parser. Nothing of the parser survives the call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

import httptools

from service.contracts import NAME_RE, NAME_RULE

__all__ = [
    "DEFAULT_CHANNEL",
    "HttpError",
    "Limits",
    "Request",
    "Route",
    "parse_head",
    "route",
]

DEFAULT_CHANNEL = "default"
# method SP request-target SP HTTP/1.x ; the token charset is RFC 9110's tchar.
_REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/1\.[01]")
_ALLOWED_METHODS = (b"GET", b"HEAD", b"OPTIONS")  # OPTIONS: CORS preflight


@dataclass(frozen=True, slots=True)
class Limits:
    request_line: int = 8192
    headers_bytes: int = 16384
    headers_count: int = 100
    poll_default: float = 30.0
    poll_max: float = 120.0


@dataclass(frozen=True, slots=True)
class HttpError:
    """A request the worker answers with ``status`` and a one-line ``reason``, then closes."""

    status: int
    reason: str


# Not frozen: a frozen dataclass's __init__ sets each field with object.__setattr__ (0.9 µs more
# per accepted connection); nothing changes a Request or a Route after it is made.
@dataclass(slots=True)
class Request:
    method: str  # "GET", "HEAD" or "OPTIONS"
    target: str  # raw request target, e.g. "/sub/news?format=sse"
    http11: bool
    keep_alive: bool
    accept_sse: bool
    last_event_id: str | None
    has_body: bool  # Content-Length > 0 or any Transfer-Encoding
    head_len: int  # bytes of the head; anything after it is body or the next request
    origin: str | None = None  # the Origin header (CORS)
    bearer: str | None = None  # the token of an "Authorization: Bearer" header


@dataclass(slots=True)
class Route:
    kind: str  # "stream" or "poll"
    channel: str
    sse: bool = False
    last_event_id: int | None = None  # stream resume point
    since: int | None = None  # poll: messages with id > since; None = only new ones
    timeout: float = 0.0  # poll wait in seconds
    token: str | None = None  # ?token= (a subscriber token; EventSource cannot set headers)


class _Collector:
    """httptools callbacks for one head; lives only for the duration of :func:`parse_head`."""

    __slots__ = ("url", "headers", "count", "hosts", "too_many", "limit")

    def __init__(self, limit: int) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.count = 0
        self.hosts = 0  # Host fields seen: RFC 9112 3.2 wants exactly one in HTTP/1.1
        self.too_many = False
        self.limit = limit

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        if self.count > self.limit:
            self.too_many = True
            return
        key = name.lower()
        if key == b"host":
            self.hosts += 1
        if key in self.headers:
            # Repeated fields we care about (Content-Length, Transfer-Encoding) are kept joined so
            # that "Content-Length: 0" + "Content-Length: 5" cannot hide a body.
            self.headers[key] += b"," + value
        else:
            self.headers[key] = value


def parse_head(buf: bytes | bytearray, limits: Limits) -> Request | HttpError | None:
    """Parse the request head at the start of ``buf``.

    Returns None while more bytes are needed, an :class:`HttpError` as soon as the bytes can no
    longer become an acceptable request, or the :class:`Request` (``head_len`` tells where the
    head ended). Never raises on any input.
    """
    nl = buf.find(b"\n", 0, limits.request_line + 2)
    if nl < 0:
        if len(buf) > limits.request_line + 1:
            return HttpError(414, "request line too long")
        if len(buf) >= 2 and not _plausible_prefix(buf):
            return HttpError(400, "malformed request line")
        return None
    if nl == 0 or buf[nl - 1] != 0x0D:
        return HttpError(400, "malformed request line")
    line_len = nl - 1
    if line_len > limits.request_line:
        return HttpError(414, "request line too long")
    m = _REQUEST_LINE_RE.fullmatch(bytes(buf[:line_len]))
    if m is None:
        return HttpError(400, "malformed request line")
    if m.group(1) not in _ALLOWED_METHODS:
        return HttpError(405, "method not allowed")

    end = buf.find(b"\r\n\r\n", nl - 1)
    header_start = nl + 1
    if end < 0:
        pending = len(buf) - header_start
        if pending > limits.headers_bytes + 2:
            return HttpError(431, "request headers too large")
        if buf.count(b"\n", header_start) > limits.headers_count:
            return HttpError(431, "too many request headers")
        return None
    head_len = end + 4
    if head_len - header_start - 2 > limits.headers_bytes:
        return HttpError(431, "request headers too large")

    c = _Collector(limits.headers_count)
    parser = httptools.HttpRequestParser(c)
    try:
        parser.feed_data(bytes(buf[:head_len]))
    except httptools.HttpParserUpgrade:
        pass  # "Upgrade:" on a GET: we just do not upgrade
    except httptools.HttpParserError:
        return HttpError(400, "malformed request")
    if c.too_many:
        return HttpError(431, "too many request headers")
    h = c.headers
    te = h.get(b"transfer-encoding")
    cl_raw = h.get(b"content-length")
    if te is not None and cl_raw is not None:
        return HttpError(400, "both Content-Length and Transfer-Encoding")
    has_body = te is not None
    if cl_raw is not None:
        parts = {p.strip() for p in cl_raw.split(b",")}
        if len(parts) != 1:
            return HttpError(400, "conflicting Content-Length")
        (cl,) = parts
        if not cl.isdigit() or len(cl) > 18:
            return HttpError(400, "bad Content-Length")
        has_body = int(cl) > 0
    try:
        target = c.url.decode("ascii")
        last_event_id = h[b"last-event-id"].decode("ascii") if b"last-event-id" in h else None
        origin = h[b"origin"].decode("ascii") if b"origin" in h else None
        bearer = _bearer(h[b"authorization"].decode("ascii")) if b"authorization" in h else None
    except UnicodeDecodeError:
        return HttpError(400, "non-ASCII request target, Last-Event-ID, Origin or Authorization")
    accept = h.get(b"accept", b"")
    http11 = parser.get_http_version() == "1.1"
    if c.hosts > 1:
        return HttpError(400, "more than one Host header")
    if http11 and c.hosts == 0:
        return HttpError(400, "an HTTP/1.1 request needs a Host header")
    # llhttp only answers should_keep_alive() once a message is complete, so decide here.
    connection = h.get(b"connection")
    if connection is None:
        keep_alive = http11
    else:
        conn_tokens = {t.strip() for t in connection.lower().split(b",")}
        keep_alive = b"close" not in conn_tokens if http11 else b"keep-alive" in conn_tokens
    return Request(
        method=m.group(1).decode(),
        target=target,
        http11=http11,
        keep_alive=keep_alive,
        accept_sse=b"text/event-stream" in accept.lower(),
        last_event_id=last_event_id,
        has_body=has_body,
        head_len=head_len,
        origin=origin,
        bearer=bearer,
    )


def _bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _plausible_prefix(buf: bytes | bytearray) -> bool:
    """Whether an incomplete first line can still become ``TOKEN SP ...``: reject junk early."""
    sp = buf.find(b" ")
    token = bytes(buf[: sp if sp >= 0 else len(buf)]).rstrip(b"\r")
    if not token:
        return sp < 0 and not buf.startswith(b"\r")
    return re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", token) is not None


def route(req: Request, limits: Limits) -> Route | HttpError:
    """Map a parsed request to a stream or poll route (404 / 400 on bad paths and parameters)."""
    if req.has_body:
        return HttpError(400, "a subscribe request has no body")
    target = req.target
    pairs: list[tuple[str, str]]
    if target[:1] == "/" and "#" not in target and "%" not in target and "+" not in target:
        # The common subscribe (`/`, `/sub/news`, `?token=...`): nothing escaped, so the path and
        # the query split as parse_qsl(keep_blank_values=True) would, without the URL parser.
        path, _, query_text = target.partition("?")
        if not query_text:
            pairs = []
        elif "&" not in query_text:  # one parameter (`?token=…`): no split, no generator
            name, _, value = query_text.partition("=")
            pairs = [(name, value)]
        else:
            pairs = [(k, v) for k, _, v in (p.partition("=") for p in query_text.split("&") if p)]
    else:
        try:
            url = httptools.parse_url(target.encode("ascii"))
        except httptools.HttpParserInvalidURLError:
            return HttpError(400, "malformed request target")
        path = (url.path or b"").decode("ascii")
        try:
            pairs = parse_qsl(
                (url.query or b"").decode("ascii"), keep_blank_values=True, strict_parsing=False
            )
        except ValueError:
            return HttpError(400, "malformed query string")
    query: dict[str, str] = {}
    for name, value in pairs:
        # One rule for every parameter: given twice is ambiguous, so neither copy wins.
        if name in query:
            return HttpError(400, f"query parameter {ascii(name[:64])} given more than once")
        query[name] = value

    if path == "/":
        kind, channel = "stream", DEFAULT_CHANNEL
    elif path.startswith("/sub/"):
        kind, channel = "stream", path[5:]
    elif path.startswith("/poll/"):
        kind, channel = "poll", path[6:]
    else:
        return HttpError(404, "unknown path")
    if NAME_RE.fullmatch(channel) is None:
        return HttpError(400, f"bad channel name (expected {NAME_RULE})")

    token = query.get("token") or req.bearer
    if kind == "poll":
        since: int | None = None
        if query.get("since", "") != "":
            since = _int_param(query["since"])
            if since is None:
                return HttpError(400, "bad since (expected an integer >= 0)")
        timeout = limits.poll_default
        if query.get("timeout", "") != "":
            try:
                timeout = float(query["timeout"])
            except ValueError:
                return HttpError(400, "bad timeout (expected seconds)")
            if not math.isfinite(timeout) or timeout < 0:
                return HttpError(400, "bad timeout (expected seconds)")
            timeout = min(timeout, limits.poll_max)
        return Route("poll", channel, since=since, timeout=timeout, token=token)

    fmt = query.get("format", "")
    if fmt not in ("", "sse", "plain"):
        return HttpError(400, "bad format (expected sse or plain)")
    sse = fmt == "sse" or (fmt == "" and req.accept_sse)
    raw_id = query.get("last_event_id") or req.last_event_id
    last_id: int | None = None
    if raw_id is not None and raw_id.strip() != "":
        last_id = _int_param(raw_id.strip())
        if last_id is None:
            return HttpError(400, "bad Last-Event-ID (expected an integer >= 0)")
    return Route("stream", channel, sse=sse, last_event_id=last_id, token=token)


def _int_param(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        return None
    return int(text)
