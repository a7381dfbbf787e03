"""Workers forked from one import (service/supervisor/spawn.py, service/worker/forkserver.py).

The Spawner makes its process a child subreaper, so its tests run it in a process of their own
(tests/service/spawn_helper.py ``drive``), with the real forkserver and a stand-in worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.net import wait_for
from tests.support.service import ROOT, Service
from tests.support.stream import Stream


def drive(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.service.spawn_helper", "drive", mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.timeout(90)
def test_one_forkserver_forks_a_batch_of_workers_that_are_ours_to_reap():
    out = drive("batch")
    # Three workers asked for in one loop turn: one forkserver started, no other process.
    assert len(out["popens"]) == 1, out["popens"]
    assert "tests.service.spawn_helper" in out["popens"][0]
    assert out["started"] == [True, True, True]
    seen = out["seen"]
    # Each child is the worker of its entry: its control fd, its environment, its own session
    # (a terminal's Ctrl-C reaches only the supervisor), stdin on /dev/null, its own random
    # sequence (not the forkserver's, which every child would otherwise repeat).
    assert [s["index"] for s in seen] == ["0", "1", "2"]
    assert all(s["sid"] == s["pid"] for s in seen)
    assert all(s["stdin"] == "/dev/null" for s in seen)
    assert len({s["random"] for s in seen}) == 3
    assert [s["pid"] for s in seen] == out["pids"]
    # Beyond stdin, stdout and stderr it holds its control socket and nothing else: not the
    # other workers' control sockets, not the forkserver's report pipe.
    for s in seen:
        assert list(s["held"]) == [str(s["fd"])], s["held"]
        assert s["held"][str(s["fd"])].startswith("socket:")
    # Re-parented to the Spawner's process once the forkserver exited; running until their
    # control sockets closed; then reaped by it with their own exit codes.
    assert out["ppids"] == [out["me"]] * 3
    assert out["alive_before_close"] == [None, None, None]
    assert out["codes"] == [3, 4, 5]
    assert out["children_left"] == []


@pytest.mark.timeout(90)
def test_a_forkserver_that_cannot_start_fails_its_batch_and_leaves_nothing():
    out = drive("broken")
    assert len(out["popens"]) == 1
    assert out["started"] == [False, False, False]
    assert out["children_left"] == []


@pytest.mark.timeout(90)
def test_a_worker_whose_asker_was_cancelled_is_killed_and_reaped():
    out = drive("cancel")
    assert out["cancelled"] is True
    assert len(out["popens"]) == 1
    assert out["children_left"] == []


def _zombie_or_gone(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def anon_kb(pid: int) -> dict[str, int]:
    """Anonymous memory and this process's proportional share of it, from smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Anonymous", "Pss_Anon"):
            out[key] = int(rest.split()[0])
    return out


def test_each_worker_is_a_session_and_so_an_autogroup_of_its_own(tmp_path):
    """A terminal's Ctrl-C reaches only the supervisor: each worker leads a session of its own.
    The kernel's autogroup scheduling weighs a session as one program, so outside a cgroup of
    its own the service gets a share of a busy CPU per worker. Deliberate: at the one-box
    million the load generator's single share is what batches its reads; with the workers in
    the supervisor's session the broadcasts took four to six times as long (docs/benchmarks.md,
    "Fifty-four shares against one")."""
    with Service(tmp_path, "--workers", "2") as svc:
        sup = svc.proc.pid
        pids = svc.wait_up(2)["pids"]
        assert [os.getsid(pid) for pid in pids] == pids
        groups = [Path(f"/proc/{pid}/autogroup") for pid in (sup, *pids)]
        if all(g.exists() for g in groups):  # a kernel built with autogroup scheduling
            assert len({g.read_text().split()[0] for g in groups}) == 3, [
                g.read_text() for g in groups
            ]


