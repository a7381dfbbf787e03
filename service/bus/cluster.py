"""The cluster view: what each node shows the others (its frame without per-worker rows) and the
totals over all of them, as ``GET /api/cluster`` and the ``cluster`` op answer it."""

from __future__ import annotations

from typing import Any

from service.contracts import COUNTER_NAMES, Frame

SUMMED = (*COUNTER_NAMES, "rss_bytes")


def node_summary(frame: Frame) -> dict[str, Any]:
    """What a node shows the cluster: its frame without the per-worker rows and socket tables."""
    system = frame.get("system") or {}
    workers = frame.get("workers") or []
    return {
        "node_id": frame.get("node_id"),
        "t": frame.get("t"),
        "uptime_s": frame.get("uptime_s"),
        "target_connections": frame.get("target_connections", 0),
        "workers": len(workers),
        "workers_up": sum(1 for w in workers if w.get("state", "up") == "up"),
        "totals": frame.get("totals") or {},
        "system": {k: system[k] for k in ("cpu", "mem", "fds") if k in system},
        "bus": frame.get("bus"),
    }


def cluster_view(nodes: list[dict[str, Any]], now: float, bus: str) -> dict[str, Any]:
    """Per-node summaries (sorted by node id, each with its age) and their totals.

    Counters and memory add up; CPU adds up (percent of one core, like ``top``); lag keeps the
    worst node's p90 and max (a client feels the node it is on) and the mean of the averages.
    """
    nodes = sorted(nodes, key=lambda n: str(n.get("node_id")))
    totals: dict[str, Any] = dict.fromkeys(SUMMED, 0)
    cpu = 0.0
    avgs: list[float] = []
    p90 = 0.0
    worst = 0.0
    workers = 0
    target = 0
    for node in nodes:
        node["age_s"] = round(max(0.0, now - float(node.get("t") or now)), 3)
        t = node.get("totals") or {}
        for key in SUMMED:
            totals[key] += int(t.get(key, 0) or 0)
        cpu += float(t.get("cpu_percent", 0.0) or 0.0)
        lag = t.get("lag_ms") or {}
        avgs.append(float(lag.get("avg", 0.0) or 0.0))
        p90 = max(p90, float(lag.get("p90", 0.0) or 0.0))
        worst = max(worst, float(lag.get("max", 0.0) or 0.0))
        workers += int(node.get("workers_up", 0) or 0)
        target += int(node.get("target_connections", 0) or 0)
    totals["cpu_percent"] = round(cpu, 1)
    totals["lag_ms"] = {
        "avg": round(sum(avgs) / len(avgs), 2) if avgs else 0.0,
        "p90": round(p90, 2),
        "max": round(worst, 2),
    }
    totals["workers"] = workers
    totals["target_connections"] = target
    return {"bus": bus, "t": round(now, 3), "count": len(nodes), "nodes": nodes, "totals": totals}
