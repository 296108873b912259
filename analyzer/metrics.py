"""Prometheus counters of the live analyzer (`--metrics-port`).

A private registry, so tests can run several services in one process and the endpoint shows only
what this service counts (no process/GC collectors from other code).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from analyzer.rules import KINDS
from prober.metrics import serve

NS = "stepstone_analyzer"
# Values of `verdicts_by_kind{kind}`: the verdict's kind (analyzer/rules.py, docs/output.md).
VERDICT_KINDS: tuple[str, ...] = KINDS


def verdict_kind(verdict: Mapping[str, Any]) -> str:
    """The verdict's kind: forwarding, terminating, shared or none (none when it carries none)."""
    kind = verdict.get("kind")
    return kind if isinstance(kind, str) and kind in KINDS else "none"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.handshakes = Counter(f"{NS}_handshakes", "Handshakes received from the feed", registry=r)
        self.answered = Counter(f"{NS}_answered", "Handshakes the client answered (ACK or RST)", registry=r)
        self.sampled = Counter(
            f"{NS}_handshakes_sampled",
            "Handshakes measured fully (fingerprinted, stored, probed, judged): the first "
            "--sample-per-source of each source per probe period",
            registry=r,
        )
        self.counted = Counter(
            f"{NS}_handshakes_counted",
            "Handshakes only counted (per source, cnt:<src> and the verdict's handshakes_seen), not "
            "measured: beyond --sample-per-source in their source's probe period",
            registry=r,
        )
        self.changes = Counter(
            f"{NS}_verdict_lines",
            "Verdicts emitted (stepstone.log, the verdicts stream, Zeek), by why: first (a new "
            "source), changed, refresh (--refresh seconds since the last one)",
            ["change"],
            registry=r,
        )
        for change in ("first", "changed", "refresh"):
            self.changes.labels(change)
        self.ignored = Counter(
            f"{NS}_ignored", "Handshakes outside --darknet, skipped", registry=r
        )
        self.enqueued = Counter(f"{NS}_probes_enqueued", "Probe jobs enqueued", registry=r)
        self.deduped = Counter(
            f"{NS}_probes_deduped",
            "Handshakes attached to an earlier probe of the same address (dedup window)",
            registry=r,
        )
        self.results = Counter(f"{NS}_results", "Probe results received", registry=r)
        self.dead = Counter(f"{NS}_dead_jobs", "Jobs the prober gave up on (stream dead)", registry=r)
        self.verdicts = Counter(f"{NS}_verdicts", "Records written with a verdict (records.log)", registry=r)
        self.relays = Counter(f"{NS}_relays", "Verdicts that said relay", registry=r)
        self.verdict_kinds = Counter(
            f"{NS}_verdicts_by_kind",
            "Records written with a verdict, by the verdict's kind: forwarding (a NAT, port forward or "
            "tunnel: timing or hop evidence), terminating (a proxy), shared (an OS mismatch alone: "
            "likely a home NAT), none",
            ["kind"],
            registry=r,
        )
        for kind in VERDICT_KINDS:  # every kind shows from the start, at 0
            self.verdict_kinds.labels(kind)
        self.errors = Counter(f"{NS}_errors", "Malformed entries and failed steps", ["kind"], registry=r)
        self.rejected = Counter(
            f"{NS}_rejected_entries",
            "Stream entries rejected where they were read (not UTF-8, a field missing, malformed or out "
            "of range): logged once, acknowledged, skipped; stream = handshakes, results, dead, verdicts, "
            "or zeek (a Zeek handshake refused before it reached the handshakes stream)",
            ["stream"],
            registry=r,
        )
        self.dropped_records = Counter(
            f"{NS}_window_records_dropped",
            "Records of a source's window in Redis that did not read back or could not be judged: "
            "dropped from the window, the rest of it still counts",
            registry=r,
        )
        self.lag = Gauge(
            f"{NS}_queue_lag",
            "Entries of a stream not yet processed by group analyzers (undelivered + pending)",
            ["stream"],
            registry=r,
        )
        self.trimmed = Counter(
            f"{NS}_stream_entries_trimmed",
            "Entries removed from a work stream after every consumer group acknowledged them",
            ["stream"],
            registry=r,
        )
        self.zeek = Gauge(
            f"{NS}_zeek",
            "Zeek link: connected (1/0), verdicts queued for it (unsent or unconfirmed), frames and "
            "events it sent that were rejected, verdicts dropped from a full re-send queue, connections "
            "closed on a frame over the size limit, verdicts Zeek confirmed, verdicts sent again",
            ["what"],
            registry=r,
        )
        self.latency = Histogram(
            f"{NS}_verdict_latency_seconds",
            "Time from the SYN to its verdict",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 3600),
            registry=r,
        )

    def serve(self, port: int, addr: str) -> Callable[[], None]:
        """Start the /metrics HTTP endpoint (`prober.metrics.serve`); returns its stop function."""
        return serve(self.registry, port, addr)
