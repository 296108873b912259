"""Shards: how stepstone's Redis state is split by source address, and how every process reaches it.

One Redis (`redis://`, `rediss://`, `unix://`) with one shard is the default, and then nothing
here changes a key: everything lives under the prefix (`stepstone:handshakes`, ...).

With N shards (`--shards N`, N > 1) or on a Redis Cluster (`redis+cluster://`), shard i's keys are
all under `<prefix>{i}:` (`stepstone:{3}:handshakes`, `stepstone:{3}:hs:<id>`,
`stepstone:{3}:src:<addr>`). The braces are a Redis Cluster hash tag: every key of a shard hashes to
one slot, so each Lua script and pipeline of the analyzer and prober (their keys are all under one
prefix) stays on one node, and a cluster spreads the shards over its masters.

A source belongs to shard `crc32(canonical address text) mod N` (`shard_of`; the canonical text is
`prober.job.address`, e.g. `2001:db8::1`, never `2001:DB8:0::1`). Every producer (the responder, the
Zeek feed) and every consumer must use the same N: a handshake written to another shard than its
source's would be judged without the source's other records.

Cluster URLs: `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` for
TLS). Give several nodes: a process (re)starting while the only one named is down cannot find the
others. The query option `wait_replicas=K` (`?wait_replicas=1&wait_timeout=1000`, milliseconds)
makes the producers wait until K replicas have each batch of handshakes (WAIT) before they forget
it; see `Appender` and docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from prober.job import address

log = logging.getLogger("stepstone.shards")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
MAX_SHARDS = 16384  # one per cluster slot at most: more could not be spread any further
# Errors of a cluster that is failing over, or whose slots of a shard are not served right now:
# retried like a lost connection (which is what a dead master's shard gives), never fatal.
# (SlotNotCoveredError and "cannot be connected" are RedisClusterException; so are a few errors
# that are bugs, such as a command whose keys span slots: a bug is retried too, and logged.)
CLUSTER_TRANSIENT: tuple[type[Exception], ...] = (ClusterDownError, TryAgainError, RedisClusterException)
# redis-py's own retries of a failed command on a cluster: none. Before it retries a pipeline it
# closes every connection of the client, and the commands other tasks have in flight on them then
# fail with AttributeError instead of a connection error (a service's loops would stop); every
# caller here retries by itself, with backoff, and counts it. A failed command still makes the
# client re-read the slot map before the next one.
RETRIES = 0
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:,\[\]]+):([0-9]{1,5})")


class ShardError(ValueError):
    """A shard setting or Redis URL that cannot work; the message is one line for the CLI."""


# -- which shard ------------------------------------------------------------------------------


def shard_of(src: str, count: int) -> int:
    """The shard of a source address: crc32 of its canonical text, mod `count` (ValueError if it
    is not an address)."""
    if count == 1:
        return 0
    return zlib.crc32(address(src).encode("ascii")) % count


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each shard's keys are: `prefix` itself (one shard on one Redis: the keys of old), or
    `<prefix>{i}:` (`tagged`: several shards, or a cluster, which needs the hash tag even for one)."""

    prefix: str = "stepstone:"
    count: int = 1
    tagged: bool = False

    def prefix_of(self, shard: int) -> str:
        if not 0 <= shard < self.count:
            raise ValueError(f"shard {shard} of {self.count}")
        return f"{self.prefix}{{{shard}}}:" if self.tagged else self.prefix

    def shard_of(self, src: str) -> int:
        return shard_of(src, self.count)

    def prefix_for(self, src: str) -> str:
        return self.prefix_of(self.shard_of(src))


def layout(prefix: str, count: int, url: str) -> Layout:
    if not 1 <= count <= MAX_SHARDS:
        raise ShardError(f"--shards: 1 to {MAX_SHARDS}, not {count}")
    tagged = count > 1 or is_cluster(url)
    if tagged and ("{" in prefix or "}" in prefix):
        # Redis Cluster hashes the first {...} of a key: a brace in the prefix would be that tag,
        # and every shard would land in one slot (one node), silently.
        raise ShardError(f"--prefix: no '{{' or '}}' in a sharded prefix (the shard's hash tag follows it): "
                         f"{prefix!r}")
    return Layout(prefix=prefix, count=count, tagged=tagged)


