"""``comet-bench``: service + load generator on one box, end to end, with a report.

Steps: preflight (which kernel/process limit would stop ``--conns`` connections, and the sysctl
that lifts it) → start the service (``python -m service --workers auto``) in its own process group
→ start engine processes → ramp to ``--conns`` at ``--rate`` per second (progress display) → hold
``--hold`` seconds → send ``--broadcasts K`` timed broadcasts (``{"ts": publish_time, "seq": i}``)
through the control socket, one at a time, each waited for until every connection has it →
report and write ``bench.json``, ``bench.csv`` (timeline), ``bench.png`` and the service's
``memory.png`` / ``cpu.png`` into ``--out``.

With ``--target URL --publish-cmd CMD`` no service is started: the same measurement runs against
any HTTP streaming server. CMD is run by ``/bin/sh -c`` once per broadcast with the message in the
environment variable ``COMET_BENCH_DATA`` and, if CMD contains ``{data}``, substituted there
shell-quoted. The server's RSS is then taken from the processes listening on the URL's port.

Every process the bench starts is stopped on the way out, also on Ctrl-C or SIGTERM: the service
by its process group, the engine processes by closing their stdin (and a kill after 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadgen.client import (
    FD_RESERVE,
    EngineConfig,
    ProcessPool,
    Stats,
    auto_procs,
    install_uvloop,
    nofile_capacity,
    parse_source_ips,
)
from service.config import Parser
from service.portcheck import ss_listeners

SERVICE_FD_RESERVE = 500
KERNEL_BYTES_PER_PAIR = 10_000  # measured on this machine kind (MACHINE-NOTES.md)
# SO_REUSEPORT spreads connections over the workers by a hash, not evenly: at 500,000 on 26
# workers sized to exactly ceil(conns / cap) the fullest ones hit their cap and answered 503.
# ``--workers auto`` therefore sizes the service for this much more than --conns.
WORKER_HEADROOM = 1.05


def service_workers(conns: int, nofile: int) -> int:
    """Workers for ``conns`` when each holds ``nofile - reserve``, with the hash headroom."""
    per = max(1, nofile - SERVICE_FD_RESERVE)
    return max(os.cpu_count() or 1, math.ceil(conns * WORKER_HEADROOM / per))


class BenchError(Exception):
    pass


# ---- preflight --------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    value: str
    needed: str
    ok: bool
    fix: str
    # False: not meeting it slows the run (e.g. long hash chains) but does not stop it.
    stops: bool = True


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def untracked_ports() -> set[int]:
    """TCP ports exempt from connection tracking by a raw-table NOTRACK rule (host_tuning's
    ``host_tuning_notrack_ports``); empty where the rules cannot be read (not root, no iptables)."""
    ports: set[int] = set()
    for argv in (
        ["iptables", "-t", "raw", "-S"],
        ["nft", "list", "table", "inet", "comet1m_notrack"],
    ):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            if "NOTRACK" in line or "notrack" in line:
                ports.update(int(m) for m in re.findall(r"[ds]port\D{1,4}(\d+)", line))
    return ports


def preflight(
    conns: int, sources: int, remote: bool = False, concurrency: int = 200, port: int = 0
) -> list[Check]:
    """Every limit that could stop ``conns`` loopback connections, checked against the machine.
    A ``port`` exempt from connection tracking needs no conntrack entries."""
    checks = []
    untracked = port in untracked_ports() if port else False
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    ports = (hi - lo + 1) * max(1, sources)
    checks.append(
        Check(
            "ephemeral ports",
            f"{hi - lo + 1:,} × {max(1, sources)} source addr = {ports:,}",
            f"{conns:,}",
            conns <= ports,
            "sysctl -w net.ipv4.ip_local_port_range='1024 65535' or more --source-ips",
        )
    )
    ct_max = _read_int("/proc/sys/net/netfilter/nf_conntrack_max")
    if untracked:
        checks.append(
            Check("connection tracking", f"port {port} untracked (raw NOTRACK)", "-", True, "")
        )
        ct_max = None  # neither the table's size nor its hash matters for this port
    if ct_max is not None:
        ct_now = _read_int("/proc/sys/net/netfilter/nf_conntrack_count") or 0
        need = conns + ct_now
        checks.append(
            Check(
                "nf_conntrack_max",
                f"{ct_max:,} ({ct_now:,} in use)",
                f"{need:,}",
                need <= ct_max,
                f"sysctl -w net.netfilter.nf_conntrack_max={max(ct_max, 2 * need):,}".replace(
                    ",", ""
                ),
            )
        )
    # Both ends of a loopback connection are in the kernel's tables: every packet (data and ACK)
    # is looked up in the TCP established hash and, with conntrack loaded, the conntrack hash.
    # At 1,000,000 with the 262,144 buckets a 24 GB host boots with, the chains were ~4 and ~8
    # long, and the two lookups took 9 % + 8.6 % of all CPU (perf, holding 1M).
    sockets = (1 if remote else 2) * conns
    buckets = _read_int("/proc/sys/net/netfilter/nf_conntrack_buckets")
    if buckets is not None and ct_max is not None:
        want = min(2**21, 1 << max(0, (conns - 1).bit_length()))
        checks.append(
            Check(
                "nf_conntrack_buckets",
                f"{buckets:,}",
                f"≥ {want:,} (≤ 1 entry a bucket)",
                buckets >= want,
                f"sysctl -w net.netfilter.nf_conntrack_buckets={want}",
                stops=False,
            )
        )
    ehash = _read_int("/proc/sys/net/ipv4/tcp_ehash_entries")
    if ehash is not None:
        checks.append(
            Check(
                "net.ipv4.tcp_ehash_entries",
                f"{abs(ehash):,}",
                f"≥ {sockets // 2:,} (≤ 2 sockets a bucket)",
                abs(ehash) >= sockets // 2,
                "boot with thash_entries=2097152 on the kernel command line (fixed at boot)",
                stops=False,
            )
        )
    file_max = _read_int("/proc/sys/fs/file-max") or 0
    file_now = _read_int("/proc/sys/fs/file-nr") or 0
    both_ends = 1 if remote else 2
    need_files = both_ends * conns + file_now + 10_000
    checks.append(
        Check(
            "fs.file-max",
            f"{file_max:,} ({file_now:,} in use)",
            f"{need_files:,}",
            need_files <= file_max,
            f"sysctl -w fs.file-max={2 * need_files}",
        )
    )
    cap = nofile_capacity()
    hard = cap + FD_RESERVE
    client_procs = auto_procs(conns, cap)
    server_workers = service_workers(conns, hard)
    checks.append(
        Check(
            "fds (RLIMIT_NOFILE)",
            f"{hard:,} per process",
            f"{client_procs} client + {server_workers} worker processes",
            hard > 1000,
            "raise nofile in /etc/security/limits.d (and fs.nr_open) to use fewer processes",
        )
    )
    avail = meminfo_kb("MemAvailable") * 1024
    # Kernel socket pair + ~3 KB server + ~2 KB client Python objects per connection.
    need_mem = conns * (KERNEL_BYTES_PER_PAIR + 5_000)
    checks.append(
        Check(
            "memory",
            f"{avail / 2**30:.1f} GiB available",
            f"~{need_mem / 2**30:.1f} GiB",
            need_mem <= avail,
            "fewer --conns or a bigger machine",
        )
    )
    # Socket buffer memory: during a broadcast every connection has at least one queued skb
    # (≥ 1 page accounted) until its reader catches up; past tcp_mem's third value the kernel
    # logs "TCP: out of memory" and drops sockets, i.e. connection errors in the middle of a run.
    try:
        tcp_mem_max = int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        tcp_mem_max = None
    if tcp_mem_max is not None:
        checks.append(
            Check(
                "net.ipv4.tcp_mem (max)",
                f"{tcp_mem_max:,} pages",
                f"{conns:,} pages (1 per connection in a broadcast)",
                tcp_mem_max >= conns,
                f"sysctl -w net.ipv4.tcp_mem='{max(conns // 4, 1)} {conns} {conns * 3 // 2}'",
            )
        )
    # Accept backlog: SO_REUSEPORT gives every worker its own queue of min(backlog, somaxconn);
    # the client processes have procs × --concurrency connects in flight at once, and a full
    # queue turns into SYN retries (1 s, 3 s, ...) that stall the ramp or time heads out.
    somax = _read_int("/proc/sys/net/core/somaxconn") or 0
    in_flight = client_procs * concurrency
    per_queue = math.ceil(in_flight / max(1, server_workers))
    checks.append(
        Check(
            "net.core.somaxconn",
            f"{somax:,}",
            f"≥ {per_queue:,} ({in_flight:,} connects in flight / {server_workers} workers)",
            somax >= per_queue,
            "sysctl -w net.core.somaxconn=65535",
        )
    )
    syn = _read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog") or 0
    checks.append(
        Check(
            "net.ipv4.tcp_max_syn_backlog",
            f"{syn:,}",
            f"≥ {in_flight:,} connects in flight",
            syn >= in_flight,
            "sysctl -w net.ipv4.tcp_max_syn_backlog=65535",
        )
    )
    return checks


def verdict(checks: list[Check]) -> str:
    stops = [c for c in checks if not c.ok and c.stops]
    slow = [c.name for c in checks if not c.ok and not c.stops]
    tail = f" (slower than it could be: {', '.join(slow)})" if slow else ""
    if not stops:
        return "no checked limit stops this run" + tail
    c = stops[0]
    return f"{c.name} will stop the run ({c.value} < {c.needed}); lift it with: {c.fix}" + tail


# ---- the service ------------------------------------------------------------------------------


def free_port() -> int:
    """A free port below every usual ephemeral range (where bind(0) and clients never land).

    Other load tests on the same machine reconnect to ports whose servers have gone; a port the
    kernel hands out as an ephemeral one may be such a port, and with SO_REUSEPORT a stranger can
    even bind it beside us. Ports 3000-9999 (minus the project's well-known ones) avoid both.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(3000, 10000)
        if port in (8080, 8888, 8889):
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        if not listening_pids(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def control(path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request on the service's control socket (JSON lines)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(path, limit=16 << 20), timeout
    )
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise BenchError(f"control socket {path}: closed without an answer")
    answer: dict[str, Any] = json.loads(line)
    if not answer.get("ok"):
        raise BenchError(f"control socket {path}: {answer.get('error')}")
    return answer


def tree_rss(pids: list[int]) -> int:
    """RSS in bytes of the given processes and all their descendants."""
    seen: dict[int, int] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for q in [p, *p.children(recursive=True)]:
                try:
                    seen[q.pid] = q.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return sum(seen.values())


def tree_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of the given processes (children are not included)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def listening_pids(port: int) -> list[int]:
    """Pids with a TCP listener on ``port``.

    ``ss`` filters in the kernel (fast even with a million sockets); psutil walks every fd of
    every process, which takes seconds on a loaded box, so it is only the fallback.
    """
    found = ss_listeners(port)
    if found is not None:
        return sorted({pid for pid, _name in found})
    pids = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            pids.add(c.pid)
    return sorted(pids)


@dataclass
class Service:
    proc: subprocess.Popen[bytes] | None
    port: int
    socket_path: str | None
    log_dir: Path | None
    pids: list[int] = field(default_factory=list)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the service's process group, then SIGKILL whatever of its tree is left.

        The supervisor may put its workers in process groups of their own, so the tree is
        collected first and every member still alive after ``grace`` seconds is killed.
        """
        if self.proc is None:
            return
        tree = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        psutil.wait_procs(tree, timeout=5)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _die_with_parent() -> None:
    """In the service's child process before exec: SIGTERM it if the bench dies (even by -9)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def start_service(args: argparse.Namespace, out: Path, run_dir: str) -> Service:
    """Start the service on a port nobody else listens on (retrying on another port if needed)."""
    for _attempt in range(3):
        port = args.port or free_port()
        if listening_pids(port):
            if args.port:
                raise BenchError(f"--port {port}: another process already listens there")
            continue
        svc = await _start_service_on(args, out, run_dir, port)
        # SO_REUSEPORT lets any other process of this user bind the same port and silently take
        # a share of our connections, so make sure every listener on it is ours.
        ours = set(svc.pids)
        for pid in svc.pids:
            try:
                ours.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        strangers = set(listening_pids(port)) - ours
        if not strangers:
            return svc
        svc.stop()
        if args.port:
            raise BenchError(f"--port {port}: shared with processes {sorted(strangers)}")
    raise BenchError("could not find a port that no other process listens on")


async def _start_service_on(
    args: argparse.Namespace, out: Path, run_dir: str, port: int
) -> Service:
    sock = os.path.join(run_dir, "control.sock")
    log_dir = out / "service-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    args.workers_expected = (
        int(args.workers)
        if args.workers != "auto"
        else service_workers(args.conns, nofile_capacity() + FD_RESERVE)
    )
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(args.workers_expected),
        "--target-connections",
        str(args.conns),
        "--control-socket",
        sock,
        "--log-dir",
        str(log_dir),
        "--screen",
        "off",
        "--ping-interval",
        str(args.ping_interval),
        "--grace",
        "5",
    ]
    if args.tls_cert:
        cmd += ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]
    logf = open(out / "service.log", "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        # Own session: a terminal Ctrl-C reaches only the bench, which then stops the service.
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads are running yet
        )
    finally:
        logf.close()
    svc = Service(proc, port, sock, log_dir, [proc.pid])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (out / "service.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"the service exited with {proc.returncode}:\n{tail}")
        try:
            health = await control(sock, {"op": "health"}, timeout=2.0)
            if await _port_open(port):
                svc_workers = health.get("workers")
                print(f"service up: pid {proc.pid}, {svc_workers} workers, port {port}", flush=True)
                return svc
        except (TimeoutError, OSError, BenchError, ValueError):
            pass
        await asyncio.sleep(0.2)
    svc.stop()
    raise BenchError("the service did not become ready within 60 s (see service.log)")


async def wait_workers_up(sock: str, expected: int, timeout: float = 120.0) -> None:
    """Wait (bounded) until the supervisor reports ``expected`` workers up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError, OSError, BenchError, ValueError):
            health = await control(sock, {"op": "health"}, timeout=5.0)
            if int(health.get("workers", 0)) >= expected:
                return
        await asyncio.sleep(0.5)
    raise BenchError(f"the service did not bring up {expected} workers within {timeout:.0f} s")


async def _port_open(port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
    except (TimeoutError, OSError):
        return False
    w.close()
    return True


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    timeline: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    worst_lag_ms: float | None = None
    broadcasts: list[dict[str, Any]] = field(default_factory=list)


async def watch_frames(sock: str, run: Run) -> None:
    """Follow the service's frames (control ``watch``) for the worst loop lag and conns."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(sock, limit=16 << 20)
            writer.write(b'{"op":"watch"}\n')
            await writer.drain()
            while line := await reader.readline():
                msg = json.loads(line)
                frame = msg.get("frame")
                if not frame:
                    continue
                run.frames.append(frame)
                lag = ((frame.get("totals") or {}).get("lag_ms") or {}).get("max")
                if isinstance(lag, (int, float)):
                    run.worst_lag_ms = max(run.worst_lag_ms or 0.0, float(lag))
        except (OSError, ValueError):
            pass
        await asyncio.sleep(1.0)  # the service restarted or is not up yet: follow it again


def check_memory(args: argparse.Namespace) -> None:
    """Stop the run (bounded) before the box runs out of memory: others share it."""
    avail = meminfo_kb("MemAvailable") * 1024
    if avail < args.min_available_gib * 2**30:
        raise BenchError(
            f"MemAvailable {avail / 2**30:.2f} GiB fell below --min-available-gib "
            f"{args.min_available_gib}: stopping the run (fewer --conns, or free memory)"
        )


def lag_in(run: Run, since: float, until: float) -> dict[str, float | None]:
    """The worst worker's loop lag (p90 / p99 / max) over the frames covering [since, until]."""
    out: dict[str, float | None] = {}
    # A frame at time t reports the second before it.
    frames = [f for f in run.frames if since < float(f.get("t", 0)) <= until + 1.0]
    for k in ("p90", "p99", "max"):
        vals = [((f.get("totals") or {}).get("lag_ms") or {}).get(k) for f in frames]
        nums = [float(v) for v in vals if isinstance(v, (int, float))]
        out[k] = max(nums) if nums else None
    return out


def sample(
    run: Run,
    t0: float,
    phase: str,
    target: int,
    st: Stats,
    server_pids: list[int],
    slab0: int,
    rss0: int,
) -> dict[str, Any]:
    last = run.frames[-1] if run.frames else {}
    totals = last.get("totals") or {}
    row = {
        "elapsed_s": round(time.time() - t0, 2),
        "phase": phase,
        "target": target,
        "clients": st.clients,
        "inproc": st.inproc,
        "errors_req": st.errors_req,
        "errors_resp": st.errors_resp,
        "ended_req": st.ended_req,
        "msgs_total": st.msgs_total,
        "server_conns": totals.get("conns", ""),
        "server_rss_mb": round(tree_rss(server_pids) / 2**20, 1),
        "server_rss_delta_mb": round((tree_rss(server_pids) - rss0) / 2**20, 1),
        "slab_delta_mb": round((meminfo_kb("Slab") - slab0) / 1024, 1),
        "lag_p99_ms": ((totals.get("lag_ms") or {}).get("p99", "")),
        "lag_max_ms": ((totals.get("lag_ms") or {}).get("max", "")),
        "mem_available_mb": meminfo_kb("MemAvailable") // 1024,
    }
    run.timeline.append(row)
    return row


async def publish(args: argparse.Namespace, svc: Service, data: str) -> int | None:
    """Send one broadcast; the recipient count when the server tells it."""
    if svc.socket_path is not None:
        # The answer comes when every worker has written its share: ~22-30 s at 1,000,000 on
        # 2 shared cores, so the default 30 s control timeout aborted a million run.
        answer = await control(
            svc.socket_path,
            {"op": "broadcast", "data": data, "channel": None, "event": None},
            timeout=max(30.0, args.broadcast_timeout),
        )
        return int(answer.get("recipients", 0))
    cmd = args.publish_cmd.replace("{data}", shlex.quote(data))
    env = {**os.environ, "COMET_BENCH_DATA": data}
    proc = await asyncio.create_subprocess_shell(
        cmd, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError("--publish-cmd did not finish within 30 s") from None
    if proc.returncode != 0:
        raise BenchError(f"--publish-cmd exited {proc.returncode}: {err.decode()[-500:]}")
    return None


class Bench:
    """One run's state, carried from phase to phase; :meth:`close` stops whatever was started.

    The phases run as their own task and :meth:`close` runs outside it (see :func:`main`), so
    stopping everything never depends on a cancellation arriving inside the phases: Python 3.11's
    ``asyncio.wait_for`` can swallow one when its inner call completes in the same loop turn.
    """

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.run = Run()
        self.report: dict[str, Any] = {}
        self.svc: Service | None = None
        self.pool: ProcessPool | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.run_dir = tempfile.mkdtemp(prefix="comet-bench-")

    async def phases(self) -> None:
        args, console, run = self.args, self.console, self.run
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.target:
            u = urlsplit(args.target)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise BenchError(
                    f"--target: expected http(s)://host:port/path, got {args.target!r}"
                )
            tls = u.scheme == "https"
            host, port = u.hostname, u.port or (443 if tls else 80)
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        else:
            host, port, path = "127.0.0.1", 0, args.path
            tls = bool(args.tls_cert)
        sources = parse_source_ips(args.source_ips, host)
        checks = preflight(
            args.conns,
            len(sources),
            remote=False,
            concurrency=args.concurrency,
            port=port or args.port,
        )
        report = self.report
        report.update(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "conns": args.conns,
                "rate": args.rate,
                "hold_s": args.hold,
                "broadcasts_asked": args.broadcasts,
                "target": args.target or "comet1m service (python -m service)",
                "machine": {
                    "cpu_model": cpu_model(),
                    "cpus": os.cpu_count(),
                    "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
                },
                "preflight": [c.__dict__ for c in checks],
                "preflight_verdict": verdict(checks),
            }
        )
        print_preflight(console, checks)
        if args.target:
            pids = listening_pids(port) if host in ("127.0.0.1", "localhost", "::1") else []
            svc = self.svc = Service(None, port, None, None, pids)
        else:
            svc = self.svc = await start_service(args, out, self.run_dir)
            report["service_pid"] = svc.proc.pid if svc.proc else None
            port = svc.port
            assert svc.socket_path is not None
            self.watcher = asyncio.create_task(watch_frames(svc.socket_path, run))
        if svc.socket_path is not None:
            # The baseline must include every worker's start-up RSS: at 54 workers the
            # service answers health while most are still importing, and a baseline taken
            # then put ~0.8 KB of interpreter start-up into every connection's share.
            await wait_workers_up(svc.socket_path, args.workers_expected)
        await asyncio.sleep(1.0)  # a baseline after start-up settles
        slab0, rss0 = meminfo_kb("Slab"), tree_rss(svc.pids)
        config = EngineConfig(
            0, host, port, path, args.concurrency, tls=tls, tls_ca=args.tls_ca or ""
        )
        report["tls"] = tls
        pool = self.pool = ProcessPool(
            config, sources, None if args.procs == "auto" else int(args.procs)
        )
        await pool.grow(pool.fixed or auto_procs(args.conns, pool.capacity))
        if args.client_nice:
            # On one box the load generator stands in for remote machines: give the service
            # the CPU first so its loop lag is not the clients' doing.
            for child in pool.children:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(child.proc.pid).nice(args.client_nice)
        report["client_nice"] = args.client_nice
        await pool.apply(config)
        report["client_rss0"] = tree_rss([c.proc.pid for c in pool.children])
        report["client_procs"] = pool.procs
        report.update(await ramp(args, console, pool, config, run, svc, slab0, rss0))
        await hold(args, pool, run, svc, slab0, rss0, report)
        await broadcasts(args, pool, run, svc, report, slab0, rss0)
        st = await pool.stats()
        if args.ramp_down:
            await ramp_down(args, pool, run, svc, report, slab0, rss0)
        report["errors"] = {
            "errors_req": st.errors_req,
            "errors_resp": st.errors_resp,
            "ended_req": st.ended_req,
        }
        report["latency_ms"] = st.latency_summary()
        report["msgs_total"] = st.msgs_total
        report["worst_loop_lag_ms"] = run.worst_lag_ms
        if run.frames:
            report["server_workers"] = len(run.frames[-1].get("workers") or [])

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
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def finish(self) -> dict[str, Any]:
        """The report, with the outputs written (after :meth:`close`: the service log is whole)."""
        self.report["broadcasts"] = self.run.broadcasts
        write_outputs(Path(self.args.out), self.report, self.run, self.svc)
        return self.report


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived; everything started has been stopped."""


async def run_bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Run the phases as a task that a signal cancels (again and again, until it has ended),
    then stop everything from here, outside that task, whatever way it ended."""
    loop = asyncio.get_running_loop()
    b = Bench(args, console)
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


async def ramp(
    args: argparse.Namespace,
    console: Console,
    pool: ProcessPool,
    config: EngineConfig,
    run: Run,
    svc: Service,
    slab0: int,
    rss0: int,
) -> dict[str, Any]:
    t0 = time.time()
    start = time.monotonic()
    best, best_at = 0, start
    reached_at: float | None = None
    # A ramp may take twice its nominal time (+60 s, or --ramp-timeout) and stall 30 s at most
    # before we give up.
    deadline = start + (args.ramp_timeout or args.conns / args.rate * 2 + 60)
    progress = Progress(
        TextColumn("ramp"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not args.progress,
        transient=False,
    )
    last_sample = 0.0
    with progress:
        task = progress.add_task("ramp", total=args.conns, info="")
        while True:
            now = time.monotonic()
            target = min(args.conns, int(args.rate * (now - start)) + 1)
            if target != pool.config.n:
                await pool.set_config(dataclasses.replace(config, n=target))
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
                sample(run, t0, "ramp", target, st, svc.pids, slab0, rss0)
                last_sample = now
                check_memory(args)
            if st.clients >= args.conns:
                reached_at = now
                break
            if now > deadline or (target == args.conns and now - best_at > 30):
                break
            await asyncio.sleep(0.2)
    run.timeline[-1:] = []  # replaced by the final sample below
    sample(run, t0, "ramp", args.conns, st, svc.pids, slab0, rss0)
    return {
        "t0": t0,
        "ramp_s": round((reached_at or time.monotonic()) - start, 2),
        "ramp_complete": reached_at is not None,
        "reached": best,
    }


async def hold(
    args: argparse.Namespace,
    pool: ProcessPool,
    run: Run,
    svc: Service,
    slab0: int,
    rss0: int,
    report: dict[str, Any],
) -> None:
    end = time.monotonic() + args.hold
    hold_t0 = time.time()
    client_cpu0 = tree_cpu([c.proc.pid for c in pool.children])
    host_cpu0 = psutil.cpu_times()
    while True:
        st = await pool.stats()
        sample(run, report["t0"], "hold", args.conns, st, svc.pids, slab0, rss0)
        check_memory(args)
        if time.monotonic() >= end:
            break
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
    # CPU while idle-holding (pings only): % of one core, from the service's frames (its own
    # psutil readings per worker) and from the load generator's and the host's CPU times.
    dt = max(0.001, time.time() - hold_t0)
    host_cpu1 = psutil.cpu_times()
    busy = sum(host_cpu1) - sum(host_cpu0) - (host_cpu1.idle - host_cpu0.idle)
    busy -= getattr(host_cpu1, "iowait", 0.0) - getattr(host_cpu0, "iowait", 0.0)
    frames = [f for f in run.frames if float(f.get("t", 0)) > hold_t0 + 1.0]
    svc_cpu = [float((f.get("totals") or {}).get("cpu_percent", 0.0)) for f in frames]
    report["hold_cpu"] = {
        "seconds": round(dt, 1),
        "service_pct_of_core": round(sum(svc_cpu) / len(svc_cpu), 1) if svc_cpu else None,
        "load_generator_pct_of_core": round(
            100 * (tree_cpu([c.proc.pid for c in pool.children]) - client_cpu0) / dt, 1
        ),
        "host_busy_pct_of_core": round(100 * busy / dt, 1),
        "cores": os.cpu_count(),
        "service_lag": lag_in(run, hold_t0, time.time() - 1.0),
    }
    held = max(1, st.clients)
    rss = tree_rss(svc.pids)
    slab = meminfo_kb("Slab")
    report["held"] = st.clients
    report["server_rss_mb"] = round(rss / 2**20, 1)
    report["server_rss_per_conn_bytes"] = round((rss - rss0) / held) if svc.pids else None
    report["kernel_slab_delta_mb"] = round((slab - slab0) / 1024, 1)
    # Slab grows for both ends of every loopback connection: this is per connection *pair*.
    report["kernel_bytes_per_conn"] = round((slab - slab0) * 1024 / held)
    client_rss = tree_rss([c.proc.pid for c in pool.children])
    report["client_rss_mb"] = round(client_rss / 2**20, 1)
    report["client_rss_per_conn_bytes"] = round((client_rss - report.pop("client_rss0")) / held)


async def broadcasts(
    args: argparse.Namespace,
    pool: ProcessPool,
    run: Run,
    svc: Service,
    report: dict[str, Any],
    slab0: int,
    rss0: int,
) -> None:
    for seq in range(1, args.broadcasts + 1):
        before = await pool.stats()
        expect = before.clients
        ts = time.time()
        data = json.dumps({"ts": ts, "seq": seq, "bench": "comet1m"})
        recipients = await publish(args, svc, data)
        answered = time.time()
        deadline = time.monotonic() + args.broadcast_timeout
        st = before
        while time.monotonic() < deadline:
            st = await pool.stats()
            if st.deliveries.get(seq, 0) >= expect:
                break
            await asyncio.sleep(0.05)
        delivered = st.deliveries.get(seq, 0)
        last = st.last_delivery.get(seq)
        first = st.first_delivery.get(seq)
        # The frames covering the fan-out arrive once a second: wait for the one after it.
        await asyncio.sleep(1.2)
        lag = lag_in(run, ts, last or time.time())
        run.broadcasts.append(
            {
                "seq": seq,
                "published": ts,
                "recipients": recipients,
                "expected": expect,
                "delivered": delivered,
                "first_delivery_ms": round((first - ts) * 1000, 1) if first else None,
                "last_delivery_ms": round((last - ts) * 1000, 1) if last else None,
                "answer_ms": round((answered - ts) * 1000, 1),
                "lag_p90_ms": lag["p90"],
                "lag_p99_ms": lag["p99"],
                "lag_max_ms": lag["max"],
            }
        )
        sample(run, report["t0"], "broadcast", args.conns, st, svc.pids, slab0, rss0)
        check_memory(args)
        await asyncio.sleep(args.broadcast_gap)


async def ramp_down(
    args: argparse.Namespace,
    pool: ProcessPool,
    run: Run,
    svc: Service,
    report: dict[str, Any],
    slab0: int,
    rss0: int,
) -> None:
    """Close every client connection and time until the service holds none (bounded: 120 s)."""
    c = pool.config
    start = time.monotonic()
    await pool.set_config(dataclasses.replace(c, n=0))
    deadline = start + 120
    done_at: float | None = None
    while time.monotonic() < deadline:
        st = await pool.stats()
        row = sample(run, report["t0"], "ramp-down", 0, st, svc.pids, slab0, rss0)
        server = row["server_conns"]
        # The frame is up to a second old: count the service as empty on a frame taken after
        # the clients reached 0.
        if st.clients == 0 and done_at is None:
            done_at = time.monotonic()
        if done_at is not None and server == 0 and time.monotonic() - done_at > 1.1:
            break
        await asyncio.sleep(0.5)
    report["ramp_down_s"] = round((done_at or time.monotonic()) - start, 2)
    report["ramp_down_server_conns_left"] = run.timeline[-1]["server_conns"]


# ---- outputs ----------------------------------------------------------------------------------


def write_outputs(out: Path, report: dict[str, Any], run: Run, svc: Service | None) -> None:
    files = {
        "json": str(out / "bench.json"),
        "csv": str(out / "bench.csv"),
        "png": str(out / "bench.png"),
    }
    if run.timeline:
        with open(out / "bench.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(run.timeline[0]))
            w.writeheader()
            w.writerows(run.timeline)
    plot_bench(out / "bench.png", report, run)
    if svc is not None and svc.log_dir is not None:
        from loadgen.plot import PlotError, plot_log

        logs = sorted(str(p) for p in svc.log_dir.glob("*.csv"))
        if logs:
            try:
                for p in plot_log(logs, str(out), "service CSV log of the bench"):
                    files[p.stem] = str(p)
            except PlotError as exc:
                report["plot_error"] = str(exc)
            files["service_csv"] = logs[-1]
    report["files"] = files
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


def plot_bench(path: Path, report: dict[str, Any], run: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    x = [r["elapsed_s"] for r in run.timeline]
    ax.plot(x, [r["clients"] for r in run.timeline], color="black", label="clients connected")
    ax.plot(x, [r["target"] for r in run.timeline], ":", color="gray", label="target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("connections")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(
        x,
        [r["server_rss_delta_mb"] for r in run.timeline],
        color="tab:red",
        label="server RSS growth (MB)",
    )
    ax2.plot(
        x,
        [r["slab_delta_mb"] for r in run.timeline],
        color="tab:blue",
        label="kernel Slab growth (MB)",
    )
    ax2.set_ylabel("MB")
    # Each broadcast on the timeline, at its publish time.
    t0 = report.get("t0")
    for i, b in enumerate(run.broadcasts):
        if t0 is not None and b.get("published"):
            ax.axvline(
                b["published"] - t0,
                color="tab:green",
                linestyle="--",
                alpha=0.7,
                label="broadcast" if i == 0 else None,
            )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # Below the axes: inside, it covered the ramp.
    ax.legend(
        h1 + h2,
        l1 + l2,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=5,
        fontsize="small",
        frameon=False,
    )
    ax.set_title(
        f"comet-bench: {report.get('reached', 0):,} of {report['conns']:,} connections, "
        f"ramp {report.get('ramp_s', '-')} s"
    )
    seqs = [b["seq"] for b in run.broadcasts]
    last = [b["last_delivery_ms"] or 0 for b in run.broadcasts]
    bx.bar([str(s) for s in seqs], last, color="tab:green")
    lat = report.get("latency_ms") or {}
    for q, style in (("p50", "--"), ("p99", "-.")):
        if lat.get(q) is not None:
            bx.axhline(lat[q], linestyle=style, color="tab:purple", label=f"{q} {lat[q]:.1f} ms")
    bx.set_xlabel("broadcast #")
    bx.set_ylabel("ms from publish to last delivery")
    bx.set_title("delivery per broadcast")
    if lat.get("p50") is not None:
        bx.legend(fontsize="small")
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_preflight(console: Console, checks: list[Check]) -> None:
    t = Table(title="preflight")
    for col in ("limit", "value", "needed", "", "how to lift it"):
        t.add_column(col)
    for c in checks:
        t.add_row(
            c.name,
            c.value,
            c.needed,
            "[green]ok[/green]"
            if c.ok
            else ("[red]STOP[/red]" if c.stops else "[yellow]slow[/yellow]"),
            "" if c.ok else c.fix,
        )
    console.print(t)
    console.print(verdict(checks))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): a result is only comparable on the same model."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def print_report(console: Console, r: dict[str, Any]) -> None:
    def fmt(x: Any, unit: str = "") -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.1f}{unit}"
        if isinstance(x, int):
            return f"{x:,}{unit}"
        return f"{x}{unit}"

    machine = r.get("machine") or {}
    t = Table(
        title=f"comet-bench — {r['target']}",
        caption=f"{machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} CPUs, "
        f"{machine.get('mem_gib', '?')} GiB",
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    lat = r.get("latency_ms") or {}
    errs = r.get("errors") or {}
    rows = [
        (
            "connections asked / reached / held",
            f"{r['conns']:,} / {fmt(r.get('reached'))} / {fmt(r.get('held'))}",
        ),
        (
            "ramp time",
            fmt(r.get("ramp_s"), " s") + ("" if r.get("ramp_complete") else " (incomplete)"),
        ),
        (
            "errors req / resp, ended",
            f"{fmt(errs.get('errors_req'))} / "
            f"{fmt(errs.get('errors_resp'))}, {fmt(errs.get('ended_req'))}",
        ),
        (
            "client / server processes",
            f"{fmt(r.get('client_procs'))} / {fmt(r.get('server_workers'))}",
        ),
        ("server RSS (total)", fmt(r.get("server_rss_mb"), " MB")),
        ("server RSS per connection", fmt(r.get("server_rss_per_conn_bytes"), " B")),
        ("load generator RSS per connection", fmt(r.get("client_rss_per_conn_bytes"), " B")),
        ("kernel Slab per connection pair", fmt(r.get("kernel_bytes_per_conn"), " B")),
        (
            "delivery latency p50 / p90 / p99 / max",
            " / ".join(fmt(lat.get(q)) for q in ("p50", "p90", "p99", "max")) + " ms",
        ),
        ("worst loop lag", fmt(r.get("worst_loop_lag_ms"), " ms")),
    ]
    hc = r.get("hold_cpu") or {}
    if hc:
        rows.append(
            (
                "CPU while holding (% of one core): service / load gen / host",
                f"{fmt(hc.get('service_pct_of_core'))} / "
                f"{fmt(hc.get('load_generator_pct_of_core'))}"
                f" / {fmt(hc.get('host_busy_pct_of_core'))} (of {hc.get('cores')} cores)",
            )
        )
    if "ramp_down_s" in r:
        rows.append(("ramp-down (all clients close)", fmt(r.get("ramp_down_s"), " s")))
    for b in r.get("broadcasts", []):
        rows.append(
            (
                f"broadcast {b['seq']}: delivered, first / last delivery",
                f"{fmt(b['delivered'])}/{fmt(b['expected'])}, "
                f"{fmt(b.get('first_delivery_ms'))} / {fmt(b['last_delivery_ms'], ' ms')}; "
                f"lag p99 {fmt(b.get('lag_p99_ms'))} max {fmt(b.get('lag_max_ms'), ' ms')}",
            )
        )
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    console.print(f"preflight: {r.get('preflight_verdict')}")
    for k, v in (r.get("files") or {}).items():
        console.print(f"  {k}: {v}")


# ---- CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="comet-bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run the comet1m service and local load generators on this box, ramp to "
        "--conns, hold, broadcast, and report (JSON, CSV, PNG and a table). With "
        "--target/--publish-cmd, measure any other HTTP streaming server instead.",
    )
    p.add_argument("--conns", type=int, default=2000, help="connections to reach")
    p.add_argument("--rate", type=float, default=1000.0, help="new connections per second")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold before broadcasting")
    p.add_argument(
        "--ramp-timeout",
        type=float,
        default=0.0,
        help="seconds the ramp may take before the hold starts anyway (0 = 2 × conns/rate + 60)",
    )
    p.add_argument("--broadcasts", type=int, default=3, help="timed broadcasts to send")
    p.add_argument(
        "--broadcast-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for one broadcast to reach every connection",
    )
    p.add_argument("--broadcast-gap", type=float, default=0.5, help="seconds between broadcasts")
    p.add_argument("--out", default="bench-out", help="directory for bench.json/.csv/.png")
    p.add_argument(
        "--workers",
        default="auto",
        help="service --workers (auto = ceil(1.05 × conns / (RLIMIT_NOFILE - 500)): "
        "SO_REUSEPORT does not spread connections evenly)",
    )
    p.add_argument("--port", type=int, default=0, help="service port (0 = a free one)")
    p.add_argument("--path", default="/", help="stream path on the service")
    p.add_argument("--ping-interval", type=float, default=20.0, help="service --ping-interval")
    p.add_argument(
        "--procs",
        default="auto",
        help="client engine processes (auto = ceil(conns / (RLIMIT_NOFILE - 200)))",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=200,
        help="connections in progress at once per engine process",
    )
    p.add_argument(
        "--source-ips",
        default="auto",
        help="client source addresses (auto = 127.0.0.2-127.0.0.41 for loopback)",
    )
    p.add_argument(
        "--target",
        help="http(s)://host:port/path of another streaming server (no service is started)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="start the service with HTTPS (its --tls-cert); the clients then use TLS",
    )
    p.add_argument("--tls-key", metavar="PEM", help="the service's --tls-key")
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA the clients check the server certificate with (default: the system's)",
    )
    p.add_argument(
        "--publish-cmd",
        help="with --target: shell command that publishes one message; it gets the "
        "message in $COMET_BENCH_DATA and in place of {data} (shell-quoted)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress display while ramping (--no-progress: none)",
    )
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="nice value of the client engine processes (e.g. 10: the service gets the CPU "
        "first when both share a box)",
    )
    p.add_argument(
        "--ramp-down",
        action="store_true",
        help="end with a timed ramp-down: every client closes, until the service holds none",
    )
    p.add_argument(
        "--min-available-gib",
        type=float,
        default=2.0,
        help="stop the run when the host's MemAvailable falls below this",
    )
    p.add_argument("--preflight-only", action="store_true", help="print the preflight and exit")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.conns < 1 or args.rate <= 0 or args.hold < 0 or args.broadcasts < 0:
        parser.error("--conns and --rate must be positive, --hold and --broadcasts not negative")
    if bool(args.target) and args.broadcasts > 0 and not args.publish_cmd:
        parser.error("--target needs --publish-cmd to broadcast (or --broadcasts 0)")
    if args.publish_cmd and not args.target:
        parser.error("--publish-cmd only goes with --target")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and args.target:
        parser.error("--tls-cert starts the service with TLS; with --target use https://")
    for name in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(args, name)
        if path and not os.access(path, os.R_OK):
            parser.error(f"--{name.replace('_', '-')}: cannot read {path}")
        if path:
            setattr(args, name, os.path.abspath(path))
    console = Console()
    if args.preflight_only:
        host = urlsplit(args.target).hostname or "127.0.0.1" if args.target else "127.0.0.1"
        checks = preflight(
            args.conns,
            len(parse_source_ips(args.source_ips, host)),
            concurrency=args.concurrency,
            port=(urlsplit(args.target).port or 0) if args.target else args.port,
        )
        print_preflight(console, checks)
        sys.exit(0 if all(c.ok or not c.stops for c in checks) else 1)
    install_uvloop()
    try:
        report = asyncio.run(run_bench(args, console))
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        # KeyboardInterrupt/CancelledError: a Ctrl-C before the handlers were in (nothing had
        # been started yet).
        console.print("[yellow]comet-bench: interrupted; every started process was stopped[/]")
        sys.exit(130)
    except (BenchError, OSError, ValueError) as exc:
        sys.exit(f"comet-bench: {str(exc) or type(exc).__name__}")
    print_report(console, report)


if __name__ == "__main__":
    main()
