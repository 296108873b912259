"""`stepstone-prober status`: the state of the queue, from Redis alone (no worker needs to answer).

Everything is read undecoded (`prober.streams`): group, consumer and key names are anyone's
choice, and one that is not UTF-8 is shown with \\xNN escapes, never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from prober import streams
from prober.queue import ANALYZERS, PROBERS, Keys
from prober.shards import on_node, server_time


def _id_ms(entry_id: str | None) -> int | None:
    if not entry_id:
        return None
    return int(entry_id.split("-", 1)[0])


def _count(raw: bytes | None) -> int | None:
    """A counter Redis holds as text, or None when someone wrote something else there."""
    try:
        return int(raw.decode("ascii")) if raw is not None and len(raw) <= 20 else None
    except (UnicodeDecodeError, ValueError):
        return None


async def gather(redis: aioredis.Redis, prefix: str) -> dict[str, Any]:
    keys = Keys(prefix)
    sec, usec = await server_time(redis, keys.jobs)
    now_ms = sec * 1000 + usec // 1000
    out: dict[str, Any] = {"prefix": prefix, "now": now_ms / 1000}
    out["streams"] = {name: await redis.xlen(key) for name, key in
                      (("jobs", keys.jobs), ("results", keys.results), ("dead", keys.dead))}

    async def group_info(stream: str, group: str) -> dict[str, Any] | None:
        try:
            found = streams.find_group(await streams.groups(redis, stream), group)
        except ResponseError:  # no such stream yet
            return None
        if found is None:
            return None
        summary = await streams.pending_summary(redis, stream, group)
        consumers = await streams.consumers(redis, stream, group)
        oldest = _id_ms(summary.get("min"))
        return {
            "pending": summary["pending"],
            "lag": found.get("lag"),  # entries not delivered to anyone yet (None if Redis can't tell)
            "oldest_pending_age_s": None if oldest is None else round((now_ms - oldest) / 1000, 3),
            "consumers": [{"name": streams.shown(c["name"], 200), "pending": c["pending"],
                           "idle_s": c["idle"] / 1000} for c in consumers],
        }

    out["probers"] = await group_info(keys.jobs, PROBERS)
    out["analyzers"] = await group_info(keys.results, ANALYZERS)

    workers = []
    prefix = keys.worker("").encode()
    cursor: int | bytes = 0
    node = await on_node(redis, keys.jobs)  # on a cluster, SCAN the node of this prefix's shard
    while True:
        reply = await redis.execute_command(
            "SCAN", cursor, "MATCH", keys.worker_pattern, "COUNT", 500, **node, **{NEVER_DECODE: []})
        cursor, found_keys = reply
        if isinstance(cursor, dict):  # a cluster client: a cursor per node (here, the one node)
            (cursor,) = cursor.values()
        for key in found_keys:
            raw = await redis.execute_command("GET", key, **{NEVER_DECODE: []})
            if raw is None:
                continue
            try:
                info = json.loads(raw)
            except (ValueError, RecursionError):
                info = {}
            if not isinstance(info, dict):
                info = {}
            # The heartbeat's fields are shown as they are; its name is always our own, from the key.
            workers.append({**info, "name": streams.shown(key[len(prefix):], 200)})
        if int(cursor) == 0:
            break
    out["workers_alive"] = sorted(workers, key=lambda w: w["name"])

    now_s = now_ms // 1000
    counts = await redis.execute_command(
        "MGET", *[keys.probes_second(s) for s in range(now_s - 60, now_s)], **{NEVER_DECODE: []})
    out["probes_per_s_last_minute"] = round(sum(_count(c) or 0 for c in counts) / 60, 3)
    stats = await redis.execute_command("HGETALL", keys.stats, **{NEVER_DECODE: []})
    out["counters"] = {streams.shown(k, 200): n for k, v in (stats or {}).items()
                       if (n := _count(v)) is not None}
    return out


def render(status: dict[str, Any]) -> str:
    s = status["streams"]
    # Lengths, not totals: a running analyzer trims what every group is done with (the counters
    # below are the totals).
    lines = [f"stream lengths ({status['prefix']}): "
             f"jobs {s['jobs']}, results {s['results']}, dead {s['dead']}"]
    for label in ("probers", "analyzers"):
        g = status[label]
        if g is None:
            lines.append(f"group {label}: not created yet")
            continue
        age = g["oldest_pending_age_s"]
        oldest = "none" if age is None else f"{age:.1f}s old"
        lines.append(f"group {label}: pending {g['pending']}, not yet delivered {g['lag']}, "
                     f"oldest pending: {oldest}")
        for c in g["consumers"]:
            lines.append(f"  consumer {c['name']}: pending {c['pending']}, idle {c['idle_s']:.1f}s")
    workers = status["workers_alive"]
    lines.append(f"workers alive: {len(workers)}")
    for w in workers:
        lines.append(f"  {w['name']}: in hand {w.get('in_hand', '?')}, probes {w.get('probes', 0)}"
                     + (" (stopping)" if w.get("stopping") else ""))
    lines.append(f"probes/s over the last minute: {status['probes_per_s_last_minute']:g}")
    c = status["counters"]
    lines.append("counters: " + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none yet"))
    return "\n".join(lines)
