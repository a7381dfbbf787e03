"""Worker benchmarks: RSS per idle connection and one broadcast to all, N connections, 1 worker
(or the whole service with ``--workers W``), each figure also as a ratio to the floor.

    .venv/bin/python benchmarks/worker_bench.py --n 19000 --clients 2 --runs 3
    .venv/bin/python benchmarks/worker_bench.py --n 100000 --workers 6 --clients 6 --ping 20

The worker runs as the supervisor would start it (``python -m service.worker --control-fd``);
this script speaks the internal protocol over the socketpair. Clients run in separate processes
(``benchmarks/comet_clients.py``, one source address each) because one process cannot hold the
worker's 19,000 sockets plus 19,000 client sockets under a 20,000 fd limit.

Per run: RSS of the worker after it started (r0), after all N connections read Welcome! and the
request-head deadlines passed (r1): per connection = (r1 - r0) / N. Then one broadcast to all:
time from sending it to the moment the last client read it (clients stamp time.time()). CPU (the
server process's user + system): per accepted connection, per connection per second while
holding idle, and per delivery of the broadcast. The same measurements run against
benchmarks/bare_server.py, the floor (a bare uvloop Protocol: no parsing, no hub, no pings unless
``--ping``; its broadcast is one loop over its transports); with ``--server both`` the last line
gives every figure of the service as a ratio to the floor's.

``--workers W`` (W > 1) runs the service as users do, ``python -m service --workers W`` (the
supervisor and its W workers sharing the port), against W copies of the floor sharing the port
(SO_REUSEPORT); every CPU and RSS figure is the sum over all of the server's processes (the
supervisor included), and the broadcast goes through the control socket. ``--ping S`` gives both
the same keep-alive: the service's ``--ping-interval S`` and the floor's ping loop every S s (the
idle figures then have a ratio; hold at least two intervals, ``--settle``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository's shared helpers

from tests.support.net import free_port  # noqa: E402
from tests.support.service import Clients, sources  # noqa: E402

PY = sys.executable


SECRET = "worker-bench-secret-0123456789abcdef"


class CometServer:
    """One worker, started as the supervisor would and driven over its control socketpair."""

    def __init__(self, port: int, ping: float, timeout_header: float, **extra: Any) -> None:
        from service.config import Config

        cfg = Config(
            host="127.0.0.1",
            port=port,
            ping_interval=ping or 3600.0,
            timeout_header=timeout_header,
            **extra,
        )
        ours, theirs = socket.socketpair()
        self.ctl = ours
        self.rfile = ours.makefile("rb")
        self.proc = subprocess.Popen(
            [PY, "-m", "service.worker", "--control-fd", str(theirs.fileno())],
            cwd=ROOT,
            pass_fds=[theirs.fileno()],
            env={
                **os.environ,
                "COMET_WORKER_CONFIG": cfg.to_json(),
                "COMET_WORKER_INDEX": "0",
                "COMET_TOKEN_SECRET": SECRET,
            },
            stderr=subprocess.DEVNULL,
        )
        theirs.close()
        ready = json.loads(self.rfile.readline())
        assert ready["op"] == "ready", ready
        self.rid = 0
        self.ask("init", last_id=0, history=[])

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        self.rid += 1
        self.ctl.sendall(json.dumps({"rid": self.rid, "op": op, **kw}).encode() + b"\n")
        while True:
            ans = json.loads(self.rfile.readline())
            if ans.get("rid") == self.rid:
                return dict(ans)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.rfile.close()
        self.ctl.close()

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def broadcast(self) -> tuple[int, float]:
        """Recipients and the worker's write time in ms."""
        msg = {"id": 1, "channel": None, "event": None, "data": "BCAST", "ts": time.time()}
        ans = self.ask("broadcast", msg=msg)
        return int(ans["recipients"]), float(ans["elapsed_ms"])

    def lag_max(self) -> float:
        """The worker's loop lag max (ms) since it started."""
        return float(self.ask("stats")["stats"]["lag_ms"]["max"])

    def conns(self) -> int:
        return int(self.ask("stats")["stats"]["conns"])


