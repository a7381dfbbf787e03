"""What the supervisor shows on its stdout once a second.

On a terminal: a top-like live screen (rich) with the node's totals, host numbers, one row per
worker and the latest log events. Log lines written to the same terminal would tear the screen
(half frames stacked, lines overwritten), so while it is up every log record of the supervisor and
the workers goes to ``<log dir>/comet-service.log`` instead, and the last few are shown in the
screen's event pane. Otherwise (a container log, a pipe) logs stay on stderr and a short summary
line is logged every few seconds, so logs stay readable at a million connections.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from typing import IO, Any, Protocol

from service.contracts import Frame

log = logging.getLogger("comet.screen")

LOG_EVERY = 5.0
MB = 1024 * 1024


EVENTS = 8  # log lines shown in the live screen's event pane
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Screen(Protocol):
    # Where the workers' stderr goes (None: inherit the supervisor's).
    worker_stderr: IO[bytes] | None

    def update(self, frame: Frame) -> None: ...

    def close(self) -> None: ...


def summary(frame: Frame) -> str:
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

    worker_stderr: IO[bytes] | None = None

    def __init__(self) -> None:
        self._last = 0.0

    def update(self, frame: Frame) -> None:
        now = time.monotonic()
        if now - self._last >= LOG_EVERY:
            self._last = now
            log.info("%s", summary(frame))

    def close(self) -> None:
        return None


class RecentEvents(logging.Handler):
    """Keeps the last few formatted log records for the screen's event pane."""

    def __init__(self, size: int = EVENTS) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record).splitlines()[0])


class LiveScreen:
    """The top-like screen, redrawn with every frame, with the log moved off the terminal."""

    def __init__(self, log_dir: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self.worker_stderr: IO[bytes] | None = None
        self.log_path: str | None = None
        self.events = RecentEvents()
        root = logging.getLogger()
        self._moved: list[logging.Handler] = []
        try:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "comet-service.log")
            self.worker_stderr = open(path, "ab")  # noqa: SIM115 - closed in close()
            file_handler = logging.FileHandler(path)
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            self.log_path = path
        except OSError as exc:
            log.warning("no log file in %s (%s): logs stay on the terminal", log_dir, exc)
        else:
            for h in list(root.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    root.removeHandler(h)
                    self._moved.append(h)
            root.addHandler(file_handler)
            self._file_handler: logging.Handler | None = file_handler
        root.addHandler(self.events)
        # --screen on draws even when stdout is not a terminal (a pipe, tmux capture, a test).
        self._console = Console(force_terminal=True)
        self._live = Live(console=self._console, auto_refresh=False, screen=False, transient=False)
        self._live.start()
        if self.log_path is not None:
            log.info("log: %s (the live screen shows the latest lines)", self.log_path)

    def update(self, frame: Frame) -> None:
        self._live.update(render(frame, list(self.events.lines), self.log_path), refresh=True)

    def close(self) -> None:
        self._live.stop()
        root = logging.getLogger()
        root.removeHandler(self.events)
        handler = getattr(self, "_file_handler", None)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        for h in self._moved:
            root.addHandler(h)  # the last lines (stopped, exit status) reach the terminal
        if self.worker_stderr is not None:
            self.worker_stderr.close()


def render(frame: Frame, events: list[str] | None = None, log_path: str | None = None) -> Any:
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
    if events is None:
        return Group(head, table)
    pane = Text()
    pane.append(f"\nlatest events (all in {log_path or 'stderr'}):\n", style="bold")
    for line in events or ["-"]:
        warn = " WARNING " in line or " ERROR " in line
        pane.append(line + "\n", style="yellow" if warn else None)
    return Group(head, table, pane)


def make_screen(mode: str, log_dir: str = "logs") -> Screen:
    if mode == "on" or (mode == "auto" and sys.stdout.isatty()):
        return LiveScreen(log_dir)
    return LogScreen()
