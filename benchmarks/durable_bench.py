"""Durable history benchmarks (issue 13): publish throughput with every message on disk before its
id is answered, and restart-to-serving time with a full history.

    .venv/bin/python benchmarks/durable_bench.py --seconds 60 --rate 5000 --subscribers 10

Throughput: the real service (supervisor + 1 worker, --state-dir in a temp dir), ``--subscribers``
SSE streams on one channel read by a thread, and ``--publishers`` control-socket connections
sending broadcasts paced to ``--rate`` per second in total for ``--seconds``. Reported: the rate
achieved, the answer latency p50/p99, and whether every subscriber got every message. The same run
with the store turned off (--state-dir on a path that cannot be a directory) gives the ratio.

Restart: ``--channels`` channels × ``history_size`` messages (the default ring, full), then
SIGTERM and a new supervisor on the same state dir; the time from SIGTERM to the new one's
``health`` answer with the history loaded, median of ``--restarts``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

from loadgen.bench.report import cpu_model  # noqa: E402
from tests.support.net import free_port  # noqa: E402

SSE_REQUEST = b"GET /sub/%s HTTP/1.1\r\nHost: b\r\nAccept: text/event-stream\r\n\r\n"


class Service:
    def __init__(self, tmp: Path, port: int, state_dir: str, *extra: str) -> None:
        self.sock = str(tmp / "control.sock")
        self.port = port
        self.log = open(tmp / "service.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--workers",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--control-socket",
                self.sock,
                "--log-dir",
                str(tmp / "logs"),
                "--state-dir",
                state_dir,
                "--screen",
                "off",
                *extra,
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
        )

    def ask(self, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            s.sendall(json.dumps(req).encode() + b"\n")
            return dict(json.loads(s.makefile("rb").readline()))

    def wait_health(self, timeout: float = 30.0, want_messages: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = self.ask({"op": "health"}, 1.0)
                store = h.get("store") or {}
                if h.get("workers") == 1 and store.get("messages", 0) >= want_messages:
                    return h
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        raise RuntimeError("service did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.log.close()


class Subscribers(mp.Process):
    """``n`` SSE streams on ``channel``, in a process of their own (the GIL would make the
    benchmark's own Python the limit); counts ``id:`` lines per stream in shared memory."""

    def __init__(self, port: int, channel: str, n: int) -> None:
        super().__init__(daemon=True)
        self.counts = mp.Array("q", n)
        self.stop = mp.Event()
        self.ready = mp.Event()
        self.port, self.channel, self.n = port, channel, n

    def run(self) -> None:
        self.sel = selectors.DefaultSelector()
        port, channel = self.port, self.channel
        for i in range(self.n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(SSE_REQUEST % channel.encode())
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, i)
        self.ready.set()
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                self.counts[key.data] += data.count(b"\nid: ") + data.startswith(b"id: ")


def publisher(path: str, rate: float, seconds: float, window: int, out: Any) -> None:
    """One control-socket connection in a process of its own, paced to ``rate``, with up to
    ``window`` broadcasts sent and not yet answered (the control socket answers in order); puts
    (latencies, ids, first send, last answer) on ``out`` at the end (perf_counter is the system's
    monotonic clock, comparable across processes)."""
    lat: list[float] = []
    ids: list[int] = []
    sent_at: deque[float] = deque()
    room = threading.Semaphore(window)
    line = b'{"op":"broadcast","data":"x","channel":"bench","event":null}\n'
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rb")

        def read_answers() -> None:
            while True:
                raw = f.readline()
                if not raw:
                    return
                t = time.perf_counter()
                answer = json.loads(raw)
                lat.append(t - sent_at.popleft())
                ids.append(int(answer["id"]))
                room.release()

        reader = threading.Thread(target=read_answers, daemon=True)
        reader.start()
        start = time.perf_counter()
        i = 0
        while True:
            due = start + i / rate
            now = time.perf_counter()
            if now - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            room.acquire()
            sent_at.append(time.perf_counter())
            s.sendall(line)
            i += 1
        for _ in range(window):  # every answer is in
            room.acquire()
        end = time.perf_counter()
        s.shutdown(socket.SHUT_WR)
        reader.join(10)
    out.put((lat, ids, start, end))


def throughput(args: argparse.Namespace, durable: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-"))
    if durable:
        state = str(tmp / "state")
    else:
        (tmp / "not-a-dir").write_text("x")
        state = str(tmp / "not-a-dir")
    svc = Service(tmp, free_port(), state)
    try:
        svc.wait_health()
        subs = Subscribers(svc.port, "bench", args.subscribers)
        subs.start()
        subs.ready.wait(10)
        time.sleep(0.5)
        results: Any = mp.Queue()
        procs = [
            mp.Process(
                target=publisher,
                args=(svc.sock, args.rate / args.publishers, args.seconds, args.window, results),
            )
            for _ in range(args.publishers)
        ]
        for p in procs:
            p.start()
        got = [results.get(timeout=args.seconds + 60) for _ in procs]
        # Publishing time: the first send of any publisher to the last answer of any.
        elapsed = max(g[3] for g in got) - min(g[2] for g in got)
        for p in procs:
            p.join(10)
        lats = [g[0] for g in got]
        ids = [g[1] for g in got]
        sent = sum(len(x) for x in ids)
        deadline = time.monotonic() + 30
        while min(subs.counts) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        subs.stop.set()
        subs.join(10)
        all_lat = sorted(x for lat in lats for x in lat)
        store = svc.ask({"op": "health"})["store"]
        return {
            "durable": durable,
            "store_durable": store["durable"],
            "sent": sent,
            "rate": round(sent / elapsed, 1),
            "answer_p50_ms": round(statistics.median(all_lat) * 1000, 3),
            "answer_p99_ms": round(all_lat[int(len(all_lat) * 0.99)] * 1000, 3),
            "every_subscriber_got_all": min(subs.counts) >= sent,
            "min_received": min(subs.counts),
        }
    finally:
        svc.stop()


def restart(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="durable-restart-"))
    port = free_port()
    state = str(tmp / "state")
    svc = Service(tmp, port, state)
    svc.wait_health()
    per = 1000  # the default --history-size
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(svc.sock)
        f = s.makefile("rb")
        for c in range(args.channels):
            for _ in range(per):
                s.sendall(
                    json.dumps({"op": "broadcast", "data": "y" * 100, "channel": f"c{c}"}).encode()
                    + b"\n"
                )
            for _ in range(per):
                f.readline()
    want = args.channels * per
    svc.wait_health(want_messages=want)
    times = []
    for _ in range(args.restarts):
        t0 = time.perf_counter()
        svc.stop()
        svc = Service(tmp, port, state)
        h = svc.wait_health(want_messages=want)
        times.append(time.perf_counter() - t0)
    svc.stop()
    return {
        "messages": h["store"]["messages"],
        "restart_to_health_s": [round(t, 2) for t in times],
        "median_s": round(statistics.median(times), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--seconds", type=float, default=60.0, help="seconds of publishing per throughput run"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=5000.0,
        help="broadcasts a second asked, all publishers together",
    )
    p.add_argument(
        "--subscribers", type=int, default=10, help="SSE streams that must get every message"
    )
    p.add_argument(
        "--publishers", type=int, default=4, help="control-socket connections publishing at once"
    )
    p.add_argument(
        "--window",
        type=int,
        default=1,
        help="broadcasts a publisher may have sent and not yet had answered (1: one at a time)",
    )
    p.add_argument(
        "--channels", type=int, default=20, help="channels of full history to restart with"
    )
    p.add_argument(
        "--restarts", type=int, default=3, help="restarts timed (the median is reported)"
    )
    p.add_argument("--skip-off", action="store_true", help="no run with the store off")
    p.add_argument("--skip-restart", action="store_true", help="no restart-to-serving run")
    args = p.parse_args()
    out: dict[str, Any] = {"cpu": cpu_model()}
    out["durable"] = throughput(args, True)
    if not args.skip_off:
        out["store_off"] = throughput(args, False)
    if not args.skip_restart:
        out["restart"] = restart(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
