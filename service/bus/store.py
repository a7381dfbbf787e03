"""Message history that outlives the process: SQLite (standard library) in WAL mode on --state-dir.

Theory of operation
-------------------
The supervisor appends every message it numbers before it answers the broadcast, and prunes once a
second what the in-memory rings would have dropped (older than ``history_max_age``, beyond
``history_size`` per channel; a message to every channel is its own group, as in the rings). A
start loads what is left and hands it to the workers, so ``Last-Event-ID``, ``?last_event_id=``
and ``/poll?since=`` resume across SIGTERM, kill -9 and a new container on the same volume.

Durability: WAL with ``synchronous=NORMAL``. A commit is in the WAL file, so it survives the
process dying (kill -9, OOM, a crash) but not necessarily a power loss of the host; fsync per
message (``FULL``) would cap publishing at the disk's flush rate. Group commit: the messages
appended in one turn of the event loop share one transaction, committed at the end of that turn;
a broadcast's id is answered only after :meth:`committed` (a commit per message cost 70 µs of the
supervisor's loop, more than the rest of a broadcast). Nothing per connection is ever written.

Ids never go back. The next id after a start is ``max(last stored id, clock floor) + 1``, where the
clock floor is the start time in microseconds: with the state kept, ids go on from it (the floor is
above them, so they jump forward once); with the state lost (a wiped directory, an unwritable one,
a new volume), the floor is above every id an earlier run can have issued, at any rate below a
million messages a second. What a worker cannot honour it answers with an explicit reset:

- an id below what a channel's history still holds, when something newer was pruned from it
  (``pruned``: the highest id pruned per group, kept in the database too);
- an id in the *hole* between the last stored id and the floor: issued by a run whose writes
  were lost, or never issued at all (a typo, another node's id);
- an id above the newest issued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from service.contracts import Msg

log = logging.getLogger("comet.store")

ALL = "*"  # the group key of messages to every channel (a channel name cannot contain '*')
FILE_NAME = "history.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS msgs (
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    event TEXT,
    data TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS msgs_grp ON msgs (grp, id);
CREATE TABLE IF NOT EXISTS pruned (grp TEXT PRIMARY KEY, id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running loop, or None (outside one, every append commits by itself)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def clock_floor(now: float | None = None) -> int:
    """Microseconds since the epoch: above every id a run that started earlier can have issued."""
    return int((time.time() if now is None else now) * 1_000_000)


@dataclass
class Loaded:
    """What a start finds: the id to go on from and what the workers need to answer resumes."""

    last_id: int
    history: list[Msg]
    pruned: dict[str, int] = field(default_factory=dict)  # group → highest id pruned
    hole: tuple[int, int] | None = None  # ids in (lo, hi] were never stored


class Store:
    """The history database of one node. Every method logs and degrades instead of raising: a
    store that cannot be written turns durability off, and the service serves on."""

    def __init__(self, state_dir: str, history_size: int, history_max_age: float) -> None:
        self.path = os.path.join(state_dir, FILE_NAME)
        self.history_size = history_size
        self.history_max_age = history_max_age
        self.db: sqlite3.Connection | None = None
        self.last_error: str | None = None
        self.messages = 0
        self.oldest_id: int | None = None
        self.newest_id: int | None = None
        # Groups that got messages since the last prune (all of them at start).
        self._dirty: set[str] = set()
        self._commit: asyncio.Future[None] | None = None  # the open group commit, if any

    @property
    def durable(self) -> bool:
        return self.db is not None

    # ---- start ----------------------------------------------------------------------------------
    def open(self, now: float | None = None) -> Loaded:
        """Open (or create) the database and load it; on any failure, run without it."""
        stored_last = 0
        history: list[Msg] = []
        pruned: dict[str, int] = {}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                stored_last, history, pruned = self._load(db, now)
                # The id the floor gives this run is written now, so the next start (even after
                # a crash before any message) knows this run's ids began here.
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('last_id', ?)",
                    (max(stored_last, clock_floor(now)),),
                )
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            self._fail("open", exc)
        else:
            self.db = db
            log.info(
                "history store %s: %d messages (ids %s..%s), last id %d",
                self.path,
                self.messages,
                self.oldest_id,
                self.newest_id,
                stored_last,
            )
        floor = clock_floor(now)
        last_id = max(stored_last, floor)
        hole = (stored_last, floor) if floor > stored_last else None
        return Loaded(last_id, history, pruned, hole)

    def _load(
        self, db: sqlite3.Connection, now: float | None
    ) -> tuple[int, list[Msg], dict[str, int]]:
        row = db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
        last = int(row[0]) if row else 0
        newest = db.execute("SELECT MAX(id) FROM msgs").fetchone()[0]
        last = max(last, int(newest or 0))
        self._dirty = {str(g) for (g,) in db.execute("SELECT DISTINCT grp FROM msgs")}
        self._prune(db, now)
        pruned = {str(g): int(i) for g, i in db.execute("SELECT grp, id FROM pruned")}
        history: list[Msg] = []
        for i, grp, event, data, ts in db.execute(
            "SELECT id, grp, event, data, ts FROM msgs ORDER BY id"
        ):
            history.append(
                {
                    "id": int(i),
                    "channel": None if grp == ALL else str(grp),
                    "event": event,
                    "data": str(data),
                    "ts": float(ts),
                }
            )
        self._count(db)
        return last, history, pruned

    # ---- every message -------------------------------------------------------------------------
    def append(self, msg: Msg) -> None:
        """Write ``msg`` (committed before this returns)."""
        if self.db is None:
            return
        grp = ALL if msg["channel"] is None else msg["channel"]
        try:
            if self._commit is None and _running_loop() is not None:
                loop = asyncio.get_running_loop()
                self.db.execute("BEGIN")
                self._commit = loop.create_future()
                loop.call_soon(self.flush)
            self.db.execute(
                "INSERT INTO msgs VALUES (?, ?, ?, ?, ?)",
                (msg["id"], grp, msg["event"], msg["data"], msg["ts"]),
            )
        except sqlite3.Error as exc:
            self._fail("write", exc)
            return
        self._dirty.add(grp)
        self.messages += 1
        self.newest_id = msg["id"]
        if self.oldest_id is None:
            self.oldest_id = msg["id"]

    async def committed(self) -> None:
        """Wait until what was appended so far is committed (or durability is off)."""
        if self._commit is not None:
            await asyncio.shield(self._commit)

    def flush(self) -> None:
        """Commit the open group commit now and wake its waiters."""
        fut, self._commit = self._commit, None
        if fut is None:
            return
        if self.db is not None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._fail("commit", exc)
        if not fut.done():
            fut.set_result(None)

    def prune(self, now: float | None = None) -> None:
        """Drop what the rings would have dropped, remembering the highest id dropped per group."""
        self.flush()
        if self.db is None:
            return
        try:
            dropped = self._prune(self.db, now)
            if dropped:
                self.messages -= dropped
                self.oldest_id = self.db.execute("SELECT MIN(id) FROM msgs").fetchone()[0]
                if self.oldest_id is None:
                    self.newest_id = None
        except sqlite3.Error as exc:
            self._fail("prune", exc)

    def _prune(self, db: sqlite3.Connection, now: float | None) -> int:
        """Age: ids grow with publish time, so what aged out is an id range from the start,
        found by walking the primary key from the oldest row. Size: only the groups that got
        messages since the last prune can be over ``history_size``. The work is proportional
        to what is dropped and to the active groups, not to the whole history."""
        cutoff = (time.time() if now is None else now) - self.history_max_age
        db.execute("BEGIN")
        dropped = 0
        try:
            cuts: dict[str, int] = {}
            fresh = db.execute(
                "SELECT id FROM msgs WHERE ts >= ? ORDER BY id LIMIT 1", (cutoff,)
            ).fetchone()
            aged_upto = (
                (int(fresh[0]) - 1)
                if fresh
                else int(db.execute("SELECT COALESCE(MAX(id), 0) FROM msgs").fetchone()[0])
            )
            if aged_upto > 0:
                for grp, upto in db.execute(
                    "SELECT grp, MAX(id) FROM msgs WHERE id <= ? GROUP BY grp", (aged_upto,)
                ):
                    cuts[str(grp)] = int(upto)
                dropped += db.execute("DELETE FROM msgs WHERE id <= ?", (aged_upto,)).rowcount
            for grp in self._dirty:
                over = db.execute(
                    "SELECT id FROM msgs WHERE grp = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                    (grp, self.history_size),
                ).fetchone()
                if over:
                    dropped += db.execute(
                        "DELETE FROM msgs WHERE grp = ? AND id <= ?", (grp, int(over[0]))
                    ).rowcount
                    cuts[grp] = max(cuts.get(grp, 0), int(over[0]))
            for grp, upto in cuts.items():
                db.execute(
                    "INSERT INTO pruned VALUES (?, ?) "
                    "ON CONFLICT (grp) DO UPDATE SET id = MAX(id, excluded.id)",
                    (grp, upto),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._dirty.clear()
        return dropped

    def _count(self, db: sqlite3.Connection) -> None:
        count, oldest, newest = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM msgs").fetchone()
        self.messages, self.oldest_id, self.newest_id = int(count), oldest, newest

    # ---- reporting -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``store`` object of the frame and of the health answer."""
        return {
            "path": self.path,
            "durable": self.durable,
            "messages": self.messages,
            "oldest_id": self.oldest_id,
            "newest_id": self.newest_id,
            "last_error": self.last_error,
        }

    def _fail(self, what: str, exc: BaseException) -> None:
        reason = f"{what} {self.path}: {exc}"
        if self.last_error is None or self.durable:
            # Once, with the path and the reason; the service goes on without durable history.
            log.error(
                "history store unavailable (%s); serving live messages without durable "
                "history (ids are seeded from the clock, so they still never go back)",
                reason,
            )
        self.last_error = reason
        self._close_db()

    def close(self) -> None:
        self.flush()
        self._close_db()

    def _close_db(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None
