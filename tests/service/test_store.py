"""The history store on its own: pruning by size per group and by age, what it remembers of what
it pruned, ids that never go back, and a store that cannot be opened."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.bus.store import Store, clock_floor
from service.contracts import Msg


def msg(i: int, channel: str | None, ts: float) -> Msg:
    return {"id": i, "channel": channel, "event": None, "data": str(i), "ts": ts}


def test_prune_by_size_and_age_and_reload(tmp_path: Path) -> None:
    async def main() -> tuple[int, Store]:
        s = Store(str(tmp_path), history_size=5, history_max_age=100)
        loaded = s.open(now=1000.0)
        assert loaded.last_id == clock_floor(1000.0) and loaded.hole == (0, loaded.last_id)
        base = loaded.last_id
        for i in range(1, 13):  # odd ids to channel a, even ones to every channel
            s.append(msg(base + i, "a" if i % 2 else None, 1000.0 + i))
        await s.committed()
        s.prune(now=1005.0)  # size: each group keeps its last 5
        assert (s.messages, s.oldest_id, s.newest_id) == (10, base + 3, base + 12)
        s.prune(now=1108.0)  # age: published before 1008 (ids 1..7) goes
        assert (s.messages, s.oldest_id) == (5, base + 8)
        s.close()
        return base, s

    base, _ = asyncio.run(main())
    again = Store(str(tmp_path), history_size=5, history_max_age=100)
    loaded = again.open(now=1108.0)
    assert [m["id"] - base for m in loaded.history] == [8, 9, 10, 11, 12]
    assert {g: i - base for g, i in loaded.pruned.items()} == {"*": 6, "a": 7}
    # Ids go on above everything stored, and above the clock.
    assert loaded.last_id >= base + 12 and loaded.last_id >= clock_floor(1108.0)
    again.close()


def test_a_store_that_cannot_be_opened_serves_without_durability(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = Store(str(blocker / "state"), 10, 10)
    loaded = s.open(now=2000.0)
    assert not s.durable and s.last_error and str(blocker) in s.last_error
    assert loaded.last_id == clock_floor(2000.0) and loaded.history == []
    s.append(msg(loaded.last_id + 1, None, 2000.0))  # a no-op, not an error
    assert s.status()["durable"] is False
