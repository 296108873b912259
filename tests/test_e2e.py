"""End to end in the virtual darknet: responder, analyzer, Redis and a prober, live.

A small scenario set (one direct scanner, one NAT relay, one TCP-terminating proxy) must give the
verdicts and Table 3 counts its truth implies; killing the prober and the analyzer with -9 in
the middle of the traffic must not lose a handshake once they are back. After every run nothing
of the lab is left: no namespace, nftables table, route, process or file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lab.demo import PREFIX, Lab, preflight
from lab.netns import unavailable_reason
from lab.process import wait_for
from lab.scenarios import Scenarios, parse

pytestmark = pytest.mark.netns

# Connections 3 s apart and a 1 s dedup window: every handshake gets its own probe, so the paper's
# condition (2) compares means over three probes, not one probe's maximum against three T^p (a
# single probe's max of 5 pings is a noisy yardstick: a direct host then trips (2) now and then).
SMALL = """
[lab]
connections = 3
traffic_s = 9
settle_s = 30

[[host]]
name = "direct"
kind = "direct"
persona = "linux"
rtt_ms = 20

[[host]]
name = "nat +50ms other OS"
kind = "nat"
persona = "linux"
attacker_persona = "windows"
rtt_ms = 20
extra_delay_ms = 50

[[host]]
name = "proxy"
kind = "proxy"
persona = "linux"
attacker_persona = "windows"
rtt_ms = 20
extra_delay_ms = 50
"""

CRASH = """
[lab]
connections = 8
traffic_s = 12
settle_s = 40

[[host]]
name = "direct"
kind = "direct"
rtt_ms = 10

[[host]]
name = "nat +30ms"
kind = "nat"
rtt_ms = 10
extra_delay_ms = 30
"""


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    if reason := unavailable_reason():
        pytest.skip(reason)


def _ours(workdir: Path) -> list[str]:
    """Processes whose command line mentions the run's folder (Redis, services, drivers)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def assert_nothing_left(lab: Lab) -> None:
    namespaces = lab.net.namespaces  # emptied by close(); check the kernel's list too
    assert namespaces == []
    listed = os.popen("ip netns list").read()
    assert f"sst{lab.net.tag}" not in listed, listed
    assert all(c.proc.poll() is not None for c in lab.children.children)
    assert lab.redis_server.proc is None
    assert _ours(lab.workdir) == []
    assert not lab.workdir.exists()
    # The components only ever touch their own namespaces: the host's tables and routes are clean.
    tables = os.popen("nft list tables").read()
    assert not any(t in tables for t in ("stepstone_responder", "stepstone_persona", "stepstone_lab")), tables
    assert "198.18." not in os.popen("ip route show table all").read()


def _run(sc: Scenarios) -> tuple[Lab, dict[str, Any]]:
    preflight(sc)
    lab = Lab(sc, dedup_window=1.0)
    try:
        lab.build()
        lab.start_services()
        lab.start_traffic()
        finished = lab.wait_verdicts(sc.traffic_s + sc.settle_s)
        assert finished, f"still without verdict: {lab.pending_verdicts()}"
        return lab, lab.report()
    finally:
        lab.close()


def _paper_rule(evidence: dict[str, Any]) -> bool:
    """Condition (2) recomputed from the records the analyzer wrote (all share a window here)."""
    tp, ta = evidence["tp_us"], evidence["ping_max_us"]
    return any(a > b for a, b in zip(tp, ta, strict=True)) and sum(tp) / len(tp) > sum(ta) / len(ta)


def test_small_scenario_verdicts_and_table3() -> None:
    sc = parse(SMALL, "small")
    lab, report = _run(sc)
    assert_nothing_left(lab)
    hosts = {h["scenario"]: h for h in report["hosts"]}
    for h in hosts.values():
        assert h["evidence"]["connections_ok"] == 3 and h["evidence"]["records"] == 3, h
    nat = hosts["nat +50ms other OS"]
    assert nat["relay"] is True, nat
    verdict = nat["evidence"]["verdict"]
    assert verdict["cond_os"] and verdict["cond_timing"]
    assert verdict["tp_mean_us"] > verdict["ta_max_mean_us"] + 80_000  # the 2 x 50 ms attacker leg
    assert nat["evidence"]["fp"] == ["win:Windows:7 or 8"]
    # Direct scanner and proxy: one OS, and no timing gap beyond noise. The paper's strict
    # comparison of means has almost no margin on a fixed-delay path, so a scheduling hiccup on a
    # busy machine can flip it: then the verdict must still be exactly what the rule says.
    flipped = 0
    for name in ("direct", "proxy"):
        h = hosts[name]
        v = h["evidence"]["verdict"]
        assert v["cond_os"] is False, json.dumps(h)
        assert v["tp_mean_us"] < v["ta_max_mean_us"] + 3_000, json.dumps(h)
        assert h["relay"] is v["cond_timing"] is _paper_rule(h["evidence"]), json.dumps(h)
        flipped += h["relay"]
    # The proxy is reported as what it is: the method sees the relay's own handshake.
    assert hosts["proxy"]["truth"] == "proxy"
    assert report["table3"] == {"darknet_addresses": 256, "answered_requests": 9, "unique_sources": 3,
                                "relays_cond1": 1, "relays_cond2": 1 + flipped, "relays_total": 1 + flipped}
    proxy_flagged = int(hosts["proxy"]["relay"])  # by noise only: it counts as a (lucky) true positive
    direct_flagged = int(hosts["direct"]["relay"])
    counts = {k: report["truth"][k] for k in ("tp", "fn", "tn", "fp")}
    assert counts == {"tp": 1 + proxy_flagged, "fn": 1 - proxy_flagged, "tn": 1 - direct_flagged,
                      "fp": direct_flagged}
    assert report["latency_s"]["verdicts"] == 9 and report["latency_s"]["p95"] < 10


def test_prober_and_analyzer_killed_mid_run_lose_nothing() -> None:
    sc = parse(CRASH, "crash")
    preflight(sc)
    lab = Lab(sc)
    try:
        lab.build()
        lab.start_services()
        lab.start_traffic()
        wait_for(lambda: len(lab.records()) >= 2, 30, "the first verdicts", alive=lab.service_died)
        lab.kill("analyzer")
        lab.kill("prober")
        at_kill = lab.stream_length("handshakes")  # nobody trims it while the analyzer is down
        # The responder keeps feeding Redis while both are dead.
        wait_for(lambda: lab.stream_length("handshakes") >= at_kill + 3, 30,
                 "handshakes while they are down")
        waiting = {g["name"]: g["lag"] for g in lab.client.xinfo_groups(PREFIX + "handshakes")}
        assert waiting["analyzers"] >= 3  # on the stream, not yet delivered to any analyzer
        lab.start_service("analyzer")
        lab.start_service("prober")
        assert lab.wait_verdicts(sc.traffic_s + sc.settle_s), f"lost: {lab.pending_verdicts()}"
        hids = [r["hid"] for r in lab.records()]
        handshakes = lab.handshakes()
        attempts = [a for made in lab.attempts().values() for a in made]
    finally:
        lab.close()
    assert_nothing_left(lab)
    assert len(attempts) == 16
    assert len(handshakes) == sum(1 for a in attempts if a["ok"]) >= 14, attempts
    assert Counter(hids) == Counter(h["hid"] for h in handshakes), "one records.log line per handshake"