def parse_shard_list(text: str | None, count: int) -> tuple[int, ...]:
    """`--shard LIST`: comma-separated shard numbers and ranges (`0,3-5`); None = all `count`."""
    if text is None:
        return tuple(range(count))
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?", part)
        if m is None:
            raise ShardError(f"--shard: not a list of shard numbers and ranges (0,3-5): {text!r}")
        low, high = int(m[1]), int(m[2] or m[1])
        if not low <= high < count:
            raise ShardError(f"--shard: {part.strip()} is not within 0-{count - 1} (--shards {count})")
        out.update(range(low, high + 1))
    return tuple(sorted(out))


# -- connecting -------------------------------------------------------------------------------


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ('' if none), without parsing the rest: a cluster URL's
    several `[v6]:port` hosts are no netloc that `urlsplit` accepts (newer Pythons raise
    "Invalid IPv6 URL"), and a malformed URL must still get its one-line error."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def is_cluster(url: str) -> bool:
    return scheme_of(url) in CLUSTER_SCHEMES


def split_url(url: str) -> tuple[str, str, str, str]:
    """(scheme, netloc, path, query) of a URL, split by hand for the same reason (no '#' fragment
    is kept)."""
    scheme, _, rest = url.partition("://")
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return scheme.lower(), netloc, slash + path, query


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000


def parse_cluster_url(url: str) -> ClusterUrl:
    """ShardError (one line) unless `url` is a usable redis+cluster:// URL."""
    scheme, netloc, path, query = split_url(url)
    if scheme not in CLUSTER_SCHEMES:
        raise ShardError(f"not a Redis Cluster URL (redis+cluster://HOST:PORT[,HOST:PORT...]): {scheme}://...")
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        m = _HOST_PORT.fullmatch(item)
        if m is None or not 0 < int(m[2]) < 65536:
            raise ShardError(f"redis+cluster: not HOST:PORT: {item!r}")
        nodes.append((m[1].strip("[]"), int(m[2])))
    if path not in ("", "/", "/0"):
        raise ShardError("redis+cluster: a cluster has database 0 only (no /DB)")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(options) - {"wait_replicas", "wait_timeout"}
    if unknown:
        raise ShardError(f"redis+cluster: unknown option {sorted(unknown)[0]!r} "
                         "(known: wait_replicas, wait_timeout)")
    try:
        replicas = int(options.get("wait_replicas", "0"))
        timeout = int(options.get("wait_timeout", "1000"))
    except ValueError:
        raise ShardError("redis+cluster: wait_replicas and wait_timeout are whole numbers") from None
    if not (0 <= replicas <= 16 and 1 <= timeout <= 60_000):
        raise ShardError("redis+cluster: wait_replicas is 0-16, wait_timeout 1-60000 ms")
    return ClusterUrl(nodes=tuple(nodes), tls=scheme == "rediss+cluster",
                      username=unquote(user) or None, password=unquote(password) if password else None,
                      wait_replicas=replicas, wait_timeout_ms=timeout)


class EvalScript:
    """A Lua script for a cluster client, run with EVAL (the text each time; Redis keeps it
    compiled): redis-py refuses EVALSHA in a cluster pipeline, and EVAL never meets NOSCRIPT on a
    replica that has just been promoted. Same call as redis-py's scripts: keys, args, client."""

    def __init__(self, registered_client: RedisCluster, script: str) -> None:
        self.registered_client = registered_client
        self.script = script

    async def __call__(self, keys: Sequence[Any] | None = None, args: Sequence[Any] | None = None,
                       client: Any = None) -> Any:
        keys = list(keys or ())
        if not keys:
            # A cluster routes a script by its keys; every script of ours names its keys.
            raise RedisClusterException("a script on a cluster needs at least one key")
        target = self.registered_client if client is None else client
        reply = target.execute_command("EVAL", self.script, len(keys), *keys, *(args or ()))
        if isinstance(target, ClusterPipeline):
            return reply  # queued; never awaited: awaiting a cluster pipeline empties its queue
        return await reply


