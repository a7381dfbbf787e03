"""What a bench leaves: bench.json, bench.csv, bench.png, the service's own graphs, and the
table on the terminal."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadgen.bench.record import Record, hold_behind, ramp_advice
from loadgen.bench.service import Service


def write_outputs(out: Path, report: dict[str, Any], run: Record, svc: Service | None) -> None:
    files = {
        "json": str(out / "bench.json"),
        "csv": str(out / "bench.csv"),
        "png": str(out / "bench.png"),
    }
    if run.timeline:
        with open(out / "bench.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(run.timeline[0]))
            w.writeheader()
            w.writerows(run.timeline)
    plot_bench(out / "bench.png", report, run)
    if svc is not None and svc.log_dir is not None:
        from loadgen.plot import PlotError, plot_log

        logs = sorted(str(p) for p in svc.log_dir.glob("*.csv"))
        if logs:
            try:
                for p in plot_log(logs, str(out), "service CSV log of the bench"):
                    files[p.stem] = str(p)
            except PlotError as exc:
                report["plot_error"] = str(exc)
            files["service_csv"] = logs[-1]
    report["files"] = files
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


def plot_bench(path: Path, report: dict[str, Any], run: Record) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    x = [r["elapsed_s"] for r in run.timeline]
    ax.plot(x, [r["clients"] for r in run.timeline], color="black", label="clients connected")
    ax.plot(x, [r["target"] for r in run.timeline], ":", color="gray", label="target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("connections")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(
        x,
        [r["server_rss_delta_mb"] for r in run.timeline],
        color="tab:red",
        label="server RSS growth (MB)",
    )
    ax2.plot(
        x,
        [r["slab_delta_mb"] for r in run.timeline],
        color="tab:blue",
        label="kernel Slab growth (MB)",
    )
    ax2.set_ylabel("MB")
    # Each broadcast on the timeline, at its publish time.
    t0 = report.get("t0")
    for i, b in enumerate(run.broadcasts):
        if t0 is not None and b.get("published"):
            ax.axvline(
                b["published"] - t0,
                color="tab:green",
                linestyle="--",
                alpha=0.7,
                label="broadcast" if i == 0 else None,
            )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # Below the axes: inside, it covered the ramp.
    ax.legend(
        h1 + h2,
        l1 + l2,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=5,
        fontsize="small",
        frameon=False,
    )
    ax.set_title(
        f"comet-bench: {report.get('reached', 0):,} of {report['conns']:,} connections, "
        f"ramp {report.get('ramp_s', '-')} s"
    )
    seqs = [b["seq"] for b in run.broadcasts]
    last = [b["last_delivery_ms"] or 0 for b in run.broadcasts]
    bx.bar([str(s) for s in seqs], last, color="tab:green")
    lat = report.get("latency_ms") or {}
    for q, style in (("p50", "--"), ("p99", "-.")):
        if lat.get(q) is not None:
            bx.axhline(lat[q], linestyle=style, color="tab:purple", label=f"{q} {lat[q]:.1f} ms")
    bx.set_xlabel("broadcast #")
    bx.set_ylabel("ms from publish to last delivery")
    bx.set_title("delivery per broadcast")
    if lat.get("p50") is not None:
        bx.legend(fontsize="small")
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_model() -> str:
    """The CPU's model name with its family, model and stepping (/proc/cpuinfo): a result is only
    comparable on the same CPU, and the name alone does not tell them apart (a Zen 3 and a Zen 4
    both report "AMD EPYC" on this machine kind)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or os.uname().machine
    ids = [
        f"{label} {fields[key]}"
        for key, label in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
        if fields.get(key)
    ]
    return f"{name} ({', '.join(ids)})" if ids else name


