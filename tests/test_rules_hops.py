"""cond_hops and the verdict's kind (analyzer/rules.py, "Hop counts" and "The verdict's kind"), at
their edges: equal distances, one sample, a TTL at a rounding edge, crafted TTLs, a route change,
a home NAT, the prober's offset."""

from __future__ import annotations

import json
import struct

import pytest

from analyzer.hops import syn_distance
from analyzer.record import Record
from analyzer.rules import (
    HOPS_DIFF_MAX,
    HOPS_MIN_SAMPLES,
    estimate_hop_offset,
    hop_test,
    judge,
    judge_all,
    verdict_kind,
)
from osfp.fingerprinter import Fingerprinter

LINUX = "unix:Linux:3.11 and newer"
LINUX_SA = "unix:Linux:3.x"
WINDOWS = "win:Windows:7 or 8"


def rec(syn: int | None, fa: int | None, *, t: float = 0.0, fp: str | None = LINUX,
        fa_label: str | None = None, src: str = "192.0.2.7", tp: int | None = 20_000,
        ping_max: int | None = 20_000) -> Record:
    return Record(t=t, src=src, dst="198.18.0.1", tp_us=tp, ping_min_us=ping_max, ping_avg_us=ping_max,
                  ping_max_us=ping_max, ping_var_us2=0.0, fp=fp, fa=fa_label, syn_dist=syn, fa_dist=fa)


def series(pairs: list[tuple[int | None, int | None]], **kw: object) -> list[Record]:
    return [rec(s, a, t=float(i), **kw) for i, (s, a) in enumerate(pairs)]  # type: ignore[arg-type]


def test_equal_distances_are_not_hops() -> None:
    v = judge(series([(9, 9)] * 5))
    assert not v.cond_hops and v.hops_margin == 0 and v.hops_samples == 5 and v.kind == "none"
    assert not v.relay_confident and v.evidence == ()


def test_one_router_further_is_forwarding() -> None:
    # A NAT relay with no extra delay and the attacker on the same OS: hops alone find it.
    v = judge(series([(10, 9)] * HOPS_MIN_SAMPLES))
    assert v.cond_hops and v.hops_margin == 1 and v.hops_spread == 0
    assert v.kind == "forwarding" and v.relay_confident and not v.relay  # the paper sees nothing
    (e,) = v.evidence
    assert (e.test, e.margin, e.threshold, e.samples, e.unit) == ("hops", 1, 1, 3, "hops")
    assert e.brief() == "hops=+1/3"
    d = v.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["kind"] == "forwarding" and d["evidence"][0]["test"] == "hops"


@pytest.mark.parametrize("n", [1, HOPS_MIN_SAMPLES - 1])
def test_too_few_samples(n: int) -> None:
    v = judge(series([(10, 9)] * n))
    assert not v.cond_hops and v.hops_samples == n and v.kind == "none"


def test_missing_distances_do_not_count() -> None:
    v = judge(series([(10, None), (None, 9), (None, None), (10, 9), (10, 9)]))
    assert v.hops_samples == 2 and not v.cond_hops


def test_route_change_between_a_handshake_and_its_probe() -> None:
    # Hop added on the probe's path for one pair (-1), or removed (+1): the median of the others holds.
    for odd in (-1, +1, +3):
        v = judge(series([(9, 9 - odd), (9, 9), (9, 9), (9, 9)]))
        assert not v.cond_hops and v.hops_margin == 0, odd
    # ... and a relay's single route change does not hide it.
    v = judge(series([(10, 10), (10, 9), (10, 9), (10, 9)]))
    assert v.cond_hops and v.hops_margin == 1


def test_two_route_changes_out_of_four_are_not_enough() -> None:
    v = judge(series([(10, 9), (10, 9), (9, 9), (9, 9)]))  # median 0.5
    assert not v.cond_hops


def test_rounding_edge_misread_is_set_aside() -> None:
    # A direct Linux host 34 hops away: its SYN read from the Linux signature (TTL 64 -> 34), its
    # SYN+ACK unlabelled and rounded to 32 (observed 30 -> 2): h = 32, a misread, not 32 hops.
    v = judge(series([(34, 2)] * 5))
    assert not v.cond_hops and v.hops_samples == 0 and v.hops_set_aside == 5
    # The edge itself: |h| = HOPS_DIFF_MAX still counts, one more does not.
    assert judge(series([(HOPS_DIFF_MAX + 1, 1)] * 3)).cond_hops
    assert not judge(series([(HOPS_DIFF_MAX + 2, 1)] * 3)).cond_hops
    # A distance p0f does not trust (over 35, its "+?") is set aside too.
    assert judge(series([(36, 30)] * 3)).hops_set_aside == 3


def test_rounding_edge_same_stack_stays_direct_with_real_fingerprints() -> None:
    # Observed TTL 31: from initial 64 after 33 hops, or 32 after 1. Both packets of one Linux stack
    # are read the same way, so the difference stays 0 whatever p0f believes.
    fper = Fingerprinter()
    syn = _linux_syn(ttl=31)
    d = fper.fingerprint(syn).hops
    assert d is not None
    v = judge(series([(d, d)] * 4))
    assert not v.cond_hops and v.hops_margin == 0


