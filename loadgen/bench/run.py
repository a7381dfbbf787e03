"""One bench run: its phases (set-up, ramp, hold, broadcasts, ramp-down) as methods of a
:class:`BenchRun` that carries their state, and :func:`run_bench`, which runs them as a task a
signal can cancel and always stops what they started."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loadgen.bench import autogroup
from loadgen.bench.netns import NetnsLab
from loadgen.bench.options import BRIDGE_ADDRESS, BenchError, Options
from loadgen.bench.preflight import meminfo_kb, preflight, print_preflight, verdict
from loadgen.bench.record import (
    STALL_S,
    Record,
    hold_cpu,
    host_busy_pct,
    process_cpu,
    ramp_diagnosis,
    tcp_counters,
)
from loadgen.bench.report import cpu_model, write_outputs
from loadgen.bench.service import (
    Service,
    listening_pids,
    publish,
    start_service,
    tree_cpu,
    tree_pids,
    tree_rss,
    wait_workers_up,
    watch_frames,
)
from loadgen.engine.config import EngineConfig
from loadgen.engine.pool import ProcessPool
from loadgen.engine.sources import Namespace, auto_procs, parse_source_ips
from loadgen.engine.stats import Stats
from service.supervisor.frames import read_sockstat


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived; everything started has been stopped."""


