"""Before any worker starts: is the subscriber port ours to take?

Workers bind with SO_REUSEPORT, so a second comet-service (or any program of the same user that
sets it) would silently share the port and take a share of new connections that this instance's
admin never sees; a program without it makes every worker's bind fail. Either way the supervisor
says so in one line and exits instead of restarting workers forever.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class PortError(RuntimeError):
    """The port cannot be (or should not be) listened on; the message says why and what to do."""


def _proc_listeners(port: int) -> list[str]:
    """Local addresses of every listening TCP socket on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(name) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _LISTEN:
                continue
            addr_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port or len(addr_hex) != width:
                continue
            raw = bytes.fromhex(addr_hex)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(str(ipaddress.ip_address(words)))
    return found


def _overlaps(ours: str, theirs: str) -> bool:
    """Whether a listener on ``theirs`` takes connections meant for ``ours`` (same port)."""
    try:
        a, b = ipaddress.ip_address(ours), ipaddress.ip_address(theirs)
    except ValueError:
        return True
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    if a.is_unspecified or b.is_unspecified:
        return True
    return a == b


def ss_listeners(port: int, timeout: float = 10.0) -> list[tuple[int, str]] | None:
    """(pid, process name) of every TCP listener on ``port``, from ``ss`` (which filters in the
    kernel: fast even with a million sockets); None when ``ss`` cannot tell."""
    try:
        out = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{port}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({(int(pid), name) for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', out)})


def _owners(port: int) -> str:
    """``pid 123 (python3)`` for the listeners on ``port``, when ``ss`` can tell."""
    return ", ".join(f"pid {pid} ({name})" for pid, name in ss_listeners(port, 5.0) or [])


def check_port(host: str, port: int, allow_shared: bool) -> None:
    """Raise :class:`PortError` unless this service can have ``host:port`` to itself."""
    if port == 0:
        return
    foreign = [addr for addr in _proc_listeners(port) if _overlaps(host, addr)]
    if foreign and not allow_shared:
        who = _owners(port) or "another process"
        raise PortError(
            f"port {port} is already in use by {who} (listening on {', '.join(foreign)}); stop "
            f"it, pick another --port, or pass --allow-shared-port to share it on purpose"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise PortError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        probe.close()
