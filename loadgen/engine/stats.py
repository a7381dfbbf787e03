"""An engine's counters and latency histogram, merged across processes and fleets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from loadgen.engine.config import EngineConfig

# Latency histogram: bucket i covers [BASE**i, BASE**(i+1)) microseconds, ~2 % resolution.
_LAT_BASE = 1.02
_LAT_LOG = math.log(_LAT_BASE)

# Per-seq delivery records kept (oldest dropped), so a long run cannot grow them without bound.
MAX_SEQS = 10_000


@dataclass
class Stats:
    """Counters of one engine; :meth:`merge` adds another's (for process pools and fleets)."""

    clients: int = 0
    inproc: int = 0
    errors_req: int = 0
    errors_resp: int = 0
    ended_req: int = 0
    msgs_total: int = 0
    bytes_total: int = 0
    timed_total: int = 0
    timed_invalid: int = 0  # timed lines whose ts was before the run or in the future
    lat_max_ms: float = 0.0
    lat_hist: dict[int, int] = field(default_factory=dict)
    last_delivery: dict[int, float] = field(default_factory=dict)
    first_delivery: dict[int, float] = field(default_factory=dict)
    deliveries: dict[int, int] = field(default_factory=dict)

    def merge(self, other: Stats) -> None:
        for name in (
            "clients",
            "inproc",
            "errors_req",
            "errors_resp",
            "ended_req",
            "msgs_total",
            "bytes_total",
            "timed_total",
            "timed_invalid",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lat_max_ms = max(self.lat_max_ms, other.lat_max_ms)
        for b, c in other.lat_hist.items():
            self.lat_hist[b] = self.lat_hist.get(b, 0) + c
        for s, t in other.last_delivery.items():
            if t > self.last_delivery.get(s, 0.0):
                self.last_delivery[s] = t
        for s, t in other.first_delivery.items():
            if t < self.first_delivery.get(s, math.inf):
                self.first_delivery[s] = t
        for s, c in other.deliveries.items():
            self.deliveries[s] = self.deliveries.get(s, 0) + c

    def clear_latency(self) -> None:
        """Forget every latency sample and delivery record (a new run starts)."""
        self.timed_total = self.timed_invalid = 0
        self.lat_max_ms = 0.0
        for record in (self.lat_hist, self.last_delivery, self.first_delivery, self.deliveries):
            record.clear()

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) of delivery latency in ms (upper bucket edge), or None."""
        total = sum(self.lat_hist.values())
        if total == 0:
            return None
        rank = max(1, math.ceil(total * q / 100.0))
        seen = 0
        for b in sorted(self.lat_hist):
            seen += self.lat_hist[b]
            if seen >= rank:
                return min(self.lat_max_ms, _LAT_BASE ** (b + 1) / 1000.0)
        return self.lat_max_ms

    def latency_summary(self) -> dict[str, float | int | None]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "p50": r(self.percentile(50)),
            "p90": r(self.percentile(90)),
            "p99": r(self.percentile(99)),
            "max": r(self.lat_max_ms) if self.timed_total else None,
            "count": self.timed_total,
            "invalid": self.timed_invalid,
        }

    def to_wire(self) -> dict[str, Any]:
        """JSON-safe form (int keys become strings) used between processes."""
        d = asdict(self)
        d["lat_hist"] = {str(k): v for k, v in self.lat_hist.items()}
        d["last_delivery"] = {str(k): v for k, v in self.last_delivery.items()}
        d["first_delivery"] = {str(k): v for k, v in self.first_delivery.items()}
        d["deliveries"] = {str(k): v for k, v in self.deliveries.items()}
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Stats:
        s = cls(
            **{
                k: v
                for k, v in d.items()
                if k not in ("lat_hist", "last_delivery", "first_delivery", "deliveries")
            }
        )
        s.lat_hist = {int(k): int(v) for k, v in d.get("lat_hist", {}).items()}
        s.last_delivery = {int(k): float(v) for k, v in d.get("last_delivery", {}).items()}
        s.first_delivery = {int(k): float(v) for k, v in d.get("first_delivery", {}).items()}
        s.deliveries = {int(k): int(v) for k, v in d.get("deliveries", {}).items()}
        return s

    def public(self, config: EngineConfig, procs: int, restarts: int = 0) -> dict[str, Any]:
        """The agent's ``GET /`` document (docs/architecture.md "Load generator agent")."""
        return {
            "clients": self.clients,
            "inproc": self.inproc,
            "errors_req": self.errors_req,
            "errors_resp": self.errors_resp,
            "ended_req": self.ended_req,
            "msgs_total": self.msgs_total,
            "bytes_total": self.bytes_total,
            "latency_ms": self.latency_summary(),
            "last_delivery": {str(k): v for k, v in sorted(self.last_delivery.items())},
            "deliveries": {str(k): v for k, v in sorted(self.deliveries.items())},
            "procs": procs,
            "engine_restarts": restarts,
            "config": asdict(config),
        }
