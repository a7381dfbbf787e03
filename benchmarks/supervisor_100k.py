"""Supervisor benchmark: 100,000 connections on this machine, then broadcasts to all of them.

    .venv/bin/python benchmarks/supervisor_100k.py [--conns 100000] [--runs 3] [--broadcasts 5]

Each run starts ``python -m service --workers auto --target-connections N`` on a free port (6
workers under a 20,000 nofile limit), then ``--clients`` processes of benchmarks/comet_clients.py
spread over 127.0.0.2–127.0.0.41 (IP_BIND_ADDRESS_NO_PORT). Measured per run:

- ramp: seconds from starting the clients until every connection got its ``Welcome!``;
- RSS per connection: (workers' RSS with N connections − their idle RSS) / N, from the frame;
- broadcast: seconds from sending ``broadcast`` on the control socket until the last client
  received it (client receive clocks, same host), median of ``--broadcasts`` broadcasts;
- lag: the worst worker loop lag (p90, p99 and max, from each worker's 10 ms sampler) in the
  frames covering the broadcasts.

Prints one JSON line per run and a summary with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

from tests.support.control import Control  # noqa: E402
from tests.support.net import free_port, wait_for  # noqa: E402
from tests.support.service import Clients, sources  # noqa: E402


class Watcher(threading.Thread):
    """Collects every frame from a ``watch`` connection."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.control = Control(path)
        self.frames: list[dict[str, Any]] = []

    def run(self) -> None:
        self.control.file.write(b'{"op":"watch"}\n')
        self.control.file.flush()
        try:
            for line in self.control.file:
                frame = json.loads(line).get("frame")
                if frame:
                    self.frames.append(frame)
        except (OSError, ValueError):
            return


