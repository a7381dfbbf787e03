"""The 1 Hz FRAME of docs/architecture.md: worker numbers plus process and host numbers.

Everything here reads /proc or psutil and is cheap enough to run once a second with dozens of
workers (each worker's CPU and RSS from one read of its /proc/PID/stat: :class:`ProcStat`);
``frame_ms`` in the frame says how long it actually took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from service.contracts import TOTAL_NAMES, Frame, LagMs, WorkerRow, WorkerStats, hist_add

LAG_ZERO: LagMs = {"avg": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
LAG_KEYS = tuple(LAG_ZERO)


def _rounded(lag: Mapping[str, Any]) -> LagMs:
    return {
        "avg": round(float(lag.get("avg", 0.0)), 2),
        "p90": round(float(lag.get("p90", 0.0)), 2),
        "p99": round(float(lag.get("p99", 0.0)), 2),
        "max": round(float(lag.get("max", 0.0)), 2),
    }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def count_fds(pid: int) -> int:
    """Open descriptors of a process (0 if it is gone).

    Linux 6.2+ reports the count as the size of /proc/PID/fd, one stat() call; listing the
    directory (psutil's num_fds) costs ~40 ms for a worker holding 17,000 sockets.
    """
    try:
        size = os.stat(f"/proc/{pid}/fd").st_size
        return size if size > 0 else psutil.Process(pid).num_fds()
    except (OSError, psutil.Error):
        return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# What reading a /proc/PID/stat raises when its process ended (no such file, ESRCH) or the read
# came back short of the fields (ValueError, IndexError while parsing): the worker is gone.
_UNREADABLE = (OSError, ValueError, IndexError)


class ProcStat:
    """One worker's CPU share and RSS, both from one read of its ``/proc/PID/stat`` a frame
    (opened, read and closed: the supervisor holds no descriptor per worker). Through psutil
    each worker cost two files read and a ``prlimit`` call every frame, ~40 µs more: with 54
    workers a frame took 3.8-5.4 ms instead of 1.8-2.6 (docs/benchmarks.md, "What a frame
    reads"). Its RLIMIT_NOFILE is read once: the supervisor sets it at spawn. The process's
    start time, read with the rest, tells a later process given the same pid from it
    (``ProcessLookupError``)."""

    __slots__ = ("pid", "nofile", "_path", "_start", "_cpu_s", "_at")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._path = f"/proc/{pid}/stat"
        self._cpu_s, _, self._start = self._read()
        self.nofile = int(psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0])
        self._at = time.monotonic()

    def _read(self) -> tuple[float, int, bytes]:
        """(CPU seconds so far, RSS in bytes, start time in clock ticks since boot)."""
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        # After the command name, which may hold spaces and parentheses: field 3 (state) on.
        fields = data[data.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK, int(fields[21]) * _PAGE, fields[19]

    def sample(self) -> tuple[float, int]:
        """(% of one CPU since the previous sample, as psutil's ``cpu_percent``; RSS in bytes)."""
        cpu_s, rss, start = self._read()
        if start != self._start:
            raise ProcessLookupError(self.pid)  # the pid is another process's now
        now = time.monotonic()
        dt = now - self._at
        pct = 100.0 * (cpu_s - self._cpu_s) / dt if dt > 0 else 0.0
        self._cpu_s, self._at = cpu_s, now
        return max(0.0, pct), rss


def read_sockstat(path: str = "/proc/net/sockstat") -> dict[str, dict[str, int]]:
    """``TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1`` → ``{"TCP": {"inuse": 5, ...}, ...}``."""
    out: dict[str, dict[str, int]] = {}
    for line in (_read(path) or "").splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        values: dict[str, int] = {}
        for key, value in zip(words[::2], words[1::2], strict=False):
            try:
                values[key] = int(value)
            except ValueError:
                continue
        out[name.strip()] = values
    return out


def read_limits() -> dict[str, Any]:
    """Host limits that decide whether the target can be carried (None where not readable)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    port_text = _read("/proc/sys/net/ipv4/ip_local_port_range")
    port_range = [int(x) for x in port_text.split()] if port_text else None
    tcp_mem_text = _read("/proc/sys/net/ipv4/tcp_mem")
    tcp_mem = [int(x) for x in tcp_mem_text.split()] if tcp_mem_text else None
    return {
        "nofile": int(soft) if soft != resource.RLIM_INFINITY else None,
        "file_max": _read_int("/proc/sys/fs/file-max"),
        "conntrack_max": _read_int("/proc/sys/net/netfilter/nf_conntrack_max"),
        "port_range": port_range,
        "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
        "tcp_mem": tcp_mem,
    }


@dataclass
class WorkerView:
    """What the frame builder needs to know about one worker slot."""

    index: int
    pid: int | None
    state: str  # "starting", "up", "down", "draining"
    stats: WorkerStats | None  # the latest WSTATS, None before the first answer
    restarts: int = 0


@dataclass
class FrameBuilder:
    """Turns worker stats and /proc readings into one FRAME per call."""

    target_connections: int
    node_id: str
    started: float = field(default_factory=time.time)
    step: int = 0
    _procs: dict[int, ProcStat] = field(default_factory=dict)
    _retired: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTAL_NAMES, 0))
    _last_limits: dict[str, Any] = field(default_factory=dict)
    _limits_at: float = 0.0
    _accepted_before: int = 0
    _accepted_at: float = 0.0
    # Slot index → [pid, histogram of its earlier processes, the current one's latest]: a
    # slot's lag histogram never goes back when its worker is replaced (restart or reload).
    _lag_slots: dict[int, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The first cpu_percent reading of any psutil object is meaningless; prime them now.
        psutil.cpu_times_percent(interval=None)
        self._self = psutil.Process()
        self._self.cpu_percent(None)

    def retire(self, stats: WorkerStats | None) -> None:
        """A worker died: keep its running totals in the node's totals, so they never go back
        when a worker is replaced."""
        if not stats:
            return
        counts: Mapping[str, Any] = stats
        for key in TOTAL_NAMES:
            self._retired[key] += int(counts.get(key, 0) or 0)

    def _slot_hist(self, index: int, pid: int | None, hist: list[int] | None) -> list[int]:
        entry = self._lag_slots.get(index)
        if entry is None:
            entry = self._lag_slots[index] = [pid, [], []]
        if hist is not None:
            if pid != entry[0] or sum(hist) < sum(entry[2]):  # another process in the slot
                entry[1] = hist_add(entry[1], entry[2])
                entry[0] = pid
            entry[2] = list(hist)
        return hist_add(entry[1], entry[2])

    def _proc(self, pid: int) -> ProcStat | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = ProcStat(pid)
            except (*_UNREADABLE, psutil.Error):
                return None
            self._procs[pid] = proc
        return proc

    def _limits(self, now: float) -> dict[str, Any]:
        # Sysctls change rarely; rereading six files every 10 s is plenty.
        if now - self._limits_at > 10.0 or not self._last_limits:
            self._last_limits = read_limits()
            self._limits_at = now
        return self._last_limits

    def build(self, workers: list[WorkerView], bus_status: dict[str, Any] | None) -> Frame:
        t0 = time.perf_counter()
        now = time.time()
        self.step += 1
        live_pids = {w.pid for w in workers if w.pid is not None}
        for pid in list(self._procs):
            if pid not in live_pids:
                del self._procs[pid]

        totals: dict[str, Any] = {"conns": 0, **self._retired}
        rss_total = 0
        cpu_total = 0.0
        fds_open = 0
        fds_limit = 0
        lag_avgs: list[float] = []
        lag_p90 = 0.0
        lag_p99 = 0.0
        lag_max = 0.0
        lag_hist: list[int] = []
        rows: list[WorkerRow] = []
        for w in workers:
            # Read by name from a mapping: a worker of another version may lack a counter.
            stats: Mapping[str, Any] = w.stats or {}
            rss = 0
            cpu = 0.0
            proc = self._proc(w.pid) if w.pid is not None else None
            if proc is not None:
                try:
                    cpu, rss = proc.sample()
                except _UNREADABLE:  # gone (its slot respawns it)
                    del self._procs[proc.pid]
                else:
                    fds_open += count_fds(proc.pid)
                    fds_limit += proc.nofile
            rss_total += rss
            cpu_total += cpu
            conns = int(stats.get("conns", 0) or 0)
            totals["conns"] += conns
            for key in TOTAL_NAMES:
                totals[key] += int(stats.get(key, 0) or 0)
            lag = stats.get("lag_ms") or LAG_ZERO
            if w.stats is not None:
                lag_avgs.append(float(lag.get("avg", 0.0)))
                lag_p90 = max(lag_p90, float(lag.get("p90", 0.0)))
                lag_p99 = max(lag_p99, float(lag.get("p99", 0.0)))
                lag_max = max(lag_max, float(lag.get("max", 0.0)))
            hist = stats.get("lag_hist")
            slot_hist = self._slot_hist(w.index, w.pid, hist if isinstance(hist, list) else None)
            lag_hist = hist_add(lag_hist, slot_hist)
            rows.append(
                {
                    "pid": w.pid,
                    "index": w.index,
                    "state": w.state,
                    "restarts": w.restarts,
                    "conns": conns,
                    "rss_bytes": rss,
                    "cpu_percent": round(cpu, 1),
                    "lag_ms": _rounded(lag),
                    "lag_hist": slot_hist,
                    "msgs_sent_total": int(stats.get("msgs_sent_total", 0) or 0),
                }
            )
        # New connections a second since the previous frame (a reconnect storm shows here).
        accepted = int(totals.get("accepted_total", 0))
        dt = now - self._accepted_at if self._accepted_at else 0.0
        totals["accepts_per_s"] = (
            round(max(0, accepted - self._accepted_before) / dt, 1) if dt > 0 else 0.0
        )
        self._accepted_before, self._accepted_at = accepted, now
        totals["rss_bytes"] = rss_total
        totals["cpu_percent"] = round(cpu_total, 1)
        # avg: mean of the workers' averages; p90 and max: the worst worker's, since one slow loop
        # is what a client on it feels.
        totals["lag_ms"] = {
            "avg": round(sum(lag_avgs) / len(lag_avgs), 2) if lag_avgs else 0.0,
            "p90": round(lag_p90, 2),
            "p99": round(lag_p99, 2),
            "max": round(lag_max, 2),
        }
        # Every sample of every slot since this supervisor started, by LAG_BOUNDS_MS.
        totals["lag_hist"] = lag_hist

        try:
            fds_open += count_fds(self._self.pid)
            fds_limit += int(self._self.rlimit(psutil.RLIMIT_NOFILE)[0])
        except psutil.Error:
            pass
        cpu_pct: dict[str, float] = psutil.cpu_times_percent(interval=None)._asdict()
        vm = psutil.virtual_memory()
        system = {
            "cpu": {k: round(float(v), 1) for k, v in cpu_pct.items() if k != "system"}
            | {"sys": round(float(cpu_pct.get("system", 0.0)), 1)},
            "mem": {
                "total": int(vm.total),
                "used": int(vm.used),
                "cached": int(getattr(vm, "cached", 0)),
                "available": int(vm.available),
            },
            "sockstat": read_sockstat(),
            # open/limit: descriptors of this service's processes against the sum of their
            # RLIMIT_NOFILE; system_open: every allocated file handle on the host (vs file_max).
            "fds": {
                "open": fds_open,
                "limit": fds_limit,
                "system_open": _read_int("/proc/sys/fs/file-nr"),
            },
            "limits": self._limits(now),
        }
        frame: Frame = {
            "t": round(now, 3),
            "step": self.step,
            "uptime_s": round(now - self.started, 1),
            "target_connections": self.target_connections,
            "node_id": self.node_id,
            "frame_ms": 0.0,
            "supervisor": {"pid": os.getpid(), "cpu_percent": self._cpu_self()},
            "totals": totals,
            "system": system,
            "workers": rows,
        }
        if bus_status is not None:
            frame["bus"] = bus_status
        frame["frame_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        return frame

    def _cpu_self(self) -> float:
        try:
            return round(float(self._self.cpu_percent(None)), 1)
        except psutil.Error:
            return 0.0
