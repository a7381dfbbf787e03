"""What a bench run records as it goes: a timeline row a second, the service's frames (for the
loop lag), and one row a broadcast."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from service.contracts import hist_quantile


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

    def backlog(self, phase: str) -> dict[str, Any]:
        """What the box had not caught up with over the timeline rows of ``phase``: the
        kernel's TCP memory (``tcp_mem_pages``, every socket of the host in every namespace:
        data written and not yet acknowledged, or received and not yet read) at the first
        row, its highest and at the last row, and the longest time between two rows (a row
        waits for every engine's counts, so an engine that is behind stretches it)."""
        rows = [r for r in self.timeline if r.get("phase") == phase]
        pages = [r["tcp_mem_pages"] for r in rows if isinstance(r.get("tcp_mem_pages"), int)]
        times = [float(r["elapsed_s"]) for r in rows]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {
            "tcp_mem_pages_start": pages[0] if pages else None,
            "tcp_mem_pages_max": max(pages) if pages else None,
            "tcp_mem_pages_end": pages[-1] if pages else None,
            "longest_row_gap_s": round(max(gaps), 1) if gaps else None,
        }

    def lag_in(self, since: float, until: float) -> dict[str, float | None]:
        """Loop lag over [since, until], two ways.

        ``p90`` / ``p99`` / ``max``: the highest of the frames' one-second figures (each frame
        has the worst worker's p99 of that second; with 20-100 samples a second that is the
        second's worst sample or next to it) — a worst case over the window.
        ``p99_worker``: the worst worker's p99 over all its samples in the window, and
        ``p99_all``: the p99 of every worker's samples pooled — both from the difference of the
        frames' lag histograms, as the upper bound of the bucket they fall in (None with a
        service that sends no histogram)."""
        out: dict[str, float | None] = {}
        # A frame at time t reports the second before it.
        frames = [f for f in self.frames if since < float(f.get("t", 0)) <= until + 1.0]
        for k in ("p90", "p99", "max"):
            vals = [((f.get("totals") or {}).get("lag_ms") or {}).get(k) for f in frames]
            nums = [float(v) for v in vals if isinstance(v, (int, float))]
            out[k] = max(nums) if nums else None
        before = [f for f in self.frames if float(f.get("t", 0)) <= since]
        out.update(window_p99(before[-1] if before else None, frames[-1] if frames else None))
        if out["max"] is not None:  # past the last bucket: the worst sample seen says more
            for k in ("p99_worker", "p99_all"):
                if out[k] == float("inf"):
                    out[k] = out["max"]
        return out

    def broadcast_row(
        self,
        seq: int,
        published: float,
        *,
        recipients: Any,
        expected: int,
        delivered: int,
        first: float | None,
        last: float | None,
        answered_ms: float,
        client_cpu_s: float | None = None,
    ) -> dict[str, Any]:
        """One broadcast's row of the report: who got it, when (ms after ``published``), the
        loop lag over its fan-out (``lag_in``) and, given ``client_cpu_s`` (the load generator's
        CPU seconds from the publish until the last delivery was seen), the load generator's CPU
        per delivery; the same row for the bare and the appliance runs."""
        lag = self.lag_in(published, last or time.time())

        def ms(t: float | None) -> float | None:
            return round((t - published) * 1000, 1) if t else None

        return {
            "seq": seq,
            "published": published,
            "recipients": recipients,
            "expected": expected,
            "delivered": delivered,
            "first_delivery_ms": ms(first),
            "last_delivery_ms": ms(last),
            "answer_ms": round(answered_ms, 1),
            "lag_p90_ms": lag["p90"],
            "lag_p99_ms": lag["p99"],
            "lag_p99_worker_ms": lag["p99_worker"],
            "lag_p99_all_ms": lag["p99_all"],
            "lag_max_ms": lag["max"],
            "client_cpu_us_per_delivery": (
                round(client_cpu_s * 1e6 / delivered, 2)
                if client_cpu_s is not None and delivered
                else None
            ),
        }


def _hist(obj: Any) -> list[int] | None:
    h = (obj or {}).get("lag_hist")
    return [int(n) for n in h] if isinstance(h, list) else None


def _delta(end: list[int], start: list[int] | None) -> list[int]:
    """end - start, bucket by bucket; a histogram that went back (another service took over
    in between) counts from zero."""
    if start is None:
        return end
    diff = [n - (start[i] if i < len(start) else 0) for i, n in enumerate(end)]
    return end if any(d < 0 for d in diff) or len(start) > len(end) else diff


def window_p99(start: dict[str, Any] | None, end: dict[str, Any] | None) -> dict[str, float | None]:
    """``p99_worker`` and ``p99_all`` (ms) of the samples between two frames (see lag_in)."""
    none: dict[str, float | None] = {"p99_worker": None, "p99_all": None}
    if end is None:
        return none
    total_end = _hist(end.get("totals"))
    if total_end is None:
        return none
    total_start = _hist((start or {}).get("totals"))
    pooled = hist_quantile(_delta(total_end, total_start), 0.99)
    starts = {w.get("index"): _hist(w) for w in (start or {}).get("workers") or []}
    worst: float | None = None
    for w in end.get("workers") or []:
        h = _hist(w)
        if h is None:
            continue
        q = hist_quantile(_delta(h, starts.get(w.get("index"))), 0.99)
        if q is not None and (worst is None or q > worst):
            worst = q
    return {"p99_worker": worst, "p99_all": pooled}


def hold_cpu(
    record: Record,
    hold_t0: float,
    host0: Any,
    client_cpu_s: float,
    procs0: dict[int, tuple[str, float]] | None = None,
    exclude: set[int] | frozenset[int] = frozenset(),
    server_cpu_s: float | None = None,
) -> dict[str, Any]:
    """CPU while idle-holding (pings only), % of one core: the service's from its frames (its
    own psutil readings per worker) or, for another server on this host (``--target``), from
    ``server_cpu_s`` (its listeners' CPU seconds since ``hold_t0``); the load generator's from
    ``client_cpu_s`` (its CPU seconds since ``hold_t0``) and the host's from
    ``psutil.cpu_times()`` then (``host0``) and now; of the host's, the softirq share (the
    kernel's packet work charged to no process), and the busiest other processes since
    ``procs0`` (:func:`process_cpu`), not counting ``exclude`` (the service's and the load
    generator's pids): what else keeps the host from idling."""
    dt = max(0.001, time.time() - hold_t0)
    frames = [f for f in record.frames if float(f.get("t", 0)) > hold_t0 + 1.0]
    svc_cpu = [float((f.get("totals") or {}).get("cpu_percent", 0.0)) for f in frames]
    host1 = psutil.cpu_times()
    service_pct = None
    if svc_cpu:
        service_pct = round(sum(svc_cpu) / len(svc_cpu), 1)
    elif server_cpu_s is not None:
        service_pct = round(100 * server_cpu_s / dt, 1)
    out: dict[str, Any] = {
        "seconds": round(dt, 1),
        "service_pct_of_core": service_pct,
        "load_generator_pct_of_core": round(100 * client_cpu_s / dt, 1),
        "host_busy_pct_of_core": host_busy_pct(host0, host1, dt),
        "softirq_pct_of_core": softirq_pct(host0, host1, dt),
        "cores": os.cpu_count(),
        "service_lag": record.lag_in(hold_t0, time.time() - 1.0),
    }
    if procs0 is not None:
        out["other_processes"] = busiest_since(procs0, dt, exclude)
    return out


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's name and user + system CPU seconds (one pass over /proc)."""
    snap: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is not None:
            snap[p.pid] = (p.info["name"] or "?", t.user + t.system)
    return snap


def busiest_since(
    procs0: dict[int, tuple[str, float]],
    seconds: float,
    exclude: set[int] | frozenset[int],
    top: int = 5,
) -> list[dict[str, Any]]:
    """The ``top`` processes by CPU since ``procs0`` (≥ 1 % of a core), leaving out ``exclude``."""
    rows: list[dict[str, Any]] = []
    for pid, (name, cpu) in process_cpu().items():
        if pid in exclude:
            continue
        before = procs0.get(pid, (name, 0.0))[1]
        pct = 100 * (cpu - before) / max(0.001, seconds)
        if pct >= 1.0:
            rows.append({"pid": pid, "name": name, "pct_of_core": round(pct, 1)})
    rows.sort(key=lambda r: -float(r["pct_of_core"]))
    return rows[:top]


# Seconds without a new connection, once every connection has been asked for, that end a ramp.
STALL_S = 30

# The kernel's TCP counters that say why connects did not get through (/proc/net/netstat,
# TcpExt): SYN and SYN-ACK sent again, the listen queue full, requests dropped.
RAMP_COUNTERS = ("TCPSynRetrans", "ListenOverflows", "ListenDrops", "TCPReqQFullDrop")


def tcp_counters(path: str = "/proc/net/netstat") -> dict[str, int]:
    """RAMP_COUNTERS from this network namespace's TcpExt line (0 where the kernel has none)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return dict.fromkeys(RAMP_COUNTERS, 0)
    values: dict[str, int] = {}
    for names, nums in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and nums.startswith("TcpExt:"):
            values = dict(zip(names.split()[1:], (int(v) for v in nums.split()[1:]), strict=False))
    return {k: values.get(k, 0) for k in RAMP_COUNTERS}


def host_busy_pct(t0: Any, t1: Any, seconds: float) -> float:
    """Host CPU busy between two ``psutil.cpu_times()`` readings, % of one core."""
    busy = sum(t1) - sum(t0) - (t1.idle - t0.idle)
    busy -= getattr(t1, "iowait", 0.0) - getattr(t0, "iowait", 0.0)
    return round(100 * float(busy) / max(0.001, seconds), 1)


def softirq_pct(t0: Any, t1: Any, seconds: float) -> float:
    """The host's softirq time between two ``psutil.cpu_times()`` readings, % of one core (0
    where the platform has no such field)."""
    softirq = getattr(t1, "softirq", 0.0) - getattr(t0, "softirq", 0.0)
    return round(100 * float(softirq) / max(0.001, seconds), 1)


def ramp_diagnosis(
    ended: str,
    tcp0: dict[str, int],
    tcp1: dict[str, int],
    busy_pct: float | None,
    tcp_mem_pages_max: int | None = None,
) -> dict[str, Any]:
    """How a ramp ended and what the kernel counted meanwhile: ``ended`` is ``reached``,
    ``stalled`` (no new connection for the stall window) or ``time limit``; ``busy_pct`` is the
    host's CPU over the last stall window of the ramp, % of one core; ``tcp_mem_pages_max`` the
    most TCP memory the ramp's rows saw queued (:meth:`Record.backlog`)."""
    return {
        "ended": ended,
        **{k: tcp1.get(k, 0) - tcp0.get(k, 0) for k in RAMP_COUNTERS},
        "host_busy_pct_of_core_at_end": busy_pct,
        "cores": os.cpu_count(),
        "tcp_mem_pages_max": tcp_mem_pages_max,
    }


