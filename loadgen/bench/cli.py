"""``comet-bench`` / ``python -m loadgen.bench``: parse the options, run the phases, print the
report; exit 2 on a bad option, 1 on a run that could not go on, 130 when interrupted."""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console

from loadgen.bench.netns import plan
from loadgen.bench.options import BenchError, Options
from loadgen.bench.preflight import preflight, print_preflight
from loadgen.bench.report import print_report
from loadgen.bench.run import Interrupted, run_bench
from loadgen.engine.child import install_uvloop
from loadgen.engine.sources import parse_source_ips


def main(argv: list[str] | None = None) -> None:
    opts = Options.parse(argv)
    console = Console()
    if opts.preflight_only:
        where = opts.where()
        sources = (
            sum(len(ns.addresses) for ns in plan(opts.netns, opts.conns))
            if opts.netns
            else len(parse_source_ips(opts.source_ips, where.host))
        )
        checks = preflight(
            opts.conns,
            sources,
            concurrency=opts.concurrency,
            port=where.port or opts.port,
            host_sockets=opts.host_sockets(),
        )
        print_preflight(console, checks)
        sys.exit(0 if all(c.ok or not c.stops for c in checks) else 1)
    install_uvloop()
    try:
        report = asyncio.run(run_bench(opts, console))
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        # KeyboardInterrupt/CancelledError: a Ctrl-C before the handlers were in (nothing had
        # been started yet).
        console.print("[yellow]comet-bench: interrupted; every started process was stopped[/]")
        sys.exit(130)
    except (BenchError, OSError, ValueError) as exc:
        sys.exit(f"comet-bench: {str(exc) or type(exc).__name__}")
    print_report(console, report)
