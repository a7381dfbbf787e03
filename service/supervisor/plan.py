"""The capacity plan: how many workers for the target, and which host limits cannot carry it
(each warning names the sysctl and the value that would)."""

from __future__ import annotations

import math
from typing import Any

from service.config import Config


def plan_line(config: Config, nofile: int, workers: int) -> str:
    how = "auto" if config.workers == "auto" else "fixed"
    return (
        f"nofile {nofile}/process → {workers} workers for {config.target_connections:,} target "
        f"({how}; up to {config.connection_cap(nofile):,} connections per worker)"
    )


def host_warnings(config: Config, workers: int, limits: dict[str, Any]) -> list[str]:
    """Say, naming the sysctl, which host limits cannot carry the target."""
    target = config.target_connections
    out: list[str] = []
    file_max = limits.get("file_max")
    need_files = target + workers * config.fd_reserve
    if file_max is not None and file_max < need_files:
        out.append(
            f"fs.file-max={file_max} is below the {need_files:,} file handles the target needs "
            f"(sysctl -w fs.file-max={max(need_files * 2, 2_097_152)})"
        )
    conntrack = None if config.port_untracked else limits.get("conntrack_max")
    if conntrack is not None and conntrack < target:
        out.append(
            f"net.netfilter.nf_conntrack_max={conntrack} is below the target of {target:,} "
            f"tracked connections (sysctl -w net.netfilter.nf_conntrack_max={target * 2})"
        )
    ports = limits.get("port_range")
    if ports and len(ports) == 2:
        span = ports[1] - ports[0] + 1
        if span < target:
            need = math.ceil(target / span)
            out.append(
                f"net.ipv4.ip_local_port_range={ports[0]}-{ports[1]} gives {span:,} ports per "
                f"source address; clients need {need} source addresses for {target:,} connections "
                f"to one port (or sysctl -w net.ipv4.ip_local_port_range='1024 65535')"
            )
    tcp_mem = limits.get("tcp_mem")
    if tcp_mem and len(tcp_mem) == 3 and tcp_mem[2] < target:
        # A connection that ever queues data holds at least one page; below one page per
        # connection a broadcast to all of them pushes TCP into memory pressure.
        out.append(
            f"net.ipv4.tcp_mem max={tcp_mem[2]} pages is below one page per connection for "
            f"{target:,} connections "
            f"(sysctl -w net.ipv4.tcp_mem='{target} {target * 2} {target * 3}')"
        )
    somaxconn = limits.get("somaxconn")
    if somaxconn is not None and somaxconn < min(config.backlog, 65535):
        out.append(
            f"net.core.somaxconn={somaxconn} caps the listen backlog of {config.backlog}; "
            f"connection bursts may be refused (sysctl -w net.core.somaxconn=65535)"
        )
    return out
