"""The scenario file and the report: the default set covers what the issue asks for, bad files are
refused with a reason, and the report's counts follow from the verdicts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab import report
from lab.report import Source
from lab.scenarios import Host, ScenarioError, load, parse


def test_default_set_covers_the_required_cases() -> None:
    sc = load()
    direct = [h for h in sc.hosts if h.kind == "direct"]
    nat = [h for h in sc.hosts if h.kind == "nat"]
    assert len({h.persona for h in direct}) >= 3
    assert min(h.rtt_ms for h in direct) == 1 and max(h.rtt_ms for h in direct) == 150
    assert any(h.jitter_ms >= 20 for h in direct)
    assert {5, 20, 50, 100} <= {h.extra_delay_ms for h in nat}
    assert any(h.attacker_persona == h.persona for h in nat)
    assert any(h.attacker_persona != h.persona for h in nat)
    assert any(h.drop_icmp for h in nat)
    assert any(h.kind == "proxy" for h in sc.hosts)
    assert str(sc.darknet) == "198.18.0.0/24"


@pytest.mark.parametrize(("text", "message"), [
    ("[[host]]\nkind = 'vpn'\n", "kind must be one of direct, nat, proxy, scanner, homenat"),
    ("[[host]]\npersona = 'amiga'\n", "unknown persona"),
    ("[lab]\ndarknet = '10.0.0.0/24'\n[[host]]\n", "198.18.0.0/16"),
    ("[[host]]\nname = 'a'\n[[host]]\nname = 'a'\n", "duplicate name"),
    ("[[host]]\nrtt_ms = -1\n", "delays must be >= 0"),
    ("[[host]]\nkind = 'direct'\nextra_delay_ms = 5\n", "only for nat, proxy and homenat"),
    ("[[host]]\nrtt = 5\n", "unknown keys"),
    ("[[host]]\ndrop_icmp = 'yes'\n", "wrong type"),
    ("[lab]\n", "at least one [[host]]"),
    ("[[host]\n", "x.toml"),
])
def test_bad_files_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text, "x.toml")


def _rec(
    src: str, t: float, relay: bool, cond_os: bool = False, cond_timing: bool | None = None, *,
    confident: bool | None = None,
) -> dict[str, Any]:
    return {"hid": f"{t}-0", "src": src, "t": t, "verdict_at": t + 0.5, "tp_us": 1000, "ping_max_us": 900,
            "fp": "unix:Linux:x", "fa": None,
            "verdict": {"src": src, "relay": relay, "cond_os": cond_os,
                        "cond_timing": relay if cond_timing is None else cond_timing,
                        "tp_mean_us": 1000, "ta_max_mean_us": 900, "samples": 1,
                        "relay_confident": relay if confident is None else confident,
                        "timing_margin_us": 100, "timing_threshold_us": 5000, "timing_ref": "ping",
                        "timing_samples": 1}}


def test_report_counts_truth_and_table3() -> None:
    hosts = [
        Source("198.19.1.2", Host("direct a", "direct", "linux", 10)),
        Source("198.19.2.2", Host("direct b", "direct", "linux", 10)),
        Source("198.19.3.2", Host("nat 50", "nat", "linux", 10, attacker_persona="windows",
                                  extra_delay_ms=50)),
        Source("198.19.4.2", Host("nat 5", "nat", "linux", 10, extra_delay_ms=5)),
        Source("198.19.5.2", Host("proxy", "proxy", "linux", 10, extra_delay_ms=50)),
    ]
    handshakes = ([{"src": h.addr, "answered": True} for h in hosts for _ in range(2)]
                  + [{"src": "203.0.113.1", "answered": True}, {"src": "203.0.113.2", "answered": False}])
    records = [
        _rec("198.19.1.2", 1, relay=True), _rec("198.19.1.2", 2, relay=False),  # flipped back: TN
        _rec("198.19.2.2", 1, relay=True, confident=False),  # FP; the confident rule: TN
        _rec("198.19.3.2", 1, relay=True, cond_os=True),  # TP by both
        _rec("198.19.4.2", 1, relay=False, confident=True),  # FN below the goal; confident: TP
        _rec("198.19.5.2", 1, relay=False),  # proxy: FN, explained
    ]
    out = report.build(256, hosts, handshakes, records)
    assert out["table3"] == {"darknet_addresses": 256, "answered_requests": 11, "unique_sources": 6,
                             "relays_cond1": 1, "relays_cond2": 2, "relays_total": 2}
    assert out["truth"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 2, "precision": 0.5, "recall": 0.333}
    assert out["truth_strong"] == {"tp": 2, "fp": 0, "tn": 2, "fn": 1, "precision": 1.0, "recall": 0.667}
    assert out["latency_s"]["p50"] == 0.5 and "p95" in out["latency_s"]
    # The --json keys issue 5 promises, for every source.
    for h in out["hosts"]:
        assert {"src", "scenario", "truth", "extra_delay_ms", "relay", "evidence"} <= set(h), h
        assert h["truth"] in ("direct", "relay", "proxy") and isinstance(h["relay"], bool), h
    assert {h["src"] for h in out["hosts"]} == {s.addr for s in hosts}
    by = {h["scenario"]: h for h in out["hosts"]}
    assert by["direct a"]["evidence"]["flagged_records"] == 1 and by["direct a"]["outcome"] == "tn"
    assert by["proxy"]["truth"] == "proxy" and by["nat 50"]["extra_delay_ms"] == 50
    notes = "\n".join(out["notes"])
    assert "direct b: FALSE POSITIVE" in notes and "nat 5: not found, below the goal" in notes
    assert "proxy: not flagged" in notes
    assert by["direct b"]["relay_strong"] is False and by["direct b"]["outcome_strong"] == "tn"
    assert by["nat 5"]["relay_strong"] is True and by["nat 5"]["outcome_strong"] == "tp"
    assert ("direct b: the paper's rule says relay, the confident rule not a relay (timing margin 0.1 ms"
            in notes)
    assert "cleared by the end (timing noise, early samples): direct a" in notes
    json.dumps(out)  # --json must be able to print it
    text = report.render(out)
    assert "answered connection requests" in text and "precision 0.5" in text
    assert "overall, confident rule: TP 2  FP 0  TN 2  FN 1  precision 1.0  recall 0.667" in text
