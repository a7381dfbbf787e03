"""Several nodes, one sequence: ``RedisBus`` keeps ids, history, delivery and the cluster view in
Redis (``--bus redis://...``); see its docstring for the Redis layout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.bus import BusUnavailable, LimitsHandler, RemoteHandler, SeedHandler
from service.bus.cluster import cluster_view, node_summary
from service.bus.history import History
from service.bus.store import clock_floor
from service.contracts import Frame, Msg

log = logging.getLogger("comet.bus")

# KEYS: seq, feed, history stream of the message's channel, set of channels with history, epoch.
# ARGV: message JSON without its id, feed length, history length, history TTL ms, channel or "",
# the epoch this node follows. One script, so numbering and appending are atomic: the feed holds
# messages in id order even when several nodes publish at the same instant, and every node
# delivers in that order. A Redis that lost its data since this node last connected (another
# epoch, or none) refuses: its sequence may start below the ids this node's clients hold.
PUBLISH_LUA = """
if redis.call('GET', KEYS[5]) ~= ARGV[6] then return redis.error_reply('EPOCH changed') end
local id = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'id', id, 'm', ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'id', id, 'm', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
if ARGV[5] ~= '' then redis.call('SADD', KEYS[4], ARGV[5]) end
return id
"""

# KEYS: seq. ARGV: an id this node has seen. A Redis that restarted without its data would hand
# out ids from 1 again, which every worker's history would take for old ones.
RAISE_SEQ_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local want = tonumber(ARGV[1])
if cur < want then redis.call('SET', KEYS[1], want) end
return cur
"""

# KEYS: epoch, seq. ARGV: a new epoch value "<random hex>:<floor>", the floor. A Redis without an
# epoch key is new or lost its data (restarted without persistence, flushed): the epoch is set and
# the sequence raised to the clock floor in one step, so no node can number below it in between.
# Answers {1 if this call set it, the epoch now, the sequence before}.
EPOCH_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
  if cur < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) end
  return {1, ARGV[1], cur}
end
return {0, redis.call('GET', KEYS[1]), 0}
"""

# KEYS: the channel set. ARGV: the history-stream prefix, then channel names whose stream looked
# empty. Checked again here, atomically: a publish in between would have re-created the stream.
FORGET_CHANNELS_LUA = """
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""

FEED_MAXLEN = 10_000  # messages a node may fall behind (or be cut off) and still catch up
READ_BLOCK_MS = 1000
READ_COUNT = 100
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
STILL_DOWN_LOG_EVERY = 30.0  # while Redis is down, one reminder this often, not one per retry
START_WAIT = 5.0  # how long start() waits for Redis so the first workers get the history


