"""Asyncio client for the supervisor's control socket (docs/architecture.md, "Control socket").

Two kinds of traffic, kept apart on purpose:

* one-shot requests (``stats``, ``channels``, ``health``, ``broadcast``) open a fresh connection,
  write one JSON line, read one line and close. A Unix connect costs microseconds, and a fresh
  connection per request means a service restart can never leave a stale pooled socket behind, nor
  can a slow broadcast hold up a stats read queued behind it.
* one shared ``watch`` connection (:class:`FrameWatcher`) feeds every SSE viewer and dashboard tab,
  so a hundred open dashboards cost the supervisor one stream, not a hundred. It reconnects on its
  own, with a capped backoff, when the service restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.contracts import ErrorCode

log = logging.getLogger("comet.admin.control")

# Answers can be much larger than requests (a channel map of a busy node); the contract caps
# requests at 1 MiB, we accept answers up to this before calling the line broken.
ANSWER_LIMIT = 64 * 1024 * 1024


class ControlError(Exception):
    """Base class: something went wrong talking to the service."""


class ServiceUnavailable(ControlError):
    """The control socket cannot be reached, or dropped the connection."""

    def __init__(self, socket_path: Path | str, reason: str) -> None:
        self.socket_path = str(socket_path)
        self.reason = reason
        super().__init__(f"comet service unreachable at control socket {socket_path}: {reason}")


class ServiceTimeout(ControlError):
    """The service accepted the request but did not answer in time."""

    def __init__(self, socket_path: Path | str, op: str, timeout: float) -> None:
        self.socket_path = str(socket_path)
        super().__init__(
            f"comet service at control socket {socket_path} did not answer {op!r} "
            f"within {timeout:g} s"
        )


class ServiceRefused(ControlError):
    """The service answered ``{"ok": false, "error": ...}`` (or something unreadable)."""


class ServiceConflict(ControlError):
    """The service's state forbids it now (a reload or handover under way; files a reload's new
    workers could not load): 409."""


class ServiceBusy(ControlError):
    """The service answered but cannot do it now (it is stopping, or has no frame yet): 503."""


class BusUnavailable(ServiceBusy):
    """The service is up but its multi-node bus (Redis) is not: ``bus unavailable: ...``."""


# The ``code`` of a refusal (service.contracts.ErrorCode) that is not the sidecar's own mistake:
# its exception, and so its status (409 a state that forbids it now, 503 one a retry may cure).
_UNAVAILABLE: dict[Any, type[ControlError]] = {
    ErrorCode.CONFLICT: ServiceConflict,
    ErrorCode.BUS_UNAVAILABLE: BusUnavailable,
    ErrorCode.STOPPING: ServiceBusy,
    ErrorCode.NOT_READY: ServiceBusy,
}


def describe_os_error(exc: BaseException) -> str:
    """A one-line reason an operator can act on, instead of an errno dump."""
    if isinstance(exc, FileNotFoundError):
        return "no such socket (is comet-service running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (stale socket file: the service is not running)"
    if isinstance(exc, PermissionError):
        return "permission denied (the sidecar needs group access to the 0660 socket)"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection reset by the service"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _decode_answer(line: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError:
        raise ServiceRefused("the service sent a line that is not JSON") from None
    if not isinstance(answer, dict):
        raise ServiceRefused("the service sent a JSON value that is not an object")
    if answer.get("ok") is not True:
        error = str(answer.get("error") or "the service refused the request")
        raise _UNAVAILABLE.get(answer.get("code"), ServiceRefused)(error)
    return answer


class ControlClient:
    """One-shot requests over fresh connections; every failure becomes a :class:`ControlError`."""

    def __init__(self, socket_path: Path | str, timeout: float = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    async def request(
        self, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        limit = self.timeout if timeout is None else timeout
        op = str(payload.get("op"))
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_unix_connection(
                    str(self.socket_path), limit=ANSWER_LIMIT
                )
        except TimeoutError:
            raise ServiceUnavailable(self.socket_path, "connect timed out") from None
        except OSError as exc:
            raise ServiceUnavailable(self.socket_path, describe_os_error(exc)) from None
        try:
            writer.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(limit):
                line = await reader.readline()
        except TimeoutError:
            raise ServiceTimeout(self.socket_path, op, limit) from None
        except OSError as exc:
            raise ServiceUnavailable(self.socket_path, describe_os_error(exc)) from None
        except ValueError:  # asyncio's LimitOverrunError surfaces from readline() as ValueError
            raise ServiceRefused(f"the answer to {op!r} is over {ANSWER_LIMIT} bytes") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not line.endswith(b"\n"):
            raise ServiceUnavailable(self.socket_path, f"connection closed before answering {op!r}")
        return _decode_answer(line)

    async def stats(self) -> dict[str, Any]:
        frame = (await self.request({"op": "stats"})).get("frame")
        if not isinstance(frame, dict):
            raise ServiceRefused("the stats answer has no frame (the service has not sampled yet)")
        return frame

    async def channels(self) -> dict[str, int]:
        channels = (await self.request({"op": "channels"})).get("channels")
        if not isinstance(channels, dict):
            raise ServiceRefused("the channels answer has no channel map")
        return {str(name): int(count) for name, count in channels.items()}

    async def health(self) -> dict[str, Any]:
        return await self.request({"op": "health"})

    async def cluster(self) -> dict[str, Any]:
        cluster = (await self.request({"op": "cluster"})).get("cluster")
        if not isinstance(cluster, dict):
            raise ServiceRefused("the cluster answer has no cluster view")
        return cluster

    async def broadcast(
        self, data: str, channel: str | None, event: str | None, timeout: float
    ) -> tuple[int, int]:
        answer = await self.request(
            {"op": "broadcast", "data": data, "channel": channel, "event": event}, timeout
        )
        try:
            return int(answer["id"]), int(answer["recipients"])
        except (KeyError, TypeError, ValueError):
            raise ServiceRefused("the broadcast answer lacks an id or a recipient count") from None

    async def reload(self, timeout: float) -> dict[str, Any]:
        """Every worker replaced, its connections handed over (``reload``): the answer."""
        answer = await self.request({"op": "reload"}, timeout)
        answer.pop("ok", None)
        return answer


@dataclass(frozen=True, slots=True)
class WatchState:
    """What a viewer sees: the newest frame, or why there is none right now."""

    version: int
    connected: bool
    frame: dict[str, Any] | None
    error: str | None
    frame_at: float  # monotonic time the frame arrived, 0 if never


class FrameWatcher:
    """The shared ``watch`` connection. Started by the first viewer, stopped with the app."""

    def __init__(
        self,
        socket_path: Path | str,
        *,
        stale_after: float = 5.0,
        backoff_min: float = 0.2,
        backoff_max: float = 2.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        # A supervisor that stops sending frames is as good as gone: reconnect after this long.
        self.stale_after = stale_after
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._state = WatchState(0, False, None, None, 0.0)
        self._changed: asyncio.Event | None = None
        self._attempted: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def state(self) -> WatchState:
        return self._state

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._changed = asyncio.Event()
            self._attempted = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="comet-admin-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Wake viewers still waiting so they can notice the shutdown.
        self._publish(connected=False, frame=self._state.frame, error="admin sidecar stopping")

    def close_viewers(self) -> None:
        """End every viewer's ``updates()`` (the server is shutting down): an SSE stream never
        ends by itself and would otherwise hold the shutdown for the whole grace period."""
        self._closing = True
        self._publish(connected=False, frame=self._state.frame, error="admin sidecar stopping")

    async def ready(self, timeout: float) -> WatchState:
        """Start if needed and wait until the first connect attempt has an outcome."""
        self.start()
        assert self._attempted is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._attempted.wait()
        return self._state

    async def updates(self, keepalive: float) -> AsyncIterator[WatchState | None]:
        """Yield each new state as it comes (frames a slow viewer missed are skipped, never queued);
        ``None`` after ``keepalive`` seconds without news, so a stream can send a comment."""
        self.start()
        seen = -1
        while not self._closing:
            state = self._state
            if state.version != seen:
                seen = state.version
                yield state
                continue
            assert self._changed is not None
            try:
                async with asyncio.timeout(keepalive):
                    await self._changed.wait()
            except TimeoutError:
                yield None

    # ---- internals ----------------------------------------------------------------------------
    def _publish(self, *, connected: bool, frame: dict[str, Any] | None, error: str | None) -> None:
        old = self._state
        self._state = WatchState(
            old.version + 1,
            connected,
            frame,
            error,
            time.monotonic() if frame is not None and frame is not old.frame else old.frame_at,
        )
        if self._attempted is not None:
            self._attempted.set()
        # Swap the event before setting the old one, so viewers woken now wait on the fresh one.
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()

    def _went_down(self, reason: str) -> None:
        if self._state.connected or self._state.error != reason:
            log.warning("watch on %s lost: %s (reconnecting)", self.socket_path, reason)
            self._publish(connected=False, frame=self._state.frame, error=reason)

    async def _run(self) -> None:
        delay = self.backoff_min
        while True:
            try:
                await self._watch_once()
            except ControlError as exc:
                if self._state.connected:
                    delay = self.backoff_min  # it worked until now (a restart?): retry soon
                reason = exc.reason if isinstance(exc, ServiceUnavailable) else str(exc)
                self._went_down(reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _watch_once(self) -> None:
        try:
            async with asyncio.timeout(self.stale_after):
                reader, writer = await asyncio.open_unix_connection(
                    str(self.socket_path), limit=ANSWER_LIMIT
                )
        except TimeoutError:
            raise ServiceUnavailable(self.socket_path, "connect timed out") from None
        except OSError as exc:
            raise ServiceUnavailable(self.socket_path, describe_os_error(exc)) from None
        try:
            writer.write(b'{"op":"watch"}\n')
            await writer.drain()
            while True:
                try:
                    async with asyncio.timeout(self.stale_after):
                        line = await reader.readline()
                except TimeoutError:
                    raise ServiceTimeout(self.socket_path, "watch", self.stale_after) from None
                if not line.endswith(b"\n"):
                    raise ServiceUnavailable(self.socket_path, "the service closed the connection")
                frame = _decode_answer(line).get("frame")
                if not isinstance(frame, dict):
                    raise ServiceRefused("a watch line has no frame")
                if not self._state.connected:
                    log.info("watching frames on %s", self.socket_path)
                self._publish(connected=True, frame=frame, error=None)
        except OSError as exc:
            raise ServiceUnavailable(self.socket_path, describe_os_error(exc)) from None
        except ValueError:
            raise ServiceRefused(f"a watch line is over {ANSWER_LIMIT} bytes") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
