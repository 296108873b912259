"""The probe queue on Redis Streams: key names, the connection helper, and the client API the
analyzer uses (enqueue jobs with dedup, iterate over results, acknowledge them).

Streams (prefix default `stepstone:`): `jobs` (group `probers`), `results` (group `analyzers`),
`dead` (jobs given up on, with `reason`, `job` and `src`). See docs/design.md for the field contract.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prober import streams
from prober.job import DEFAULT_PORTS, Job, JobError, Result
from prober.shards import CLUSTER_TRANSIENT, is_cluster, scheme_of
from prober.shards import client as cluster_client

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "stepstone:"
MAX_CONNECTIONS = 32  # per client; Redis answers in microseconds, more rarely helps
PROBERS = "probers"
ANALYZERS = "analyzers"

# Longest dedup window and job deadline a queue accepts (a year, a day): past them a setting is a
# typo, and their milliseconds would overflow Redis's expiry arithmetic.
MAX_DEDUP_WINDOW = 365 * 86400.0
MAX_DEADLINE = 86400.0

# Errors after which a client should reconnect and retry rather than give up (on a cluster, also
# a shard's slots not served for now: prober.shards).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, *CLUSTER_TRANSIENT)


class QueueConfigError(ValueError):
    """A Redis URL or queue setting that cannot work; the message is one line for the CLI."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key the prober uses, derived from one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def jobs(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    @property
    def stats(self) -> str:
        # hash of counters: deadline_dropped, dead_lettered, refused, malformed, probes
        return f"{self.prefix}prober:stats"

    @property
    def rate(self) -> str:
        return f"{self.prefix}prober:rate"

    def seen(self, src: str) -> str:
        return f"{self.prefix}seen:{src}"

    def target(self, src: str) -> str:
        return f"{self.prefix}prober:target:{src}"

    def probes_second(self, second: int) -> str:
        return f"{self.prefix}prober:probes:{second}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}prober:worker:{name}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}prober:worker:*"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # By hand, not urlsplit: a cluster URL's hosts, or a malformed URL, make it raise.
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    userinfo, at, hosts = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}{rest[end:]}"


def client(url: str) -> aioredis.Redis:
    """A client for `url` (redis://, rediss://, unix://; credentials in the URL); no I/O yet."""
    if scheme_of(url) not in ("redis", "rediss", "unix"):
        raise QueueConfigError(
            f"bad Redis URL {redact(url)!r}: expected redis://[user:password@]host[:port][/db], "
            "rediss://... (TLS) or unix://[user:password@]/path/to/socket")
    try:
        # A blocking pool: hundreds of concurrent probes then queue for a connection instead of
        # failing with "Too many connections" (the default pool raises).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, health_check_interval=30, max_connections=MAX_CONNECTIONS,
            timeout=None)
        return aioredis.Redis.from_pool(pool)
    except ValueError as exc:
        raise QueueConfigError(f"bad Redis URL {redact(url)!r}: {exc}") from None


async def connect(url: str) -> aioredis.Redis:
    """A connected client for `url` (a Redis Cluster's too: prober.shards); raises QueueConfigError
    with a one-line reason if Redis cannot be reached or refuses the credentials."""
    cluster = is_cluster(url)
    conn = cluster_client(url) if cluster else client(url)
    try:
        await conn.ping()
    except Exception as exc:
        await conn.aclose()
        what = "the Redis Cluster" if cluster else "Redis"
        raise QueueConfigError(f"cannot use {what} at {redact(url)}: {exc}") from None
    return conn


async def ensure_group(conn: aioredis.Redis, stream: str, group: str) -> None:
    """Create `group` on `stream` (and the stream) unless it exists. Starts at id 0 so entries
    written before anyone created the group are still delivered."""
    try:
        await conn.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# SET NX and XADD in one script: two analyzers racing on one address enqueue it once, and a
