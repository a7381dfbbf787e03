"""Who may drive an agent, and where it may be aimed.

An agent opens as many connections as it is told to whatever it is told to: left open, it is a
flood cannon for anyone who reaches its port, or for any web page a browser on the lab network
opens (``<img src="http://agent:8889/set?host=victim&n=100000">``). So every request passes
:meth:`Guard.check_request` (token, cross-site) and every new configuration
:meth:`Guard.check_config` (allow-listed target, an ``n`` the host can hold) before it is applied.
No socket in here: bytes and strings in, a :class:`Refusal` or None out.
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from loadgen.engine.config import EngineConfig
from loadgen.engine.sources import nofile_capacity

TOKEN_ENV = "COMET_LOADGEN_TOKEN"

# What one held connection costs this host, measured at a million (docs/benchmarks.md): the
# engine's Python objects (~1.6 KB) and the kernel's socket (~4.3 KB, one end of a pair), plus an
# engine process's own ~55 MB spread over the connections it holds.
BYTES_PER_CONN = 6_000
BYTES_PER_PROC = 55 * 2**20
# Memory the agent leaves to everything else on the host.
MEM_RESERVE = 1 * 2**30

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the agent refuses: the HTTP status and a one-line reason."""

    status: int
    error: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class TargetRule:
    """One ``--allow-target``: a network (an address is a /32 or /128) or a host name, and
    optionally one port."""

    network: Network | None
    name: str | None
    port: int | None

    @classmethod
    def parse(cls, spec: str) -> TargetRule:
        """``host``, ``host:port``, ``CIDR``, ``CIDR:port``, ``[v6]:port``; ValueError if bad."""
        text = spec.strip()
        port: int | None = None
        if text.startswith("["):
            inner, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"--allow-target {spec!r}: expected [address]:port")
                port = _port(spec, rest[1:])
            text = inner
        elif text.count(":") == 1:
            text, raw_port = text.split(":")
            port = _port(spec, raw_port)
        if not text:
            raise ValueError(f"--allow-target {spec!r}: no host or network")
        try:
            return cls(ipaddress.ip_network(text, strict=False), None, port)
        except ValueError:
            pass
        if "/" in text or not _is_hostname(text):
            raise ValueError(f"--allow-target {spec!r}: not an address, network or host name")
        return cls(None, text.lower().rstrip("."), port)

    def __str__(self) -> str:
        where = str(self.network) if self.network is not None else str(self.name)
        return where if self.port is None else f"{where}:{self.port}"


def _port(spec: str, raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"--allow-target {spec!r}: bad port {raw!r}")
    return int(raw)


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label[0] != "-"
        for label in labels
    )


LOOPBACK_RULES = (
    TargetRule(ipaddress.ip_network("127.0.0.0/8"), None, None),
    TargetRule(ipaddress.ip_network("::1/128"), None, None),
)


