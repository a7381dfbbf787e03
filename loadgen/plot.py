"""``comet-plot LOG.csv -o DIR``: the seed's two graphs from the service's per-second CSV log.

``memory.png``: RSS and system memory used (MB) with the connection count dotted on a second axis.
``cpu.png``: CPU user / sys (% of the machine) and the service's process CPU % with the connection
count dotted. Columns are those of docs/architecture.md "CSV log". Several logs can be given
together (``comet-plot logs/comet-*.csv*``, rotated ones included): their rows are put in time order
and split into runs wherever the clock jumps by more than RUN_GAP seconds or the supervisor's step
starts again, and each run gets its own pair of graphs (``memory-<start>.png``, ``cpu-<start>.png``)
instead of one axis with straight lines drawn across the gap between runs.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

REQUIRED = ("conns", "cpu_user", "cpu_sys", "proc_cpu_pct", "mem_used_mb", "rss_mb")
RUN_GAP = 10.0  # seconds between rows that separate two runs (the log writes one a second)


class PlotError(Exception):
    pass


def read_log(paths: Sequence[str]) -> dict[str, list[float]]:
    """Columns of one or more CSV logs as float lists (blank or bad cells become NaN)."""
    cols: dict[str, list[float]] = {}
    rows = 0
    for path in paths:
        try:
            f = open(path, newline="")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise PlotError(f"{path}: {exc.strerror}") from None
        with f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise PlotError(f"{path}: empty file")
            missing = [c for c in REQUIRED if c not in reader.fieldnames]
            if missing:
                raise PlotError(f"{path}: missing columns {', '.join(missing)}")
            for row in reader:
                for k, v in row.items():
                    if k is None:
                        continue
                    try:
                        x = float(v) if v not in (None, "") else float("nan")
                    except ValueError:
                        x = float("nan")
                    cols.setdefault(k, [float("nan")] * rows).append(x)
                rows += 1
                for lst in cols.values():
                    if len(lst) < rows:
                        lst.append(float("nan"))
    if rows == 0:
        raise PlotError("no data rows in " + ", ".join(paths))
    return cols


def split_runs(cols: dict[str, list[float]]) -> list[dict[str, list[float]]]:
    """The rows in time order, cut into runs (a new supervisor, or a gap of over RUN_GAP s)."""
    t = cols.get("t")
    if not t or any(x != x for x in t):  # no (or incomplete) unix times: one run, as given
        return [cols]
    order = sorted(range(len(t)), key=lambda i: t[i])
    step = cols.get("step")
    runs: list[list[int]] = []
    for i in order:
        if runs:
            prev = runs[-1][-1]
            restarted = step is not None and step[i] < step[prev]
            if not restarted and t[i] - t[prev] <= RUN_GAP:
                runs[-1].append(i)
                continue
        runs.append([i])
    return [{k: [v[i] for i in run] for k, v in cols.items()} for run in runs]


def _x_axis(cols: dict[str, list[float]]) -> tuple[list[float], str]:
    t = cols.get("t")
    if t and t[0] == t[0]:  # not NaN
        t0 = t[0]
        return [x - t0 for x in t], "seconds since start"
    if "step" in cols:
        return cols["step"], "step (s)"
    return [float(i) for i in range(len(cols["conns"]))], "sample"


def _conns_axis(ax: Axes, x: list[float], conns: list[float]) -> Axes:
    ax2 = ax.twinx()
    ax2.plot(x, conns, ":", color="black", linewidth=1.5, label="connections")
    ax2.set_ylabel("connections")
    ax2.set_ylim(bottom=0)
    ax2.ticklabel_format(axis="y", style="plain")
    return ax2


def _legend(ax: Axes, ax2: Axes) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize="small")


def _plot(
    cols: dict[str, list[float]],
    out: Path,
    name: str,
    title: str,
    ylabel: str,
    series: Sequence[tuple[str, str, str]],
) -> Path:
    """One graph of ``series`` (column, colour, label) with the connection count dotted."""
    x, xlabel = _x_axis(cols)
    fig, ax = plt.subplots(figsize=(10, 5))
    for column, color, label in series:
        ax.plot(x, cols[column], color=color, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax2 = _conns_axis(ax, x, cols["conns"])
    _legend(ax, ax2)
    ax.set_title(title)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory(cols: dict[str, list[float]], out: Path, title: str) -> Path:
    series = [
        ("rss_mb", "tab:red", "service RSS (MB)"),
        ("mem_used_mb", "tab:blue", "system memory used (MB)"),
    ]
    return _plot(cols, out, "memory.png", f"Memory — {title}", "MB", series)


def plot_cpu(cols: dict[str, list[float]], out: Path, title: str) -> Path:
    series = [
        ("cpu_user", "tab:green", "CPU user %"),
        ("cpu_sys", "tab:orange", "CPU sys %"),
        ("proc_cpu_pct", "tab:purple", "service process CPU %"),
    ]
    return _plot(cols, out, "cpu.png", f"CPU — {title}", "%", series)


def plot_log(paths: Sequence[str], out_dir: str, title: str | None = None) -> list[Path]:
    """memory.png and cpu.png for one run; for several, a pair per run named by its start."""
    runs = split_runs(read_log(paths))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        name = title or ", ".join(Path(p).name for p in paths[:3]) + (
            " …" if len(paths) > 3 else ""
        )
        return [plot_memory(runs[0], out, name), plot_cpu(runs[0], out, name)]
    written = []
    for run in runs:
        start = time.strftime("%Y%m%d-%H%M%S", time.localtime(run["t"][0]))
        length = run["t"][-1] - run["t"][0]
        name = f"{title + ' — ' if title else ''}run from {start} ({length:.0f} s)"
        memory, cpu = plot_memory(run, out, name), plot_cpu(run, out, name)
        written += [
            memory.rename(out / f"memory-{start}.png"),
            cpu.rename(out / f"cpu-{start}.png"),
        ]
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="comet-plot",
        description="Draw memory.png and cpu.png (with the connection count dotted) from the "
        "service's per-second CSV log.",
    )
    parser.add_argument("logs", nargs="+", metavar="LOG.csv", help="CSV log file(s), in order")
    parser.add_argument("-o", "--out", default=".", help="directory for the PNG files")
    parser.add_argument("--title", help="title suffix (default: the first log's file name)")
    args = parser.parse_args(argv)
    try:
        paths = plot_log(args.logs, args.out, args.title)
    except PlotError as exc:
        sys.exit(f"comet-plot: {exc}")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