def _closed_under(exc: AttributeError, what: object) -> RedisConnectionError:
    # redis-py's cluster client may disconnect a connection (after another command on the same
    # node failed) while a command is being sent on it: the send then fails on the connection's
    # missing writer, an AttributeError. It is a lost connection: say so, so callers retry it.
    return RedisConnectionError(f"connection closed under {what}: {exc}")


class _Pipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as exc:
            raise _closed_under(exc, "a pipeline") from exc


class Cluster(RedisCluster):
    """redis-py's cluster client, with scripts that work in pipelines (`EvalScript`), and a
    connection closed under a command reported as the connection error it is."""

    def register_script(self, script: str | bytes) -> EvalScript:  # type: ignore[override]
        return EvalScript(self, script.decode() if isinstance(script, bytes) else script)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _Pipeline(self, transaction)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            raise _closed_under(exc, args[0] if args else "a command") from exc


def client(url: str, *, decode_responses: bool = True, socket_connect_timeout: float | None = 5,
           health_check_interval: float = 30, retries: int = RETRIES) -> Any:
    """A client for `url`, no I/O yet: redis-py's own for one Redis (as before), a `Cluster` for a
    redis+cluster:// URL (`retries`: redis-py's own retries of a command or pipeline that failed).
    ShardError (one line) for a URL that cannot work."""
    if not is_cluster(url):
        try:
            return aioredis.from_url(url, decode_responses=decode_responses,
                                     socket_connect_timeout=socket_connect_timeout,
                                     health_check_interval=health_check_interval)
        except ValueError as exc:
            raise ShardError(str(exc)) from None
    spec = parse_cluster_url(url)
    return Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in spec.nodes],
        username=spec.username, password=spec.password, ssl=spec.tls,
        decode_responses=decode_responses, socket_connect_timeout=socket_connect_timeout,
        health_check_interval=health_check_interval,
        # A shard whose master is dead (no replica) keeps its slots on that node: the slot map
        # stays complete, but do not insist on it either.
        require_full_coverage=False,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        reinitialize_steps=0,  # on MOVED, patch the slot map: never close every connection as above
        max_connections=1024,  # per node: blocking reads of every stream of every shard served
    )


def wait_replicas(url: str) -> tuple[int, int]:
    """(replicas, timeout ms) the producers wait for after each write: the URL's wait_replicas and
    wait_timeout on a cluster; (0, 0) otherwise."""
    if not is_cluster(url):
        return 0, 0
    spec = parse_cluster_url(url)
    return spec.wait_replicas, spec.wait_timeout_ms


async def on_node(redis: Any, key: str) -> dict[str, Any]:
    """The keyword that sends a keyless command (TIME, SCAN, WAIT) to the node holding `key` on a
    cluster (any other node may be down, and holds none of that shard's keys); {} for one Redis."""
    if not isinstance(redis, RedisCluster):
        return {}
    await redis.initialize()  # the slot map (a no-op once read)
    return {"target_nodes": redis.get_node_from_key(key)}


async def server_time(redis: Any, key: str) -> tuple[int, int]:
    """TIME of the server that holds `key`."""
    sec, usec = await redis.execute_command("TIME", **await on_node(redis, key))
    return int(sec), int(usec)


