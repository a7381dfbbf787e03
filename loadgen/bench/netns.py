"""Clients on "other machines" on one box: network namespaces for the load generator.

The classic test ran its clients on 40 other machines; on one box, with ``--netns N``, the bench
creates N network namespaces, each linked by a veth pair to one bridge in the host's namespace::

    host:  cbench-br 10.77.0.1/16  <- the service listens here
             |- cbench0h  <veth>  eth0 10.77.1.1 [10.77.1.2 ...]   (namespace cbench0)
             |- cbench1h  <veth>  eth0 10.77.2.1 ...               (namespace cbench1)

Each engine process runs inside one namespace (engine i in namespace i mod N) and connects from
that namespace's addresses. What this changes against loopback: the clients' sockets live in
their namespace's own TCP established hash (``net.ipv4.tcp_child_ehash_entries`` is set before
the namespaces are created, so each gets a table of its own instead of sharing the host's, which
the boot fixed at 262,144 buckets for both ends of every connection), and every packet crosses a
veth and the bridge as it would a NIC. Everything is removed when the run ends, also after an
interrupted run (the names carry the prefix ``cbench``; a new run removes leftovers first).
Needs root and iproute2 (``ip``).

With ``--service-netns`` the service gets a namespace of its own too, ``cbench-svc``, and the
bridge moves into it (the service listens on the bridge's address there)::

    cbench-svc:  cbench-br 10.77.0.1/16  <- the service
                   |- cbench0h <veth> eth0 10.77.1.1   (namespace cbench0) ...

so the host's namespace carries none of the run's packets: the service's sockets are in a TCP
established hash sized for ``--conns`` (the host's is fixed at boot, 262,144 buckets on this
machine kind), and no netfilter rule of the host's (Docker's chains, the NOTRACK rules) is on
their path. The listen-queue sysctls the host was tuned with are copied into it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import shutil
import subprocess
from pathlib import Path

from loadgen.bench.options import BRIDGE_ADDRESS, BenchError
from loadgen.engine.sources import Namespace

PREFIX = "cbench"
BRIDGE = f"{PREFIX}-br"
SERVICE_NS = f"{PREFIX}-svc"
# The host's values the service's namespace gets (a new namespace starts at the kernel's
# defaults for these: somaxconn 4096, and the backlog of SYNs by the machine's memory). The
# bridge's netfilter call is per namespace: off there, as nothing in it has rules.
SERVICE_SYSCTLS = (
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_syncookies",
)
SUBNET = ipaddress.IPv4Network("10.77.0.0/16")
# Connections planned per source address. The namespace's port range is 10240-65535 (55,296
# ports, below), but the kernel's search for a free port on connect (__inet_hash_connect) slows
# as the range fills: at a million with one address per namespace (~39,000 used where two engines
# shared one) it took a quarter of all CPU at the end of the ramp. At most ~36 % full instead.
PORTS_PER_ADDRESS = 20_000
PORT_RANGE = "10240 65535"
MAX_NAMESPACES = 250
EHASH_SYSCTL = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")


def _ip(*args: str) -> None:
    """One iproute2 command; a failure is a :class:`BenchError` naming it and its message."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"netns: `ip {' '.join(args)}` failed: {r.stderr.strip()}")


def plan(count: int, conns: int) -> list[Namespace]:
    """``count`` namespaces sharing ``conns`` connections; each gets enough addresses for its
    share (ceil(share / 20,000)) from 10.77.<i+1>.1 on."""
    if not 1 <= count <= MAX_NAMESPACES:
        raise BenchError(f"--netns must be 1-{MAX_NAMESPACES}, got {count}")
    per = math.ceil(math.ceil(conns / count) / PORTS_PER_ADDRESS)
    if per > 250:
        raise BenchError(f"--netns {count}: {conns:,} connections need more namespaces")
    return [
        Namespace(f"{PREFIX}{i}", tuple(f"10.77.{i + 1}.{j}" for j in range(1, per + 1)))
        for i in range(count)
    ]


def ehash_entries(conns: int, count: int) -> int:
    """Buckets for each namespace's own TCP established hash: a power of two at least its share
    of the connections (the kernel rounds it up to one anyway)."""
    share = max(1, math.ceil(conns / count))
    return 1 << max(10, (share - 1).bit_length())


