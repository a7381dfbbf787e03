"""Fan-out against the C peer: one broadcast to N held plain streams, comet-service against
nginx + Nchan with the same number of worker processes and the same clients, in one sitting.

    .venv/bin/python benchmarks/nchan_compare.py --conns 100000 --runs 3
    .venv/bin/python benchmarks/nchan_compare.py --conns 18000 --workers 1 --runs 3

(18,000 on one worker: an nginx worker under a 20,000 nofile limit starts closing connections
past ~18,700, "worker_connections are not enough".)

Nchan (Debian's ``libnginx-mod-nchan``; installed with apt when missing, as root) runs as
``worker_processes W`` with ``reuseport`` and an ``http-raw-stream`` subscriber location: a
plain stream where each message is a line, like ours. comet-service runs with ``--workers W``.
The clients are the same benchmarks/comet_clients.py processes (one per ~17,000 connections,
127.0.0.x source addresses) for both. Per run: a fresh server, N connections, a short settle,
one message (``BCAST``) published (Nchan: ``POST /pub``; ours: the control socket's
``broadcast``), and the time from the publish call to the moment the last client read it
(clients stamp ``time.time()`` per arrival). Runs alternate between the two servers. Prints one
line per run and a JSON summary with the medians and their ratio (ours / Nchan).

Beside the wall time, each run reads the CPU the server's processes and the clients' processes
ran (``/proc/PID/task/*/schedstat``) from the publish call until the clients were seen done
(polled every 0.2 s, so the clients' figure includes answering those polls). On one box the
clients share the cores: the wall time is the server's CPU plus what the scheduler's placement of
the clients costs it, and the server's CPU per broadcast compares the two servers' own work.
``--pin`` puts the server's processes on CPU 0 and the clients on the others after the ramp,
which takes the placement out.

``--before DIR`` adds a third server to every round: comet-service from another checkout (a
``git worktree`` of an earlier commit), so a change is compared with the code before it and with
Nchan in one sitting. The summary then also gives that code's ratio to Nchan and ours to it.

    git worktree add /tmp/before REV
    .venv/bin/python benchmarks/nchan_compare.py --conns 18000 --workers 1 --before /tmp/before
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

from tests.support.net import free_port, wait_for  # noqa: E402
from tests.support.service import Clients, Service, ran_ns, sources  # noqa: E402

NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NGINX = Path("/usr/sbin/nginx")

NGINX_CONF = """
load_module {module};
worker_processes {workers};
worker_rlimit_nofile {nofile};
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections {nofile};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    nchan_max_reserved_memory 512M;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=65535;
        location = /sub {{
            nchan_subscriber http-raw-stream;
            nchan_channel_id bench;
        }}
        location = /pub {{
            nchan_publisher;
            nchan_channel_id bench;
            nchan_message_buffer_length 10;
        }}
    }}
}}
"""


def ensure_nchan() -> None:
    if NGINX.exists() and NCHAN_MODULE.exists():
        return
    if os.geteuid() != 0:
        sys.exit("nginx + Nchan are not installed: apt-get install nginx-light libnginx-mod-nchan")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
        + ["nginx-light", "libnginx-mod-nchan"],
        check=True,
        env=env,
    )


class Nchan:
    def __init__(self, tmp: Path, port: int, workers: int, nofile: int) -> None:
        self.tmp = tmp
        self.port = port
        (tmp / "body").mkdir(parents=True, exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                module=NCHAN_MODULE, workers=workers, nofile=nofile, tmp=tmp, port=port
            )
        )
        self.proc = subprocess.Popen(
            [str(NGINX), "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "stderr.log", "wb"),  # noqa: SIM115 - the process owns it
        )
        wait_for(self._up, 15, "nginx")

    def _up(self) -> bool:
        assert self.proc.poll() is None, (self.tmp / "stderr.log").read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/nothing", timeout=1)
        except urllib.error.HTTPError:
            return True  # a 404: it answers
        except OSError:
            return False
        return True

    def publish(self) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/pub", data=b"BCAST", method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


def _pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), cpus)


def one_run(
    kind: str,
    tmp: Path,
    conns: int,
    workers: int,
    procs: int,
    pin: bool = False,
    code: Path | None = None,
) -> dict[str, float]:
    """One server of ``kind`` ("nchan", "comet", or "before": comet-service from ``code``)."""
    port = free_port()
    nofile = 20_000
    server: Nchan | Service
    if kind == "nchan":
        server = Nchan(tmp, port, workers, nofile)
        path, welcome = "/sub", ""  # Nchan greets no one: its response head is the sign
    else:
        code = code if kind == "before" else None
        server = Service(
            tmp, "--workers", str(workers), "--ping-interval", "60", port=port, code=code
        )
        server.wait_up(workers, 120)
        path, welcome = "/", "Welcome!"
    clients = None
    try:
        clients = Clients(
            *(port, conns, procs, sources(2, 40)),
            *("--path", path, "--concurrency", "300", "--welcome", welcome),
        )
        clients.wait("ready", conns, timeout=180, every=0.5)
        time.sleep(3)  # the ramp's last writes and timers settle
        servers = _tree(server.proc.pid)
        ours = [p.pid for p in clients.procs]
        if pin:
            _pin(servers, {0})
            _pin(ours, set(range(1, os.cpu_count() or 2)))
        ran0 = ran_ns(servers), ran_ns(ours)
        t0 = time.time()
        if isinstance(server, Nchan):
            server.publish()
        else:
            answer = server.ask({"op": "broadcast", "data": "BCAST", "channel": None})
            assert answer["ok"], answer
        st = clients.wait("msgs", conns, timeout=120, every=0.2)
        ran1 = ran_ns(servers), ran_ns(ours)
        return {
            "last_delivery_s": float(st["last_msg_t"]) - t0,
            "closed": float(st["closed"]),
            "server_cpu_s": (ran1[0] - ran0[0]) / 1e9,
            "clients_cpu_s": (ran1[1] - ran0[1]) / 1e9,
        }
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--conns", type=int, default=100_000, help="plain streams held by each server (%(default)s)"
    )
    ap.add_argument("--workers", type=int, default=0, help="processes each (0: the service's auto)")
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="broadcasts timed on each server, the servers alternating (%(default)s)",
    )
    ap.add_argument("--clients", type=int, default=0, help="client processes (0: one a 17,000)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="after the ramp, the server's processes on CPU 0 and the clients on the others",
    )
    ap.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="a third server in every round: comet-service from the checkout DIR (the code "
        "before a change)",
    )
    args = ap.parse_args()
    if args.conns < 1 or args.runs < 1 or args.workers < 0 or args.clients < 0:
        ap.error("--conns and --runs must be 1 or more, --workers and --clients 0 or more")
    if args.before is not None and not (args.before / "service" / "__main__.py").is_file():
        ap.error(f"--before {args.before}: no service package there (service/__main__.py)")
    ensure_nchan()
    from loadgen.bench.report import cpu_model
    from service.config import Config

    workers = args.workers or Config(target_connections=args.conns).worker_count(20_000)
    procs = args.clients or max(1, -(-args.conns // 17_000))
    if args.pin and (os.cpu_count() or 1) < 2:
        sys.exit("--pin needs two CPUs or more")
    kinds = ["nchan", "comet"] + (["before"] if args.before is not None else [])
    results: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, dict[str, list[float]]] = {k: {"server": [], "clients": []} for k in kinds}
    for i in range(args.runs):
        # Each round in another order: none of the servers always runs first or last.
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            tmp = Path(tempfile.mkdtemp(prefix=f"nchan-compare-{kind}-"))
            try:
                r = one_run(kind, tmp, args.conns, workers, procs, args.pin, args.before)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            results[kind].append(r["last_delivery_s"])
            cpu[kind]["server"].append(r["server_cpu_s"])
            cpu[kind]["clients"].append(r["clients_cpu_s"])
            print(
                f"{kind} run {i + 1}: last delivery {r['last_delivery_s']:.3f} s, "
                f"CPU: server {r['server_cpu_s']:.3f} s, clients {r['clients_cpu_s']:.3f} s",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in results.items()}
    cpu_med = {k: {w: statistics.median(v) for w, v in d.items()} for k, d in cpu.items()}
    before: dict[str, Any] = {}
    if args.before is not None:
        before = {
            "before": str(args.before),
            "ratio_before_to_nchan": round(med["before"] / med["nchan"], 2),
            "ratio_comet_to_before": round(med["comet"] / med["before"], 2),
        }
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "conns": args.conns,
                "workers": workers,
                "client_processes": procs,
                "runs": {k: [round(x, 3) for x in v] for k, v in results.items()},
                "median_s": {k: round(v, 3) for k, v in med.items()},
                "ratio_comet_to_nchan": round(med["comet"] / med["nchan"], 2),
                "pinned": args.pin,
                "cpu_median_s": {
                    k: {w: round(v, 4) for w, v in d.items()} for k, d in cpu_med.items()
                },
                "server_cpu_ratio_comet_to_nchan": round(
                    cpu_med["comet"]["server"] / cpu_med["nchan"]["server"], 2
                ),
                **before,
            }
        )
    )


if __name__ == "__main__":
    main()
