"""Where the live analyzer's work comes from: Redis streams read through a consumer group, and the
Zeek feed (which lands its handshakes on the same `handshakes` stream).

Every stream is read the same way: this consumer's own pending entries first (what a previous run
of it had in hand when it stopped or died), then new entries; from time to time entries that sat
unacknowledged with another consumer for too long (a dead analyzer) are claimed (XAUTOCLAIM).

Replies are read undecoded and each entry is decoded on its own (`prober.streams`): an entry that
is not UTF-8 is rejected (reported through `on_reject`) and acknowledged right here, and never
stops the read or the entries behind it.
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

from analyzer.handshake import Handshake, HandshakeError
from prober import streams

log = logging.getLogger("stepstone.analyzer")

Entry = tuple[str, dict[str, str]]
# Told of every entry rejected at the boundary: (stream, entry id, why).
Reject = Callable[[str, str, Exception], None]


def log_reject(stream: str, entry_id: str, exc: Exception) -> None:
    log.warning("%s %s rejected: %s", stream, entry_id, exc)


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
        on_reject: Reject = log_reject,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.claim_every = claim_every
        self.on_reject = on_reject

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
            # Paged by the last entry read, decoded or not: a page of only bad (or trimmed) entries,
            # acknowledged while decoding, must not end the pending pass early.
            batch, last_read = await self._read_page(last)
            if last_read is None:
                break
            last = last_read
            if batch:
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
        return (await self._read_page(start, block=block))[0]

    async def _read_page(self, start: str, *, block: bool = False) -> tuple[list[Entry], str | None]:
        """The usable entries of one read, and the id of the last entry read (None: none)."""
        try:
            entries = await streams.read_group(self.redis, self.group, self.consumer, self.stream, start,
                                               count=self.count, block_ms=self.block_ms if block else None)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group was deleted under us (redis-cli DEL, FLUSHALL): recreate it.
            await self.ensure_group()
            return [], None
        return await self._decoded(entries), (entries[-1][0] if entries else None)

    async def _decoded(self, entries: list[streams.RawEntry]) -> list[Entry]:
        """The entries as text; the ones that are gone (pending but trimmed from the stream:
        nothing to do but forget them) or do not decode are acknowledged here."""
        out: list[Entry] = []
        done: list[str] = []
        for entry_id, raw in entries:
            if not raw:
                done.append(entry_id)
                continue
            try:
                out.append((entry_id, streams.decode_entry(raw)))
            except streams.EntryError as exc:
                self.on_reject(self.stream, entry_id, exc)
                done.append(entry_id)
        await self.ack(*done)
        return out

    async def _claim(self) -> list[Entry]:
        out: list[Entry] = []
        start = "0-0"
        while True:
            start, entries = await streams.autoclaim(self.redis, self.stream, self.group, self.consumer,
                                                     min_idle_ms=self.claim_idle_ms, start=start,
                                                     count=self.count)
            out += await self._decoded(entries)
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
        pending = await streams.pending_range(self.redis, self.stream, self.group, (entry_id, entry_id),
                                               count=1)
        return int(pending[0]["times_delivered"]) if pending else 0

    async def lag(self) -> int | None:
        """Entries not yet delivered to the group plus delivered but unacknowledged."""
        try:
            # Undecoded: another group's name need not be UTF-8.
            group = streams.find_group(await streams.groups(self.redis, self.stream), self.group)
        except ResponseError:
            return None
        if group is None:
            return None
        return int(group.get("lag") or 0) + int(group.get("pending") or 0)


async def zeek_to_stream(
    source: HandshakeSource, redis: aioredis.Redis, stream: str,
    *, on_error: Callable[[Exception], Awaitable[None]],
    on_reject: Callable[[Handshake, HandshakeError], None] | None = None,
) -> None:
    """Land every handshake Zeek sends on the `handshakes` stream, where the normal consumer (of
    this or any analyzer) takes it: one durable path whatever the feed. While Redis is unreachable
    the handshake in hand is kept and retried after `on_error(exc)` returns (it logs and waits);
    the ones behind it wait in the Zeek client's queue. A handshake outside the contract
    (`Handshake.check`, the check its reader makes) never reaches the stream: `on_reject` hears
    of it (default: a warning) and the feed goes on."""
    async for handshake in source.handshakes():
        if (checked := _checked(handshake, on_reject)) is None:
            continue
        fields: Any = checked.to_fields()
        while True:
            try:
                await redis.xadd(stream, fields)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                await on_error(exc)


class ShardSink(Protocol):
    """Where a sharded feed puts its handshakes (`prober.shards.Appender`)."""

    def put(self, item: Handshake) -> None: ...


async def zeek_to_shards(
    source: HandshakeSource, sink: ShardSink,
    *, on_reject: Callable[[Handshake, HandshakeError], None] | None = None,
) -> None:
    """`zeek_to_stream` for sharded Redis state (prober.shards): every handshake Zeek sends goes to
    its source's shard's `handshakes` stream through `sink`, which holds it (a bounded queue per
    shard) until that shard's Redis takes it, so a shard that is down never holds up the others.
    A handshake outside the contract is refused here, as there."""
    async for handshake in source.handshakes():
        if (checked := _checked(handshake, on_reject)) is not None:
            sink.put(checked)


def _checked(handshake: Handshake,
             on_reject: Callable[[Handshake, HandshakeError], None] | None) -> Handshake | None:
    """The handshake if it is within the contract (`Handshake.check`), else None, said to
    `on_reject` (default: a warning)."""
    try:
        return handshake.check()
    except HandshakeError as exc:
        if on_reject is None:
            log.warning("a Zeek handshake rejected: %s", exc)
        else:
            on_reject(handshake, exc)
        return None
