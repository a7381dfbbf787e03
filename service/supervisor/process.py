"""The supervisor: sizes and starts the workers, keeps them alive, and speaks for them.

Theory of operation. Each worker is a ``python -m service.worker`` process with one end of a
socketpair; both sides speak JSON lines (docs/architecture.md, "Supervisor ⇄ worker"). A
``WorkerSlot`` owns one index for the supervisor's whole life; the process in it may change. When a
process dies (its pipe reaches EOF) the slot retires its counters into the frame builder and starts
a new process after a backoff that doubles on quick successive deaths. A new process first gets
``init`` with the bus's last id and history, so a client that lands on it can still resume.

Once a second the supervisor asks every live worker for ``stats`` (all at once, short timeout),
builds the FRAME, hands it to the control socket's watchers, the CSV log and the screen.
A broadcast gets its id and ``ts`` from the bus, goes to every live worker, and the answer sums
their recipients. SIGTERM/SIGINT sends ``drain`` to every worker and waits for them, at most the
grace period, then kills stragglers and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any, cast

from service.bus import Bus, BusUnavailable, Msg, make_bus
from service.bus.store import Store
from service.config import Config, raise_nofile_limit
from service.contracts import ErrorCode, Frame, WorkerStats, adopt_wait
from service.jsonlines import Pending
from service.proctitle import PREFIX, set_title, supervisor_title
from service.supervisor.control import ControlServer, RequestError
from service.supervisor.csvlog import CsvLog
from service.supervisor.frames import FrameBuilder, read_limits
from service.supervisor.plan import host_warnings, plan_line
from service.supervisor.portcheck import check_port
from service.supervisor.slot import (
    BROADCAST_TIMEOUT,
    HANDOFF_TIMEOUT,
    STATS_TIMEOUT,
    WorkerGone,
    WorkerProcess,
    WorkerSlot,
)
from service.supervisor.spawn import Spawner

log = logging.getLogger("comet.supervisor")

DELIVERED_KEEP = 4096  # recipients of recent bus deliveries, for publishers that answer late


def reserve_port(host: str) -> socket.socket:
    """For ``--port 0``: hold a free port in the workers' SO_REUSEPORT group for our lifetime."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


