"""The million as a user deploys it: the original test's procedure through the appliance's own
interfaces, against the containers that ``ansible-playbook site.yml -e
@profiles/million-appliance.yml`` runs (benchmarks/million-appliance.sh does both).

    .venv/bin/python benchmarks/million_appliance.py --out OUT [--conns 1000000] [--step 100000]
        [--hold 600] [--broadcasts 3] [--upgrade]

1. ``comet-loadgen fleet set concurrency=…`` then ``fleet set n=…`` in steps up to ``--conns``,
   waiting at each step until the agents hold it, with ``fleet status --once`` between steps.
2. Hold ``--hold`` seconds: CPU of the service, the load generator and the host; memory per
   connection (the service container's processes, kernel Slab).
3. The sidecar at this scale, through the hold: ``GET /api/stats`` once a second, ``GET
   /metrics`` every 5 s (each request timed), the SSE stream ``/api/stats/stream`` read throughout
   (gaps between frames); then the dashboard in Chromium for 60 s (frame updates counted by the
   page itself, a screenshot).
4. ``--broadcasts`` broadcasts with ``POST /api/broadcast``: its answer (``recipients``, time) and
   the time to the last delivery from the agents' own counters; the worst worker's loop lag from
   the frames.
5. ``--upgrade``: ``ansible-playbook site.yml`` with a new image tag (the source copied with a
   marker, so the image differs) while the million is held; connections closed (the agents'
   ``ended_req``), the handoff's time, and a broadcast right after it.
6. ``fleet set n=…`` in steps down to 0.

Writes ``bench.json`` and ``bench.csv`` as ``comet-bench`` does (same keys, so
``benchmarks/million_summary.py`` reads either), the service's CSV log from its volume into
``service-logs/``, ``sidecar.json`` and ``dashboard.png``, and prints comet-bench's table.
Needs root (docker, the admin token file, the volumes) and the dev extras for the browser.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen.bench.preflight import meminfo_kb  # noqa: E402
from loadgen.bench.record import Record, hold_cpu, process_cpu  # noqa: E402
from loadgen.bench.report import cpu_model, plot_bench, print_report  # noqa: E402
from loadgen.bench.service import tree_cpu, tree_pids, tree_rss  # noqa: E402
from loadgen.fleet import COUNTERS, Client  # noqa: E402

VENV_BIN = Path(sys.executable).parent
DOCKER = "/usr/bin/docker"
SERVICE, AGENT = "comet-service", "comet-loadgen-agent"


class RunError(Exception):
    """The run cannot go on; the message says why."""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 1)


def timing_summary(values: list[float], failures: int) -> dict[str, Any]:
    return {
        "requests": len(values) + failures,
        "failed": failures,
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
        "max_ms": round(max(values), 1) if values else None,
    }


def inspect(*names: str) -> list[dict[str, Any]]:
    """``docker inspect`` of the named containers, in that order."""
    res = subprocess.run([DOCKER, "inspect", *names], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RunError(f"docker inspect {' '.join(names)}: {res.stderr.strip()}")
    found: list[dict[str, Any]] = json.loads(res.stdout)
    return found


def copy_build_inputs(dest: Path) -> Path:
    """The image's build inputs (what the comet role syncs to its build folder) copied to
    ``dest``, which must not exist yet."""
    dest.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for pkg in ("service", "admin_api", "loadgen"):
        shutil.copytree(
            ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return dest


def container_pids(name: str) -> list[int]:
    """The host pids of a container's processes (its init and every descendant)."""
    pid = int(inspect(name)[0]["State"]["Pid"] or 0)
    if pid <= 0:
        raise RunError(f"container {name} is not running")
    with contextlib.suppress(psutil.Error):
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    return [pid]


