"""Rules every part of comet1m shares (service, admin sidecar, load generator), stated once.

A leaf module: it imports nothing of the project, so the sidecar and the supervisor can import it
without loading the worker's hot path.
"""

from __future__ import annotations

import re
from typing import Any, TypedDict

# Channel names (docs/architecture.md, subscriber contract). Event names share the rule because
# they end up on an SSE ``event:`` line, where a newline would forge a second field. Match with
# NAME_RE.fullmatch: Python's ``$`` also matches before a trailing newline.
NAME_RULE = "[A-Za-z0-9_.:-]{1,64}"
NAME_RE = re.compile(NAME_RULE)
NAME_PATTERN = f"^{NAME_RULE}$"  # for pydantic (Rust regex: ``$`` is the end of the text)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as UTF-8, or None.

    JSON can carry a lone surrogate (``"\\ud800"``) and Python decodes it into a ``str`` that
    ``encode()`` then refuses: every side that takes message text from JSON checks it here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"unpaired surrogate at character {exc.start}: not valid Unicode text"
    return None


# A worker's exit status when it cannot listen on the service port (EX_CONFIG): the supervisor
# stops instead of restarting it, since another try cannot succeed.
EXIT_CANNOT_LISTEN = 78
# A worker's exit status when its TLS or token files cannot be loaded (EX_NOINPUT): they changed
# since the supervisor checked them. Its slot retries with the usual backoff (the files may be
# put right); the worker's log line names the file.
EXIT_BAD_FILES = 66


class Msg(TypedDict):
    """MSG of docs/architecture.md, the unit a worker writes to its subscribers."""

    id: int
    channel: str | None
    event: str | None
    data: str
    ts: float


class Counts(TypedDict):
    """The counters every worker keeps (``WSTATS``) and the frame's ``totals`` add up: the
    worker's ``Counters`` has exactly these slots; the frame, the cluster view, the CSV log and
    the sidecar's /metrics read them by these names. ``conns`` is a level, the ``_total`` ones
    only grow."""

    conns: int
    accepted_total: int
    closed_total: int
    rejected_total: int
    slow_dropped_total: int
    msgs_sent_total: int
    bytes_sent_total: int
    token_missing_total: int  # 401: a private channel asked for without a token
    token_invalid_total: int  # 403: bad signature, algorithm or claims
    token_expired_total: int  # 403 at subscribe, or a stream ended at its token's exp
    token_forbidden_total: int  # 403: the token does not name the channel
    handed_total: int  # given to the successor process in a reload (not counted as closed)
    adopted_total: int  # taken over from the previous process in a reload (not as accepted)
    tls_offloaded_total: int  # TLS 1.3 handshakes done whose records this worker then seals
    tls_kept_total: int  # TLS handshakes done whose records OpenSSL keeps (TLS 1.2, offload off)
    tls_failed_total: int  # TLS handshakes refused, broken off or not done in time


COUNTER_NAMES: tuple[str, ...] = tuple(Counts.__annotations__)
TOTAL_NAMES = tuple(name for name in COUNTER_NAMES if name.endswith("_total"))

# One cap on a broadcast's ``data`` in UTF-8 bytes, the default of the service's
# ``--limit-message-bytes`` and of the sidecar's ``COMET_ADMIN_MAX_MESSAGE_BYTES``.
MESSAGE_MAX_BYTES = 64 * 1024

# The environment variable that carries the subscriber-token secret to the service and sidecar.
ENV_TOKEN_SECRET = "COMET_TOKEN_SECRET"


