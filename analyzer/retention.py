"""How long the work streams keep their entries: until every consumer group has taken them.

`handshakes`, `jobs`, `results` and `dead` are work queues. An entry that every group has read and
acknowledged is done; left in place, a busy darknet would fill Redis's memory with them. An entry
still pending (delivered, not acknowledged) or not yet delivered to some group is kept, so trimming
never loses work, XAUTOCLAIM can still take it over from a dead consumer, and a group that lags
behind keeps everything it has not read. A stream without any group (no prober has started yet,
say) is left alone: its entries are waiting for the group that will read them from id 0.

Some streams keep their newest entries a while longer even once consumed: `jobs` for
the dedup window, because an analyzer that died between enqueueing a job and recording it is found
out by a later one on that stream; `dead` for a day, for operators to read why probes were given
up. `verdicts` (read by SOC tools too, outside any group) is capped by length where it is written.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from prober import streams
from prober.shards import server_time

DEAD_KEEP_S = 86400.0
# XTRIM with `~` removes at most 100 internal nodes per call (10,000 entries by default), so that
# one call never blocks Redis for long; a backlog is worked off a batch at a time, this many per
# round.
MAX_ROUNDS = 10


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode("ascii")
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def consumed_floor(redis: aioredis.Redis, stream: str) -> tuple[int, int] | None:
    """The smallest entry id some group may still need (its oldest pending entry, or
    the last one delivered to it), as (ms, seq); None when the stream has no group or no key."""
    try:
        # Undecoded: a group's name is anyone's choice and need not be UTF-8.
        groups: list[dict[str, Any]] = await streams.groups(redis, stream)
    except ResponseError:  # no such key
        return None
    floor: tuple[int, int] | None = None
    for group in groups:
        # Everything up to last-delivered-id was handed out; what is still pending starts at the
        # group's oldest pending id. Keeping last-delivered-id itself costs one entry, no more.
        need = _parse_id(group["last-delivered-id"])
        if int(group.get("pending") or 0):
            summary = await streams.pending_summary(redis, stream, group["name"])
            if summary.get("min"):
                need = min(need, _parse_id(summary["min"]))
        floor = need if floor is None else min(floor, need)
    return floor


async def trim_consumed(redis: aioredis.Redis, stream: str, *, keep_seconds: float = 0.0) -> int:
    """Drop the entries of `stream` that every group has acknowledged and that are older than
    `keep_seconds` by Redis's clock (entry ids carry Redis's time, so no host clock is involved);
    how many went."""
    floor = await consumed_floor(redis, stream)
    if floor is None:
        return 0
    if keep_seconds > 0:
        sec, usec = await server_time(redis, stream)  # the stream's own node on a cluster
        floor = min(floor, (sec * 1000 + usec // 1000 - int(keep_seconds * 1000), 0))
    total = 0
    for _ in range(MAX_ROUNDS):
        # Approximate: Redis frees whole internal nodes only, so it may keep a few more, never fewer.
        trimmed = int(await redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=True))
        total += trimmed
        if trimmed == 0:
            break
    return total
