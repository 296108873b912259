"""Sharded streams end to end on a real local Redis Cluster, with one master SIGKILLed mid-run.

The pipeline runs in this process, with the real code of each part: the responder's producer
(`responder.cli._sink`: one stream per shard, `prober.shards.Appender`), the analyzer
(`analyzer.service.serve` with --shards 6: one service per shard) and the prober's workers
(`prober.worker.Worker`, one per shard) with a probe function that answers at once (no packet is
sent). 600 sources, one handshake each, spread over 6 shards on 3 masters. Half the handshakes
are sent, the master of shard 0 is killed once some verdicts are out, then the other half.

- Without replicas: the shards on the dead master stop; every other shard completes. Lost: every
  handshake of the dead master's shards not judged before the kill (what its streams held, and
  what the producer still holds for it, retried until the master comes back, which it never does
  here: without persistence a restarted master is empty).
- With one replica per master (6 nodes), the producer writing with `wait_replicas=1`: the replica
  takes over and every handshake gets its verdict (its line in records.log: record and verdict).

A handshake counts as judged by its records.log line (one per measured handshake; every handshake
here is measured: one per source, under --sample-per-source).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from analyzer.service import Config, serve
from lab.redis_cluster import LocalCluster, unavailable_reason
from prober import shards
from prober.audit import AuditLog
from prober.job import Job, Result
from prober.safety import TargetPolicy
from prober.worker import Worker, WorkerSettings
from responder.cli import _sink
from tests.service_harness import free_port, handshake, lines, scrape, until

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no local Redis Cluster: {REASON}")

N = 6
SOURCES = [f"198.18.{i // 250}.{1 + i % 250}" for i in range(600)]
PREFIX = "stepstone:"


async def instant(job: Job) -> Result:
    """The prober's answer without a probe: a ping a little faster than the handshake's RTT."""
    return Result(job=job.id, src=job.src, t=job.t, ping_min_us=9000, ping_avg_us=10000, ping_max_us=12000,
                  ping_var_us2=1e6, ping_loss=0.0, syn_rtt_us=10000, fa=None, fa_port=None,
                  probed_at=time.time())


def verdicts(log_dir: Path, log: str = "records.log") -> dict[int, Counter[str]]:
    """Per shard, how many lines each source has in `log`: records.log, one line per handshake
    measured, with its record and its source's verdict; stepstone.log, one per verdict change."""
    return {i: Counter(line["src"] for line in lines(log_dir / f"shard-{i}" / log)) for i in range(N)}


