"""Worker benchmarks: RSS per idle connection and one broadcast to all, N connections, 1 worker.

    .venv/bin/python benchmarks/worker_bench.py --n 19000 --clients 2 --runs 3

The worker runs as the supervisor would start it (``python -m service.worker --control-fd``);
this script speaks the internal protocol over the socketpair. Clients run in separate processes
(``benchmarks/comet_clients.py``, one source address each) because one process cannot hold the
worker's 19,000 sockets plus 19,000 client sockets under a 20,000 fd limit.

Per run: RSS of the worker after it started (r0), after all N connections read Welcome! and the
request-head deadlines passed (r1): per connection = (r1 - r0) / N. Then one broadcast to all:
time from sending it to the moment the last client read it (clients stamp time.time()). CPU (the
server process's user + system): per accepted connection, per connection per second while
holding idle, and per delivery of the broadcast. The same measurements run against
benchmarks/bare_server.py, the floor (a bare uvloop Protocol: no parsing, no hub, no pings; its
broadcast is one loop over its transports); with ``--server both`` the last line gives every
figure of the service as a ratio to the floor's.
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
    def __init__(self, port: int, timeout_header: float, **extra: Any) -> None:
        from service.config import Config

        cfg = Config(
            host="127.0.0.1",
            port=port,
            ping_interval=3600.0,
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


class BareServer:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [PY, os.path.join(ROOT, "benchmarks", "bare_server.py"), "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert b"listening" in self.proc.stdout.readline()

    def broadcast(self) -> float:
        """One message to every connection (SIGUSR1); the milliseconds the write loop took."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        return float(self.proc.stdout.readline().split()[2])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_clients(
    port: int, n: int, k: int, tls: bool = False, private: int = 0, tokens_file: str = ""
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
                Clients(port, public, procs, sources(2, procs), "--concurrency", "500", *tls_args)
            )
        if private:
            groups.append(
                Clients(
                    port,
                    private,
                    1,
                    sources(2 + k, 1),
                    *("--concurrency", "500", "--path", "/sub/private-bench"),
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


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def slab_kb() -> int:
    """The kernel's slab memory (socket structures live there), from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def tls_files() -> dict[str, str]:
    """A throw-away certificate for 127.0.0.1 (benchmarks/make_test_cert.py, trustme)."""
    import tempfile
    from pathlib import Path

    from make_test_cert import write  # this folder is on sys.path when run as a script

    files = write(Path(tempfile.mkdtemp(prefix="worker-bench-tls-")))
    return {"tls_cert": str(files["cert"]), "tls_key": str(files["key"])}


def token_file(n: int) -> str:
    """``n`` distinct subscriber tokens (HS256), one a line: each client has its own, as an
    application's users would."""
    import tempfile

    import jwt

    exp = int(time.time()) + 3600
    fd, path = tempfile.mkstemp(prefix="worker-bench-tokens-")
    with os.fdopen(fd, "w") as f:
        for i in range(n):
            claims = {"sub": f"user-{i}", "channels": ["private-*"], "exp": exp}
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
) -> dict[str, float]:
    port = free_port()
    server: CometServer | BareServer
    extra: dict[str, Any] = tls_files() if tls else {}
    if private:
        extra["private_channels"] = "private-*"
    tokens = token_file(private) if private else ""
    server = CometServer(port, timeout_header, **extra) if kind == "comet" else BareServer(port)
    pid = server.proc.pid
    clients: list[Clients] = []
    try:
        time.sleep(0.5)
        r0 = rss(pid)
        k0 = slab_kb()
        c0 = cpu_s(pid)
        t_conn = time.perf_counter()
        clients = start_clients(port, n, k, tls, private, tokens)
        connect_s = time.perf_counter() - t_conn
        c1 = cpu_s(pid)
        r_ready = rss(pid)
        c_idle0 = cpu_s(pid)
        time.sleep(settle)
        c_idle1 = cpu_s(pid)
        r1 = rss(pid)
        k1 = slab_kb()
        out = {
            "connect_s": connect_s,
            "rss0_mb": r0 / 2**20,
            "rss_ready_per_conn": (r_ready - r0) / n,
            "rss_per_conn": (r1 - r0) / n,
            # The server process's own CPU (user + sys) per accepted connection: accept, TLS
            # handshake when on, head parse and token check, welcome write.
            "cpu_per_accept_us": (c1 - c0) / n * 1e6,
            # Kernel slab per connection pair (both ends are on this machine).
            "kernel_per_conn": (k1 - k0) * 1024 / n,
            # Holding idle: the server's CPU per connection per second (the service pings every
            # --ping-interval, its lag sampler and stats run; the floor does nothing).
            "idle_cpu_ns_per_conn_s": (c_idle1 - c_idle0) / settle / n * 1e9,
        }
        if isinstance(server, BareServer):
            before = [g.stats()["msgs"] for g in clients]
            c_b0 = cpu_s(pid)
            t0 = time.time()
            out["broadcast_worker_ms"] = server.broadcast()
            lasts = []
            for g, b in zip(clients, before, strict=True):
                st = g.wait("msgs", b + g.n, timeout=30, every=0.1)
                lasts.append(float(st["last_msg_t"]))
            out["broadcast_s"] = max(lasts) - t0
            out["cpu_per_delivery_us"] = (cpu_s(pid) - c_b0) / n * 1e6
        if isinstance(server, CometServer):
            st = server.ask("stats")["stats"]
            assert st["conns"] == n, st
            before = [g.stats()["msgs"] for g in clients]
            msg = {"id": 1, "channel": None, "event": None, "data": "BCAST", "ts": time.time()}
            c_b0 = cpu_s(pid)
            t0 = time.time()
            ans = server.ask("broadcast", msg=msg)
            lasts = []
            got = 0
            # The clients stamp each arrival themselves: ask them only after the worker has
            # answered (asking during the fan-out would take CPU from the worker it measures).
            for g, b in zip(clients, before, strict=True):
                st = g.wait("msgs", b + g.n, timeout=30, every=0.1)  # every connection once
                got += st["msgs"] - b
                lasts.append(float(st["last_msg_t"]))
            assert got == n and ans["recipients"] == n, (got, ans)
            # The worker's CPU for the broadcast (and the few stats answers around it), per
            # connection written to.
            out["cpu_per_delivery_us"] = (cpu_s(pid) - c_b0) / n * 1e6
            out["broadcast_s"] = max(lasts) - t0
            out["broadcast_worker_ms"] = float(ans["elapsed_ms"])
            lag = server.ask("stats")["stats"]["lag_ms"]
            out["lag_max_ms"] = float(lag["max"])
        return out
    finally:
        stop_clients(clients)
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=19000)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--server", choices=["comet", "bare", "both"], default="both")
    ap.add_argument("--timeout-header", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=11.0, help="seconds before the RSS read")
    ap.add_argument("--tls", action="store_true", help="HTTPS: the worker with a test certificate")
    ap.add_argument(
        "--private",
        type=int,
        default=0,
        help="of the n connections, this many subscribe to a private channel with a token each",
    )
    args = ap.parse_args()
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
