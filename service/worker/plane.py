"""``--plane raw``: plain connections on bare sockets in one epoll, instead of uvloop transports.

uvloop gives every accepted connection a transport: a libuv handle with its buffers (~1.2 KB
of a held stream's ~1.4 KB), a ``setsockopt`` for TCP_NODELAY, and an entry in a
``weakref.WeakValueDictionary`` (the loop's ``_track_transport``), all on the accept path. The
worker needs little of it: a held stream is written to and, once, closed. Here the listener and
one ``select.epoll`` holding every connection's socket are the only two descriptors the loop
watches; each connection is its socket, its unsent bytes and three flags (:class:`RawTransport`),
under the same ``Conn`` protocol object, parser and hub. TCP_NODELAY is set once on the listener
(accepted sockets inherit it). A new connection's first bytes are read with its accept (the
request is there: TCP_DEFER_ACCEPT) and given to ``Conn.accepted``, and only then is it
registered with the epoll, for what it still waits for: a head seen before costs no buffer and
no deadline, and a connection answered and closed at once (a 503) is never watched. Measured
(docs/benchmarks.md, "Below uvloop's transports" and "A head seen before"): a held connection
1.33 -> 0.36 KB of the service's RSS at a million; CPU per accept 1.06x the raw floor's
(``benchmarks/bare_server.py --raw``) and below uvloop's at 19,000 on one worker, about as
much as uvloop's with 6 workers at 100,000; CPU per write about the same at a million and a
little more with fewer connections (two Python method calls replace uvloop's C).

Only plain HTTP: a TLS worker keeps uvloop's transports (its records go through ``TlsConn``).
Reloads and takeovers work both ways: a giver on this plane hands its sockets as a uvloop
worker does, and a successor on it adopts plain connections here (:meth:`Plane.adopt`).

The transport keeps asyncio's contract where ``Conn`` relies on it: ``write`` never raises and
buffers what the kernel did not take; ``close`` ends the connection once that is sent;
``abort`` ends it now; ``connection_lost`` always comes later, from the loop (never inside a
``write`` that a broadcast loop is making over a set of subscribers).
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import select
import socket
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("comet.worker")

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_DONTWAIT = socket.MSG_DONTWAIT
_ACCEPTS_PER_WAKE = 256  # then the loop turns: timers and broadcasts are not starved by a storm
_EVENTS_PER_WAKE = 4096
_ACCEPT_RETRY_S = 1.0  # after EMFILE and the like, as asyncio's servers wait


def _mask(t: RawTransport) -> int:
    """What epoll is asked about ``t``: its bytes (unless paused or closing) and room for its
    unsent ones."""
    reading = not t.paused and not t.closing
    return (_IN if reading else 0) | (_OUT if t.out is not None else 0)


class Accepting(Protocol):
    """What this plane asks of a connection's protocol object (the worker's ``Conn``): an
    ``asyncio.Protocol`` that can also be given its first bytes with the accept."""

    def connection_made(self, transport: Any) -> None: ...
    def accepted(self, transport: Any, data: bytes) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


class RawTransport:
    """One connection: what ``Conn``, the hub and a handoff call of an ``asyncio.Transport``."""

    __slots__ = ("sock", "fd", "protocol", "plane", "out", "closing", "ended", "paused")

    def __init__(self, sock: Any, fd: int, plane: Plane) -> None:
        self.sock = sock
        self.fd = fd
        self.plane = plane
        self.protocol: Any = None
        self.out: bytearray | None = None  # what the kernel has not taken yet
        self.closing = False  # close() called: ends once ``out`` is sent
        self.ended = False  # the descriptor is closed; connection_lost is on its way
        self.paused = False  # pause_reading (a handoff): only writes are watched

    # -- asyncio.Transport ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closing or self.ended:
            return
        out = self.out
        if out is not None:
            out += data
            return
        try:
            n = self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._end(exc)
            return
        if n < len(data):
            self.out = bytearray(data[n:])
            self.plane.watch(self)

    def get_write_buffer_size(self) -> int:
        out = self.out
        return 0 if out is None else len(out)

    def is_closing(self) -> bool:
        return self.closing or self.ended

    def close(self) -> None:
        if self.closing or self.ended:
            return
        self.closing = True
        if self.out is None:
            self._end(None)
        else:
            self.plane.watch(self)  # only the rest's way out from now on

    def abort(self) -> None:
        self._end(None)

    def pause_reading(self) -> None:
        if not self.ended and not self.paused:
            self.paused = True
            self.plane.watch(self)

    def resume_reading(self) -> None:
        if not self.ended and self.paused:
            self.paused = False
            self.plane.watch(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        try:
            if name == "peername":
                return self.sock.getpeername()
            if name == "sockname":
                return self.sock.getsockname()
        except OSError:
            pass
        return default

    # -- the plane's side ----------------------------------------------------------------------
    def flush(self) -> None:
        """The socket can take more: send what waits; a closing one ends once all is out."""
        out = self.out
        if out is None:
            return
        try:
            n = self.sock.send(out, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(exc)
            return
        del out[:n]
        if not out:
            self.out = None
            if self.closing:
                self._end(None)
            else:
                self.plane.watch(self)

    def _end(self, exc: Exception | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.out = None
        self.plane.forget(self.fd)
        self.sock.close()
        self.plane.loop.call_soon(self._lost, exc)

    def _lost(self, exc: Exception | None) -> None:
        protocol, self.protocol = self.protocol, None  # no cycle left for the collector
        if protocol is not None:
            protocol.connection_lost(exc)


class Plane:
    """The epoll of every connection and, while serving, the listener, both watched by the
    worker's loop. Once :meth:`listen` has been called it stands where ``loop.create_server``'s
    ``asyncio.Server`` stands (``sockets``, ``close``, ``is_serving``, ``wait_closed``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sockets: list[socket.socket] = []
        self.factory: Callable[[], Accepting] | None = None
        self.epoll = select.epoll()
        self.conns: dict[int, RawTransport] = {}
        loop.add_reader(self.epoll.fileno(), self._on_events)

    # -- what the worker asks of a server ------------------------------------------------------
    def listen(self, listener: socket.socket, factory: Callable[[], Accepting]) -> None:
        """Accept on ``listener`` (listening already): each connection gets ``factory()``."""
        self.close()
        listener.setblocking(False)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited on accept
        self.sockets = [listener]
        self.factory = factory
        self.loop.add_reader(listener.fileno(), self._on_accept)

    def close(self) -> None:
        """Stop accepting and close the listener (a successor may hold a copy of it). The
        connections stay: the worker drains or hands them over."""
        if self.sockets:
            listener, self.sockets = self.sockets[0], []
            self.loop.remove_reader(listener.fileno())
            listener.close()

    def is_serving(self) -> bool:
        return bool(self.sockets)

    async def wait_closed(self) -> None:
        return None

    def adopt(self, sock: socket.socket, protocol: asyncio.Protocol) -> None:
        """A connection handed over by the previous worker: ``protocol`` is told at once."""
        fd = sock.fileno()
        self.epoll.register(fd, _IN)  # raises before anything is made for it
        t = self.conns[fd] = RawTransport(sock, fd, self)
        t.protocol = protocol
        protocol.connection_made(t)  # type: ignore[arg-type]

    # -- the transports' side ------------------------------------------------------------------
    def watch(self, t: RawTransport) -> None:
        """Ask epoll for what ``t`` waits for: its bytes (unless paused or closing) and room for
        its unsent ones. Errors and hang-ups are reported whatever the mask. A connection not
        registered yet (still in its first step in :meth:`_on_accept`) is registered with
        what it then waits for."""
        if self.conns.get(t.fd) is not t:
            return
        try:
            self.epoll.modify(t.fd, _mask(t))
        except OSError as exc:  # not registered any more: it ended meanwhile
            log.debug("epoll modify of fd %d: %s", t.fd, exc)

    def forget(self, fd: int) -> None:
        if self.conns.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    # -- loop callbacks ------------------------------------------------------------------------
    def _on_accept(self) -> None:
        if not self.sockets or self.factory is None:
            return
        listener = self.sockets[0]
        accept, register = listener._accept, self.epoll.register  # type: ignore[attr-defined]
        conns, factory, family = self.conns, self.factory, listener.family
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                fd, _addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE, ENOBUFS and the like (the connection cap answers 503 long before the
                # descriptors run out): what is queued waits a second, as asyncio's servers do,
                # instead of waking this loop again at once for the same error.
                log.warning("accept: %s; accepting again in %.0f s", exc, _ACCEPT_RETRY_S)
                self.loop.remove_reader(listener.fileno())
                self.loop.call_later(_ACCEPT_RETRY_S, self._resume_accepting, listener)
                return
            # Family, type and protocol given: socket.socket(fileno=) would ask the kernel for
            # each (three getsockopt calls), and its Python __init__ costs as much again.
            s = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            t = RawTransport(s, fd, self)
            p = t.protocol = factory()
            # TCP_DEFER_ACCEPT (--defer-accept): the request is most likely here already.
            try:
                data = s.recv(65536, _DONTWAIT)
            except OSError:  # nothing yet, or an error the read below meets again
                data = b""
            if data:
                p.accepted(t, data)  # connection_made + data_received in one step
            else:
                p.connection_made(t)
                if not (t.closing or t.ended):  # not turned away at once (a 503)
                    self._read(t)  # nothing yet (then epoll says when), its end, or its error
            if t.ended:
                continue  # answered and closed at once (a 503, a bad request): never watched
            # Watched once its first step is over, for what it then waits for: one answered
            # and closed at once (a 503 in a storm, a bad request) costs no epoll_ctl at all.
            try:
                register(fd, _mask(t))
            except OSError as exc:  # ENOMEM, or fs.epoll.max_user_watches reached
                log.warning("cannot watch an accepted connection: %s; closed", exc)
                t._end(exc)
                continue
            conns[fd] = t

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self.sockets and self.sockets[0] is listener:  # not closed or replaced meanwhile
            self.loop.add_reader(listener.fileno(), self._on_accept)

    def _read(self, t: RawTransport) -> None:
        try:
            data = t.sock.recv(65536, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            t._end(exc)
            return
        if data:
            t.protocol.data_received(data)
        elif not t.protocol.eof_received():
            t._end(None)
        elif not t.ended:
            # Half-closed and kept (a long-poll's answer is still to come): nothing more to
            # read, and a level-triggered epoll would report the end again on every wait.
            t.pause_reading()

    def _on_events(self) -> None:
        conns = self.conns
        for fd, ev in self.epoll.poll(0, _EVENTS_PER_WAKE):
            t = conns.get(fd)
            if t is None:
                continue
            if ev & _OUT:
                t.flush()
            if t.ended or not ev & ~_OUT:
                continue
            if t.closing or t.paused:
                # Only an error or a hang-up comes here (nothing else is asked for): the peer
                # is gone, and with it what was still to be sent.
                t._end(ConnectionResetError("the peer went away"))
            else:
                self._read(t)
