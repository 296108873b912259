"""The lab's report: the paper's Table 3 for this run and the detection against the known truth.

`truth` scores the paper's rule (the verdict's `relay`); `truth_strong` scores the analyzer's own
stronger verdict (`relay_confident`: noise-aware timing, SYN-RTT fallback, hop counts;
analyzer/rules.py); `truth_kind` scores the combined verdict `kind` (a relay when forwarding or
terminating; today the same sources as relay_confident, by definition) and counts how often the
kind is the one the truth calls for (`KIND_FOR_TRUTH`). `truth_by_rule` breaks all three down per
truth (direct, relay, proxy, terminating, shared): TP/FP/TN/FN, precision and recall. A positive is
a relay, a proxy or a terminating relay; a home NAT (truth `shared`) is a negative that should be
called `shared`. `truth_by_class` does the same per kind of scenario (`CLASSES`: forwarding,
terminating, direct, scanner, shared, route change), with Zeek's notice.log as a fourth rule where
Zeek was the sensor.

Works on what the run left behind (the analyzer's handshakes.log and records.log lines, the
traffic drivers' attempt lines) so it can be checked independently of how the run went.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lab.scenarios import Host

RULES = ("paper", "confident", "kind")
# What the combined verdict should say for each truth.
KIND_FOR_TRUTH = {"direct": "none", "relay": "forwarding", "proxy": "terminating", "shared": "shared",
                  "terminating": "terminating"}
RELAY_KINDS = ("forwarding", "terminating")
POSITIVE = ("relay", "proxy", "terminating")  # truths that are relays
# The report's classes of scenario, in the order it prints them: the scenario kinds grouped by what
# the verdict should say, with the route changes apart (direct hosts the hop test must not flag).
CLASSES = ("forwarding", "terminating", "direct", "scanner", "shared", "route change")
_CLASS_OF_KIND = {"nat": "forwarding", "proxy": "terminating", "socat": "terminating", "socks": "terminating",
                  "direct": "direct", "scanner": "scanner", "homenat": "shared"}


def scenario_class(host: Host) -> str:
    """The report's class of a scenario host (CLASSES)."""
    return "route change" if host.route_change else _CLASS_OF_KIND[host.kind]


@dataclass(frozen=True)
class Source:
    """A lab host as the report needs it: its darknet-facing address and its scenario."""

    addr: str
    host: Host


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 3) if den else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    # Nearest-rank percentile: a value that was actually observed.
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return round(ordered[rank - 1], 3)