def volume_dir(name: str) -> Path:
    res = subprocess.run(
        [DOCKER, "volume", "inspect", "--format", "{{.Mountpoint}}", name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        raise RunError(f"docker volume {name}: {res.stderr.strip()}")
    return Path(res.stdout.strip())


class Admin:
    """The admin API with its bearer token, timed."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def request(
        self, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes, float]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        t = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, raw, (time.monotonic() - t) * 1000
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), (time.monotonic() - t) * 1000
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(getattr(exc, "reason", exc)).encode(), (time.monotonic() - t) * 1000


class Sidecar:
    """Background readers of the admin API: the latest frame once a second (timed), /metrics
    every 5 s (timed), and the SSE frame stream (the gap between frames)."""

    def __init__(self, admin: Admin, record: Record) -> None:
        self.admin = admin
        self.record = record
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latest: dict[str, Any] = {}
        self.window: str | None = None  # a label, e.g. "hold"; None: not counted
        self.stats_ms: dict[str, list[float]] = {}
        self.metrics_ms: dict[str, list[float]] = {}
        self.failures: dict[str, int] = {}
        self.sse_times: dict[str, list[float]] = {}
        self.threads = [
            threading.Thread(target=self._stats, daemon=True),
            threading.Thread(target=self._metrics, daemon=True),
            threading.Thread(target=self._sse, daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _count(self, into: dict[str, list[float]], value: float) -> None:
        with self.lock:
            if self.window is not None:
                into.setdefault(self.window, []).append(value)

    def _fail(self, what: str) -> None:
        with self.lock:
            if self.window is not None:
                key = f"{self.window}:{what}"
                self.failures[key] = self.failures.get(key, 0) + 1

    def _stats(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            status, raw, ms = self.admin.request("/api/stats", timeout=10)
            if status == 200:
                frame = json.loads(raw)
                with self.lock:
                    self.latest = frame
                    if not self.record.frames or self.record.frames[-1].get("t") != frame.get("t"):
                        self.record.add_frame(frame)
                self._count(self.stats_ms, ms)
            else:
                self._fail("stats")
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def _metrics(self) -> None:
        while not self.stop.wait(5.0):
            status, _raw, ms = self.admin.request("/metrics", timeout=10)
            if status == 200:
                self._count(self.metrics_ms, ms)
            else:
                self._fail("metrics")

    def _sse(self) -> None:
        while not self.stop.is_set():
            req = urllib.request.Request(self.admin.url + "/api/stats/stream")
            req.add_header("Authorization", f"Bearer {self.admin.token}")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    for line in resp:
                        if self.stop.is_set():
                            return
                        if line.startswith(b"data: "):
                            self._count(self.sse_times, time.time())
            except (urllib.error.URLError, OSError):
                self._fail("stream")
            self.stop.wait(1.0)

    def frame(self) -> dict[str, Any]:
        with self.lock:
            return self.latest

    def summary(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {}
            for window in sorted(set(self.stats_ms) | set(self.metrics_ms) | set(self.sse_times)):
                gaps = [
                    b - a
                    for a, b in zip(
                        self.sse_times.get(window, []),
                        self.sse_times.get(window, [])[1:],
                        strict=False,
                    )
                ]
                out[window] = {
                    "api_stats": timing_summary(
                        self.stats_ms.get(window, []), self.failures.get(f"{window}:stats", 0)
                    ),
                    "metrics": timing_summary(
                        self.metrics_ms.get(window, []), self.failures.get(f"{window}:metrics", 0)
                    ),
                    "stats_stream": {
                        "frames": len(self.sse_times.get(window, [])),
                        "gap_median_s": round(statistics.median(gaps), 2) if gaps else None,
                        "gap_max_s": round(max(gaps), 2) if gaps else None,
                        "reconnects": self.failures.get(f"{window}:stream", 0),
                    },
                }
            return out


class ApplianceRun:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.out = Path(args.out)
        self.record = Record()
        self.report: dict[str, Any] = {}
        token = Path(args.admin_token_file).read_text().strip()
        self.admin = Admin(args.admin_url, token)
        self.sidecar = Sidecar(self.admin, self.record)
        self.agents = [a.strip() for a in args.agents.split(",") if a.strip()]
        self.client = Client(None)
        self.t0 = time.time()
        self.service_started = time.time()  # the service container's start (setup reads it)
        self.rss0 = self.slab0 = self.client_rss0 = 0
        self.log = (self.out / "procedure.log").open("a")

    # ---- helpers ------------------------------------------------------------------------------
    def fleet(self, *argv: str) -> str:
        """``comet-loadgen fleet --agents … ARGV``: the user's command, its output logged."""
        cmd = [str(VENV_BIN / "comet-loadgen"), "fleet", "--agents", ",".join(self.agents), *argv]
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "160"}
        )
        self.log.write(f"$ comet-loadgen fleet {' '.join(argv)}\n{res.stdout}{res.stderr}\n")
        self.log.flush()
        if res.returncode != 0:
            raise RunError(f"comet-loadgen fleet {' '.join(argv)} failed: {res.stdout}{res.stderr}")
        return res.stdout

    def agent_stats(self) -> dict[str, Any]:
        """The agents' ``GET /`` summed (what ``fleet status`` shows)."""
        total: dict[str, Any] = {
            **dict.fromkeys(COUNTERS, 0),
            "deliveries": {},
            "last_delivery": {},
            "procs": 0,
            "latency_ms": {},
        }
        for answer in self.client.call_all(self.agents, "/", timeout=30):
            if "error" in answer:
                raise RunError(f"an agent did not answer: {answer['error']}")
            for k in COUNTERS:
                total[k] += int(answer.get(k, 0))
            total["procs"] += int(answer.get("procs", 0))
            for seq, n in answer.get("deliveries", {}).items():
                total["deliveries"][seq] = total["deliveries"].get(seq, 0) + n
            for seq, t in answer.get("last_delivery", {}).items():
                total["last_delivery"][seq] = max(total["last_delivery"].get(seq, 0.0), t)
            total["latency_ms"] = answer.get("latency_ms", {})  # one agent: its own summary
        return total

    def service_pids(self) -> list[int]:
        return container_pids(SERVICE)

    def client_pids(self) -> list[int]:
        return container_pids(AGENT)

    def sample(self, phase: str, target: int, st: dict[str, Any]) -> dict[str, Any]:
        frame = self.sidecar.frame()
        totals = frame.get("totals") or {}
        rss = tree_rss(self.service_pids())
        row = {
            "elapsed_s": round(time.time() - self.t0, 2),
            "phase": phase,
            "target": target,
            "clients": st["clients"],
            "inproc": st["inproc"],
            "errors_req": st["errors_req"],
            "errors_resp": st["errors_resp"],
            "ended_req": st["ended_req"],
            "msgs_total": st["msgs_total"],
            "server_conns": totals.get("conns", ""),
            "server_rss_mb": round(rss / 2**20, 1),
            "server_rss_delta_mb": round((rss - self.rss0) / 2**20, 1),
            "slab_delta_mb": round((meminfo_kb("Slab") - self.slab0) / 1024, 1),
            "lag_p99_ms": (totals.get("lag_ms") or {}).get("p99", ""),
            "lag_max_ms": (totals.get("lag_ms") or {}).get("max", ""),
            "mem_available_mb": meminfo_kb("MemAvailable") // 1024,
        }
        self.record.timeline.append(row)
        if meminfo_kb("MemAvailable") < self.args.min_available_gib * 2**20:
            raise RunError(
                f"MemAvailable fell below {self.args.min_available_gib} GiB: stopping the run"
            )
        return row

    def wait_for_clients(self, phase: str, target: int, up: bool, timeout: float) -> float:
        """Sample once a second until the agents hold ``target`` (rising) or at most it
        (falling); the seconds it took. Gives up after ``timeout`` or 60 s without progress."""
        start = time.monotonic()
        best, best_at = None, start
        while True:
            st = self.agent_stats()
            self.sample(phase, target, st)
            done = st["clients"] >= target if up else st["clients"] <= target
            if done:
                return time.monotonic() - start
            score = st["clients"] if up else -st["clients"]
            if best is None or score > best:
                best, best_at = score, time.monotonic()
            now = time.monotonic()
            if now - start > timeout or now - best_at > 60:
                raise RunError(
                    f"{phase}: the agents hold {st['clients']:,}, not {target:,}, after "
                    f"{now - start:.0f} s (errors req/resp {st['errors_req']:,}/"
                    f"{st['errors_resp']:,}); see {self.out / 'procedure.log'}"
                )
            time.sleep(1.0)

    # ---- the phases ---------------------------------------------------------------------------
    def setup(self) -> None:
        status, raw, _ms = self.admin.request("/api/stats")
        if status == 0:  # no answer at all
            raise RunError(
                f"no admin API at {self.admin.url} ({raw.decode(errors='replace')}): deploy the "
                "appliance first (benchmarks/million-appliance.sh runs site.yml, then this)"
            )
        if status != 200:
            raise RunError(f"the admin API at {self.admin.url} answered {status}: {raw[:200]!r}")
        frame = json.loads(raw)
        workers = len(frame.get("workers") or [])
        self.sidecar.start()
        st = self.agent_stats()
        if st["clients"]:
            raise RunError(
                f"the agents hold {st['clients']:,} connections already: "
                "comet-loadgen fleet set n=0 first"
            )
        time.sleep(2.0)
        self.slab0 = meminfo_kb("Slab")
        self.rss0 = tree_rss(self.service_pids())
        self.client_rss0 = tree_rss(self.client_pids())
        containers = inspect(SERVICE, AGENT)
        started = containers[0]["State"]["StartedAt"][:19]  # 2026-12-02T18:03:24.48...Z
        self.service_started = calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%S"))
        self.report.update(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "conns": self.args.conns,
                "step": self.args.step,
                "hold_s": self.args.hold,
                "broadcasts_asked": self.args.broadcasts,
                "target": "the appliance: site.yml's containers, the fleet and the admin API",
                "machine": {
                    "cpu_model": cpu_model(),
                    "cpus": os.cpu_count(),
                    "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
                },
                "containers": {
                    c["Name"].lstrip("/"): {
                        "image": c["Config"]["Image"],
                        "nofile": [u for u in c["HostConfig"]["Ulimits"] or []],
                    }
                    for c in containers
                },
                "server_workers": workers,
                "server_rss_idle_mb": round(self.rss0 / 2**20, 1),
            }
        )
        self.console.print(
            f"appliance up: {workers} service workers, admin API {self.admin.url}, "
            f"agents {', '.join(self.agents)}"
        )

    def ramp(self) -> None:
        args = self.args
        self.fleet("set", f"concurrency={args.concurrency}")
        self.t0 = time.time()
        start = time.monotonic()
        self.sidecar.window = "ramp"
        steps = list(range(args.step, args.conns, args.step)) + [args.conns]
        for target in steps:
            self.fleet("set", f"n={target}")
            took = self.wait_for_clients("ramp", target, True, args.step_timeout)
            self.console.print(
                f"  n={target:,} held after {took:.0f} s ({time.monotonic() - start:.0f} s in all)"
            )
            self.fleet("status", "--once")
        st = self.agent_stats()
        self.report.update(
            {
                "t0": self.t0,
                "ramp_s": round(time.monotonic() - start, 2),
                "ramp_complete": st["clients"] >= args.conns,
                "reached": st["clients"],
                "client_procs": st["procs"],
            }
        )

    def hold(self) -> None:
        args, report = self.args, self.report
        self.sidecar.window = "hold"
        end = time.monotonic() + args.hold
        hold_t0 = time.time()
        client_cpu0 = tree_cpu(self.client_pids())
        host0 = psutil.cpu_times()
        procs0 = process_cpu()
        while True:
            st = self.agent_stats()
            self.sample("hold", args.conns, st)
            if time.monotonic() >= end:
                break
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        report["hold_cpu"] = hold_cpu(
            self.record,
            hold_t0,
            host0,
            tree_cpu(self.client_pids()) - client_cpu0,
            procs0,
            tree_pids([*self.service_pids(), *self.client_pids()]),
        )
        held = max(1, st["clients"])
        rss = tree_rss(self.service_pids())
        slab = meminfo_kb("Slab")
        client_rss = tree_rss(self.client_pids())
        report.update(
            {
                "held": st["clients"],
                "held_ended_req": st["ended_req"],
                "server_rss_mb": round(rss / 2**20, 1),
                "server_rss_per_conn_bytes": round((rss - self.rss0) / held),
                "kernel_slab_delta_mb": round((slab - self.slab0) / 1024, 1),
                "kernel_bytes_per_conn": round((slab - self.slab0) * 1024 / held),
                "client_rss_mb": round(client_rss / 2**20, 1),
                "client_rss_per_conn_bytes": round((client_rss - self.client_rss0) / held),
            }
        )

    def dashboard(self) -> None:
        """The dashboard in Chromium for ``--dashboard-seconds``: how often the page itself
        updated its numbers, and a screenshot."""
        self.sidecar.window = "dashboard"
        seconds = self.args.dashboard_seconds
        from playwright.sync_api import sync_playwright  # checked by main(): browser_missing

        from tests.support.browser import launch  # the browser tests' Chromium, launched alike

        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(self.admin.url + "/")
                page.fill("#token-input", self.admin.token)
                page.click("#token-save")
                page.wait_for_selector("#status[data-state=live]", timeout=30_000)
                # Count the page's own updates: every frame rewrites the uptime tile.
                page.evaluate(
                    """() => { window.__updates = [];
                    new MutationObserver(() => window.__updates.push(Date.now()))
                      .observe(document.getElementById('uptime'),
                               {childList: true, characterData: true, subtree: true}); }"""
                )
                page.wait_for_timeout(seconds * 1000)
                times = [t / 1000 for t in page.evaluate("window.__updates")]
                shown = page.get_attribute("#conns", "data-value")
                page.screenshot(path=str(self.out / "dashboard.png"), full_page=True)
            finally:
                browser.close()
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        self.report["dashboard"] = {
            "seconds": seconds,
            "updates": len(times),
            "gap_median_s": round(statistics.median(gaps), 2) if gaps else None,
            "gap_max_s": round(max(gaps), 2) if gaps else None,
            "connections_shown": int(shown) if shown and shown.isdigit() else shown,
            "screenshot": str(self.out / "dashboard.png"),
        }

    def broadcast(self, seq: int, window: str) -> dict[str, Any]:
        """One ``POST /api/broadcast``, timed to its last delivery on the agents."""
        self.sidecar.window = window
        before = self.agent_stats()
        expect = before["clients"]
        ts = time.time()
        data = json.dumps({"ts": ts, "seq": seq, "bench": "comet1m-appliance"})
        status, raw, answer_ms = self.admin.request(
            "/api/broadcast", {"data": data}, timeout=self.args.broadcast_timeout
        )
        answer = json.loads(raw) if status == 200 else {"error": raw.decode(errors="replace")}
        deadline = time.monotonic() + self.args.broadcast_timeout
        st = before
        while time.monotonic() < deadline:
            st = self.agent_stats()
            if st["deliveries"].get(str(seq), 0) >= expect:
                break
            time.sleep(0.2)
        last = st["last_delivery"].get(str(seq))
        time.sleep(1.5)  # the frame covering the last second of the fan-out
        row = self.record.broadcast_row(
            seq,
            ts,
            recipients=answer.get("recipients"),
            expected=expect,
            delivered=st["deliveries"].get(str(seq), 0),
            first=None,
            last=last,
            answered_ms=answer_ms,
        )
        row["status"] = status
        row["answer"] = answer if status != 200 else None
        self.sample(window, self.args.conns, st)
        self.console.print(
            f"  broadcast {seq}: {row['delivered']:,}/{expect:,} delivered, last "
            f"{row['last_delivery_ms']} ms, answer {row['answer_ms']} ms "
            f"(recipients {row['recipients']}), lag p99 {row['lag_p99_ms']} ms (window: worst "
            f"worker p99 <= {row['lag_p99_worker_ms']}, all <= {row['lag_p99_all_ms']} ms)"
        )
        return row

    def broadcasts(self) -> None:
        for seq in range(1, self.args.broadcasts + 1):
            self.record.broadcasts.append(self.broadcast(seq, "broadcast"))
            time.sleep(self.args.broadcast_gap)

    def upgrade(self) -> None:
        """site.yml with a new image tag while the million is held: every connection handed to
        the new service container, none closed; then a broadcast reaches them all."""
        self.sidecar.window = "upgrade"
        tag = f"comet1m:upgrade-{time.strftime('%Y%m%d%H%M%S')}"
        old_id = inspect(SERVICE)[0]["Id"]
        before = self.agent_stats()
        with tempfile.TemporaryDirectory(prefix="comet-upgrade-") as tmp:
            # The build inputs with a marker: a new release, as far as the image id can tell.
            src = copy_build_inputs(Path(tmp) / "src")
            with open(src / "README.md", "a") as f:
                f.write(f"\n<!-- upgrade to {tag} -->\n")
            cmd = [str(VENV_BIN / "ansible-playbook"), "site.yml"]
            if self.args.inventory:
                cmd += ["-i", self.args.inventory]
            if self.args.profile:
                cmd += ["-e", f"@{self.args.profile}"]
            cmd += [
                "-e",
                json.dumps({"comet_image": tag, "comet_source_dir": str(src)}),
            ]
            self.log.write(f"$ {' '.join(cmd)}\n")
            # The old service's own account of each worker's handoff (its "handed N connections
            # ... in X s (...)" lines) leaves with its container: follow its log from now on.
            with open(self.out / "upgrade-old-service-log.txt", "w") as old_log:
                follower = subprocess.Popen(
                    [DOCKER, "logs", "--follow", "--since", "1s", old_id],
                    stdout=old_log,
                    stderr=subprocess.STDOUT,
                )
                started = time.monotonic()
                stop = threading.Event()
                sampler = threading.Thread(target=self._sample_until, args=(stop, "upgrade"))
                sampler.start()
                try:
                    res = subprocess.run(
                        cmd,
                        cwd=ROOT / "ansible",
                        capture_output=True,
                        text=True,
                        timeout=1800,
                        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
                    )
                finally:
                    stop.set()
                    sampler.join()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        follower.wait(10)  # ends with the old container
                    follower.kill()
                    follower.wait()
            took = time.monotonic() - started
            self.log.write(res.stdout[-20000:] + res.stderr[-5000:] + "\n")
            self.log.flush()
        if res.returncode != 0:
            # What happened is still worth having: the takeover's own account and the agents'.
            self.report["upgrade"] = {
                "image": tag,
                "converge_s": round(took, 1),
                "converge_failed": True,
                "takeover": self._takeover(),
                "clients_before": before["clients"],
                "agents_after": self.agent_stats(),
            }
            raise RunError(f"the upgrade converge failed (see {self.out / 'procedure.log'})")
        new = inspect(SERVICE)[0]
        with open(self.out / "upgrade-new-service-log.txt", "w") as f:  # the adoptions
            cmd = [DOCKER, "logs", SERVICE]
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=60)
        after = self.agent_stats()
        handoff = next((r for r in reversed(self.record.timeline) if r["phase"] == "upgrade"), None)
        self.report["upgrade"] = {
            "image": tag,
            "new_container": new["Id"] != old_id,
            "converge_s": round(took, 1),
            "takeover": self._takeover(),
            "clients_before": before["clients"],
            "clients_after": after["clients"],
            "closed": after["ended_req"] - before["ended_req"],
            "errors_after": after["errors_req"]
            + after["errors_resp"]
            - before["errors_req"]
            - before["errors_resp"],
            "last_row": handoff,
        }
        row = self.broadcast(self.args.broadcasts + 1, "after-upgrade")
        self.report["upgrade"]["broadcast"] = row
        self.console.print(
            f"  upgrade to {tag}: converge {took:.0f} s, "
            f"closed {self.report['upgrade']['closed']:,}, "
            f"broadcast after it reached {row['delivered']:,}/{row['expected']:,}"
        )

    def _takeover(self) -> dict[str, Any] | None:
        """The new service's own account of the takeover (its ``takeover: {...}`` log line:
        workers, handed, kept, failed, seconds)."""
        import ast

        res = subprocess.run([DOCKER, "logs", SERVICE], capture_output=True, text=True, timeout=60)
        for line in (res.stdout + res.stderr).splitlines():
            _, sep, rest = line.partition("takeover: {")
            if sep:
                with contextlib.suppress(ValueError, SyntaxError):
                    found: dict[str, Any] = ast.literal_eval("{" + rest)
                    return found
        return None

    def _sample_until(self, stop: threading.Event, phase: str) -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(RunError, OSError, ValueError):
                self.sample(phase, self.args.conns, self.agent_stats())

    def ramp_down(self) -> None:
        self.sidecar.window = "ramp-down"
        start = time.monotonic()
        steps = list(range(self.args.conns - self.args.step, 0, -self.args.step)) + [0]
        for target in steps:
            self.fleet("set", f"n={target}")
            self.wait_for_clients("ramp-down", target, False, self.args.step_timeout)
        self.report["ramp_down_s"] = round(time.monotonic() - start, 2)

    def finish(self) -> dict[str, Any]:
        self.sidecar.stop.set()
        try:
            st = self.agent_stats()
            self.report["errors"] = {
                "errors_req": st["errors_req"],
                "errors_resp": st["errors_resp"],
                "ended_req": st["ended_req"],
            }
        except RunError as exc:  # a run that failed because an agent stopped answering
            self.report["errors"] = {"agents": str(exc)}
        self.report["worst_loop_lag_ms"] = self.record.worst_lag_ms
        self.report["broadcasts"] = self.record.broadcasts
        self.report["sidecar"] = self.sidecar.summary()
        logs = self.out / "service-logs"
        logs.mkdir(exist_ok=True)
        # The log volume outlives containers: only the logs the service started since this
        # run's set-up (comet-YYYYMMDD-HHMMSS.csv, the container's clock is UTC) are this run's.
        since = time.strftime("comet-%Y%m%d-%H%M%S", time.gmtime(self.service_started - 5))
        for path in sorted(volume_dir("comet-logs").glob("comet-*.csv")):
            if path.stem >= since:
                shutil.copy2(path, logs / path.name)
        if self.record.timeline:
            import csv

            with open(self.out / "bench.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.record.timeline[0]))
                w.writeheader()
                w.writerows(self.record.timeline)
        plot_bench(self.out / "bench.png", self.report, self.record)
        self.report["files"] = {
            "json": str(self.out / "bench.json"),
            "csv": str(self.out / "bench.csv"),
            "service_logs": str(logs),
            "procedure": str(self.out / "procedure.log"),
        }
        (self.out / "bench.json").write_text(json.dumps(self.report, indent=2) + "\n")
        return self.report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="million-appliance-out", help="output directory")
    p.add_argument("--conns", type=int, default=1_000_000, help="connections to reach")
    p.add_argument("--step", type=int, default=100_000, help="fleet set n= step size")
    p.add_argument("--step-timeout", type=float, default=600, help="seconds a step may take")
    p.add_argument("--concurrency", type=int, default=25, help="per engine process, in flight")
    p.add_argument("--hold", type=float, default=600, help="seconds to hold")
    p.add_argument("--dashboard-seconds", type=int, default=60, help="0: no browser")
    p.add_argument("--broadcasts", type=int, default=3, help="broadcasts to the million, held")
    p.add_argument(
        "--broadcast-timeout",
        type=float,
        default=120,
        help="seconds a broadcast may take to arrive",
    )
    p.add_argument("--broadcast-gap", type=float, default=5, help="seconds between two broadcasts")
    p.add_argument("--upgrade", action="store_true", help="an image upgrade while held")
    p.add_argument("--agents", default="127.0.0.1:8889", help="host:port,... of the agents")
    p.add_argument(
        "--admin-url",
        default="http://127.0.0.1:8080",
        help="the admin sidecar (default: %(default)s)",
    )
    p.add_argument(
        "--admin-token-file",
        default="/etc/comet1m/admin-token",
        help="the file with the sidecar's bearer token (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        default=str(ROOT / "ansible" / "profiles" / "million-appliance.yml"),
        help="the site.yml profile the appliance was deployed with (for --upgrade; '' for none)",
    )
    p.add_argument(
        "--inventory",
        default="",
        help="the inventory it was deployed with (for --upgrade; default: ansible.cfg's)",
    )
    p.add_argument(
        "--min-available-gib",
        type=float,
        default=1.0,
        help="stop the run when the host's MemAvailable falls below this (GiB)",
    )
    return p