def redact(url: str) -> str:
    """The URL without its password, fit for logs, frames and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


class RedisBus:
    """Several nodes, one sequence: ids, history, delivery and the cluster view live in Redis.

    Keys (prefix ``comet:``): ``seq`` (INCR, the id sequence); ``feed`` (a stream of every
    message, MAXLEN ~ FEED_MAXLEN, which every node follows with XREAD); ``hist:all`` and
    ``hist:c:<channel>`` (streams, MAXLEN ~ history_size, expiring after history_max_age when
    idle: the history a starting node seeds from); ``channels`` (the set of channel names with a
    history stream); ``node:<node_id>`` (the node's latest frame summary, expiring after node_ttl).

    One task follows the feed from the last entry this node delivered, so each message reaches
    each node exactly once and in id order; after an outage it resumes from the same entry.
    While Redis is unreachable the node goes on serving its connections, ``publish`` and
    ``cluster`` raise BusUnavailable, the frame says ``up: false``, and the task reconnects with
    a capped backoff.
    """

    kind = "redis"
    delivers_own = True

    def __init__(
        self,
        url: str,
        history_size: int,
        history_max_age: float,
        node_id: str,
        node_ttl: float,
        prefix: str = "comet:",
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = redact(url)
        self.node_id = node_id
        self.history_size = history_size
        self.history_max_age = history_max_age
        self.node_ttl_ms = max(1000, int(node_ttl * 1000))
        # No silent retries: a publish whose answer was lost may have happened, and sending it
        # again would number the same message twice. Reconnecting is the follower's job.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=READ_BLOCK_MS / 1000 + 3.0,
            retry=Retry(NoBackoff(), 0),
        )
        self._publish_script = self._redis.register_script(PUBLISH_LUA)
        self._raise_seq_script = self._redis.register_script(RAISE_SEQ_LUA)
        self._epoch_script = self._redis.register_script(EPOCH_LUA)
        self._forget_script = self._redis.register_script(FORGET_CHANNELS_LUA)
        self.k_seq = prefix + "seq"
        self.k_feed = prefix + "feed"
        self.k_all = prefix + "hist:all"
        self.k_chan = prefix + "hist:c:"
        self.k_channels = prefix + "channels"
        self.k_node = prefix + "node:"
        # A Redis that lost its data (restarted without persistence, flushed) has no epoch key.
        self.k_epoch = prefix + "epoch"
        self._epoch: str | None = None  # the epoch this node follows (None before first contact)
        self._hole: tuple[int, int] | None = None  # ids a resume cannot be honoured for
        self._history = History(history_size, history_max_age)
        self._last_id = 0  # the last id read from the feed (or seeded)
        self._delivered_id = 0  # the last id handed to this node's workers (or seeded)
        self._pos = "0-0"  # the feed entry of the last message delivered here
        self._seeded = False
        self._up = False
        self._error = "not connected yet"
        self._ever_up = False
        self._down_since = time.time()
        # start() reports the first failure itself; reminders follow every STILL_DOWN_LOG_EVERY.
        self._down_logged = self._down_since
        self._reconnects = 0
        self._missed = 0
        self._on_remote: RemoteHandler | None = None
        self._on_seeded: SeedHandler | None = None
        self._on_limits: LimitsHandler | None = None
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self._attempted: asyncio.Event | None = None
        self._frame_task: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(
        self,
        on_remote: RemoteHandler,
        on_seeded: SeedHandler | None = None,
        on_limits: LimitsHandler | None = None,
    ) -> None:
        self._on_remote = on_remote
        self._on_seeded = on_seeded
        self._on_limits = on_limits
        self._attempted = asyncio.Event()
        self._task = asyncio.create_task(self._follow_forever(), name="redis-bus")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self._attempted.wait()
        self._started = True
        if not self._up:
            log.error(
                "bus: Redis at %s is unreachable (%s); serving without it, retrying",
                self.url,
                self._error,
            )

    async def close(self) -> None:
        for task in (self._task, self._frame_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._up:
            # Leave the cluster view now rather than when the TTL runs out.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._redis.delete(self.k_node + self.node_id)
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    # ---- Bus ------------------------------------------------------------------------------------
    @property
    def last_id(self) -> int:
        return self._delivered_id

    def history(self) -> list[Msg]:
        return self._history.snapshot()

    def resume_limits(self) -> dict[str, Any]:
        return {} if self._hole is None else {"hole": list(self._hole)}

    async def committed(self) -> None:
        return None  # publish() returns once Redis has the message

    def delivered(self, msg: Msg) -> None:
        self._history.add(msg)
        self._delivered_id = max(self._delivered_id, msg["id"])

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "redis",
            "up": self._up,
            "url": self.url,
            "last_id": self._last_id,
            "reconnects": self._reconnects,
            "missed_total": self._missed,
        }
        if not self._up:
            out["error"] = self._error
            out["down_s"] = round(time.time() - self._down_since, 1)
        return out

    async def publish(self, data: str, channel: str | None, event: str | None) -> Msg:
        from redis.exceptions import RedisError, ResponseError

        if not self._up:
            raise BusUnavailable(f"Redis at {self.url} is down ({self._error})")
        ts = time.time()
        body = json.dumps(
            {"channel": channel, "event": event, "data": data, "ts": ts}, separators=(",", ":")
        )
        hist = self.k_all if channel is None else self.k_chan + channel
        try:
            raw = await self._publish_script(
                keys=[self.k_seq, self.k_feed, hist, self.k_channels, self.k_epoch],
                args=[
                    body,
                    FEED_MAXLEN,
                    self.history_size,
                    int(self.history_max_age * 1000),
                    channel or "",
                    self._epoch or "",
                ],
            )
        except ResponseError as exc:
            if "EPOCH" not in str(exc):
                raise BusUnavailable(f"Redis at {self.url}: {_describe(exc)}") from None
            # Nothing was numbered. The follower notices within a read and catches up.
            raise BusUnavailable(
                f"Redis at {self.url} lost its data (restarted without persistence, or "
                "flushed); this node is catching up, try again in a moment"
            ) from None
        except (RedisError, OSError) as exc:
            # The follower notices the outage on its own connection and reconnects.
            raise BusUnavailable(f"Redis at {self.url}: {_describe(exc)}") from None
        return {"id": int(raw), "channel": channel, "event": event, "data": data, "ts": ts}

    async def publish_frame(self, frame: Frame) -> None:
        """Start writing this node's summary (with its TTL) unless the last write still runs."""
        if not self._up or (self._frame_task is not None and not self._frame_task.done()):
            return
        self._frame_task = asyncio.create_task(self._write_frame(frame))

    async def _write_frame(self, frame: Frame) -> None:
        from redis.exceptions import RedisError

        body = json.dumps(node_summary(frame), separators=(",", ":"))
        try:
            await self._redis.set(self.k_node + self.node_id, body, px=self.node_ttl_ms)
        except (RedisError, OSError) as exc:
            log.debug("bus: frame not published: %s", _describe(exc))

    async def cluster(self, own: Frame | None) -> dict[str, Any]:
        from redis.exceptions import RedisError

        if not self._up:
            raise BusUnavailable(f"Redis at {self.url} is down ({self._error})")
        try:
            keys = [k async for k in self._redis.scan_iter(match=self.k_node + "*", count=500)]
            values = await self._redis.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"Redis at {self.url}: {_describe(exc)}") from None
        nodes: dict[str, dict[str, Any]] = {}
        for raw in values:
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                node = json.loads(raw)
            except ValueError:
                continue
            if isinstance(node, dict):
                nodes[str(node.get("node_id"))] = node
        if own is not None:
            # Our own numbers fresh from this second rather than as last written.
            nodes[self.node_id] = node_summary(own)
        return cluster_view(list(nodes.values()), time.time(), "redis")

    # ---- following the feed ---------------------------------------------------------------------
    async def _follow_forever(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._connect()
                delay = BACKOFF_FIRST
                await self._follow()
            except asyncio.CancelledError:
                raise
            except _EpochChanged:
                continue  # connect again at once: _connect() finds out what was lost
            except Exception as exc:
                self._went_down(exc)
            if self._attempted is not None:
                self._attempted.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _went_down(self, exc: BaseException) -> None:
        from redis.exceptions import RedisError

        reason = _describe(exc)
        if not isinstance(exc, RedisError | OSError):
            log.error("bus: unexpected error talking to Redis", exc_info=exc)
        now = time.time()
        self._error = reason
        if self._up:
            self._up = False
            self._down_since = now
            self._down_logged = now
            log.error(
                "bus: lost Redis at %s: %s; held connections keep being served, broadcasts "
                "are refused until it is back (reconnecting with backoff up to %.0f s)",
                self.url,
                reason,
                BACKOFF_MAX,
            )
        elif now - self._down_logged >= STILL_DOWN_LOG_EVERY:
            self._down_logged = now
            log.warning(
                "bus: Redis at %s still unreachable after %.0f s: %s",
                self.url,
                now - self._down_since,
                reason,
            )

    async def _connect(self) -> None:
        if not self._up:
            # Connections pooled before an outage are dead; start every command on a fresh one.
            await self._redis.connection_pool.disconnect()
        await self._redis.ping()
        # A new or emptied Redis: without a floor, a cluster restarted together with it would
        # number from 1 again. The clock floor is above every id issued before (store.py).
        floor = clock_floor()
        answer: Any = await self._epoch_script(
            keys=[self.k_epoch, self.k_seq], args=[f"{os.urandom(8).hex()}:{floor}", floor]
        )
        fresh, raw_epoch, before = int(answer[0]), answer[1], int(answer[2])
        epoch = raw_epoch.decode() if isinstance(raw_epoch, bytes) else str(raw_epoch)
        if fresh:
            log.warning(
                "bus: Redis at %s had no epoch (new, restarted without its data, or flushed); "
                "id sequence raised from %d to %d so ids never go back",
                self.url,
                before,
                floor,
            )
        if self._epoch is not None and epoch != self._epoch:
            await self._data_lost(epoch)
        self._epoch = epoch
        if not self._seeded:
            await self._seed()
            self._seeded = True
            if self._started and self._on_seeded is not None:
                # Workers started without this history; they get it before the first message.
                await self._on_seeded()
        before = int(await self._raise_seq_script(keys=[self.k_seq], args=[self._last_id]))
        if before < self._last_id:
            log.warning(
                "bus: Redis at %s had id sequence %d, below this node's last id %d (did it "
                "restart without its data?); raised it so ids keep growing",
                self.url,
                before,
                self._last_id,
            )
        if not self._up:
            if self._ever_up:
                self._reconnects += 1
                log.warning(
                    "bus: Redis at %s is back after %.1f s; following from id %d",
                    self.url,
                    time.time() - self._down_since,
                    self._last_id,
                )
            else:
                log.info("bus: Redis at %s, following from id %d", self.url, self._last_id)
            self._up = self._ever_up = True
        if self._attempted is not None:
            self._attempted.set()

    async def _seed(self) -> None:
        """First contact: take the feed position and the history every channel still has."""
        # redis-py's typed answers are unions over RESP versions; this client speaks RESP2.
        last: Any = await self._redis.xrevrange(self.k_feed, count=1)
        if last:
            pos, fields = last[0]
            self._pos = pos.decode()
            upto = int(fields[b"id"])
        else:
            self._pos = "0-0"
            upto = int(await self._redis.get(self.k_seq) or 0)
        members: Any = await self._redis.smembers(self.k_channels)
        names = sorted(n.decode() for n in members)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrange(self.k_all)
        for name in names:
            pipe.xrange(self.k_chan + name)
        streams = await pipe.execute()
        gone = [name for name, entries in zip(names, streams[1:], strict=True) if not entries]
        if gone:  # their history expired; forget the names too
            await self._forget_script(keys=[self.k_channels], args=[self.k_chan, *gone])
        msgs = [m for entries in streams for m in map(_decode_entry, entries) if m is not None]
        msgs.sort(key=lambda m: m["id"])
        # Newer messages than the feed position arrive through the feed; don't hold them twice.
        for msg in msgs:
            if msg["id"] <= upto:
                self._history.add(msg)
        self._last_id = max(self._last_id, upto)
        self._delivered_id = max(self._delivered_id, upto)
        # What was before the oldest message seeded is unknown here: a resume from there gets a
        # reset (a client at id a needs (a, ...]; we hold [oldest, ...]).
        held = [m["id"] for m in msgs if m["id"] <= upto]
        self._hole = (0, (min(held) - 2) if held else (upto - 1))
        log.info(
            "bus: seeded %d messages of history from Redis (last id %d)",
            sum(1 for m in msgs if m["id"] <= upto),
            upto,
        )

    async def _data_lost(self, epoch: str) -> None:
        """Redis has another epoch than the one this node followed: it lost its data while we
        were away. Ids go on above its new floor; what the old Redis held that this node had not
        read yet is unknown, so a resume from any id up to that floor gets a reset."""
        _, _, digits = epoch.rpartition(":")
        floor = int(digits) if digits.isdigit() else 0  # an epoch written by an older version
        upto = max(floor, self._last_id)
        self._hole = (0, upto if self._hole is None else max(upto, self._hole[1]))
        log.warning(
            "bus: Redis at %s lost its data while this node followed it (restarted without "
            "persistence, or flushed); ids go on above %d, and a resume from id %d or below "
            "gets a reset (what it held that this node had not read is unknown)",
            self.url,
            upto,
            upto,
        )
        self._last_id = upto  # the new feed's first message is the next one, not a gap
        self._pos = "0-0"  # a new feed: read it from its start
        if self._on_limits is not None:
            await self._on_limits()

    async def _current_epoch(self) -> str | None:
        raw: Any = await self._redis.get(self.k_epoch)
        return None if raw is None else raw.decode()

    async def _follow(self) -> None:
        while True:
            # The epoch with every read: a flush leaves the connection up and the read blocking.
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self.k_epoch)
            pipe.xread({self.k_feed: self._pos}, count=READ_COUNT, block=READ_BLOCK_MS)
            raw_epoch, answer = await pipe.execute()
            if raw_epoch is None or raw_epoch.decode() != self._epoch:
                raise _EpochChanged
            for _stream, entries in answer or []:
                for pos, fields in entries:
                    self._pos = pos.decode() if isinstance(pos, bytes) else str(pos)
                    msg = _decode_entry((pos, fields))
                    if msg is not None:
                        await self._take(msg)

    async def _take(self, msg: Msg) -> None:
        if msg["id"] <= self._last_id:
            # Only after Redis lost its data and ids were reused by a node that did not know.
            log.warning("bus: skipping message %d, not newer than %d", msg["id"], self._last_id)
            return
        if self._last_id and msg["id"] > self._last_id + 1:
            if await self._current_epoch() != self._epoch:
                raise _EpochChanged  # read from a new feed after the epoch check: not a gap
            missed = msg["id"] - self._last_id - 1
            self._missed += missed
            log.warning(
                "bus: %d messages before id %d left the feed before this node read them; "
                "clients resuming across them get a reset",
                missed,
                msg["id"],
            )
            # A client at any id below the last one missed needs it: a reset, never a gap.
            top = msg["id"] - 2
            self._hole = (0, top if self._hole is None else max(top, self._hole[1]))
            if self._on_limits is not None:
                await self._on_limits()
        self._last_id = msg["id"]
        assert self._on_remote is not None
        try:
            await self._on_remote(msg)
        except Exception:
            # A delivery problem here is not a Redis problem; keep following.
            log.exception("bus: delivering message %d failed", msg["id"])


class _EpochChanged(Exception):
    """The Redis being followed is not the one this node connected to (lost its data)."""


def _decode_entry(entry: tuple[Any, dict[bytes, bytes]]) -> Msg | None:
    _pos, fields = entry
    try:
        body = json.loads(fields[b"m"])
        return {
            "id": int(fields[b"id"]),
            "channel": body.get("channel"),
            "event": body.get("event"),
            "data": str(body.get("data", "")),
            "ts": float(body.get("ts", 0.0)),
        }
    except (KeyError, ValueError, TypeError, AttributeError):
        log.warning("bus: ignoring a malformed feed entry %r", entry[0])
        return None
