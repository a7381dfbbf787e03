"""Where the CPU goes in a comet-bench run: the kernel (``perf``) and the Python of the service
and of the load generator (``py-spy``), separately, in each phase of the run.

    .venv/bin/python benchmarks/profile_bench.py --out /tmp/prof -- --conns 100000 --rate 4000 \\
        --hold 40 --broadcasts 3 --broadcast-gap 3
    .venv/bin/python benchmarks/profile_bench.py --out /tmp/prof-1m -- --conns 1000000 \\
        --rate 4000 --concurrency 25 --hold 60 --broadcasts 3 --broadcast-timeout 120 \\
        --broadcast-gap 5 --port 8888

Everything after ``--`` goes to ``comet-bench`` (``--out`` is this script's). The script follows
the service's CSV log (one row a second) and profiles three windows of ``--seconds`` each:

- ``ramp``: once the service holds half of ``--conns``;
- ``hold``: 10 s after it holds them all (before the first broadcast);
- ``broadcast``: from the second the first broadcast's messages start to leave (a second in
  which 5 % of ``--conns`` messages went out; pings trickle over their interval).

In each window: ``perf record -a -g`` (the whole host: kernel and user), ``py-spy record`` on
the busiest service worker and on the busiest load-generator engine process. It writes
``profile-<window>.txt`` with the top entries of each (perf: by command, library and symbol,
self time; py-spy: by function, self time, idle frames excluded) and ``profile.json``.
Needs root (perf over the whole host, py-spy attaching), Debian's ``linux-perf`` and ``py-spy``
(PyPI).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOP = 25


def busiest(pids: list[int]) -> int | None:
    """The pid among ``pids`` that used the most CPU over half a second."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(0.5)
    best, best_pct = None, -1.0
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct > best_pct:
            best, best_pct = p.pid, pct
    return best


def service_workers(bench_pid: int) -> list[int]:
    return [
        p.pid
        for p in psutil.Process(bench_pid).children(recursive=True)
        if p.name().startswith("comet-worker")  # service/proctitle.py
    ]


def engines(bench_pid: int) -> list[int]:
    return [
        p.pid
        for p in psutil.Process(bench_pid).children(recursive=True)
        if "loadgen.engine.child" in " ".join(p.cmdline())
    ]


def perf_rows(data: Path, sort: str) -> list[tuple[float, list[str]]]:
    """``perf report``'s self-time rows sorted by ``sort``: (percent, the row's other columns)."""
    argv = ["perf", "report", "-i", str(data), "--no-children", "--stdio", "--sort", sort]
    return parse_rows(subprocess.run([*argv, "-g", "none"], capture_output=True, text=True).stdout)


def parse_rows(report: str) -> list[tuple[float, list[str]]]:
    """The rows of a ``perf report --stdio`` text (its header and comments left out)."""
    rows = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%"):
            rows.append((float(parts[0].rstrip("%")), parts[1:]))
    return rows


# A worker's or an engine's command carries its index (service/proctitle.py, "comet-worker 31"):
# perf splits them into one row per process, 54 rows of 0.4 % where one of 20 % is meant.
_INDEXED = re.compile(r"^(comet-(?:worker|engine)) \d+ ")


def by_command(rows: list[tuple[float, list[str]]]) -> list[tuple[float, str]]:
    """``perf_rows`` by command / library / symbol, the indexed commands counted as one, the
    largest first."""
    totals: collections.defaultdict[str, float] = collections.defaultdict(float)
    for pct, cols in rows:
        totals[_INDEXED.sub(r"\1 ", " ".join(cols))] += pct
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return [(round(pct, 2), what) for what, pct in ranked]


def perf_top(data: Path) -> list[tuple[float, str]]:
    """Self time by command / library / symbol, the top ``TOP``."""
    return by_command(perf_rows(data, "comm,dso,sym"))[:TOP]


