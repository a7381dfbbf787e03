"""``comet-bench``'s options: parsed once from the command line into a typed, checked
:class:`Options` that every phase reads (nothing writes to it after)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from loadgen.bench import autogroup
from loadgen.engine.config import MAX_COALESCE
from service.config import Parser

# With --netns, the address in the host's namespace (or the service's, with --service-netns)
# that the clients' namespaces reach over the bridge: where the service listens
# (loadgen.bench.netns), and where a --target of the host's own must listen.
BRIDGE_ADDRESS = "10.77.0.1"
# --client-coalesce-ms's bound: the engines' (loadgen.engine.config.MAX_COALESCE), in ms.
MAX_COALESCE_MS = MAX_COALESCE * 1000


class BenchError(Exception):
    """The run cannot go on; the message says why (and what to do)."""


@dataclass(frozen=True)
class Target:
    """Where the clients connect."""

    host: str
    port: int  # 0: the service the bench starts, on a port chosen then
    path: str
    tls: bool


@dataclass(frozen=True)
class Options:
    conns: int = 2000
    rate: float = 1000.0
    hold: float = 5.0
    ramp_timeout: float = 0.0
    broadcasts: int = 3
    broadcast_timeout: float = 30.0
    broadcast_gap: float = 0.5
    out: str = "bench-out"
    workers: str = "auto"
    port: int = 0
    path: str = "/"
    ping_interval: float = 20.0
    procs: str = "auto"
    concurrency: int = 200
    source_ips: str = "auto"
    target: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    publish_cmd: str | None = None
    progress: bool = True
    client_nice: int = 0
    client_sched: str = "other"
    client_coalesce_ms: float = 0.0
    client_autogroup_nice: int | None = None
    ramp_down: bool = False
    netns: int = 0
    service_netns: bool = False
    min_available_gib: float = 2.0
    preflight_only: bool = False

    def host_sockets(self) -> int | None:
        """How many of the run's sockets the host's own network namespace holds, for the
        preflight: the service's ends with --netns, none with --service-netns (None: the
        preflight's default, both ends of every connection)."""
        if not self.netns:
            return None
        return 0 if self.service_netns else self.conns

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> Options:
        """The options of ``argv``; exits 2 with one line naming the problem."""
        parser = build_parser()
        opts = cls(**vars(parser.parse_args(argv)))
        problem = opts.problem()
        if problem:
            parser.error(problem)
        # TLS files by absolute path: the service and the engines run in other directories.
        return dataclasses.replace(
            opts,
            **{
                name: os.path.abspath(path)
                for name in ("tls_cert", "tls_key", "tls_ca")
                if (path := getattr(opts, name))
            },
        )

    def problem(self) -> str | None:
        """What is wrong with these options, or None."""
        if self.conns < 1 or self.rate <= 0 or self.hold < 0 or self.broadcasts < 0:
            return "--conns and --rate must be positive, --hold and --broadcasts not negative"
        if self.target and self.broadcasts > 0 and not self.publish_cmd:
            return "--target needs --publish-cmd to broadcast (or --broadcasts 0)"
        if self.publish_cmd and not self.target:
            return "--publish-cmd only goes with --target"
        if bool(self.tls_cert) != bool(self.tls_key):
            return "--tls-cert and --tls-key go together"
        if self.tls_cert and self.target:
            return "--tls-cert starts the service with TLS; with --target use https://"
        if self.netns and self.source_ips != "auto":
            return "--netns gives each namespace its own addresses: not with --source-ips"
        if self.netns and self.target:
            # A server of the host's own (the floor's bare servers) is reached from the
            # namespaces on the bridge's address, the one the service would listen on.
            host = urlsplit(self.target).hostname
            if self.service_netns or host != BRIDGE_ADDRESS:
                return (
                    f"--netns with --target: the target must listen on the host at the bridge's "
                    f"address, http://{BRIDGE_ADDRESS}:PORT/ (not with --service-netns)"
                )
        if not 0 <= self.client_coalesce_ms <= MAX_COALESCE_MS:
            return f"--client-coalesce-ms must be from 0 (off) to {MAX_COALESCE_MS:g}"
        if self.client_autogroup_nice is not None:
            if not -20 <= self.client_autogroup_nice <= 19:
                return "--client-autogroup-nice must be from -20 to 19"
            why = autogroup.unavailable()
            if why:
                return f"--client-autogroup-nice: {why}"
        if self.netns < 0:
            return "--netns must be 0 (off) or a number of namespaces"
        if self.service_netns and not self.netns:
            return "--service-netns goes with --netns N (the clients in namespaces too)"
        if self.target:
            u = urlsplit(self.target)
            if u.scheme not in ("http", "https") or not u.hostname:
                return f"--target: expected http(s)://host:port/path, got {self.target!r}"
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                return f"--{name.replace('_', '-')}: cannot read {path}"
        return None

    def where(self) -> Target:
        """The clients' target: ``--target``'s URL, or the service this bench starts."""
        if not self.target:
            return Target("127.0.0.1", 0, self.path, bool(self.tls_cert))
        u = urlsplit(self.target)
        tls = u.scheme == "https"
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return Target(u.hostname or "127.0.0.1", u.port or (443 if tls else 80), path, tls)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="comet-bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run the comet1m service and local load generators on this box, ramp to "
        "--conns, hold, broadcast, and report (JSON, CSV, PNG and a table). With "
        "--target/--publish-cmd, measure any other HTTP streaming server instead.",
    )
    p.add_argument("--conns", type=int, default=2000, help="connections to reach")
    p.add_argument("--rate", type=float, default=1000.0, help="new connections per second")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold before broadcasting")
    p.add_argument(
        "--ramp-timeout",
        type=float,
        default=0.0,
        help="seconds the ramp may take before the hold starts anyway (0 = 2 × conns/rate + 60)",
    )
    p.add_argument("--broadcasts", type=int, default=3, help="timed broadcasts to send")
    p.add_argument(
        "--broadcast-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for one broadcast to reach every connection",
    )
    p.add_argument("--broadcast-gap", type=float, default=0.5, help="seconds between broadcasts")
    p.add_argument("--out", default="bench-out", help="directory for bench.json/.csv/.png")
    p.add_argument(
        "--workers",
        default="auto",
        help="service --workers (auto = ceil(1.05 × conns / (RLIMIT_NOFILE - 500)): "
        "SO_REUSEPORT does not spread connections evenly)",
    )
    p.add_argument("--port", type=int, default=0, help="service port (0 = a free one)")
    p.add_argument("--path", default="/", help="stream path on the service")
    p.add_argument("--ping-interval", type=float, default=20.0, help="service --ping-interval")
    p.add_argument(
        "--procs",
        default="auto",
        help="client engine processes (auto = ceil(conns / (RLIMIT_NOFILE - 200)))",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=200,
        help="connections in progress at once per engine process",
    )
    p.add_argument(
        "--source-ips",
        default="auto",
        help="client source addresses (auto = 127.0.0.2-127.0.0.41 for loopback)",
    )
    p.add_argument(
        "--target",
        help="http(s)://host:port/path of another streaming server (no service is started); "
        "with --netns it listens on this host at the bridge's address, "
        f"http://{BRIDGE_ADDRESS}:PORT/",
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="start the service with HTTPS (its --tls-cert); the clients then use TLS",
    )
    p.add_argument("--tls-key", metavar="PEM", help="the service's --tls-key")
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA the clients check the server certificate with (default: the system's)",
    )
    p.add_argument(
        "--publish-cmd",
        help="with --target: shell command that publishes one message; it gets the "
        "message in $COMET_BENCH_DATA and in place of {data} (shell-quoted)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress display while ramping (--no-progress: none)",
    )
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="nice value of the client engine processes (e.g. 10). Under the kernel's autogroup "
        "scheduling (kernel.sched_autogroup_enabled=1, Debian's default) a nice value weighs "
        "only within its session: the engines against the bench itself, not against the "
        "service, whose workers are sessions of their own and get a share of a busy CPU each "
        "(docs/benchmarks.md, 'Fifty-four shares against one')",
    )
    p.add_argument(
        "--client-sched",
        choices=("batch", "other"),
        default="other",
        help="scheduling policy of the client engine processes: other (SCHED_OTHER, the "
        "kernel's default) lets each woken client preempt the server; batch (SCHED_BATCH) lets "
        "the server finish its time slice when its write wakes a client, as clients on other "
        "machines would (faster broadcasts at 100,000; at a million no faster, and the "
        "workers' loop lag higher)",
    )
    p.add_argument(
        "--client-coalesce-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="let each client engine process gather data for up to MS milliseconds between "
        f"two polls of its loop while data flows (0 = off, at most {MAX_COALESCE_MS:g}): on a "
        "box the clients share with the service, one wake-up for many reads instead of one for "
        "a few. A delivery is timed up to MS late; an engine making connections does not nap "
        "(docs/benchmarks.md, 'Clients that wake less')",
    )
    p.add_argument(
        "--client-autogroup-nice",
        type=int,
        default=None,
        metavar="N",
        help="nice value of the kernel's autogroup of the bench's session, which holds every "
        "client engine process (-20..19; unset: left alone): under autogroup scheduling the "
        "whole load generator gets one share of a busy CPU against one per service worker, and "
        "-5 makes it about three. It weighs the whole session (the bench, its engines, and "
        "the shell that started it) and is set back when the bench ends; a negative value needs "
        "root. Use it with --client-coalesce-ms, or the engines spend the share "
        "waking per message. At a million on an AMD EPYC Zen 4, -5 showed no gain the box's "
        "drift did not swamp (docs/benchmarks.md, 'A few shares for the clients')",
    )
    p.add_argument(
        "--ramp-down",
        action="store_true",
        help="end with a timed ramp-down: every client closes, until the service holds none",
    )
    p.add_argument(
        "--netns",
        type=int,
        default=0,
        metavar="N",
        help="put the client engines in N network namespaces of their own (veths on a bridge, "
        f"the service on {BRIDGE_ADDRESS}; each namespace its own TCP hash table; an engine "
        "process in each at least): clients on 'other machines' as in the classic test; needs "
        "root and iproute2; 0 = loopback",
    )
    p.add_argument(
        "--service-netns",
        action="store_true",
        help="with --netns: run the service in a namespace of its own as well (cbench-svc, the "
        "bridge inside it, its TCP hash sized for --conns, the host's listen-queue sysctls "
        "copied in), so no packet of the run crosses the host's own namespace: neither its "
        "TCP table, sized at boot, nor its netfilter rules",
    )
    p.add_argument(
        "--min-available-gib",
        type=float,
        default=2.0,
        help="stop the run when the host's MemAvailable falls below this",
    )
    p.add_argument("--preflight-only", action="store_true", help="print the preflight and exit")
    return p
