"""Summarise a million run from its comet-bench output directory (docs/benchmarks.md, "million").

    .venv/bin/python benchmarks/million_summary.py million-out

Reads ``bench.json`` and the service's per-second CSV log (``service-logs/*.csv``) and prints the
numbers the docs table uses: ramp times from the service's own connection count, RSS per
connection over the service's idle RSS once every worker was up, the hold's CPU and loop lag
(frames at the full count before the first broadcast) and each broadcast's delivery and lag.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import statistics
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="OUT_DIR is what `comet-bench --out` (or benchmarks/million.sh) wrote: its "
        "bench.json and the service's CSV logs under service-logs/.",
    )
    parser.add_argument(
        "out_dir", nargs="?", default="million-out", metavar="OUT_DIR", help="default: %(default)s"
    )
    out = Path(parser.parse_args(argv).out_dir)
    logs = sorted(glob.glob(str(out / "service-logs" / "*.csv")))
    if not (out / "bench.json").is_file():
        parser.error(
            f"{out / 'bench.json'}: no such file (is {out} a comet-bench --out directory?)"
        )
    if not logs:
        parser.error(f"{out / 'service-logs'}: no service CSV log (*.csv) to read")
    report = json.loads((out / "bench.json").read_text())
    rows: list[dict[str, str]] = []
    for path in logs:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    if not rows:
        parser.error(f"{out / 'service-logs'}: the service's CSV logs hold no rows")
    conns = report["conns"]
    t_start = float(rows[0]["t"])
    workers = max(int(r["workers"]) for r in rows)
    idle = next(r for r in rows if int(r["workers"]) == workers)
    full = [r for r in rows if int(r["conns"]) >= conns]
    first_bc = min((b["published"] for b in report.get("broadcasts", [])), default=float("inf"))
    hold = [r for r in full if float(r["t"]) < first_bc - 1]
    peak = max(float(r["rss_mb"]) for r in full) if full else 0.0

    def at(n: int) -> str:
        r = next((r for r in rows if int(r["conns"]) >= n), None)
        return f"{float(r['t']) - t_start:.0f} s" if r else "not reached"

    print(f"workers {workers}; ramp: {conns // 2:,} at {at(conns // 2)}, {conns:,} at {at(conns)}")
    print(f"held (clients at the end of the hold): {report.get('held'):,}")
    print(f"errors {report['errors']}")
    if full:
        closed = {r["closed_total"] for r in full if float(r["t"]) < first_bc}
        print(f"service closed_total while at {conns:,} before the broadcasts: {sorted(closed)}")
    print(
        f"service RSS: idle {float(idle['rss_mb']):,.1f} MB, at {conns:,} {peak:,.1f} MB → "
        f"{(peak - float(idle['rss_mb'])) * 2**20 / conns:,.0f} B per connection"
    )
    print(
        f"load generator RSS {report.get('client_rss_mb')} MB, "
        f"{report.get('client_rss_per_conn_bytes')} B/conn; kernel Slab +"
        f"{report.get('kernel_slab_delta_mb')} MB = {report.get('kernel_bytes_per_conn')} B/pair"
    )
    print(f"peak tcp_mem pages {max(int(r['tcp_mem_pages']) for r in rows):,}")
    print(f"peak host memory used {max(float(r['mem_used_mb']) for r in rows):,.0f} MB")
    if hold:
        med = statistics.median
        print(
            f"hold at {conns:,}: {len(hold)} s; service CPU median "
            f"{med(float(r['proc_cpu_pct']) for r in hold):.0f} % of a core; host idle median "
            f"{med(float(r['cpu_idle']) for r in hold):.0f} %; lag p90 median "
            f"{med(float(r['lag_p90_ms']) for r in hold):.0f} ms, max median "
            f"{med(float(r['lag_max_ms']) for r in hold):.0f} ms, max "
            f"{max(float(r['lag_max_ms']) for r in hold):.0f} ms; frame median "
            f"{med(float(r['frame_ms']) for r in hold):.1f} ms, max "
            f"{max(float(r['frame_ms']) for r in hold):.1f} ms"
        )
    print(f"bench hold_cpu {report.get('hold_cpu')}")
    for b in report.get("broadcasts", []):
        print(
            f"broadcast {b['seq']}: {b['delivered']:,}/{b['expected']:,}; answer "
            f"{b.get('answer_ms')} ms; first {b['first_delivery_ms']} ms; last "
            f"{b['last_delivery_ms']} ms; lag p99 {b.get('lag_p99_ms')} max {b.get('lag_max_ms')}"
            f" (window: worst worker p99 <= {b.get('lag_p99_worker_ms')}, all <= "
            f"{b.get('lag_p99_all_ms')}); load generator "
            f"{b.get('client_cpu_us_per_delivery')} µs CPU a delivery"
        )
    left = report.get("ramp_down_server_conns_left")
    print(f"ramp-down {report.get('ramp_down_s')} s, service connections left {left}")


if __name__ == "__main__":
    main()
