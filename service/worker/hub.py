"""The hub: who listens to what, what was said, and writing it to everyone without stalling.

Theory of operation
-------------------
A worker holds up to ~20,000 (tuned host: ~1M) connections on one event loop, so nothing here
may cost per-connection objects beyond the protocol instance itself:

* ``streams`` maps a channel name to a ``set`` of stream connections; each connection keeps a
  reference to *its* set, so unsubscribing is ``set.discard`` and no name is stored per connection.
  ``pollers`` is the same for long-poll requests that are waiting.
* History: one ring for messages sent to every channel (``channel: null``) and one per channel.
  The rings are merged by id on replay, so a channel created after a global broadcast still
  replays it. Each ring remembers the highest id it ever evicted (by size or age): a resume
  from an id below that has a gap, and the client is told so with a ``reset`` event.
* A broadcast is split into a synchronous part and a paced part. Synchronously it is recorded in
  history, encoded once per stream format, and the list of recipients is snapshotted. Doing the
  three at the same instant is what makes SSE resume exact: a client that subscribes later is either
  in the snapshot (gets it live) or not (finds it in history), never both, never neither. The paced
  part writes those bytes to ``fanout_slice`` connections per loop iteration, or for
  ``fanout_slice_ms`` if that comes first (``call_soon`` chain, no Task); jobs run strictly one
  after the other so every subscriber sees messages in id order. Small jobs queued together (a burst
  of broadcasts to a small channel) are written as one batch within the same slice budget: each
  connection gets all of its messages in one write instead of one write per message (5,000
  broadcasts a second to 10 subscribers was 50,000 sends a second).
* Pings come from one timer per worker that snapshots all streams and writes ``ping_slice`` of them
  at a time (over as many loop turns as ``fanout_slice_ms`` makes it), the slices spread evenly over
  the first quarter of the interval (a 18,500-stream worker: 37 slices of 500, one every ~135 ms),
  so ~54 workers add up to a flat ~50,000 pings a second at 1,000,000 streams instead of bursts that
  saturate both cores. Pings are independent of message order so they run in their own lane. Each
  worker's first sweep is at a random phase of the interval so workers do not sweep at once.
  A ping only keeps a silent stream alive, so a broadcast to everyone restarts the worker's ping
  period (and cancels a sweep in progress): pings resume an interval after it, and at 1,000,000
  connections a broadcast does not also pay for the ~half-million pings that would otherwise have
  fallen due while it was being written. A stream therefore hears something about every interval
  (at most 1.25 intervals apart: a stream's place in the spread sweep can move between sweeps).
* Deadlines (request-head 408, keep-alive idle, long-poll timeout) share one armed timer
  (:class:`Deadlines`): fixed delays in per-tick buckets, long-poll timeouts in a heap. An entry
  carries the connection's current ``buf`` object as a token; when the connection moves on, its
  ``buf`` changes and the stale entry is ignored when it falls due. A byte-by-byte drip only
  appends to the same ``buf``, so it cannot push the head deadline back.
* Housekeeping rides on the ping timer: aged history and empty channel tables are dropped.
* After each write the transport's unsent bytes are checked; past ``limit_write_buffer`` the
  connection is aborted and counted as a slow-consumer drop, so a client that never reads costs
  at most that much memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from service.contracts import COUNTER_NAMES
from service.worker import wire
from service.worker.auth import Cors, TokenCheck, load_keys
from service.worker.states import DONE, LAST_STREAM
from service.worker.wire import Encoded

if TYPE_CHECKING:
    from service.config import Config
    from service.worker.protocol import Conn


class Counters:
    """The worker's counters, named once in ``contracts.COUNTER_NAMES``."""

    __slots__ = COUNTER_NAMES
    conns: int
    accepted_total: int
    closed_total: int
    rejected_total: int
    slow_dropped_total: int
    msgs_sent_total: int
    bytes_sent_total: int
    token_missing_total: int
    token_invalid_total: int
    token_expired_total: int
    token_forbidden_total: int
    handed_total: int
    adopted_total: int
    tls_offloaded_total: int
    tls_kept_total: int
    tls_failed_total: int

    def __init__(self) -> None:
        for name in COUNTER_NAMES:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}