def merge(registries: Mapping[int, Any], *extra: Any) -> Any:
    """One Prometheus registry showing several shards' registries, each sample labelled `shard`
    (and the `extra` collectors as they are): one /metrics endpoint per process, whatever the
    shards it serves."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    class _ByShard:
        def collect(self) -> Any:
            families: dict[str, Metric] = {}
            for shard, registry in registries.items():
                for metric in registry.collect():
                    family = families.get(metric.name)
                    if family is None:
                        family = families[metric.name] = Metric(metric.name, metric.documentation,
                                                                metric.type, metric.unit)
                    family.samples += [s._replace(labels={**s.labels, "shard": str(shard)})
                                       for s in metric.samples]
            return list(families.values())

    merged = CollectorRegistry(auto_describe=True)
    merged.register(_ByShard())  # type: ignore[arg-type]
    for collector in extra:
        merged.register(collector)
    return merged


# -- producing --------------------------------------------------------------------------------


class Item(Protocol):
    """What a producer hands over: a handshake (`analyzer.handshake.Handshake`)."""

    src: str

    def to_fields(self) -> dict[str, str]: ...


async def append_many(redis: Any, stream: str, entries: Sequence[Mapping[str, str]], *, maxlen: int,
                      replicas: int = 0, timeout_ms: int = 1000) -> int | None:
    """XADD the entries (one round trip), then, with `replicas`, WAIT on the same connection until
    that many replicas have them (or `timeout_ms`); how many did (None: not asked).

    On a cluster, give a client made with `retries=0`: redis-py retries a failed pipeline by
    itself, and on that retry WAIT (which has no key) no longer goes to the stream's node."""
    node = await on_node(redis, stream) if replicas else {}
    async with redis.pipeline(transaction=False) as pipe:
        for fields in entries:
            pipe.xadd(stream, dict(fields), maxlen=maxlen, approximate=True)
        if replicas:
            # WAIT has no key: sent to the stream's node, in the same pipeline (one connection),
            # so it waits for these very writes.
            pipe.execute_command("WAIT", replicas, timeout_ms, **node)
        replies = await pipe.execute()
    if not replicas:
        return None
    if node and (await on_node(redis, stream))["target_nodes"].name != node["target_nodes"].name:
        return 0  # the slot moved during the write (MOVED): the WAIT ran on the old node, proves nothing
    return int(replies[-1])


