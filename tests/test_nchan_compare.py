"""benchmarks/nchan_compare.py at a small size: both servers reach every connection, take one
broadcast to all of them, and the script prints the medians and their ratio. (Its clients wait
for each connection to be held before dialling more: Nchan greets no one, so for it the first
bytes are the sign; a run that stops ramping is caught here, not on the day of a benchmark.)
With ``--pin``: the CPU the servers and the clients ran is read for each, and the CPU named.
With ``--before``: a third server, the service from another checkout (here this one), takes
its broadcast in the same round and gets its ratios."""

from __future__ import annotations

import json

import pytest

from tests.support.service import ROOT, run_benchmark


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_broadcast_to_every_client_of_both_servers() -> None:
    summary = json.loads(
        run_benchmark(
            *("nchan_compare.py", "--conns", "1500", "--workers", "2", "--runs", "1", "--pin"),
            *("--before", str(ROOT)),
            timeout=220,
        )
    )
    assert summary["conns"] == 1500 and summary["workers"] == 2, summary
    for kind in ("comet", "nchan", "before"):
        (last,) = summary["runs"][kind]
        assert 0 < last < 30, summary  # every client got the one broadcast
    assert summary["ratio_comet_to_nchan"] > 0, summary
    assert summary["before"] == str(ROOT), summary
    assert summary["ratio_before_to_nchan"] > 0 and summary["ratio_comet_to_before"] > 0, summary
    assert summary["pinned"] is True and summary["cpu"], summary
    for kind in ("comet", "nchan", "before"):
        ran = summary["cpu_median_s"][kind]
        # 1,500 writes and as many reads: CPU on both sides (none: the wrong processes were read)
        assert 0 < ran["server"] < 30 and 0 < ran["clients"] < 30, summary
    assert summary["server_cpu_ratio_comet_to_nchan"] > 0, summary