def browser_missing() -> str | None:
    """Why the dashboard cannot be timed, or None: checked before the run rather than found out
    after a 20-minute ramp and hold (million-appliance.sh installs Chromium when it is missing)."""
    try:
        import playwright.sync_api  # noqa: F401

        from tests.support.browser import CHROMIUM
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e '.[dev]')"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    return None


def main() -> None:
    args = build_parser().parse_args()
    if args.step <= 0 or args.conns <= 0:
        sys.exit("million_appliance: --conns and --step must be positive")
    if args.dashboard_seconds > 0 and (missing := browser_missing()):
        sys.exit(
            f"million_appliance: the dashboard is timed in Chromium: {missing}; "
            "or --dashboard-seconds 0 for a run without it"
        )
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        run = ApplianceRun(args, console)
    except OSError as exc:
        sys.exit(f"million_appliance: {exc}")
    try:
        run.setup()
    except RunError as exc:  # nothing measured yet: no report to write
        sys.exit(f"million_appliance: {exc}")
    failed: str | None = None
    try:
        run.ramp()
        run.hold()
        if args.dashboard_seconds > 0:
            run.dashboard()
        run.broadcasts()
        if args.upgrade:
            run.upgrade()
        run.ramp_down()
    except (RunError, KeyboardInterrupt) as exc:
        failed = str(exc) or type(exc).__name__
        run.report["failed"] = failed
        with contextlib.suppress(RunError, subprocess.SubprocessError):
            run.fleet("set", "n=0")
    report = run.finish()
    print_report(console, report)
    console.print_json(
        json.dumps(
            {
                "sidecar": report["sidecar"],
                **({"dashboard": report["dashboard"]} if "dashboard" in report else {}),
            }
        )
    )
    if failed:
        sys.exit(f"million_appliance: {failed}")


if __name__ == "__main__":
    main()
