"""A TLS reconnect storm against --accept-rate: what the worker spends on the connections it turns
away.

    .venv/bin/python benchmarks/tls_storm.py --conns 3000 --accept-rate 300 --runs 2

One worker with HTTPS (a test CA's certificate) and ``--accept-rate R``; ``comet-bench
--target https://...`` asks for ``--conns`` streams as fast as its engines dial (a storm: far more
than R a second), retrying those turned away with its back-off, until all are held. Measured:
the worker process's CPU (user + system) from before the storm until the last is held, the TLS
handshakes it did, the connections it turned away, and the seconds to hold them all; one JSON
line per run. Run it with ``PYTHONPATH=TREE`` (from TREE) to measure another version of the
service with the same clients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

import psutil  # noqa: E402

from benchmarks.make_test_cert import write  # noqa: E402
from tests.support.control import ask  # noqa: E402
from tests.support.net import free_port  # noqa: E402

BENCH = Path(sys.executable).with_name("comet-bench")


def one_run(out: Path, conns: int, accept_rate: int) -> dict[str, object]:
    pki = write(out / "pki")
    port = free_port()
    sock = out / "control.sock"
    service = subprocess.Popen(
        [
            *(sys.executable, "-m", "service", "--workers", "1", "--host", "127.0.0.1"),
            *("--port", str(port), "--accept-rate", str(accept_rate), "--screen", "off"),
            *("--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])),
            *("--control-socket", str(sock), "--log-dir", str(out / "logs")),
            *("--state-dir", str(out / "state")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(out / "service.log", "wb"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if ask(sock, {"op": "health"}).get("workers") == 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit(f"the service did not start: {out / 'service.log'}")
            time.sleep(0.1)
        (worker,) = psutil.Process(service.pid).children()
        time.sleep(1.0)  # past the first frame and the start-up's own CPU
        before = worker.cpu_times()
        t0 = time.monotonic()
        bench = subprocess.run(
            [
                str(BENCH),
                *("--target", f"https://127.0.0.1:{port}/", "--tls-ca", str(pki["ca"])),
                *("--conns", str(conns), "--rate", "1000000", "--hold", "1"),
                *("--broadcasts", "0", "--no-progress", "--out", str(out / "bench")),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        held_s = time.monotonic() - t0
        after = worker.cpu_times()
        if bench.returncode != 0:
            raise SystemExit(f"comet-bench failed:\n{bench.stdout[-3000:]}\n{bench.stderr[-3000:]}")
        report = json.loads((out / "bench" / "bench.json").read_text())
        time.sleep(1.2)  # a frame with the last counters
        totals = ask(sock, {"op": "stats"})["frame"]["totals"]
        cpu = (after.user + after.system) - (before.user + before.system)
        handshakes = totals["tls_offloaded_total"] + totals["tls_kept_total"]
        return {
            "conns": conns,
            "accept_rate": accept_rate,
            "reached": report.get("reached"),
            "ramp_s": report.get("ramp_s"),
            "bench_s": round(held_s, 2),
            "worker_cpu_s": round(cpu, 3),
            "cpu_per_held_us": round(cpu / conns * 1e6, 1),
            "handshakes": handshakes,
            "turned_away": totals["rejected_total"],
            "tls_failed": totals["tls_failed_total"],
            "client_errors": report.get("errors"),
        }
    finally:
        service.terminate()
        try:
            service.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, 9)
            service.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=3000, help="HTTPS connections in the storm")
    ap.add_argument("--accept-rate", type=int, default=300, help="the worker's --accept-rate")
    ap.add_argument("--runs", type=int, default=1, help="storms, each printed")
    args = ap.parse_args()
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tls-storm-", dir="/tmp") as tmp:
            print(json.dumps(one_run(Path(tmp), args.conns, args.accept_rate)), flush=True)


if __name__ == "__main__":
    main()