class CometService:
    """``python -m service --workers W``: the supervisor and its workers, as users run it."""

    def __init__(
        self, port: int, workers: int, ping: float, timeout_header: float, **extra: Any
    ) -> None:
        import tempfile
        from pathlib import Path

        from tests.support.service import Service

        flags = ["--workers", str(workers), "--ping-interval", str(ping or 3600.0)]
        flags += ["--timeout-header", str(timeout_header)]
        for name, value in extra.items():
            flags += [f"--{name.replace('_', '-')}", str(value)]
        tmp = Path(tempfile.mkdtemp(prefix="worker-bench-service-"))
        self.svc = Service(tmp, *flags, port=port, env={"COMET_TOKEN_SECRET": SECRET})
        self.svc.wait_up(workers, timeout=60, with_frame=True)
        pid = self.svc.proc.pid
        self._pids = [pid, *(p.pid for p in psutil.Process(pid).children())]
        assert len(self._pids) == workers + 1, self._pids

    def pids(self) -> list[int]:
        return self._pids

    def broadcast(self) -> tuple[int, float]:
        """Recipients and the control answer's round trip in ms (all workers written)."""
        t0 = time.perf_counter()
        ans = self.svc.ask({"op": "broadcast", "data": "BCAST"})
        ms = (time.perf_counter() - t0) * 1000
        assert ans.get("ok"), ans
        return int(ans["recipients"]), ms

    def lag_max(self) -> float:
        """The worst worker's loop lag max (ms) in the next frame (the last second's)."""
        time.sleep(1.2)
        return float(max(w["lag_ms"]["max"] for w in self.svc.frame()["workers"]))

    def conns(self) -> int:
        return int(self.svc.frame()["totals"]["conns"])

    def stop(self) -> None:
        self.svc.stop()


class BareServer:
    """``count`` copies of benchmarks/bare_server.py on one port (SO_REUSEPORT when > 1)."""

    def __init__(
        self, port: int, count: int = 1, ping: float = 0.0, raw: bool = False, defer: int = 0
    ) -> None:
        cmd = [PY, os.path.join(ROOT, "benchmarks", "bare_server.py"), "--port", str(port)]
        if raw:
            cmd.append("--raw")
        if defer:
            cmd += ["--defer-accept", str(defer)]
        if count > 1:
            cmd.append("--reuseport")
        if ping:
            cmd += ["--ping", str(ping)]
        self.procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE) for _ in range(count)]
        for p in self.procs:
            assert p.stdout is not None
            assert b"listening" in p.stdout.readline()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def broadcast(self) -> tuple[int, float]:
        """One message to every connection (SIGUSR1 to every copy at once): the connections
        written to, and the milliseconds the slowest copy's write loop took."""
        for p in self.procs:
            p.send_signal(signal.SIGUSR1)
        recipients, ms = 0, 0.0
        for p in self.procs:
            assert p.stdout is not None
            _, count, took = p.stdout.readline().split()  # "broadcast N MS"
            recipients += int(count)
            ms = max(ms, float(took))
        return recipients, ms

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def start_clients(
    port: int,
    n: int,
    k: int,
    tls: bool = False,
    private: int = 0,
    tokens_file: str = "",
    concurrency: int = 500,
) -> list[Clients]:
    """``k`` processes of benchmarks/comet_clients.py for ``n`` connections, one source address
    each; ``private`` of them (in a process of their own) subscribe to a private channel, each
    with its own token from ``tokens_file``. Returns once every connection read its first
    bytes."""
    groups: list[Clients] = []
    tls_args = ["--tls"] if tls else []
    public = n - private
    try:
        if public:
            procs = min(k, public)
            groups.append(
                Clients(
                    port,
                    public,
                    procs,
                    sources(2, procs),
                    *("--concurrency", str(concurrency), *tls_args),
                )
            )
        if private:
            groups.append(
                Clients(
                    port,
                    private,
                    1,
                    sources(2 + k, 1),
                    *("--concurrency", str(concurrency), "--path", "/sub/private-bench"),
                    *("--tokens-file", tokens_file, *tls_args),
                )
            )
        for g in groups:
            g.wait("ready", g.n, timeout=300, every=0.01)
    except BaseException:
        stop_clients(groups)
        raise
    return groups


def stop_clients(groups: list[Clients]) -> None:
    for g in groups:
        g.close()


def rss(pids: list[int]) -> int:
    return sum(int(psutil.Process(pid).memory_info().rss) for pid in pids)


def slab_kb() -> int:
    """The kernel's slab memory (socket structures live there), from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (the server's, summed)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes (the server's, summed)."""
    user = system = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        user += t.user
        system += t.system
    return user, system


def tls_files() -> dict[str, str]:
    """A throw-away certificate for 127.0.0.1 (benchmarks/make_test_cert.py, trustme)."""
    import tempfile
    from pathlib import Path

    from make_test_cert import write  # this folder is on sys.path when run as a script

    files = write(Path(tempfile.mkdtemp(prefix="worker-bench-tls-")))
    return {"tls_cert": str(files["cert"]), "tls_key": str(files["key"])}


