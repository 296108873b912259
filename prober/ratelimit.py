"""Rate limits shared by every worker through Redis: a global probes-per-second pace and a
minimum interval between two probes of one target.

The global limit is a reservation on a GCRA-style schedule kept in one key: each probe takes the
next free slot (1/rate apart, on Redis's own clock so hosts need not agree on time) and learns how
long to wait for it. Workers never poll or retry, and N workers together never exceed the rate.
"""

from __future__ import annotations

import redis.asyncio as aioredis

# KEYS[1] = schedule key; ARGV[1] = µs between probes, ARGV[2] = the longest wait the caller
# accepts (µs). Returns µs to wait before sending, or -1 without reserving anything when the next
# free slot is too far away (a job that would miss its deadline must not waste a slot).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(tat, now)
if slot - now > tonumber(ARGV[2]) then
  return -1
end
local ttl = 60000 + math.ceil((slot - now) / 1000)
redis.call('SET', KEYS[1], string.format('%.0f', slot + interval), 'PX', ttl)
return string.format('%.0f', slot - now)
"""

# KEYS[1] = per-target key; ARGV[1] = job id, ARGV[2] = interval in ms. A retry of the same job
# (another worker took it over after a crash) may probe again; any other job must wait.
# Returns 0 when allowed, else the ms left.
_TARGET = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local left = redis.call('PTTL', KEYS[1])
  if left < 1 then left = 1 end
  return left
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 0
"""


class GlobalRate:
    def __init__(self, redis: aioredis.Redis, key: str, per_second: float) -> None:
        if per_second < 0:
            raise ValueError("rate must be >= 0 probes/s (0 = unlimited)")
        self.per_second = per_second
        self.key = key
        self._script = redis.register_script(_RESERVE)

    async def reserve(self, max_wait: float) -> float | None:
        """Take the next probe slot; seconds to wait before sending (0 when unlimited), or None
        (nothing reserved) when that would be more than `max_wait` seconds."""
        if self.per_second == 0:
            return 0.0
        wait_us = int(await self._script(keys=[self.key], args=[round(1e6 / self.per_second),
                                                                 max(0, round(max_wait * 1e6))]))
        return None if wait_us < 0 else wait_us / 1e6


class TargetLimit:
    def __init__(self, redis: aioredis.Redis, interval: float) -> None:
        if interval < 0:
            raise ValueError("per-target interval must be >= 0 seconds")
        self.interval = interval
        self._script = redis.register_script(_TARGET)

    async def check(self, key: str, job_id: str) -> float | None:
        """None when `job_id` may probe the target now (and marks it); else seconds left."""
        if self.interval == 0:
            return None
        left_ms = int(await self._script(keys=[key], args=[job_id, max(1, round(self.interval * 1000))]))
        return None if left_ms == 0 else left_ms / 1000
