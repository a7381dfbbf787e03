"""The sidecar's shared ``watch`` connection stops when asked, whatever the frames are doing.

Under Python 3.11 ``asyncio.wait_for`` returned the line it had just read instead of raising a
cancellation that arrived in the same loop turn; the watcher then read on forever, the app's
shutdown waited for it, and the sidecar's uvicorn thread in the tests outlived pytest's summary
(CI hung there until its 90-minute limit). A control socket that sends frames back to back makes
that turn the common case: against the old code every stop below hung.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from admin_api.control import FrameWatcher

FRAME = b'{"ok":true,"frame":{"step":1,"totals":{"conns":0}}}\n'
STOPS = 50


class FloodingControl:
    """A control socket that answers ``watch`` with frames as fast as the reader takes them."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.ended = 0  # watch connections the watcher closed

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readline()
        try:
            while True:
                writer.write(FRAME * 4)
                await writer.drain()
                await asyncio.sleep(0)
        except ConnectionError:
            self.ended += 1


async def stop_while_flooded(path: Path) -> str | None:
    """Start and stop a watcher ``STOPS`` times; what went wrong, or None."""
    control = FloodingControl()
    server = await asyncio.start_unix_server(control.handle, str(path))
    try:
        for i in range(STOPS):
            watcher = FrameWatcher(path)
            state = await watcher.ready(5.0)
            if not state.connected:
                return f"the watcher did not connect: {state.error}"
            # Land the stop at a different point of the reading each time.
            for _ in range(i % 7):
                await asyncio.sleep(0)
            task = watcher._task
            # Waited for without cancelling it, so that a stop that hangs fails here, in 2 s.
            stopping = asyncio.ensure_future(watcher.stop())
            await asyncio.wait({stopping}, timeout=2.0)
            if not stopping.done() or task is None or not task.done():
                return f"stop() still waiting after 2 s (stop {i + 1} of {STOPS})"
            if watcher.state.connected or watcher.state.error != "admin sidecar stopping":
                return f"after stop {i + 1}: {watcher.state}"
        # Every watch connection was closed by the watcher's stop, none left open.
        for _ in range(500):
            if control.ended == STOPS:
                return None
            await asyncio.sleep(0.01)
        return f"{STOPS - control.ended} of {STOPS} watch connections still open"
    finally:
        server.close()
        for writer in control.writers:
            writer.transport.abort()


def test_stop_ends_the_watch_while_frames_arrive_back_to_back(short_dir: Path) -> None:
    # Not asyncio.run(): on a failure it would wait for the watcher that refused to stop.
    loop = asyncio.new_event_loop()
    try:
        problem = loop.run_until_complete(stop_while_flooded(short_dir / "control.sock"))
    finally:
        loop.close()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