def build(
    darknet_addresses: int,
    sources: Sequence[Source],
    handshakes: Iterable[Mapping[str, Any]],
    records: Iterable[Mapping[str, Any]],
    attempts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    *,
    notices: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Table 3, truth, latency and one entry per lab source. `records` are records.log lines;
    `notices`, where Zeek was the sensor, its notice.log lines: what an operator is shown."""
    noticed: dict[str, int] = defaultdict(int)
    for n in notices or ():
        if n.get("note") == "StepStone::Relay_Detected" and isinstance(n.get("src"), str):
            noticed[n["src"]] += 1
    # Table 3 counts answered connection requests (the analyzer's handshakes.log lines say which).
    hs = [entry for entry in handshakes if entry.get("answered")]
    per_src_hs: dict[str, int] = defaultdict(int)
    for entry in hs:
        per_src_hs[entry["src"]] += 1
    per_src: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    latencies = []
    for rec in records:
        per_src[rec["src"]].append(rec)
        if isinstance(rec.get("verdict_at"), int | float) and isinstance(rec.get("t"), int | float):
            latencies.append(max(0.0, rec["verdict_at"] - rec["t"]))
    final: dict[str, Mapping[str, Any]] = {}
    for src, recs in per_src.items():
        recs.sort(key=lambda r: r.get("verdict_at") or r.get("t") or 0)
        final[src] = recs[-1].get("verdict") or {}

    def flag(src: str, key: str) -> bool:
        return bool(final.get(src, {}).get(key))

    seen = set(per_src_hs)
    table3 = {
        "darknet_addresses": darknet_addresses,
        "answered_requests": len(hs),
        "unique_sources": len(seen),
        "relays_cond1": sum(flag(s, "cond_os") for s in seen),
        "relays_cond2": sum(flag(s, "cond_timing") for s in seen),
        "relays_total": sum(flag(s, "relay") for s in seen),
    }

    hosts = []
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    counts_strong = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    counts_notice = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    per_kind: dict[str, dict[str, int]] = defaultdict(lambda: {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
    by_rule: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: {r: {"tp": 0, "fp": 0, "tn": 0, "fn": 0} for r in RULES})
    counts_kind = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    kind_right: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # truth -> [right, total]
    rules_here = (*RULES, "notice") if notices is not None else RULES
    by_class: dict[str, dict[str, dict[str, int]]] = {}
    class_right: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # class -> [right, total]
    for source in sources:
        h = source.host
        verdict = final.get(source.addr)
        relay = bool(verdict.get("relay")) if verdict else False
        positive = h.truth in POSITIVE
        outcome = ("tp" if relay else "fn") if positive else ("fp" if relay else "tn")
        counts[outcome] += 1
        strong = bool(verdict.get("relay_confident")) if verdict else False
        outcome_strong = ("tp" if strong else "fn") if positive else ("fp" if strong else "tn")
        counts_strong[outcome_strong] += 1
        per_kind[h.kind][outcome] += 1
        kind = str(verdict.get("kind") or "none") if verdict else None
        flagged_kind = kind in RELAY_KINDS
        outcome_kind = ("tp" if flagged_kind else "fn") if positive else ("fp" if flagged_kind else "tn")
        counts_kind[outcome_kind] += 1
        for rule, result in zip(RULES, (outcome, outcome_strong, outcome_kind), strict=True):
            by_rule[h.truth][rule][result] += 1
        kind_right[h.truth][0] += kind == KIND_FOR_TRUTH[h.truth]
        kind_right[h.truth][1] += 1
        n_notices = noticed.get(source.addr, 0)
        outcome_notice = ("tp" if n_notices else "fn") if positive else ("fp" if n_notices else "tn")
        counts_notice[outcome_notice] += 1
        klass = scenario_class(h)
        into = by_class.setdefault(klass, {r: {"tp": 0, "fp": 0, "tn": 0, "fn": 0} for r in rules_here})
        results = (outcome, outcome_strong, outcome_kind, outcome_notice)[:len(rules_here)]
        for rule, result in zip(rules_here, results, strict=True):
            into[rule][result] += 1
        class_right[klass][0] += kind == KIND_FOR_TRUTH[h.truth]
        class_right[klass][1] += 1
        recs = per_src.get(source.addr, [])
        made = attempts.get(source.addr, []) if attempts else []
        hosts.append({
            "src": source.addr,
            "scenario": h.name,
            "truth": h.truth,
            "kind": h.kind,
            "class": klass,
            "client": h.client,
            "client_think_ms": h.client_think_ms if h.client else None,
            "persona": h.persona,
            "attacker_persona": h.attacker_persona,
            "rtt_ms": h.rtt_ms,
            "jitter_ms": h.jitter_ms,
            "extra_delay_ms": h.extra_delay_ms if h.behind else None,
            "drop_icmp": h.drop_icmp,
            "relay": relay if verdict else None,
            "outcome": outcome,
            "relay_strong": strong if verdict else None,
            "outcome_strong": outcome_strong,
            "verdict_kind": kind,
            "kind_expected": KIND_FOR_TRUTH[h.truth],
            "outcome_kind": outcome_kind,
            # Relay_Detected notices in Zeek's notice.log (None: the sensor was not Zeek).
            "notices": n_notices if notices is not None else None,
            "outcome_notice": outcome_notice if notices is not None else None,
            "evidence": {
                "verdict": dict(verdict) if verdict else None,
                "connections_tried": len(made),
                "connections_ok": sum(1 for a in made if a.get("ok")),
                "handshakes": per_src_hs.get(source.addr, 0),
                "records": len(recs),
                # Records whose running verdict said relay: a final "direct" may hide early flips.
                "flagged_records": sum(1 for r in recs if (r.get("verdict") or {}).get("relay")),
                "tp_us": [r.get("tp_us") for r in recs],
                "ping_max_us": [r.get("ping_max_us") for r in recs],
                "fp": sorted({str(r.get("fp")) for r in recs}),
                "fa": sorted({str(r.get("fa")) for r in recs}),
                "syn_dist": [r.get("syn_dist") for r in recs],
                "fa_dist": [r.get("fa_dist") for r in recs],
                "tapp_us": [r.get("tapp_us") for r in recs],
            },
        })
    return {
        "table3": table3,
        "truth": _scores(counts),
        "truth_strong": _scores(counts_strong),
        "truth_notice": _scores(counts_notice) if notices is not None else None,
        "truth_by_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "truth_kind": _scores(counts_kind),
        "truth_by_rule": {t: {r: _scores(c) for r, c in rules.items()}
                          for t, rules in sorted(by_rule.items())},
        "kind_right": {t: {"right": n[0], "of": n[1]} for t, n in sorted(kind_right.items())},
        "truth_by_class": {c: {r: _scores(n) for r, n in by_class[c].items()}
                           for c in CLASSES if c in by_class},
        "class_right": {c: {"right": n[0], "of": n[1]} for c, n in class_right.items()},
        "latency_s": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None,
                      "verdicts": len(latencies)},
        "hosts": hosts,
        "notes": notes(hosts),
    }


def _scores(counts: Mapping[str, int]) -> dict[str, Any]:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {**counts, "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}


def notes(hosts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the run misses the goal (every NAT relay >= 20 ms found, no direct scanner flagged),
    and why, in words."""
    out = []
    for h in hosts:
        ev = h["evidence"]
        v = ev["verdict"] or {}
        if ev["handshakes"] == 0:
            out.append(f"{h['scenario']}: no handshake reached the darknet "
                       f"({ev['connections_ok']}/{ev['connections_tried']} connections succeeded)")
            continue
        if h["relay"] is None:
            out.append(f"{h['scenario']}: no verdict was written ({ev['handshakes']} handshakes)")
            continue
        timing = f"mean T^p {_ms(v.get('tp_mean_us'))} vs mean max T^a {_ms(v.get('ta_max_mean_us'))}"
        if h["truth"] == "direct" and h["relay"]:
            why = "OS labels differ" if v.get("cond_os") else timing
            out.append(f"{h['scenario']}: FALSE POSITIVE ({why}; fp {ev['fp']}, fa {ev['fa']})")
        elif h["kind"] == "nat" and not h["relay"]:
            level = "below the goal (extra delay < 20 ms)" if (h["extra_delay_ms"] or 0) < 20 else "MISSED"
            cause = "no ping answer, so no active RTT to compare" if h["drop_icmp"] else timing
            out.append(f"{h['scenario']}: not found, {level}: {cause}")
        elif h["kind"] == "homenat" and h.get("verdict_kind") != "shared":
            out.append(f"{h['scenario']}: a home NAT called {h.get('verdict_kind')}, not shared "
                       f"(hops {v.get('hops_margin')} over {v.get('hops_samples')}, "
                       f"{v.get('os_clients')} client OSes, timing margin {_ms(v.get('timing_margin_us'))})")
        elif h["kind"] == "proxy":
            seen = "flagged" if h["relay"] else "not flagged"
            out.append(f"{h['scenario']}: {seen}; a TCP-terminating proxy completes the handshake itself, "
                       "so T^p and the SYN are the relay's own: the paper's method cannot see it by design")
    for h in hosts:
        if h["relay_strong"] is None or h["relay_strong"] == h["relay"]:
            continue
        v = h["evidence"]["verdict"] or {}
        said = "relay" if h["relay_strong"] else "not a relay"
        if h["relay_strong"] and v.get("cond_app") and h.get("verdict_kind") == "terminating":
            # A terminating verdict stands on the application RTT, not on T^p.
            why = f"application RTT margin {_ms(v.get('app_margin'))} over {v.get('app_samples')} samples"
        else:
            why = (f"timing margin {_ms(v.get('timing_margin_us'))} vs threshold "
                   f"{_ms(v.get('timing_threshold_us'))}, {v.get('timing_ref') or 'no'} reference, "
                   f"{v.get('timing_samples', 0)} samples")
        out.append(f"{h['scenario']}: the paper's rule says {'relay' if h['relay'] else 'not a relay'}, "
                   f"the confident rule {said} ({why})")
    for h in hosts:
        v = h["evidence"]["verdict"] or {}
        if h["truth"] == "direct" and h.get("outcome_kind") == "fp" and h["relay_strong"] is not None:
            ev = h["evidence"]
            app = (f"; app margin {_ms(v.get('app_margin'))} over {v.get('app_samples')}, tapp "
                   f"{_ms_list(ev['tapp_us'])}" if v.get("cond_app") else "")
            out.append(f"{h['scenario']}: FALSE POSITIVE by kind {h.get('verdict_kind')} (evidence "
                       f"{[e.get('test') for e in v.get('evidence') or []]}; SYN hops {ev['syn_dist']}, "
                       f"SYN+ACK hops {ev['fa_dist']}{app})")
        elif h["truth"] == "terminating" and h.get("outcome_kind") == "fn" and h["relay"] is not None:
            ev = h["evidence"]
            level = "below the goal (extra delay < 20 ms)" if (h["extra_delay_ms"] or 0) < 20 else "MISSED"
            out.append(f"{h['scenario']}: terminating relay not found, {level} (kind {h.get('verdict_kind')}"
                       "; "
                       f"app margin {_ms(v.get('app_margin'))} over {v.get('app_samples')} samples, tapp "
                       f"{_ms_list(ev['tapp_us'])}, ping max {_ms_list(ev['ping_max_us'])})")
        elif h["truth"] == "relay" and h.get("outcome_kind") == "fn" and h["relay"] is not None:
            ev = h["evidence"]
            out.append(f"{h['scenario']}: missed by the combined verdict (kind {h.get('verdict_kind')}; "
                       f"hops {v.get('hops_margin')} over {v.get('hops_samples')} pairs, SYN hops "
                       f"{ev['syn_dist']}, SYN+ACK hops {ev['fa_dist']}; timing margin "
                       f"{_ms(v.get('timing_margin_us'))})")
    wobbly = [h["scenario"] for h in hosts
              if h["truth"] == "direct" and h["relay"] is False and h["evidence"]["flagged_records"]]
    if wobbly:
        names = ", ".join(wobbly)
        out.append(f"flagged on the way, cleared by the end (timing noise, early samples): {names}")
    return out


def _ms(us: Any) -> str:
    return f"{us / 1000:.1f} ms" if isinstance(us, int | float) else "n/a"


def _ms_list(values: Sequence[Any]) -> str:
    """Microsecond samples as one short list in ms ("-" where a record has none)."""
    return "[" + " ".join(f"{v / 1000:.1f}" if isinstance(v, int | float) else "-" for v in values) + "] ms"


def render(report: Mapping[str, Any]) -> str:
    t3 = report["table3"]
    lines = [
        "Table 3 (this run)",
        f"  darknet addresses            {t3['darknet_addresses']:>6}",
        f"  answered connection requests {t3['answered_requests']:>6}",
        f"  unique sources               {t3['unique_sources']:>6}",
        f"  relays by (1) OS mismatch    {t3['relays_cond1']:>6}",
        f"  relays by (2) T^p >> T^a     {t3['relays_cond2']:>6}",
        f"  relays in total              {t3['relays_total']:>6}",
        "",
        "Detection vs truth",
        f"  {'scenario':<34} {'src':<14} {'truth':<11} {'verdict':<8} {'(1)':<4} {'(2)':<4} "
        f"{'T^p mean':>9} {'T^a max':>9} {'n':>3}  result  {'conf':<5} {'margin':>9}  conf result"
        + ("  notices" if report.get("truth_notice") else "") + f"  {'kind':<11} {'app':>9}",
    ]
    for h in report["hosts"]:
        v = h["evidence"]["verdict"] or {}
        verdict = "-" if h["relay"] is None else ("relay" if h["relay"] else "direct")
        lines.append(
            f"  {h['scenario'][:34]:<34} {h['src']:<14} {h['truth']:<11} {verdict:<8} "
            f"{_yn(v.get('cond_os')):<4} {_yn(v.get('cond_timing')):<4} "
            f"{_ms(v.get('tp_mean_us')):>9} {_ms(v.get('ta_max_mean_us')):>9} "
            f"{h['evidence']['records']:>3}  {h['outcome'].upper():<6}  {_yn(h.get('relay_strong')):<5} "
            f"{_ms(v.get('timing_margin_us')):>9}  {str(h.get('outcome_strong', '-')).upper():<11}"
            + (f"  {h['notices']:<7}" if h.get("notices") is not None else "")
            # The combined verdict's kind and the application-RTT margin (median tapp - T^a) behind it.
            + f"  {h.get('verdict_kind') or '-'!s:<11} {_ms(v.get('app_margin')):>9}"
        )
    tr = report["truth"]
    lines += [
        "",
        f"  overall, paper's rule:   TP {tr['tp']}  FP {tr['fp']}  TN {tr['tn']}  FN {tr['fn']}  "
        f"precision {_num(tr['precision'])}  recall {_num(tr['recall'])}",
    ]
    st = report.get("truth_strong")
    if st:
        lines.append(f"  overall, confident rule: TP {st['tp']}  FP {st['fp']}  TN {st['tn']}  "
                     f"FN {st['fn']}  precision {_num(st['precision'])}  recall {_num(st['recall'])}")
    nt = report.get("truth_notice")
    if nt:
        lines.append(f"  Zeek notice.log:         TP {nt['tp']}  FP {nt['fp']}  TN {nt['tn']}  "
                     f"FN {nt['fn']}  precision {_num(nt['precision'])}  recall {_num(nt['recall'])}  "
                     "(Relay_Detected per source)")
    tk = report.get("truth_kind")
    if tk:
        lines.append(f"  overall, combined kind:  TP {tk['tp']}  FP {tk['fp']}  TN {tk['tn']}  "
                     f"FN {tk['fn']}  precision {_num(tk['precision'])}  recall {_num(tk['recall'])}  "
                     "(forwarding or terminating)")
    lines.append("  per kind (paper's rule):")
    for kind, c in report["truth_by_kind"].items():
        lines.append(f"    {kind:<7} TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}")
    if report.get("truth_by_class"):
        lines += ["", class_table(report["truth_by_class"], report.get("class_right") or {})]
    elif report.get("truth_by_rule"):
        lines += ["", rule_table(report["truth_by_rule"], report.get("kind_right") or {})]
    lat = report["latency_s"]
    lines += ["", f"  SYN -> verdict: median {_num(lat['p50'])} s, p95 {_num(lat['p95'])} s "
              f"({lat['verdicts']} verdicts)"]
    if report["notes"]:
        lines += ["", "Notes"] + [f"  - {n}" for n in report["notes"]]
    else:
        lines += ["", "Every NAT relay found, no direct scanner flagged."]
    return "\n".join(lines)


def rule_table(by_rule: Mapping[str, Mapping[str, Mapping[str, Any]]],
               kind_right: Mapping[str, Mapping[str, int]]) -> str:
    """Per truth and rule: TP/FP/TN/FN, precision, recall; and how often the kind was right."""
    return _score_table("truth", 7, by_rule, kind_right, KIND_FOR_TRUTH)


# What the combined verdict should say for each class.
KIND_FOR_CLASS = {"forwarding": "forwarding", "terminating": "terminating", "direct": "none",
                  "scanner": "none", "shared": "shared", "route change": "none"}


def class_table(by_class: Mapping[str, Mapping[str, Mapping[str, Any]]],
                class_right: Mapping[str, Mapping[str, int]]) -> str:
    """Per class of scenario and rule (paper, confident, kind; notice where Zeek was the sensor):
    TP/FP/TN/FN, precision, recall; and how often the combined verdict's kind was the right one."""
    return _score_table("class", 12, by_class, class_right, KIND_FOR_CLASS)


def _score_table(heading: str, width: int, scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 right: Mapping[str, Mapping[str, int]], expected: Mapping[str, str]) -> str:
    lines = [f"  {heading:<{width}} {'rule':<10} {'TP':>3} {'FP':>3} {'TN':>3} {'FN':>3} {'precision':>9} "
             f"{'recall':>6}  kind right"]
    for group, rules in scores.items():
        kinds = right.get(group)
        for rule, c in rules.items():
            said = (f"{kinds['right']}/{kinds['of']} {expected.get(group, '?')}"
                    if kinds and rule == "kind" else "")
            lines.append(f"  {group:<{width}} {rule:<10} {c['tp']:>3} {c['fp']:>3} {c['tn']:>3} {c['fn']:>3} "
                         f"{_num(c['precision']):>9} {_num(c['recall']):>6}  {said}")
    return "\n".join(lines)


def _yn(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value}"
