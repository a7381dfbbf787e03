"""Preflight: every kernel and process limit that would stop ``--conns`` connections, checked
against this machine, each with the sysctl (or other step) that lifts it."""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadgen.bench.service import service_workers
from loadgen.engine.sources import FD_RESERVE, auto_procs, nofile_capacity

KERNEL_BYTES_PER_PAIR = 10_000  # Slab per loopback pair, measured (docs/benchmarks.md)


@dataclass
class Check:
    name: str
    value: str
    needed: str
    ok: bool
    fix: str
    # False: not meeting it slows the run (e.g. long hash chains) but does not stop it.
    stops: bool = True


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def untracked_ports() -> set[int]:
    """TCP ports exempt from connection tracking by a raw-table NOTRACK rule (host_tuning's
    ``host_tuning_notrack_ports``); empty where the rules cannot be read (not root, no iptables)."""
    ports: set[int] = set()
    for argv in (
        ["iptables", "-t", "raw", "-S"],
        ["nft", "list", "table", "inet", "comet1m_notrack"],
    ):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            if "NOTRACK" in line or "notrack" in line:
                ports.update(int(m) for m in re.findall(r"[ds]port\D{1,4}(\d+)", line))
    return ports


def preflight(
    conns: int,
    sources: int,
    remote: bool = False,
    concurrency: int = 200,
    port: int = 0,
    host_sockets: int | None = None,
) -> list[Check]:
    """Every limit that could stop ``conns`` loopback connections, checked against the machine.
    A ``port`` exempt from connection tracking needs no conntrack entries. ``host_sockets``:
    how many of the run's sockets the host's own network namespace holds (default: both ends
    of every connection, one when ``remote``; ``comet-bench --netns`` one end, with
    ``--service-netns`` none, and then neither its conntrack nor its TCP table matters)."""
    checks = []
    sockets = (1 if remote else 2) * conns if host_sockets is None else host_sockets
    untracked = port in untracked_ports() if port else False
    if sockets == 0:
        checks.append(
            Check(
                "the host's network namespace",
                "not on the run's path (every socket in a namespace of the run)",
                "-",
                True,
                "",
            )
        )
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    ports = (hi - lo + 1) * max(1, sources)
    checks.append(
        Check(
            "ephemeral ports",
            f"{hi - lo + 1:,} × {max(1, sources)} source addr = {ports:,}",
            f"{conns:,}",
            conns <= ports,
            "sysctl -w net.ipv4.ip_local_port_range='1024 65535' or more --source-ips",
        )
    )
    ct_max = _read_int("/proc/sys/net/netfilter/nf_conntrack_max") if sockets else None
    if untracked and sockets:
        checks.append(
            Check("connection tracking", f"port {port} untracked (raw NOTRACK)", "-", True, "")
        )
        ct_max = None  # neither the table's size nor its hash matters for this port
    if ct_max is not None:
        ct_now = _read_int("/proc/sys/net/netfilter/nf_conntrack_count") or 0
        need = conns + ct_now
        checks.append(
            Check(
                "nf_conntrack_max",
                f"{ct_max:,} ({ct_now:,} in use)",
                f"{need:,}",
                need <= ct_max,
                f"sysctl -w net.netfilter.nf_conntrack_max={max(ct_max, 2 * need):,}".replace(
                    ",", ""
                ),
            )
        )
    # Both ends of a loopback connection are in the kernel's tables: every packet (data and ACK)
    # is looked up in the TCP established hash and, with conntrack loaded, the conntrack hash.
    # At 1,000,000 with the 262,144 buckets a 24 GB host boots with, the chains were ~4 and ~8
    # long, and the two lookups took 9 % + 8.6 % of all CPU (perf, holding 1M).
    buckets = _read_int("/proc/sys/net/netfilter/nf_conntrack_buckets")
    if buckets is not None and ct_max is not None:
        want = min(2**21, 1 << max(0, (conns - 1).bit_length()))
        checks.append(
            Check(
                "nf_conntrack_buckets",
                f"{buckets:,}",
                f"≥ {want:,} (≤ 1 entry a bucket)",
                buckets >= want,
                f"sysctl -w net.netfilter.nf_conntrack_buckets={want}",
                stops=False,
            )
        )
    ehash = _read_int("/proc/sys/net/ipv4/tcp_ehash_entries") if sockets else None
    if ehash is not None:
        checks.append(
            Check(
                "net.ipv4.tcp_ehash_entries",
                f"{abs(ehash):,}",
                f"≥ {sockets // 2:,} (≤ 2 sockets a bucket)",
                abs(ehash) >= sockets // 2,
                "boot with thash_entries=2097152 on the kernel command line (fixed at boot)",
                stops=False,
            )
        )
    file_max = _read_int("/proc/sys/fs/file-max") or 0
    file_now = _read_int("/proc/sys/fs/file-nr") or 0
    both_ends = 1 if remote else 2
    need_files = both_ends * conns + file_now + 10_000
    checks.append(
        Check(
            "fs.file-max",
            f"{file_max:,} ({file_now:,} in use)",
            f"{need_files:,}",
            need_files <= file_max,
            f"sysctl -w fs.file-max={2 * need_files}",
        )
    )
    cap = nofile_capacity()
    hard = cap + FD_RESERVE
    client_procs = auto_procs(conns, cap)
    server_workers = service_workers(conns, hard)
    checks.append(
        Check(
            "fds (RLIMIT_NOFILE)",
            f"{hard:,} per process",
            f"{client_procs} client + {server_workers} worker processes",
            hard > 1000,
            "raise nofile in /etc/security/limits.d (and fs.nr_open) to use fewer processes",
        )
    )
    avail = meminfo_kb("MemAvailable") * 1024
    # Kernel socket pair + ~3 KB server + ~2 KB client Python objects per connection.
    need_mem = conns * (KERNEL_BYTES_PER_PAIR + 5_000)
    checks.append(
        Check(
            "memory",
            f"{avail / 2**30:.1f} GiB available",
            f"~{need_mem / 2**30:.1f} GiB",
            need_mem <= avail,
            "fewer --conns or a bigger machine",
        )
    )
    # Socket buffer memory: during a broadcast every connection has at least one queued skb
    # (≥ 1 page accounted) until its reader catches up; past tcp_mem's third value the kernel
    # logs "TCP: out of memory" and drops sockets, i.e. connection errors in the middle of a run.
    try:
        tcp_mem_max = int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        tcp_mem_max = None
    if tcp_mem_max is not None:
        checks.append(
            Check(
                "net.ipv4.tcp_mem (max)",
                f"{tcp_mem_max:,} pages",
                f"{conns:,} pages (1 per connection in a broadcast)",
                tcp_mem_max >= conns,
                f"sysctl -w net.ipv4.tcp_mem='{max(conns // 4, 1)} {conns} {conns * 3 // 2}'",
            )
        )
    # Accept backlog: SO_REUSEPORT gives every worker its own queue of min(backlog, somaxconn);
    # the client processes have procs × --concurrency connects in flight at once, and a full
    # queue turns into SYN retries (1 s, 3 s, ...) that stall the ramp or time heads out.
    somax = _read_int("/proc/sys/net/core/somaxconn") or 0
    in_flight = client_procs * concurrency
    per_queue = math.ceil(in_flight / max(1, server_workers))
    checks.append(
        Check(
            "net.core.somaxconn",
            f"{somax:,}",
            f"≥ {per_queue:,} ({in_flight:,} connects in flight / {server_workers} workers)",
            somax >= per_queue,
            "sysctl -w net.core.somaxconn=65535",
        )
    )
    syn = _read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog") or 0
    checks.append(
        Check(
            "net.ipv4.tcp_max_syn_backlog",
            f"{syn:,}",
            f"≥ {in_flight:,} connects in flight",
            syn >= in_flight,
            "sysctl -w net.ipv4.tcp_max_syn_backlog=65535",
        )
    )
    return checks


def verdict(checks: list[Check]) -> str:
    stops = [c for c in checks if not c.ok and c.stops]
    slow = [c.name for c in checks if not c.ok and not c.stops]
    tail = f" (slower than it could be: {', '.join(slow)})" if slow else ""
    if not stops:
        return "no checked limit stops this run" + tail
    c = stops[0]
    return f"{c.name} will stop the run ({c.value} < {c.needed}); lift it with: {c.fix}" + tail


def print_preflight(console: Console, checks: list[Check]) -> None:
    t = Table(title="preflight")
    for col in ("limit", "value", "needed", "", "how to lift it"):
        t.add_column(col)
    for c in checks:
        t.add_row(
            c.name,
            c.value,
            c.needed,
            "[green]ok[/green]"
            if c.ok
            else ("[red]STOP[/red]" if c.stops else "[yellow]slow[/yellow]"),
            "" if c.ok else c.fix,
        )
    console.print(t)
    console.print(verdict(checks))