def resolve(host: str) -> list[Address]:
    """Every address ``host`` resolves to (OSError when it does not)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted(
        {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}, key=str
    )


def is_loopback_bind(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None, env: dict[str, str]) -> str | None:
    """The token from ``--token-file`` (whitespace stripped), else the environment, else None."""
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"--token-file {token_file}: {exc.strerror or exc}") from None
        if not text:
            raise ValueError(f"--token-file {token_file}: the file is empty")
        return text
    value = env.get(TOKEN_ENV, "").strip()
    return value or None


def host_capacity(
    procs: int | None, capacity: int, mem_available: int, held: int = 0
) -> tuple[int, str]:
    """The most connections this host can hold, and what sets that number (for the 400).

    ``procs`` is the fixed engine-process count (None: as many as needed, each holding
    ``capacity``); ``mem_available`` the host's MemAvailable in bytes, which the ``held``
    connections the agent has open already left out: they count on top of it."""
    per_conn = BYTES_PER_CONN + BYTES_PER_PROC / capacity
    by_memory = held + max(0, math.floor((mem_available - MEM_RESERVE) / per_conn))
    why = (
        f"MemAvailable {mem_available / 2**30:.1f} GiB less a 1 GiB reserve, at "
        f"~{per_conn / 1000:.1f} KB a connection"
    ) + (f", plus the {held:,} held" if held else "")
    if procs is not None:
        by_fds = procs * capacity
        if by_fds < by_memory:
            return by_fds, f"{procs} engine processes × {capacity:,} file descriptors each"
    return by_memory, why


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Guard:
    """The agent's policy: the token, the allowed targets and the connection ceiling."""

    token: str | None = None
    rules: tuple[TargetRule, ...] = LOOPBACK_RULES
    procs: int | None = None  # fixed engine processes, or None for auto
    capacity: int = field(default_factory=nofile_capacity)
    max_n: int | None = None  # an explicit ceiling (--max-n), below the host's
    # What the host-name rules resolved to when the agent started.
    named: dict[str, frozenset[Address]] = field(default_factory=dict)

    def resolve_names(self) -> None:
        """Resolve every host-name rule now (a name that does not resolve still matches by name)."""
        for rule in self.rules:
            if rule.name is not None:
                try:
                    self.named[rule.name] = frozenset(resolve(rule.name))
                except OSError:
                    self.named[rule.name] = frozenset()

    # ---- every request ------------------------------------------------------------------------
    def check_request(self, headers: dict[str, str], query_token: str | None) -> Refusal | None:
        """Cross-site browsers first (a page must not learn even that a token is needed), then
        the token, in the header or the query string (classic fleet scripts put it in the URL)."""
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return Refusal(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = headers.get("origin")
        if origin is not None and not _same_origin(origin, headers.get("host", "")):
            return Refusal(403, f"cross-origin request refused (Origin: {origin[:100]})")
        if self.token is None:
            return None
        offered = query_token
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, credentials = auth.partition(" ")
            if scheme.lower() == "bearer":
                offered = credentials.strip()
        if offered is None:
            return Refusal(401, "missing token: send Authorization: Bearer <token> or ?token=")
        if not secrets.compare_digest(offered.encode(), self.token.encode()):
            return Refusal(401, "wrong token")
        return None

    # ---- every new configuration --------------------------------------------------------------
    def check_config(
        self, config: EngineConfig, addresses: list[Address], held: int = 0
    ) -> Refusal | None:
        """``addresses``: what ``config.host`` resolves to (empty: it did not resolve);
        ``held``: the connections the agent has open now (their memory is in use already)."""
        if not addresses:
            return Refusal(400, f"host: {config.host!r} does not resolve", "host")
        for addr in addresses:
            if not self.allows(config.host, addr, config.port):
                allowed = ", ".join(str(r) for r in self.rules)
                return Refusal(
                    403,
                    f"host: target {config.host}:{config.port} ({addr}) is not allowed; "
                    f"allowed: {allowed} (add --allow-target to the agent)",
                    "host",
                )
        cap, why = host_capacity(self.procs, self.capacity, mem_available(), held)
        if self.max_n is not None and self.max_n < cap:
            cap, why = self.max_n, "--max-n"
        if config.n > cap:
            return Refusal(
                400, f"n: {config.n:,} is over what this agent can hold: {cap:,} ({why})", "n"
            )
        return None

    def allows(self, host: str, addr: Address, port: int) -> bool:
        for rule in self.rules:
            if rule.port is not None and rule.port != port:
                continue
            if rule.network is not None and addr in rule.network:
                return True
            if rule.name is not None and (
                rule.name == host.lower().rstrip(".") or addr in self.named.get(rule.name, ())
            ):
                return True
        return False


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin: scheme://host[:port]`` names this very agent (the Host it was sent to)."""
    _scheme, sep, rest = origin.partition("://")
    return bool(sep) and bool(host) and rest.lower() == host.lower()