def perf_split(data: Path) -> dict[str, float]:
    """Share of all samples in the kernel and in user space."""
    rows = perf_rows(data, "dso")
    total = sum(pct for pct, _ in rows)
    kernel = sum(pct for pct, cols in rows if "kernel" in cols[0])
    return {"kernel_pct": round(kernel, 1), "user_pct": round(total - kernel, 1)}


def spy_top(raw: Path) -> list[tuple[float, str]]:
    """Self time by function from py-spy's collapsed stacks (idle frames left out). Without
    ``--native``, time inside C code (uvloop's loop and its system calls) counts for the Python
    frame that called it: the ``Runner.run`` entry of a worker is its loop's own C time."""
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        # "func (file.py:LINE)" -> "func (file.py)": one entry per function, not per line.
        frame = stack.split(";")[-1]
        leaf[re.sub(r":\d+\)$", ")", frame)] += n
    return [(round(100 * n / total, 1), name) for name, n in leaf.most_common(TOP)] if total else []


class Armed:
    """``perf record -a -g`` of one window, started ahead with its events off (``-D -1``) and
    switched on and off through its control FIFO: perf itself takes seconds to start on a host
    with a million connections (6 s at 1,000,000 on Zen 5), so a window that launched it on the
    trigger began that much late, past most of a broadcast."""

    def __init__(self, window: str, out: Path) -> None:
        self.window, self.out = window, out
        self.data = out / f"perf-{window}.data"
        self.ctl, self.ack = out / f"perf-{window}.ctl", out / f"perf-{window}.ack"
        for fifo in (self.ctl, self.ack):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
        argv = ["perf", "record", "-a", "-g", "-F", "499", "-D", "-1", "-o", str(self.data)]
        argv += ["--control", f"fifo:{self.ctl},{self.ack}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started = self.ended = 0.0
        self.spied: dict[str, tuple[int, Path]] = {}  # role: (pid, py-spy's output)

    def _command(self, word: str) -> None:
        """Send ``enable``, ``disable`` or ``ping`` and wait for perf's ``ack`` (bounded)."""
        with open(self.ctl, "w") as ctl:
            ctl.write(word + "\n")
        fd = os.open(self.ack, os.O_RDONLY | os.O_NONBLOCK)
        try:
            deadline = time.monotonic() + 60
            got = b""
            while b"ack" not in got:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"perf ({self.window}) did not take {word!r}")
                with contextlib.suppress(BlockingIOError):
                    got += os.read(fd, 16)
                time.sleep(0.02)
        finally:
            os.close(fd)

    def record(self, bench_pid: int, seconds: float) -> None:
        """The window itself: perf on, py-spy on the busiest worker and engine, for
        ``seconds``; then perf off and stopped (:func:`analyse` reads what it left)."""
        print(f"profiling {self.window} for {seconds:.0f} s", flush=True)
        self._command("enable")
        self.started = time.time()
        worker, engine = busiest(service_workers(bench_pid)), busiest(engines(bench_pid))
        spies = []
        for role, pid in (("worker", worker), ("engine", engine)):
            if pid is None:
                continue
            raw = self.out / f"spy-{self.window}-{role}.txt"
            self.spied[role] = (pid, raw)
            # --nonblocking: the process is not stopped at each sample (py-spy refuses
            # --native with it; perf has the native side).
            left = max(1, round(seconds - (time.time() - self.started)))
            spy = [str(BIN / "py-spy"), "record", "-p", str(pid), "-d", str(left), "-r", "200"]
            spies.append(
                subprocess.Popen(
                    [*spy, "--nonblocking", "-f", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(max(0.0, seconds - (time.time() - self.started)))
        self._command("disable")
        self.ended = time.time()
        self.stop()
        for spy_proc in spies:
            spy_proc.wait(120)

    def stop(self) -> None:
        """perf writes its file and exits on SIGINT; the FIFOs go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fifo in (self.ctl, self.ack):
            fifo.unlink(missing_ok=True)


def analyse(taken: Armed) -> dict[str, object]:
    """One recorded window's tables, written to ``profile-<window>.txt``; after the run, so the
    reports (seconds each, at a million) never delay the next window."""
    result: dict[str, object] = {
        "started": round(taken.started, 2),
        "ended": round(taken.ended, 2),
        "split": perf_split(taken.data),
        "perf": perf_top(taken.data),
    }
    for role, (pid, raw) in taken.spied.items():
        result[f"py_{role}"] = {"pid": pid, "top": spy_top(raw) if raw.exists() else []}
    started = time.strftime("%H:%M:%S", time.localtime(taken.started))
    when = f"{started}, {taken.ended - taken.started:.1f} s"
    lines = [f"# {taken.window} ({when}): {result['split']}", "", "## perf (whole host), self %"]
    lines += [f"{pct:6.1f}  {what}" for pct, what in result["perf"]]  # type: ignore[attr-defined]
    for role in ("worker", "engine"):
        got = result.get(f"py_{role}")
        if isinstance(got, dict):
            lines += ["", f"## py-spy, busiest {role} (pid {got['pid']}), self %"]
            lines += [f"{pct:6.1f}  {what}" for pct, what in got["top"]]
    (taken.out / f"profile-{taken.window}.txt").write_text("\n".join(lines) + "\n")
    return result


def follow(csv_dir: Path, conns: int, stop: threading.Event):  # type: ignore[no-untyped-def]
    """Yield the service's CSV rows as they are written."""
    path = None
    while path is None and not stop.is_set():
        found = sorted(csv_dir.glob("comet-*.csv")) if csv_dir.exists() else []
        path = found[-1] if found else None
        time.sleep(0.5)
    if path is None:
        return
    with open(path, newline="") as f:
        header = None
        while not stop.is_set():
            line = f.readline()
            if not line:
                time.sleep(0.3)
                continue
            row = next(csv.reader([line]))
            if header is None:
                header = row
                continue
            yield dict(zip(header, row, strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="comet-bench's --out; the profiles go there too")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then comet-bench's flags")
    args = ap.parse_args()
    for tool in ("perf",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install linux-perf)")
    if not (BIN / "py-spy").exists():
        sys.exit(f"{BIN / 'py-spy'} not found (pip install py-spy)")
    flags = [a for a in args.bench if a != "--"]
    conns = int(flags[flags.index("--conns") + 1]) if "--conns" in flags else 2000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = subprocess.Popen(
        [str(BIN / "comet-bench"), *flags, "--out", str(out), "--no-progress"], cwd=ROOT
    )
    stop = threading.Event()
    windows = ("ramp", "hold", "broadcast")
    armed: dict[str, Armed] = {}
    taken: dict[str, Armed] = {}

    def take(window: str) -> None:
        taken[window] = armed.pop(window)
        taken[window].record(bench.pid, args.seconds)
        following = windows.index(window) + 1
        if following < len(windows):
            armed[windows[following]] = Armed(windows[following], out)  # ready long before

    try:
        armed["ramp"] = Armed("ramp", out)
        held_at = None
        msgs = 0
        for row in follow(out / "service-logs", conns, stop):
            if bench.poll() is not None:
                break
            n = int(row["conns"] or 0)
            last_msgs, msgs = msgs, int(row["msgs_sent_total"] or 0)
            if "ramp" in armed and n >= conns // 2:
                take("ramp")
            elif "hold" in armed and n >= conns * 0.999:
                held_at = held_at or time.monotonic()
                if time.monotonic() - held_at >= 10:
                    take("hold")
            elif "broadcast" in armed and msgs - last_msgs >= conns // 20:  # pings trickle;
                take("broadcast")  # this is a broadcast leaving
                break
        bench.wait()
    finally:
        stop.set()
        for a in armed.values():
            a.stop()
            a.data.unlink(missing_ok=True)  # never switched on
        if bench.poll() is None:
            bench.terminate()
            bench.wait(120)
    results = {window: analyse(t) for window, t in taken.items()}
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    print(f"profiles: {', '.join(sorted(results))} in {out}")


if __name__ == "__main__":
    main()
