"""The supervisor's own pieces: bus ids and history, CSV rotation, sockstat parsing; and a
restarted worker that serves history it got from the supervisor."""

from __future__ import annotations

import asyncio
import csv
import http.client
import json
import logging
import os
import signal

import pytest

from service.bus.history import History
from service.bus.local import LocalBus
from service.supervisor.csvlog import COLUMNS, CsvLog
from service.supervisor.frames import read_sockstat
from tests.support.net import wait_for
from tests.support.service import Service


def test_local_bus_numbers_once_and_keeps_per_channel_history():
    async def go() -> None:
        bus = LocalBus(history_size=3, history_max_age=300)
        ids = [
            (await bus.publish(f"m{i}", "news" if i % 2 else None, None))["id"] for i in range(10)
        ]
        assert ids == list(range(1, 11)) and bus.last_id == 10
        hist = bus.history()
        # three newest per ring: channel None (2, 6, 8... even i) and "news" (odd i)
        assert [m["id"] for m in hist] == [5, 6, 7, 8, 9, 10]
        assert all(m["ts"] > 0 for m in hist)

    asyncio.run(go())


def test_history_drops_messages_past_max_age():
    h = History(size=10, max_age=60)
    h.add({"id": 1, "channel": None, "event": None, "data": "old", "ts": 1000.0})
    h.add({"id": 2, "channel": "c", "event": None, "data": "new", "ts": 1100.0})
    assert [m["id"] for m in h.snapshot(now=1120.0)] == [2]


def test_csv_rotates_by_size_and_keeps_a_header_in_every_file(tmp_path):
    log = CsvLog(str(tmp_path), max_bytes=600, backups=2, start=0)
    frame = {
        "t": 1.0,
        "step": 1,
        "frame_ms": 0.5,
        "totals": {
            "conns": 1,
            "cpu_percent": 1.0,
            "rss_bytes": 1 << 20,
            "accepted_total": 1,
            "closed_total": 0,
            "rejected_total": 0,
            "msgs_sent_total": 0,
            "bytes_sent_total": 0,
            "lag_ms": {"avg": 0.1, "p90": 0.2, "max": 0.3},
        },
        "system": {
            "cpu": {"user": 1, "sys": 1, "idle": 98},
            "mem": {"used": 1 << 30, "cached": 1 << 29},
            "sockstat": {"TCP": {"inuse": 3, "mem": 4}},
        },
        "workers": [{"state": "up"}],
    }
    for i in range(40):
        log.write({**frame, "step": i + 1, "t": 1.0 + i})
    log.close()
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3, files  # current + 2 backups
    for name in files:
        with open(tmp_path / name, newline="") as f:
            rows = list(csv.reader(f))
        assert tuple(rows[0]) == COLUMNS
        assert all(len(r) == len(COLUMNS) for r in rows)
    data = []
    for name in (f"{log.path}.2", f"{log.path}.1", log.path):  # oldest first
        with open(name, newline="") as f:
            data += list(csv.reader(f))[1:]
    steps = [int(r[0]) for r in data]
    assert steps == list(range(steps[0], 41))  # newest rows kept, in order, none lost between


def test_sockstat_parser(tmp_path):
    p = tmp_path / "sockstat"
    p.write_text("sockets: used 10\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1\nUDP: inuse 1 mem 0\n")
    assert read_sockstat(str(p)) == {
        "sockets": {"used": 10},
        "TCP": {"inuse": 5, "orphan": 0, "tw": 2, "alloc": 7, "mem": 1},
        "UDP": {"inuse": 1, "mem": 0},
    }


