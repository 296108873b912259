"""Prometheus metrics of the responder (`stepstone-responder run --metrics-port`), served as the
analyzer and the prober serve theirs (`prober.metrics.serve`, a private registry).

The counts are the sink's own, read when scraped: what the listener completed, what reached Redis
(or stdout), what a full backlog dropped, and the backlog itself. With --banners, the banner
exchanges' counts too (responder/banners.py).
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


class BannerCounts(Protocol):
    """What the banner exchanges count (responder.banners.Banners)."""

    sent: int
    answered: int
    silent: int
    early: int
    dropped: int

    def active(self) -> int: ...


class _BannerCounts(Collector):
    def __init__(self, banners: BannerCounts) -> None:
        self.banners = banners

    def collect(self) -> Iterator[Metric]:
        b = self.banners
        family = CounterMetricFamily(f"{NS}_banners", "Banner exchanges by outcome: sent (banners "
                                     "written), answered (client data timed), silent (no data before "
                                     "the timeout or close), early (client spoke first: untimed), "
                                     "dropped (over --banner-sessions: no banner)", labels=["outcome"])
        for outcome in ("sent", "answered", "silent", "early", "dropped"):
            family.add_metric([outcome], getattr(b, outcome))
        yield family
        active = GaugeMetricFamily(f"{NS}_banner_sessions", "Banner exchanges open now")
        active.add_metric([], b.active())
        yield active


def registry_for(sink: Counts, banners: BannerCounts | None = None) -> CollectorRegistry:
    """A registry exposing `sink`'s counts (and the banner exchanges', when there are any)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_SinkCounts(sink))
    if banners is not None:
        registry.register(_BannerCounts(banners))
    return registry
