"""`stepstone-analyzer run` on sharded Redis state (`--shards N`, or a `redis+cluster://` URL).

One `Service` per shard served (`--shard`, default all), in one process: each has its own Redis
client (prober.shards.clients says why), its own keys (`<prefix>{i}:`) and its own logs
(`LOG_DIR/shard-<i>/`: a log's lines are keyed by the entry id on its shard's `handshakes` stream,
and two shards' ids can be equal). One /metrics endpoint for the process, each sample labelled
`shard`. With --zeek: one Zeek client for the process; its handshakes go to their sources'
shards (`analyzer.feeds.zeek_to_shards`), and every served shard's `verdicts` go back to it.

A shard whose Redis is down does not stop the others: its service retries (its stream loops back
off and count `errors{kind="redis"}`), and one that cannot start waits and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from analyzer.cancellation import cancel_and_wait
from analyzer.errors import InputError
from analyzer.feeds import zeek_to_shards
from analyzer.handshake import Handshake, HandshakeError
from analyzer.service import TRANSIENT, Config, Service
from prober import shards
from prober.job import short
from prober.metrics import serve as serve_metrics
from prober.queue import redact

log = logging.getLogger("stepstone.analyzer")

START_BACKOFF_MAX = 10.0  # seconds between two tries to start a shard whose Redis is down


class SharedZeek:
    """The process's one Zeek client as each shard's service sees it: verdicts go through it (and
    its state shows in each shard's gauges), but its handshakes are taken once, by the process's
    sharded feed, never by a shard's own feed (which would put them all on its shard)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._closed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def handshakes(self) -> AsyncIterator[Handshake]:
        await self._closed.wait()
        return
        yield  # an async generator that yields nothing

    async def close(self) -> None:
        self._closed.set()  # the process closes the client itself, once


async def _start(config: Config, shard: int, layout: shards.Layout, stop: asyncio.Event) -> Service | None:
    """Start shard `shard`'s service; while its Redis is unreachable, try again (backing off) until
    `stop` (then None). Bad configuration is an InputError, at once."""
    key = layout.prefix_of(shard) + "handshakes"
    probe = shards.client(config.redis_url)
    backoff, said = 0.5, False
    try:
        while not stop.is_set():
            try:
                # Its node first: Service.start reads state back and fails on a dead node.
                await shards.server_time(probe, key)
                service = await Service.start(replace(
                    config, prefix=layout.prefix_of(shard), log_dir=config.log_dir / f"shard-{shard}",
                    metrics_port=0, zeek_url=None, shards=1, shard_ids=()))
                if said:
                    log.info("shard %d: Redis reachable again; started", shard)
                return service
            except (InputError, *TRANSIENT) as exc:
                # Service.start says "cannot reach Redis" as an InputError: here that is the shard's
                # node dying after the check above, so wait like for any outage; anything else (a
                # log dir, the p0f database) is bad configuration.
                if isinstance(exc, InputError) and await _reachable(probe, key):
                    raise
                if not said:
                    log.warning("shard %d: Redis unreachable (%s); its service waits, the others run",
                                shard, exc)
                    said = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, START_BACKOFF_MAX)
        return None
    finally:
        await probe.aclose()


async def _reachable(probe: Any, key: str) -> bool:
    try:
        await shards.server_time(probe, key)
    except TRANSIENT:
        return False
    return True


async def serve_shards(config: Config, stop: asyncio.Event) -> int:
    """Serve the configured shards until `stop`; 0, or 1 if a shard's service failed."""
    try:
        layout = shards.layout(config.prefix, config.shards, config.redis_url)
        replicas, wait_ms = shards.wait_replicas(config.redis_url)
    except shards.ShardError as exc:
        raise InputError(f"--redis: {exc}") from None
    served = config.shard_ids or tuple(range(config.shards))
    # No node reachable at all is a configuration error, as on one Redis (a shard whose node is
    # down is not: its service waits, below).
    probe = shards.client(config.redis_url)
    try:
        await asyncio.wait_for(probe.ping(), 10)
    except (RedisError, OSError, TimeoutError, *shards.CLUSTER_TRANSIENT) as exc:
        raise InputError(f"--redis: cannot reach Redis at {redact(config.redis_url)}: {exc}") from None
    finally:
        await probe.aclose()
    services: dict[int, Service] = {}
    registries: dict[int, Any] = {}
    zeek: Any = None
    appender: shards.Appender | None = None
    stop_metrics: Callable[[], None] | None = None
    side: list[asyncio.Task[Any]] = []

    async def one(shard: int) -> int:
        service = await _start(config, shard, layout, stop)
        if service is None:
            return 0
        services[shard] = service
        registries[shard] = service.metrics.registry
        if zeek is not None:
            service.zeek = SharedZeek(zeek)
        return await service.run(stop)

    try:
        if config.zeek_url:
            from analyzer.zeek import ZeekClient

            zeek = ZeekClient(config.zeek_url)
            # Zeek's handshakes are of any source: every shard, served here or not.
            writers = shards.producer_clients(config.redis_url, range(config.shards))
            appender = shards.Appender(writers, layout, replicas=replicas, timeout_ms=wait_ms)

            def rejected(handshake: Handshake, exc: HandshakeError) -> None:
                log.warning("zeek handshake %s -> %s rejected: %s", short(handshake.src),
                            short(handshake.dst), exc)

            side = [asyncio.create_task(zeek_to_shards(zeek, appender, on_reject=rejected),
                                        name="the sharded Zeek feed"),
                    asyncio.create_task(appender.run(), name="the shard writers")]
        if config.metrics_port:
            extra = [shards.AppenderMetrics(appender, "stepstone_analyzer_zeek_feed")] if appender else []
            try:
                stop_metrics = serve_metrics(shards.merge(registries, *extra), config.metrics_port,
                                             config.metrics_addr)
            except OSError as exc:
                raise InputError(f"--metrics-port: cannot serve on {config.metrics_addr}:"
                                 f"{config.metrics_port}: {exc}") from None
        log.info("serving shards %s of %d (keys under %s)", ",".join(map(str, served)), config.shards,
                 layout.prefix_of(served[0]).replace(f"{{{served[0]}}}", "{i}"))
        runs = [asyncio.create_task(one(i), name=f"shard {i}") for i in served]
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *runs, *side], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in side if t.done() and not stop.is_set()]
        for task in failed:
            log.error("%s ended: %r; stopping", task.get_name(),
                      None if task.cancelled() else task.exception())
        stop.set()  # one shard's service stopping on a failure stops the process, as unsharded
        await stopping
        codes = await asyncio.gather(*runs, return_exceptions=True)
        for shard, code in zip(served, codes, strict=True):
            if isinstance(code, BaseException):
                if isinstance(code, InputError):
                    raise code
                log.error("shard %d failed: %r", shard, code)
        if appender is not None:
            await appender.drain(2.0)
            if unsent := appender.backlog():
                # Never silently: Zeek's handshakes this process held and no shard took.
                log.warning("stopping with %d Zeek handshakes not written (their shards' Redis did not "
                            "take them in time); lost", unsent)
        return 1 if failed or any(c != 0 for c in codes) else 0
    finally:
        await cancel_and_wait(side)
        for service in services.values():
            with contextlib.suppress(Exception):
                await service.close()
        if zeek is not None:
            with contextlib.suppress(Exception):
                await zeek.close()
        if appender is not None:
            await appender.close()
        if stop_metrics is not None:
            stop_metrics()