@pytest.mark.timeout(60)
def test_restarted_worker_serves_history_from_the_supervisor(tmp_path):
    svc = Service(tmp_path, "--workers", "1")
    try:
        health = svc.wait_up(1)
        ids = [svc.ask({"op": "broadcast", "data": f"hist-{i}"})["id"] for i in range(3)]
        os.kill(health["pids"][0], signal.SIGKILL)
        wait_for(
            lambda: (h := svc.health()) and h["workers"] == 1 and h["pids"][0] != health["pids"][0],
            5,
            "replacement",
        )
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        try:
            conn.request("GET", f"/poll/default?since={ids[0] - 1}&timeout=1")
            body = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        assert [m["id"] for m in body["messages"]] == ids
        assert [m["data"] for m in body["messages"]] == ["hist-0", "hist-1", "hist-2"]
        # The new worker continues the same sequence.
        assert svc.ask({"op": "broadcast", "data": "next"})["id"] == ids[-1] + 1
    finally:
        assert svc.stop() == 0, svc.log()


@pytest.mark.timeout(60)
def test_concurrent_broadcasts_get_unique_ids_delivered_in_order(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    svc = Service(tmp_path, "--workers", "2")
    try:
        svc.wait_up(2)

        def send(i):
            return svc.ask({"op": "broadcast", "data": f"c{i}", "channel": "order"})["id"]

        with ThreadPoolExecutor(8) as pool:
            ids = sorted(pool.map(send, range(40)))
        assert ids == list(range(ids[0], ids[0] + 40))
        # Whichever worker answers, its history holds all 40 in id order.
        for _ in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
            try:
                conn.request("GET", f"/poll/order?since={ids[0] - 1}&timeout=1")
                got = [m["id"] for m in json.loads(conn.getresponse().read())["messages"]]
            finally:
                conn.close()
            assert got == ids
    finally:
        assert svc.stop() == 0, svc.log()


@pytest.mark.timeout(60)
def test_unwritable_log_dir_disables_the_csv_but_not_the_service(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    svc = Service(tmp_path, "--workers", "1", "--log-dir", str(blocker / "logs"))
    try:
        svc.wait_up(1)
        assert "CSV log disabled" in svc.log()
        frame = wait_for(lambda: svc.ask({"op": "stats"}).get("frame"), 5, "a frame")
        assert frame["step"] >= 1
    finally:
        assert svc.stop() == 0, svc.log()


class _PreparingSlot:
    """A worker slot whose new process takes ``prepare`` seconds to come up (or fails to)."""

    def __init__(
        self, prepare: float, fail: bool = False, index: int = 0, state: str = "up"
    ) -> None:
        self.prepare = prepare
        self.fail = fail
        self.index = index
        self.state = state
        self.lock = asyncio.Lock()
        self.reloaded_at: float | None = None

    async def prepare_reload(
        self, run_dir: str, wait: float | None = None
    ) -> tuple[str, str] | dict[str, object]:
        await asyncio.sleep(self.prepare)
        if self.state != "up":  # as WorkerSlot.prepare_reload answers
            return {"index": self.index, "skipped": f"worker is {self.state}"}
        if self.fail:
            raise RuntimeError("cannot start")
        return "process", "path"

    async def reload(self, new: str, path: str) -> dict[str, object]:
        assert self.lock.locked()  # nothing is written to it while it hands over
        self.reloaded_at = asyncio.get_running_loop().time()
        await asyncio.sleep(0.1)
        return {"index": self.index, "handed": 0, "kept": 0, "seconds": 0.1}


def _bare_supervisor(tmp_path, slots: list[_PreparingSlot]):
    from service.config import Config
    from service.supervisor.process import Supervisor

    # take_over: no history store is opened; nothing is started or bound.
    sup = Supervisor(Config(control_socket=str(tmp_path / "control.sock"), take_over=True))
    sup.slots = slots  # type: ignore[assignment]
    return sup


async def _began(sup) -> None:
    """Until ``sup``'s reload has asked for the slots' locks: it reads the TLS and token files
    in a thread first, which a loaded host can stretch past any fixed sleep."""
    while sup.reload_state is None:
        await asyncio.sleep(0.005)


def test_a_reload_waits_only_for_the_write_under_way_to_each_slot(tmp_path):
    """Each slot's lock is asked for when the reload starts: a broadcast's write under way to
    one slot delays that slot's handoff only, not the others', and a write to any slot waits
    until the whole reload is over (the broadcast's later waves go to the new processes)."""

    async def go() -> None:
        busy, free = _PreparingSlot(prepare=0.1, index=0), _PreparingSlot(prepare=0.1, index=1)
        sup = _bare_supervisor(tmp_path, [busy, free])
        loop = asyncio.get_running_loop()
        written_at: dict[str, float] = {}

        async def write_under_way() -> None:  # a wave writing to ``busy`` for 0.6 s
            async with busy.lock:
                await asyncio.sleep(0.6)
                written_at["busy"] = loop.time()

        async def next_wave() -> None:  # the same broadcast's write to ``free``, asked later
            # Asked after the reload asked for them (a fixed sleep lost that race under load).
            await _began(sup)
            await asyncio.sleep(0.05)
            async with free.lock:
                written_at["free"] = loop.time()

        under_way = asyncio.create_task(write_under_way())
        later = asyncio.create_task(next_wave())
        await asyncio.sleep(0)  # it holds the busy slot's lock
        t0 = loop.time()
        answer = await sup.reload()
        ended = loop.time()
        await asyncio.gather(under_way, later)
        assert free.reloaded_at is not None and free.reloaded_at - t0 < 0.3, answer
        assert busy.reloaded_at is not None and busy.reloaded_at >= written_at["busy"]
        assert written_at["free"] >= ended  # after the reload, never during it
        # The reload's own clock starts after it read the TLS and token files (in a thread):
        # its figures are that much later than this test's t0.
        late = (ended - t0) - answer["seconds"]
        assert answer["prepare_s"] >= 0.1 and answer["locked_s"] < 1.0, answer
        assert answer["locked_s"] + late >= 0.6 - 0.002, (answer, late)  # rounded to ms
        assert answer["reloaded"] == 2 and ended - t0 < 1.2
        assert not busy.lock.locked() and not free.lock.locked()

    asyncio.run(go())


def test_a_reload_counts_and_names_the_workers_it_could_not_replace(tmp_path, caplog):
    """A slot that is not up (restarting after a crash) is skipped: the answer counts it apart
    from the reloaded and the failed ones, and the log says a worker was not replaced."""

    async def go() -> dict[str, object]:
        up, down = _PreparingSlot(0.01, index=0), _PreparingSlot(0.01, index=1, state="starting")
        return await _bare_supervisor(tmp_path, [up, down]).reload()

    with caplog.at_level(logging.INFO, logger="comet.supervisor"):
        answer = asyncio.run(go())
    assert (answer["reloaded"], answer["skipped"], answer["failed"]) == (1, 1, 0), answer
    assert answer["slots"][1]["skipped"] == "worker is starting", answer
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "1 of 2 workers not replaced (worker is starting)" in warned[0].message


def test_a_second_reload_while_one_runs_is_refused_as_a_conflict(tmp_path):
    """What POST /api/reload turns into a 409: the code, not the text, says it."""
    from service.contracts import ErrorCode
    from service.supervisor.control import RequestError

    async def go() -> None:
        sup = _bare_supervisor(tmp_path, [_PreparingSlot(prepare=0.3)])
        first = asyncio.create_task(sup.reload())
        await _began(sup)
        with pytest.raises(RequestError, match="a reload is under way already") as refused:
            await sup.reload()
        assert refused.value.code == ErrorCode.CONFLICT
        assert (await first)["reloaded"] == 1

    asyncio.run(go())


def test_a_reload_that_fails_or_is_cancelled_while_starting_leaves_every_slot_free(
    tmp_path,
):
    async def go() -> None:
        # The locks were free (so the reload took them at once) and a new process fails.
        slots = [_PreparingSlot(prepare=0.05), _PreparingSlot(prepare=0.05, fail=True)]
        sup = _bare_supervisor(tmp_path, slots)
        with pytest.raises(RuntimeError, match="cannot start"):
            await sup.reload()
        assert not any(s.lock.locked() for s in slots)
        # Cancelled while a write holds one slot's lock (the reload still queued for it).
        slots = [_PreparingSlot(prepare=0.05), _PreparingSlot(prepare=0.05)]
        sup = _bare_supervisor(tmp_path, slots)
        await slots[0].lock.acquire()
        reload = asyncio.create_task(sup.reload())
        await _began(sup)
        await asyncio.sleep(0.2)  # prepared; waiting for the first slot's lock
        assert slots[1].lock.locked()
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert not slots[1].lock.locked()
        slots[0].lock.release()
        async with asyncio.timeout(1.0):
            await slots[0].lock.acquire()  # nobody else holds it
        slots[0].lock.release()
        # Cancelled while starting, the locks taken at once: released.
        slots = [_PreparingSlot(prepare=5.0), _PreparingSlot(prepare=5.0)]
        sup = _bare_supervisor(tmp_path, slots)
        reload = asyncio.create_task(sup.reload())
        await _began(sup)
        await asyncio.sleep(0.1)
        assert all(s.lock.locked() for s in slots)
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert not any(s.lock.locked() for s in slots)
        assert not sup._reloading

    asyncio.run(go())


def test_a_frame_reads_each_worker_s_cpu_rss_and_limit_and_lets_go_of_one_that_ended() -> None:
    """The frame's per-worker figures come from one read of each process's /proc/PID/stat
    every frame: a process spinning shows most of a CPU, a sleeping one little; the RSS is
    the kernel's (psutil's); the descriptor limit is the process's own. No descriptor is kept
    for a worker (the reload tests count the supervisor's), and one that ended reads as
    nothing."""
    import subprocess
    import sys
    import time

    import psutil

    from service.supervisor.frames import FrameBuilder, WorkerView

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rest = subprocess.Popen(
        [sys.executable, "-c", "import resource, time; time.sleep(60)"],
        preexec_fn=lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_NOFILE, (1234, 1234)
        ),
    )
    try:
        frames = FrameBuilder(target_connections=10, node_id="n")

        def views() -> list[WorkerView]:
            return [
                WorkerView(index=i, pid=p.pid, state="up", stats=None)
                for i, p in enumerate((spin, rest))
            ]

        own_fds = len(os.listdir("/proc/self/fd"))
        time.sleep(0.3)  # both past their start-up (imports are CPU too)
        frames.build(views(), None)  # the first reading of each: no share yet
        time.sleep(1.0)
        frame = frames.build(views(), None)
        busy, idle = frame["workers"]
        assert busy["cpu_percent"] > 30, frame["workers"]
        assert idle["cpu_percent"] < 10, frame["workers"]
        for row in (busy, idle):
            real = psutil.Process(row["pid"]).memory_info().rss
            assert abs(row["rss_bytes"] - real) < max(real // 10, 1 << 20), (row, real)
        own = psutil.Process().rlimit(psutil.RLIMIT_NOFILE)[0]
        spin_limit = psutil.Process(spin.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        assert frame["system"]["fds"]["limit"] == own + spin_limit + 1234, frame["system"]
        assert len(os.listdir("/proc/self/fd")) == own_fds

        spin.kill()
        spin.wait()
        frame = frames.build(views(), None)  # still in its slot's view, gone from /proc
        assert frame["workers"][0]["rss_bytes"] == 0, frame["workers"]
        assert frame["workers"][0]["cpu_percent"] == 0, frame["workers"]
        assert frame["system"]["fds"]["limit"] == own + 1234, frame["system"]
        assert len(os.listdir("/proc/self/fd")) == own_fds
    finally:
        for p in (spin, rest):
            p.kill()
            p.wait()
