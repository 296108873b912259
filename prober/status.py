"""`stepstone-prober status`: the state of the queue, from Redis alone (no worker needs to answer)."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from prober.queue import ANALYZERS, PROBERS, Keys


def _id_ms(entry_id: str | None) -> int | None:
    if not entry_id:
        return None
    return int(entry_id.split("-", 1)[0])


async def gather(redis: aioredis.Redis, prefix: str) -> dict[str, Any]:
    keys = Keys(prefix)
    sec, usec = await redis.time()
    now_ms = sec * 1000 + usec // 1000
    out: dict[str, Any] = {"prefix": prefix, "now": now_ms / 1000}
    out["streams"] = {name: await redis.xlen(key) for name, key in
                      (("jobs", keys.jobs), ("results", keys.results), ("dead", keys.dead))}

    async def group_info(stream: str, group: str) -> dict[str, Any] | None:
        try:
            groups = await redis.xinfo_groups(stream)
        except ResponseError:  # no such stream yet
            return None
        found = next((g for g in groups if g["name"] == group), None)
        if found is None:
            return None
        summary = await redis.xpending(stream, group)
        consumers = await redis.xinfo_consumers(stream, group)
        oldest = _id_ms(summary.get("min"))
        return {
            "pending": summary["pending"],
            "lag": found.get("lag"),  # entries not delivered to anyone yet (None if Redis can't tell)
            "oldest_pending_age_s": None if oldest is None else round((now_ms - oldest) / 1000, 3),
            "consumers": [{"name": c["name"], "pending": c["pending"], "idle_s": c["idle"] / 1000}
                          for c in consumers],
        }

    out["probers"] = await group_info(keys.jobs, PROBERS)
    out["analyzers"] = await group_info(keys.results, ANALYZERS)

    workers = []
    async for key in redis.scan_iter(match=keys.worker_pattern, count=500):
        raw = await redis.get(key)
        if raw is None:
            continue
        try:
            info = json.loads(raw)
        except ValueError:
            info = {}
        workers.append({"name": key[len(keys.worker("")):], **info})
    out["workers_alive"] = sorted(workers, key=lambda w: w["name"])

    now_s = now_ms // 1000
    counts = await redis.mget([keys.probes_second(s) for s in range(now_s - 60, now_s)])
    out["probes_per_s_last_minute"] = round(sum(int(c) for c in counts if c) / 60, 3)
    out["counters"] = {k: int(v) for k, v in (await redis.hgetall(keys.stats)).items()}
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
