"""The per-second CSV log of docs/architecture.md, rotated by size.

Columns: the seed's (step … packets) then the extras. ``elapsed_ms`` is the wall time since the
previous row (≈1000 when the supervisor keeps up), ``packets`` the messages written to clients in
that second.
"""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any

from service.contracts import Frame

COLUMNS = (
    "step",
    "conns",
    "cpu_user",
    "cpu_sys",
    "cpu_idle",
    "proc_cpu_pct",
    "mem_used_mb",
    "mem_cached_mb",
    "rss_mb",
    "lag_avg_ms",
    "lag_p90_ms",
    "lag_max_ms",
    "elapsed_ms",
    "frame_ms",
    "packets",
    # extras
    "t",
    "accepted_total",
    "closed_total",
    "rejected_total",
    "msgs_sent_total",
    "bytes_sent_total",
    "workers",
    "tcp_inuse",
    "tcp_mem_pages",
    "accepts_per_s",
    "handed_total",
    "adopted_total",
)

MB = 1024 * 1024


def frame_row(frame: Frame, elapsed_ms: float, packets: int) -> list[Any]:
    """One CSV row for a FRAME."""
    totals = frame["totals"]
    system = frame["system"]
    cpu = system["cpu"]
    tcp = system["sockstat"].get("TCP", {})
    up = sum(1 for w in frame["workers"] if w.get("state") == "up")
    return [
        frame["step"],
        totals["conns"],
        cpu.get("user", 0.0),
        cpu.get("sys", 0.0),
        cpu.get("idle", 0.0),
        totals["cpu_percent"],
        round(system["mem"]["used"] / MB, 1),
        round(system["mem"]["cached"] / MB, 1),
        round(totals["rss_bytes"] / MB, 1),
        totals["lag_ms"]["avg"],
        totals["lag_ms"]["p90"],
        totals["lag_ms"]["max"],
        round(elapsed_ms, 1),
        frame["frame_ms"],
        packets,
        frame["t"],
        totals["accepted_total"],
        totals["closed_total"],
        totals["rejected_total"],
        totals["msgs_sent_total"],
        totals["bytes_sent_total"],
        up,
        tcp.get("inuse", 0),
        tcp.get("mem", 0),
        totals.get("accepts_per_s", 0),
        totals.get("handed_total", 0),
        totals.get("adopted_total", 0),
    ]


class CsvLog:
    """``<log_dir>/comet-<start>.csv``; at ``max_bytes`` it becomes ``.1`` (older ones shift)."""

    def __init__(self, log_dir: str, max_bytes: int, backups: int, start: float | None = None):
        os.makedirs(log_dir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(start or time.time()))
        self.path = os.path.join(log_dir, f"comet-{stamp}.csv")
        self.max_bytes = max_bytes
        self.backups = backups
        self._last_t: float | None = None
        self._last_msgs: int | None = None
        self._file = self._open()

    def _open(self) -> io.TextIOWrapper:
        f = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open
        if f.tell() == 0:
            csv.writer(f).writerow(COLUMNS)
            f.flush()
        return f

    def _rotate(self) -> None:
        self._file.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._file = self._open()

    def write(self, frame: Frame) -> None:
        t = float(frame["t"])
        msgs = int(frame["totals"]["msgs_sent_total"])
        elapsed_ms = (t - self._last_t) * 1000.0 if self._last_t is not None else 0.0
        packets = max(0, msgs - self._last_msgs) if self._last_msgs is not None else 0
        self._last_t, self._last_msgs = t, msgs
        csv.writer(self._file).writerow(frame_row(frame, elapsed_ms, packets))
        # One flush a second keeps `tail -f` and plots live without costing anything measurable.
        self._file.flush()
        if self._file.tell() >= self.max_bytes:
            self._rotate()

    def close(self) -> None:
        self._file.close()
