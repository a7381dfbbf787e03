"""The comet1m worker: one uvloop event loop holding HTTP streaming connections.

Started by the supervisor as ``python -m service.worker --control-fd N`` (config as JSON in
``COMET_WORKER_CONFIG``, index in ``COMET_WORKER_INDEX``; the internal protocol is in
docs/architecture.md, "Supervisor ⇄ worker"), or standalone with the normal service flags
(``python -m service.worker --port 8888 ...``), in which case it numbers messages itself.

In-process API (used by the supervisor's tests and ours)::

    w = Worker(config, loop, index=0)
    await w.start()                          # binds; w.port is the bound port
    n = await w.broadcast({"data": "hi"})    # id/ts/channel/event filled in when missing
    w.stats(); w.channels()
    await w.drain(grace)                     # reconnect hints, close everything, stop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import uvloop

from service.config import Config, parse_args, raise_nofile_limit
from service.contracts import EXIT_BAD_FILES, EXIT_CANNOT_LISTEN, GIVER_TIMEOUT, WorkerStats
from service.jsonlines import Message, Peer
from service.proctitle import set_title, worker_comm, worker_title
from service.worker.handoff import Receiver, give
from service.worker.hub import Hub
from service.worker.lag import LagSampler
from service.worker.plane import Plane
from service.worker.protocol import ADOPTING, Conn
from service.worker.states import DONE
from service.worker.tls import TlsConn
from service.worker.tls import server_context as tls_context

log = logging.getLogger("comet.worker")

CONTROL_LINE_LIMIT = 256 * 1024 * 1024  # an init message carries the whole history


def effective_backlog(requested: int) -> int:
    """The kernel silently caps listen(2)'s backlog at net.core.somaxconn."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return min(requested, int(f.read().strip()))
    except (OSError, ValueError):
        return requested


