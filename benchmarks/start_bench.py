"""How long the service takes to start its workers, and to start a reload's new ones.

    .venv/bin/python benchmarks/start_bench.py --workers 54 --runs 3 --reloads 3

Each run starts ``python -m service --workers N`` on a free port and times it from the start to
the health answer that counts N workers up; then ``--reloads`` reloads with no connection held,
each answer's ``prepare_s`` (every new process started and ready) and ``seconds``. Medians over
the runs; one JSON line at the end. With no connection held this is the processes' own start-up
(interpreter, imports, listen, init): what a reload, a takeover or a crash's restarts pay before
a single connection moves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's shared helpers

from tests.support.service import Service  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=54, help="the service's --workers")
    ap.add_argument("--runs", type=int, default=3, help="service starts timed (medians reported)")
    ap.add_argument("--reloads", type=int, default=3, help="reloads per run")
    args = ap.parse_args()
    starts: list[float] = []
    prepares: list[float] = []
    reloads: list[float] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            with Service(Path(tmp), "--workers", str(args.workers)) as svc:
                svc.wait_up(args.workers, timeout=180)
                starts.append(round(time.monotonic() - t0, 3))
                for _ in range(args.reloads):
                    answer = svc.ask({"op": "reload"})
                    if not answer.get("ok") or answer.get("failed"):
                        raise SystemExit(f"reload failed: {answer}")
                    prepares.append(float(answer["prepare_s"]))
                    reloads.append(float(answer["seconds"]))
                    svc.pids_seen.update(s["pid"] for s in answer["slots"])
    print(
        json.dumps(
            {
                "workers": args.workers,
                "start_s": starts,
                "start_s_median": statistics.median(starts),
                "reload_prepare_s": prepares,
                "reload_prepare_s_median": statistics.median(prepares),
                "reload_s_median": statistics.median(reloads),
            }
        )
    )


if __name__ == "__main__":
    main()