def ramp_advice(d: dict[str, Any]) -> str:
    """One line for a ramp that did not reach its target: what the counters point at."""
    why = (
        f"no new connection for {STALL_S} s"
        if d.get("ended") == "stalled"
        else "out of time (--ramp-timeout, or twice the nominal ramp + 60 s)"
    )
    cores = d.get("cores") or 1
    busy = d.get("host_busy_pct_of_core_at_end")
    parts = [f"The ramp stopped short: {why}"]
    if busy is not None:
        parts.append(f"host CPU {busy:.0f} % of {cores * 100} % at its end")
    parts.append(
        f"SYN/SYN-ACK retransmissions {d.get('TCPSynRetrans', 0):,}, "
        f"listen-queue overflows {d.get('ListenOverflows', 0):,}"
    )
    if d.get("ListenOverflows") or d.get("TCPReqQFullDrop"):
        hint = "the accept queues overflowed: see the preflight (somaxconn, the service's backlog)"
    elif busy is not None and busy >= 90 * cores:
        hint = (
            "the host's CPU is full: fewer connections, or --netns N (the clients' sockets in TCP "
            "tables of their own: docs/benchmarks.md, 'On the AMD EPYC'), with --service-netns "
            "the service's too"
        )
    else:
        hint = "see the server's log and bench.csv for where it slowed"
    return "; ".join(parts) + ". " + hint[0].upper() + hint[1:] + "."


# A hold that queues more TCP memory than a page for this share of its connections has fallen
# behind its pings (a steady hold of a million on two cores queues 5,000-36,000 pages; the runs
# that fell behind, 340,000-860,000: docs/benchmarks.md, "Fifty-four shares against one").
BEHIND_SHARE = 0.1


def hold_behind(r: dict[str, Any]) -> str | None:
    """One line when the hold fell behind (see BEHIND_SHARE), else None: its CPU figures then
    measure the box catching up, not a million held idle."""
    hb = r.get("hold_backlog") or {}
    most, held = hb.get("tcp_mem_pages_max"), r.get("held")
    if not isinstance(most, int) or not held or most < BEHIND_SHARE * held:
        return None
    return (
        f"The hold fell behind: up to {most:,} pages of TCP memory queued for {held:,} "
        f"connections (at its start {hb.get('tcp_mem_pages_start') or 0:,}, at its end "
        f"{hb.get('tcp_mem_pages_end') or 0:,}; the clients' counts waited up to "
        f"{hb.get('longest_row_gap_s') or 0} s): data written and not yet acknowledged or "
        "read. The box was catching up, not holding idle, and the hold's CPU figures measure "
        "that; a quiet hold queues a page for a few connections in a hundred."
    )
