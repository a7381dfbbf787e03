"""What the million run (docs/benchmarks.md, "million") added to comet-bench, at small scale.

The million itself is not a CI test (it takes ~25 minutes and the whole box); these check the
parts it relies on: the extra preflight checks, per-broadcast loop lag (p99), CPU while holding,
the timed ramp-down, niced clients and the memory guard.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loadgen.bench.preflight import preflight, verdict
from tests.loadgen.conftest import bench
from tests.support.service import reaped


def test_preflight_names_tcp_mem_and_backlogs() -> None:
    checks = {c.name: c for c in preflight(1_000_000, 40, concurrency=200)}
    for name in ("net.ipv4.tcp_mem (max)", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"):
        assert name in checks, name
    # A connection count no tcp_mem can give must be named with the setting that lifts it.
    huge = preflight(10**12, 40)
    stops = [c for c in huge if not c.ok]
    assert any(c.name == "net.ipv4.tcp_mem (max)" for c in stops)
    tcp = next(c for c in huge if c.name == "net.ipv4.tcp_mem (max)")
    assert "sysctl -w net.ipv4.tcp_mem=" in tcp.fix
    assert "will stop the run" in verdict(huge)


def test_preflight_reports_short_hash_tables_as_slow_not_stopping() -> None:
    """The TCP established hash and the conntrack hash slow a run down; they never stop it."""
    checks = {c.name: c for c in preflight(10**9, 40)}
    ehash = Path("/proc/sys/net/ipv4/tcp_ehash_entries")
    if ehash.exists():
        c = checks["net.ipv4.tcp_ehash_entries"]
        assert not c.ok and not c.stops and "thash_entries" in c.fix
    buckets = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
    if buckets.exists():
        c = checks["nf_conntrack_buckets"]
        assert c.ok == (int(buckets.read_text()) >= 2**21) and not c.stops
        assert c.fix == "sysctl -w net.netfilter.nf_conntrack_buckets=2097152"
    assert ehash.exists(), "kernel >= 6.1 exposes tcp_ehash_entries (this machine: 6.18)"
    small = [c for c in preflight(1000, 40) if c.name == "net.ipv4.tcp_ehash_entries"]
    assert small and small[0].ok
    v = verdict(list(checks.values()))
    assert "slower than it could be: " in v and "tcp_ehash_entries" in v


def test_preflight_counts_only_the_sockets_the_hosts_namespace_holds() -> None:
    """--netns: the host's TCP table holds the service's ends only; --service-netns: none of
    the run's sockets, so neither that table nor conntrack is checked, and the report says why."""
    from loadgen.bench.options import Options

    half = {c.name: c for c in preflight(1_000_000, 80, host_sockets=1_000_000)}
    assert half["net.ipv4.tcp_ehash_entries"].needed == "≥ 500,000 (≤ 2 sockets a bucket)"
    both = {c.name: c for c in preflight(1_000_000, 80)}
    assert both["net.ipv4.tcp_ehash_entries"].needed == "≥ 1,000,000 (≤ 2 sockets a bucket)"
    none = {c.name: c for c in preflight(1_000_000, 80, host_sockets=0)}
    assert "net.ipv4.tcp_ehash_entries" not in none
    assert not {"nf_conntrack_max", "nf_conntrack_buckets", "connection tracking"} & set(none)
    assert none["the host's network namespace"].ok
    assert "ephemeral ports" in none and "fs.file-max" in none  # still the host's to give
    assert Options(netns=40, conns=7).host_sockets() == 7
    assert Options(netns=40, conns=7, service_netns=True).host_sockets() == 0
    assert Options(conns=7).host_sockets() is None