class Pipeline:
    def __init__(self, cluster: LocalCluster, tmp: Path, *, producer_url: str) -> None:
        self.cluster = cluster
        self.layout = shards.layout(PREFIX, N, cluster.url)
        self.log_dir = tmp / "logs"
        self.metrics_port = free_port()
        self.stop = asyncio.Event()
        self.audit = AuditLog(tmp / "audit.log", worker="p1")
        self.sink = _sink(producer_url, PREFIX, N)
        self.tasks: list[asyncio.Task[Any]] = []
        self.workers: list[Worker] = []
        self.unjudged_at_kill: set[str] = set()
        self.at_kill = (0, 0)  # the producer's backlog and unreplicated count when the master died

    async def start(self) -> None:
        config = Config(redis_url=self.cluster.url, handshakes=True, zeek_url=None, log_dir=self.log_dir,
                        metrics_port=self.metrics_port, consumer="a1", claim_after=5.0, shards=N)
        self.tasks.append(asyncio.create_task(serve(config, stop=self.stop), name="analyzer"))
        self.audit.open()
        policy = TargetPolicy(allow=(ipaddress.ip_network("198.18.0.0/15"),))
        for i in range(N):
            settings = WorkerSettings(prefix=self.layout.prefix_of(i), name="p1", rate=0, target_interval=0,
                                      claim_idle=5.0, block_ms=200)
            worker = Worker(shards.client(self.cluster.url), instant, policy=policy, audit=self.audit,
                            settings=settings)
            self.workers.append(worker)
            self.tasks.append(asyncio.create_task(worker.run(self.stop), name=f"prober {i}"))
        self.tasks.append(asyncio.create_task(self.sink.run(), name="producer"))

    def send(self, sources: list[str]) -> None:
        now = time.time()
        for n, src in enumerate(sources):
            self.sink.put(handshake(src, "198.19.0.1", t=now, sport=40000 + n % 20000))

    async def close(self) -> None:
        self.stop.set()
        analyzer, *rest = self.tasks
        code = await asyncio.wait_for(analyzer, 30)
        for task in rest[:-1]:
            await asyncio.wait_for(task, 30)
        rest[-1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rest[-1]
        await self.sink.close()
        for worker in self.workers:
            await worker.redis.aclose()
        self.audit.close()
        assert code == 0, "the analyzer stopped on a failure"


async def run_with_kill(cluster: LocalCluster, tmp: Path, *, producer_url: str
                        ) -> tuple[Pipeline, set[int], int]:
    """Start everything, send half, kill shard 0's master once 50 verdicts are out, send the rest;
    the pipeline, the shards that were on the dead master, and its port."""
    pipe = Pipeline(cluster, tmp, producer_url=producer_url)
    await pipe.start()
    half = len(SOURCES) // 2
    pipe.send(SOURCES[:half])
    async def some() -> bool:
        return sum(sum(c.values()) for c in verdicts(pipe.log_dir).values()) >= 50

    await until(some, within=30, what="the first verdicts")
    masters = {i: cluster.master_of(pipe.layout.prefix_of(i) + "handshakes") for i in range(N)}
    dead_port = masters[0]
    dead = {i for i, port in masters.items() if port == dead_port}
    pipe.at_kill = (pipe.sink.backlog(), pipe.sink.unreplicated)
    cluster.kill(dead_port)
    judged = {s for c in verdicts(pipe.log_dir).values() for s in c}
    pipe.unjudged_at_kill = shard_sources(pipe.layout, dead) - judged
    pipe.send(SOURCES[half:])
    return pipe, dead, dead_port


def shard_sources(layout: shards.Layout, which: set[int]) -> set[str]:
    return {src for src in SOURCES if layout.shard_of(src) in which}


async def test_master_killed_without_replicas(tmp_path: Path) -> None:
    with LocalCluster(masters=3) as cluster:
        pipe, dead, _ = await run_with_kill(cluster, tmp_path, producer_url=cluster.url)
        try:
            live = set(range(N)) - dead
            assert live, "every shard on one master: N too small for the test"
            want = shard_sources(pipe.layout, live)

            async def live_done() -> bool:
                # The change line comes first, the record line right after it, in the same batch.
                records, changes = verdicts(pipe.log_dir), verdicts(pipe.log_dir, "stepstone.log")
                return all({s for i in live for s in x[i]} >= want for x in (records, changes))

            await until(live_done, within=40, what="every live shard's verdicts")
            got = verdicts(pipe.log_dir)
            # Every handshake of a live shard: one record with its verdict, in its shard's log.
            changes = verdicts(pipe.log_dir, "stepstone.log")
            for i in live:
                assert set(got[i]) == {s for s in want if pipe.layout.shard_of(s) == i}
                assert set(got[i].values()) == {1}
                assert changes[i] == got[i]  # and its first verdict in stepstone.log
            # The dead master's shards: what was judged before the kill stays judged (the logs are
            # files); the rest is lost with the master.
            doomed = shard_sources(pipe.layout, dead)
            judged = {s for i in dead for s in got[i]}
            lost = doomed - judged
            assert judged <= doomed
            assert lost >= doomed & set(SOURCES[len(SOURCES) // 2:]), "sent after the kill, yet judged"
            print(f"\nno replicas: killed the master of shards {sorted(dead)}; {len(doomed)} sources there, "
                  f"{len(judged)} judged before the kill, {len(lost)} lost "
                  f"(producer still holding {pipe.sink.backlog()}); other shards: {len(want)}/{len(want)}")
            # Counted, not silent: the producer's retries, and the analyzer's Redis errors per shard.
            async def counted() -> bool:
                metrics = scrape(pipe.metrics_port)
                errors = [metrics.get(f'stepstone_analyzer_errors_total{{kind="redis",shard="{i}"}}', 0.0)
                          for i in dead]
                return pipe.sink.redis_errors > 0 and all(errors)

            await until(counted, within=20, what="the Redis errors counted")
            assert pipe.sink.backlog() > 0  # held for the dead shards, retried
        finally:
            await pipe.close()


async def test_master_killed_with_replicas_loses_nothing(tmp_path: Path) -> None:
    with LocalCluster(masters=3, replicas=1) as cluster:
        producer_url = cluster.url + "?wait_replicas=1&wait_timeout=2000"
        pipe, dead, dead_port = await run_with_kill(cluster, tmp_path, producer_url=producer_url)
        try:
            # In a thread: the pipeline keeps running (and retrying) through the failover, as it
            # would; polling the nodes here would freeze it until the replica took over.
            promoted = await asyncio.to_thread(cluster.wait_failover,
                                               pipe.layout.prefix_of(min(dead)) + "handshakes", dead_port)
            assert promoted != dead_port

            async def all_done() -> bool:
                got = verdicts(pipe.log_dir)
                return {s for c in got.values() for s in c} >= set(SOURCES)

            try:
                await until(all_done, within=40, what="every source's verdict after the failover")
            except AssertionError:
                got = verdicts(pipe.log_dir)
                missing = {i: len(shard_sources(pipe.layout, {i}) - set(got[i])) for i in range(N)}
                lag = {k: v for k, v in scrape(pipe.metrics_port).items() if "queue_lag" in k and v}
                raise AssertionError(f"sources missing per shard {missing}; lag {lag}") from None
            got = verdicts(pipe.log_dir)
            for i in range(N):
                assert set(got[i]) == shard_sources(pipe.layout, {i})
            # At least once: a write whose reply the kill cut off may land twice (its retry), never
            # lost. Say how many did.
            twice = sum(n - 1 for c in got.values() for n in c.values())

            async def drained() -> bool:  # the last WAITs (2 s each, without a replica) are over
                return pipe.sink.backlog() == 0

            await until(drained, what="the producer's last writes")
            # stepstone.log: every source's first verdict too. A batch the kill cut off is redone
            # whole unless its records.log lines are marked, and they are written after its change
            # lines (written before them, a batch cut between the two lost its change line).
            async def change_lines() -> bool:
                changes = verdicts(pipe.log_dir, "stepstone.log")
                return all(set(changes[i]) >= set(got[i]) for i in range(N))

            with contextlib.suppress(AssertionError):  # counted below, not waited for forever
                await until(change_lines, within=10, what="the change lines")
            changes = verdicts(pipe.log_dir, "stepstone.log")
            no_change_line = sum(len(set(got[i]) - set(changes[i])) for i in range(N))
            in_flight = pipe.unjudged_at_kill & set(SOURCES[:len(SOURCES) // 2])
            print(f"\nreplicas: killed the master of shards {sorted(dead)} with {len(in_flight)} handshakes "
                  f"of theirs written and not yet judged, a replica took over "
                  f"({dead_port} -> {promoted}); {len(SOURCES)}/{len(SOURCES)} sources judged, "
                  f"{twice} record lines twice, {no_change_line} without a stepstone.log line; producer: "
                  f"{pipe.sink.redis_errors} retried writes, "
                  f"{pipe.sink.unreplicated} not acknowledged by a replica (written after the failover: "
                  "the promoted replica has none)")
            # Every handshake the producer had let go of when the master died was on its replica
            # too (WAIT said so); what it still held, it wrote after the failover. The promoted
            # replica has no replica of its own: those writes' WAITs time out, and are counted,
            # not hidden.
            assert pipe.at_kill[1] == 0
            assert no_change_line == 0
            # The producer's WAIT went to each shard's own master (a keyless command would
            # otherwise go to any node, and wait for nothing).
            for i in range(N):
                assert cluster.calls(cluster.master_of(pipe.layout.prefix_of(i) + "handshakes"), "wait") > 0
            # The kill landed mid-run: handshakes already on the dead master's streams, not yet
            # judged, were judged after the failover (from the replica).
            assert in_flight, "every handshake sent before the kill was judged before it"
        finally:
            await pipe.close()
