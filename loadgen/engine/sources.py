"""Source addresses to connect from, and how many sockets one process may hold."""

from __future__ import annotations

import ipaddress
import math
import resource
import socket
from dataclasses import dataclass

# File descriptors a client process keeps for itself (pipes, the loop, /proc reads).
FD_RESERVE = 200


@dataclass(frozen=True)
class Namespace:
    """A network namespace engines run in (``comet-bench --netns``) and the source addresses
    they connect from there."""

    name: str
    addresses: tuple[str, ...]

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def parse_source_ips(spec: str | None, host: str = "127.0.0.1") -> list[str]:
    """``a,b,c`` or ``first-last`` (IPv4 range) or ``auto`` / ``none``.

    ``auto`` is 127.0.0.2-127.0.0.41 when the target is loopback, else no binding (kernel's choice).
    Raises ValueError with a clear message on bad input.
    """
    if spec is None or spec == "auto":
        try:
            loop_target = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            loop_target = False
        return [f"127.0.0.{i}" for i in range(2, 42)] if loop_target else []
    if spec in ("", "none"):
        return []
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a_s, b_s = part.split("-", 1)
            try:
                a, b = ipaddress.IPv4Address(a_s.strip()), ipaddress.IPv4Address(b_s.strip())
            except ValueError as exc:
                raise ValueError(f"source-ips: bad range {part!r}: {exc}") from None
            if int(b) < int(a) or int(b) - int(a) > 65535:
                raise ValueError(f"source-ips: bad range {part!r} (empty or over 65536 addresses)")
            out.extend(str(ipaddress.IPv4Address(i)) for i in range(int(a), int(b) + 1))
        else:
            try:
                out.append(str(ipaddress.ip_address(part)))
            except ValueError as exc:
                raise ValueError(f"source-ips: {exc}") from None
    return out


def nofile_capacity() -> int:
    """Connections one client process can hold: raised soft RLIMIT_NOFILE minus a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(1, int(limit) - FD_RESERVE)


def auto_procs(n: int, capacity: int | None = None) -> int:
    cap = capacity if capacity is not None else nofile_capacity()
    return max(1, math.ceil(n / cap))