def _placement(nice: int, cpus: set[int] | None) -> Callable[[], None]:
    """A preexec_fn that sets the child's nice value and CPU affinity."""

    def place() -> None:
        if nice:
            os.nice(nice)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return place


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="comet-bench-"))
    port = free_port()
    sock_path = str(tmp / "control.sock")
    err = open(tmp / "supervisor.err", "wb")  # noqa: SIM115
    sup = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--workers",
            "auto",
            "--target-connections",
            str(args.conns),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--control-socket",
            sock_path,
            "--log-dir",
            str(tmp / "logs"),
            "--screen",
            "off",
            "--ping-interval",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=err,
        preexec_fn=_placement(0, {0} if args.split_cores else None),
    )
    fleet: Clients | None = None
    watcher: Watcher | None = None
    pids: list[int] = []
    try:

        def health() -> dict[str, Any] | None:
            try:
                c = Control(sock_path)
            except OSError:
                return None
            try:
                h = c.ask({"op": "health"})
            finally:
                c.close()
            return h if h.get("workers") and None not in h["pids"] else None

        h = wait_for(health, 60, "workers up")
        pids = list(h["pids"])
        workers = len(pids)
        wait_for(lambda: (health() or {}).get("workers") == workers, 30, "all workers up")
        time.sleep(2.5)  # two frames with idle workers
        ctl = Control(sock_path)
        idle_rss = ctl.ask({"op": "stats"})["frame"]["totals"]["rss_bytes"]

        t0 = time.time()
        fleet = Clients(
            port,
            args.conns,
            args.clients,
            sources(2, 40),
            "--concurrency",
            str(args.concurrency),
            preexec_fn=_placement(args.client_nice, {1} if args.split_cores else None),
        )
        s = wait_for(
            lambda: (st := fleet.stats())["welcomed"] >= args.conns and st,
            300,
            f"{args.conns} welcomed",
            every=0.5,
        )
        ramp_s = time.time() - t0
        assert s["errors"] == 0, s
        time.sleep(3.0)  # let the frame and RSS settle
        frame = ctl.ask({"op": "stats"})["frame"]
        assert frame["totals"]["conns"] == args.conns, frame["totals"]
        loaded_rss = frame["totals"]["rss_bytes"]

        load_before_broadcasts = os.getloadavg()[0]
        watcher = Watcher(sock_path)
        watcher.start()
        time.sleep(1.5)
        deliveries: list[float] = []
        answers: list[float] = []
        t_first = time.time()
        for seq in range(args.broadcasts):
            before = fleet.stats()["msgs"]
            ts = time.time()
            data = json.dumps({"ts": ts, "seq": seq, "tag": "BCAST"})
            ans = ctl.ask({"op": "broadcast", "data": data})
            answers.append(time.time() - ts)
            assert ans["recipients"] == args.conns, ans
            got = wait_for(
                lambda b=before: (st := fleet.stats())["msgs"] >= b + args.conns and st,
                60,
                "broadcast delivered",
                every=0.05,
            )
            deliveries.append(got["last_msg_t"] - ts)
            time.sleep(args.pause)
        t_last = time.time()
        time.sleep(1.5)  # the frame covering the last broadcast
        during = [f for f in watcher.frames if t_first <= f["t"] <= t_last + 1.2]
        idle = [f for f in watcher.frames if f["t"] < t_first]
        lag_max = max(w["lag_ms"]["max"] for f in during for w in f["workers"])
        lag_p90 = max(w["lag_ms"]["p90"] for f in during for w in f["workers"])
        lag_p99 = max(w["lag_ms"]["p99"] for f in during for w in f["workers"])
        ctl.close()
        return {
            "conns": args.conns,
            "workers": workers,
            "ramp_s": round(ramp_s, 2),
            "idle_rss_mb": round(idle_rss / 2**20, 1),
            "loaded_rss_mb": round(loaded_rss / 2**20, 1),
            "rss_per_conn_bytes": round((loaded_rss - idle_rss) / args.conns),
            "rss_total_per_conn_bytes": round(loaded_rss / args.conns),
            "broadcast_to_last_client_ms": round(statistics.median(deliveries) * 1000, 1),
            "broadcast_to_last_client_ms_all": [round(d * 1000, 1) for d in deliveries],
            "broadcast_answer_ms": round(statistics.median(answers) * 1000, 1),
            "lag_max_ms_during_broadcasts": lag_max,
            "lag_p90_ms_during_broadcasts": lag_p90,
            "lag_p99_ms_during_broadcasts": lag_p99,
            "lag_max_ms_idle": max(
                (w["lag_ms"]["max"] for f in idle for w in f["workers"]), default=None
            ),
            "frame_ms": frame["frame_ms"],
            # Other work on the 2 cores shows up as loop lag; keep the host's load with the run.
            "loadavg_1m_at_start": load_at_start,
            "loadavg_1m_before_broadcasts": round(load_before_broadcasts, 2),
        }
    finally:
        if watcher is not None:
            watcher.control.close()
        if fleet is not None:
            fleet.close()
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(40)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        err.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=100_000, help="streams held")
    p.add_argument("--runs", type=int, default=3, help="runs (medians reported)")
    p.add_argument("--broadcasts", type=int, default=5, help="broadcasts timed per run")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between broadcasts")
    p.add_argument("--clients", type=int, default=8, help="client processes")
    p.add_argument("--concurrency", type=int, default=250, help="connects in flight per client")
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="nice value for the client processes (they share the 2 cores)",
    )
    p.add_argument(
        "--split-cores",
        action="store_true",
        help="pin the service to CPU 0 and the clients to CPU 1 (clients as if on another host)",
    )
    p.add_argument(
        "--service-arg",
        action="append",
        default=[],
        help="extra comet-service option, e.g. --service-arg=--fanout-slice=250",
    )
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        r = one_run(args)
        print(json.dumps({"run": i + 1, **r}), flush=True)
        runs.append(r)
        time.sleep(2)
    keys = [
        "ramp_s",
        "rss_per_conn_bytes",
        "rss_total_per_conn_bytes",
        "broadcast_to_last_client_ms",
        "broadcast_answer_ms",
        "lag_max_ms_during_broadcasts",
        "lag_p90_ms_during_broadcasts",
        "lag_p99_ms_during_broadcasts",
    ]
    summary = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(
        json.dumps(
            {
                "median_of_runs": len(runs),
                "conns": args.conns,
                "workers": runs[0]["workers"],
                **summary,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
