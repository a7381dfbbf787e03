"""Crash and reconnect storm: N SSE subscribers that behave like EventSource, the whole service
killed with SIGKILL, started again at once on the same port and state, and the time until every
subscriber is back and resumed without a gap.

    .venv/bin/python benchmarks/storm_bench.py --conns 100000
    .venv/bin/python benchmarks/storm_bench.py --conns 100000 --accept-rate 2000

The service runs with --workers auto (6 for 100,000 under a 20,000 nofile limit) and its history
on a state directory; the subscribers are benchmarks/comet_clients.py processes with ``--resume``
(after an end: wait the stream's own ``retry:`` value, which the service jitters per connection
over [3, 6) s, or a 503's ``Retry-After``; reconnect with ``Last-Event-ID``). A publisher sends
``BCAST <n>`` to the channel every ``1 / --rate`` s before the crash and after the restart, so each
subscriber checks it got every message once and in order across the crash (a gap would mean a
resume lost something). Measured: seconds from the kill to every subscriber welcomed again
(``back_s``), to the new service's health answer, 503s sent, failed connects, resets, gaps and
duplicates, the worst worker loop lag (p99, max) while they came back, and the service's own CPU
seconds per accepted connection during the storm. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

from service.config import Config  # noqa: E402
from tests.support.control import Control  # noqa: E402
from tests.support.net import wait_for  # noqa: E402
from tests.support.service import Clients, Service, sources, tree_cpu_s  # noqa: E402

CH = "storm"


class Publisher(threading.Thread):
    """``BCAST <n>`` to the channel every ``period`` s while ``on`` is set; n counts answers."""

    def __init__(self, control_path: str, period: float) -> None:
        super().__init__(daemon=True)
        self.control_path = control_path
        self.period = period
        self.on = threading.Event()
        self.stop = threading.Event()
        self.idle = threading.Event()
        self.n = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.on.is_set():
                self.idle.set()
                time.sleep(0.05)
                continue
            self.idle.clear()
            try:
                with Control(self.control_path, timeout=600) as ctl:  # 1M: ~20 s a broadcast
                    a = ctl.ask({"op": "broadcast", "data": f"BCAST {self.n + 1}", "channel": CH})
                if a.get("ok"):
                    self.n += 1
                else:
                    self.errors.append(str(a.get("error")))
            except (OSError, ValueError) as exc:
                self.errors.append(str(exc))
            time.sleep(self.period)
        self.idle.set()

    def pause(self) -> None:
        self.on.clear()
        self.idle.clear()
        self.idle.wait(30)


def frames_watch(control_path: str, frames: list[dict[str, Any]], stop: threading.Event) -> None:
    """Every frame of the service at ``control_path``, reconnecting while ``stop`` is not set."""
    while not stop.is_set():
        try:
            ctl = Control(control_path)
        except OSError:
            time.sleep(0.2)
            continue
        try:
            ctl.file.write(b'{"op":"watch"}\n')
            ctl.file.flush()
            for line in ctl.file:
                f = json.loads(line).get("frame")
                if f:
                    frames.append(f)
                if stop.is_set():
                    break
        except (OSError, ValueError):
            pass
        finally:
            try:
                ctl.close()
            except OSError:
                pass
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--conns", type=int, default=100_000, help="SSE subscribers held before the crash"
    )
    ap.add_argument("--clients", type=int, default=6, help="client processes")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.2,
        help="broadcasts a second (each goes to every subscriber: 2/s at 100,000 is a busy box)",
    )
    ap.add_argument("--accept-rate", type=int, default=0, help="the service's --accept-rate")
    ap.add_argument(
        "--reconnect-concurrency",
        type=int,
        default=0,
        help="per client process, reconnects in flight at once (0: every subscriber at once)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds after the crash to give up waiting for every subscriber",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="storm-bench-"))
    state = tmp / "state"
    flags = (
        *("--workers", "auto", "--target-connections", str(args.conns)),
        *("--ping-interval", "60", "--state-dir", str(state)),
        *("--accept-rate", str(args.accept_rate)),
    )
    svc = Service(tmp / "first", *flags)
    clients: Clients | None = None
    pub = Publisher(svc.control_path, 1.0 / args.rate)
    stop = threading.Event()
    frames: list[dict[str, Any]] = []
    try:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        workers = Config(target_connections=args.conns).worker_count(nofile)
        svc.wait_up(workers, 120)
        t0 = time.time()
        clients = Clients(
            svc.port,
            args.conns,
            args.clients,
            sources(2, 40),
            *("--sse", "--resume", "--path", f"/sub/{CH}", "--concurrency", "300"),
            *("--reconnect-concurrency", str(args.reconnect_concurrency)),
        )
        clients.wait("up", args.conns, timeout=900, every=1.0)
        ramp_s = time.time() - t0
        # A broadcast to everyone takes ~1.3 s at 100,000 here and ~13-20 s at 1,000,000.
        slow = max(1.0, args.conns / 100_000)
        pub.start()
        pub.on.set()
        wait_for(lambda: pub.n >= 3, 30 * slow, "3 broadcasts before the crash")
        pub.pause()
        sent_before = pub.n
        clients.wait("msgs", args.conns * sent_before, timeout=60 * slow)

        # The crash: every process of the service at once, then a new one at once (what a
        # container restart policy does), on the same port and state.
        t_kill = time.time()
        svc.kill()
        svc = Service(tmp / "second", *flags, port=svc.port)
        pub.control_path = svc.control_path
        watcher = threading.Thread(
            target=frames_watch, args=(svc.control_path, frames, stop), daemon=True
        )
        watcher.start()
        svc.wait_up(workers, 120 * slow)
        t_health = time.time()
        cpu0 = tree_cpu_s(svc.proc.pid)
        pub.on.set()
        st = clients.wait("up", args.conns, timeout=args.timeout, every=0.5)
        t_back = float(st["last_welcome_t"])
        cpu1 = tree_cpu_s(svc.proc.pid)
        time.sleep(1.2)  # the next frame counts every accept of the storm
        accepted = int(svc.frame()["totals"]["accepted_total"])
        n_after = pub.n
        wait_for(lambda: pub.n >= n_after + 3, 30 * slow, "3 broadcasts after everyone is back")
        pub.pause()
        clients.wait("msgs", args.conns * pub.n, timeout=120 * slow, every=1.0)
        st = clients.stats()
        during = [f for f in frames if t_kill <= float(f["t"]) <= t_back + 1]
        out = {
            "conns": args.conns,
            "workers": workers,
            "accept_rate": args.accept_rate,
            "reconnect_concurrency": args.reconnect_concurrency,
            "ramp_s": round(ramp_s, 1),
            "health_s": round(t_health - t_kill, 2),
            "back_s": round(t_back - t_kill, 2),
            "broadcasts": pub.n,
            "publish_errors": len(pub.errors),
            "resumes": st["resumes"],
            "client_connects": st["connected"],
            "client_closed": st["closed"],
            "refused_503": st["refused_503"],
            "connect_failures": st["connect_failures"],
            "resets": st["resets"],
            "seq_gaps": st["seq_gaps"],
            "seq_dups": st["seq_dups"],
            "msgs": st["msgs"],
            "msgs_expected": args.conns * pub.n,
            "accepted_in_storm": accepted,
            "cpu_s_in_storm": round(cpu1 - cpu0, 2),
            "cpu_us_per_accept": round((cpu1 - cpu0) * 1e6 / accepted, 1) if accepted else None,
            "lag_p99_ms_max": max((f["totals"]["lag_ms"]["p99"] for f in during), default=None),
            "lag_max_ms": max((f["totals"]["lag_ms"]["max"] for f in during), default=None),
        }
        print(json.dumps(out))
    finally:
        stop.set()
        pub.stop.set()
        if clients is not None:
            clients.close()
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