class Entry(NamedTuple):
    id: int
    at: float  # local time.time() when recorded; ages are measured from here
    msg: dict[str, Any]
    encoded: Encoded


class Ring:
    """Bounded history of one channel (or of the global stream)."""

    __slots__ = ("items", "evicted_max")

    def __init__(self, size: int) -> None:
        self.items: deque[Entry] = deque(maxlen=size)
        self.evicted_max = 0

    def append(self, entry: Entry) -> None:
        items = self.items
        if items.maxlen is not None and len(items) == items.maxlen:
            self.evicted_max = max(self.evicted_max, items[0].id)
        items.append(entry)

    def trim(self, oldest_at: float) -> None:
        items = self.items
        while items and items[0].at < oldest_at:
            self.evicted_max = max(self.evicted_max, items.popleft().id)


# A broadcast's or a ping sweep's slice reads the clock after every this many writes (a write
# costs 5-40 us).
_CLOCK_EVERY = 16
_clock = time.perf_counter


class _Job:
    """One paced write over a snapshot of connections (a broadcast or the drain)."""

    __slots__ = ("conns", "encoded", "pos", "sent", "is_msg", "done", "t0", "each")

    def __init__(
        self,
        conns: list[Conn],
        encoded: Encoded,
        done: asyncio.Future[int] | None,
        is_msg: bool,
        each: Callable[[Conn], None] | None = None,
    ) -> None:
        self.conns = conns
        self.encoded = encoded
        self.pos = 0
        self.sent = 0
        self.is_msg = is_msg
        self.done = done
        self.t0 = time.perf_counter()
        self.each = each

    def finish(self) -> None:
        """Every connection was written: drop the snapshot, tell the waiter how many got it."""
        self.conns = []
        if self.done is not None and not self.done.done():
            self.done.set_result(self.sent)


def _live(items: list[Any]) -> Iterator[tuple[Conn, object]]:
    """The (conn, token) pairs of a deadline bucket ``[conn, token, conn, token, …]`` whose
    connection has not moved on (its ``buf`` is still the token)."""
    for i in range(0, len(items), 2):
        if items[i].buf is items[i + 1]:
            yield items[i], items[i + 1]


