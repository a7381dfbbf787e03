"""Reload under load: N held connections (half plain, half SSE, and a few long-poll loops), a
publisher at --rate broadcasts a second, then --reloads reloads in a row.

    .venv/bin/python benchmarks/reload_bench.py --conns 100000 --rate 10 --reloads 10
    .venv/bin/python benchmarks/reload_bench.py --conns 100000 --takeover --busy 4   # no idle CPU

The service runs with --workers auto (6 workers for 100,000 under a 20,000 nofile limit); the
clients are benchmarks/comet_clients.py processes on 127.0.0.2-41. Every broadcast carries
``BCAST <n>`` (n = 1, 2, 3, ...), so each connection checks it got every one once and in order.
Measured, per reload: the seconds the reload took and how many connections each worker handed;
over the run: connections closed, messages missed or twice (per connection, by number), the
worst worker loop lag (p99 and max) in the frames of the reloads (and, to compare, the worst p99
in the other frames of the run: the broadcasts' waves), and the service's
descriptors and RSS before the first and after the last reload. One JSON line at the end.

``--takeover``: each round starts a new service with ``--take-over`` on the same control socket,
port and state instead (what ``comet_upgrade: handoff`` does with containers); its ``took_over``
answer gives the seconds and connections handed, and the old service must exit 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

import psutil  # noqa: E402

from service.config import Config  # noqa: E402
from tests.support.control import Control  # noqa: E402
from tests.support.net import long_poll, wait_for  # noqa: E402
from tests.support.service import Clients, Service, sources, tree_cpu_s  # noqa: E402


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def fds_and_rss(pid: int) -> tuple[int, int]:
    fds = rss = 0
    for p in tree(pid):
        try:
            fds += p.num_fds()
            rss += p.memory_info().rss
        except psutil.Error:
            continue
    return fds, rss


class Poller(threading.Thread):
    """One long-poll loop: each answer's ids must go on from the last one it saw."""

    def __init__(self, port: int, channel: str, since: int) -> None:
        super().__init__(daemon=True)
        self.port, self.channel, self.since = port, channel, since
        self.ids: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                _local, body = long_poll(self.port, self.channel, self.since, timeout=5)
                for m in body["messages"]:
                    self.ids.append(int(m["id"]))
                self.since = int(body["last_id"])
            except (OSError, ValueError, AssertionError) as exc:
                self.errors.append(str(exc))
                time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--conns",
        type=int,
        default=100_000,
        help="connections held through the reloads (half plain, half SSE)",
    )
    ap.add_argument("--clients", type=int, default=8, help="client processes")
    ap.add_argument("--rate", type=float, default=10.0, help="broadcasts a second")
    ap.add_argument("--reloads", type=int, default=10, help="reloads in a row")
    ap.add_argument("--pollers", type=int, default=20, help="long-poll loops")
    ap.add_argument(
        "--takeover",
        action="store_true",
        help="each round starts a new service with --take-over instead of sending reload",
    )
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="N processes spinning on the CPU through the reloads: a host with no idle CPU, "
        "as the one-box million is (the load generator and 108 service processes on 2 cores)",
    )
    ap.add_argument(
        "--frames-out",
        metavar="PATH",
        help="also write the run's frames (every worker's own lag), the reloads' windows and "
        "their full answers (each slot's began_s / ended_s, pids) to PATH as JSON",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="reload-bench-"))
    spinners: list[subprocess.Popen[bytes]] = []
    flags = (
        *("--workers", "auto", "--target-connections", str(args.conns)),
        *("--ping-interval", "60", "--state-dir", str(tmp / "state")),
    )
    svc = Service(tmp / "gen0", *flags)
    services = [svc]
    control_path = svc.control_path
    plain: Clients | None = None
    sse: Clients | None = None
    stop = threading.Event()
    pollers: list[Poller] = []
    try:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        workers = Config(target_connections=args.conns).worker_count(nofile)
        svc.wait_up(workers, 120)
        half = args.conns // 2
        k = max(1, args.clients // 2)
        t0 = time.time()
        plain = Clients(svc.port, half, k, sources(2, 20), "--concurrency", "300")
        sse = Clients(
            svc.port, args.conns - half, k, sources(22, 20), "--sse", "--concurrency", "300"
        )
        for c in (plain, sse):
            c.wait("welcomed", c.n, timeout=600, every=0.5)
        ramp_s = time.time() - t0
        first = svc.ask({"op": "broadcast", "data": "warm-up", "channel": "poll"})
        pollers = [Poller(svc.port, "poll", int(first["id"])) for _ in range(args.pollers)]
        for p in pollers:
            p.start()
        time.sleep(3)
        fds0, rss0 = fds_and_rss(svc.proc.pid)

        sent: list[int] = []
        poll_ids: list[int] = []

        refused: list[str] = []

        def publisher() -> None:
            # A connection per broadcast: after a takeover the path is the new service's. A
            # broadcast refused (the old one handed over) is sent again with the same number.
            n = 1
            while not stop.is_set():
                try:
                    with Control(control_path, timeout=600) as ctl:  # waits out a reload
                        a = ctl.ask({"op": "broadcast", "data": f"BCAST {n}", "channel": None})
                except (OSError, ValueError) as exc:
                    refused.append(str(exc))
                    time.sleep(0.05)
                    continue
                if not a.get("ok"):
                    refused.append(str(a.get("error")))
                    time.sleep(0.05)
                    continue
                n += 1
                sent.append(int(a["id"]))
                poll_ids.append(int(a["id"]))
                time.sleep(1.0 / args.rate)

        frames: list[dict[str, Any]] = []

        def watch() -> None:
            while not stop.is_set():
                try:
                    with Control(control_path) as watcher:
                        watcher.file.write(b'{"op":"watch"}\n')
                        watcher.file.flush()
                        for line in watcher.file:
                            f = json.loads(line).get("frame")
                            if f:
                                frames.append(f)
                except (OSError, ValueError):
                    pass
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()
        pub = threading.Thread(target=publisher)
        pub.start()
        time.sleep(2)
        spin = "while True: pass"
        spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
        reloads = []
        answers: list[dict[str, Any]] = []  # the reloads' full answers, for --frames-out
        windows: list[tuple[float, float]] = []
        fds1st = rss1st = 0
        for gen in range(1, args.reloads + 1):
            w0 = time.time()
            if args.takeover:
                old = svc
                svc = Service(
                    tmp / f"gen{gen}",
                    *(*flags, "--take-over", "--control-socket", control_path),
                    port=old.port,
                )
                svc.control_path = control_path
                services.append(svc)

                def taken(new: Service = svc, pid: int = old.proc.pid) -> dict[str, Any] | None:
                    h = new.health()  # the old one answers there until the new one took over
                    if not h or h.get("workers") != workers:
                        return None
                    return h if (h.get("took_over") or {}).get("from_pid") == pid else None

                took = wait_for(taken, 120, "the takeover")["took_over"]
                assert old.proc.wait(60) == 0
                windows.append((w0, time.time()))
                assert took["failed"] == 0, took
                reloads.append({**took, "wall_s": round(time.time() - w0, 3)})
            else:
                cpu0 = tree_cpu_s(svc.proc.pid, reaped=True)
                # 54 workers at a million take longer than the control client's 30 s default.
                with Control(control_path, timeout=600) as ctl:
                    r = ctl.ask({"op": "reload"})
                windows.append((w0, time.time()))
                assert r["ok"], r
                keys = (
                    *("seconds", "prepare_s", "locked_s", "handoff_s_max"),
                    *("handed", "kept", "failed"),
                )
                reloads.append({k: r[k] for k in keys})
                answers.append(r)
            wait_for(
                lambda pid=svc.proc.pid: len(psutil.Process(pid).children()) == workers,
                30,
                "old gone",
            )
            if not args.takeover:  # the old workers are reaped now: their CPU counts
                spent = tree_cpu_s(svc.proc.pid, reaped=True) - cpu0
                reloads[-1]["cpu_us_per_handed"] = round(spent * 1e6 / max(1, r["handed"]), 1)
            time.sleep(1.5)
            if len(reloads) == 1:  # new processes hold a few one-time things (threads, imports)
                fds1st, rss1st = fds_and_rss(svc.proc.pid)
        t_end = time.time()
        time.sleep(2)
        stop.set()
        pub.join(30)
        time.sleep(2)  # the last broadcasts reach everyone
        fds1, rss1 = fds_and_rss(svc.proc.pid)
        st = [c.stats() for c in (plain, sse)]
        during = [f for f in frames if t0 < float(f["t"]) <= t_end + 1]
        # A frame's lag is the second before it: a reload's frames end a second after it.
        in_reload = [f for f in during if any(a <= float(f["t"]) <= b + 1 for a, b in windows)]
        others = [f for f in during if f not in in_reload]
        lag99 = max((f["totals"]["lag_ms"]["p99"] for f in in_reload), default=None)
        lagmax = max((f["totals"]["lag_ms"]["max"] for f in in_reload), default=None)
        lag99_others = max((f["totals"]["lag_ms"]["p99"] for f in others), default=None)
        lag99_each = [
            max(
                (f["totals"]["lag_ms"]["p99"] for f in during if a <= float(f["t"]) <= b + 1),
                default=None,
            )
            for a, b in windows
        ]
        if args.frames_out:
            Path(args.frames_out).write_text(
                json.dumps({"windows": windows, "answers": answers, "frames": during})
            )
        for p in pollers:
            p.stop.set()
        polled_ok = all(p.ids == sorted(set(p.ids)) for p in pollers)
        poll_twice = sum(len(p.ids) - len(set(p.ids)) for p in pollers)
        poll_back = sum(sum(b <= a for a, b in itertools.pairwise(p.ids)) for p in pollers)
        out = {
            "conns": args.conns,
            "workers": workers,
            "ramp_s": round(ramp_s, 1),
            "broadcasts": len(sent),
            "reloads": reloads,
            "reload_s_max": max(r["seconds"] for r in reloads),
            "reload_s_median": sorted(r["seconds"] for r in reloads)[len(reloads) // 2],
            # The service's CPU from the reload's request until its old workers were reaped,
            # per connection handed (both ends, plus the pings and broadcasts of those seconds).
            "cpu_us_per_handed_median": (
                None
                if args.takeover
                else sorted(r["cpu_us_per_handed"] for r in reloads)[len(reloads) // 2]
            ),
            "closed": sum(s["closed"] for s in st),
            "msgs": sum(s["msgs"] for s in st),
            "msgs_expected": args.conns * len(sent),
            "seq_gaps": sum(s["seq_gaps"] for s in st),
            "seq_dups": sum(s["seq_dups"] for s in st),
            "pollers_in_order_each_once": polled_ok,
            "poll_errors": sum(len(p.errors) for p in pollers),
            "poll_ids_twice": poll_twice,
            "poll_ids_not_after_the_last": poll_back,
            "poll_ids": sum(len(p.ids) for p in pollers),
            "broadcasts_refused_and_sent_again": len(refused),
            "lag_p99_ms_max": lag99,
            "lag_max_ms": lagmax,
            "lag_p99_ms_max_outside_reloads": lag99_others,
            "lag_p99_ms_each_reload": lag99_each,
            "fds_before": fds0,
            "fds_after": fds1,
            "rss_mb_before": round(rss0 / 2**20, 1),
            "fds_after_first_reload": fds1st,
            "rss_mb_after_first_reload": round(rss1st / 2**20, 1),
            "rss_mb_after": round(rss1 / 2**20, 1),
            "cpu": psutil.cpu_count(),
            "busy": args.busy,
        }
        print(json.dumps(out), flush=True)
    except BaseException:
        for s in services:  # what the services said, before their folder goes
            print(f"--- {s.log_path}\n{s.log()[-4000:]}", file=sys.stderr)
        raise
    finally:
        stop.set()
        for p in spinners:
            p.kill()
            p.wait()
        for c in (plain, sse):
            if c is not None:
                c.close()
        for s in reversed(services):
            s.stop(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
