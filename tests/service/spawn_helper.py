"""Processes for tests/service/test_spawn.py, run with ``python -m tests.service.spawn_helper``.

``forkserver --report-fd N``: the real forkserver (service/worker/forkserver.py) with a stand-in
worker: each child writes what it sees (pid, session, environment, a random number, its open
descriptors) as one JSON line to its control socket, waits until the other end closes it, and
exits with ``T_EXIT`` from its environment.

``drive MODE``: a supervisor's Spawner (which makes this process a child subreaper, hence a
process of its own, not the test's) started on that forkserver; prints one JSON line of what
happened. MODE: ``batch`` (three workers asked in one loop turn, then their exit codes),
``broken`` (a forkserver that cannot start), ``cancel`` (the asker cancelled while its worker
is being forked).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any


def fake_worker(argv: list[str]) -> None:
    fd = int(argv[argv.index("--control-fd") + 1])
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            held[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    seen = {
        "argv": argv,
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "index": os.environ.get("COMET_WORKER_INDEX"),
        "random": random.random(),
        "stdin": os.readlink("/proc/self/fd/0"),
        "held": {k: v for k, v in held.items() if k not in ("0", "1", "2")},
        "fd": fd,
    }
    with socket.socket(fileno=fd) as ctl:
        ctl.sendall(json.dumps(seen).encode() + b"\n")
        while ctl.recv(1024):
            pass
    code = int(os.environ.get("T_EXIT", "0"))
    if code:
        raise SystemExit(code)


def forkserver(argv: list[str]) -> int:
    from service.worker import forkserver as real

    real.process.main = fake_worker  # type: ignore[assignment]
    time.sleep(float(os.environ.get("T_FORK_DELAY", "0")))  # an import that takes a while
    return real.main(argv)


def _read_line(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the worker closed its control socket without a line")
        data += chunk
    return dict(json.loads(data))


async def drive(mode: str) -> dict[str, Any]:
    from service.supervisor import spawn

    popens: list[list[str]] = []
    real_popen = subprocess.Popen

    def counting(args: list[str], *a: Any, **kw: Any) -> Any:
        popens.append([str(x) for x in args])
        return real_popen(args, *a, **kw)

    spawn.subprocess.Popen = counting  # type: ignore[misc,assignment]
    spawner = spawn.Spawner()
    spawner.command = [sys.executable, "-m", "tests.service.spawn_helper", "forkserver"]
    if mode == "broken":
        spawner.command = [sys.executable, "-m", "tests.service.no_such_module"]
    out: dict[str, Any] = {"mode": mode}
    pairs = [socket.socketpair() for _ in range(3)]
    envs = [{"COMET_WORKER_INDEX": str(i), "T_EXIT": str(i + 3)} for i in range(3)]
    if mode == "cancel":
        os.environ["T_FORK_DELAY"] = "0.5"  # the forkserver's, inherited
        task = asyncio.create_task(spawner.spawn(pairs[0][1].fileno(), envs[0]))
        await asyncio.sleep(0.1)  # the batch has started: its forkserver is importing
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            out["cancelled"] = True
        pairs[0][1].close()
        # The forkserver still forks it; the Spawner kills and reaps what nobody asked for now.
        for _ in range(200):
            await asyncio.sleep(0.05)
            kids = _children()
            if not spawner._batches and not kids:
                break
        out["children_left"] = _children()
        out["popens"] = popens
        return out
    procs = await asyncio.gather(
        *(spawner.spawn(b.fileno(), env) for (_, b), env in zip(pairs, envs, strict=True))
    )
    for _, b in pairs:
        b.close()
    out["popens"] = popens
    out["started"] = [p is not None for p in procs]
    if mode == "broken":
        out["children_left"] = _children()
        return out
    seen = [_read_line(a) for a, _ in pairs]
    out["seen"] = seen
    out["ppids"] = [_ppid(p.pid) for p in procs if p is not None]
    out["me"] = os.getpid()
    out["pids"] = [p.pid for p in procs if p is not None]
    out["alive_before_close"] = [p.poll() for p in procs if p is not None]
    for a, _ in pairs:
        a.close()
    out["codes"] = [p.wait() for p in procs if p is not None]
    out["children_left"] = _children()
    return out


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children() -> list[int]:
    """This process's children, zombies included (from /proc/*/stat)."""
    me = os.getpid()
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if _ppid(int(name)) == me:
                    kids.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


if __name__ == "__main__":
    if sys.argv[1] == "forkserver":
        sys.exit(forkserver(sys.argv[2:]))
    print(json.dumps(asyncio.run(drive(sys.argv[2]))), flush=True)