def make_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Every worker binds its own listener on the same port; the kernel spreads accepts.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class Worker:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop | None = None,
        index: int = 0,
        sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.loop = loop or asyncio.get_event_loop()
        self.index = index
        self.hub = Hub(config, self.loop)
        self.lag = LagSampler(self.loop, busy=self.hub.busy)
        self.port = config.port
        self.backlog = effective_backlog(config.backlog)
        self._sock = sock
        self._server: asyncio.AbstractServer | Plane | None = None
        # --plane raw: plain connections on bare sockets (service/worker/plane.py); made at
        # the first listen or adoption.
        self._plane: Plane | None = None
        self.titled = False  # a process of its own: its title shows its state (serve() sets it)
        self._tls_class: type[TlsConn] | None = None
        # A protocol class per worker carries the shared state as class attributes, so each
        # connection object holds only its own five slots.
        self.protocol_class = Conn.subclass_for(self.hub)
        self.receiver: Receiver | None = None  # while taking over from the previous worker
        self._queued: socket.socket | None = None  # listening, not yet accepting (before init)
        self._serve_before_init = True  # False when supervised (start's ``serve``)
        self._initialized = False  # a history came (the supervisor's init or a giver's)
        self.stopped = self.loop.create_future()
        self._drain_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(
        self,
        adopt: str | None = None,
        givers: int = 1,
        wait: float = GIVER_TIMEOUT,
        serve: bool = True,
    ) -> None:
        """Listen on the port; with ``adopt`` (a path), take the listener and the connections
        of the worker(s) this one replaces from there instead (service/worker/handoff.py).
        ``serve`` False (a supervised worker): the port is bound and listening, so connections
        queue in the kernel, but they are accepted only once ``init`` has given this worker the
        history (:meth:`serve_queued`): a client resuming in between would otherwise be told
        its id is unknown (a false reset) instead of getting what it missed."""
        self._serve_before_init = serve
        if adopt is not None:
            self.receiver = Receiver(
                adopt, self._listen, self._adopt, givers, self._giver_init, self._adopted_all, wait
            )
            self.hub.start_pings()
            self.hub.start_admission()
            self.lag.start()
            self._title("taking over")
            log.info(
                "worker %d (pid %d) waiting for a handoff at %s", self.index, os.getpid(), adopt
            )
            return
        await self._open(self._sock or make_listener(self.config.host, self.config.port), serve)
        self.hub.start_pings()
        self.hub.start_admission()
        self.lag.start()

    async def _open(self, sock: socket.socket, serve: bool) -> None:
        """Accept on ``sock`` now, or (``serve`` False) only listen: connections queue in the
        kernel until :meth:`serve_queued` (see :meth:`start`)."""
        if serve:
            await self._listen(sock)
        else:
            sock.listen(self.backlog)  # queued meanwhile instead of refused
            self._queued = sock

    async def serve_queued(self) -> None:
        """Accept on the listener held back until ``init`` (see :meth:`start`)."""
        sock, self._queued = self._queued, None
        if sock is not None:
            await self._listen(sock)

    async def _listen(self, sock: socket.socket) -> None:
        cfg = self.config
        sock.setblocking(False)
        # A new connection wakes this loop once, with its request (or ClientHello) already
        # readable, instead of once for accept and again for the bytes: at 100,000 on 6 workers,
        # 51 -> 39 us of CPU per accepted connection (docs/benchmarks.md, issue 19).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, cfg.defer_accept)
        factory: Any = self.tls_class() if cfg.tls_cert else self.protocol_class
        plane = self.raw_plane()
        if plane is not None:
            sock.listen(self.backlog)
            plane.listen(sock, factory)
            self._server = plane
        else:
            self._server = await self.loop.create_server(factory, sock=sock, backlog=self.backlog)
        self.port = sock.getsockname()[1]
        self._title()
        capped = (
            f" (asked {self.config.backlog}, capped by net.core.somaxconn)"
            if self.backlog < self.config.backlog
            else ""
        )
        log.info(
            "worker %d (pid %d) listening on %s:%d%s, backlog %d%s, defer accept %d s, "
            "connection cap %d",
            self.index,
            os.getpid(),
            self.config.host,
            self.port,
            " (TLS)" if cfg.tls_cert else " (raw plane)" if self._plane else "",
            self.backlog,
            capped,
            cfg.defer_accept,
            self.hub.cap,
        )

    def _giver_init(self, history: list[dict[str, Any]], init: dict[str, Any]) -> None:
        """A giver from another service sent its history first (handoff.py)."""
        pruned = {str(k): int(v) for k, v in (init.get("pruned") or {}).items()}
        self.hub.pruned_evicted = max(self.hub.pruned_evicted, pruned.pop("", 0))
        hole = init.get("hole")
        self.init(
            int(init.get("last_id", 0)),
            history,
            pruned,
            (int(hole[0]), int(hole[1])) if hole else None,
        )

    async def _adopted_all(self, got_listener: bool) -> None:
        """Every giver is done (or failed): without a listener from one, open our own."""
        if not got_listener and self._server is None and not self.hub.draining:
            log.warning("worker %d: no listener was handed over; opening one", self.index)
            try:
                # No giver brought a history: accepted once init has (see start).
                await self._open(
                    make_listener(self.config.host, self.config.port),
                    self._serve_before_init or self._initialized,
                )
            except OSError as exc:
                log.error("worker %d: cannot listen: %s", self.index, exc)

    def raw_plane(self) -> Plane | None:
        """This worker's plane for plain connections with --plane raw (None: uvloop's)."""
        if self.config.plane != "raw" or self.config.tls_cert:
            return None
        if self._plane is None:
            self._plane = Plane(self.loop)
        return self._plane

    def tls_class(self) -> type[TlsConn]:
        """This worker's TLS connections' class (made once: it holds the context and its key
        log). Without --tls-cert it only adopts TLS connections a previous worker offloaded."""
        if self._tls_class is None:
            cfg = self.config
            self._tls_class = TlsConn.subclass_for(
                tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None,
                self.protocol_class,
                # The handshake gets the request head's deadline: a silent client is cut as soon.
                cfg.timeout_header,
                cfg.tls_offload,
                self.hub.counters,
                self.hub,
            )
        return self._tls_class

    async def _adopt(self, handed: Sequence[tuple[socket.socket, dict[str, Any]]]) -> None:
        """Connections of the previous worker, a batch at once, going on here (Conn._adopt).

        uvloop's ``connect_accepted_socket`` is a coroutine: it makes the transport, schedules
        ``connection_made`` and waits for it. Run by a Task each (``asyncio.gather``), the
        Tasks' bookkeeping was a third of an adoption (~8 of ~25 µs on an AMD EPYC); here each
        coroutine is stepped by hand to that wait, the waits are gathered, and each is stepped
        on to its end — what a Task does, without one per connection.

        All or nothing: if one connection cannot be made (or this is cancelled), the batch gets
        no answer and the giver keeps every connection of it, so none stays here — the ones
        made are let go (our descriptor closed, which sends nothing) and the others never
        reach ``connection_made``. The first error is raised."""
        plane = self.raw_plane()
        if plane is not None and not any("tls" in st for _, st in handed):
            self._adopt_raw(plane, handed)
            return
        loop = self.loop
        made: list[Conn] = []
        state: dict[str, Any] = {}

        def factory() -> asyncio.Protocol:
            conn = self.protocol_class()
            ADOPTING[id(conn)] = state
            made.append(conn)
            tls = state.get("tls")
            return self.tls_class().adopted(conn, tls) if tls else conn

        waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        error: BaseException | None = None

        def step(coro: Any) -> None:
            nonlocal error
            try:
                fut = coro.send(None)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - the first is raised once all are stepped
                error = error or exc
                return
            if fut is None:  # a bare yield: go on at the next turn
                fut = loop.create_future()
                fut.set_result(None)
            fut._asyncio_future_blocking = False  # taken, as a Task takes what it is given
            waiting.append((coro, fut))

        try:
            for sock, st in handed:
                state = st  # what factory gives the connection it makes in this first step
                step(loop.connect_accepted_socket(factory, sock=sock))
            while waiting:
                await asyncio.wait([fut for _, fut in waiting])
                ready, waiting = waiting, []
                for coro, _ in ready:
                    step(coro)
            if error is not None:
                raise error
        except BaseException:
            for coro, fut in waiting:
                if fut.done():  # made: let it return, then let go of it below
                    with contextlib.suppress(BaseException):
                        coro.send(None)
                else:  # not made: uvloop closes its transport, connection_made never runs
                    fut.cancel()
                    coro.close()
            for conn in made:
                # Made (connection_made ran: it set both) and not gone yet.
                if (
                    getattr(conn, "transport", None) is not None
                    and getattr(conn, "state", DONE) < DONE
                ):
                    conn.transport.abort()  # connection_lost takes it out of the hub
            raise
        finally:
            for conn in made:
                ADOPTING.pop(id(conn), None)

    def _adopt_raw(
        self, plane: Plane, handed: Sequence[tuple[socket.socket, dict[str, Any]]]
    ) -> None:
        """:meth:`_adopt` on the raw plane: each connection made and told at once, all or
        nothing as there."""
        made: list[Conn] = []
        try:
            for sock, st in handed:
                conn = self.protocol_class()
                ADOPTING[id(conn)] = st
                try:
                    plane.adopt(sock, conn)
                finally:
                    ADOPTING.pop(id(conn), None)  # connection_made took it, unless it failed
                made.append(conn)
        except BaseException:
            for conn in made:
                if getattr(conn, "state", DONE) < DONE:
                    conn.transport.abort()  # connection_lost takes it out of the hub
            raise

    async def handoff(
        self, path: str, listener: bool = True, history: bool = False
    ) -> dict[str, Any]:
        """Give the listener and every connection to the successor listening at ``path``."""

        async def relisten() -> None:
            await self._listen(make_listener(self.config.host, self.port))

        self._title("handing over")
        try:
            return await give(self.hub, self._server, path, relisten, listener, history)
        finally:
            serving = self._server is not None and self._server.is_serving()
            self._title("" if serving else "handed over")

    def _title(self, state: str = "") -> None:
        """What ps and top show for this process (service/proctitle.py)."""
        if self.titled:
            set_title(worker_title(self.index, self.port, state), worker_comm(self.index))

    def init(
        self,
        last_id: int,
        history: Sequence[Mapping[str, Any]],
        pruned: Mapping[str, int] | None = None,
        hole: tuple[int, int] | None = None,
        deliver: bool = False,
    ) -> None:
        """Take the supervisor's id sequence and history (before any broadcast), and what its
        store pruned or never held (service/store.py): resumes into those get a reset. Sent
        again (a giver's history first, then the supervisor's), only what is newer is taken.
        ``deliver``: this worker holds live connections (it took them over) and the newer
        messages were published while it was not yet up: write them to their subscribers too."""
        held = self.hub.last_id
        for msg in sorted(history, key=lambda m: int(m["id"])):
            if int(msg["id"]) > held:
                if deliver:
                    self.hub.broadcast(msg)
                else:
                    self.hub.record(msg)
        self.hub.last_id = max(self.hub.last_id, int(last_id))
        self._initialized = True
        self.hub.limit_resumes(pruned or {}, hole)

    def broadcast(self, msg: Mapping[str, Any]) -> asyncio.Future[int]:
        """Write a message to its channel (``channel`` None = everyone); resolves to recipients.

        Missing fields are filled in: ``id`` = last id + 1 (standalone numbering), ``ts`` = now,
        ``channel``/``event`` = None.
        """
        m = dict(msg)
        size = len(str(m.get("data", "")).encode("utf-8", "replace"))
        if size > self.config.limit_message_bytes:
            raise ValueError(f"data is {size} bytes, over limit_message_bytes")
        if m.get("id") is None:
            m["id"] = self.hub.last_id + 1
        m.setdefault("ts", time.time())
        m.setdefault("channel", None)
        m.setdefault("event", None)
        m["data"] = str(m.get("data", ""))
        return self.hub.broadcast(m)

    def stats(self) -> WorkerStats:
        """WSTATS; ``lag_ms`` covers the time since the previous call, ``lag_hist`` the
        worker's life."""
        out: dict[str, Any] = {"pid": os.getpid(), "index": self.index}
        out.update(self.hub.counters.as_dict())  # every name of COUNTER_NAMES
        out["lag_ms"] = self.lag.read()
        out["lag_hist"] = self.lag.histogram()
        return cast(WorkerStats, out)

    def channels(self) -> dict[str, int]:
        return self.hub.channels()

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, send reconnect hints, close every connection; abort stragglers."""
        if self._drain_task is None:
            self._drain_task = self.loop.create_task(self._drain(grace))
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float | None) -> None:
        grace = self.config.grace if grace is None else grace
        deadline = self.loop.time() + grace
        if self._server is not None:
            self._server.close()
        self._title("draining")
        log.info(
            "worker %d draining %d streams (grace %.1fs)",
            self.index,
            len(self.hub.all_streams()),
            grace,
        )
        left = await self.hub.drain(deadline)
        if left:
            log.warning("worker %d: grace over with %d open; aborting", self.index, left)
        self.lag.stop()
        if self._server is not None:
            await self._server.wait_closed()
        if not self.stopped.done():
            self.stopped.set_result(None)


# -- supervisor ⇄ worker control pipe ----------------------------------------------------------
class ControlChannel:
    """The supervisor's pipe (the inherited socketpair end), a :class:`Peer` with a handler per
    op; each request runs as its own task, so a long broadcast never blocks a stats read."""

    def __init__(self, worker: Worker, fd: int) -> None:
        self.worker = worker
        self.fd = fd
        self.peer: Peer | None = None

    async def run(self) -> None:
        sock = socket.socket(fileno=self.fd)
        reader, writer = await asyncio.open_connection(sock=sock, limit=CONTROL_LINE_LIMIT)
        self.peer = peer = Peer(
            reader,
            writer,
            {
                "init": self.init,
                "limits": self.limits,
                "stats": self.stats,
                "broadcast": self.broadcast,
                "quiet": self.quiet,
                "channels": self.channels,
                "drain": self.drain,
                "handoff": self.handoff,
                "adopt_end": self.adopt_end,
            },
            name=f"worker {self.worker.index} control pipe",
        )
        peer.send({"op": "ready", "pid": os.getpid(), "index": self.worker.index})
        gone = await peer.run()
        if not self.worker.hub.draining:
            log.info("worker %d: %s, draining", self.worker.index, gone)
        await self.worker.drain()

    async def flush(self) -> None:
        if self.peer is not None:
            await self.peer.flush()

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()

    # ---- the ops (docs/architecture.md, "Supervisor ⇄ worker") --------------------------------
    async def init(self, req: Message) -> Message:
        hole = req.get("hole")
        self.worker.init(
            int(req.get("last_id", 0)),
            list(req.get("history") or []),
            {str(k): int(v) for k, v in (req.get("pruned") or {}).items()},
            (int(hole[0]), int(hole[1])) if hole else None,
            deliver=bool(req.get("deliver")),
        )
        # A reload's successor: messages up to this id are numbered and come as broadcasts once
        # the handoff is over (a long-poll from one of them waits for it, as after ``quiet``).
        hub = self.worker.hub
        hub.upcoming_id = max(hub.upcoming_id, int(req.get("upcoming") or 0))
        await self.worker.serve_queued()
        return {}

    async def limits(self, req: Message) -> Message:
        hole = req.get("hole")
        self.worker.hub.limit_resumes(
            {str(k): int(v) for k, v in (req.get("pruned") or {}).items()},
            (int(hole[0]), int(hole[1])) if hole else None,
        )
        return {}

    async def stats(self, req: Message) -> Message:
        return {"stats": self.worker.stats()}

    async def broadcast(self, req: Message) -> Message:
        msg = req.get("msg")
        if not isinstance(msg, dict) or "data" not in msg:
            raise ValueError("broadcast needs msg with data")
        t0 = time.perf_counter()
        n = await self.worker.broadcast(msg)
        return {"recipients": n, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def quiet(self, req: Message) -> Message:
        # A broadcast to everyone is on its way (in a later wave): no pings meanwhile, and a
        # long-poll from its id waits for it here instead of being told it is unknown.
        hub = self.worker.hub
        hub.restart_pings()
        hub.upcoming_id = max(hub.upcoming_id, int(req.get("upcoming") or 0))
        return {}

    async def channels(self, req: Message) -> Message:
        return {"channels": self.worker.channels()}

    async def handoff(self, req: Message) -> Message:
        path = req.get("to")
        if not isinstance(path, str) or not path:
            raise ValueError("handoff needs 'to', the successor's handoff socket")
        result = await self.worker.handoff(
            path, bool(req.get("listener", True)), bool(req.get("history", False))
        )
        # Its last counters, for the node's totals: this process is about to go.
        return {**result, "stats": self.worker.stats()}

    async def adopt_end(self, req: Message) -> Message:
        # The supervisor's handover is over: stop waiting for a giver that has not come.
        if self.worker.receiver is not None:
            self.worker.receiver.stop_waiting()
        return {}

    async def drain(self, req: Message) -> Message:
        grace = req.get("grace")
        await self.worker.drain(None if grace is None else float(grace))
        return {}


# -- process entry -----------------------------------------------------------------------------
async def serve(config: Config, index: int = 0, control_fd: int | None = None) -> None:
    loop = asyncio.get_running_loop()
    try:
        worker = Worker(config, loop, index)  # reads the token key files
        if config.tls_cert:
            worker.tls_class()  # the certificate and key, before it listens or adopts
    except ValueError as exc:  # a file changed since the supervisor checked it
        log.error("worker %d cannot start: %s", index, exc)
        sys.exit(EXIT_BAD_FILES)
    worker.titled = True
    try:
        await worker.start(
            os.environ.get("COMET_WORKER_ADOPT") or None,
            int(os.environ.get("COMET_WORKER_ADOPT_GIVERS") or 1),
            float(os.environ.get("COMET_WORKER_ADOPT_WAIT") or GIVER_TIMEOUT),
            serve=control_fd is None,  # supervised: accepted once init has brought the history
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        sys.exit(EXIT_CANNOT_LISTEN)

    def on_signal() -> None:
        loop.create_task(worker.drain())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if control_fd is not None:
        # SIGHUP is the supervisor's (reload): one sent to every process named comet-service
        # (`pkill -HUP -f comet-service`: the workers' titles match too) must not kill the
        # workers, and with them every connection, by its default action.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        control = ControlChannel(worker, control_fd)
        control_task = loop.create_task(control.run())
        await worker.stopped
        # Let the drain answer reach the supervisor before the process ends.
        await asyncio.sleep(0.05)
        await control.flush()
        control.close()
        control_task.cancel()
    else:
        print(
            f"comet worker listening on http://{config.host}:{worker.port}/ "
            f"(curl -N http://127.0.0.1:{worker.port}/)",
            flush=True,
        )
        await worker.stopped


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--control-fd", type=int, default=None)
    ns, rest = pre.parse_known_args(argv)
    if ns.control_fd is not None:
        raw = os.environ.get("COMET_WORKER_CONFIG")
        config = Config.from_json(raw) if raw else parse_args(rest)
        index = int(os.environ.get("COMET_WORKER_INDEX", "0"))
    else:
        config = parse_args(rest)
        index = 0
        if config.workers not in ("1", "auto"):
            print("note: standalone worker mode runs a single worker", file=sys.stderr)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format=f"%(asctime)s worker{index} %(levelname)s %(message)s",
    )
    set_title(worker_title(index, config.port, "starting"), worker_comm(index))
    raise_nofile_limit()
    uvloop.run(serve(config, index, ns.control_fd))
