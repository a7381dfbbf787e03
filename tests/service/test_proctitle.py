"""What ps and top show: the supervisor and each worker by name, index, port and state."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import psutil

from tests.service.worker_harness import SubprocessWorker
from tests.support.net import wait_for
from tests.support.service import Service


def title(pid: int) -> str:
    """``ps -o args``: /proc/PID/cmdline (setproctitle writes one string, NUL-padded)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.replace(b"\0", b" ").decode().strip()


def comm(pid: int) -> str:
    """``ps -o comm`` and top's name column."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_supervisor_and_workers_are_named_and_keep_their_names_across_a_reload(tmp_path) -> None:
    svc = Service(tmp_path, "--workers", "2", "--ping-interval", "30")
    try:
        pids = svc.wait_up(2)["pids"]
        sup = svc.proc.pid
        assert comm(sup) == "comet-service"
        assert title(sup).startswith(f"comet-service: supervisor :{svc.port}, 2 workers [")
        assert "--workers 2" in title(sup)  # the flags it was started with, as ps showed them
        for i, pid in enumerate(pids):  # health lists the slots' pids by index
            wait_for(
                lambda pid=pid, i=i: title(pid) == f"comet-service: worker {i} :{svc.port}",
                10,
                f"worker {i}'s title",
            )
            assert comm(pid) == f"comet-worker {i}"

        assert svc.ask({"op": "reload"})["ok"] is True
        new = svc.wait_up(2)["pids"]
        assert not set(new) & set(pids)
        for i, pid in enumerate(new):
            wait_for(
                lambda pid=pid, i=i: title(pid) == f"comet-service: worker {i} :{svc.port}",
                10,
                f"new worker {i}'s title",
            )
            assert comm(pid) == f"comet-worker {i}"
    finally:
        svc.stop()


def test_a_worker_says_it_is_handing_over_and_takes_its_name_back_when_refused(
    short_dir,
) -> None:
    """The old side of a handoff is named so while it gives; a successor that refuses leaves it
    serving, and named as before."""
    w = SubprocessWorker(ping_interval=30.0)
    path = str(short_dir / "succ.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(1)
    got_listener = threading.Event()
    refuse = threading.Event()

    def successor() -> None:
        conn, _ = server.accept()
        with conn:
            data, fds, _f, _a = socket.recv_fds(conn, 1 << 16, 4)
            for fd in fds:
                socket.close(fd)
            assert json.loads(data).get("listener") is True
            got_listener.set()
            refuse.wait(20)
            conn.sendall(json.dumps({"ok": False, "error": "the test refuses"}).encode())

    t = threading.Thread(target=successor, daemon=True)
    try:
        pid = w.proc.pid
        assert comm(pid) == "comet-worker 3"
        assert title(pid) == f"comet-service: worker 3 :{w.port} (starting)"  # no init yet
        assert w.ask("init", last_id=0, history=[])["ok"] is True
        wait_for(lambda: title(pid) == f"comet-service: worker 3 :{w.port}", 10, "serving")
        t.start()
        rid = w.send({"op": "handoff", "to": path})
        assert got_listener.wait(10)
        wait_for(lambda: title(pid).endswith("(handing over)"), 10, "handing over")
        refuse.set()
        while (answer := w.read_line()).get("rid") != rid:
            pass
        assert answer["ok"] is True and answer["handed"] == 0, answer
        assert title(pid) == f"comet-service: worker 3 :{w.port}"
        assert psutil.Process(pid).is_running()
    finally:
        refuse.set()
        t.join(10)
        server.close()
        w.stop()


def test_a_password_on_the_command_line_is_masked_in_what_ps_shows(tmp_path) -> None:
    """`--bus redis://:PASSWORD@host` (COMET_BUS is the better place): the title replaces the
    command line that every user's ps reads, with the password masked."""
    from tests.support.net import free_port

    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens: the bus is down
    svc = Service(tmp_path, "--workers", "1", "--bus", url)
    try:
        pid = svc.proc.pid
        wait_for(lambda: title(pid).startswith("comet-service: supervisor"), 15, "the title")
        shown = title(pid)
        assert "s3cret-pw" not in shown, shown
        assert "--bus redis://:***@127.0.0.1:" in shown, shown
    finally:
        svc.stop()
