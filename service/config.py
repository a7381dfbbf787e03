"""One typed configuration for the supervisor and its workers.

Every option comes from a CLI flag or a ``COMET_<NAME>`` environment variable (flag wins), with the
default shown by ``--help``. Workers receive the supervisor's resolved config as JSON, so both sides
always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar

from service.contracts import ENV_TOKEN_SECRET, MESSAGE_MAX_BYTES

ScreenMode = Literal["auto", "on", "off"]

# Sockets a worker keeps for itself (listener, control pipe, logs, /proc reads, ...) on top of the
# connections it holds. The capacity formula (worker_count) subtracts this from RLIMIT_NOFILE.
DEFAULT_FD_RESERVE = 500
# SO_REUSEPORT hands each connection to a worker by a hash of its addresses, not evenly: with
# workers sized to exactly target / cap the fullest reach their cap (and answer 503) before the
# target is held. ``--workers auto`` plans for this much more than the target.
REUSEPORT_HEADROOM = 1.05


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE of this process (what a worker can actually hold)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return nofile_limit()


T = TypeVar("T")


def opt(default: T, help: str) -> T:
    """A Config field: its default and the --help text of its flag (and COMET_ variable)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # Listener
    host: str = opt("0.0.0.0", "address to listen on")
    port: int = opt(8888, "subscriber port (shared by all workers with SO_REUSEPORT)")
    backlog: int = opt(65535, "listen backlog (the kernel caps it at net.core.somaxconn)")
    defer_accept: int = opt(
        1,
        (
            "seconds the kernel keeps a new connection until its first bytes arrive before "
            "waking a worker for it (TCP_DEFER_ACCEPT): every subscriber speaks first, so a "
            "worker wakes once per connection with the request already there; a silent one "
            "reaches the worker after about this long (0 = off)"
        ),
    )
    allow_shared_port: bool = opt(
        False,
        (
            "start even when another process already listens on --port (SO_REUSEPORT then "
            "splits new connections between them); off: refuse with the listener's pid"
        ),
    )

    # Process model
    workers: str = opt(
        "auto",
        "worker processes: 'auto' = max(cpus, ceil(target × 1.05 / (nofile - reserve))), or N",
    )
    target_connections: int = opt(
        1_000_000,
        "connections the host should hold; sizes --workers auto",
    )
    fd_reserve: int = opt(
        DEFAULT_FD_RESERVE,
        "file descriptors per worker kept back from RLIMIT_NOFILE for non-client use",
    )
    accept_rate: int = opt(
        0,
        (
            "new connections one worker takes a second; past it they get 503 with a jittered "
            "Retry-After, so a reconnect storm converges at a pace the loop keeps up with "
            "(0 = no limit)"
        ),
    )
    plane: str = opt(
        "uvloop",
        (
            "how plain connections are held: uvloop (uvloop's transports) or raw (bare sockets "
            "in one epoll per worker: ~1 KB less memory per held connection and a cheaper "
            "accept, about the same CPU per write; plain HTTP only, not with --tls-cert)"
        ),
    )
    limit_connections: int = opt(
        0,
        "connections per worker before 503 (0 = RLIMIT_NOFILE - fd reserve)",
    )

    # Streams
    ping_interval: float = opt(20.0, "seconds between pings on every stream")
    ping_slice: int = opt(
        500,
        (
            "connections pinged at a time; a sweep's slices are spread evenly over the first "
            "quarter of the ping interval"
        ),
    )
    fanout_slice: int = opt(500, "connections written per event-loop iteration during a broadcast")
    fanout_slice_ms: float = opt(
        2.0,
        (
            "longest a broadcast or a ping slice writes before the event loop runs again (ms), "
            "whichever of this and --fanout-slice (--ping-slice) comes first: a write costs "
            "5-40 us depending on the CPU"
        ),
    )
    limit_write_buffer: int = opt(
        256 * 1024,
        "unsent bytes after which a slow subscriber is dropped",
    )
    sse_retry_ms: int = opt(
        3000,
        "SSE reconnect delay (retry:) in milliseconds; each stream gets one in [N, 2N)",
    )
    history_size: int = opt(1000, "messages kept per channel for SSE resume and long-poll")
    history_max_age: float = opt(300.0, "seconds a message stays in the history ring")
    limit_message_bytes: int = opt(
        MESSAGE_MAX_BYTES, "largest broadcast payload accepted, in UTF-8 bytes"
    )

    # Request limits
    timeout_header: float = opt(10.0, "absolute deadline in seconds for the request head (408)")
    limit_request_line: int = opt(8192, "longest request line in bytes (414)")
    limit_headers_bytes: int = opt(16384, "largest total header size in bytes (431)")
    limit_headers_count: int = opt(100, "most header fields (431)")
    timeout_poll_default: float = opt(30.0, "long-poll wait when ?timeout= is absent")
    timeout_poll_max: float = opt(120.0, "longest long-poll wait a client may ask for")
    timeout_keepalive: float = opt(
        15.0,
        "seconds an idle keep-alive connection is kept between long-polls",
    )

    # Supervisor
    control_socket: str = opt(
        "/run/comet/control.sock",
        "Unix control socket for the admin sidecar (mode 0660)",
    )
    log_dir: str = opt("logs", "directory of the per-second CSV log")
    state_dir: str = opt(
        "",
        "directory of the durable message history (SQLite, WAL); empty = <log-dir>/state",
    )
    log_max_bytes: int = opt(50 * 1024 * 1024, "CSV log size before rotation")
    log_backups: int = opt(5, "rotated CSV logs kept")
    grace: float = opt(30.0, "seconds to drain on SIGTERM/SIGINT before exiting")
    screen: ScreenMode = opt(
        "auto",
        "live top-like screen: auto (when stdout is a terminal), on, off",
    )
    log_level: str = opt("info", "logging level: debug, info, warning, error")
    take_over: bool = opt(
        False,
        (
            "start by taking over the port, every live connection and the control socket of "
            "the service answering at --control-socket (an upgrade to a new container on the "
            "same run volume); that service exits 0 once empty. With none answering, start as "
            "usual"
        ),
    )

    # Scale-out
    bus: str = opt("local", "broadcast bus: 'local' or a redis:// URL for multi-node")
    node_id: str = field(
        default_factory=lambda: os.uname().nodename,
        metadata={"help": "this node's name in a multi-node cluster"},
    )
    node_ttl: float = opt(5.0, "seconds a node's published frame lives in the cluster view")

    # Supervisor fan-out
    fanout_parallel: int = opt(
        0,
        "workers writing one broadcast at the same time (0 = one per CPU core)",
    )
    handoff_parallel: int = opt(
        0,
        (
            "workers handing their connections over at the same time in a reload or a "
            "takeover (0 = as --fanout-parallel)"
        ),
    )
    # The port skips connection tracking (raw NOTRACK, host_tuning_notrack_ports): set by the
    # comet role, since the service (non-root in its container) cannot read the host's rules.
    port_untracked: bool = opt(
        False,
        (
            "the port is exempt from connection tracking (a raw-table NOTRACK rule, as the "
            "host_tuning role sets): no nf_conntrack_max warning"
        ),
    )

    # Who may listen (service/auth.py) and over what
    cors_origins: str = opt(
        "*",
        (
            "origins whose pages may subscribe: '*' (any, without credentials), a "
            "comma-separated list (those only, with credentials), or '' (no CORS headers)"
        ),
    )
    private_channels: str = opt(
        "",
        (
            "comma-separated glob patterns (e.g. 'private-*') of channels that need a subscriber "
            "token (JWT, ?token= or Authorization: Bearer)"
        ),
    )
    require_token: bool = opt(False, "every channel needs a subscriber token")
    token_secret_file: str = opt(
        "",
        (
            "file with the HS256 secret tokens are signed with (or COMET_TOKEN_SECRET in the "
            "environment; never the secret itself as a flag)"
        ),
    )
    token_public_key_file: str = opt("", "PEM public key for RS256 / ES256 subscriber tokens")
    tls_cert: str = opt("", "PEM certificate (chain) file: serve HTTPS on --port (needs --tls-key)")
    tls_key: str = opt("", "PEM private key file of --tls-cert")
    tls_offload: bool = opt(
        True,
        (
            "after a TLS 1.3 handshake, seal and open the records in the worker with the "
            "session's keys and free OpenSSL's state (~2 KB an idle connection instead of ~26 KB; "
            "TLS 1.2 stays with OpenSSL); off: OpenSSL keeps every connection"
        ),
    )

    # ---- derived values ----------------------------------------------------------------------
    def fd_room(self, nofile: int | None = None) -> int:
        """Connections one worker's descriptors can hold: RLIMIT_NOFILE less --fd-reserve."""
        limit = nofile if nofile is not None else nofile_limit()
        return max(1, limit - self.fd_reserve)

    def connection_cap(self, nofile: int | None = None) -> int:
        """Connections one worker accepts before answering 503."""
        if self.limit_connections > 0:
            return self.limit_connections
        return self.fd_room(nofile)

    def worker_count(self, nofile: int | None = None, cpus: int | None = None) -> int:
        """max(cpu_count, ceil(target × 1.05 / (nofile - reserve))) for ``auto``
        (docs/architecture.md): SO_REUSEPORT spreads by a hash, not evenly, so the fullest
        workers need the headroom (at exactly target / cap, 1,000,000 on 52 workers of 19,500
        filled the fullest to its cap, past which it answers 503)."""
        if self.workers != "auto":
            return int(self.workers)
        ncpu = cpus if cpus is not None else (os.cpu_count() or 1)
        per_worker = self.fd_room(nofile)
        return max(ncpu, math.ceil(self.target_connections * REUSEPORT_HEADROOM / per_worker))

    def state_path(self) -> str:
        return self.state_dir or os.path.join(self.log_dir, "state")

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.workers != "auto":
            try:
                n = int(self.workers)
            except ValueError:
                raise ValueError(
                    f"workers: expected 'auto' or a positive integer, got {self.workers!r}"
                ) from None
            if n < 1:
                raise ValueError(f"workers: must be at least 1, got {n}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        if self.plane not in ("uvloop", "raw"):
            raise ValueError(f"plane: expected uvloop|raw, got {self.plane!r}")
        if self.plane == "raw" and self.tls_cert:
            raise ValueError("plane: raw holds plain HTTP only; with --tls-cert use uvloop")
        if not 0 <= self.defer_accept <= 3600:
            raise ValueError(f"defer_accept: must be 0..3600 seconds, got {self.defer_accept}")
        positive = (
            "ping_interval",
            "ping_slice",
            "fanout_slice",
            "fanout_slice_ms",
            "limit_write_buffer",
            "history_size",
            "timeout_header",
            "limit_request_line",
            "limit_headers_bytes",
            "limit_headers_count",
            "grace",
            "backlog",
            "target_connections",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("fanout_parallel", "handoff_parallel"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name}: must be 0 (automatic) or more, got {getattr(self, name)}"
                )
        if self.screen not in ("auto", "on", "off"):
            raise ValueError(f"screen: expected auto|on|off, got {self.screen!r}")
        if self.bus != "local" and not self.bus.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"bus: expected 'local' or a redis:// URL, got {self.bus!r}")
        self.validate_access()

    def validate_access(self, environ: Any = None) -> None:
        """Check the token keys and the TLS files now, so a bad path is one line at start-up
        and not a worker restart loop."""
        from service.worker import auth, tls

        keys = auth.load_keys(self.token_secret_file, self.token_public_key_file, environ)
        if (self.private_channels.strip() or self.require_token) and (
            not keys.secrets and keys.public_key is None
        ):
            raise ValueError(
                "private-channels / require-token: no key to check tokens with (set "
                f"--token-secret-file, {ENV_TOKEN_SECRET} or --token-public-key-file)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls-cert and tls-key: give both or neither")
        if self.tls_cert:
            tls.server_context(self.tls_cert, self.tls_key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))


