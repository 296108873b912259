"""Prometheus metrics of the responder (`stepstone-responder run --metrics-port`), served as the
analyzer and the prober serve theirs (`prober.metrics.serve`, a private registry).

The counts are the sink's own, read when scraped: what the listener completed, what reached Redis
(or stdout), what a full backlog dropped, and the backlog itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

NS = "stepstone_responder"


class Counts(Protocol):
    """What the responder's sink counts (responder.cli.Sink)."""

    received: int
    sent: int
    dropped: int
    redis_errors: int

    def backlog(self) -> int: ...


class _SinkCounts(Collector):
    def __init__(self, sink: Counts) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        s = self.sink
        for name, doc, value in (
            ("handshakes", "Handshakes completed by the kernel and read from the listener", s.received),
            ("reported", "Handshakes written to the handshakes stream (or stdout)", s.sent),
            ("dropped", "Handshakes dropped from a full backlog while Redis was unreachable", s.dropped),
        ):
            family = CounterMetricFamily(f"{NS}_{name}", doc)
            family.add_metric([], value)
            yield family
        errors = CounterMetricFamily(f"{NS}_errors", "Failures: redis (an XADD failed; retried)",
                                     labels=["kind"])
        errors.add_metric(["redis"], s.redis_errors)
        yield errors
        backlog = GaugeMetricFamily(f"{NS}_backlog", "Handshakes waiting in memory to be written")
        backlog.add_metric([], s.backlog())
        yield backlog


def registry_for(sink: Counts) -> CollectorRegistry:
    """A registry exposing `sink`'s counts."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_SinkCounts(sink))
    return registry
