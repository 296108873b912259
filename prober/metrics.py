"""Prometheus metrics of a probe worker (`stepstone-prober run --metrics-port`), and the /metrics
endpoint every stepstone service serves its own registry with (analyzer, prober, responder).

A private registry per service, as the analyzer's: the endpoint shows only what this process counts.
The worker's counters are read from `Worker.stats` when scraped (one source of truth, shared with
the heartbeat that `stepstone-prober status` shows); the probe's duration is timed around the probe
function; the `jobs` lag is read from Redis every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from prober import streams
from prober.job import Job, Result
from prober.queue import PROBERS
from prober.worker import ProbeFn

log = logging.getLogger(__name__)

NS = "stepstone_prober"
# Worker.stats keys of the ways a job ends on `dead` (the label `reason` of dead_letters).
DEAD_REASONS = ("malformed", "dead_lettered", "deadline_dropped", "refused", "probe_failed")
# A probe is COUNT pings INTERVAL apart plus a SYN, each waiting up to REPLY_WAIT (1 s by default).
PROBE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
LAG_PERIOD = 2.0  # seconds between two readings of the jobs stream's lag


def serve(registry: CollectorRegistry, port: int, addr: str) -> Callable[[], None]:
    """Serve `registry` on http://ADDR:PORT/metrics from a daemon thread (prometheus_client's own
    server); returns the function that stops it. OSError if the port cannot be bound."""
    server, thread = start_http_server(port, addr=addr, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


class _WorkerStats(Collector):
    """The worker's own counters, as Prometheus counters, read at scrape time."""

    def __init__(self, stats: Mapping[str, int]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = dict(self.stats)  # a copy: the event loop's thread may add a key meanwhile
        probes = CounterMetricFamily(f"{NS}_probes", "Probes done, their result written to results")
        probes.add_metric([], s.get("probes", 0))
        yield probes
        claimed = CounterMetricFamily(f"{NS}_jobs_claimed",
                                      "Jobs taken over from a worker that left them idle (XAUTOCLAIM)")
        claimed.add_metric([], s.get("claimed", 0))
        yield claimed
        dead = CounterMetricFamily(f"{NS}_dead_letters", "Jobs given up on and written to dead, by reason",
                                   labels=["reason"])
        for reason in DEAD_REASONS:
            dead.add_metric([reason], s.get(reason, 0))
        yield dead
        errors = CounterMetricFamily(f"{NS}_errors", "Failures: redis (Redis unreachable, retried), "
                                     "probe_failed (the probe raised; the job went dead)", labels=["kind"])
        errors.add_metric(["redis"], s.get("redis_errors", 0))
        errors.add_metric(["probe_failed"], s.get("probe_failed", 0))
        yield errors


class ProberMetrics:
    def __init__(self, stats: Mapping[str, int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_WorkerStats(stats))
        self.duration = Histogram(
            f"{NS}_probe_duration_seconds",
            "Time one probe took (pings and SYNs sent until the last reply or timeout); probes that "
            "raised included",
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            f"{NS}_queue_lag",
            "Entries of a stream not yet processed by group probers (undelivered + pending)",
            ["stream"],
            registry=r,
        )

    def timed(self, probe: ProbeFn) -> ProbeFn:
        """`probe`, with its duration observed."""

        async def timed_probe(job: Job) -> Result:
            start = time.monotonic()
            try:
                return await probe(job)
            finally:
                self.duration.observe(time.monotonic() - start)

        return timed_probe

    async def watch_lag(self, redis: aioredis.Redis, jobs: str, stop: asyncio.Event) -> None:
        """Set the `jobs` lag of group probers every LAG_PERIOD seconds until `stop`."""
        while not stop.is_set():
            try:
                group = streams.find_group(await streams.groups(redis, jobs), PROBERS)
            except (RedisError, OSError) as exc:  # no stream yet, or Redis down: the worker says so
                log.debug("jobs lag: %s", exc)
                group = None
            if group is not None:
                self.lag.labels("jobs").set(int(group.get("lag") or 0) + int(group.get("pending") or 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LAG_PERIOD)