class Parser(argparse.ArgumentParser):
    """argparse that states a bad flag in one line (and where --help is), not under a usage block
    of every option."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {'/'.join(_TRUE + _FALSE)}, got {raw!r}")


def _kind(default: Any) -> Any:
    return parse_bool if isinstance(default, bool) else type(default)


def build_parser(prog: str = "comet-service") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description=(
            "comet1m Comet service: a supervisor and uvloop workers holding HTTP streaming "
            "connections on one port. Every option can also be set as COMET_<OPTION> in the "
            "environment (e.g. COMET_PING_INTERVAL=5, COMET_ALLOW_SHARED_PORT=1); a flag wins "
            "over the environment."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, type=_kind(default), default=default, help=help_text
            )
    return parser


def env_defaults(environ: dict[str, str]) -> dict[str, Any]:
    """The ``COMET_<NAME>`` values in ``environ``, parsed as their field's type; ValueError names
    the variable."""
    defaults = Config()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        env = "COMET_" + f.name.upper()
        if env not in environ:
            continue
        raw = environ[env]
        kind = _kind(getattr(defaults, f.name))
        what = "bool" if kind is parse_bool else getattr(kind, "__name__", "value")
        try:
            values[f.name] = kind(raw)
        except ValueError:
            raise ValueError(f"{env}={raw!r}: not a valid {what}") from None
    return values


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """CLI flags over COMET_* environment over defaults; exits with a clear message on bad input."""
    parser = build_parser()
    try:
        parser.set_defaults(**env_defaults(dict(os.environ if environ is None else environ)))
    except ValueError as exc:
        parser.error(str(exc))
    ns = parser.parse_args(argv)
    config = Config(**vars(ns))
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return config