class NetnsLab:
    """The namespaces, the veths and the bridge of one run; :meth:`close` removes them all."""

    def __init__(self, count: int, conns: int, service: bool = False) -> None:
        self.namespaces = plan(count, conns)
        self.ehash = ehash_entries(conns, count)
        # --service-netns: the service's own namespace, its table sized for every connection.
        self.service = Namespace(SERVICE_NS, (BRIDGE_ADDRESS,)) if service else None
        self.service_ehash = ehash_entries(conns, 1) if service else 0
        self._old_ehash: str | None = None

    @staticmethod
    def check() -> None:
        """Raise :class:`BenchError` when this host cannot make namespaces."""
        if os.geteuid() != 0:
            raise BenchError("--netns needs root (it creates network namespaces and veths)")
        if shutil.which("ip") is None:
            raise BenchError("--netns needs iproute2's `ip` (apt-get install iproute2)")

    def create(self) -> list[Namespace]:
        self.check()
        remove_leftovers()
        if EHASH_SYSCTL.exists():
            # Read by `ip netns add` (the kernel, at namespace creation): set it first.
            self._old_ehash = EHASH_SYSCTL.read_text().strip()
        # The bridge's namespace: the service's own, or the host's.
        at: list[str] = []
        try:
            if self.service is not None:
                self._set_ehash(self.service_ehash)
                _ip("netns", "add", SERVICE_NS)
                at = ["-n", SERVICE_NS]
                _ip(*at, "link", "set", "lo", "up")
                self._copy_sysctls()
            self._set_ehash(self.ehash)
            _ip(*at, "link", "add", BRIDGE, "type", "bridge")
            _ip(*at, "addr", "add", f"{BRIDGE_ADDRESS}/{SUBNET.prefixlen}", "dev", BRIDGE)
            _ip(*at, "link", "set", BRIDGE, "up")
            for i, ns in enumerate(self.namespaces):
                host_end = f"{PREFIX}{i}h"
                _ip("netns", "add", ns.name)
                _ip(
                    *at,
                    "link",
                    "add",
                    host_end,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name,
                )
                _ip(*at, "link", "set", host_end, "master", BRIDGE, "up")
                for a in ns.addresses:
                    _ip("-n", ns.name, "addr", "add", f"{a}/{SUBNET.prefixlen}", "dev", "eth0")
                _ip("-n", ns.name, "link", "set", "lo", "up")
                _ip("-n", ns.name, "link", "set", "eth0", "up")
                # Per namespace: a new one starts at the kernel's 32768-60999.
                r = subprocess.run(
                    ns.wrap(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={PORT_RANGE}"]),
                    capture_output=True,
                    text=True,
                )
                if r.returncode != 0:
                    raise BenchError(f"netns {ns.name}: port range: {r.stderr.strip()}")
        except BaseException:
            self.close()
            raise
        return self.namespaces

    def _set_ehash(self, entries: int) -> None:
        if self._old_ehash is not None:
            EHASH_SYSCTL.write_text(str(entries))

    def _copy_sysctls(self) -> None:
        """The host's listen-queue and buffer sysctls into the service's namespace; the
        bridge's netfilter call off there where the kernel has it per namespace (without
        br_netfilter, or on a kernel older than 5.3, the namespace has no such key: skipped)."""
        assert self.service is not None
        settings = []
        for key in SERVICE_SYSCTLS:
            path = Path("/proc/sys", *key.split("."))
            with contextlib.suppress(OSError):
                settings.append(f"{key}={' '.join(path.read_text().split())}")
        r = subprocess.run(
            self.service.wrap(["sysctl", "-q", "-w", *settings]), capture_output=True, text=True
        )
        if r.returncode != 0:
            raise BenchError(f"netns {SERVICE_NS}: sysctl: {r.stderr.strip()}")
        # -e: an unknown key is no error. Inside the namespace, so only its own value changes.
        bridge = ["sysctl", "-q", "-e", "-w", "net.bridge.bridge-nf-call-iptables=0"]
        subprocess.run(self.service.wrap(bridge), capture_output=True)

    def close(self) -> None:
        remove_leftovers()
        if self._old_ehash is not None:
            EHASH_SYSCTL.write_text(self._old_ehash)
            self._old_ehash = None

    def describe(self) -> dict[str, object]:
        return {
            "namespaces": len(self.namespaces),
            "addresses_per_namespace": len(self.namespaces[0].addresses),
            "service_address": BRIDGE_ADDRESS,
            "child_ehash_entries": self.ehash,
            **(
                {"service_namespace": SERVICE_NS, "service_ehash_entries": self.service_ehash}
                if self.service
                else {}
            ),
        }


def remove_leftovers() -> None:
    """Every namespace and the bridge named with our prefix (a veth goes with its namespace,
    the bridge with the service's namespace when it is there)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name == SERVICE_NS or (name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
