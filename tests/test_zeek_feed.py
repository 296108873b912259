"""The Zeek feed lands handshakes on the Redis stream; a Redis outage must not lose the one in hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from service_harness import handshake, until

from analyzer.feeds import zeek_to_stream
from analyzer.handshake import Handshake
from lab.redis import RedisServer


class Source:
    """Hands out the handshakes put into it, as ZeekClient.handshakes() does."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Handshake] = asyncio.Queue()

    async def handshakes(self) -> AsyncIterator[Handshake]:
        while True:
            yield await self.queue.get()


async def test_a_handshake_in_hand_during_a_redis_outage_is_written_after_it(redis_aof: RedisServer) -> None:
    source = Source()
    client = aioredis.from_url(redis_aof.url, decode_responses=True)
    errors: list[Exception] = []
    stopped = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        if len(errors) == 1:
            stopped.set()
        await asyncio.sleep(0.05)  # the feed's backoff between attempts, not synchronisation

    feed = asyncio.create_task(zeek_to_stream(source, client, "t:handshakes", on_error=on_error))
    try:
        first = handshake("198.18.70.1", "198.19.0.1", t=1795754035.0)
        await source.queue.put(first)
        await until(lambda: client.xlen("t:handshakes"), what="the first handshake on the stream")
        await asyncio.to_thread(redis_aof.stop)
        second = handshake("198.18.70.2", "198.19.0.1", t=1795754036.0)
        await source.queue.put(second)
        async with asyncio.timeout(20):
            await stopped.wait()  # the feed has the second handshake in hand and Redis refused it
        await asyncio.to_thread(redis_aof.start)  # AOF: the first entry is still there
        third = handshake("198.18.70.3", "198.19.0.1", t=1795754037.0)
        await source.queue.put(third)

        async def three() -> bool:
            return await client.xlen("t:handshakes") == 3

        await until(three, what="every handshake on the stream")
        entries = await client.xrange("t:handshakes")
    finally:
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        await client.aclose()
    assert [Handshake.from_fields(f).src for _, f in entries] == [first.src, second.src, third.src]
    assert errors  # the outage was seen (and reported through on_error), not skipped
