"""What a bench run records as it goes: a timeline row a second, the service's frames (for the
loop lag), and one row a broadcast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