def token_file(n: int, grant: str = "shared") -> str:
    """``n`` distinct subscriber tokens (HS256), one a line: each client has its own, as an
    application's users would. ``grant``: ``shared``, every token grants ``private-*``; ``own``,
    each grants its user's own channel by name and the channel the bench subscribes to
    (``["private-user-I", "private-bench"]``, README's example of a per-user token)."""
    import tempfile

    import jwt

    exp = int(time.time()) + 3600
    fd, path = tempfile.mkstemp(prefix="worker-bench-tokens-")
    with os.fdopen(fd, "w") as f:
        for i in range(n):
            channels = (
                ["private-*"] if grant == "shared" else [f"private-user-{i}", "private-bench"]
            )
            claims = {"sub": f"user-{i}", "channels": channels, "exp": exp}
            f.write(jwt.encode(claims, SECRET, algorithm="HS256") + "\n")
    return path


def run_once(
    kind: str,
    n: int,
    k: int,
    settle: float,
    timeout_header: float,
    tls: bool = False,
    private: int = 0,
    workers: int = 1,
    ping: float = 0.0,
    defer_accept: int | None = None,
    concurrency: int = 500,
    tls_offload: bool = True,
    grant: str = "shared",
    floor: str = "uvloop",
    floor_defer: int = 0,
    plane: str = "uvloop",
) -> dict[str, float]:
    port = free_port()
    server: CometServer | CometService | BareServer
    extra: dict[str, Any] = tls_files() if tls else {}
    if tls and not tls_offload:
        extra["tls_offload"] = False
    if defer_accept is not None:
        extra["defer_accept"] = defer_accept
    if plane != "uvloop":
        extra["plane"] = plane
    if private:
        extra["private_channels"] = "private-*"
    tokens = token_file(private, grant) if private else ""
    if kind == "bare":
        server = BareServer(port, workers, ping, floor == "raw", floor_defer)
    elif workers > 1:
        server = CometService(port, workers, ping, timeout_header, **extra)
    else:
        server = CometServer(port, ping, timeout_header, **extra)
    pids = server.pids()
    clients: list[Clients] = []
    try:
        time.sleep(0.5)
        r0 = rss(pids)
        k0 = slab_kb()
        u0, s0 = cpu_split(pids)
        t_conn = time.perf_counter()
        clients = start_clients(port, n, k, tls, private, tokens, concurrency)
        connect_s = time.perf_counter() - t_conn
        u1, s1 = cpu_split(pids)
        r_ready = rss(pids)
        c_idle0 = cpu_s(pids)
        time.sleep(settle)
        c_idle1 = cpu_s(pids)
        r1 = rss(pids)
        k1 = slab_kb()
        out = {
            "connect_s": connect_s,
            "rss0_mb": r0 / 2**20,
            "rss_ready_per_conn": (r_ready - r0) / n,
            "rss_per_conn": (r1 - r0) / n,
            # The server's own CPU (user + sys, all its processes) per accepted connection:
            # accept, TLS handshake when on, head parse and token check, welcome write.
            "cpu_per_accept_us": (u1 + s1 - u0 - s0) / n * 1e6,
            # ... of which in the kernel (system time: accept, reads, writes, epoll).
            "sys_per_accept_us": (s1 - s0) / n * 1e6,
            # Kernel slab per connection pair (both ends are on this machine).
            "kernel_per_conn": (k1 - k0) * 1024 / n,
            # Holding idle: the server's CPU per connection per second (pings every --ping when
            # given; the service's lag sampler and stats always run; the floor does nothing else).
            "idle_cpu_ns_per_conn_s": (c_idle1 - c_idle0) / settle / n * 1e9,
        }
        if not isinstance(server, BareServer):
            held = server.conns()
            assert held == n, (held, n)
        before = [g.stats()["msgs"] for g in clients]
        c_b0 = cpu_s(pids)
        t0 = time.time()
        recipients, out["broadcast_worker_ms"] = server.broadcast()
        lasts = []
        got = 0
        # The clients stamp each arrival themselves: ask them only after the server has
        # answered (asking during the fan-out would take CPU from the server it measures).
        for g, b in zip(clients, before, strict=True):
            st = g.wait("msgs", b + g.n, timeout=60, every=0.1)  # every connection once
            got += st["msgs"] - b
            lasts.append(float(st["last_msg_t"]))
        assert got == n and recipients == n, (got, recipients)
        # The server's CPU for the broadcast (and the few stats answers around it), per
        # connection written to.
        out["cpu_per_delivery_us"] = (cpu_s(pids) - c_b0) / n * 1e6
        out["broadcast_s"] = max(lasts) - t0
        if not isinstance(server, BareServer):
            out["lag_max_ms"] = server.lag_max()
        return out
    finally:
        stop_clients(clients)
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=19000, help="connections per run")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--runs", type=int, default=3, help="runs per server (medians reported)")
    ap.add_argument(
        "--server",
        choices=["comet", "bare", "both"],
        default="both",
        help="the service's worker, the floor (bare_server.py), or both with the ratio",
    )
    ap.add_argument(
        "--timeout-header", type=float, default=10.0, help="the worker's --timeout-header (s)"
    )
    ap.add_argument("--settle", type=float, default=11.0, help="seconds before the RSS read")
    ap.add_argument("--tls", action="store_true", help="HTTPS: the worker with a test certificate")
    ap.add_argument(
        "--no-tls-offload",
        action="store_true",
        help="with --tls: the service's --no-tls-offload (OpenSSL keeps every connection)",
    )
    ap.add_argument(
        "--private",
        type=int,
        default=0,
        help="of the n connections, this many subscribe to a private channel with a token each",
    )
    ap.add_argument(
        "--grant",
        choices=["shared", "own"],
        default="shared",
        help="with --private: every token grants private-* (shared), or each its user's own "
        "channel by name plus the bench's (own)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="W > 1: the whole service with W workers against W copies of the floor",
    )
    ap.add_argument(
        "--ping",
        type=float,
        default=0.0,
        help="seconds between pings, the same for the service and the floor (0: no pings)",
    )
    ap.add_argument(
        "--defer-accept",
        type=int,
        default=None,
        help="the service's --defer-accept for this run (default: the service's default)",
    )
    ap.add_argument(
        "--client-concurrency",
        type=int,
        default=500,
        help="connections each client process has in flight while connecting: how many new "
        "connections the server finds at each wake-up",
    )
    ap.add_argument(
        "--floor",
        choices=["uvloop", "raw"],
        default="uvloop",
        help="the floor: uvloop transports (bare_server.py), or bare sockets in one epoll "
        "(bare_server.py --raw, below what uvloop's transports cost)",
    )
    ap.add_argument(
        "--floor-defer-accept",
        type=int,
        default=0,
        metavar="S",
        help="TCP_DEFER_ACCEPT seconds for the floor's listener, as the service's default "
        "--defer-accept 1 (default 0: off, as the floor's figures so far)",
    )
    ap.add_argument(
        "--plane",
        choices=["uvloop", "raw"],
        default="uvloop",
        help="the service's --plane: uvloop's transports, or bare sockets in one epoll per "
        "worker (raw; plain HTTP only)",
    )
    args = ap.parse_args()
    if args.workers < 1 or args.n < 1 or args.clients < 1 or args.runs < 1:
        ap.error("--n, --clients, --runs and --workers must be at least 1")
    if args.plane == "raw" and args.tls:
        ap.error("--plane raw holds plain HTTP only (no --tls)")
    if args.ping and args.settle < 2 * args.ping:
        print(f"note: --settle {args.settle} holds less than two --ping intervals", flush=True)
    kinds = ["comet", "bare"] if args.server == "both" else [args.server]
    medians: dict[str, dict[str, float]] = {}
    for kind in kinds:
        runs = []
        for i in range(args.runs):
            r = run_once(
                kind,
                args.n,
                args.clients,
                args.settle,
                args.timeout_header,
                args.tls,
                args.private,
                args.workers,
                args.ping,
                args.defer_accept,
                args.client_concurrency,
                not args.no_tls_offload,
                args.grant,
                args.floor,
                args.floor_defer_accept,
                args.plane,
            )
            runs.append(r)
            print(
                f"{kind} run {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()),
                flush=True,
            )
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        medians[kind] = med
        print(
            f"{kind} MEDIAN of {len(runs)} (n={args.n}): "
            + ", ".join(f"{k}={v:.4g}" for k, v in med.items()),
            flush=True,
        )
    if len(medians) == 2:
        # Every figure as a ratio to the floor (benchmarks/bare_server.py), same sitting.
        comet, bare = medians["comet"], medians["bare"]
        ratios = {k: comet[k] / bare[k] for k in comet if k in bare and bare[k] > 0}
        print(
            "RATIO comet / floor: " + ", ".join(f"{k}={v:.3g}" for k, v in ratios.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
