"""The benchmark scripts' own command lines: each explains itself with --help and refuses a bad
argument with a message, not a traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.net import free_port
from tests.support.service import ROOT, benchmark

SCRIPTS = sorted(path.name for path in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_explains_itself(script):
    r = benchmark(script, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: "), r.stdout
    assert "Traceback" not in r.stderr


def test_million_summary_names_what_is_missing(tmp_path):
    r = benchmark("million_summary.py", str(tmp_path))
    assert r.returncode == 2
    assert f"{tmp_path / 'bench.json'}: no such file" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "bench.json").write_text("{}")
    r = benchmark("million_summary.py", str(tmp_path))
    assert r.returncode == 2
    assert "no service CSV log" in r.stderr and "Traceback" not in r.stderr


def test_make_test_cert_refuses_a_file_for_its_directory(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    r = benchmark("make_test_cert.py", str(target))
    assert r.returncode == 2
    assert f"{target}: exists and is not a directory" in r.stderr
    r = benchmark("make_test_cert.py", str(tmp_path / "tls"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.pem", "cert.pem", "key.pem"]


@pytest.mark.parametrize("bad", [("--runs", "0"), ("--conns", "-5"), ("--workers", "-1")])
def test_nchan_compare_refuses_a_count_it_cannot_run(bad):
    r = benchmark("nchan_compare.py", *bad)
    assert r.returncode == 2
    assert "--conns and --runs must be 1 or more" in r.stderr and "Traceback" not in r.stderr


def test_nchan_compare_refuses_a_before_without_the_service(tmp_path):
    r = benchmark("nchan_compare.py", "--before", str(tmp_path))
    assert r.returncode == 2
    assert f"--before {tmp_path}: no service package there" in r.stderr, r.stderr


def _options_without_help(usage: str) -> list[str]:
    """The options in argparse's ``--help`` output that have no text after them."""
    lines = usage.split("\n")
    missing = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        spec, _, text = line.strip().partition("  ")
        follows = lines[i + 1] if i + 1 < len(lines) else ""
        # argparse puts the text on the same line, or indented on the next when the spec is long.
        if not text.strip() and not (follows.startswith(" " * 8) and follows.strip()):
            missing.append(spec)
    return missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_option_says_what_it_does(script):
    r = benchmark(script, "--help")
    assert _options_without_help(r.stdout) == [], r.stdout


def test_conn_path_times_both_paths_and_names_a_head_that_is_not_a_stream():
    r = benchmark("conn_path.py", "--n", "300", "--rounds", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["connection_made + data_received", "accepted"]
    assert all(float(line.split("median ")[1].split(" ")[0]) > 0 for line in lines), lines
    r = benchmark(
        "conn_path.py", "--n", "5", "--head", "GET /nope HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n"
    )
    assert r.returncode == 1
    assert "the head was not answered with a stream" in r.stderr and "Traceback" not in r.stderr


def test_wakeup_price_measures_and_refuses_a_zero_interval():
    r = benchmark("wakeup_price.py", "--seconds", "0.3", "--interval", "0.05")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(" every")[0].strip() for line in lines] == ["time.sleep", "uvloop timer"]
    assert all(float(line.split(":")[1].split("µs")[0]) > 0 for line in lines), lines
    r = benchmark("wakeup_price.py", "--interval", "0")
    assert r.returncode == 2
    assert "every --interval must be above 0" in r.stderr and "Traceback" not in r.stderr


def test_wakeup_price_measures_processes_side_by_side_on_one_grid():
    r = benchmark(
        *("wakeup_price.py", "--seconds", "0.5", "--interval", "0.05", "--processes", "3"),
        "--grid",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(" every")[0].strip() for line in lines] == ["time.sleep", "uvloop timer"]
    for line in lines:  # the median of three, and their range
        low, high = line.split("(")[1].split(")")[0].split("-")
        assert 0 < float(low) <= float(line.split(":")[1].split("µs")[0]) <= float(high), line
    r = benchmark("wakeup_price.py", "--processes", "0")
    assert r.returncode == 2 and "--processes must be 1 or more" in r.stderr


@pytest.mark.parametrize("mode", [[], ["--raw", "--defer-accept", "1"]], ids=["uvloop", "raw"])
def test_the_floor_greets_broadcasts_to_and_forgets_its_connections(mode):
    """bare_server.py, with uvloop transports or bare sockets in one epoll (--raw): each client
    reads the welcome, a SIGUSR1 reaches every held connection, and a closed one is let go."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), "--port", str(port), *mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on http")
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(c)
        for c in clients:
            assert _read_until(c, b"Welcome!\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
        proc.send_signal(signal.SIGUSR1)
        assert proc.stdout.readline().split()[:2] == ["broadcast", "3"]
        for c in clients:
            assert _read_until(c, b"BCAST\n\r\n") == b"6\r\nBCAST\n\r\n"
        clients.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the close reaches the server's loop on its own time
            proc.send_signal(signal.SIGUSR1)
            held = int(proc.stdout.readline().split()[1])
            if held == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert held == 2
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_worker_bench_runs_the_worker_on_bare_sockets():
    """worker_bench.py --plane raw: the worker with --plane raw takes every connection and
    reaches each with a broadcast (the bench asserts the worker's count and every client's
    delivery); with --tls it is refused."""
    r = benchmark(
        "worker_bench.py",
        *("--n", "300", "--clients", "1", "--runs", "1", "--server", "comet"),
        *("--plane", "raw", "--settle", "0.5"),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "comet MEDIAN of 1 (n=300)" in r.stdout, r.stdout
    r = benchmark("worker_bench.py", "--plane", "raw", "--tls")
    assert r.returncode == 2 and "--plane raw holds plain HTTP only" in r.stderr, r.stderr


@pytest.mark.parametrize("bad", [("--n", "0"), ("--clients", "0"), ("--runs", "0")])
def test_worker_bench_refuses_a_count_it_cannot_run(bad):
    r = benchmark("worker_bench.py", *bad)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-1000:]
    assert "--n, --clients, --runs and --workers must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_idle_cost_reads_each_process_of_a_service_holding_nothing():
    """idle_cost.py: the supervisor and every worker of a service with no connections ran on a
    CPU over the window (each samples its loop's lag and answers for stats), the total is their
    sum; a bad window is refused."""
    r = benchmark(
        "idle_cost.py", *("--workers", "2", "--seconds", "1.5", "--settle", "0.5"), timeout=120
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    sup = float(lines["supervisor"].split("ms")[0])
    workers = float(lines["workers"].split("ms")[0])
    total = float(lines["total"].split("ms")[0])
    assert sup > 0 and workers > 0, r.stdout
    assert abs(total - sup - workers) < 0.02, r.stdout
    assert "2 workers, no connections" in lines["cpu"], r.stdout
    r = benchmark("idle_cost.py", "--seconds", "0")
    assert r.returncode == 2 and "--seconds above 0" in r.stderr and "Traceback" not in r.stderr
