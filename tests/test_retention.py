"""Work streams are trimmed to what some consumer group still needs, against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from analyzer.retention import MAX_ROUNDS, consumed_floor, trim_consumed
from lab.redis import RedisServer

S = "t:work"


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    conn = aioredis.from_url(redis_server.url, decode_responses=True)
    # One entry per internal node: approximate trimming then removes exactly what it may.
    await conn.config_set("stream-node-max-entries", 1)
    yield conn
    await conn.aclose()


async def _fill(r: aioredis.Redis, n: int) -> list[str]:
    return [str(await r.xadd(S, {"n": str(i)})) for i in range(n)]


async def _read(r: aioredis.Redis, group: str, n: int) -> list[str]:
    reply = await r.xreadgroup(group, "c1", {S: ">"}, count=n)
    return [entry_id for _stream, entries in reply for entry_id, _ in entries]


async def test_a_stream_without_groups_or_key_is_left_alone(r: aioredis.Redis) -> None:
    assert await trim_consumed(r, S) == 0  # no key
    await _fill(r, 20)
    assert await consumed_floor(r, S) is None
    assert await trim_consumed(r, S) == 0
    assert await r.xlen(S) == 20


async def test_keeps_pending_and_undelivered_entries_only(r: aioredis.Redis) -> None:
    ids = await _fill(r, 50)
    await r.xgroup_create(S, "g", id="0")
    assert await trim_consumed(r, S) == 0  # nothing delivered yet
    delivered = await _read(r, "g", 30)
    await r.xack(S, "g", *delivered[:20])  # 20 done, 10 in hand (pending), 20 never delivered
    await trim_consumed(r, S)
    left = [entry_id for entry_id, _ in await r.xrange(S)]
    assert left == ids[20:]
    # XAUTOCLAIM can still take over the pending ones from a dead consumer.
    _next, claimed, _deleted = await r.xautoclaim(S, "g", "c2", 0, "0-0", count=100)
    assert [entry_id for entry_id, _ in claimed] == ids[20:30]


async def test_a_lagging_group_keeps_what_it_has_not_read(r: aioredis.Redis) -> None:
    ids = await _fill(r, 40)
    await r.xgroup_create(S, "fast", id="0")
    await r.xgroup_create(S, "slow", id="0")
    await r.xack(S, "fast", *await _read(r, "fast", 40))
    await r.xack(S, "slow", *await _read(r, "slow", 10))
    await trim_consumed(r, S)
    # The slow group's last delivered entry (ids[9]) is kept: the floor errs on keeping.
    assert [entry_id for entry_id, _ in await r.xrange(S)] == ids[9:]
    await r.xack(S, "slow", *await _read(r, "slow", 30))
    await trim_consumed(r, S)
    assert [entry_id for entry_id, _ in await r.xrange(S)] == ids[39:]


async def test_keep_seconds_holds_recent_entries_even_when_consumed(r: aioredis.Redis) -> None:
    old = [str(await r.xadd(S, {"n": str(i)}, id=f"{int((time.time() - 7200) * 1000)}-{i + 1}"))
           for i in range(5)]
    new = await _fill(r, 5)
    await r.xgroup_create(S, "g", id="0")
    await r.xack(S, "g", *await _read(r, "g", 10))
    assert await trim_consumed(r, S, keep_seconds=3600) == 5
    assert [entry_id for entry_id, _ in await r.xrange(S)] == new
    assert old  # the two-hour-old entries were the ones removed


async def test_a_backlog_goes_in_bounded_rounds(r: aioredis.Redis) -> None:
    """XTRIM ~ removes at most 100 nodes per call (100 entries here): one trim does MAX_ROUNDS
    calls, so a large backlog is worked off over a few rounds without one long Redis call."""
    async with r.pipeline(transaction=False) as pipe:
        for i in range(2500):
            pipe.xadd(S, {"n": str(i)})
        ids = [str(x) for x in await pipe.execute()]
    await r.xgroup_create(S, "g", id="0")
    while delivered := await _read(r, "g", 1000):
        await r.xack(S, "g", *delivered)
    assert await trim_consumed(r, S) == MAX_ROUNDS * 100
    assert await trim_consumed(r, S) == MAX_ROUNDS * 100
    assert await trim_consumed(r, S) == 499  # the rest but the last delivered entry
    assert [entry_id for entry_id, _ in await r.xrange(S)] == ids[-1:]
