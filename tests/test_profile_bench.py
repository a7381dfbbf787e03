"""benchmarks/profile_bench.py counts every worker (and every engine) as one command: their
titles carry an index ("comet-worker 31"), which split perf's rows one per process."""

from __future__ import annotations

import importlib.util

from tests.support.service import ROOT

spec = importlib.util.spec_from_file_location(
    "profile_bench", ROOT / "benchmarks" / "profile_bench.py"
)
assert spec is not None and spec.loader is not None
profile_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_bench)

# `perf report --no-children --stdio --sort comm,dso,sym -g none` lines of a million's hold
# (2026-12-05, 54 workers and 51 engines), with perf's header.
REPORT = """\
# Samples: 1M of event 'cpu-clock:ppp'
#
    16.23%  swapper          [kernel.kallsyms]                         [k] pv_native_safe_halt
     0.50%  comet-worker 16  [kernel.kallsyms]                         [k] __inet_lookup_established
     0.44%  comet-worker 26  [kernel.kallsyms]                         [k] __inet_lookup_established
     0.43%  comet-worker 1   [kernel.kallsyms]                         [k] __inet_lookup_established
     0.30%  comet-engine 30  libpython3.11.so.1.0                      [.] _PyEval_EvalFrameDefault
     0.20%  comet-engine 4   libpython3.11.so.1.0                      [.] _PyEval_EvalFrameDefault
     0.10%  comet-supervisor [kernel.kallsyms]                         [k] __inet_lookup_established
"""


def test_the_workers_rows_are_one_row_and_the_others_stay_apart() -> None:
    top = profile_bench.by_command(profile_bench.parse_rows(REPORT))
    assert top == [
        (16.23, "swapper [kernel.kallsyms] [k] pv_native_safe_halt"),
        (1.37, "comet-worker [kernel.kallsyms] [k] __inet_lookup_established"),
        (0.5, "comet-engine libpython3.11.so.1.0 [.] _PyEval_EvalFrameDefault"),
        (0.1, "comet-supervisor [kernel.kallsyms] [k] __inet_lookup_established"),
    ], top
