"""RedisBus on its own against a real redis-server: numbering, seeding, the cluster view's sums."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.bus import BusUnavailable, Msg
from service.bus.cluster import cluster_view
from service.bus.redis import RedisBus, redact
from service.bus.store import clock_floor
from tests.admin_api.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url() -> Iterator[str]:
    tmp = Path(tempfile.mkdtemp(prefix="crb-", dir="/tmp"))
    server = RedisServer(tmp)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_redact_hides_the_password_only() -> None:
    assert redact("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redact("redis://user:pw@h/1") == "redis://user:***@h/1"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_cluster_view_sums_counters_and_keeps_the_worst_lag() -> None:
    def node(name: str, conns: int, p90: float) -> dict[str, Any]:
        totals = {
            "conns": conns,
            "msgs_sent_total": 10,
            "rss_bytes": 100,
            "cpu_percent": 1.5,
            "lag_ms": {"avg": 1.0, "p90": p90, "max": p90 * 2},
        }
        return {
            "node_id": name,
            "t": 100.0,
            "workers_up": 2,
            "target_connections": 5,
            "totals": totals,
        }

    view = cluster_view([node("b", 3, 4.0), node("a", 2, 9.0)], 101.0, "redis")
    assert [n["node_id"] for n in view["nodes"]] == ["a", "b"]
    assert view["count"] == 2 and view["nodes"][0]["age_s"] == 1.0
    t = view["totals"]
    assert (t["conns"], t["msgs_sent_total"], t["rss_bytes"], t["cpu_percent"]) == (5, 20, 200, 3.0)
    assert t["lag_ms"] == {"avg": 1.0, "p90": 9.0, "max": 18.0}
    assert (t["workers"], t["target_connections"]) == (4, 10)


def test_publish_numbers_seed_and_forget_expired_channels(redis_url: str) -> None:
    async def main() -> None:
        got: list[Msg] = []

        async def deliver(msg: Msg) -> None:
            got.append(msg)

        one = RedisBus(redis_url, history_size=3, history_max_age=300, node_id="one", node_ttl=2)
        await one.start(deliver)
        ids = [(await one.publish(f"m{i}", ["a", "b", None][i % 3], None))["id"] for i in range(9)]
        # A new Redis (no epoch key): the sequence starts above the clock floor, not at 1, so a
        # cluster restarted together with an empty Redis cannot number from 1 again.
        base = ids[0] - 1
        assert base >= clock_floor() - 60_000_000
        assert ids == list(range(base + 1, base + 10))
        while len(got) < 9:
            await asyncio.sleep(0.02)
        assert [m["id"] for m in got] == ids  # the publisher's own messages come back, in order

        # Channel b's history expires (its key is gone); a new node seeds from what is left.
        await one._redis.delete(one.k_chan + "b")
        two = RedisBus(redis_url, history_size=3, history_max_age=300, node_id="two", node_ttl=2)
        await two.start(deliver)
        assert two.last_id == base + 9
        assert [(m["id"] - base, m["channel"]) for m in two.history()] == [
            (1, "a"),
            (3, None),
            (4, "a"),
            (6, None),
            (7, "a"),
            (9, None),
        ]
        # What was before the oldest seeded message is unknown to the new node: reset there.
        assert two.resume_limits() == {"hole": [0, base - 1]}
        assert await one._redis.smembers(one.k_channels) == {b"a"}
        await two.close()
        await one.close()

        # A closed bus refuses at once, with the reason the API passes on.
        with pytest.raises(BusUnavailable, match="^bus unavailable: Redis at redis://"):
            closed = RedisBus("redis://127.0.0.1:1/0", 3, 300, "x", 2)
            await closed.start(deliver)
            try:
                await closed.publish("x", None, None)
            finally:
                await closed.close()

    asyncio.run(main())


def test_a_flushed_redis_is_found_out_ids_go_on_and_resumes_before_it_are_limited(
    redis_url: str,
) -> None:
    """FLUSHALL leaves every connection up and the follower's read blocking: the node finds the
    lost epoch on its next read, a publish in between is refused rather than numbered from 1,
    and the workers are told (``on_limits``) that resumes up to the new floor get a reset."""

    async def main() -> None:
        got: list[Msg] = []
        limited: list[dict[str, Any]] = []

        async def deliver(msg: Msg) -> None:
            got.append(msg)

        bus = RedisBus(redis_url, history_size=10, history_max_age=300, node_id="one", node_ttl=2)

        async def on_limits() -> None:
            limited.append(bus.resume_limits())

        await bus.start(deliver, None, on_limits)
        first = [(await bus.publish(f"m{i}", "a", None))["id"] for i in range(3)]
        while len(got) < 3:
            await asyncio.sleep(0.02)
        other = RedisBus(redis_url, 10, 300, "other", 2)
        await other._redis.flushall()
        # The follower notices within one read (READ_BLOCK_MS) and catches up; a publish that
        # gets to Redis first is refused, never numbered from 1.
        new_id = None
        for _ in range(100):
            try:
                new_id = (await bus.publish("after", "a", None))["id"]
                break
            except BusUnavailable as exc:
                assert "lost its data" in str(exc) or "down" in str(exc), exc
                await asyncio.sleep(0.05)
        assert new_id is not None and new_id > first[-1] + 1_000_000
        while len(got) < 4:
            await asyncio.sleep(0.02)
        assert [m["id"] for m in got] == [*first, new_id]
        assert bus.status()["missed_total"] == 0
        assert len(limited) == 1 and limited[0]["hole"][0] == 0
        assert first[-1] < limited[0]["hole"][1] < new_id
        await other._redis.aclose()
        await bus.close()

    asyncio.run(main())
