"""The control server's close: a broadcast already under way is answered before the connection
is cut (its publisher must not think it lost), and a request that comes after is refused."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from service.supervisor.control import ControlServer


class SlowBackend:
    """A broadcast that takes a while, as one does while the workers drain."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ids = 0

    def latest_frame(self) -> dict[str, Any] | None:
        return None

    async def broadcast(self, data: str, channel: str | None, event: str | None) -> dict[str, Any]:
        self.ids += 1
        mine = self.ids
        self.started.set()
        await asyncio.sleep(0.3)
        return {"id": mine, "recipients": 0}

    async def channels(self) -> dict[str, int]:
        return {}

    async def cluster(self) -> dict[str, Any]:
        return {}

    def health(self) -> dict[str, Any]:
        return {}


def test_close_answers_what_is_under_way_and_refuses_the_rest(short_dir: Path) -> None:
    async def main() -> None:
        path = str(short_dir / "c.sock")
        backend = SlowBackend()
        server = ControlServer(path, backend, 1024)
        await server.start()
        lone_r, lone_w = await asyncio.open_unix_connection(path)  # one request: inline
        piped_r, piped_w = await asyncio.open_unix_connection(path)  # three: tasks
        line = b'{"op":"broadcast","data":"x"}\n'
        lone_w.write(line)
        piped_w.write(line * 3)
        await backend.started.wait()
        closing = asyncio.create_task(server.close())
        await asyncio.sleep(0.05)
        answers = [json.loads(await lone_r.readline())]
        answers += [json.loads(await piped_r.readline()) for _ in range(3)]
        await closing
        assert all(a["ok"] for a in answers), answers
        assert sorted(a["id"] for a in answers) == [1, 2, 3, 4]
        for w in (lone_w, piped_w):
            w.close()
            await w.wait_closed()

    asyncio.run(main())


def test_the_test_client_closes_its_socket_when_the_service_went_away_mid_line() -> None:
    """The race behind a flaky restart test: the publisher's line was still buffered when the
    service stopped, so flushing it at close raised and the socket was left for GC to find
    (a ResourceWarning, an error under this suite's filterwarnings)."""
    import gc
    import socket

    from tests.support.control import Control

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "c.sock")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen()
            client = Control(path, timeout=5)
            peer, _ = server.accept()
            peer.close()
            client.file.write(b"x" * 10)
            try:
                client.file.flush()
                time.sleep(0.05)
                client.file.write(b"y")
                client.file.flush()
            except OSError:
                pass  # broken pipe: "y" or both lines are still in the buffer
            client.file.write(b"z")  # whatever happened above, a line is buffered now
            try:
                client.close()
            except OSError:
                pass  # the flush at close fails: the service is gone
            assert client.sock.fileno() == -1
            del client
            gc.collect()