def test_bench_reports_lag_per_broadcast_hold_cpu_and_ramp_down(tmp_path) -> None:
    out = tmp_path / "out"
    # A process that is neither the service nor the load generator, busy through the hold: the
    # report names it among what kept the host from idling.
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        r = bench(
            "--conns", "1000", "--rate", "2000", "--hold", "3", "--broadcasts", "2",
            "--ramp-down", "--client-nice", "5", "--out", str(out), "--no-progress",
        )  # fmt: skip
    finally:
        spinner.kill()
        spinner.wait(timeout=10)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["held"] == 1000 and report["client_nice"] == 5
    for b in report["broadcasts"]:
        assert b["delivered"] == 1000
        assert b["answer_ms"] >= 0
        # The frames covering the fan-out carry the workers' p99 (added for this issue).
        assert b["lag_p99_ms"] is not None and 0 <= b["lag_p99_ms"] <= b["lag_max_ms"]
    hc = report["hold_cpu"]
    assert hc["seconds"] >= 2.5 and hc["cores"] == os.cpu_count()
    for k in (
        "service_pct_of_core", "load_generator_pct_of_core", "host_busy_pct_of_core",
        "softirq_pct_of_core",
    ):  # fmt: skip
        assert hc[k] is not None and hc[k] >= 0, k
    others = {o["pid"]: o for o in hc["other_processes"]}
    assert others[spinner.pid]["pct_of_core"] >= 20, hc["other_processes"]
    assert report["service_pid"] not in others  # the service's tree is its own figure
    assert "other processes" in r.stdout
    # What the box had queued through the hold (the counter is the whole host's, so only its
    # presence is asserted here; the warning's threshold is test_record's).
    hb = report["hold_backlog"]
    assert all(isinstance(hb[k], int) and hb[k] >= 0 for k in hb if k.startswith("tcp_mem")), hb
    assert hb["longest_row_gap_s"] > 0, hb
    assert isinstance(report["ramp_diagnosis"]["tcp_mem_pages_max"], int)
    assert "TCP memory queued" in r.stdout
    header = (out / "bench.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "tcp_mem_pages"
    assert report["ramp_down_s"] >= 0 and report["ramp_down_server_conns_left"] == 0
    assert "ramp-down" in r.stdout and "lag p99" in r.stdout
    assert not psutil.pid_exists(report["service_pid"])


def test_bench_stops_when_memory_runs_short(tmp_path) -> None:
    # Ask for more free memory than the host has: the run stops during the ramp, cleanly.
    total_gib = psutil.virtual_memory().total / 2**30
    r = bench(
        "--conns", "500", "--rate", "50", "--hold", "1", "--broadcasts", "0",
        "--min-available-gib", str(int(total_gib) + 1), "--out", str(tmp_path / "o"),
        "--no-progress",
    )  # fmt: skip
    assert r.returncode != 0
    assert "--min-available-gib" in r.stderr
    assert "Traceback" not in r.stderr


def engine_policies(bench_pid: int) -> dict[int, int]:
    """The scheduling policy of each client engine process under the bench that already holds a
    connection (the bench sets the policy before the ramp, so a connected engine has the policy
    it will keep; none yet: {})."""
    out: dict[int, int] = {}
    try:
        children = psutil.Process(bench_pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in children:
        try:
            if "loadgen.engine.child" in " ".join(p.cmdline()) and p.net_connections("tcp"):
                out[p.pid] = os.sched_getscheduler(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


@pytest.mark.parametrize(("flag", "policy"), [((), os.SCHED_OTHER), (("batch",), os.SCHED_BATCH)])
def test_client_engines_run_with_the_scheduling_policy_asked(tmp_path, flag, policy) -> None:
    """By default the engines keep the kernel's SCHED_OTHER; ``--client-sched batch`` runs them
    SCHED_BATCH (their wake-ups do not preempt the server, as clients on other machines would not).
    Read from the live engines while they hold, and named in the report."""
    out = tmp_path / "out"
    args = ["--conns", "400", "--rate", "2000", "--procs", "2", "--hold", "4", "--broadcasts", "1"]
    if flag:
        args += ["--client-sched", *flag]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadgen.bench", *args, "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
    )
    seen: dict[int, int] = {}
    with reaped(proc):
        deadline = time.monotonic() + 60
        # The bench sets the policy once the engines are up, before the ramp: wait for two
        # engines that have connected (a freshly started one still has the default).
        while time.monotonic() < deadline and proc.poll() is None:
            seen = engine_policies(proc.pid) or seen  # the last seen once they have exited
            if len(seen) == 2 and all(v == policy for v in seen.values()):
                break
            time.sleep(0.1)
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) == 2 and set(seen.values()) == {policy}, seen
    report = json.loads((out / "bench.json").read_text())
    assert report["client_sched"] == (flag[0] if flag else "other")


def autogroups(pids: list[int]) -> set[str]:
    """The distinct ``/proc/PID/autogroup`` lines ("/autogroup-N nice K") of live ``pids``."""
    out: set[str] = set()
    for pid in pids:
        try:
            out.add(Path(f"/proc/{pid}/autogroup").read_text().strip())
        except OSError:
            pass
    return out


def test_client_autogroup_nice_weighs_the_engines_session_not_the_service_and_is_set_back(
    tmp_path,
) -> None:
    """``--client-autogroup-nice 3``: the engines' session (one autogroup, the bench's) has nice
    3 while they hold, the service's workers (sessions of their own) keep 0, and the session
    has its old value again once the bench has ended (the shell that started it reads it)."""
    out = tmp_path / "out"
    bench_argv = [
        sys.executable, "-m", "loadgen.bench", "--conns", "400", "--rate", "2000",
        "--procs", "2", "--workers", "2", "--hold", "4", "--broadcasts", "1",
        "--client-autogroup-nice", "3", "--client-coalesce-ms", "10",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    # The shell is the session's leader (start_new_session): it outlives the bench in it.
    proc = subprocess.Popen(
        [
            "bash",
            "-c",
            '"$@" > /dev/null; echo "rc=$?"; cat /proc/self/autogroup',
            "sh",
            *bench_argv,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    engines: set[str] = set()
    workers: set[str] = set()
    with reaped(proc):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                break
            cmds = {}
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    cmds[p.pid] = " ".join(p.cmdline())
            eng = [pid for pid, c in cmds.items() if "loadgen.engine.child" in c]
            wrk = [pid for pid, c in cmds.items() if "comet-service: worker" in c]
            if len(eng) == 2 and len(wrk) == 2:
                # The bench sets it before it starts anything: the engines have it from birth.
                engines, workers = autogroups(eng), autogroups(wrk)
                break
            time.sleep(0.1)
        stdout, err = proc.communicate(timeout=120)
    assert "rc=0" in stdout, err[-3000:]
    assert len(engines) == 1 and next(iter(engines)).endswith(" nice 3"), engines
    assert len(workers) == 2 and all(w.endswith(" nice 0") for w in workers), workers
    assert not engines & workers
    assert stdout.strip().splitlines()[-1].endswith(" nice 0"), stdout  # set back
    report = json.loads((out / "bench.json").read_text())
    assert report["client_autogroup_nice"] == 3 and report["held"] == 400
