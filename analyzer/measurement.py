"""Measurement records (paper Table 2): a handshake's passive half, then its active probe."""

from __future__ import annotations

import dataclasses

from analyzer.handshake import Handshake
from analyzer.record import Record
from prober.job import Result


def passive_record(h: Handshake, fp_label: str | None, syn_dist: int | None = None) -> Record:
    """The record of one handshake before probing: t, src, dst, T^p, F^p and the SYN's hop
    distance (`analyzer.hops.syn_distance`) and the application-layer T^app; active fields null."""
    return Record(t=h.t, src=h.src, dst=h.dst, tp_us=h.tp_us, fp=fp_label, syn_dist=syn_dist,
                  tapp_us=h.tapp_us)


def with_probe(record: Record, result: Result) -> Record:
    """`record` with the active half filled from a probe of the same source.

    Raises ValueError when the result is for another address: mixing sources would corrupt both
    conditions silently.
    """
    if result.src != record.src:
        raise ValueError(f"probe result for {result.src} cannot complete a record of {record.src}")
    return dataclasses.replace(
        record,
        ping_min_us=result.ping_min_us,
        ping_avg_us=result.ping_avg_us,
        ping_max_us=result.ping_max_us,
        ping_var_us2=result.ping_var_us2,
        syn_rtt_us=result.syn_rtt_us,
        fa=result.fa,
        fa_dist=result.fa_dist,
    )
