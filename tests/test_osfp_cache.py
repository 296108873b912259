"""The fingerprint cache: one match per distinct set of the fields p0f reads, never a stale answer."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import osfp.fingerprinter as fingerprinter_module
from osfp import Fingerprinter
from osfp.craft import Shape, build
from osfp.matcher import find_match, raw_signature
from osfp.packet import parse

LINUX = Shape()
_SHARED = Fingerprinter()


def test_a_flood_of_identical_scanner_syns_costs_one_match() -> None:
    fp = Fingerprinter()
    results = {
        fp.fingerprint(
            build(
                LINUX, src=f"203.0.113.{i % 250 + 1}", sport=1024 + i, seq=i * 7919 + 1, ip_id=i % 60000 + 1
            )
        )
        for i in range(2000)
    }
    assert len(results) == 1
    assert (fp.misses, fp.hits) == (1, 1999)


@pytest.mark.parametrize(
    "other",
    [
        replace(LINUX, ttl=60),  # distance
        replace(LINUX, ttl=20),  # fuzzy TTL
        replace(LINUX, win=64241),
        replace(LINUX, wscale=8),
        replace(LINUX, mss=1400),
        LINUX.with_quirks(remove={"id+"}),  # IP ID zero under DF
        LINUX.with_quirks(add={"ecn"}),
        LINUX.with_quirks(add={"ts1-"}),  # TSval zero
        replace(LINUX, payload=b"x"),
        replace(LINUX, ip_opt_len=4),
        replace(LINUX, layout=(2, 4, 8, 1, 3, 1, 1, 1, 1)),
    ],
)
def test_every_field_p0f_reads_is_in_the_key(other: Shape) -> None:
    fp = Fingerprinter()
    a = fp.fingerprint(build(LINUX))
    b = fp.fingerprint(build(other))
    assert a != b
    assert fp.misses == 2


def test_ipv6_flow_label_and_synack_peer_mss_are_in_the_key() -> None:
    fp = Fingerprinter()
    v6 = replace(LINUX, ip_ver=6, quirks=frozenset())
    plain = fp.fingerprint(build(v6, src="2001:db8::1", dst="2001:db8::2"))
    flow = fp.fingerprint(build(v6.with_quirks(add={"flow"}), src="2001:db8::1", dst="2001:db8::2"))
    assert plain.label != flow.label or plain.sig != flow.sig
    synack = build(replace(LINUX, synack=True, win=1201 * 10, quirks=frozenset({"df"})))
    assert fp.fingerprint(synack, syn_mss=1201).sig != fp.fingerprint(synack, syn_mss=1460).sig


_shapes = st.builds(
    Shape,
    synack=st.booleans(),
    ip_ver=st.sampled_from([4, 6]),
    ttl=st.integers(1, 255),
    mss=st.sampled_from([536, 1200, 1201, 1360, 1440, 1452, 1460, 8960]),
    win=st.one_of(st.sampled_from([0, 1024, 8192, 16384, 29200, 64240, 65160, 65535]), st.integers(0, 65535)),
    wscale=st.integers(0, 16),
    layout=st.sampled_from(
        [
            (2, 4, 8, 1, 3),
            (2, 1, 3, 1, 1, 4),
            (2,),
            (2, 1, 1, 8),
            (2, 1, 3, 1, 1, 8, 4, 0),
            (1, 3, 1, 1, 8, 1, 1, 4, 2),
        ]
    ),
    quirks=st.frozensets(st.sampled_from(["df", "id+", "id-", "ecn", "seq-", "pushf+", "ts1-", "flow"])),
)


@settings(max_examples=400, deadline=None)
@given(_shapes, st.sampled_from([0, 536, 1201, 1460]))
def test_cached_answers_equal_fresh_matches(shape: Shape, syn_mss: int) -> None:
    if shape.ip_ver == 6:
        shape = shape.with_quirks(remove={"df", "id+", "id-"})
        src, dst = "2001:db8::1", "2001:db8::2"
    else:
        shape = shape.with_quirks(remove={"flow"})
        src, dst = "192.0.2.1", "192.0.2.2"
    if 0 in shape.layout:
        shape = replace(shape, eol_pad=(-(sum(_LEN[k] for k in shape.layout)) % 4))
    try:
        packet = build(shape, src=src, dst=dst)
    except ValueError:
        return
    got = _SHARED.fingerprint(packet, syn_mss=syn_mss)
    features, _ = parse(packet)
    used_mss = syn_mss if features.synack else 0
    sigs = _SHARED.db.synack if features.synack else _SHARED.db.syn
    fresh = find_match(features, sigs, used_mss)
    assert got.label == (fresh.sig.label if fresh.sig else None)
    assert (got.match, got.distance) == (fresh.match, fresh.distance)
    assert got.sig == raw_signature(features, used_mss)


_LEN = {0: 1, 1: 1, 2: 4, 3: 3, 4: 2, 8: 10}


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprinter_module, "CACHE_LIMIT", 10)
    fp = Fingerprinter()
    for ttl in range(30, 64):
        fp.fingerprint(build(replace(LINUX, ttl=ttl)))
    assert len(fp._cache) <= 10
    again = fp.fingerprint(build(replace(LINUX, ttl=30)))
    assert again.distance == 34
