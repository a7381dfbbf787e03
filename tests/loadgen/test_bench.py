"""comet-bench end to end: the real service, 2,000 connections, every output; Ctrl-C cleanup."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.loadgen.conftest import ROOT, bench, running_fixture_server, wait_for
from tests.support.net import bench_namespaces
from tests.support.service import benchmark, reaped

PNG = b"\x89PNG\r\n\x1a\n"


def test_small_bench_produces_every_output(tmp_path):
    out = tmp_path / "out"
    r = bench(
        "--conns",
        "2000",
        "--rate",
        "2000",
        "--hold",
        "2",
        "--broadcasts",
        "3",
        "--out",
        str(out),
        "--no-progress",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["reached"] == 2000 and report["held"] == 2000
    assert report["ramp_complete"] is True and report["ramp_s"] > 0
    assert report["errors"]["errors_req"] == 0 and report["errors"]["errors_resp"] == 0
    assert report["server_rss_mb"] > 0
    # Results compare only on the same CPU: its name and (the name alone does not tell a Zen 3
    # from a Zen 4) its family, model and stepping.
    with open("/proc/cpuinfo") as f:
        info = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in f.read().split("\n\n")[0].splitlines())
        )
    assert report["machine"]["cpu_model"] == (
        f"{info['model name']} (family {info['cpu family']}, model {info['model']}, "
        f"stepping {info['stepping']})"
    )
    assert report["server_rss_per_conn_bytes"] is not None
    assert "kernel_bytes_per_conn" in report
    assert report["client_rss_per_conn_bytes"] > 0
    assert report["worst_loop_lag_ms"] is not None
    lat = report["latency_ms"]
    assert lat["count"] == 3 * 2000
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert [b["seq"] for b in report["broadcasts"]] == [1, 2, 3]
    for b in report["broadcasts"]:
        assert b["delivered"] == 2000 and b["recipients"] >= 2000
        assert 0 <= b["first_delivery_ms"] <= b["last_delivery_ms"]
    assert report["preflight"] and report["preflight_verdict"]
    # CSV timeline, PNGs (bench + the service log's memory/cpu graphs).
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["phase"] for r in rows} == {"ramp", "hold", "broadcast"}
    assert int(rows[-1]["clients"]) == 2000
    for name in ("bench.png", "memory.png", "cpu.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert (out / name).stat().st_size > 10_000
    # The printed table and preflight.
    for text in (
        "preflight",
        "ramp time",
        "server RSS per connection",
        "worst loop lag",
        "broadcast 3",
        "delivery latency",
    ):
        assert text in r.stdout, text
    # Nothing left running.
    assert not psutil.pid_exists(report["service_pid"])
    # benchmarks/million_summary.py reads the same directory (the docs' million tables use it).
    summary = benchmark("million_summary.py", str(out))
    assert summary.returncode == 0, summary.stderr
    assert re.search(r"ramp: 1,000 at \d+ s, 2,000 at \d+ s", summary.stdout), summary.stdout
    assert "broadcast 3: 2,000/2,000" in summary.stdout, summary.stdout


def test_bench_against_another_server_with_publish_cmd(tmp_path, fixture_server):
    out = tmp_path / "out"
    publish = (
        "import os, sys, urllib.parse, urllib.request; "
        "assert sys.argv[1] == os.environ['COMET_BENCH_DATA']; "
        f"urllib.request.urlopen('http://127.0.0.1:{fixture_server}/publish?data=' "
        "+ urllib.parse.quote(sys.argv[1])).read()"
    )
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(publish)} {{data}}"
    r = bench(
        "--target",
        f"http://127.0.0.1:{fixture_server}/",
        "--publish-cmd",
        cmd,
        "--conns",
        "300",
        "--rate",
        "1000",
        "--hold",
        "1",
        "--broadcasts",
        "2",
        "--out",
        str(out),
        "--no-progress",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["reached"] == 300
    assert [b["delivered"] for b in report["broadcasts"]] == [300, 300]
    assert report["server_rss_mb"] > 0  # found through the listener on the target's port
    assert (out / "bench.png").read_bytes()[:8] == PNG


def test_a_ramp_that_stops_short_says_how_it_ended_and_what_the_kernel_counted(tmp_path):
    """A server that answers only its first 100 streams: the ramp ends at --ramp-timeout with
    100 reached, bench.json says so with the TCP counters of the ramp, and the printed report
    explains in one line why it stopped and what to look at."""
    out = tmp_path / "out"
    with running_fixture_server("--serve", "100") as port:
        r = bench(
            *("--target", f"http://127.0.0.1:{port}/", "--broadcasts", "0"),
            *("--conns", "300", "--rate", "1000", "--ramp-timeout", "3", "--hold", "0"),
            *("--out", str(out), "--no-progress"),
        )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["reached"] == 100 and report["ramp_complete"] is False
    d = report["ramp_diagnosis"]
    assert d["ended"] == "time limit", d
    for k in ("TCPSynRetrans", "ListenOverflows", "ListenDrops", "TCPReqQFullDrop"):
        assert isinstance(d[k], int) and d[k] >= 0, d
    assert d["host_busy_pct_of_core_at_end"] is not None and d["cores"] == os.cpu_count()
    text = " ".join(r.stdout.split())  # the console wraps long lines
    assert "The ramp stopped short: out of time" in text, r.stdout[-3000:]
    assert "SYN/SYN-ACK retransmissions" in text and "(incomplete)" in text


def test_bench_bad_arguments():
    r = bench("--target", "http://127.0.0.1:1/")
    assert r.returncode == 2 and "--publish-cmd" in r.stderr
    r = bench("--conns", "0")
    assert r.returncode == 2
    r = bench("--preflight-only", "--conns", "1000")
    assert r.returncode == 0 and "ephemeral ports" in r.stdout


@pytest.mark.parametrize(
    ("sig", "delay"),
    [
        (signal.SIGINT, 1.5),
        (signal.SIGINT, 0.0),
        (signal.SIGTERM, 0.0),
        (signal.SIGHUP, 1.5),
        (signal.SIGKILL, 1.5),
    ],
)
def test_bench_interrupted_stops_everything(tmp_path, sig, delay):
    """Ctrl-C, a closed terminal, even kill -9: nothing the bench started outlives it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadgen.bench",
            "--conns",
            "3000",
            "--rate",
            "100",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    with reaped(proc, group=True):
        assert proc.stdout is not None
        service_pid = None
        for line in proc.stdout:
            m = re.search(r"service up: pid (\d+)", line)
            if m:
                service_pid = int(m.group(1))
                break
        assert service_pid, "the bench did not start the service"
        me = psutil.Process(proc.pid)

        def engines() -> list[psutil.Process]:
            # The service is a child too (and so is a short-lived `ss`): only a process running
            # the engine counts.
            found = []
            for c in me.children():
                with contextlib.suppress(psutil.Error):
                    if "loadgen.engine.child" in " ".join(c.cmdline()):
                        found.append(c)
            return found

        wait_for(lambda: len(engines()) >= 1, 30, "engine processes")
        time.sleep(delay)  # at start-up (0: engines spawning) or mid-ramp
        started = [service_pid] + [c.pid for c in me.children(recursive=True)]
        started += [c.pid for c in psutil.Process(service_pid).children(recursive=True)]
        assert len(started) >= 3  # service supervisor, its workers, an engine process
        proc.send_signal(sig)
        rest = proc.communicate(timeout=60)[0]
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 130, rest
            assert "interrupted" in rest
            assert "Traceback" not in rest

        def all_gone() -> bool:
            return not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in started
            )

        wait_for(all_gone, 30, "every started process to exit")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root")
