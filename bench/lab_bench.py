"""Accuracy and speed of the whole live pipeline in the lab, over several runs of a scenario set.

Each run builds the lab, plays the scenarios (default: lab/scenarios.toml), and reports TP/FP/TN/FN,
SYN-to-verdict latency and wall time; at the end, per scenario, how often it was flagged. TP/FP/TN/FN
and the flag counts are given for the paper's rule and for the analyzer's confident rule
(`relay_confident`, analyzer/rules.py). With Zeek as the sensor (`--sensor zeek`, the default when a
zeek binary is on PATH) it also counts what an operator is shown: the sources with a
`StepStone::Relay_Detected` notice in Zeek's notice.log (under the package's default notice_rule).
Needs root. Prints numbers; asserts nothing.

    sudo .venv/bin/python bench/lab_bench.py [--runs 3] [--scenarios FILE ...] [--sensor zeek|responder]

--scenarios may be given several times: the files' hosts play together in one lab per run (the
[lab] settings of the first file). Issue 10's table: --scenarios lab/scenarios.toml
--scenarios lab/scenarios-relays.toml. Per truth class (direct, relay, proxy, shared) and rule
(paper, confident, kind) it sums TP/FP/TN/FN over the runs, with precision, recall, and how
often the combined verdict's kind was the one the truth calls for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

from lab.demo import default_sensor, run_demo
from lab.report import _scores, rule_table
from lab.scenarios import DEFAULT_FILE, MAX_HOSTS, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", type=Path, action="append", default=None,
                        help="scenario file (repeat to play several together; default lab/scenarios.toml)")
    parser.add_argument("--sensor", choices=("zeek", "responder"), default=None,
                        help="the lab's sensor (default: zeek if a zeek binary is on PATH, else responder)")
    args = parser.parse_args()
    sensor = args.sensor or default_sensor()
    print(f"sensor: {sensor}", flush=True)
    files = args.scenarios or [DEFAULT_FILE]
    loaded = [load(f) for f in files]
    scenarios = dataclasses.replace(loaded[0], hosts=tuple(h for sc in loaded for h in sc.hosts),
                                    source=", ".join(map(str, files)))
    if len(scenarios.hosts) > MAX_HOSTS:
        print(f"lab_bench: at most {MAX_HOSTS} hosts in one lab, not {len(scenarios.hosts)}", file=sys.stderr)
        return 2
    by_rule: dict[str, dict[str, dict[str, int]]] = {}
    kind_right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    kinds_seen: dict[str, list[str]] = defaultdict(list)
    flagged: dict[str, int] = defaultdict(int)
    flagged_strong: dict[str, int] = defaultdict(int)
    noticed: dict[str, int] = defaultdict(int)
    totals_notice = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    totals_strong = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    truth: dict[str, str] = {}
    totals = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    with open("/dev/null", "w") as quiet:
        for run in range(1, args.runs + 1):
            start = time.monotonic()
            report = run_demo(scenarios, progress=quiet, sensor=sensor)
            wall = time.monotonic() - start
            t, lat = report["truth"], report["latency_s"]
            ts = report["truth_strong"]
            for k in totals:
                totals[k] += t[k]
                totals_strong[k] += ts[k]
                if report.get("truth_notice"):
                    totals_notice[k] += report["truth_notice"][k]
            for klass, rules in report["truth_by_rule"].items():
                for rule, c in rules.items():
                    zero = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
                    into = by_rule.setdefault(klass, {}).setdefault(rule, zero)
                    for k in into:
                        into[k] += c[k]
            for klass, n in report["kind_right"].items():
                kind_right[klass][0] += n["right"]
                kind_right[klass][1] += n["of"]
            for h in report["hosts"]:
                kinds_seen[h["scenario"]].append(str(h.get("verdict_kind")))
                flagged[h["scenario"]] += bool(h["relay"])
                flagged_strong[h["scenario"]] += bool(h["relay_strong"])
                noticed[h["scenario"]] += bool(h.get("notices"))
                truth[h["scenario"]] = h["truth"]
            print(f"run {run}: TP {t['tp']} FP {t['fp']} TN {t['tn']} FN {t['fn']}  "
                  f"precision {t['precision']} recall {t['recall']}  "
                  f"SYN->verdict p50 {lat['p50']} s p95 {lat['p95']} s  "
                  f"({report['table3']['answered_requests']} handshakes, {wall:.1f} s wall)", flush=True)
            print(f"       confident rule: TP {ts['tp']} FP {ts['fp']} TN {ts['tn']} FN {ts['fn']}  "
                  f"precision {ts['precision']} recall {ts['recall']}", flush=True)
    rules = [("paper's rule", totals), ("confident rule", totals_strong)]
    if sensor == "zeek":
        rules.append(("Zeek notice.log", totals_notice))
    for rule, counts in rules:
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        print(f"all runs, {rule}: TP {tp} FP {fp} TN {counts['tn']} FN {fn}  "
              f"precision {precision:.3f}  recall {recall:.3f}")
    print("all runs, per truth class and rule:")
    scored = {t: {r: _scores(c) for r, c in rules.items()} for t, rules in sorted(by_rule.items())}
    print(rule_table(scored, {t: {"right": n[0], "of": n[1]} for t, n in kind_right.items()}))
    heading = "paper's rule, confident rule" + (", Relay_Detected in notice.log" if sensor == "zeek" else "")
    print(f"flagged as relay, per scenario ({heading}; then the combined verdict's kind per run):")
    for name, count in flagged.items():
        notice = f"  {noticed[name]}/{args.runs}" if sensor == "zeek" else ""
        print(f"  {count}/{args.runs}  {flagged_strong[name]}/{args.runs}{notice}  {truth[name]:<6}  "
              f"{name:<36}  {','.join(kinds_seen[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
