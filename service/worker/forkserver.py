"""``python -m service.worker.forkserver --report-fd R``: import the worker once, fork it N times.

A worker process spends most of its start-up importing (asyncio, uvloop, ssl, logging and our
modules: ~0.2 s of CPU on this machine kind). A reload starts six of them at once, and a
takeover at a million fifty-four, on a host whose two cores are already busy holding
connections: 0.8 s and 6.4 s of wall time on an idle box. The supervisor instead starts this
program once per batch (service/supervisor/spawn.py): a fresh interpreter that imports the code
now on disk, reads the batch from stdin, forks one child per entry and exits. Each child is then
exactly what ``python -m service.worker --control-fd N`` would have been (its own session, its
environment, stdin on /dev/null), without paying for the imports again.

stdin (JSON): ``{"workers": [{"control_fd": N, "env": {"COMET_WORKER_INDEX": "3", ...}}, ...]}``;
each control fd is passed open to this process. For each child forked, one line ``I PID`` goes
to the report fd (I: its place in the list), so the supervisor knows every child even if this
process fails half-way. This process exits 0 once every child is forked, and its children are
then re-parented to the supervisor (a child subreaper, ``PR_SET_CHILD_SUBREAPER``), which waits
for them as it would for its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import traceback
from typing import Any

# The import this program exists for: everything a worker needs, loaded before the forks.
from service.proctitle import PREFIX, set_title
from service.worker import process


def _child(entry: dict[str, Any], report_fd: int, others: list[int]) -> int:
    """In a forked child: become the worker of ``entry``; its exit code."""
    os.close(report_fd)
    for fd in others:
        os.close(fd)
    os.setsid()  # as start_new_session: a terminal's Ctrl-C reaches only the supervisor
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.update({str(k): str(v) for k, v in entry.get("env", {}).items()})
    random.seed()  # not the forkserver's sequence: each worker its own (Retry-After, phases)
    gc.unfreeze()
    try:
        process.main(["--control-fd", str(int(entry["control_fd"]))])
        return 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m service.worker.forkserver",
        description="Fork worker processes from one import of the worker (started by the "
        "supervisor; reads the batch as JSON on stdin).",
    )
    ap.add_argument("--report-fd", type=int, required=True, help="where 'I PID' lines go")
    ns = ap.parse_args(argv)
    try:
        batch = json.load(sys.stdin)
        entries = list(batch["workers"])
        fds = [int(e["control_fd"]) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"forkserver: bad batch on stdin: {exc}", file=sys.stderr)
        return 2
    set_title(f"{PREFIX}: forking {len(entries)} workers", "comet-fork")
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    gc.freeze()  # what was imported stays in pages the children share until they write them
    for i, entry in enumerate(entries):
        pid = os.fork()
        if pid == 0:
            # The pipes of the entries before this one are closed here already.
            os._exit(_child(entry, ns.report_fd, fds[i + 1 :]))
        os.close(fds[i])  # the child's now
        os.write(ns.report_fd, f"{i} {pid}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