class Deadlines:
    """Every timeout of every connection behind one armed timer.

    Fixed delays (the request-head deadline, keep-alive idle) go to a FIFO of buckets: all
    connections that start waiting within one ``tick`` share a bucket, which costs two list
    slots per connection (the connection and its token) instead of a tuple and a float. A bucket
    fires ``delay`` to ``delay + tick`` after its entries were added: never early, so the deadline
    stays absolute. Arbitrary delays (long-poll timeouts, subscriber tokens' ``exp``) go to a
    bucket per due tick (``ceil(when / tick)``), the same two list slots per entry; only a new
    tick goes on the heap. Tokens minted together share a few ticks, so a private subscriber's
    deadline is a dict look-up and two appends, not a heap push of a tuple (~1 µs of its accept).

    An entry is live while ``conn.buf is token``; a connection that moved on has a new ``buf``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = 0.05) -> None:
        self.loop = loop
        self.tick = tick
        self.fifos: dict[float, deque[tuple[float, list[Any]]]] = {}
        self.ticks: list[int] = []  # heap of the due ticks that have a bucket
        self.at: dict[int, list[Any]] = {}  # due tick → [conn, token, conn, token, …]
        self.pending = 0  # entries in ``at``, stale ones included until due or compacted
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._compact_at = 1024  # ``pending`` at which stale entries are dropped
        self.held = False

    def add_fixed(self, conn: Conn, token: object, delay: float) -> None:
        q = self.fifos.get(delay)
        if q is None:
            q = self.fifos[delay] = deque()
        now = self.loop.time()
        # The newest bucket was opened at (when - delay - tick); it takes entries for one tick.
        if q and q[-1][0] - delay > now:
            bucket = q[-1][1]
            bucket.append(conn)
            bucket.append(token)
            return
        when = now + delay + self.tick
        q.append((when, [conn, token]))
        self._maybe_arm(when)

    def add(self, conn: Conn, token: object, delay: float) -> None:
        if self.pending >= self._compact_at:
            self._compact()
        tick = math.ceil((self.loop.time() + delay) / self.tick)  # never early
        bucket = self.at.get(tick)
        if bucket is None:
            bucket = self.at[tick] = []
            heapq.heappush(self.ticks, tick)
            self._maybe_arm(tick * self.tick)
        bucket.append(conn)
        bucket.append(token)
        self.pending += 1

    def _compact(self) -> None:
        """Entries of connections that moved on stay until due; a token's expiry can be hours
        away, so drop the stale ones whenever the count has doubled since the last time."""
        kept = 0
        for tick, items in list(self.at.items()):
            live = [x for pair in _live(items) for x in pair]
            if live:
                self.at[tick] = live
                kept += len(live) // 2
            else:
                del self.at[tick]
        self.ticks = list(self.at)
        heapq.heapify(self.ticks)
        self.pending = kept
        self._compact_at = max(1024, 2 * kept)

    def entries(self) -> Iterable[tuple[float, Conn, object]]:
        """(loop time due, conn, token) of every live entry of the ticked buckets."""
        for tick, items in self.at.items():
            when = tick * self.tick
            for conn, token in _live(items):
                yield when, conn, token

    def hold(self) -> None:
        """No deadline fires until :meth:`release`: a handoff is moving these connections, and
        one answered here meanwhile would be answered again by the successor."""
        self.held = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def release(self) -> None:
        self.held = False
        self._maybe_arm(self.loop.time())  # what fell due meanwhile fires now

    def _maybe_arm(self, when: float) -> None:
        if self.held:
            return
        if self._handle is None or when < self._armed_at:
            if self._handle is not None:
                self._handle.cancel()
            self._armed_at = when
            self._handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = self.loop.time()
        due: list[Any] = []
        for q in self.fifos.values():
            while q and q[0][0] <= now:
                due.extend(q.popleft()[1])
        ticks = self.ticks
        while ticks and ticks[0] * self.tick <= now:
            items = self.at.pop(heapq.heappop(ticks))
            self.pending -= len(items) // 2
            due.extend(items)
        for conn, token in _live(due):  # checked as each comes up: an earlier one may close it
            conn.on_deadline(token)
        nxt = [q[0][0] for q in self.fifos.values() if q]
        if ticks:
            nxt.append(ticks[0] * self.tick)
        if nxt:
            self._maybe_arm(min(nxt))

    def waiting(self) -> list[Conn]:
        """Connections with a live deadline (heads in progress, keep-alive idles, polls)."""
        out = [conn for _, conn, _ in self.entries()]
        for q in self.fifos.values():
            for _, items in q:
                out.extend(conn for conn, _ in _live(items))
        return out

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.fifos.clear()
        self.ticks.clear()
        self.at.clear()
        self.pending = 0


class Subscribers(dict["Conn", None]):
    """One channel's subscribers (streams, or waiting long-polls) in the order they subscribed:
    a set with an order. A broadcast, a ping sweep and a handoff walk them first come, first
    served, the same way on every run, instead of in the memory order of their objects."""

    __slots__ = ()

    def add(self, conn: Conn) -> None:
        self[conn] = None

    def discard(self, conn: Conn) -> None:
        self.pop(conn, None)


class Hub:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.counters = Counters()
        self.streams: dict[str, Subscribers] = {}
        self.pollers: dict[str, Subscribers] = {}
        self.global_ring = Ring(config.history_size)
        self.rings: dict[str, Ring] = {}
        self.last_id = 0
        self.upcoming_id = 0  # announced by the supervisor (quiet), not delivered here yet
        # Admission (--accept-rate): tokens for new connections, refilled every 100 ms; a float
        # infinity when there is no limit, so the accept path only compares and subtracts.
        self.accept_tokens: float = float(config.accept_rate) / 10 or math.inf
        self._admit_handle: asyncio.TimerHandle | None = None
        self.pruned_evicted = 0  # highest id ever evicted from a ring that was then removed
        # Ids in (lo, hi] were never stored by the previous run (service/store.py): unknown.
        self.hole: tuple[int, int] | None = None
        self.draining = False
        self.on_empty: asyncio.Future[None] | None = None  # set while draining
        self._jobs: deque[_Job] = deque()
        self._ping_handle: asyncio.TimerHandle | None = None
        self._ping_slice_handle: asyncio.Handle | None = None
        self._ping_step = 0.0
        self._ping_conns: list[Conn] = []
        self._ping_pos = 0
        self._housekept_at = 0.0
        self.deadlines = Deadlines(loop)
        self.cap = config.connection_cap()
        # Who may listen (service/auth.py): decided per request head, nothing per connection.
        self.cors = Cors(config.cors_origins)
        self.tokens = TokenCheck(
            config.private_channels,
            config.require_token,
            load_keys(config.token_secret_file, config.token_public_key_file),
            self.counters,
        )

    # -- subscriptions -------------------------------------------------------------------------
    def stream_set(self, channel: str) -> Subscribers:
        s = self.streams.get(channel)
        if s is None:
            s = self.streams[channel] = Subscribers()
        return s

    def poll_set(self, channel: str) -> Subscribers:
        s = self.pollers.get(channel)
        if s is None:
            s = self.pollers[channel] = Subscribers()
        return s

    def channels(self) -> dict[str, int]:
        """Stream subscribers per channel (empty channels are pruned here)."""
        out: dict[str, int] = {}
        for name in list(self.streams):
            n = len(self.streams[name])
            if n:
                out[name] = n
            else:
                del self.streams[name]
        return out

    def housekeeping(self) -> None:
        """Drop aged history and empty channels, so many short-lived channels cost nothing."""
        oldest_at = time.time() - self.config.history_max_age
        self.global_ring.trim(oldest_at)
        self._housekept_at = self.loop.time()
        for name in list(self.rings):
            ring = self.rings[name]
            ring.trim(oldest_at)
            if not ring.items:
                self.pruned_evicted = max(self.pruned_evicted, ring.evicted_max)
                del self.rings[name]
        for table in (self.streams, self.pollers):
            for name in [n for n, subs in table.items() if not subs]:
                del table[name]

    def all_streams(self) -> list[Conn]:
        return [c for s in self.streams.values() for c in s]

    # -- history -------------------------------------------------------------------------------
    def record(self, msg: Mapping[str, Any]) -> Entry:
        m = dict(msg)
        # Aged by its publish time: history loaded at start keeps its age.
        at = m.get("ts")
        entry = Entry(
            int(m["id"]),
            float(at) if isinstance(at, (int, float)) else time.time(),
            m,
            wire.encode_message(m),
        )
        channel = m.get("channel")
        if channel is None:
            self.global_ring.append(entry)
        else:
            ring = self.rings.get(channel)
            if ring is None:
                ring = self.rings[channel] = Ring(self.config.history_size)
                ring.evicted_max = self.pruned_evicted  # it may be a pruned ring coming back
            ring.append(entry)
        if entry.id > self.last_id:
            self.last_id = entry.id
        return entry

    def limit_resumes(self, pruned: Mapping[str, int], hole: tuple[int, int] | None) -> None:
        """What the store pruned (highest id per group, ``*`` = to every channel) and the ids it
        never held: a resume into either gets a reset, as after a ring's own eviction."""
        for group, upto in pruned.items():
            ring = self.global_ring if group == "*" else self.rings.get(group)
            if ring is not None:
                ring.evicted_max = max(ring.evicted_max, upto)
            else:
                self.pruned_evicted = max(self.pruned_evicted, upto)
        if hole is not None and hole[1] > hole[0]:
            old = self.hole
            if old is not None and hole[0] <= old[1] and old[0] <= hole[1]:
                hole = (min(old[0], hole[0]), max(old[1], hole[1]))  # overlapping: one hole
            self.hole = hole

    def history_since(self, channel: str, after: int) -> tuple[list[Entry], bool, int | None]:
        """(entries of ``channel`` with id > after in id order, gap?, first id still held > after).

        There is a gap when a ring evicted (by size or age) a message newer than ``after``, when
        ``after`` lies in the ids the previous run's store never held, and when it is above the
        newest id issued (state lost, another node's id, a typo): never a silent one.
        """
        if after > self.last_id:
            return [], True, None
        oldest_at = time.time() - self.config.history_max_age
        rings = [self.global_ring]
        ring = self.rings.get(channel)
        # A channel whose ring was pruned may have lost messages: assume it did (a reset that
        # was not needed is harmless, a silent gap is not).
        evicted = self.pruned_evicted if ring is None else 0
        if ring is not None:
            rings.append(ring)
        entries: list[Entry] = []
        for r in rings:
            r.trim(oldest_at)
            evicted = max(evicted, r.evicted_max)
            if r.items and r.items[-1].id > after:
                entries.extend(e for e in r.items if e.id > after)
        if len(rings) > 1:
            entries.sort(key=lambda e: e.id)
        hole = self.hole
        lost = after < evicted or (hole is not None and hole[0] < after <= hole[1])
        return entries, lost, entries[0].id if entries else None

    # -- broadcast -----------------------------------------------------------------------------
    def broadcast(self, msg: Mapping[str, Any]) -> asyncio.Future[int]:
        """Record, encode and snapshot now; write in slices; the future gets the recipient count."""
        entry = self.record(msg)
        channel = entry.msg.get("channel")
        if channel is None:
            conns = self.all_streams()
            waiting = [c for s in self.pollers.values() for c in s]
        else:
            conns = list(self.streams.get(channel, ()))
            waiting = list(self.pollers.get(channel, ()))
        done: asyncio.Future[int] = self.loop.create_future()
        for c in waiting:
            c.answer_poll()
        job = _Job(conns, entry.encoded, done, True)
        job.sent = len(waiting)
        self._enqueue(job)
        if channel is None:
            self.restart_pings()
        return done

    def _enqueue(self, job: _Job) -> None:
        self._jobs.append(job)
        if len(self._jobs) == 1:
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        jobs = self._jobs
        if not jobs:
            return
        n = self.config.fanout_slice
        if len(jobs) > 1 and self._batchable(jobs[0]) and len(jobs[0].conns) < n:
            self._write_batch(n)
            if jobs:
                self.loop.call_soon(self._pump)
            return
        job = jobs[0]
        stop = min(job.pos + n, len(job.conns))
        if job.each is not None:
            for c in job.conns[job.pos : stop]:
                job.each(c)
            end = stop
        else:
            sent, end = self._write_for(job.conns, job.pos, stop, job.encoded, job.is_msg)
            job.sent += sent
        job.pos = end
        if end >= len(job.conns):
            self._jobs.popleft()
            job.finish()
        if self._jobs:
            self.loop.call_soon(self._pump)

    def _write_for(
        self, conns: list[Conn], pos: int, stop: int, encoded: Encoded, msg: bool
    ) -> tuple[int, int]:
        """Write ``conns[pos:stop]`` for at most ``fanout_slice_ms``; return how many were
        written and where it stopped (a broadcast's slice, a ping sweep's slice).

        The same number of writes costs ~5x more on some CPUs than on others (the send and the
        loopback delivery it triggers): a slice capped only by count held the loop ~20 ms on
        one, and two cores shared by a dozen busy processes made that ~100 ms of loop lag in
        every worker writing a broadcast."""
        deadline = _clock() + self.config.fanout_slice_ms / 1000
        sent = 0
        while pos < stop:
            end = min(pos + _CLOCK_EVERY, stop)
            sent += self._write_many(conns, pos, end, encoded, msg)
            pos = end
            if _clock() >= deadline:
                break
        return sent, pos

    @staticmethod
    def _batchable(job: _Job) -> bool:
        return job.each is None and job.pos == 0

    def _write_batch(self, budget: int) -> None:
        """A burst of small broadcasts (say 5,000 a second to a channel of 10) queued together:
        each connection gets all of its encoded in one write, not a write per message. As many
        whole jobs as fit in one slice's budget of connections, in id order per connection."""
        jobs = self._jobs
        batch: list[_Job] = []
        total = 0
        while (
            jobs
            and self._batchable(jobs[0])
            and (not batch or total + len(jobs[0].conns) <= budget)
        ):
            job = jobs.popleft()
            batch.append(job)
            total += len(job.conns)
        out: dict[Conn, list[bytes]] = {}
        nbytes = msgs = 0
        for job in batch:
            encoded = job.encoded
            sent = 0
            for c in job.conns:
                fmt = c.state
                if fmt > LAST_STREAM:  # closed, or not a stream any more
                    continue
                data = encoded[fmt]
                parts = out.get(c)
                if parts is None:
                    out[c] = [data]
                else:
                    parts.append(data)
                nbytes += len(data)
                sent += 1
            job.sent += sent
            if job.is_msg:
                msgs += sent
        limit = self.config.limit_write_buffer
        for c, parts in out.items():
            t = c.transport
            t.write(parts[0] if len(parts) == 1 else b"".join(parts))
            if t.get_write_buffer_size() > limit:
                c.drop_slow()
        ctr = self.counters
        ctr.bytes_sent_total += nbytes
        ctr.msgs_sent_total += msgs
        for job in batch:
            job.finish()

    def _write_many(
        self, conns: list[Conn], start: int, end: int, encoded: Encoded, msg: bool
    ) -> int:
        limit = self.config.limit_write_buffer
        sent = 0
        nbytes = 0
        for i in range(start, end):
            c = conns[i]
            fmt = c.state
            if fmt > LAST_STREAM:  # closed, or not a stream any more
                continue
            t = c.transport
            data = encoded[fmt]
            t.write(data)
            nbytes += len(data)
            sent += 1
            if t.get_write_buffer_size() > limit:
                c.drop_slow()
        ctr = self.counters
        ctr.bytes_sent_total += nbytes
        if msg:
            ctr.msgs_sent_total += sent
        return sent

    # -- ping sweep ----------------------------------------------------------------------------
    PING_SPREAD = 0.25  # a sweep's slices are spread over this fraction of the interval

    def start_pings(self) -> None:
        # Each worker starts its sweeps at a random phase of the interval. Workers start
        # together, so with a fixed first delay all of them swept at once: at 1,000,000
        # connections on 54 workers that was a 1,000,000-ping burst every 20 s (2 cores
        # saturated, loop lag ~0.5 s, clients starved into connect timeouts).
        first = self.config.ping_interval * random.uniform(0.05, 1.0)
        self._ping_handle = self.loop.call_later(first, self._ping_start)

    def _ping_start(self) -> None:
        self._ping_handle = self.loop.call_later(self.config.ping_interval, self._ping_start)
        self.housekeeping()
        if self._ping_pos < len(self._ping_conns):
            return  # the previous sweep is still running (enormous worker); let it finish
        conns = self._ping_conns = self.all_streams()
        self._ping_pos = 0
        slices = -(-len(conns) // max(1, self.config.ping_slice))
        self._ping_step = self.config.ping_interval * self.PING_SPREAD / max(1, slices)
        self._ping_slice()

    def restart_pings(self) -> None:
        """A broadcast to every stream is this period's keep-alive: the next sweep is a full
        interval from now, and a sweep in progress stops (its streams are about to be written)."""
        if self._ping_handle is None:
            return  # pings stopped (draining) or not started
        self._ping_handle.cancel()
        self._ping_handle = self.loop.call_later(self.config.ping_interval, self._ping_start)
        self._cancel_sweep()
        if self.loop.time() - self._housekept_at >= self.config.ping_interval:
            # Housekeeping rides on the ping timer, which broadcasts may keep pushing back.
            self.housekeeping()

    def busy(self) -> bool:
        """True while a broadcast is being written (the lag sampler's cue to sample every 10 ms).

        A ping slice is short and spaced from the next, so it needs no cue: a sample it delays
        comes back late, and a late sample switches to 10 ms by itself."""
        return bool(self._jobs)

    def _ping_slice(self) -> None:
        """One slice of ``ping_slice`` streams; one that takes longer than ``fanout_slice_ms``
        goes on at the loop's next turn, and the next slice is due a step after it ends."""
        self._ping_slice_handle = None
        conns = self._ping_conns
        start = self._ping_pos
        size = self.config.ping_slice  # slices start at 0: where this one ends follows from start
        stop = min((start // size + 1) * size, len(conns))
        _sent, end = self._write_for(conns, start, stop, wire.PING, False)
        self._ping_pos = end
        if end < stop:
            self._ping_slice_handle = self.loop.call_soon(self._ping_slice)
        elif end < len(conns):
            self._ping_slice_handle = self.loop.call_later(self._ping_step, self._ping_slice)
        else:
            self._ping_conns = []
            self._ping_pos = 0

    def _cancel_sweep(self) -> None:
        if self._ping_slice_handle is not None:
            self._ping_slice_handle.cancel()
            self._ping_slice_handle = None
        self._ping_conns = []
        self._ping_pos = 0

    def start_admission(self) -> None:
        """Refill the accept tokens every 100 ms (with --accept-rate)."""
        rate = self.config.accept_rate
        if rate <= 0 or self._admit_handle is not None:
            return
        per_tick = rate / 10

        def refill() -> None:
            self.accept_tokens = per_tick  # unused tokens do not pile up into a burst
            self._admit_handle = self.loop.call_later(0.1, refill)

        self._admit_handle = self.loop.call_later(0.1, refill)

    def stop_admission(self) -> None:
        if self._admit_handle is not None:
            self._admit_handle.cancel()
            self._admit_handle = None

    def stop_pings(self) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        self._cancel_sweep()

    # -- deadlines -----------------------------------------------------------------------------
    def add_deadline(self, conn: Conn, token: object, delay: float) -> None:
        self.deadlines.add(conn, token, delay)

    def add_fixed_deadline(self, conn: Conn, token: object, delay: float) -> None:
        self.deadlines.add_fixed(conn, token, delay)

    def stop_deadlines(self) -> None:
        self.deadlines.stop()

    # -- drain ---------------------------------------------------------------------------------
    async def writes_done(self) -> None:
        """Return once every queued broadcast and drain job has been written."""
        while self._jobs:
            await asyncio.sleep(0.002)

    def open_conns(self) -> list[Conn]:
        """Every connection not closed yet: streams, waiting long-polls, and those only the
        deadline heap knows (request heads being read, keep-alive idles). Streams first, in the
        order they subscribed: a successor adopting them in this order keeps it."""
        seen = {id(c): c for c in self.all_streams()}
        for s in self.pollers.values():
            for c in s:
                seen[id(c)] = c
        for c in self.deadlines.waiting():
            seen[id(c)] = c  # one already seen keeps its place
        return [c for c in seen.values() if c.state < DONE]

    async def drain(self, deadline: float) -> int:
        """Stop pinging, answer the long-polls, send every stream its reconnect hint (after
        queued broadcasts), close the rest, and wait until none is open or the loop time
        ``deadline`` passes. The number still open then (the caller aborts them by exiting)."""
        loop = self.loop
        self.draining = True
        self.stop_pings()
        self.on_empty = loop.create_future()
        if self.counters.conns == 0:
            self.on_empty.set_result(None)
        # Pollers get their (empty) answer with Connection: close; heads are cut short.
        for s in list(self.pollers.values()):
            for c in list(s):
                c.answer_poll()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(self.drain_streams(self.all_streams()))
        # Anything else still open (heads in progress, keep-alive idles, late arrivals).
        for c in self.open_conns():
            c.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.01, deadline - loop.time())):
                await asyncio.shield(self.on_empty)
        self.stop_deadlines()
        self.stop_admission()
        return 0 if self.on_empty.done() else self.counters.conns

    def drain_streams(self, conns: Iterable[Conn]) -> asyncio.Future[int]:
        """Send each stream its reconnect hint and close it, in slices, after queued broadcasts."""
        retry = self.config.sse_retry_ms
        # A few precomputed jitter variants: reconnects spread over [retry, 2*retry) without
        # encoding per connection.
        variants = [
            tuple(wire.reconnect(fmt, retry + retry * k // 8) for fmt in range(4)) for k in range(8)
        ]
        choice = random.choice

        def each(c: Conn) -> None:
            if c.state <= LAST_STREAM:
                c.transport.write(choice(variants)[c.state])
            c.close()

        done: asyncio.Future[int] = self.loop.create_future()
        self._enqueue(_Job(list(conns), wire.PING, done, False, each))
        return done
