"""Issue 10's lab scenarios (lab/scenarios-relays.toml): the file parses with the truth each host
should get, bad uses of the new fields are refused, the crafted SYN is what a stack-less scanner
sends (a valid packet the analyzer gives no hop distance), and the report scores the combined
verdict `kind` per truth class and rule. The lab runs themselves: bench/lab_bench.py and the
docs/benchmarks.md's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.hops import syn_distance
from lab import report
from lab.report import Source
from lab.scenarios import Host, ScenarioError, load, parse
from lab.traffic import crafted_syn
from osfp.fingerprinter import Fingerprinter

RELAYS = Path(__file__).resolve().parents[1] / "lab" / "scenarios-relays.toml"


def test_relay_scenarios_parse_with_their_truth() -> None:
    sc = load(RELAYS)
    by = {h.name: h for h in sc.hosts}
    assert {h.truth for h in sc.hosts} == {"relay", "direct", "shared"}
    assert sorted(h.extra_delay_ms for h in sc.hosts if h.kind == "nat") == [0, 1]
    assert all(h.persona == h.attacker_persona for h in sc.hosts if h.kind == "nat")  # hops only
    home = next(h for h in sc.hosts if h.kind == "homenat")
    assert home.truth == "shared" and home.attacker_persona != home.second_persona and home.behind
    assert {h.route_change for h in sc.hosts} >= {"add", "remove"}
    assert by["scanner crafted SYN (masscan-like)"].truth == "direct"
    assert len(sc.hosts) + len(load().hosts) <= 40  # the bench plays both files in one lab


@pytest.mark.parametrize(("text", "message"), [
    ("[[host]]\nkind = 'nat'\nroute_change = 'add'\n", "route_change must be add or remove"),
    ("[[host]]\nroute_change = 'sideways'\n", "route_change must be add or remove"),
    ("[[host]]\nkind = 'scanner'\nattacker_persona = 'linux'\n", "only for nat, proxy and homenat"),
    ("[[host]]\nkind = 'nat'\nsecond_persona = 'linux'\n", "second_persona only for homenat"),
    ("[[host]]\nkind = 'homenat'\nsecond_persona = 'beos'\n", "unknown persona"),
])
def test_bad_new_fields_are_refused(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse(text, "x.toml")


def test_crafted_syn_is_a_valid_scanner_syn_with_no_distance() -> None:
    fper = Fingerprinter()
    for ttl in (200, 255):
        pkt = crafted_syn("198.19.3.2", "198.18.0.9", 40001, 23, ttl=ttl, seq=7)
        assert pkt[8] == ttl and len(pkt) == 40  # no options
        assert _checksum_ok(pkt[:20]) and _tcp_checksum_ok(pkt)
        fp = fper.fingerprint(pkt)
        assert syn_distance(fp, "rst") is None and syn_distance(fp, "ack") is None


def _fold(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum_ok(header: bytes) -> bool:
    return _fold(header) == 0xFFFF


def _tcp_checksum_ok(pkt: bytes) -> bool:
    tcp = pkt[20:]
    pseudo = pkt[12:20] + bytes([0, 6]) + len(tcp).to_bytes(2, "big")
    return _fold(pseudo + tcp) == 0xFFFF


def _verdict(src: str, kind: str, *, relay: bool = False) -> dict[str, object]:
    return {"src": src, "t": 1.0, "verdict_at": 1.5, "verdict": {
        "relay": relay, "relay_confident": kind in ("forwarding", "terminating"), "kind": kind,
        "cond_os": False, "cond_timing": False, "evidence": []}}


def test_report_scores_the_kind_per_truth_and_rule() -> None:
    hosts = [
        Source("198.19.1.2", Host("nat 0", "nat", "linux", 20, attacker_persona="linux")),
        Source("198.19.2.2", Host("scanner", "scanner", "linux", 10)),
        Source("198.19.3.2", Host("home", "homenat", "linux", 30, attacker_persona="linux",
                                  second_persona="windows")),
        Source("198.19.4.2", Host("hop added", "direct", "linux", 20, route_change="add")),
        Source("198.19.5.2", Host("nat 1", "nat", "linux", 20, attacker_persona="linux", extra_delay_ms=1)),
    ]
    handshakes = [{"src": s.addr, "answered": True} for s in hosts]
    records = [_verdict("198.19.1.2", "forwarding"), _verdict("198.19.2.2", "none"),
               _verdict("198.19.3.2", "shared", relay=True), _verdict("198.19.4.2", "forwarding"),
               _verdict("198.19.5.2", "none")]
    out = report.build(256, hosts, handshakes, records)
    assert out["truth_kind"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1, "precision": 0.5, "recall": 0.5}
    rules = out["truth_by_rule"]
    assert set(rules) == {"direct", "relay", "shared"}
    assert set(rules["relay"]) == {"paper", "confident", "kind"}
    assert rules["shared"]["paper"]["fp"] == 1 and rules["shared"]["kind"]["tn"] == 1
    assert rules["direct"]["kind"] == {"tp": 0, "fp": 1, "tn": 1, "fn": 0, "precision": 0.0, "recall": None}
    assert out["kind_right"] == {"direct": {"right": 1, "of": 2}, "relay": {"right": 1, "of": 2},
                                 "shared": {"right": 1, "of": 1}}
    notes = "\n".join(out["notes"])
    assert "hop added: FALSE POSITIVE by kind forwarding" in notes
    assert "nat 1: missed by the combined verdict (kind none" in notes
    text = report.render(out)
    assert "overall, combined kind:" in text and "1/1 shared" in text