# crash between the two steps cannot leave the address marked as seen without a job.
_ENQUEUE = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
end
return false
"""


# The same for many addresses in one call, and the job id kept as the mark's value: a deduped
# enqueue learns at once which job it waits for (no second key to read, nothing to poll while
# another analyzer records it). KEYS: seen:<src> ..., then jobs; ARGV: window ms, n (values per
# job), then per job its n field/value items. Per address {1, id} for a new job, {0, value of the
# mark} for a deduped one ('' if gone; an older version's mark holds a time, not a job id).
_ENQUEUE_MANY = """
local jobs, n, out = KEYS[#KEYS], tonumber(ARGV[2]), {}
for i = 1, #KEYS - 1 do
  local base = 2 + (i - 1) * n
  if redis.call('SET', KEYS[i], '-', 'NX', 'PX', ARGV[1]) then
    local id = redis.call('XADD', jobs, '*', unpack(ARGV, base + 1, base + n))
    redis.call('SET', KEYS[i], id, 'KEEPTTL')
    out[i] = {1, id}
  else
    out[i] = {0, redis.call('GET', KEYS[i]) or ''}
  end
end
return out
"""


class ProbeQueue:
    """Client side of the queue, for the analyzer: enqueue probe jobs, read and ack results."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 dedup_window: float = 3600.0, deadline: float = 60.0) -> None:
        self.check_settings(dedup_window, deadline)
        self.redis = redis
        self.keys = Keys(prefix)
        self.dedup_window = dedup_window
        self.deadline = deadline
        self._enqueue = redis.register_script(_ENQUEUE)
        self._enqueue_many = redis.register_script(_ENQUEUE_MANY)
        self._lost_ack = False

    @staticmethod
    def check_settings(dedup_window: float, deadline: float) -> None:
        """QueueConfigError unless both settings are usable."""
        # Written so that nan and inf fail too (they passed `< 0` and broke int() in enqueue).
        if not (0 <= dedup_window <= MAX_DEDUP_WINDOW and 0 < deadline <= MAX_DEADLINE):
            raise QueueConfigError(
                f"dedup_window must be >= 0 and deadline > 0 seconds, both finite (at most "
                f"{MAX_DEDUP_WINDOW:.0f} and {MAX_DEADLINE:.0f}), not {dedup_window:g} and {deadline:g}")

    async def enqueue(self, src: str, t: float, *, ports: Sequence[int] | None = None) -> str | None:
        """Queue a probe of `src` for the SYN seen at epoch `t`; the job id, or None when `src` was
        enqueued within the dedup window. The job's deadline is `t` + `deadline`."""
        now = time.time()
        job = Job(id="", src=src, t=t, deadline=t + self.deadline, enqueued=now,
                  ports=tuple(ports) if ports else DEFAULT_PORTS)
        fields = job.fields()
        Job.from_fields("", fields)  # validate before it crosses into Redis
        flat = [item for pair in fields.items() for item in pair]
        window_ms = max(1, int(self.dedup_window * 1000))
        if self.dedup_window == 0:
            return str(await self.redis.xadd(self.keys.jobs, fields))  # type: ignore[arg-type]
        job_id = await self._enqueue(keys=[self.keys.seen(job.src), self.keys.jobs],
                                     args=[window_ms, repr(now), *flat])
        return None if job_id is None else str(job_id)

    async def enqueue_many(self, items: Sequence[tuple[str, float]], *, ports: Sequence[int] | None = None
                           ) -> list[tuple[bool, str | None]]:
        """`enqueue` for many (src, t) in one round trip. Per item: (True, job) if it enqueued a
        new job, else (False, the job the address's dedup mark names, or None if the mark does
        not name one: set by an older version)."""
        if not items:
            return []
        now = time.time()
        flats: list[list[str]] = []
        for src, t in items:
            job = Job(id="", src=src, t=t, deadline=t + self.deadline, enqueued=now,
                      ports=tuple(ports) if ports else DEFAULT_PORTS)
            fields = job.fields()
            Job.from_fields("", fields)  # validate before it crosses into Redis
            flats.append([item for pair in fields.items() for item in pair])
        if self.dedup_window == 0:
            async with self.redis.pipeline(transaction=False) as pipe:
                for flat in flats:
                    pipe.xadd(self.keys.jobs, dict(zip(flat[::2], flat[1::2], strict=True)))
                return [(True, str(x)) for x in await pipe.execute()]
        n = len(flats[0])
        if any(len(flat) != n for flat in flats):  # every job has the same fields; never happens
            raise ValueError("jobs with different fields cannot be enqueued together")
        args: list[object] = [max(1, int(self.dedup_window * 1000)), n]
        for flat in flats:
            args += flat
        replies = await self._enqueue_many(keys=[*(self.keys.seen(src) for src, _ in items), self.keys.jobs],
                                           args=args)
        return [(bool(created), str(value) or None) for created, value in replies]

    async def ensure_group(self, group: str = ANALYZERS) -> None:
        await ensure_group(self.redis, self.keys.results, group)

    async def results(self, consumer: str, *, group: str = ANALYZERS, block_ms: int = 1000
                      ) -> AsyncIterator[tuple[str, Result]]:
        """Results as (entry id, Result): first those delivered to `consumer` earlier and never
        acknowledged, then new ones, forever. Survives Redis restarts (reconnects, then re-reads
        its pending entries). Malformed entries are logged and acknowledged, never yielded."""
        backoff = 0.1
        while True:
            try:
                await ensure_group(self.redis, self.keys.results, group)
                last = "0"  # our own pending entries first
                while True:
                    entries = await self._read(consumer, group, last, None)
                    if not entries:
                        break
                    for entry_id, result in entries:
                        if result is not None:
                            yield entry_id, result
                    last = entries[-1][0]
                backoff = 0.1
                while not self._lost_ack:
                    for entry_id, result in await self._read(consumer, group, ">", block_ms):
                        if result is not None:
                            yield entry_id, result
                # An acknowledgement was lost: its entry is pending again; read our pending first.
                self._lost_ack = False
            except ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.warning("results: consumer group missing (%s); recreating it", exc)
            except TRANSIENT as exc:
                log.warning("results: Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)  # reconnect back-off, not synchronisation
                backoff = min(backoff * 2, 5.0)

    async def _read(self, consumer: str, group: str, start: str, block_ms: int | None
                    ) -> list[tuple[str, Result | None]]:
        # Undecoded, then one entry at a time: a byte that is not UTF-8 spoils its entry only.
        entries = await streams.read_group(self.redis, group, consumer, self.keys.results, start,
                                           count=256, block_ms=block_ms)
        out: list[tuple[str, Result | None]] = []
        for entry_id, raw in entries:
            try:
                if not raw:
                    raise JobError("entry was deleted (trimmed) before it was read")
                out.append((entry_id, Result.from_fields(streams.decode_entry(raw))))
            except (JobError, streams.EntryError) as exc:
                log.warning("results: dropping malformed entry %s: %s", entry_id, exc)
                await self.ack_result(entry_id, group=group)
                out.append((entry_id, None))
        return out

    async def ack_result(self, entry_id: str, *, group: str = ANALYZERS) -> None:
        """Acknowledge a result. If Redis is down the entry stays pending and `results` hands it
        out again once Redis is back (at least once), so a lost acknowledgement is only logged."""
        try:
            await self.redis.xack(self.keys.results, group, entry_id)
        except TRANSIENT as exc:
            log.warning("results: could not acknowledge %s (%s); it will be delivered again",
                        entry_id, exc)
            # redis-py may reconnect on the next read without raising: `results` must still go
            # back to this consumer's pending entries.
            self._lost_ack = True