def secret_lines(text: bytes) -> list[bytes]:
    """The HS256 secrets of a token secret file or ``COMET_TOKEN_SECRET``, one per line: the
    first is the current one (tokens are signed with it: the sidecar's ``POST /api/tokens``, the
    application), the others are still accepted by the service while a rotation runs."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class ErrorCode:
    """The ``code`` of a refused control request (``{"ok": false, "code": ..., "error": ...}``):
    what the sidecar maps to an HTTP status, so no side matches error text."""

    BAD_REQUEST = "bad_request"  # the request itself is wrong: 400
    # The service's state forbids it now: a reload or handover under way, or TLS / token files
    # a new worker could not load (a reload): 409.
    CONFLICT = "conflict"
    BUS_UNAVAILABLE = "bus_unavailable"  # the shared bus (Redis) cannot take it now: 503
    STOPPING = "stopping"  # the service is shutting down: 503
    NOT_READY = "not_ready"  # just started, no stats frame yet: 503
    INTERNAL = "internal"  # a bug on our side: 500


class LagMs(TypedDict):
    """A worker's event-loop lag in ms over the last second (its sampler, service/worker/lag.py);
    in the frame's totals the worst worker's p90/p99/max and the mean of the averages."""

    avg: float
    p90: float
    p99: float
    max: float


# Upper bounds (ms) of the loop-lag histogram's buckets; one more bucket takes everything above
# the last. A histogram holds counts per bucket (not cumulative), trailing empty buckets left off.
# A window's percentile is read from the difference of two histograms: a p99 over a broadcast's
# 13 s is a p99 of its ~1,300 samples per worker, not the worst of 13 one-second p99s.
LAG_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000,
)  # fmt: skip


class WorkerStats(Counts):
    """WSTATS of docs/architecture.md: a worker's answer to ``stats``: its counters and these."""

    pid: int
    index: int
    lag_ms: LagMs
    lag_hist: list[int]  # every sample since the worker started, by LAG_BOUNDS_MS


class WorkerRow(TypedDict):
    """One worker in the frame's ``workers`` list."""

    pid: int | None
    index: int
    state: str  # "starting", "up", "down", "draining"
    restarts: int
    conns: int
    rss_bytes: int
    cpu_percent: float
    lag_ms: LagMs
    lag_hist: list[int]  # this slot's samples since the service started (every process in it)
    msgs_sent_total: int


class _FrameRequired(TypedDict):
    t: float
    step: int
    uptime_s: float
    target_connections: int
    node_id: str
    frame_ms: float
    supervisor: dict[str, Any]  # pid, cpu_percent
    totals: dict[str, Any]  # COUNTER_NAMES summed, rss_bytes, cpu_percent, lag_ms, lag_hist
    system: dict[str, Any]  # cpu, mem, sockstat, fds, limits
    workers: list[WorkerRow]


class Frame(_FrameRequired, total=False):
    """FRAME of docs/architecture.md: the supervisor's stats record, once a second."""

    bus: dict[str, Any]  # with a Redis bus
    store: dict[str, Any] | None  # the history store's state (None with a Redis bus)
    reload: dict[str, Any]  # the running or last reload: running, workers, done, handed, ...


# ---- a worker handing its connections to its successor (service/worker/handoff.py) ----------
# A successor whose giver has not come by then gives up waiting and listens by itself (the
# supervisor asks for a slot's handoff once its successor is ready and nothing is being written to
# the slot: a wave of a broadcast to a million writes to one for several seconds). Givers come a
# core's worth at a time, so a supervisor adds ROUND_WAIT for every round before the last one's
# (``adopt_wait``); and tells its workers when the handover has ended (``adopt_end``), so none waits
# out a giver that will not come.
GIVER_TIMEOUT = 120.0
ROUND_WAIT = 30.0


def hist_add(a: list[int], b: list[int]) -> list[int]:
    """Two lag histograms (counts by LAG_BOUNDS_MS, trailing buckets left off) added."""
    if len(a) < len(b):
        a, b = b, a
    out = list(a)
    for i, n in enumerate(b):
        out[i] += n
    return out


def hist_quantile(counts: list[int], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding the ``q`` quantile: the true value is at or
    below it. None for no samples; ``inf`` past the last bound."""
    total = sum(counts)
    if total <= 0:
        return None
    need = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= need:
            return float(LAG_BOUNDS_MS[i]) if i < len(LAG_BOUNDS_MS) else float("inf")
    return float("inf")


def adopt_wait(givers: int, parallel: int) -> float:
    """How long a successor waits for its giver when ``givers`` hand over ``parallel`` at a
    time: 54 workers two at a time on a saturated 2-core host took 5-15 s a round, and the last
    of 27 rounds came long after a flat 120 s."""
    rounds = -(-max(1, givers) // max(1, parallel))
    return GIVER_TIMEOUT + (rounds - 1) * ROUND_WAIT