def print_report(console: Console, r: dict[str, Any]) -> None:
    def fmt(x: Any, unit: str = "") -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.1f}{unit}"
        if isinstance(x, int):
            return f"{x:,}{unit}"
        return f"{x}{unit}"

    machine = r.get("machine") or {}
    t = Table(
        title=f"comet-bench — {r['target']}",
        caption=f"{machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} CPUs, "
        f"{machine.get('mem_gib', '?')} GiB",
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    lat = r.get("latency_ms") or {}
    errs = r.get("errors") or {}
    ns = r.get("netns")
    rd = r.get("ramp_diagnosis") or {}
    rows = [
        (
            "clients from",
            f"{ns['namespaces']} network namespaces (veth + bridge, own TCP hash each)"
            if ns
            else "this host's own network",
        ),
        (
            "service in",
            f"network namespace {ns['service_namespace']} (own TCP hash, "
            f"{ns['service_ehash_entries']:,} buckets)"
            if ns and ns.get("service_namespace")
            else "this host's own network",
        ),
        (
            "connections asked / reached / held",
            f"{r['conns']:,} / {fmt(r.get('reached'))} / {fmt(r.get('held'))}",
        ),
        (
            "ramp time",
            fmt(r.get("ramp_s"), " s") + ("" if r.get("ramp_complete") else " (incomplete)"),
        ),
        (
            "ramp: SYN/SYN-ACK retransmissions, listen-queue overflows",
            f"{fmt(rd.get('TCPSynRetrans'))}, {fmt(rd.get('ListenOverflows'))}",
        ),
        ("ramp: most TCP memory queued", fmt(rd.get("tcp_mem_pages_max"), " pages")),
        (
            "errors req / resp, ended",
            f"{fmt(errs.get('errors_req'))} / "
            f"{fmt(errs.get('errors_resp'))}, {fmt(errs.get('ended_req'))}",
        ),
        (
            "client / server processes",
            f"{fmt(r.get('client_procs'))} / {fmt(r.get('server_workers'))}"
            + (f" (clients SCHED_{r['client_sched'].upper()})" if r.get("client_sched") else "")
            + (
                f", clients coalesce {r['client_coalesce_ms']:g} ms"
                if r.get("client_coalesce_ms")
                else ""
            )
            + (
                f", clients' autogroup nice {r['client_autogroup_nice']}"
                if r.get("client_autogroup_nice") is not None
                else ""
            ),
        ),
        ("server RSS (total)", fmt(r.get("server_rss_mb"), " MB")),
        ("server RSS per connection", fmt(r.get("server_rss_per_conn_bytes"), " B")),
        ("load generator RSS per connection", fmt(r.get("client_rss_per_conn_bytes"), " B")),
        ("kernel Slab per connection pair", fmt(r.get("kernel_bytes_per_conn"), " B")),
        (
            "delivery latency p50 / p90 / p99 / max",
            " / ".join(fmt(lat.get(q)) for q in ("p50", "p90", "p99", "max")) + " ms",
        ),
        ("worst loop lag", fmt(r.get("worst_loop_lag_ms"), " ms")),
    ]
    hc = r.get("hold_cpu") or {}
    if hc:
        rows.append(
            (
                "CPU while holding (% of one core): service / load gen / host",
                f"{fmt(hc.get('service_pct_of_core'))} / "
                f"{fmt(hc.get('load_generator_pct_of_core'))}"
                f" / {fmt(hc.get('host_busy_pct_of_core'))} (of {hc.get('cores')} cores)",
            )
        )
        others = hc.get("other_processes")
        if others is not None:
            rows.append(
                (
                    "of the host's: softirq; other processes",
                    f"{fmt(hc.get('softirq_pct_of_core'))}; "
                    + (
                        ", ".join(
                            f"{o['name']} ({o['pid']}) {fmt(o['pct_of_core'])}" for o in others
                        )
                        or "none ≥ 1 %"
                    ),
                )
            )
    hb = r.get("hold_backlog") or {}
    if hb:
        rows.append(
            (
                "while holding: TCP memory queued at the start / most / end; the longest wait "
                "for the clients' counts",
                f"{fmt(hb.get('tcp_mem_pages_start'))} / {fmt(hb.get('tcp_mem_pages_max'))} / "
                f"{fmt(hb.get('tcp_mem_pages_end'), ' pages')}; "
                f"{fmt(hb.get('longest_row_gap_s'), ' s')}",
            )
        )
    if "ramp_down_s" in r:
        rows.append(("ramp-down (all clients close)", fmt(r.get("ramp_down_s"), " s")))
    for b in r.get("broadcasts", []):
        rows.append(
            (
                f"broadcast {b['seq']}: delivered, first / last delivery",
                f"{fmt(b['delivered'])}/{fmt(b['expected'])}, "
                f"{fmt(b.get('first_delivery_ms'))} / {fmt(b['last_delivery_ms'], ' ms')}; "
                f"lag p99 {fmt(b.get('lag_p99_ms'))} max {fmt(b.get('lag_max_ms'), ' ms')} "
                f"(over the window: worst worker p99 <= {fmt(b.get('lag_p99_worker_ms'))}, "
                f"all workers p99 <= {fmt(b.get('lag_p99_all_ms'), ' ms')}); "
                f"load generator {fmt(b.get('client_cpu_us_per_delivery'), ' µs')} CPU a delivery",
            )
        )
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if rd and not r.get("ramp_complete"):
        console.print(ramp_advice(rd))
    behind = hold_behind(r)
    if behind:
        console.print(behind)
    console.print(f"preflight: {r.get('preflight_verdict')}")
    for k, v in (r.get("files") or {}).items():
        console.print(f"  {k}: {v}")