def test_preflight_skips_conntrack_for_an_untracked_port() -> None:
    """A port with raw-table NOTRACK rules (host_tuning_notrack_ports) needs no conntrack entries:
    the preflight says so instead of asking for nf_conntrack_max."""
    from loadgen.bench.preflight import preflight, untracked_ports

    port = 18899
    rule = ["-p", "tcp", "--dport", str(port), "-m", "comment", "--comment", "comet1m-notrack",
            "-j", "NOTRACK"]  # fmt: skip
    subprocess.run(["iptables", "-t", "raw", "-A", "PREROUTING", *rule], check=True)
    try:
        assert port in untracked_ports()
        names = [c.name for c in preflight(10_000_000, 40, port=port)]
        assert "connection tracking" in names and "nf_conntrack_max" not in names
        tracked = [c.name for c in preflight(10_000_000, 40, port=port + 1)]
        if os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
            assert "nf_conntrack_max" in tracked
    finally:
        subprocess.run(["iptables", "-t", "raw", "-D", "PREROUTING", *rule], check=True)


def test_bench_over_tls(tmp_path):
    """--tls-cert/--tls-key start the service with HTTPS and every client (in engine processes)
    speaks TLS, checked against --tls-ca, through the ramp, the hold and a broadcast."""
    from benchmarks.make_test_cert import write

    write(tmp_path)
    out = tmp_path / "out"
    r = bench(
        "--conns", "300", "--rate", "300", "--hold", "1", "--broadcasts", "1",
        "--procs", "2", "--out", str(out), "--no-progress",
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
        "--tls-ca", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["tls"] is True
    assert report["reached"] == 300 and report["held"] == 300, report
    assert report["errors"]["errors_req"] == 0 and report["errors"]["errors_resp"] == 0
    assert report["broadcasts"][0]["delivered"] == 300
    assert "(TLS)" in (out / "service.log").read_text()


def _bench_in_background(argv: list[str]) -> subprocess.Popen[str]:
    """comet-bench with ``argv``, its output (report included, 160 columns) on ``stdout``."""
    return subprocess.Popen(
        [sys.executable, "-m", "loadgen.bench", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_bench_with_clients_in_network_namespaces(tmp_path):
    """--netns 3: the engines run in three namespaces of their own, each with its own TCP hash
    table, and reach the service on the bridge from their namespaces' addresses; everything the
    run made is gone after it."""
    from loadgen.bench.netns import EHASH_SYSCTL
    from tests.support.net import free_port

    ehash_before = EHASH_SYSCTL.read_text()
    out, port = tmp_path / "out", free_port()
    argv = ["--conns", "3000", "--rate", "3000", "--hold", "8", "--broadcasts", "2",
            "--netns", "3", "--port", str(port), "--out", str(out), "--no-progress"]  # fmt: skip
    proc = _bench_in_background(argv)
    with reaped(proc):

        def held() -> list[str] | None:
            ss = subprocess.run(
                ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                capture_output=True,
                text=True,
            ).stdout.splitlines()
            return ss if len(ss) >= 3000 else None

        peers = {line.split()[-1].rsplit(":", 1)[0] for line in wait_for(held, 90, "3,000 held")}
        assert peers == {"10.77.1.1", "10.77.2.1", "10.77.3.1"}  # one address per namespace
        assert bench_namespaces() == ["cbench0", "cbench1", "cbench2"]
        own = subprocess.run(
            ["ip", "netns", "exec", "cbench1", "cat", "/proc/sys/net/ipv4/tcp_ehash_entries"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert int(own) == 1024  # its own table (a shared one reads negative)
        text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["held"] == 3000 and report["errors"]["errors_req"] == 0
    assert report["netns"] == {
        "namespaces": 3,
        "addresses_per_namespace": 1,
        "service_address": "10.77.0.1",
        "child_ehash_entries": 1024,
    }
    assert report["client_procs"] == 3
    assert [b["delivered"] for b in report["broadcasts"]] == [3000, 3000]
    assert "3 network namespaces" in text
    # Nothing of it left: namespaces, bridge, the host's sysctl as it was.
    assert bench_namespaces() == []
    assert not os.path.exists("/sys/class/net/cbench-br")
    assert EHASH_SYSCTL.read_text() == ehash_before


def _in_namespace(name: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_bench_with_the_service_in_a_namespace_of_its_own(tmp_path):
    """--netns 2 --service-netns: the service runs in cbench-svc with the bridge, a TCP hash of
    its own sized for --conns and the host's listen-queue sysctls; no socket of the run is in
    the host's namespace; everything is gone after it."""
    from loadgen.bench.netns import EHASH_SYSCTL
    from tests.support.net import free_port

    ehash_before = EHASH_SYSCTL.read_text()
    out, port = tmp_path / "out", free_port()
    argv = ["--conns", "2000", "--rate", "2000", "--hold", "6", "--broadcasts", "2",
            "--netns", "2", "--service-netns", "--port", str(port), "--out", str(out),
            "--no-progress"]  # fmt: skip
    proc = _bench_in_background(argv)
    with reaped(proc):
        established = ["ss", "-Htn", "state", "established", f"( sport = :{port} )"]

        def held() -> list[str] | None:
            with contextlib.suppress(subprocess.CalledProcessError):
                ss = _in_namespace("cbench-svc", *established).splitlines()
                return ss if len(ss) >= 2000 else None
            return None

        peers = {line.split()[-1].rsplit(":", 1)[0] for line in wait_for(held, 90, "2,000 held")}
        assert peers == {"10.77.1.1", "10.77.2.1"}
        # The host's namespace holds none of them, and has no bridge of the run.
        host_side = subprocess.run(established, capture_output=True, text=True).stdout
        assert host_side.strip() == ""
        assert not os.path.exists("/sys/class/net/cbench-br")
        assert bench_namespaces() == ["cbench-svc", "cbench0", "cbench1"]
        # The service's processes are in it.
        svc_ns = os.stat("/run/netns/cbench-svc").st_ino
        listeners = [
            int(m) for m in re.findall(r"pid=(\d+)", _in_namespace("cbench-svc", "ss", "-Htlnp"))
        ]
        assert listeners and all(os.stat(f"/proc/{p}/ns/net").st_ino == svc_ns for p in listeners)
        assert int(_in_namespace("cbench-svc", "cat", "/proc/sys/net/ipv4/tcp_ehash_entries")) == (
            2048
        )
        host_somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
        assert _in_namespace("cbench-svc", "sysctl", "-n", "net.core.somaxconn") == host_somaxconn
        if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
            assert (
                _in_namespace("cbench-svc", "sysctl", "-n", "net.bridge.bridge-nf-call-iptables")
                == "0"
            )
        text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["held"] == 2000 and report["errors"]["errors_req"] == 0
    assert report["netns"]["service_namespace"] == "cbench-svc"
    assert report["netns"]["service_ehash_entries"] == 2048
    assert [b["delivered"] for b in report["broadcasts"]] == [2000, 2000]
    assert "network namespace cbench-svc" in text
    assert bench_namespaces() == []
    assert EHASH_SYSCTL.read_text() == ehash_before


_REUSEPORT_LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(60)
"""


def test_a_listener_the_service_forks_late_is_ours_and_another_process_is_a_stranger():
    """The bench's check that it is alone on its port goes by each listener's ancestry: a
    worker forked after the service answered (a child started later here) is ours; another process
    that shares the port through SO_REUSEPORT is named."""
    from loadgen.bench.service import free_port, listening_pids, listening_strangers

    port = free_port()
    # The "service": a process that, after a moment, starts a child that listens.
    spawner = (
        "import subprocess, sys, time; time.sleep(0.3); "
        "c = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); c.wait()"
    )
    root = subprocess.Popen([sys.executable, "-c", spawner, _REUSEPORT_LISTENER, str(port)])
    stranger = None
    try:
        assert listening_strangers(port, [root.pid]) == []
        wait_for(lambda: listening_pids(port), 30, "the child's listener")
        assert listening_strangers(port, [root.pid]) == []
        stranger = subprocess.Popen(
            [sys.executable, "-c", _REUSEPORT_LISTENER, str(port)], stdout=subprocess.PIPE
        )
        assert stranger.stdout is not None and stranger.stdout.readline() == b"listening\n"
        assert listening_strangers(port, [root.pid]) == [stranger.pid]
    finally:
        for p in psutil.Process(root.pid).children(recursive=True) + [psutil.Process(root.pid)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        root.wait(10)
        if stranger is not None:
            stranger.kill()
            stranger.communicate(timeout=10)


def test_a_worker_whose_forkserver_is_reaped_mid_walk_is_still_the_services(monkeypatch):
    """The race a million's run met once (2026-12-07): a worker's parent read as the
    forkserver, which exited and was reaped before it could be looked up. The walk reads the
    worker's parent again (now the supervisor, its subreaper) instead of ending there, where
    psutil's ``parents()`` made the worker nobody's: a stranger, and the run failed."""
    from loadgen.bench import service

    supervisor, forkserver, worker = 4_000_001, 4_000_002, 4_000_003

    class Proc:
        ppids = {worker: [forkserver, supervisor], supervisor: [1]}

        def __init__(self, pid: int) -> None:
            if pid == forkserver:  # reaped between the worker's ppid and this lookup
                raise psutil.NoSuchProcess(pid)
            self.pid = pid

        def ppid(self) -> int:
            seq = self.ppids[self.pid]
            return seq.pop(0) if len(seq) > 1 else seq[0]

    monkeypatch.setattr(service.psutil, "Process", Proc)
    assert service.ancestry(worker) == {worker, supervisor}


def test_a_control_request_without_an_answer_names_itself(tmp_path):
    """A service that takes the request and never answers (a million's broadcast past
    --broadcast-timeout): the error names the request and the wait, not a bare TimeoutError."""
    import asyncio
    import socket

    from loadgen.bench.options import BenchError
    from loadgen.bench.service import control

    path = str(tmp_path / "c.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()  # connects complete in its backlog; nothing reads or answers
        with pytest.raises(BenchError, match=r"no answer to 'broadcast' within 0\.3 s$"):
            asyncio.run(control(path, {"op": "broadcast", "data": "x"}, timeout=0.3))
