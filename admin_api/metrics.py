"""Prometheus exposition of one FRAME.

A custom collector over the frame the service just gave us, registered in a fresh
``CollectorRegistry`` per scrape: no process-global metric objects whose values could go stale
between scrapes or leak across apps in one process (tests build many). Per-second rates in the
frame are left out on purpose; Prometheus derives rates from the ``_total`` counters itself.
Fields missing from a frame (an older or newer service) are skipped, never a 500.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.contracts import LAG_BOUNDS_MS

TOTAL_COUNTERS = (
    # (frame key under "totals", metric name without _total, help)
    ("accepted_total", "comet_accepted_connections", "Connections accepted since start"),
    ("closed_total", "comet_closed_connections", "Connections closed since start"),
    ("rejected_total", "comet_rejected_connections", "Connections refused over the cap (503)"),
    ("slow_dropped_total", "comet_slow_dropped_connections", "Slow subscribers dropped"),
    ("msgs_sent_total", "comet_messages_sent", "Messages written to subscribers"),
    ("bytes_sent_total", "comet_bytes_sent", "Bytes written to subscribers"),
    (
        "token_missing_total",
        "comet_token_missing",
        "Private-channel requests without a token (401)",
    ),
    ("token_invalid_total", "comet_token_invalid", "Tokens with a bad signature or claims (403)"),
    (
        "token_expired_total",
        "comet_token_expired",
        "Expired tokens, at subscribe or while connected",
    ),
    (
        "token_forbidden_total",
        "comet_token_forbidden",
        "Tokens that do not grant the channel (403)",
    ),
    ("handed_total", "comet_handed_connections", "Connections given to a new worker (reload)"),
    ("adopted_total", "comet_adopted_connections", "Connections taken from an old worker (reload)"),
    (
        "tls_offloaded_total",
        "comet_tls_offloaded_connections",
        "TLS 1.3 connections whose records the worker seals (OpenSSL's state freed)",
    ),
    (
        "tls_kept_total",
        "comet_tls_kept_connections",
        "TLS connections whose records OpenSSL keeps (TLS 1.2, or --tls-offload off)",
    ),
    ("tls_failed_total", "comet_tls_failed_handshakes", "TLS handshakes refused or timed out"),
)
LAG_STATS = ("avg", "p90", "max")


def _num(value: Any) -> float | None:
    # bool is an int subclass; a stray true/false is not a measurement.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    """Numeric leaves of a nested dict as ``a_b_c`` keys (for the free-form sockstat block)."""
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from _flatten(f"{prefix}_{key}" if prefix else str(key), sub)
    else:
        number = _num(value)
        if number is not None:
            yield prefix, number


def _lag_buckets(counts: Any) -> list[tuple[str, float]] | None:
    """A frame's ``lag_hist`` (counts per LAG_BOUNDS_MS bucket) as Prometheus's cumulative
    ``le`` buckets, ``+Inf`` last; None when it is missing or not a list of counts."""
    if not isinstance(counts, list) or not all(_num(n) is not None for n in counts):
        return None
    if len(counts) > len(LAG_BOUNDS_MS) + 1:
        return None
    out: list[tuple[str, float]] = []
    seen = 0.0
    for bound, n in zip(LAG_BOUNDS_MS, [*counts, *[0] * len(LAG_BOUNDS_MS)], strict=False):
        seen += float(n)
        out.append((repr(bound / 1000.0), seen))
    out.append(("+Inf", float(sum(counts))))  # every sample, the one past the last bound too
    return out


class FrameCollector(Collector):
    def __init__(self, frame: Mapping[str, Any]) -> None:
        self.frame = frame

    def collect(self) -> Iterator[Metric]:
        frame = self.frame
        yield from self._scalars(frame)
        yield from self._totals(_get(frame, "totals"))
        yield from self._workers(_get(frame, "workers"))
        yield from self._system(_get(frame, "system"))

    def _scalars(self, frame: Mapping[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "comet_node_info", "Always 1; labels name the node", labels=["node_id"]
        )
        info.add_metric([str(frame.get("node_id", ""))], 1.0)
        yield info
        for key, name, doc in (
            ("uptime_s", "comet_uptime_seconds", "Seconds since the supervisor started"),
            ("target_connections", "comet_target_connections", "Connections the host is sized for"),
            ("t", "comet_frame_timestamp_seconds", "Unix time the frame was built"),
            ("frame_ms", "comet_frame_build_seconds", "Time the supervisor took to build a frame"),
        ):
            value = _num(frame.get(key))
            if value is not None:
                scale = 0.001 if key == "frame_ms" else 1.0
                yield GaugeMetricFamily(name, doc, value=value * scale)
        workers = frame.get("workers")
        if isinstance(workers, list):
            yield GaugeMetricFamily("comet_workers", "Worker processes", value=len(workers))
        bus_up = _get(frame, "bus", "up")
        if isinstance(bus_up, bool):
            yield GaugeMetricFamily("comet_bus_up", "1 if the Redis bus is reachable", value=bus_up)

    def _totals(self, totals: Any) -> Iterator[Metric]:
        if not isinstance(totals, Mapping):
            return
        conns = _num(totals.get("conns"))
        if conns is not None:
            yield GaugeMetricFamily("comet_connections", "Open subscriber connections", value=conns)
        for key, name, doc in TOTAL_COUNTERS:
            value = _num(totals.get(key))
            if value is not None:
                yield CounterMetricFamily(name, doc, value=value)
        rss = _num(totals.get("rss_bytes"))
        if rss is not None:
            yield GaugeMetricFamily(
                "comet_resident_memory_bytes", "RSS of the supervisor and workers", value=rss
            )
        cpu = _num(totals.get("cpu_percent"))
        if cpu is not None:
            yield GaugeMetricFamily(
                "comet_cpu_percent", "CPU of all service processes (100 = one core)", value=cpu
            )
        lag = GaugeMetricFamily(
            "comet_loop_lag_seconds", "Event-loop lag over the last second", labels=["stat"]
        )
        for stat in LAG_STATS:
            value = _num(_get(totals, "lag_ms", stat))
            if value is not None:
                lag.add_metric([stat], value / 1000.0)
        if lag.samples:
            yield lag
        hist = _lag_buckets(totals.get("lag_hist"))
        if hist is not None:
            # Every loop-lag sample of every worker since the service started: a p99 over any
            # window is histogram_quantile(0.99, rate(..._bucket[window])).
            yield HistogramMetricFamily(
                "comet_loop_lag_histogram_seconds",
                "Event-loop lag samples of all workers since start (no _sum: not kept)",
                buckets=hist,
            )

    def _workers(self, workers: Any) -> Iterator[Metric]:
        if not isinstance(workers, list):
            return
        labels = ["worker", "pid"]
        conns = GaugeMetricFamily(
            "comet_worker_connections", "Connections per worker", labels=labels
        )
        rss = GaugeMetricFamily(
            "comet_worker_resident_memory_bytes", "RSS per worker", labels=labels
        )
        cpu = GaugeMetricFamily("comet_worker_cpu_percent", "CPU per worker", labels=labels)
        sent = CounterMetricFamily(
            "comet_worker_messages_sent", "Messages written per worker", labels=labels
        )
        lag = GaugeMetricFamily(
            "comet_worker_loop_lag_seconds", "Event-loop lag per worker", labels=[*labels, "stat"]
        )
        restarts = CounterMetricFamily(
            "comet_worker_restarts",
            "Times the supervisor restarted this worker slot",
            labels=labels,
        )
        up = GaugeMetricFamily("comet_worker_up", "1 if the worker slot is up", labels=labels)
        for position, worker in enumerate(workers):
            if not isinstance(worker, Mapping):
                continue
            index = worker.get("index", position)
            ids = [str(index), str(worker.get("pid", ""))]
            for family, key in ((conns, "conns"), (rss, "rss_bytes"), (cpu, "cpu_percent")):
                value = _num(worker.get(key))
                if value is not None:
                    family.add_metric(ids, value)
            value = _num(worker.get("restarts"))
            if value is not None:
                restarts.add_metric(ids, value)
            if isinstance(worker.get("state"), str):
                up.add_metric(ids, 1.0 if worker["state"] == "up" else 0.0)
            value = _num(worker.get("msgs_sent_total"))
            if value is not None:
                sent.add_metric(ids, value)
            for stat in LAG_STATS:
                value = _num(_get(worker, "lag_ms", stat))
                if value is not None:
                    lag.add_metric([*ids, stat], value / 1000.0)
        for metric in (conns, rss, cpu, sent, lag, restarts, up):
            if metric.samples:
                yield metric

    def _system(self, system: Any) -> Iterator[Metric]:
        if not isinstance(system, Mapping):
            return
        for key, name, doc, label in (
            ("cpu", "comet_system_cpu_percent", "Host CPU time share by mode", "mode"),
            ("mem", "comet_system_memory_bytes", "Host memory by kind", "kind"),
        ):
            values = system.get(key)
            if isinstance(values, Mapping):
                family = GaugeMetricFamily(name, doc, labels=[label])
                for sub, value in values.items():
                    number = _num(value)
                    if number is not None:
                        family.add_metric([str(sub)], number)
                yield family
        for key, name, doc in (
            ("open", "comet_open_fds", "File descriptors open in the service processes"),
            ("limit", "comet_fd_limit", "RLIMIT_NOFILE per process"),
        ):
            value = _num(_get(system, "fds", key))
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        limits = system.get("limits")
        if isinstance(limits, Mapping):
            family = GaugeMetricFamily("comet_host_limit", "Kernel/process limits", labels=["name"])
            for name, value in limits.items():
                number = _num(value)
                if number is not None:
                    family.add_metric([str(name)], number)
            port_range = limits.get("port_range")
            if isinstance(port_range, list) and len(port_range) == 2:
                low, high = _num(port_range[0]), _num(port_range[1])
                if low is not None and high is not None:
                    family.add_metric(["ephemeral_ports"], high - low + 1)
            if family.samples:
                yield family
        sockstat = system.get("sockstat")
        if isinstance(sockstat, Mapping):
            family = GaugeMetricFamily(
                "comet_sockstat", "Values of /proc/net/sockstat", labels=["key"]
            )
            for key, value in _flatten("", sockstat):
                family.add_metric([key], value)
            if family.samples:
                yield family


def render(frame: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of one frame."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrameCollector(frame))
    return generate_latest(registry)
