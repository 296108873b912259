"""How long the work streams keep their entries: until every consumer group has taken them.

`handshakes`, `jobs` and `results` are work queues. An entry that every group has read and
acknowledged is done; left in place, a busy darknet would fill Redis's memory with them. An entry
still pending (delivered, not acknowledged) or not yet delivered to some group is kept, so trimming
never loses work, XAUTOCLAIM can still take it over from a dead consumer, and a group that lags
behind keeps everything it has not read. A stream without any group (no prober has started yet,
say) is left alone: its entries are waiting for the group that will read them from id 0.
`jobs` also stays for the dedup window: an analyzer that died between enqueueing a job and
recording it is found out by a later one on that stream.

`dead` (read by operators too) and `verdicts` (read by SOC tools too) are capped by length where
they are written instead."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def consumed_floor(redis: aioredis.Redis, stream: str) -> tuple[int, int] | None:
    """The smallest entry id some group may still need (its oldest pending entry, or
    the last one delivered to it), as (ms, seq); None when the stream has no group or no key."""
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key
        return None
    floor: tuple[int, int] | None = None
    for group in groups:
        # Everything up to last-delivered-id was handed out; what is still pending starts at the
        # group's oldest pending id. Keeping last-delivered-id itself costs one entry, no more.
        need = _parse_id(str(group["last-delivered-id"]))
        if int(group.get("pending") or 0):
            summary = await redis.xpending(stream, group["name"])
            if summary.get("min"):
                need = min(need, _parse_id(str(summary["min"])))
        floor = need if floor is None else min(floor, need)
    return floor


async def trim_consumed(redis: aioredis.Redis, stream: str, *, keep_seconds: float = 0.0) -> int:
    """Drop the entries of `stream` that every group has acknowledged and that are older than
    `keep_seconds` (by entry id time); how many went."""
    floor = await consumed_floor(redis, stream)
    if floor is None:
        return 0
    if keep_seconds > 0:
        recent = (int((time.time() - keep_seconds) * 1000), 0)
        floor = min(floor, recent)
    # Approximate: Redis frees whole internal nodes only, so it may keep a few more, never fewer.
    return int(await redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=True))