class Appender:
    """The producers' side of the shards: each item goes to its source's shard's stream, through
    one bounded queue and one sender per shard, so a shard whose master is down holds up its own
    items only (the oldest of them are dropped, and counted, once its queue is full) and every other
    shard goes on. A sender writes what its queue holds in one round trip and retries (backing off)
    until Redis takes it: an item is written at least once, twice if a write whose reply was lost
    had in fact landed.

    With `replicas` (the URL's wait_replicas), a batch counts as written once that many replicas
    have it: Redis replicates asynchronously, so a master that dies right after acknowledging a
    write can take it along, and a failover then loses it. A batch whose WAIT times out (a replica
    down or far behind) is not retried (it is on the master; writing it again would duplicate it) but
    counted in `unreplicated`.

    Counts for /metrics (the responder's `Counts`): received, sent, dropped, redis_errors,
    unreplicated, backlog()."""

    def __init__(self, clients: Mapping[int, Any], layout: Layout, stream: str = "handshakes", *,
                 backlog: int = 100_000, maxlen: int = 1_000_000, batch: int = 500, replicas: int = 0,
                 timeout_ms: int = 1000) -> None:
        self.layout = layout
        self.clients = dict(clients)
        self.stream = stream
        self.maxlen = maxlen
        self.batch = batch
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.queues: dict[int, asyncio.Queue[Item]] = {i: asyncio.Queue(backlog) for i in self.clients}
        self.received = 0
        self.sent = 0
        self.dropped = 0
        self.redis_errors = 0
        self.unreplicated = 0
        self.misrouted = 0  # an item of a shard this producer has no client for (never: all shards)
        self._writing: dict[int, int] = dict.fromkeys(self.queues, 0)  # per shard: the batch in hand

    def backlog(self) -> int:
        """Items held in memory: queued, or in a write not yet acknowledged."""
        return sum(q.qsize() for q in self.queues.values()) + sum(self._writing.values())

    def put(self, item: Item) -> None:
        self.received += 1
        queue = self.queues.get(self.layout.shard_of(item.src))
        if queue is None:
            self.misrouted += 1
            self.dropped += 1
            return
        if queue.full():
            queue.get_nowait()
            queue.task_done()
            self.dropped += 1
        queue.put_nowait(item)

    async def run(self) -> None:
        await asyncio.gather(*(self._send(i) for i in self.queues))

    async def _send(self, shard: int) -> None:
        queue, redis = self.queues[shard], self.clients[shard]
        stream = self.layout.prefix_of(shard) + self.stream
        failing = short = False
        while True:
            batch = [await queue.get()]
            while len(batch) < self.batch and not queue.empty():
                batch.append(queue.get_nowait())
            entries = [item.to_fields() for item in batch]
            self._writing[shard] = len(batch)
            delay = 0.1
            while True:
                try:
                    acked = await append_many(redis, stream, entries, maxlen=self.maxlen,
                                              replicas=self.replicas, timeout_ms=self.timeout_ms)
                    break
                except (RedisError, OSError, *CLUSTER_TRANSIENT) as exc:
                    self.redis_errors += 1
                    if isinstance(redis, RedisCluster):
                        # Read the slot map afresh before the next try (its master may have moved).
                        with contextlib.suppress(Exception):
                            await redis.aclose()
                    if not failing:  # once per outage, not once per retry
                        log.warning("shard %d: cannot write %s (%s); %d handshakes held, retrying",
                                    shard, stream, exc, queue.qsize() + len(batch))
                        failing = True
                    await asyncio.sleep(delay)  # backoff before retrying, not synchronisation
                    delay = min(delay * 2, 5.0)
            if failing:
                log.warning("shard %d: writing %s again", shard, stream)
                failing = False
            if acked is not None and acked < self.replicas:
                self.unreplicated += len(batch)
                if not short:
                    log.warning("shard %d: %d of %d replicas acknowledged within %d ms; going on "
                                "(a failover now could lose these handshakes)", shard, acked,
                                self.replicas, self.timeout_ms)
                    short = True
            elif short:
                short = False
            self.sent += len(batch)
            self._writing[shard] = 0
            for _ in batch:
                queue.task_done()

    async def drain(self, grace: float) -> None:
        """On shutdown: give queued items a bounded chance to reach Redis."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(q.join() for q in self.queues.values()))

    async def close(self) -> None:
        for redis in self.clients.values():
            with contextlib.suppress(Exception):
                await redis.aclose()


class AppenderMetrics:
    """An `Appender`'s counts as Prometheus metrics, read when scraped: `<ns>_shard_writes{what}`
    (received, written, dropped from a full backlog, retried writes, unreplicated: written while
    fewer replicas than wait_replicas acknowledged) and `<ns>_shard_backlog`."""

    def __init__(self, appender: Appender, namespace: str) -> None:
        self.appender = appender
        self.namespace = namespace

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        a = self.appender
        writes = CounterMetricFamily(f"{self.namespace}_shard_writes",
                                     "Handshakes handed to the shards' streams: received, written, "
                                     "dropped (a shard's full backlog), retried (failed writes, retried), "
                                     "unreplicated (written while fewer replicas than wait_replicas "
                                     "acknowledged)",
                                     labels=["what"])
        for what, value in (("received", a.received), ("written", a.sent), ("dropped", a.dropped),
                            ("retried", a.redis_errors), ("unreplicated", a.unreplicated)):
            writes.add_metric([what], value)
        backlog = GaugeMetricFamily(f"{self.namespace}_shard_backlog",
                                    "Handshakes held in memory for a shard, not yet written")
        backlog.add_metric([], a.backlog())
        return [writes, backlog]


def clients(url: str, shards: Sequence[int], *, retries: int = RETRIES) -> dict[int, Any]:
    """One client per shard: a cluster client's pipeline that fails on a dead node closes all that
    client's connections (redis-py, before it retries), which would break every other shard's
    commands in flight on a shared client."""
    return {i: client(url, retries=retries) for i in shards}


def producer_clients(url: str, shards: Sequence[int]) -> dict[int, Any]:
    """`clients` for an `Appender`: without redis-py's own retries (`append_many` says why; the
    Appender retries itself)."""
    return clients(url, shards, retries=0)
