"""A test double of the supervisor's control socket: a real asyncio Unix-socket server speaking
the contract of docs/architecture.md ("Control socket"), run on its own loop in a thread so that
synchronous tests can drive it.

Its numbers are settable (``conns``, ``channels``) so tests can watch them change through the
sidecar, and it records every broadcast, so a broadcast sent through the sidecar is observable.
``stop()`` drops every connection and removes the socket like a dying supervisor; ``start()``
again is a restart on the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class FakeControl:
    def __init__(self, path: Path | str, workers: int = 2, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.conns = [0] * workers
        self.channels: dict[str, int] = {"default": 0}
        self.broadcasts: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        # answer every request {"ok": false, "code": fail_code, "error": fail_with}
        self.fail_with: str | None = None
        self.fail_code = "bad_request"
        self.hang_ops: set[str] = set()  # ops never answered (a wedged supervisor)
        self.reload_answer: dict[str, Any] = {
            "ok": True,
            "workers": 2,
            "reloaded": 2,
            "skipped": 0,
            "handed": 7,
            "kept": 0,
            "failed": 0,
            "reconnecting": 0,
            "seconds": 0.4,
            "slots": [],
        }
        self.next_id = 1
        self.step = 0
        self.accepted_total = 0
        self.msgs_sent_total = 0
        self.started_at = time.time()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- control from the test thread ---------------------------------------------------------
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> FakeControl:
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def set_conns(self, *per_worker: int) -> None:
        grown = sum(per_worker) - sum(self.conns)
        if grown > 0:
            self.accepted_total += grown
        self.conns = list(per_worker)
        self.channels["default"] = sum(per_worker)

    @property
    def watchers(self) -> int:
        return sum(1 for t in self._tasks if t.get_name() == "watch" and not t.done())

    # ---- the contract -------------------------------------------------------------------------
    def frame(self) -> dict[str, Any]:
        self.step += 1
        workers = [
            {
                "pid": 40000 + i,
                "index": i,
                "conns": n,
                "rss_bytes": 30_000_000 + n * 3_000,
                "cpu_percent": 1.5 + i,
                "lag_ms": {"avg": 0.4 + i, "p90": 0.9 + i, "max": 2.5 + i},
                "msgs_sent_total": self.msgs_sent_total // max(1, len(self.conns)),
            }
            for i, n in enumerate(self.conns)
        ]
        total = sum(self.conns)
        return {
            "t": time.time(),
            "step": self.step,
            "uptime_s": round(time.time() - self.started_at, 3),
            "target_connections": 30000,
            "node_id": "fake-node",
            "frame_ms": 1.25,
            "totals": {
                "conns": total,
                "accepted_total": self.accepted_total,
                "closed_total": self.accepted_total - total,
                "rejected_total": 0,
                "slow_dropped_total": 0,
                "msgs_sent_total": self.msgs_sent_total,
                "bytes_sent_total": self.msgs_sent_total * 12,
                "rss_bytes": sum(w["rss_bytes"] for w in workers) + 25_000_000,
                "cpu_percent": sum(w["cpu_percent"] for w in workers),
                "lag_ms": {"avg": 0.5, "p90": 1.0, "max": 3.5},
                "lag_hist": [900, 90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
            },
            "system": {
                "cpu": {"user": 12.5, "sys": 7.5, "idle": 80.0, "iowait": 0.0},
                "mem": {"total": 24 * 2**30, "used": 3 * 2**30, "cached": 2**30},
                "sockstat": {"tcp_inuse": total + 5, "tcp_mem_pages": 120, "tcp_tw": 3},
                "fds": {"open": total + 40, "limit": 20000},
                "limits": {
                    "nofile": 20000,
                    "file_max": 2466170,
                    "conntrack_max": 262144,
                    "port_range": [32768, 60999],
                },
            },
            "workers": workers,
        }

    def answer(self, request: Any) -> dict[str, Any]:
        if self.fail_with is not None:
            return {"ok": False, "code": self.fail_code, "error": self.fail_with}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        op = request.get("op")
        if op == "stats":
            return {"ok": True, "frame": self.frame()}
        if op == "channels":
            return {"ok": True, "channels": dict(self.channels)}
        if op == "health":
            return {
                "ok": True,
                "workers": len(self.conns),
                "uptime_s": time.time() - self.started_at,
            }
        if op == "broadcast":
            if not isinstance(request.get("data"), str):
                return {"ok": False, "error": "broadcast: data must be a string"}
            channel = request.get("channel")
            recipients = sum(self.conns) if channel is None else self.channels.get(channel, 0)
            message = {
                "id": self.next_id,
                "channel": channel,
                "event": request.get("event"),
                "data": request["data"],
                "ts": time.time(),
            }
            self.next_id += 1
            self.msgs_sent_total += recipients
            self.broadcasts.append(message)
            return {"ok": True, "id": message["id"], "recipients": recipients}
        if op == "reload":
            return dict(self.reload_answer)
        return {"ok": False, "error": f"unknown op {op!r}"}

    # ---- server internals (on the fake's loop) ------------------------------------------------
    async def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o660)

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._writers):
            writer.close()
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError:
                    writer.write(b'{"ok":false,"error":"bad JSON"}\n')
                    continue
                self.requests.append(request)
                if isinstance(request, dict) and request.get("op") == "watch":
                    task = asyncio.current_task()
                    assert task is not None
                    task.set_name("watch")
                    await self._watch(writer)
                    return
                if isinstance(request, dict) and request.get("op") in self.hang_ops:
                    await reader.read()  # say nothing until the client gives up and closes
                    return
                writer.write(json.dumps(self.answer(request)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _watch(self, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                writer.write(json.dumps({"ok": True, "frame": self.frame()}).encode() + b"\n")
                await writer.drain()
                await asyncio.sleep(self.interval)
        finally:
            self._tasks.discard(task)


if __name__ == "__main__":  # a stand-alone fake for poking at the dashboard by hand
    import sys

    fake = FakeControl(sys.argv[1] if len(sys.argv) > 1 else "/tmp/comet-fake.sock").start()
    print(f"fake control socket on {fake.path}; Ctrl-C to stop", flush=True)
    try:
        n = 0
        while True:
            time.sleep(1)
            n = (n + 37) % 500
            fake.set_conns(n, n // 2)
    except KeyboardInterrupt:
        fake.close()