def test_windows_attacker_behind_linux_nat() -> None:
    # SYN from Windows (128) two routers away, SYN+ACK from the Linux relay (64) one router away.
    v = judge(series([(2, 1)] * 3, fp=WINDOWS, fa_label=LINUX_SA))
    assert v.cond_hops and v.cond_os and v.kind == "forwarding"
    assert [e.test for e in v.evidence] == ["hops", "os"]


def test_crafted_ttls() -> None:
    # A tool's label: set aside whatever distances a producer wrote.
    v = judge(series([(12, 9)] * 5, fp="!:NMap:SYN scan"))
    assert not v.cond_hops and v.hops_set_aside == 5
    # A TTL randomised per SYN by a tool that slipped through: the spread rules it out.
    v = judge(series([(9 + k, 9) for k in (1, 7, 3, 12, 5)], fp=None))
    assert v.hops_margin == 5 and v.hops_spread == 2 and not v.cond_hops
    # The analyzer never records a distance for a masscan-like SYN (TTL 255 or random, no options)
    # nor for any SYN answered with a RST.
    fper = Fingerprinter()
    for ttl in (255, 250, 37):
        fp = fper.fingerprint(_bare_syn(ttl))
        assert syn_distance(fp, "rst") is None and syn_distance(fp, "ack") is None
    assert syn_distance(fper.fingerprint(_linux_syn(ttl=61)), "rst") is None
    assert syn_distance(fper.fingerprint(_linux_syn(ttl=61)), "ack") == 3


def test_home_nat_two_oses_is_shared() -> None:
    # Two machines of different OSes behind one masquerading router (no attacker leg): hops +1 and
    # an OS mismatch, but two client OSes: shared, not a relay by default.
    recs = series([(2, 1)] * 2, fp=LINUX, fa_label=LINUX_SA) + [
        rec(2, 1, t=5.0 + i, fp=WINDOWS, fa_label=LINUX_SA) for i in range(3)]
    v = judge(recs)
    assert v.cond_hops and v.cond_os and v.os_clients == 2
    assert v.kind == "shared" and not v.relay_confident and v.relay  # the paper: a relay
    assert [e.test for e in v.evidence] == ["hops", "os", "clients"]


def test_timing_makes_shared_forwarding() -> None:
    recs = [rec(2, 1, t=float(i), fp=LINUX if i % 2 else WINDOWS, tp=80_000, ping_max=20_000)
            for i in range(4)]
    v = judge(recs)
    assert v.os_clients == 2 and v.cond_timing_strong and v.kind == "forwarding"
    assert v.evidence[0].test == "timing" and v.evidence[0].unit == "us"


@pytest.mark.parametrize(("case", "kind"), [
    ((False, False, False, 0, False), "none"),
    ((True, False, False, 0, False), "forwarding"),
    ((False, True, False, 1, False), "forwarding"),
    ((False, True, True, 1, False), "forwarding"),
    ((False, True, True, 2, False), "shared"),
    ((False, False, True, 1, False), "shared"),
    ((True, True, True, 3, False), "forwarding"),
    ((False, False, False, 0, True), "terminating"),
    ((False, False, True, 2, True), "terminating"),
])
def test_kind_table(case: tuple[bool, bool, bool, int, bool], kind: str) -> None:
    timing, hops, os, clients, app = case
    assert verdict_kind(timing=timing, hops=hops, os=os, clients=clients, app=app) == kind


def test_prober_offset() -> None:
    # A prober two routers further from the sources than the sensor: every SYN+ACK 2 hops more.
    direct = [rec(9, 11, t=float(i), src=f"192.0.2.{k}") for k in range(1, 6) for i in range(3)]
    relay = [rec(10, 11, t=float(i), src="192.0.2.99") for i in range(3)]
    verdicts = judge_all(direct + relay)
    assert not any(v.cond_hops for v in verdicts)
    assert estimate_hop_offset(direct + relay, verdicts) == (-2, 6)
    fixed = judge_all(direct + relay, hops_offset=-2)
    assert [v.src for v in fixed if v.cond_hops] == ["192.0.2.99"]
    assert estimate_hop_offset([], []) is None


def test_hop_test_empty() -> None:
    t = hop_test([])
    assert not t.holds and t.samples == 0 and t.margin is None


def _linux_syn(ttl: int) -> bytes:
    """A Linux-like SYN (MSS, SACK, timestamps, window scale) with the given TTL."""
    return _ip_tcp(ttl, 29200, bytes.fromhex("020405b40402080a000000640000000001030307"))


def _bare_syn(ttl: int) -> bytes:
    """A masscan-like SYN: no options, a fixed small window."""
    return _ip_tcp(ttl, 1024, b"")


def _ip_tcp(ttl: int, window: int, opts: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 23, 1, 0, (5 + len(opts) // 4) << 4, 0x02, window, 0, 0) + opts
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, ttl, 6, 0,
                     bytes([192, 0, 2, 7]), bytes([198, 18, 0, 1]))
    return ip + tcp
