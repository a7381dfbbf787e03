"""Live connections from one worker process to its successor, on the same TCP connections.

A socket is a kernel object: the process holding it can pass it to another (SCM_RIGHTS), and the
other's event loop adopts it (``loop.connect_accepted_socket``). The giving worker (``give``,
the ``handoff`` op) and the successor (``Receiver``, started with ``COMET_WORKER_ADOPT=PATH``)
speak over a SOCK_SEQPACKET Unix socket at PATH, one message per step, fds riding along (both
ends non-blocking, driven by their event loops; only the connect and accept wait in a thread):

    giver → successor   {"history": [MSG, ...]}         (only across services: see below)
    giver → successor   {"init": {"last_id", "pruned", "hole"}}
    successor → giver   {"ok": true}
    giver → successor   {"listener": true}            + the listening socket
    successor → giver   {"ok": true}                    (it accepts on it now; the giver stops)
    giver → successor   {"conns": [STATE, ...]}       + one socket per STATE (at most BATCH)
    successor → giver   {"adopted": n}                  (the giver lets go of those n)
    ...                                                 (up to WINDOW batches ahead of answers)
    giver → successor   {"done": true}

STATE is what a connection is beyond its socket: ``{"kind": "stream", "fmt", "channel", "last_id",
"expires"}``, ``{"kind": "poll", "since", "channel", "http11", "keep_alive", "cors", "left",
"buf"}`` or ``{"kind": "head", "buf", "keepalive"}`` (a request head being read, or a keep-alive
connection between long-polls). The supervisor holds the slot's lock for the whole handoff, so the
giver's queued writes are finished first and nothing is written to it meanwhile (the successor's
history ends at the giver's last message); a stream's ``last_id`` is the giver's, and the successor
sends whatever its history has after it all the same. A connection is owned by exactly one process
at every moment: the giver lets go of a batch only when the successor says it adopted it; if the
successor fails, the giver keeps (and goes on serving) what it still holds.

A TLS connection whose records the worker seals (service/worker/tls.py, a TLS 1.3 session after
its handshake) moves too: its STATE has ``"tls": {"suite", "wsec", "rsec", "wseq", "rseq"}``
(the traffic secrets, as the fds themselves only between our own processes), and the successor
goes on with the same keys and sequence numbers. Those go last, in ``{"tls_conns": [...]}``
batches. TLS connections OpenSSL keeps (TLS 1.2, ``--no-tls-offload``) cannot move: their session
lives in the process; they get the reconnect hint and are closed.

Across services (a new container taking over, ``take_over`` in docs/architecture.md) the
successor's supervisor cannot give it the history before the handoff, so the giver sends its own
first (``history`` in messages under MESSAGE_MAX, then ``init``). A successor may have several
givers (the old service had more workers): it serves each in turn, and only one of them passes
its listener (the others close theirs).
"""

from __future__ import annotations

import _socket
import asyncio
import base64
import collections
import contextlib
import functools
import gc
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from service.contracts import GIVER_TIMEOUT
from service.worker.protocol import _EXPIRES, _KEEPALIVE, Conn
from service.worker.states import DONE, HEAD, LAST_STREAM, POLL
from service.worker.tls import TlsConn

if TYPE_CHECKING:
    from service.worker.hub import Hub
    from service.worker.plane import Plane

log = logging.getLogger("comet.worker")

P = ParamSpec("P")
T = TypeVar("T")

BATCH = 200  # sockets per message: below SCM_MAX_FD (253)
WINDOW = 4  # batches sent ahead of their answers
# Connections walked (paused, their state built) per loop turn: a worker of 20,000 would
# otherwise block its loop ~100 ms at a time (the loop lag the frames report).
STEP = 2000
MESSAGE_MAX = 1 << 20
STEP_TIMEOUT = 30.0


