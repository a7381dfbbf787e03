"""The service a bench runs against: started in its own process group on a port no stranger
shares, followed over its control socket, and stopped with its whole tree."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loadgen.bench.options import BenchError, Options
from loadgen.bench.record import Record
from loadgen.engine.sources import FD_RESERVE, Namespace, nofile_capacity
from service.config import Config
from service.supervisor.portcheck import ss_listeners


def service_workers(conns: int, nofile: int) -> int:
    """The service's own ``--workers auto`` count for ``conns`` (it has the hash headroom)."""
    return Config(target_connections=conns).worker_count(nofile)


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
    """One request on the service's control socket (JSON lines). No answer within ``timeout``
    is a BenchError that names the request (an asyncio timeout says nothing: the run ended on
    "comet-bench: TimeoutError" when a million's broadcast outlasted --broadcast-timeout)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(timeout):
                line = await reader.readline()
        finally:
            writer.close()
    except TimeoutError:
        raise BenchError(
            f"control socket {path}: no answer to {request.get('op')!r} within {timeout:g} s"
        ) from None
    if not line:
        raise BenchError(f"control socket {path}: closed without an answer")
    answer: dict[str, Any] = json.loads(line)
    if not answer.get("ok"):
        raise BenchError(f"control socket {path}: {answer.get('error')}")
    return answer


def tree_pids(pids: list[int]) -> set[int]:
    """The given pids and those of all their descendants (that are still alive)."""
    out = set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.update(q.pid for q in psutil.Process(pid).children(recursive=True))
    return out


def tree_rss(pids: list[int]) -> int:
    """RSS in bytes of the given processes and all their descendants."""
    total = 0
    for pid in tree_pids(pids):
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


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


def listening_strangers(port: int, roots: list[int]) -> list[int]:
    """Pids listening on ``port`` that are neither one of ``roots`` nor a descendant of one.

    Decided by each listener's ancestry, not by a list of the service's children taken
    beforehand: the service answers as soon as its first worker listens, and with 27 workers
    the later ones were forked between such a list and the listener scan, so they looked like
    strangers and every attempt failed ("could not find a port ...").
    """
    out = []
    for pid in listening_pids(port):
        try:
            line = ancestry(pid)
        except psutil.Error:
            continue  # gone, so no longer listening
        if not line.intersection(roots):
            out.append(pid)
    return out


def ancestry(pid: int) -> set[int]:
    """``pid`` and its ancestors up to init. A parent that exits while this walks is read past:
    the forkserver exits right after forking the workers, and a worker whose parent was read
    as the forkserver just before it was reaped then counted as nobody's (psutil's
    ``parents()`` stops there): a stranger, and the run failed ("shared with processes").
    Its children are re-parented to the supervisor by then, so the parent is read again."""
    line = {pid}
    proc = psutil.Process(pid)
    for _ in range(256):  # a chain that long is not a process tree's
        ppid = proc.ppid()
        if ppid <= 1 or ppid in line:
            break
        try:
            parent = psutil.Process(ppid)
        except psutil.NoSuchProcess:
            continue  # exited meanwhile: proc has a new parent now
        line.add(ppid)
        proc = parent
    return line


@dataclass
class Service:
    proc: subprocess.Popen[bytes] | None
    port: int
    socket_path: str | None
    log_dir: Path | None
    pids: list[int] = field(default_factory=list)
    workers: int = 0  # the workers it was started with (0: not ours)

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


async def start_service(
    opts: Options,
    out: Path,
    run_dir: str,
    host: str = "127.0.0.1",
    netns: Namespace | None = None,
) -> Service:
    """Start the service on ``host`` and a port nobody else listens on (retrying on another
    port if needed); with ``netns``, inside that namespace, made for it and empty, so nobody
    else can listen there."""
    if netns is not None:
        return await _start_service_on(opts, out, run_dir, host, opts.port or free_port(), netns)
    for _attempt in range(3):
        port = opts.port or free_port()
        if listening_pids(port):
            if opts.port:
                raise BenchError(f"--port {port}: another process already listens there")
            continue
        svc = await _start_service_on(opts, out, run_dir, host, port)
        # SO_REUSEPORT lets any other process of this user bind the same port and silently take
        # a share of our connections, so make sure every listener on it is ours.
        strangers = listening_strangers(port, svc.pids)
        if not strangers:
            return svc
        svc.stop()
        if opts.port:
            raise BenchError(f"--port {port}: shared with processes {sorted(strangers)}")
    raise BenchError("could not find a port that no other process listens on")


async def _start_service_on(
    opts: Options, out: Path, run_dir: str, host: str, port: int, netns: Namespace | None = None
) -> Service:
    sock = os.path.join(run_dir, "control.sock")
    log_dir = out / "service-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = (
        int(opts.workers)
        if opts.workers != "auto"
        else service_workers(opts.conns, nofile_capacity() + FD_RESERVE)
    )
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--target-connections",
        str(opts.conns),
        "--control-socket",
        sock,
        "--log-dir",
        str(log_dir),
        "--screen",
        "off",
        "--ping-interval",
        str(opts.ping_interval),
        "--grace",
        "5",
    ]
    if opts.tls_cert and opts.tls_key:
        cmd += ["--tls-cert", opts.tls_cert, "--tls-key", opts.tls_key]
    if netns is not None:
        cmd = netns.wrap(cmd)  # `ip netns exec` execs the service: the pid stays its own
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
    svc = Service(proc, port, sock, log_dir, [proc.pid], workers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (out / "service.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"the service exited with {proc.returncode}:\n{tail}")
        try:
            health = await control(sock, {"op": "health"}, timeout=2.0)
            if await _port_open(host, port, netns):
                # Workers still importing are not up yet: say of how many (54 at a million).
                up = health.get("workers")
                print(
                    f"service up: pid {proc.pid}, {up} of {workers} workers so far, port {port}",
                    flush=True,
                )
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


async def _port_open(host: str, port: int, netns: Namespace | None = None) -> bool:
    """Whether ``host:port`` takes a connection (from inside ``netns`` when given: the host's
    own namespace has no route to the service's)."""
    if netns is not None:
        probe = f"import socket; socket.create_connection(({host!r}, {port}), 2).close()"
        proc = await asyncio.create_subprocess_exec(
            *netns.wrap([sys.executable, "-c", probe]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(10.0):
                return await proc.wait() == 0
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return False
    try:
        async with asyncio.timeout(2.0):
            _r, w = await asyncio.open_connection(host, port)
    except (TimeoutError, OSError):
        return False
    w.close()
    return True


async def watch_frames(sock: str, record: Record) -> None:
    """Follow the service's frames (control ``watch``) for the worst loop lag and conns."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(sock, limit=16 << 20)
            writer.write(b'{"op":"watch"}\n')
            await writer.drain()
            while line := await reader.readline():
                frame = json.loads(line).get("frame")
                if frame:
                    record.add_frame(frame)
        except (OSError, ValueError):
            pass
        await asyncio.sleep(1.0)  # the service restarted or is not up yet: follow it again


async def publish(opts: Options, svc: Service, data: str) -> int | None:
    """Send one broadcast; the recipient count when the server tells it."""
    if svc.socket_path is not None:
        # The answer comes when every worker has written its share: ~22-30 s at 1,000,000 on
        # 2 shared cores, so the default 30 s control timeout aborted a million run.
        answer = await control(
            svc.socket_path,
            {"op": "broadcast", "data": data, "channel": None, "event": None},
            timeout=max(30.0, opts.broadcast_timeout),
        )
        return int(answer.get("recipients", 0))
    assert opts.publish_cmd is not None  # Options.problem: --target without it broadcasts none
    cmd = opts.publish_cmd.replace("{data}", shlex.quote(data))
    env = {**os.environ, "COMET_BENCH_DATA": data}
    proc = await asyncio.create_subprocess_shell(
        cmd, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            _out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError("--publish-cmd did not finish within 30 s") from None
    if proc.returncode != 0:
        raise BenchError(f"--publish-cmd exited {proc.returncode}: {err.decode()[-500:]}")
    return None
