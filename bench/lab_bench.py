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
--scenarios lab/scenarios-relays.toml --scenarios lab/scenarios-proxies.toml. Per class of scenario
(forwarding, terminating, direct, scanner, shared, route change; lab/report.py CLASSES) and rule
(paper, confident, the combined verdict's kind, and Zeek's notice.log with --sensor zeek) it sums
TP/FP/TN/FN over the runs, with precision, recall, and how often the kind was the one the truth
calls for. For the server-first clients (lab/scenarios-proxies.toml) it gives the distribution of
tapp - T^a (the application RTT after our banner minus the probe's max ping RTT) per scenario:
what cond_app's allowance for a client's own processing is measured against.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lab.demo import default_sensor, run_demo
from lab.report import _percentile, _scores, class_table
from lab.scenarios import DEFAULT_FILE, MAX_HOSTS, load

GOAL_DELAY_MS = 20  # issue 10: at least 90 % of the proxies at >= 20 ms with a server-first client


def app_minus_ping(host: Mapping[str, Any]) -> list[float]:
    """tapp - max ping RTT (ms) per record of a report host that has both."""
    ev = host["evidence"]
    return [(t - p) / 1000 for t, p in zip(ev.get("tapp_us") or [], ev.get("ping_max_us") or [], strict=False)
            if isinstance(t, int | float) and isinstance(p, int | float)]


def distribution(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    return (f"n {len(values):>3}  min {min(values):7.2f}  p10 {_percentile(values, 0.1):7.2f}  "
            f"median {statistics.median(values):7.2f}  p90 {_percentile(values, 0.9):7.2f}  "
            f"max {max(values):7.2f} ms")


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
    by_class: dict[str, dict[str, dict[str, int]]] = {}
    class_right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    app: dict[str, list[float]] = defaultdict(list)  # server-first scenario -> tapp - T^a samples, ms
    goal = [0, 0]  # terminating relays >= GOAL_DELAY_MS with a client: [found, of]
    kinds_seen: dict[str, list[str]] = defaultdict(list)
    flagged: dict[str, int] = defaultdict(int)
    flagged_strong: dict[str, int] = defaultdict(int)
    noticed: dict[str, int] = defaultdict(int)
    totals_notice = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    totals_strong = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    totals_kind = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
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
                totals_kind[k] += report["truth_kind"][k]
                if report.get("truth_notice"):
                    totals_notice[k] += report["truth_notice"][k]
            for klass, rules in report["truth_by_class"].items():
                for rule, c in rules.items():
                    zero = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
                    into = by_class.setdefault(klass, {}).setdefault(rule, zero)
                    for k in into:
                        into[k] += c[k]
            for klass, n in report["class_right"].items():
                class_right[klass][0] += n["right"]
                class_right[klass][1] += n["of"]
            for h in report["hosts"]:
                if h.get("client"):
                    app[h["scenario"]] += app_minus_ping(h)
                leg = h["extra_delay_ms"] or 0
                if h["truth"] == "terminating" and h.get("client") and leg >= GOAL_DELAY_MS:
                    goal[0] += h.get("verdict_kind") == "terminating"
                    goal[1] += 1
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
            tk = report["truth_kind"]
            print(f"       combined kind:  TP {tk['tp']} FP {tk['fp']} TN {tk['tn']} FN {tk['fn']}  "
                  f"precision {tk['precision']} recall {tk['recall']}", flush=True)
    rules = [("paper's rule", totals), ("confident rule", totals_strong), ("combined kind", totals_kind)]
    if sensor == "zeek":
        rules.append(("Zeek notice.log", totals_notice))
    for rule, counts in rules:
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        print(f"all runs, {rule}: TP {tp} FP {fp} TN {counts['tn']} FN {fn}  "
              f"precision {precision:.3f}  recall {recall:.3f}")
    print("all runs, per class of scenario and rule:")
    scored = {t: {r: _scores(c) for r, c in rules.items()} for t, rules in by_class.items()}
    print(class_table(scored, {t: {"right": n[0], "of": n[1]} for t, n in class_right.items()}))
    if goal[1]:
        print(f"terminating relays >= {GOAL_DELAY_MS} ms with a server-first client, kind terminating: "
              f"{goal[0]}/{goal[1]} ({100 * goal[0] / goal[1]:.0f} %, goal 90 %)")
    if app:
        print("tapp - T^a (application RTT after the banner minus the probe's max ping RTT), all runs:")
        for name, values in app.items():
            print(f"  {truth[name]:<11} {name:<36}  {distribution(values)}")
    heading = "paper's rule, confident rule" + (", Relay_Detected in notice.log" if sensor == "zeek" else "")
    print(f"flagged as relay, per scenario ({heading}; then the combined verdict's kind per run):")
    for name, count in flagged.items():
        notice = f"  {noticed[name]}/{args.runs}" if sensor == "zeek" else ""
        print(f"  {count}/{args.runs}  {flagged_strong[name]}/{args.runs}{notice}  {truth[name]:<11}  "
              f"{name:<36}  {','.join(kinds_seen[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
