"""One ``asyncio.Protocol`` object per connection, kept as small as Python allows.

A held stream costs: the uvloop transport (~1.2 KB, fixed by uvloop), this object (five slots,
~80 bytes with the GC header) and its entry in one hub set. No Task, no timer, no dict, no
parser per connection: the request head is parsed with :func:`service.worker.http.parse_head` from a
bytearray that is dropped once the head is in (or, seen before byte for byte, not parsed again:
``Conn.heads``), and every timeout lives in the hub's shared deadline table (one timer per
worker).
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from typing import Any, ClassVar

from service.worker import wire
from service.worker.http import HttpError, Limits, Request, Route, parse_head, route
from service.worker.hub import Hub, Subscribers
from service.worker.states import DONE, HANDED, HEAD, LAST_STREAM, POLL, REJECTED

# How long a long-poll from an id this worker has not seen yet waits for it (see _start_poll).
AHEAD_WAIT = 1.0
_KEEPALIVE = ()  # marks a connection that already served a long-poll (idle close is silent)
# The deadline token of a stream whose subscriber token expires: one shared object, so a held
# private stream costs its deadline entry and nothing else (its ``buf`` is otherwise unused).
_EXPIRES = bytearray()
# Parsed heads by their bytes (see Conn.heads): at most this many, each at most this long.
HEADS_MAX = 256
HEAD_CACHED_MAX = 1024
# What a head parses to, with what follows from it in this worker alone: the request, its route,
# its CORS header lines, whether its channel needs a token, and a plain stream's whole welcome
# (None for SSE, whose retry is drawn per connection, and for anything but a GET stream).
Head = tuple[Request, Route, bytes, bool, bytes | None]
# Connections being adopted from the previous worker process (handoff.py), by id, with what
# they were there; empty except during a reload.
ADOPTING: dict[int, dict[str, Any]] = {}


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "state", "subs", "buf", "poll")

    # Shared server state, bound per worker by Worker (a subclass per worker, no per-conn cost).
    hub: ClassVar[Hub]
    limits: ClassVar[Limits]
    reject_bytes: ClassVar[bytes]
    busy_bytes: ClassVar[tuple[bytes, ...]]  # 503s with Retry-After 1..8 s, one picked at random
    # A head seen before, byte for byte, parses and routes as it did then (both are pure
    # functions of the bytes and ``limits``): a fleet of one app's clients, or a crash's
    # reconnecting SSE clients resuming from the same Last-Event-ID, send the same few heads,
    # and a hit skips ~6 us of parsing per accepted connection (docs/benchmarks.md). Heads that
    # carry a subscriber token are not kept (one per user, and secrets); when full it starts
    # over, so junk can only make it miss.
    heads: ClassVar[dict[bytes, Head]]

    transport: asyncio.Transport
    state: int
    subs: Subscribers | None  # the hub set this connection is in (stream or poll waiters)
    buf: bytearray | None  # request bytes while reading a head / waiting on a poll
    # (since, channel, http11, keep_alive, cors header lines)
    poll: tuple[int, str, bool, bool, bytes] | tuple[()] | None

    @classmethod
    def subclass_for(cls, hub: Hub) -> type[Conn]:
        """The class of one worker's connections: ``hub`` and what follows from its
        configuration bound as class attributes, with an empty ``heads``."""
        cfg = hub.config
        limits = Limits(
            request_line=cfg.limit_request_line,
            headers_bytes=cfg.limit_headers_bytes,
            headers_count=cfg.limit_headers_count,
            poll_default=cfg.timeout_poll_default,
            poll_max=cfg.timeout_poll_max,
        )
        busy = "too many new connections, retry later"
        return type(
            "WorkerConn",
            (cls,),
            {
                "__slots__": (),
                "hub": hub,
                "limits": limits,
                "heads": {},
                "reject_bytes": wire.error_response(
                    503, "over the connection cap, retry later", [("Retry-After", "5")]
                ),
                "busy_bytes": tuple(
                    wire.error_response(503, busy, [("Retry-After", str(s))]) for s in range(1, 9)
                ),
            },
        )

    # -- Protocol interface ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the transport when a connection is accepted."""
        if self._admitted(transport):
            self._await_head()

    def accepted(self, transport: asyncio.BaseTransport, data: bytes) -> None:
        """``connection_made`` and ``data_received(data)`` in one step, for a plane that read
        the first bytes before making the protocol (``--plane raw``): a head seen before
        (``heads``) then costs neither a buffer nor a deadline."""
        if self._admitted(transport) and not self._from_heads(data):
            self._await_head().extend(data)
            self._on_head_bytes()

    def _admitted(self, transport: asyncio.BaseTransport) -> bool:
        """Take a new connection in (state HEAD, counted) unless it is turned away (a 503) or
        is one handed over by the previous worker (made here as it was there)."""
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        self.subs = None
        self.poll = None
        hub = self.hub
        ctr = hub.counters
        if ADOPTING and id(self) in ADOPTING:
            # A live connection handed over (handoff.py), not a new client: never turned away,
            # whatever this process's cap (a successor with a lower open-files limit or
            # --limit-connections, or fewer workers taking over more): its descriptor is here
            # already, and a 503 written into its stream would end it for nothing.
            ctr.conns += 1
            ctr.adopted_total += 1
            self._adopt(ADOPTING.pop(id(self)))
            if hub.draining:  # stopping while it came: told to reconnect, as the rest are
                hub.drain_streams([self])
            return False
        if ctr.conns >= hub.cap or hub.draining:
            # Over the cap: answer before reading anything, so a flood costs no parsing.
            self.state = REJECTED
            self.buf = None
            ctr.rejected_total += 1
            self.transport.write(self.reject_bytes)
            self.transport.close()
            return False
        if hub.accept_tokens <= 0:
            # Past --accept-rate: come back later, each client at its own time.
            self.state = REJECTED
            self.buf = None
            ctr.rejected_total += 1
            self.transport.write(random.choice(self.busy_bytes))
            self.transport.close()
            return False
        hub.accept_tokens -= 1
        ctr.conns += 1
        ctr.accepted_total += 1
        self.state = HEAD
        return True

    def _from_heads(self, data: bytes) -> bool:
        """Begin at once if ``data`` is a whole head seen before (``heads``); else False."""
        hit = self.heads.get(data)
        if hit is None:
            return False
        self.buf = None  # no head bytes to keep; a head deadline set is stale from now
        self._begin(b"", *hit)
        return True

    def _await_head(self) -> bytearray:
        """An empty head buffer, and the deadline for the head to arrive."""
        buf = self.buf = bytearray()
        self.hub.deadlines.add_fixed(self, buf, self.hub.config.timeout_header)
        return buf

    def _adopt(self, st: dict[str, Any]) -> None:
        """Go on where the previous process left this connection (handoff.py's STATE)."""
        hub = self.hub
        kind = st["kind"]
        if kind == "stream":
            fmt = int(st["fmt"])
            channel = str(st["channel"])
            entries, _gap, _ = hub.history_since(channel, int(st["last_id"]))
            for e in entries:  # published after the last one it was sent there
                self.transport.write(e.encoded[fmt])
            hub.counters.msgs_sent_total += len(entries)
            self.state = fmt
            self.buf = None
            subs = self.subs = hub.stream_set(channel)
            subs.add(self)
            expires_in = float(st.get("expires_in") or 0.0)
            if expires_in:
                self.buf = _EXPIRES
                hub.add_deadline(self, _EXPIRES, expires_in)
        elif kind == "poll":
            cors = base64.b64decode(st["cors"])
            self.poll = (int(st["since"]), str(st["channel"]), bool(st["http11"]),
                         bool(st["keep_alive"]), cors)  # fmt: skip
            self.buf = bytearray(base64.b64decode(st["buf"]))
            self.state = POLL
            self._wait_or_answer(self.poll[0], self.poll[1], float(st["left"]))
        else:  # a head being read, or a keep-alive connection between long-polls
            self.state = HEAD
            self.poll = _KEEPALIVE if st.get("keepalive") else None
            buf = self.buf = bytearray(base64.b64decode(st["buf"]))
            delay = hub.config.timeout_keepalive if self.poll else hub.config.timeout_header
            hub.add_fixed_deadline(self, buf, delay)
            if buf:
                self._on_head_bytes()

    def data_received(self, data: bytes) -> None:
        """Called by the transport with bytes from the client."""
        state = self.state
        if state == HEAD:
            buf = self.buf
            assert buf is not None
            if not buf and data.__class__ is bytes and self._from_heads(data):
                return
            buf += data
            self._on_head_bytes()
        elif state <= LAST_STREAM:
            # A stream client must only listen; anything it sends ends the stream.
            self.close()
        elif state == POLL:
            assert self.buf is not None
            self.buf += data  # a pipelined next request; parsed after the answer
            lim = self.limits
            if len(self.buf) > lim.request_line + lim.headers_bytes + 4:
                self.fail(HttpError(431, "request headers too large"))

    def eof_received(self) -> bool:
        """Called when the client half-closes."""
        if self.state == POLL:
            # A long-poll request is complete; `nc -N`-style clients still read the answer.
            return True
        # A stream client that closes has almost always gone for good (curl, browsers, loadgen
        # close both ways): keeping it until the next ping write fails would count it in `conns`
        # and in a broadcast's recipients for up to a ping interval.
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the transport when the connection is closed."""
        state = self.state
        if state == REJECTED:
            return
        self.state = DONE
        self.buf = None
        if self.subs is not None:
            self.subs.discard(self)
            self.subs = None
        hub = self.hub
        hub.counters.conns -= 1
        if state != HANDED:  # counted when it was let go
            hub.counters.closed_total += 1
        if hub.on_empty is not None and hub.counters.conns == 0 and not hub.on_empty.done():
            hub.on_empty.set_result(None)

    # -- request handling ------------------------------------------------------------------------
    def _on_head_bytes(self) -> None:
        buf = self.buf
        assert buf is not None
        result = parse_head(buf, self.limits)
        if result is None:
            return
        if isinstance(result, HttpError):
            self.fail(result)
            return
        r = route(result, self.limits)
        if isinstance(r, HttpError):
            self.fail(r)
            return
        rest = buf[result.head_len :]
        self.buf = None  # frees the head bytes and invalidates its deadline
        hub = self.hub
        tokens = hub.tokens
        head: Head = (
            result,
            r,
            hub.cors.headers(result.origin),
            bool(tokens.active and tokens.needs_token(r.channel)),
            None,
        )
        if r.kind == "stream" and not r.sse and result.method == "GET":
            fmt = wire.fmt_index(False, result.http11)
            head = head[:4] + (wire.welcome(fmt, 0, head[2]),)
        if not rest and len(buf) <= HEAD_CACHED_MAX and r.token is None:
            heads = self.heads
            if len(heads) >= HEADS_MAX:
                heads.clear()
            heads[bytes(buf)] = head
        self._begin(rest, *head)

    def _begin(
        self,
        rest: bytes | bytearray,
        req: Request,
        r: Route,
        cors: bytes,
        needs_token: bool,
        welcome: bytes | None,
    ) -> None:
        """A parsed and routed request (``rest``: bytes after its head): answer a preflight,
        check its token, start it."""
        hub = self.hub
        if req.method == "OPTIONS":
            answer = hub.cors.preflight(req.origin)
            if isinstance(answer, HttpError):
                self.fail(answer)
            else:
                self.transport.write(answer)
                self.close()
            return
        expires = 0.0
        if needs_token:
            checked = hub.tokens.check(r.channel, r.token)
            if isinstance(checked, HttpError):
                self.fail(checked, cors)
                return
            expires = checked
        if r.kind == "stream":
            self._start_stream(req, r, rest, cors, expires, welcome)
        else:
            self._start_poll(req, r, bytearray(rest), cors)

    def _start_stream(
        self,
        req: Request,
        r: Route,
        rest: bytes | bytearray,
        cors: bytes,
        expires: float,
        welcome: bytes | None,
    ) -> None:
        hub = self.hub
        fmt = wire.fmt_index(r.sse, req.http11)
        t = self.transport
        if req.method == "HEAD":
            t.write(wire.stream_head(fmt, cors))
            self.close()
            return
        if rest:
            # A subscriber only listens: bytes after its request are a client bug worth a
            # clear answer, not a silent close.
            self.fail(HttpError(400, "bytes after a subscribe request"))
            return
        if welcome is None:
            retry = hub.config.sse_retry_ms
            # SSE: the reconnect delay a client keeps if the whole service dies, spread over
            # [retry, 2 * retry) so a crash's reconnects do not all land in the same second.
            if r.sse:
                retry += int(random.random() * retry)
            welcome = wire.welcome(fmt, retry, cors)
        t.write(welcome)
        if r.sse and r.last_event_id is not None:
            entries, gap, oldest = hub.history_since(r.channel, r.last_event_id)
            if gap:
                t.write(wire.encode_reset(r.last_event_id, oldest, hub.last_id)[fmt])
            for e in entries:
                t.write(e.encoded[fmt])
            hub.counters.msgs_sent_total += len(entries)
        self.state = fmt
        subs = self.subs = hub.stream_set(r.channel)
        subs.add(self)
        if expires:
            # Ended at the token's exp by the shared deadline timer: no timer of its own.
            self.buf = _EXPIRES
            hub.add_deadline(self, _EXPIRES, max(0.0, expires - time.time()))
        if t.get_write_buffer_size() > hub.config.limit_write_buffer:
            self.drop_slow()

    def _start_poll(self, req: Request, r: Route, rest: bytearray, cors: bytes) -> None:
        hub = self.hub
        if req.method == "HEAD":
            self.transport.write(wire.poll_head_only(req.http11, cors))
            self.close()
            return
        since = hub.last_id if r.since is None else r.since
        self.poll = (since, r.channel, req.http11, req.keep_alive, cors)
        self.buf = rest
        self.state = POLL
        self._wait_or_answer(since, r.channel, r.timeout)

    def _wait_or_answer(self, since: int, channel: str, wait: float) -> None:
        """A long-poll (fresh, or adopted from the previous worker with the time it had left)
        from ``since``: answered now if there is something to say, else it waits up to ``wait``
        for a message."""
        hub = self.hub
        entries, gap, _ = hub.history_since(channel, since)
        # An id this worker has not seen yet is most often another worker's newest one, a few
        # ms ahead of this worker's copy: wait for it a moment before calling it a reset (which
        # would send the client back to an older last_id, and the message twice); an announced
        # one (a later wave's, a reload's) for all of ``wait``.
        ahead = since > hub.last_id
        # A gap is told at once ("reset": true), so the client can go on from last_id. With no
        # time to wait the answer is the timed-out one: an id ahead is not waited for then.
        if entries or (gap and not ahead) or wait <= 0 or hub.draining:
            self.answer_poll(timed_out=True)
            return
        subs = self.subs = hub.poll_set(channel)
        subs.add(self)
        if ahead and since > hub.upcoming_id:
            wait = min(wait, AHEAD_WAIT)
        hub.add_deadline(self, self.buf, wait)

    def answer_poll(self, timed_out: bool = False) -> None:
        """Send the long-poll answer (messages newer than ``since``, maybe none) and go on."""
        if self.state != POLL or not self.poll:
            return
        hub = self.hub
        since, channel, http11, keep_alive, cors = self.poll
        if since > hub.last_id and not timed_out and not hub.draining:
            return  # still catching up to the id it asked from: keep waiting
        if self.subs is not None:
            self.subs.discard(self)
            self.subs = None
        # Timed out (or draining) before an announced id's wave reached this worker: nothing
        # yet, and the client goes on from the same id — a reset would send it back to this
        # worker's older last id and the message twice (a broadcast's waves take ~20 s at 1M).
        on_its_way = hub.last_id < since <= hub.upcoming_id
        entries, gap, _ = ([], False, None) if on_its_way else hub.history_since(channel, since)
        msgs = [
            {
                "id": e.id,
                "channel": e.msg.get("channel"),
                "event": e.msg.get("event"),
                "data": e.msg.get("data"),
                "ts": e.msg.get("ts"),
            }
            for e in entries
        ]
        # Past the newest id (state lost, a typo): last_id tells the client where to go on from,
        # so its next poll waits instead of being answered empty at once again and again.
        last = entries[-1].id if entries else since if on_its_way else min(since, hub.last_id)
        payload = {"messages": msgs, "last_id": last, "reset": gap}
        keep = keep_alive and not hub.draining
        data = wire.poll_response(payload, http11, keep, cors)
        self.transport.write(data)
        hub.counters.bytes_sent_total += len(data)
        hub.counters.msgs_sent_total += len(msgs)
        if not keep:
            self.close()
            return
        # Back to reading the next request on the same connection.
        rest = self.buf if self.buf is not None else bytearray()
        self.buf = bytearray(rest)  # a new object: the poll deadline entry goes stale
        self.poll = _KEEPALIVE
        self.state = HEAD
        hub.add_fixed_deadline(self, self.buf, hub.config.timeout_keepalive)
        if self.buf:
            self._on_head_bytes()

    def on_deadline(self, token: object) -> None:
        """The hub's deadline heap says this connection's current phase ran out of time."""
        if self.state == HEAD:
            if self.poll is _KEEPALIVE and not self.buf:
                self.close()  # idle keep-alive: close quietly
            else:
                self.fail(HttpError(408, "request head not received in time"))
        elif self.state == POLL:
            self.answer_poll(timed_out=True)
        elif token is _EXPIRES and self.state <= LAST_STREAM:
            self.hub.counters.token_expired_total += 1
            self.transport.write(wire.token_expired(self.state))
            self.close()

    # -- closing ---------------------------------------------------------------------------------
    def fail(self, err: HttpError, cors: bytes = b"") -> None:
        extra: list[tuple[str, str]] = []
        if err.status == 405:
            extra.append(("Allow", "GET, HEAD, OPTIONS"))
        self.transport.write(wire.error_response(err.status, err.reason, extra, cors))
        self.close()

    def _leave(self, state: int) -> bool:
        """Out of the hub's sets, into ``state`` (DONE or HANDED); False if it had left."""
        if self.state >= DONE:
            return False
        self.state = state
        self.buf = None
        if self.subs is not None:
            self.subs.discard(self)
            self.subs = None
        return True

    def close(self) -> None:
        if self._leave(DONE):
            self.transport.close()

    def let_go(self) -> None:
        """The successor adopted this connection: forget it here without closing it (its socket
        lives on in the other process; closing our descriptor sends nothing)."""
        if self._leave(HANDED):
            self.hub.counters.handed_total += 1
            self.transport.abort()

    def drop_slow(self) -> None:
        """Unsent data passed the cap: the client is not reading; abort, do not buffer more."""
        if self._leave(DONE):
            self.hub.counters.slow_dropped_total += 1
            self.transport.abort()