def _collector_paused(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Python's cyclic garbage collector off while ``fn`` moves connections. Every adopted
    connection brings new long-lived objects (its transport, its ``Conn``, a task while it is
    made), and every 700 of them started a collection that walked the young ones again and, as
    the heap grew, the whole heap: ~1-2 µs of the ~8 µs an adoption costs alone. What a move
    leaves as cyclic garbage is collected once the collector is back on."""

    @functools.wraps(fn)
    async def paused(*args: P.args, **kwargs: P.kwargs) -> T:
        was = gc.isenabled()
        gc.disable()
        try:
            return await fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


def _kept_out_of_the_collector(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """The successor's side of :func:`_collector_paused`: what it adopted (~16,000 connections'
    transports and ``Conn`` objects a worker at 100,000) is long-lived, and with the collector
    back on, the first collections walked all of it at once: 12 + 35 ms at 9,000 connections
    in one process, a 100-150 ms stall of the new worker's loop right after a reload on two
    busy cores. So it is frozen (``gc.freeze``: moved where no collection looks) once adopted;
    a closed connection is still freed by its reference count (uvloop drops its protocol), and
    a move leaves no cyclic garbage to lose (none collected in that measurement)."""

    @functools.wraps(fn)
    async def kept(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        finally:
            gc.freeze()

    return kept


async def _ready(sock: socket.socket, write: bool) -> None:
    """Until ``sock`` (non-blocking) can be written to, or read from."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    add(fd, wake)
    try:
        await fut
    finally:
        remove(fd)


