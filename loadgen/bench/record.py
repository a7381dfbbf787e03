"""What a bench run records as it goes: a timeline row a second, the service's frames (for the
loop lag), and one row a broadcast."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass
class Record:
    timeline: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    worst_lag_ms: float | None = None
    broadcasts: list[dict[str, Any]] = field(default_factory=list)

    def add_frame(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        lag = ((frame.get("totals") or {}).get("lag_ms") or {}).get("max")
        if isinstance(lag, (int, float)):
            self.worst_lag_ms = max(self.worst_lag_ms or 0.0, float(lag))

    def lag_in(self, since: float, until: float) -> dict[str, float | None]:
        """The worst worker's loop lag (p90 / p99 / max) over the frames covering
        [since, until]."""
        out: dict[str, float | None] = {}
        # A frame at time t reports the second before it.
        frames = [f for f in self.frames if since < float(f.get("t", 0)) <= until + 1.0]
        for k in ("p90", "p99", "max"):
            vals = [((f.get("totals") or {}).get("lag_ms") or {}).get(k) for f in frames]
            nums = [float(v) for v in vals if isinstance(v, (int, float))]
            out[k] = max(nums) if nums else None
        return out


def hold_cpu(record: Record, hold_t0: float, host0: Any, client_cpu_s: float) -> dict[str, Any]:
    """CPU while idle-holding (pings only), % of one core: the service's from its frames (its
    own psutil readings per worker), the load generator's from ``client_cpu_s`` (its CPU seconds
    since ``hold_t0``) and the host's from ``psutil.cpu_times()`` then (``host0``) and now."""
    dt = max(0.001, time.time() - hold_t0)
    host1 = psutil.cpu_times()
    busy = sum(host1) - sum(host0) - (host1.idle - host0.idle)
    busy -= getattr(host1, "iowait", 0.0) - getattr(host0, "iowait", 0.0)
    frames = [f for f in record.frames if float(f.get("t", 0)) > hold_t0 + 1.0]
    svc_cpu = [float((f.get("totals") or {}).get("cpu_percent", 0.0)) for f in frames]
    return {
        "seconds": round(dt, 1),
        "service_pct_of_core": round(sum(svc_cpu) / len(svc_cpu), 1) if svc_cpu else None,
        "load_generator_pct_of_core": round(100 * client_cpu_s / dt, 1),
        "host_busy_pct_of_core": round(100 * busy / dt, 1),
        "cores": os.cpu_count(),
        "service_lag": record.lag_in(hold_t0, time.time() - 1.0),
    }