@pytest.mark.timeout(120)
def test_the_service_forks_its_workers_and_reaps_every_one_it_replaces(tmp_path):
    with Service(tmp_path, "--workers", "3") as svc:
        health = svc.wait_up(3)
        sup = psutil.Process(svc.proc.pid)
        first = list(health["pids"])
        for pid in first:
            p = psutil.Process(pid)
            assert p.ppid() == sup.pid
            assert p.name() == f"comet-worker {first.index(pid)}"
            # Forked from one import, not exec'd each: the imported heap is shared between
            # the workers (a worker started on its own shares no anonymous memory).
            rollup = anon_kb(pid)
            assert rollup["Pss_Anon"] < 0.85 * rollup["Anonymous"], rollup
        fds = sup.num_fds()
        # A worker killed: replaced (forked again), and the dead one reaped, not a zombie.
        os.kill(first[0], signal.SIGKILL)
        h = wait_for(
            lambda: (
                (h := svc.health()) and h.get("workers") == 3 and first[0] not in h["pids"] and h
            ),
            10,
            "a replacement",
        )
        svc.pids_seen.update(h["pids"])
        wait_for(lambda: _zombie_or_gone(first[0]) == "gone", 5, "the killed worker reaped")
        # Reloads: every old process reaped, the new ones the supervisor's children, and no
        # descriptor left behind by a forkserver batch.
        for _ in range(3):
            before = svc.health()["pids"]
            answer = svc.ask({"op": "reload"})
            assert answer["ok"] is True and answer["failed"] == 0, answer
            after = [s["pid"] for s in answer["slots"]]
            svc.pids_seen.update(after)
            assert all(psutil.Process(p).ppid() == sup.pid for p in after)
            for pid in before:
                wait_for(lambda pid=pid: _zombie_or_gone(pid) == "gone", 10, f"{pid} reaped")
        wait_for(lambda: sup.num_fds() <= fds, 5, f"the supervisor back to {fds} descriptors")
        assert [c for c in sup.children() if c.status() == psutil.STATUS_ZOMBIE] == []


@pytest.mark.timeout(120)
def test_a_reload_onto_code_that_does_not_import_keeps_the_old_workers_serving(tmp_path):
    # The service runs from a copy of its code, which is then broken on disk (an upgrade gone
    # wrong): the reload's forkserver cannot import it, every slot says so, and the old
    # workers go on serving the same connections; once the code is fixed, a reload works.
    code = tmp_path / "code"
    shutil.copytree(
        ROOT / "service", code / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    hub = code / "service" / "worker" / "hub.py"
    good = hub.read_text()
    with Service(tmp_path / "svc", "--workers", "2", code=code) as svc:
        health = svc.wait_up(2)
        streams = [Stream(svc.port, "/sub/news", sse=i % 2 == 0) for i in range(4)]
        try:
            wait_for(lambda: all(b"Welcome!" in s.data for s in streams), 10, "4 welcomes")
            hub.write_text(good + "\nraise RuntimeError('broken on disk')\n")
            answer = svc.ask({"op": "reload"})
            assert answer["failed"] == 2 and answer["reloaded"] == 0, answer
            assert all("cannot start" in s["error"] for s in answer["slots"]), answer
            assert svc.health()["pids"] == health["pids"]
            assert "RuntimeError: broken on disk" in svc.log()
            assert svc.ask({"op": "broadcast", "data": "m1", "channel": "news"})["recipients"] == 4
            hub.write_text(good)
            answer = svc.ask({"op": "reload"})
            assert answer["failed"] == 0 and answer["reloaded"] == 2, answer
            svc.pids_seen.update(s["pid"] for s in answer["slots"])
            assert svc.ask({"op": "broadcast", "data": "m2", "channel": "news"})["recipients"] == 4
            wait_for(lambda: all(b"m2" in s.data for s in streams), 10, "m2 on every stream")
            for s in streams:
                assert not s.closed and s.sock.getsockname() == s.local
                assert b"m1" in s.data
        finally:
            for s in streams:
                s.close()