# ---- the supervisor ------------------------------------------------------------------------------
class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.worker_config = config
        self.title_args: list[str] | None = None  # run() sets it: ps shows these flags
        self._reloading = False
        # The running (or last) reload, shown in the frame: running, workers done of total,
        # connections handed so far, started (unix time), seconds, failed.
        self.reload_state: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.store: Store | None = None
        self.bus: Bus
        # A takeover opens the history only once the service it replaces stopped writing it.
        self.took_over: dict[str, Any] | None = None
        self.handed_over = False  # a handover gave everything to a new service
        self._first: list[WorkerProcess] = []
        if not config.take_over:
            self._open_history()
        self.frames = FrameBuilder(config.target_connections, config.node_id)
        self.slots: list[WorkerSlot] = []
        self.failed = False
        self.control = ControlServer(config.control_socket, self, config.limit_message_bytes)
        self.csv: CsvLog | None = None
        self.screen: Any = None
        self.stopping = False
        self.started = time.time()
        self._frame: Frame | None = None
        self._stop = asyncio.Event()
        self.broadcast_lock = asyncio.Lock()
        # Multi-node bus: message id → recipients here, for broadcast() waiting on its own message.
        self._delivered: dict[int, int] = {}
        self._awaiting: dict[int, asyncio.Future[int]] = {}
        # How many slots start a process at once. Each started its own interpreter that spent
        # ~0.2 s of CPU importing: 52 at once on 2 cores would all be slow and could pass the
        # ready timeout. Forked from one import (spawn.py), every slot starts at once (run()).
        self.start_gate = asyncio.Semaphore(2 * (os.cpu_count() or 1))
        self.spawner = Spawner(lambda: self.screen.worker_stderr if self.screen else None)
        self._port_sock: socket.socket | None = None
        self.nofile = 0
        self.fanout_parallel = (
            config.fanout_parallel if config.fanout_parallel > 0 else (os.cpu_count() or 1)
        )
        # Slots handing over at once in a reload or takeover: the handoffs compete with the
        # connections being held, not with a broadcast, so the best count can differ.
        self.handoff_parallel = (
            config.handoff_parallel if config.handoff_parallel > 0 else self.fanout_parallel
        )

    def _open_history(self) -> None:
        # One node keeps its history in its own store; a Redis bus keeps it in Redis.
        config = self.config
        self.store = (
            Store(config.state_path(), config.history_size, config.history_max_age)
            if config.bus == "local"
            else None
        )
        self.bus = make_bus(
            config.bus,
            config.history_size,
            config.history_max_age,
            config.node_id,
            config.node_ttl,
            self.store,
        )

    # ---- Backend for the control socket --------------------------------------------------------
    def latest_frame(self) -> Frame | None:
        return self._frame

    def health(self) -> dict[str, Any]:
        return {
            "workers": sum(1 for s in self.slots if s.state == "up"),
            "uptime_s": round(time.time() - self.started, 1),
            "port": self.worker_config.port,
            "pids": [s.pid for s in self.slots],
            "node_id": self.config.node_id,
            "store": self.store.status() if self.store is not None else None,
            **({"took_over": self.took_over} if self.took_over is not None else {}),
        }

    def _check_not_handed(self) -> None:
        """After a handover nothing here reaches a client: a broadcast must go to the new one."""
        if self.handed_over:
            raise RequestError(
                "this service handed its connections to a new one; send it again",
                ErrorCode.STOPPING,
            )

    async def broadcast(self, data: str, channel: str | None, event: str | None) -> dict[str, Any]:
        self._check_not_handed()
        if self.bus.delivers_own:
            # Multi-node: the bus hands every message, ours too, to _remote_message in id order;
            # wait for ours so the answer counts this node's recipients like a local broadcast.
            msg = await self.bus.publish(data, channel, event)
            return {"id": msg["id"], "recipients": await self._delivery(msg["id"])}
        if channel is not None or len(self.slots) <= self.fanout_parallel:
            # Few workers, no waves: number the message and write it to every worker's pipe
            # under the lock (so each worker reads ids in order, which SSE resume relies on),
            # then wait for the answers outside it, so broadcasts pipeline.
            async with self.broadcast_lock:
                self._check_not_handed()  # it may have waited for the lock through a handover
                msg = await self.bus.publish(data, channel, event)
                sent = await self._send_all(msg)
            recipients = await self._recipients(msg, sent)
            await self.bus.committed()  # on disk before its id is answered
            return {"id": msg["id"], "recipients": recipients}
        # One broadcast at a time, handed out in waves: a second broadcast waits for the first
        # to be written.
        async with self.broadcast_lock:
            self._check_not_handed()
            msg = await self.bus.publish(data, channel, event)
            recipients = await self._fan_out(msg)
        await self.bus.committed()
        return {"id": msg["id"], "recipients": recipients}

    async def _send_all(self, msg: Msg) -> list[tuple[WorkerSlot, Pending]]:
        """Write ``msg`` to every live worker's pipe, each under its slot's lock (free unless the
        slot is handing over in a reload: then to its new process, once it has)."""
        sent = []
        for slot in self.slots:
            if slot.usable:
                slot.announce(msg["id"])  # if a reload holds it: it reaches that worker after
                async with slot.lock:
                    if slot.usable:
                        with contextlib.suppress(WorkerGone):
                            sent.append((slot, slot.send_message(msg)))
        return sent

    async def _recipients(self, msg: Msg, sent: list[tuple[WorkerSlot, Pending]]) -> int:
        if len(sent) == 1:  # one worker: no gather (a task per worker) on the publish path
            slot, rid = sent[0]
            try:
                return int((await slot.reply(rid, BROADCAST_TIMEOUT)).get("recipients", 0))
            except (WorkerGone, TimeoutError, RuntimeError, ConnectionError) as exc:
                log.warning("worker %d: broadcast %d failed: %r", slot.index, msg["id"], exc)
                return 0
        answers = await asyncio.gather(
            *(slot.reply(rid, BROADCAST_TIMEOUT) for slot, rid in sent), return_exceptions=True
        )
        total = 0
        for (slot, _rid), ans in zip(sent, answers, strict=True):
            if isinstance(ans, BaseException):
                log.warning("worker %d: broadcast %d failed: %r", slot.index, msg["id"], ans)
                continue
            total += int(ans.get("recipients", 0))
        return total

    async def _delivery(self, msg_id: int) -> int:
        if msg_id in self._delivered:
            return self._delivered[msg_id]
        fut = self._awaiting.setdefault(msg_id, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(BROADCAST_TIMEOUT):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise BusUnavailable(
                f"message {msg_id} was published but not delivered on this node within "
                f"{BROADCAST_TIMEOUT:.0f} s"
            ) from None
        finally:
            self._awaiting.pop(msg_id, None)

    async def fan_out(self, msg: Msg) -> int:
        async with self.broadcast_lock:
            self.bus.delivered(msg)
            return await self._fan_out(msg)

    async def reload(self) -> dict[str, Any]:
        """Replace every worker, one slot at a time, by a new process that takes over its
        listener and live connections (``reload`` op, SIGHUP). One reload at a time."""
        if self.stopping:
            raise RequestError("the service is stopping", ErrorCode.STOPPING)
        if self._reloading:
            raise RequestError("a reload is under way already", ErrorCode.CONFLICT)
        # The new processes read the TLS and token files now on disk (a renewed certificate, a
        # rotated secret): files that would fail every one of them refuse the reload here, with
        # the reason, instead of failing each handoff with "the other side closed".
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.worker_config.validate_access
            )
        except ValueError as exc:
            raise RequestError(
                f"reload refused, every worker serves on as it is: {exc}", ErrorCode.CONFLICT
            ) from None
        if self._reloading:  # another reload started while the files were read
            raise RequestError("a reload is under way already", ErrorCode.CONFLICT)
        self._reloading = True
        t0 = time.monotonic()
        slots = list(self.slots)
        state = self.reload_state = {
            "running": True,
            "started": round(time.time(), 3),
            "workers": len(slots),
            "done": 0,
            "handed": 0,
            "failed": 0,
            "reconnecting": 0,
            "seconds": 0.0,
        }
        results: list[dict[str, Any]] = []
        try:
            run_dir = os.path.dirname(os.path.abspath(self.config.control_socket))
            # Every new process starts at once (imports take a while), then the slots hand over,
            # handoff_parallel at a time (a core's worth by default), each slot's lock held from
            # the start to the end of the reload: nothing is written to a worker while its
            # connections move; a message numbered meanwhile waits (its publisher too, none is
            # lost) and reaches the new processes after.
            wait = adopt_wait(len(slots), self.handoff_parallel)
            # Not every slot at once: all six on two cores made every old and new process wait
            # for the CPU (each handoff's loop stalled 70-140 ms, the frames' lag), for no gain
            # in total time. On a host saturated by something else, one more than the cores
            # takes a bigger share of the CPU for the handoffs (docs/benchmarks.md, runs N-P).
            gate = asyncio.Semaphore(self.handoff_parallel)

            async def one(
                slot: WorkerSlot, ready: Any, locked: asyncio.Future[Any]
            ) -> dict[str, Any]:
                await locked  # nothing is being written to it now, and nothing will be
                state["locked_s"] = round(time.monotonic() - t0, 3)  # the last slot's, at the end
                async with gate:
                    began = time.monotonic() - t0
                    result = ready if isinstance(ready, dict) else await slot.reload(*ready)
                    # When each slot held a place at the gate, from the reload's start.
                    result["began_s"] = round(began, 3)
                    result["ended_s"] = round(time.monotonic() - t0, 3)
                state["done"] += 1
                state["handed"] += int(result.get("handed", 0))
                state["failed"] += 1 if "error" in result else 0
                state["reconnecting"] += int(result.get("reconnecting", 0))
                state["seconds"] = round(time.monotonic() - t0, 3)
                return result

            # The slots' locks are asked for now, while the new processes start. Not the
            # broadcast lock: a broadcast under way in waves (~2 s at 100,000 on two cores)
            # holds only the lock of the slot it is writing to, so only that slot's handoff
            # waits, for that one write, and the broadcast's later waves reach the new
            # processes once the reload is over.
            locking = [asyncio.ensure_future(slot.lock.acquire()) for slot in slots]
            try:
                prepared = await asyncio.gather(
                    *(slot.prepare_reload(run_dir, wait) for slot in slots)
                )
                state["prepare_s"] = round(time.monotonic() - t0, 3)
                results = list(
                    await asyncio.gather(
                        *(one(s, r, t) for s, r, t in zip(slots, prepared, locking, strict=True))
                    )
                )
            finally:
                for slot, took in zip(slots, locking, strict=True):
                    if took.done() and not took.cancelled() and took.exception() is None:
                        slot.lock.release()
                    else:  # failed or cancelled before the lock was ours
                        took.cancel()
        finally:
            self._reloading = False
            state["running"] = False
        failed = [r for r in results if "error" in r]
        skipped = [r for r in results if "skipped" in r]
        summary = {
            "workers": len(results),
            "reloaded": sum(1 for r in results if "handed" in r),
            # Slots not up when their turn came (restarting after a crash, or draining: the
            # service began to stop meanwhile): their processes were not replaced.
            "skipped": len(skipped),
            "handed": state["handed"],
            "kept": sum(int(r.get("kept", 0)) for r in results),
            "failed": state["failed"],
            # Taken by a new process before its slot's handoff failed: told to reconnect.
            "reconnecting": state["reconnecting"],
            "seconds": round(time.monotonic() - t0, 3),
            "prepare_s": state.get("prepare_s"),
            "locked_s": state.get("locked_s"),
            "handoff_s_max": max((float(r.get("seconds", 0)) for r in results), default=0.0),
            "slots": results,
        }
        brief = {k: v for k, v in summary.items() if k != "slots"}
        if failed:
            log.error("reload: %s", brief)
        elif skipped:
            log.warning(
                "reload: %d of %d workers not replaced (%s): %s",
                len(skipped),
                len(results),
                "the service is stopping" if self.stopping else skipped[0]["skipped"],
                brief,
            )
        else:
            log.info("reload: %s", brief)
        return summary

    async def handover(self, to: list[str], listeners: int) -> dict[str, Any]:
        """A new service (``--take-over``) asks for everything: worker ``i`` hands its history,
        listener (``i < listeners``; else it closes it) and connections to the new worker
        waiting at ``to[i]``, all under one hold of the broadcast lock. When every worker
        handed everything, this supervisor stops (exit 0); otherwise it serves on what it kept
        and the answer says where it failed."""
        if self.stopping:
            raise RequestError("the service is stopping", ErrorCode.STOPPING)
        if self._reloading:
            raise RequestError("a reload or handover is under way already", ErrorCode.CONFLICT)
        slots = list(self.slots)
        if len(to) != len(slots):
            raise RequestError(f"handover: 'to' names {len(to)} paths for {len(slots)} workers")
        self._reloading = True
        t0 = time.monotonic()
        log.info("handover: a new service asks for %d workers' connections", len(slots))
        gate = asyncio.Semaphore(self.handoff_parallel)  # as in reload

        async def one(i: int, slot: WorkerSlot, path: str) -> dict[str, Any]:
            async with gate:
                return await slot.give_away(path, i < listeners)

        try:
            async with self.broadcast_lock:
                await self.bus.committed()  # everything numbered is in the store it will open
                results = list(
                    await asyncio.gather(
                        *(one(i, s, p) for i, (s, p) in enumerate(zip(slots, to, strict=True)))
                    )
                )
                # Before the lock is let go: a broadcast waiting for it must not be numbered
                # here (the new service has the clients and will open the store).
                self.handed_over = not any("error" in r for r in results)
        finally:
            self._reloading = False
        failed = [r for r in results if "error" in r]
        summary = {
            "workers": len(results),
            "handed": sum(int(r.get("handed", 0)) for r in results),
            "kept": sum(int(r.get("kept", 0)) for r in results),
            "failed": len(failed),
            "seconds": round(time.monotonic() - t0, 3),
            "pid": os.getpid(),
            "slots": results,
        }
        brief = {k: v for k, v in summary.items() if k != "slots"}
        if failed:
            log.error(
                "handover failed for %d workers, serving on what they kept: %s", len(failed), brief
            )
        else:
            log.info("handover done, stopping: %s", brief)
            # After this answer has left: the control socket's close waits for it.
            asyncio.get_running_loop().call_later(0.1, self.request_stop, "handover")
        return summary

    def request_reload(self) -> None:
        """SIGHUP: reload, answered in the log."""
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except RequestError as exc:
            log.warning("SIGHUP: %s", exc)

    async def cluster(self) -> dict[str, Any]:
        return await self.bus.cluster(self._frame)

    async def _fan_out(self, msg: Msg) -> int:
        """Hand a numbered message to every live worker; the sum of their recipients."""
        slots = [s for s in self.slots if s.usable]
        # At most one worker per core writes at a time: 52 workers fanning out at once on 2
        # cores would all be runnable together and each loop would stall for the others'
        # time slices; in waves the total work is the same but every busy loop keeps its core.
        wave = asyncio.Semaphore(self.fanout_parallel)
        if msg.get("channel") is None and len(slots) > self.fanout_parallel:
            # Workers in later waves would go on pinging streams that are about to get the
            # message (at 1M, ~half a million pings during one broadcast): quiet them all first.
            await asyncio.gather(
                *(s.request({"op": "quiet", "upcoming": msg["id"]}, 10.0) for s in slots),
                return_exceptions=True,
            )

        async def one(slot: WorkerSlot) -> dict[str, Any]:
            slot.announce(msg["id"])  # if a reload holds it: it reaches that worker after
            # The wave's place first, then the slot: a slot's lock is held only while its
            # worker writes (a reload waits for that one write, not for the whole broadcast).
            async with wave, slot.lock:
                if not slot.usable:  # it died while this waited
                    raise WorkerGone("not running")
                return await slot.reply(slot.send_message(msg), BROADCAST_TIMEOUT)

        answers = await asyncio.gather(*(one(s) for s in slots), return_exceptions=True)
        total = 0
        for slot, ans in zip(slots, answers, strict=True):
            if isinstance(ans, BaseException):
                log.warning("worker %d: broadcast %d failed: %r", slot.index, msg["id"], ans)
                continue
            total += int(ans.get("recipients", 0))
        return total

    async def channels(self) -> dict[str, int]:
        slots = [s for s in self.slots if s.usable]
        answers = await asyncio.gather(
            *(s.request({"op": "channels"}, 10.0) for s in slots), return_exceptions=True
        )
        merged: dict[str, int] = {}
        for ans in answers:
            if isinstance(ans, BaseException):
                continue
            for name, n in (ans.get("channels") or {}).items():
                merged[name] = merged.get(name, 0) + int(n)
        return merged

    # ---- lifecycle ------------------------------------------------------------------------------
    async def sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    def fail(self, reason: str) -> None:
        """Stop the service because it cannot work; ``run`` then returns 1."""
        log.error("%s: stopping", reason)
        self.failed = True
        self.request_stop("error")

    def request_stop(self, signame: str = "") -> None:
        if not self.stopping:
            log.info(
                "%s: draining %d workers (grace %.0f s)",
                signame or "stop",
                len(self.slots),
                self.config.grace,
            )
            self.stopping = True
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

        self.nofile = raise_nofile_limit()
        count = self.config.worker_count(self.nofile)
        log.info("plan: %s", plan_line(self.config, self.nofile, count))
        for warning in host_warnings(self.config, count, read_limits()):
            log.warning("host limit: %s", warning)
        if self.spawner.forking():
            self.start_gate = asyncio.Semaphore(max(1, count))

        predecessor = await self._predecessor() if self.config.take_over else None
        if predecessor is None:
            if self.config.take_over:
                log.info(
                    "--take-over: no service answers at %s; starting on my own",
                    self.config.control_socket,
                )
                self._open_history()
            check_port(self.config.host, self.config.port, self.config.allow_shared_port)
            if self.config.port == 0:
                self._port_sock = reserve_port(self.config.host)
                port = self._port_sock.getsockname()[1]
                self.worker_config = Config.from_json(self.config.to_json())
                self.worker_config.port = port
                log.info("--port 0: workers listen on port %d", port)
        elif not await self._take_over(predecessor, count):
            return 1

        if self.title_args is not None:
            set_title(supervisor_title(self.worker_config.port, count, self.title_args), PREFIX)
        await self.bus.start(self._remote_message, self._reseed_workers, self._limit_workers)
        await self.control.start(replace=predecessor is not None)
        try:
            self.csv = CsvLog(
                self.config.log_dir, self.config.log_max_bytes, self.config.log_backups
            )
            log.info("CSV log %s", self.csv.path)
        except OSError as exc:
            # The service matters more than its log: run on, and say why there is no CSV.
            log.error("CSV log disabled: cannot write in %s: %s", self.config.log_dir, exc)
        if self.screen is None:
            self.screen = _make_screen(self.config)

        if self._first:
            # A takeover's processes, serving already: the slots go on with them.
            for slot, p in zip(self.slots, self._first, strict=True):
                slot.start(p)
            self._first = []
        elif not self._stop.is_set():
            # A signal during start-up (the awaits above) has set _stop: spawn nothing then.
            self.slots = [WorkerSlot(self, i) for i in range(count)]
            for slot in self.slots:
                slot.start()

        ticker = asyncio.create_task(self._tick_forever())
        try:
            await self._stop.wait()
        finally:
            ticker.cancel()
            with contextlib.suppress(BaseException):
                await ticker
            await self._shutdown()
        return 1 if self.failed else 0

    async def _ask_predecessor(self, req: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """One request to the supervisor at our control socket path; None if none answers."""
        try:
            async with asyncio.timeout(2.0):
                reader, writer = await asyncio.open_unix_connection(
                    self.config.control_socket, limit=1 << 24
                )
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(timeout):
                line = await reader.readline()
            answer = json.loads(line) if line else None
        except (OSError, TimeoutError, ValueError) as exc:
            log.error("takeover: %s to %s: %s", req.get("op"), self.config.control_socket, exc)
            return None
        finally:
            writer.close()
        return answer if isinstance(answer, dict) else None

    async def _predecessor(self) -> dict[str, Any] | None:
        answer = await self._ask_predecessor({"op": "health"}, 5.0)
        return answer if answer is not None and answer.get("ok") else None

    async def _take_over(self, old: dict[str, Any], count: int) -> bool:
        """Start ``count`` workers that adopt the running service's listener, history and
        connections (old worker i gives to new worker i % count), ask it to hand over, then
        open the history it stopped writing. False: nothing was taken, nothing is left running."""
        m = len(old.get("pids") or [])
        if m == 0:
            log.error("takeover: the service at %s has no workers", self.config.control_socket)
            return False
        port = old.get("port")
        if isinstance(port, int) and self.config.port not in (0, port):
            # The listener comes with the connections: the workers would serve the old port
            # while every later listen (a worker's restart) used the new one.
            log.error(
                "takeover refused: the service at %s serves port %d and this one is set to "
                "--port %d; a takeover keeps the port. Start this one with --port %d, or stop "
                "the running one first to move (its clients reconnect)",
                self.config.control_socket,
                port,
                self.config.port,
                port,
            )
            return False
        if not await self._takeover_fits(m, count):
            return False
        t0 = time.monotonic()
        log.info(
            "takeover: the service at %s (%d workers, port %s) is running; starting %d workers "
            "to take over its connections",
            self.config.control_socket,
            m,
            old.get("port"),
            count,
        )
        self.screen = _make_screen(self.config)  # the workers' stderr goes beside it
        run_dir = os.path.dirname(os.path.abspath(self.config.control_socket))
        givers = [len(range(j, m, count)) for j in range(count)]
        paths = [
            os.path.join(run_dir, f"takeover-{os.getpid()}-{j}.sock") if givers[j] else None
            for j in range(count)
        ]
        self.slots = [WorkerSlot(self, j) for j in range(count)]
        # The predecessor hands over handoff_parallel workers at a time (its own, taken to be
        # ours): the last round comes long after the first.
        wait = adopt_wait(m, self.handoff_parallel)
        started = await asyncio.gather(
            *(s.start_for_takeover(paths[j], givers[j], wait) for j, s in enumerate(self.slots))
        )
        ready = [p for p in started if p is not None]
        if len(ready) < count:
            log.error(
                "takeover: %d of %d new workers did not start; the running service is left as "
                "it is",
                count - len(ready),
                count,
            )
            for slot, p in zip(self.slots, started, strict=True):
                if p is not None:
                    await slot.discard(p, paths[slot.index])
            return False
        to = [cast(str, paths[i % count]) for i in range(m)]
        answer = await self._ask_predecessor(
            {"op": "handover", "to": to, "listeners": min(m, count)},
            max(HANDOFF_TIMEOUT, wait) + 30,
        )
        # Over, whatever the answer: a worker whose giver has not come by now stops waiting for
        # it and listens by itself (one that adopted already is not affected).
        for p in ready:
            p.peer.call_nowait({"op": "adopt_end"})
        if answer is not None and not answer.get("ok"):
            log.error("takeover refused by the running service: %s", answer.get("error"))
            for slot, p in zip(self.slots, ready, strict=True):
                await slot.discard(p, paths[slot.index])
            return False
        if answer is None:
            # It may have handed some: keep what came; the workers listen by themselves.
            log.error("takeover: no answer to handover; serving what was handed, if anything")
            answer = {}
        self.took_over = {
            "from_pid": answer.get("pid"),
            "workers": m,
            "handed": answer.get("handed"),
            "kept": answer.get("kept"),
            "failed": answer.get("failed"),
            "seconds": round(time.monotonic() - t0, 3),
        }
        (log.error if answer.get("failed") else log.info)("takeover: %s", self.took_over)
        self._open_history()
        self._first = ready
        return True

    async def _takeover_fits(self, m: int, count: int) -> bool:
        """Whether ``count`` workers here can hold what the ``m`` running ones hold (old worker
        ``i`` gives to new worker ``i % count``), each within its open-files limit less the
        descriptors it keeps for itself. Too many to a worker would fail its handoff mid-way
        (MSG_CTRUNC) and leave both services serving part of the clients: refused up front,
        saying how many workers would do. Without the running one's counts, not judged."""
        answer = await self._ask_predecessor({"op": "stats"}, 5.0)
        rows = ((answer or {}).get("frame") or {}).get("workers") or []
        held = [int(w.get("conns", 0) or 0) for w in rows if isinstance(w, dict)]
        if len(held) != m:
            return True
        room = self.config.fd_room(self.nofile)

        def worst(n: int) -> int:
            return max(sum(held[i] for i in range(j, m, n)) for j in range(n))

        most = worst(count)
        if most <= room:
            return True
        enough = next((n for n in range(count + 1, m + 1) if worst(n) <= room), None)
        log.error(
            "takeover refused: the service at %s holds %d connections on %d workers; with %d "
            "workers here one would take %d, more than the %d it can hold (RLIMIT_NOFILE %d less "
            "--fd-reserve %d). %s",
            self.config.control_socket,
            sum(held),
            m,
            count,
            most,
            room,
            self.nofile,
            self.config.fd_reserve,
            f"Start this one with --workers {enough} or more, or a higher open-files limit"
            if enough is not None
            else "Start this one with a higher open-files limit",
        )
        return False

    async def _reseed_workers(self) -> None:
        """The bus found its history only after the workers started (Redis was down then):
        hand it to them again, before the bus delivers its first message."""
        async with self.broadcast_lock:
            slots = [s for s in self.slots if s.usable]
            init = {
                "op": "init",
                "last_id": self.bus.last_id,
                "history": self.bus.history(),
                **self.bus.resume_limits(),
            }
            answers = await asyncio.gather(
                *(s.request_in_order(init, 30.0) for s in slots), return_exceptions=True
            )
            for s, answer in zip(slots, answers, strict=True):
                if not isinstance(answer, BaseException):
                    s.seen_id = self.bus.last_id
        failed = sum(1 for a in answers if isinstance(a, BaseException))
        log.info(
            "bus history (last id %d) sent to %d running workers%s",
            self.bus.last_id,
            len(slots) - failed,
            f", {failed} failed" if failed else "",
        )

    async def _limit_workers(self) -> None:
        """The bus learnt of ids it cannot honour any more (Redis lost its data, messages left
        its feed unread): tell every running worker, before the next message is delivered."""
        limits = {"op": "limits", **self.bus.resume_limits()}
        async with self.broadcast_lock:
            slots = [s for s in self.slots if s.usable]
            answers = await asyncio.gather(
                *(s.request_in_order(limits, 10.0) for s in slots), return_exceptions=True
            )
        failed = sum(1 for a in answers if isinstance(a, BaseException))
        if failed:
            log.warning("resume limits not taken by %d of %d workers", failed, len(slots))

    async def _remote_message(self, msg: Msg) -> None:
        """A message from the multi-node bus (any node's, ours too): deliver it here."""
        recipients = await self.fan_out(msg)
        self._delivered[msg["id"]] = recipients
        if len(self._delivered) > DELIVERED_KEEP:
            del self._delivered[next(iter(self._delivered))]
        fut = self._awaiting.get(msg["id"])
        if fut is not None and not fut.done():
            fut.set_result(recipients)

    async def _shutdown(self) -> None:
        grace = self.config.grace
        deadline = time.monotonic() + grace
        # Workers get a little less than the grace so the supervisor can still reap and exit
        # inside it.
        worker_grace = max(0.5, grace - 1.5)
        await asyncio.gather(*(s.drain(worker_grace) for s in self.slots))
        left = max(0.1, deadline - time.monotonic())
        waiting = [asyncio.create_task(s.wait_exited()) for s in self.slots]
        if waiting:
            _done, pending = await asyncio.wait(waiting, timeout=left)
            for t in pending:
                t.cancel()
        for s in self.slots:
            if s.proc is not None and s.proc.poll() is None:
                log.warning(
                    "worker %d (pid %d) did not drain in time; killing", s.index, s.proc.pid
                )
                s.proc.kill()
        await self.control.close()
        await self.bus.close()
        if self.screen is not None:
            self.screen.close()
        if self.csv is not None:
            self.csv.close()
        if self._port_sock is not None:
            self._port_sock.close()
        log.info("stopped")

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + 1.0
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += 1.0
            if next_at < loop.time():  # fell behind (suspended, overloaded): don't burst
                next_at = loop.time() + 1.0
            try:
                await self._tick()
            except Exception:
                log.exception("frame failed")

    async def _tick(self) -> None:
        slots = [s for s in self.slots if s.usable]
        answers = await asyncio.gather(
            *(s.request({"op": "stats"}, STATS_TIMEOUT) for s in slots), return_exceptions=True
        )
        for slot, ans in zip(slots, answers, strict=True):
            if isinstance(ans, BaseException):
                log.debug("worker %d: stats missed (%r)", slot.index, ans)
                continue
            stats = ans.get("stats")
            if isinstance(stats, dict):
                slot.stats = cast(WorkerStats, stats)  # WSTATS, from our own worker
        if self.store is not None:
            self.store.prune()
        frame = self.frames.build([s.view() for s in self.slots], self.bus.status())
        if self.store is not None:
            frame["store"] = self.store.status()
        if self.reload_state is not None:
            frame["reload"] = dict(self.reload_state)
        self._frame = frame
        self.control.publish_frame(frame)
        await self.bus.publish_frame(frame)
        if self.csv is not None:
            try:
                self.csv.write(frame)
            except OSError as exc:
                log.error("CSV log disabled: %s", exc)
                self.csv = None
        if self.screen is not None:
            self.screen.update(frame)


def _make_screen(config: Config) -> Any:
    from service.supervisor.screen import make_screen

    return make_screen(config.screen, config.log_dir)


def run(config: Config, args: list[str] | None = None) -> int:
    """Run the supervisor until SIGTERM/SIGINT; the exit code. ``args``: the command line it
    was given (service/__main__.py), shown in its process title."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        runner = asyncio.run
    sup = Supervisor(config)
    sup.title_args = list(args or ())
    try:
        return int(runner(sup.run()))
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
