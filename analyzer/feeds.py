"""Where the live analyzer's work comes from: Redis streams read through a consumer group, and the
Zeek feed (which lands its handshakes on the same `handshakes` stream).

Every stream is read the same way: this consumer's own pending entries first (what a previous run
of it had in hand when it stopped or died), then new entries; from time to time entries that sat
unacknowledged with another consumer for too long (a dead analyzer) are claimed (XAUTOCLAIM).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from analyzer.handshake import Handshake

log = logging.getLogger("stepstone.analyzer")

Entry = tuple[str, dict[str, str]]


class HandshakeSource(Protocol):
    """What the Zeek feed offers (`analyzer.zeek.ZeekClient`)."""

    def handshakes(self) -> AsyncIterator[Handshake]: ...


class StreamConsumer:
    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        block_ms: int = 500,
        count: int = 100,
        claim_idle_ms: int = 30_000,
        claim_every: float = 5.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.claim_every = claim_every

    async def ensure_group(self) -> None:
        # From id 0: entries written before any analyzer ran (a prober that was faster, a responder
        # started first) are work too.
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # BUSYGROUP: it exists already
                raise

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[list[Entry]]:
        """Own pending entries, then new ones and claimed ones, a read's worth at a time, until
        `stop` is set (a batch already read is in hand: it is still yielded)."""
        await self.ensure_group()
        last = "0"
        while not stop.is_set():
            batch = await self._read(last)
            if not batch:
                break
            last = batch[-1][0]
            yield batch
        next_claim = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + self.claim_every
                claimed = await self._claim()
                if claimed:
                    yield claimed
                    continue
            batch = await self._read(">", block=True)
            if batch:
                yield batch

    async def _read(self, start: str, *, block: bool = False) -> list[Entry]:
        try:
            # The client decodes responses: entries are (id, {field: value}) of str.
            reply: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: start}, count=self.count,
                block=self.block_ms if block else None,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group was deleted under us (redis-cli DEL, FLUSHALL): recreate it.
            await self.ensure_group()
            return []
        out: list[Entry] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if not fields:
                    # Pending but trimmed from the stream: nothing to do but forget it.
                    await self.ack(entry_id)
                    continue
                out.append((entry_id, fields))
        return out

    async def _claim(self) -> list[Entry]:
        out: list[Entry] = []
        start = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=start, count=self.count
            )
            start, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if fields:
                    out.append((entry_id, fields))
                else:
                    await self.ack(entry_id)
            if start == "0-0" or not entries:
                break
        if out:
            log.info("claimed %d entries of %s left by another consumer", len(out), self.stream)
        return out

    async def ack(self, *entry_ids: str) -> None:
        if entry_ids:
            await self.redis.xack(self.stream, self.group, *entry_ids)

    async def deliveries(self, entry_id: str) -> int:
        """How often the group has delivered this entry (0 if it is not pending)."""
        pending = await self.redis.xpending_range(self.stream, self.group, min=entry_id, max=entry_id,
                                                  count=1)
        return int(pending[0]["times_delivered"]) if pending else 0

    async def lag(self) -> int | None:
        """Entries not yet delivered to the group plus delivered but unacknowledged."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return None
        for group in groups:
            if group.get("name") == self.group:
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return None


async def zeek_to_stream(
    source: HandshakeSource, redis: aioredis.Redis, stream: str,
    *, on_error: Callable[[Exception], Awaitable[None]],
) -> None:
    """Land every handshake Zeek sends on the `handshakes` stream, where the normal consumer (of
    this or any analyzer) takes it: one durable path whatever the feed. While Redis is unreachable
    the handshake in hand is kept and retried after `on_error(exc)` returns (it logs and waits);
    the ones behind it wait in the Zeek client's queue."""
    async for handshake in source.handshakes():
        fields: Any = handshake.to_fields()
        while True:
            try:
                await redis.xadd(stream, fields)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                await on_error(exc)
