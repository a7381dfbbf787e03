"""benchmarks/profile_bench.py counts every worker (and every engine) as one command: their
titles carry an index ("comet-worker 31"), which split perf's rows one per process."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


_SPIN = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: perf's comm
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
"""


def _spin(name: str, seconds: float) -> None:
    subprocess.run([sys.executable, "-c", _SPIN, name, str(seconds)], check=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="perf over the whole host needs root")
def test_an_armed_window_samples_only_while_it_is_switched_on(tmp_path: Path) -> None:
    """perf is started ahead with its events off and switched on by the trigger: what ran
    before is not in the window, what ran in it is (./dev test installs linux-perf)."""
    assert shutil.which("perf"), "perf not found: ./dev test installs linux-perf"
    armed = profile_bench.Armed("t", tmp_path)
    try:
        armed._command("ping")  # perf is up and listening: its ack says so
        _spin("earlyspin", 1.0)  # while armed, before the window
        armed._command("enable")
        _spin("windowspin", 1.0)
        armed._command("disable")
    finally:
        armed.stop()
    comms = {" ".join(cols) for _pct, cols in profile_bench.perf_rows(armed.data, "comm")}
    assert "windowspin" in comms, comms
    assert "earlyspin" not in comms, comms
    assert not armed.ctl.exists() and not armed.ack.exists()
