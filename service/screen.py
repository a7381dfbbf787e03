"""What the supervisor shows on its stdout once a second.

On a terminal: a top-like live screen (rich) with the node's totals, host numbers and one row per
worker. Otherwise (a container log, a pipe) a short log line every few seconds, so logs stay
readable at a million connections and a 1 Hz frame rate.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

log = logging.getLogger("comet.screen")

LOG_EVERY = 5.0
MB = 1024 * 1024


class Screen(Protocol):
    def update(self, frame: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def summary(frame: dict[str, Any]) -> str:
    """One line: the numbers an operator looks at first."""
    t = frame["totals"]
    sys_ = frame["system"]
    up = sum(1 for w in frame["workers"] if w.get("state") == "up")
    return (
        f"conns {t['conns']:,} | workers {up}/{len(frame['workers'])} | "
        f"rss {t['rss_bytes'] / MB:,.0f} MB | cpu {t['cpu_percent']:.0f}% "
        f"(host idle {sys_['cpu'].get('idle', 0):.0f}%) | lag p90 {t['lag_ms']['p90']:.1f} ms "
        f"max {t['lag_ms']['max']:.1f} ms | msgs {t['msgs_sent_total']:,}"
    )


class LogScreen:
    """Non-terminal output: a summary line every LOG_EVERY seconds."""

    def __init__(self) -> None:
        self._last = 0.0

    def update(self, frame: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last >= LOG_EVERY:
            self._last = now
            log.info("%s", summary(frame))

    def close(self) -> None:
        return None


class LiveScreen:
    """The top-like screen, redrawn with every frame."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console()
        self._live = Live(console=self._console, auto_refresh=False, screen=False, transient=False)
        self._live.start()

    def update(self, frame: dict[str, Any]) -> None:
        self._live.update(render(frame), refresh=True)

    def close(self) -> None:
        self._live.stop()


def render(frame: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = frame["totals"]
    s = frame["system"]
    mem = s["mem"]
    tcp = s["sockstat"].get("TCP", {})
    lim = s["limits"]
    head = Text()
    head.append(f"comet1m {frame['node_id']}  ", style="bold")
    head.append(
        f"step {frame['step']}  up {frame['uptime_s']:.0f}s  frame {frame['frame_ms']:.1f} ms\n"
    )
    head.append(f"conns {t['conns']:,}", style="bold green")
    head.append(
        f" / target {frame['target_connections']:,}   accepted {t['accepted_total']:,}  "
        f"closed {t['closed_total']:,}  rejected {t['rejected_total']:,}  "
        f"slow-dropped {t.get('slow_dropped_total', 0):,}\n"
    )
    head.append(
        f"msgs {t['msgs_sent_total']:,}  bytes {t['bytes_sent_total'] / MB:,.1f} MB   "
        f"lag avg {t['lag_ms']['avg']:.1f} p90 {t['lag_ms']['p90']:.1f} "
        f"max {t['lag_ms']['max']:.1f} ms\n"
    )
    cpu = s["cpu"]
    head.append(
        f"cpu user {cpu.get('user', 0):.0f}% sys {cpu.get('sys', 0):.0f}% "
        f"idle {cpu.get('idle', 0):.0f}%   mem used {mem['used'] / MB:,.0f} MB "
        f"cached {mem['cached'] / MB:,.0f} MB of {mem['total'] / MB:,.0f} MB   "
        f"workers rss {t['rss_bytes'] / MB:,.0f} MB cpu {t['cpu_percent']:.0f}%\n"
    )
    head.append(
        f"tcp inuse {tcp.get('inuse', 0):,} tw {tcp.get('tw', 0):,} "
        f"mem {tcp.get('mem', 0):,} pages   fds {s['fds']['open']:,}/{s['fds']['limit']:,}"
        f"   nofile {lim.get('nofile')} file-max {lim.get('file_max')} "
        f"conntrack {lim.get('conntrack_max')} ports {lim.get('port_range')}"
    )
    table = Table(expand=False, show_edge=False, pad_edge=False)
    for col in (
        "#",
        "pid",
        "state",
        "conns",
        "rss MB",
        "cpu %",
        "lag p90",
        "lag max",
        "msgs",
        "restarts",
    ):
        table.add_column(col, justify="right")
    for w in frame["workers"]:
        style = None if w.get("state") == "up" else "yellow"
        table.add_row(
            str(w["index"]),
            str(w["pid"] or "-"),
            w.get("state", "?"),
            f"{w['conns']:,}",
            f"{w['rss_bytes'] / MB:,.1f}",
            f"{w['cpu_percent']:.0f}",
            f"{w['lag_ms']['p90']:.1f}",
            f"{w['lag_ms']['max']:.1f}",
            f"{w['msgs_sent_total']:,}",
            str(w.get("restarts", 0)),
            style=style,
        )
    return Group(head, table)


def make_screen(mode: str) -> Screen:
    if mode == "on" or (mode == "auto" and sys.stdout.isatty()):
        return LiveScreen()
    return LogScreen()