async def _send(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    """One message (and its sockets) on the non-blocking handoff socket, from the loop itself:
    a thread per step costs two wake-ups, which on a saturated host are most of a batch's time."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            try:
                if fds:
                    socket.send_fds(sock, [data], fds)
                else:
                    sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                await _ready(sock, write=True)


async def _recv(sock: socket.socket, maxfds: int = 0) -> tuple[dict[str, Any], list[int]]:
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            try:
                data, fds, flags, _addr = socket.recv_fds(sock, MESSAGE_MAX, maxfds)
                break
            except (BlockingIOError, InterruptedError):
                await _ready(sock, write=False)
    if not data or flags & socket.MSG_CTRUNC:
        _close_all(fds)
        if data:  # the kernel could not give this process every descriptor that came
            raise OSError(
                f"descriptors lost in passing (MSG_CTRUNC; {len(fds)} arrived): this process "
                "is at its open-files limit"
            )
        raise ConnectionError("the other side closed the handoff socket")
    return dict(json.loads(data)), fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _where(hub: Hub) -> tuple[dict[int, str], dict[tuple[int, int], float]]:
    """Each stream's channel, and each live ticked deadline (conn id, token id) → loop time."""
    channels = {id(c): name for name, subs in hub.streams.items() for c in subs}
    deadlines = {(id(conn), id(token)): when for when, conn, token in hub.deadlines.entries()}
    return channels, deadlines


def state_of(
    c: Conn,
    hub: Hub,
    channels: dict[int, str],
    deadlines: dict[tuple[int, int], float],
    now: float,
) -> dict[str, Any] | None:
    """What the successor needs to go on with ``c``; None for a connection that cannot move."""
    state = c.state
    if state <= LAST_STREAM:
        channel = channels.get(id(c))
        if channel is None:
            return None
        expires = 0.0
        if c.buf is _EXPIRES:
            when = deadlines.get((id(c), id(_EXPIRES)))
            if when is not None:
                expires = when - now  # seconds left; the successor's loop clock differs
        return {
            "kind": "stream",
            "fmt": state,
            "channel": channel,
            "last_id": hub.last_id,
            "expires_in": expires,
        }
    if state == POLL and c.poll:
        since, channel, http11, keep_alive, cors = c.poll
        when = deadlines.get((id(c), id(c.buf)))
        return {
            "kind": "poll",
            "since": since,
            "channel": channel,
            "http11": http11,
            "keep_alive": keep_alive,
            "cors": base64.b64encode(cors).decode(),
            "left": max(0.0, when - now) if when is not None else 0.0,
            "buf": base64.b64encode(bytes(c.buf or b"")).decode(),
        }
    if state == HEAD:
        return {
            "kind": "head",
            "buf": base64.b64encode(bytes(c.buf or b"")).decode(),
            "keepalive": c.poll is _KEEPALIVE,
        }
    return None


def history_of(hub: Hub) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The hub's history (every ring, in id order) and what ``init`` needs beside it."""
    rings = {"*": hub.global_ring, **hub.rings}
    msgs = sorted((e.msg for r in rings.values() for e in r.items), key=lambda m: int(m["id"]))
    pruned = {name: r.evicted_max for name, r in rings.items() if r.evicted_max}
    if hub.pruned_evicted:
        pruned[""] = hub.pruned_evicted  # no channel has this name: it sets pruned_evicted
    return [dict(m) for m in msgs], {
        "last_id": hub.last_id,
        "pruned": pruned,
        "hole": list(hub.hole) if hub.hole else None,
    }


def _history_messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``msgs`` cut into ``{"history": [...]}`` messages well under MESSAGE_MAX each."""
    out: list[dict[str, Any]] = []
    part: list[dict[str, Any]] = []
    size = 0
    for m in msgs:
        n = len(json.dumps(m, separators=(",", ":"))) + 1
        if part and size + n > MESSAGE_MAX // 2:
            out.append({"history": part})
            part, size = [], 0
        part.append(m)
        size += n
    if part:
        out.append({"history": part})
    return out


@_collector_paused
async def give(
    hub: Hub,
    server: asyncio.AbstractServer | Plane | None,
    path: str,
    relisten: Callable[[], Awaitable[None]],
    listener: bool = True,
    history: bool = False,
) -> dict[str, Any]:
    """Hand the listener and every connection that can move to the successor at ``path``.
    Returns ``{"handed": n, "kept": k}``: ``kept`` could not move (TLS kept by OpenSSL, unsent
    bytes, or the successor failed) and were closed with the reconnect hint (or are still
    served here). If the successor fails after it took the listener, ``relisten`` opens a new
    one here. With ``history``, the history goes first; without ``listener`` the listener is
    closed instead of passed (another giver passes its own)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(STEP_TIMEOUT)
    handed = 0
    now0 = loop.time()
    timing = ""
    gave_listener = False
    kept: list[Conn] = []
    try:
        await loop.run_in_executor(None, sock.connect, path)
        sock.setblocking(False)
        if history:
            msgs, init = history_of(hub)
            for part in _history_messages(msgs):
                await _send(sock, part)
            await _send(sock, {"init": init})
            answer, _ = await _recv(sock)
            if not answer.get("ok"):
                raise ConnectionError(f"the successor refused the history: {answer}")
        listeners = getattr(server, "sockets", None) if server is not None else None
        if server is not None and listeners and not listener:
            # Another giver passes its listener; connections still queued on this one are reset
            # (and reconnect), as when a worker stops.
            server.close()
            gave_listener = True
        elif server is not None and listeners:
            fd = os.dup(listeners[0].fileno())
            try:
                await _send(sock, {"listener": True}, [fd])
            finally:
                os.close(fd)
            answer, _ = await _recv(sock)
            if not answer.get("ok"):
                raise ConnectionError(f"the successor refused the listener: {answer}")
            server.close()  # it accepts on the same queue now: nothing waiting there is lost
            gave_listener = True
        await hub.writes_done()
        hub.stop_pings()
        hub.deadlines.hold()  # from the snapshot on, nothing here answers these connections
        conns = hub.open_conns()
        for i, c in enumerate(conns, 1):
            c.transport.pause_reading()
            if i % STEP == 0:
                await asyncio.sleep(0)
        # Bytes a stream has not sent yet would be lost with its transport: give them a moment.
        for _ in range(100):
            if not any(c.transport.get_write_buffer_size() for c in conns):
                break
            await asyncio.sleep(0.01)
        t_prep = loop.time()
        channels, deadlines = _where(hub)
        now = loop.time()
        movable: list[tuple[Conn, dict[str, Any]]] = []
        movable_tls: list[tuple[Conn, dict[str, Any]]] = []
        for i, c in enumerate(conns, 1):
            if i % STEP == 0:
                await asyncio.sleep(0)
            st = None
            t = c.transport
            tls = t.handoff_state() if isinstance(t, TlsConn) else None
            if c.state < DONE and not t.get_write_buffer_size():
                if tls is not None or not isinstance(t, TlsConn):
                    st = state_of(c, hub, channels, deadlines, now)
            if st is None:
                kept.append(c)
            elif tls is not None:
                st["tls"] = tls
                movable_tls.append((c, st))
            else:
                movable.append((c, st))
        # TLS ones last, in batches of their own under another key: a successor of older code
        # that cannot seal their records never answers one (the giver keeps them at the step's
        # timeout) instead of taking them for plain connections.
        batches = [
            (key, group[i : i + BATCH])
            for key, group in (("conns", movable), ("tls_conns", movable_tls))
            for i in range(0, len(group), BATCH)
        ]
        t_states = loop.time()
        t_wait = 0.0
        # Up to WINDOW batches on their way: the successor always has the next one to adopt
        # while this side builds the one after. A batch is let go only once its answer came
        # (answers come in order); what is unanswered when something fails stays ours.
        sent: collections.deque[list[tuple[Conn, dict[str, Any]]]] = collections.deque()

        async def settle() -> None:
            nonlocal handed, t_wait
            done = sent.popleft()
            tw = loop.time()
            answer, _ = await _recv(sock)
            t_wait += loop.time() - tw
            if answer.get("adopted") != len(done):
                why = answer.get("error") or f"it adopted {answer.get('adopted')!r} of a batch"
                raise ConnectionError(f"the successor refused: {why}")
            for c, _ in done:
                c.let_go()
            handed += len(done)

        for key, batch in batches:
            socks = [c.transport.get_extra_info("socket") for c, _ in batch]
            fds = [os.dup(s.fileno()) for s in socks]
            try:
                # The family lets the successor wrap each descriptor without asking the kernel.
                msg = {key: [st for _, st in batch], "family": socks[0].family}
                await _send(sock, msg, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            sent.append(batch)
            if len(sent) >= WINDOW:
                await settle()
        while sent:
            await settle()
        await _send(sock, {"done": True})
        timing = (
            f"in {loop.time() - now0:.2f} s (writes done and reading paused "
            f"{t_prep - now0:.2f} s, states {t_states - t_prep:.2f} s, waiting for the "
            f"successor's adoption {t_wait:.2f} s)"
        )
    except (OSError, ValueError, TimeoutError) as exc:
        # The successor is gone or refused: what was not handed stays ours and is served on.
        log.error("handoff to %s stopped after %d connections: %s", path, handed, exc)
        for c in hub.open_conns():
            with contextlib.suppress(Exception):
                c.transport.resume_reading()
        hub.start_pings()
        if gave_listener:
            await relisten()
        return {"handed": handed, "kept": len(hub.open_conns()), "error": str(exc)}
    finally:
        sock.close()
        hub.deadlines.release()
    # What could not move: told to reconnect, as a drain would.
    for c in kept:
        with contextlib.suppress(Exception):
            c.transport.resume_reading()
    if kept:
        hub.drain_streams([c for c in kept if c.state <= LAST_STREAM])
        for c in kept:
            if c.state > LAST_STREAM:
                c.close()
    log.info(
        "handed %d connections to the successor %s, %d could not move", handed, timing, len(kept)
    )
    return {"handed": handed, "kept": len(kept)}


def _peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


class _Handed(socket.socket):
    """A received connection's socket, as uvloop's ``connect_accepted_socket`` reads it: its
    ``family`` and ``type`` are the plain numbers. ``socket.socket`` turns each into an
    IntEnum member on every read, and uvloop reads them three times an adoption (~1.5 µs
    each)."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


def _wrap(fd: int, family: int | None) -> socket.socket:
    """A received TCP descriptor as a non-blocking socket object. Given its family, the three
    getsockopt calls with which ``socket.socket(fileno=fd)`` finds family, type and protocol
    are skipped, and SOCK_NONBLOCK in the type makes the object non-blocking without the ioctl
    of ``setblocking`` (the descriptor is: the giver's loop made it so, and uvloop sets it
    again when it opens the transport)."""
    if family is None:
        sock = _Handed(fileno=fd)
        sock.setblocking(False)
        return sock
    return _Handed(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, socket.IPPROTO_TCP, fd)


class Receiver:
    """The successor's end: listens at ``path``, adopts the listener and the connections."""

    def __init__(
        self,
        path: str,
        adopt_listener: Any,
        adopt_conns: Any,
        givers: int = 1,
        on_init: Any = None,
        on_end: Any = None,
        wait: float = GIVER_TIMEOUT,
    ) -> None:
        self.path = path
        self.adopt_listener = adopt_listener  # async (socket) -> None
        self.adopt_conns = adopt_conns  # async ([(socket, state), ...]) -> None: a batch
        self.on_init = on_init  # (history, init) -> None: a giver's history, across services
        self.on_end = on_end  # async (got a listener?) -> None, once every giver is done
        self.givers = givers
        self.got_listener = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(max(1, givers))
        # accept() in a thread wakes once a second to see whether to stop waiting.
        self.sock.settimeout(1.0)
        self.deadline = time.monotonic() + wait
        self.stopping = False
        self._waker: socket.socket | None = None  # stop_waiting's connection to self.sock
        self.adopted = 0
        self._task = asyncio.get_running_loop().create_task(self._serve_all())

    async def _serve_all(self) -> None:
        try:
            for _ in range(self.givers):
                if not await self._serve():
                    break
        finally:
            self.close()
            if self.on_end is not None:
                await self.on_end(self.got_listener)

    @_kept_out_of_the_collector
    @_collector_paused
    async def _serve(self) -> bool:
        """One giver, to its end; False if it failed."""
        loop = asyncio.get_running_loop()
        history: list[dict[str, Any]] = []
        try:
            conn = await loop.run_in_executor(None, self._accept)
            conn.setblocking(False)
            with conn:
                while True:
                    msg, fds = await _recv(conn, BATCH)
                    if "history" in msg:
                        history.extend(msg["history"])
                    elif "init" in msg:
                        if self.on_init is not None:
                            self.on_init(history, msg["init"])
                        history = []
                        await _send(conn, {"ok": True})
                    elif msg.get("listener"):
                        await self.adopt_listener(socket.socket(fileno=fds[0]))
                        self.got_listener = True
                        await _send(conn, {"ok": True})
                    elif "conns" in msg or "tls_conns" in msg:
                        states = msg.get("conns") or msg["tls_conns"]
                        if len(states) != len(fds):
                            _close_all(fds)
                            raise ValueError(
                                f"{len(states)} connection states came with {len(fds)} sockets"
                            )
                        family = msg.get("family")
                        await self.adopt_conns(
                            [(_wrap(fd, family), st) for st, fd in zip(states, fds, strict=True)]
                        )
                        self.adopted += len(states)
                        await _send(conn, {"adopted": len(states)})
                    elif msg.get("done"):
                        break
                    else:
                        # A step of a newer giver: refused, its descriptors closed here (kept,
                        # they would hold those connections open behind the giver's back).
                        _close_all(fds)
                        keys = ", ".join(sorted(msg)) or "nothing"
                        await _send(conn, {"error": f"unknown handoff step ({keys})"})
                        raise ValueError(f"the giver sent an unknown handoff step ({keys})")
            log.info("adopted %d connections from the previous worker so far", self.adopted)
            return True
        except Exception as exc:
            log.error("adopting from the previous worker failed: %s", exc)
            return False

    def _accept(self) -> socket.socket:
        """The next giver; TimeoutError at the deadline or once told the handover has ended."""
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError as exc:  # a 1-s tick (TimeoutError), or closed under us once stopping
                if self.stopping:
                    raise TimeoutError("the handover ended without this worker's giver") from None
                if not isinstance(exc, TimeoutError) or time.monotonic() >= self.deadline:
                    raise
                continue
            if _peer_pid(conn) != os.getpid():
                return conn
            # stop_waiting's wake-up call: every giver that had connected before it was ahead
            # of it in the queue and has been served.
            conn.close()
            raise TimeoutError("the handover ended without this worker's giver")

    def stop_waiting(self) -> None:
        """The handover has ended: a giver not connected by now will not come (one that is
        connected finishes). The accept waiting in its thread is woken at once by a connection
        from this process (which ``_accept`` tells from a giver's by its peer pid), not at its
        next 1-s tick."""
        self.stopping = True
        if self._waker is None:
            waker = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            waker.setblocking(False)
            try:
                waker.connect(self.path)
            except OSError:  # closed already, or its backlog full of givers: the tick will do
                waker.close()
                return
            self._waker = waker

    def close(self) -> None:
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