class BenchRun:
    """One run's state, carried from phase to phase; :meth:`close` stops whatever was started.

    The phases run as their own task and :meth:`close` runs outside it (see :func:`run_bench`),
    so stopping everything never depends on a cancellation arriving inside the phases (Python
    3.11's ``asyncio.wait_for`` swallowed one when its inner call completed in the same loop turn;
    the project's lint now bans it for ``asyncio.timeout``, but a stop should not rest on that).
    """

    def __init__(self, opts: Options, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.out = Path(opts.out)
        self.record = Record()
        self.report: dict[str, Any] = {}
        self.svc: Service | None = None
        self.pool: ProcessPool | None = None
        self.config = EngineConfig()
        self.watcher: asyncio.Task[None] | None = None
        self.lab: NetnsLab | None = None
        # --client-autogroup-nice: the session's nice value before it, set back by close().
        self.autogroup_nice0: int | None = None
        self.run_dir = tempfile.mkdtemp(prefix="comet-bench-")
        # Baselines taken before the first client connects.
        self.t0 = time.time()
        self.slab0 = 0
        self.rss0 = 0
        self.client_rss0 = 0

    # ---- the phases ---------------------------------------------------------------------------
    async def phases(self) -> None:
        await self.setup()
        await self.ramp()
        await self.hold()
        await self.broadcasts()
        assert self.pool is not None
        st = await self.pool.stats()
        if self.opts.ramp_down:
            await self.ramp_down()
        self.report["errors"] = {
            "errors_req": st.errors_req,
            "errors_resp": st.errors_resp,
            "ended_req": st.ended_req,
        }
        self.report["latency_ms"] = st.latency_summary()
        self.report["msgs_total"] = st.msgs_total
        self.report["worst_loop_lag_ms"] = self.record.worst_lag_ms
        if self.record.frames:
            self.report["server_workers"] = len(self.record.frames[-1].get("workers") or [])

    async def setup(self) -> None:
        """Preflight, the service (or the target's listeners), the engine processes, baselines."""
        opts, report = self.opts, self.report
        self.out.mkdir(parents=True, exist_ok=True)
        if opts.client_autogroup_nice is not None:
            # The session's: every engine started later is in it (bench.autogroup). First, so
            # a value this process may not set stops the run before anything is started.
            self.autogroup_nice0 = autogroup.read_nice()
            autogroup.set_nice(opts.client_autogroup_nice)
        report["client_autogroup_nice"] = opts.client_autogroup_nice
        where = opts.where()
        namespaces: list[Namespace] = []
        if opts.netns:
            # Clients on "other machines": each engine in a namespace of its own, the service
            # (or a --target on the host) on the bridge's address (loadgen.bench.netns).
            self.lab = NetnsLab(opts.netns, opts.conns, service=opts.service_netns)
            namespaces = self.lab.create()
            where = dataclasses.replace(where, host=BRIDGE_ADDRESS)
            sources = [a for ns in namespaces for a in ns.addresses]
            report["netns"] = self.lab.describe()
        else:
            sources = parse_source_ips(opts.source_ips, where.host)
        checks = preflight(
            opts.conns,
            len(sources),
            remote=False,
            concurrency=opts.concurrency,
            port=where.port or opts.port,
            host_sockets=opts.host_sockets(),
        )
        report.update(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "conns": opts.conns,
                "rate": opts.rate,
                "hold_s": opts.hold,
                "broadcasts_asked": opts.broadcasts,
                "target": opts.target or "comet1m service (python -m service)",
                "machine": {
                    "cpu_model": cpu_model(),
                    "cpus": os.cpu_count(),
                    "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
                },
                "preflight": [c.__dict__ for c in checks],
                "preflight_verdict": verdict(checks),
            }
        )
        print_preflight(self.console, checks)
        port = where.port
        if opts.target:
            # On this host: loopback, or the bridge's address with --netns (Options.problem).
            local = where.host in ("127.0.0.1", "localhost", "::1") or bool(opts.netns)
            svc = self.svc = Service(None, port, None, None, listening_pids(port) if local else [])
        else:
            svc = self.svc = await start_service(
                opts, self.out, self.run_dir, where.host, self.lab.service if self.lab else None
            )
            report["service_pid"] = svc.proc.pid if svc.proc else None
            port = svc.port
            assert svc.socket_path is not None
            self.watcher = asyncio.create_task(watch_frames(svc.socket_path, self.record))
        if svc.socket_path is not None:
            # The baseline must include every worker's start-up RSS: at 54 workers the
            # service answers health while most are still importing, and a baseline taken
            # then put ~0.8 KB of interpreter start-up into every connection's share.
            await wait_workers_up(svc.socket_path, svc.workers)
        await asyncio.sleep(1.0)  # a baseline after start-up settles
        self.slab0, self.rss0 = meminfo_kb("Slab"), tree_rss(svc.pids)
        self.config = EngineConfig(
            0,
            where.host,
            port,
            where.path,
            opts.concurrency,
            tls=where.tls,
            tls_ca=opts.tls_ca or "",
            coalesce=opts.client_coalesce_ms / 1000.0,
        )
        report["tls"] = where.tls
        report["client_coalesce_ms"] = opts.client_coalesce_ms
        pool = self.pool = ProcessPool(
            self.config,
            sources,
            None if opts.procs == "auto" else int(opts.procs),
            namespaces=namespaces,
        )
        # With --netns, an engine in every namespace at least.
        await pool.grow(pool.fixed or max(auto_procs(opts.conns, pool.capacity), len(namespaces)))
        if opts.client_nice:
            # On one box the load generator stands in for remote machines: give the service
            # the CPU first so its loop lag is not the clients' doing.
            for child in pool.children:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(child.proc.pid).nice(opts.client_nice)
        report["client_nice"] = opts.client_nice
        # --client-sched batch: the clients' wake-ups do not preempt the server, as those of
        # clients on other machines never do. A broadcast to 100,000 on 6 workers took 0.82x
        # the time with it; at a million it changed neither the ramp nor the broadcasts and
        # raised the workers' loop lag, so the kernel's default stays the default
        # (docs/benchmarks.md, "The clients' scheduling at a million").
        policy = os.SCHED_BATCH if opts.client_sched == "batch" else os.SCHED_OTHER
        for child in pool.children:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(child.proc.pid, policy, os.sched_param(0))
        report["client_sched"] = opts.client_sched
        await pool.apply(self.config)
        self.client_rss0 = tree_rss(self.client_pids())
        report["client_procs"] = pool.procs

    async def ramp(self) -> None:
        """Raise the clients to ``--conns`` at ``--rate`` a second (bounded in time)."""
        opts, pool = self.opts, self.pool
        assert pool is not None
        self.t0 = time.time()
        start = time.monotonic()
        best, best_at = 0, start
        reached_at: float | None = None
        ended = "reached"
        # A ramp may take twice its nominal time (+60 s, or --ramp-timeout) and stall STALL_S
        # at most before we give up.
        deadline = start + (opts.ramp_timeout or opts.conns / opts.rate * 2 + 60)
        tcp0 = tcp_counters(self.netstat_path())
        # The host's CPU a second apart over the last stall window: how busy it was at the end.
        cpu_seen: collections.deque[tuple[float, Any]] = collections.deque(maxlen=STALL_S + 1)
        progress = Progress(
            TextColumn("ramp"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not opts.progress,
            transient=False,
        )
        last_sample = 0.0
        with progress:
            task = progress.add_task("ramp", total=opts.conns, info="")
            while True:
                now = time.monotonic()
                target = min(opts.conns, int(opts.rate * (now - start)) + 1)
                if target != pool.config.n:
                    await pool.set_config(dataclasses.replace(self.config, n=target))
                st = await pool.stats()
                if st.clients > best:
                    best, best_at = st.clients, now
                progress.update(
                    task,
                    completed=st.clients,
                    info=f"inproc {st.inproc:,} err {st.errors_req + st.errors_resp:,} "
                    f"ended {st.ended_req:,}",
                )
                if now - last_sample >= 1.0:
                    self.sample("ramp", target, st)
                    last_sample = now
                    cpu_seen.append((now, psutil.cpu_times()))
                    self.check_memory()
                if st.clients >= opts.conns:
                    reached_at = now
                    break
                if target == opts.conns and now - best_at > STALL_S:
                    ended = "stalled"
                    break
                if now > deadline:
                    ended = "time limit"
                    break
                await asyncio.sleep(0.2)
        self.record.timeline[-1:] = []  # replaced by the final sample below
        self.sample("ramp", opts.conns, st)
        self.report.update(
            {
                "t0": self.t0,
                "ramp_s": round((reached_at or time.monotonic()) - start, 2),
                "ramp_complete": reached_at is not None,
                "reached": best,
            }
        )
        busy = None
        if cpu_seen:
            t_first, cpu_first = cpu_seen[0]
            busy = host_busy_pct(cpu_first, psutil.cpu_times(), time.monotonic() - t_first)
        self.report["ramp_diagnosis"] = ramp_diagnosis(
            ended,
            tcp0,
            tcp_counters(self.netstat_path()),
            busy,
            self.record.backlog("ramp")["tcp_mem_pages_max"],
        )

    def netstat_path(self) -> str:
        """The TCP counters of the service's network namespace (with --service-netns not the
        host's; through its pid, which also names the host's own otherwise)."""
        if self.svc is not None and self.svc.proc is not None:
            return f"/proc/{self.svc.proc.pid}/net/netstat"
        return "/proc/net/netstat"

    async def hold(self) -> None:
        """Hold ``--hold`` seconds, then measure memory per connection and idle CPU."""
        opts, pool, svc, report = self.opts, self.pool, self.svc, self.report
        assert pool is not None and svc is not None
        end = time.monotonic() + opts.hold
        hold_t0 = time.time()
        client_cpu0 = tree_cpu(self.client_pids())
        # Another server on this host (--target) sends no frames: read its processes' CPU.
        server_pids = list(tree_pids(svc.pids)) if svc.socket_path is None else []
        server_cpu0 = tree_cpu(server_pids)
        host_cpu0 = psutil.cpu_times()
        procs0 = process_cpu()
        while True:
            st = await pool.stats()
            self.sample("hold", opts.conns, st)
            self.check_memory()
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        report["hold_cpu"] = hold_cpu(
            self.record,
            hold_t0,
            host_cpu0,
            tree_cpu(self.client_pids()) - client_cpu0,
            procs0,
            tree_pids([*svc.pids, *self.client_pids()]),
            tree_cpu(server_pids) - server_cpu0 if server_pids else None,
        )
        report["hold_backlog"] = self.record.backlog("hold")
        held = max(1, st.clients)
        rss = tree_rss(svc.pids)
        slab = meminfo_kb("Slab")
        report["held"] = st.clients
        report["server_rss_mb"] = round(rss / 2**20, 1)
        report["server_rss_per_conn_bytes"] = round((rss - self.rss0) / held) if svc.pids else None
        report["kernel_slab_delta_mb"] = round((slab - self.slab0) / 1024, 1)
        # Slab grows for both ends of every loopback connection: this is per connection *pair*.
        report["kernel_bytes_per_conn"] = round((slab - self.slab0) * 1024 / held)
        client_rss = tree_rss(self.client_pids())
        report["client_rss_mb"] = round(client_rss / 2**20, 1)
        report["client_rss_per_conn_bytes"] = round((client_rss - self.client_rss0) / held)

    async def broadcasts(self) -> None:
        """``--broadcasts`` timed broadcasts, each waited for until every client has it."""
        opts, pool, svc = self.opts, self.pool, self.svc
        assert pool is not None and svc is not None
        for seq in range(1, opts.broadcasts + 1):
            before = await pool.stats()
            expect = before.clients
            client_pids = self.client_pids()
            client_cpu0 = tree_cpu(client_pids)
            ts = time.time()
            data = json.dumps({"ts": ts, "seq": seq, "bench": "comet1m"})
            recipients = await publish(opts, svc, data)
            answered = time.time()
            deadline = time.monotonic() + opts.broadcast_timeout
            st = before
            while time.monotonic() < deadline:
                st = await pool.stats()
                if st.deliveries.get(seq, 0) >= expect:
                    break
                await asyncio.sleep(0.05)
            # The load generator's CPU over the fan-out: on one box it shares the cores with the
            # service, so what it spends a message is time the broadcast does not get.
            client_cpu = tree_cpu(client_pids) - client_cpu0
            delivered = st.deliveries.get(seq, 0)
            last = st.last_delivery.get(seq)
            first = st.first_delivery.get(seq)
            # The frames covering the fan-out arrive once a second: wait for the one after it.
            await asyncio.sleep(1.2)
            self.record.broadcasts.append(
                self.record.broadcast_row(
                    seq,
                    ts,
                    recipients=recipients,
                    expected=expect,
                    delivered=delivered,
                    first=first,
                    last=last,
                    answered_ms=(answered - ts) * 1000,
                    client_cpu_s=client_cpu,
                )
            )
            self.sample("broadcast", opts.conns, st)
            self.check_memory()
            await asyncio.sleep(opts.broadcast_gap)

    async def ramp_down(self) -> None:
        """Close every client connection and time until the service holds none (bounded:
        120 s)."""
        pool = self.pool
        assert pool is not None
        start = time.monotonic()
        await pool.set_config(dataclasses.replace(pool.config, n=0))
        deadline = start + 120
        done_at: float | None = None
        while time.monotonic() < deadline:
            st = await pool.stats()
            server = self.sample("ramp-down", 0, st)["server_conns"]
            # The frame is up to a second old: count the service as empty on a frame taken
            # after the clients reached 0.
            if st.clients == 0 and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and server == 0 and time.monotonic() - done_at > 1.1:
                break
            await asyncio.sleep(0.5)
        self.report["ramp_down_s"] = round((done_at or time.monotonic()) - start, 2)
        self.report["ramp_down_server_conns_left"] = self.record.timeline[-1]["server_conns"]

    # ---- what every phase does ----------------------------------------------------------------
    def client_pids(self) -> list[int]:
        return [c.proc.pid for c in self.pool.children] if self.pool is not None else []

    def sample(self, phase: str, target: int, st: Stats) -> dict[str, Any]:
        """One timeline row: the clients' counts, the service's latest frame, memory."""
        last = self.record.frames[-1] if self.record.frames else {}
        totals = last.get("totals") or {}
        server_pids = self.svc.pids if self.svc is not None else []
        rss = tree_rss(server_pids)
        row = {
            "elapsed_s": round(time.time() - self.t0, 2),
            "phase": phase,
            "target": target,
            "clients": st.clients,
            "inproc": st.inproc,
            "errors_req": st.errors_req,
            "errors_resp": st.errors_resp,
            "ended_req": st.ended_req,
            "msgs_total": st.msgs_total,
            "server_conns": totals.get("conns", ""),
            "server_rss_mb": round(rss / 2**20, 1),
            "server_rss_delta_mb": round((rss - self.rss0) / 2**20, 1),
            "slab_delta_mb": round((meminfo_kb("Slab") - self.slab0) / 1024, 1),
            "lag_p99_ms": ((totals.get("lag_ms") or {}).get("p99", "")),
            "lag_max_ms": ((totals.get("lag_ms") or {}).get("max", "")),
            "mem_available_mb": meminfo_kb("MemAvailable") // 1024,
            # One counter for the whole host (the namespaces share it), in pages.
            "tcp_mem_pages": read_sockstat().get("TCP", {}).get("mem", ""),
        }
        self.record.timeline.append(row)
        return row

    def check_memory(self) -> None:
        """Stop the run (bounded) before the box runs out of memory: others share it."""
        avail = meminfo_kb("MemAvailable") * 1024
        if avail < self.opts.min_available_gib * 2**30:
            raise BenchError(
                f"MemAvailable {avail / 2**30:.2f} GiB fell below --min-available-gib "
                f"{self.opts.min_available_gib}: stopping the run (fewer --conns, or free memory)"
            )

    # ---- the end ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the frame watcher, the engine processes and the service; remove the run dir."""
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(BaseException):
                await self.watcher
        if self.pool is not None:
            await self.pool.close()
        if self.svc is not None and self.svc.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.svc.stop)
        if self.lab is not None:
            self.lab.close()
        if self.autogroup_nice0 is not None:
            with contextlib.suppress(OSError):
                autogroup.set_nice(self.autogroup_nice0)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def finish(self) -> dict[str, Any]:
        """The report, with the outputs written (after :meth:`close`: the service log is
        whole)."""
        self.report["broadcasts"] = self.record.broadcasts
        write_outputs(self.out, self.report, self.record, self.svc)
        return self.report


async def run_bench(opts: Options, console: Console) -> dict[str, Any]:
    """Run the phases as a task that a signal cancels (again and again, until it has ended),
    then stop everything from here, outside that task, whatever way it ended."""
    loop = asyncio.get_running_loop()
    b = BenchRun(opts, console)
    # Handlers first, then anything that spawns: the task does not start before the next await.
    task = loop.create_task(b.phases())
    signals: list[int] = []

    def cancel_until_done() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(0.2, cancel_until_done)

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if len(signals) == 1:
            cancel_until_done()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await asyncio.wait({task})
    finally:
        await b.close()
    if signals:
        raise Interrupted(signal.Signals(signals[0]).name)
    task.result()  # the phases' own error, if any
    return b.finish()
