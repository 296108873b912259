"""`stepstone-analyzer report`: the evidence behind the verdicts, as one self-contained HTML page.

Input: the live analyzer's `--log-dir` (records.log, or an older stepstone.log: one line per
measured handshake, the record's fields and the verdict the analyzer wrote, which the report
shows as it is, the latest per source;
handshakes.log: the answered connection requests of Table 3), or a file of measurement records
(JSON lines as `replay` writes them, or a stepstone.log read as records), judged here by the
paper's rules and the confident rule of analyzer/rules.py over each source's records in the file.

The page holds Table 3 for the period, the verdicts as a sortable table, T^p against T^a over time
for the flagged sources, the distribution of the timing margin over all sources, and the OS
mismatch matrix (F^p x F^a). `stepstone-lab demo --html` writes the same page with the lab's
truth (TP, FP, FN) added.

Why matplotlib: it is on PyPI and in Debian (python3-matplotlib), well kept for two decades, and
renders SVG headless (no display, no browser, no JavaScript at build time). Its SVG is inlined in
the page, so the report opens offline, prints, and its text stays searchable; a JavaScript
charting library would need its bundle inlined and a browser to draw anything. The figures are
built on `matplotlib.figure.Figure` directly, not pyplot, so no global figure state is kept.

Large inputs stream: the lines are read one at a time and aggregated per source (sums for the
paper's rule, counts, the first OS mismatch), with two bounded samples per source: up to
DIFFS_CAP values of T^p - T^a for the confident rule's median (exact up to that many timing
samples; beyond, a uniform reservoir sample estimates the median and the spread while the count
and the ping variance stay exact), and up to POINTS_CAP (t, T^p, T^a) points for the plots.
Memory grows with the number of sources, not with the number of records.
"""

from __future__ import annotations

import argparse
import html
import io
import ipaddress
import math
import os
import random
import re
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from analyzer.errors import InputError
from analyzer.offline import Problems, json_objects
from analyzer.record import Record, RecordError
from analyzer.rules import (
    RELAY_KINDS,
    TIMING_FLOOR_US,
    StrongTiming,
    TimingRef,
    Verdict,
    address_order,
    findings,
    hop_test,
    names_an_os,
    os_part,
    timing_test,
)

DIFFS_CAP = 512  # T^p - T^a values kept per source for the median (exact up to this many)
POINTS_CAP = 150  # (t, T^p, T^a) points kept per source for its plot
MAX_PLOTS = 50  # per-source plots, the flagged sources with the largest margin
MAX_ROWS = 2000  # verdict table rows: every flagged source first, then by margin
MATRIX_LABELS = 12  # OS labels per axis of the mismatch matrix; the rest are "other"
RUG_MAX = 2000  # flagged sources marked one by one under the margin histogram
NONE = "\u2013"  # an en dash: no value

# Verdict fields the page uses, with their types: a stepstone.log line is hostile input too.
_FLAGS = ("cond_os", "cond_timing", "relay", "cond_timing_strong", "relay_confident")
_NUMBERS = ("tp_mean_us", "ta_max_mean_us", "timing_margin_us", "timing_noise_us",
            "timing_threshold_us", "window_start", "window_end")
_COUNTS = ("samples", "records", "with_ping", "tp_exceeds_ta_max", "timing_samples", "os_mismatches")


@dataclass(frozen=True, slots=True)
class Truth:
    """What the lab knows about a source: `truth` "relay" or "direct", and the outcome of each rule
    ("tp", "fp", "tn", "fn")."""

    truth: str
    outcome: str  # the paper's rule
    outcome_strong: str  # the confident rule
    scenario: str = ""


class _HopPair(NamedTuple):
    """What the hop test reads of a record."""

    syn_dist: int | None
    fa_dist: int | None
    fp: str | None


class _Source:
    """One source's running aggregate (module docstring)."""

    __slots__ = ("clients", "diffs", "exceeds", "first", "hop_pairs", "labelled", "last", "n_diffs",
                 "n_hops", "n_pairs", "n_points", "os_known", "os_mismatches", "os_pair", "points",
                 "records", "refs", "sum_ta", "sum_tp", "var_n", "var_sum", "verdict", "verdict_key",
                 "with_ping")

    def __init__(self, t: float) -> None:
        self.records = 0
        self.first = self.last = t
        self.os_mismatches = 0
        self.os_pair: tuple[str, str] | None = None
        self.with_ping = 0
        self.n_pairs = 0
        self.sum_tp = 0
        self.sum_ta = 0
        self.exceeds = 0
        self.n_diffs = 0
        self.diffs: array[float] | None = None
        self.var_sum = 0.0
        self.var_n = 0
        self.refs = 0  # bit 1: ping, bit 2: syn
        self.n_points = 0
        self.points: array[float] | None = None  # t, T^p, T^a, 1.0 if T^a is the SYN RTT
        self.clients: set[str] = set()  # client OSes (class:name) among the SYN labels
        self.labelled = 0  # records whose SYN label names an OS
        self.os_known = 0  # records with both labels naming an OS
        self.n_hops = 0
        # A uniform sample for the hop test, packed: (SYN distance, SYN+ACK distance, 1 if the SYN's
        # label is a userland tool's) per pair, 6 bytes each.
        self.hop_pairs: array[int] | None = None
        self.verdict: dict[str, Any] | None = None  # the logged verdict (log-dir input)
        self.verdict_key: tuple[float, int] = (-math.inf, -1)

    def add(self, r: Record, mismatch: bool, rng: random.Random, diffs_cap: int, points_cap: int) -> None:
        """`mismatch`: the record's F^p and F^a name different OSes (rules.judge, os level "name")."""
        self.records += 1
        if r.t < self.first:
            self.first = r.t
        elif r.t > self.last:
            self.last = r.t
        if mismatch:
            self.os_mismatches += 1
            if self.os_pair is None:
                self.os_pair = (r.fp, r.fa)
        if names_an_os(r.fp):
            self.labelled += 1
            self.clients.add(os_part(r.fp, "name"))
            self.os_known += names_an_os(r.fa)
        if r.syn_dist is not None and r.fa_dist is not None:
            self.n_hops += 1
            slot = _reservoir_slot(self.n_hops, diffs_cap, rng)
            if slot is not None:
                if self.hop_pairs is None:
                    self.hop_pairs = array("h")
                pair = (r.syn_dist, r.fa_dist, int(r.fp is not None and r.fp.startswith("!:")))
                if slot * 3 == len(self.hop_pairs):
                    self.hop_pairs.extend(pair)
                else:
                    self.hop_pairs[slot * 3:slot * 3 + 3] = array("h", pair)
        if r.has_ping:
            self.with_ping += 1
            if r.tp_us is not None and r.ping_max_us is not None:
                self.n_pairs += 1
                self.sum_tp += r.tp_us
                self.sum_ta += r.ping_max_us
                self.exceeds += r.tp_us > r.ping_max_us
        if r.tp_us is None:
            return
        if r.has_ping and r.ping_max_us is not None:
            ta, syn = r.ping_max_us, 0.0
            self.var_sum += r.ping_var_us2 or 0.0
            self.var_n += 1
            self.refs |= 1
        elif r.syn_rtt_us is not None:
            ta, syn = r.syn_rtt_us, 1.0
            self.refs |= 2
        else:
            return
        self.n_diffs += 1
        slot = _reservoir_slot(self.n_diffs, diffs_cap, rng)
        if slot is not None:
            if self.diffs is None:
                self.diffs = array("d")
            d = float(r.tp_us - ta)
            if slot == len(self.diffs):
                self.diffs.append(d)
            else:
                self.diffs[slot] = d
        self.n_points += 1
        slot = _reservoir_slot(self.n_points, points_cap, rng)
        if slot is not None:
            if self.points is None:
                self.points = array("d")
            point = (r.t, float(r.tp_us), float(ta), syn)
            if slot * 4 == len(self.points):
                self.points.extend(point)
            else:
                self.points[slot * 4:slot * 4 + 4] = array("d", point)

    def judge(self, src: str) -> Verdict:
        """analyzer.rules.judge over every record of the source (os level "name"), from the
        running sums and the kept samples, with the rules' own tests (`timing_test`, `hop_test`,
        `findings`)."""
        tp_mean = ta_mean = None
        cond_timing = False
        if self.n_pairs:
            tp_mean = self.sum_tp / self.n_pairs
            ta_mean = self.sum_ta / self.n_pairs
            cond_timing = self.exceeds > 0 and tp_mean > ta_mean
        strong = StrongTiming()
        if self.n_diffs and self.diffs is not None:
            ref: TimingRef = "ping+syn" if self.refs == 3 else ("ping" if self.refs == 1 else "syn")
            strong = timing_test(list(self.diffs), samples=self.n_diffs,
                                 mean_ping_var=self.var_sum / self.var_n if self.var_n else 0.0, ref=ref)
        p = self.hop_pairs or array("h")
        # Only what hop_test reads of the label: whether it is a userland tool's.
        hops = hop_test(_HopPair(p[i], p[i + 1], "!:" if p[i + 2] else None) for i in range(0, len(p), 3))
        evidence, kind = findings(strong, hops, os_mismatches=self.os_mismatches, os_known=self.os_known,
                                  clients=len(self.clients), labelled=self.labelled)
        cond_os = self.os_pair is not None
        return Verdict(
            src=src, cond_os=cond_os, cond_timing=cond_timing, relay=cond_os or cond_timing,
            tp_mean_us=tp_mean, ta_max_mean_us=ta_mean, samples=self.n_pairs, records=self.records,
            with_ping=self.with_ping, tp_exceeds_ta_max=self.exceeds, os_pair=self.os_pair,
            window_start=self.first, window_end=self.last, cond_timing_strong=strong.holds,
            relay_confident=kind in RELAY_KINDS, timing_ref=strong.ref, timing_samples=strong.samples,
            timing_margin_us=strong.margin_us, timing_noise_us=strong.noise_us,
            timing_threshold_us=strong.threshold_us, os_mismatches=self.os_mismatches,
            cond_hops=hops.holds, hops_samples=hops.samples, hops_margin=hops.margin,
            hops_spread=hops.spread, hops_set_aside=hops.set_aside, os_clients=len(self.clients),
            kind=kind, evidence=tuple(evidence),
        )

    def series(self) -> list[tuple[float, float, float, bool]]:
        """The kept (t, T^p, T^a, T^a is the SYN RTT) points, in time order."""
        p = self.points
        if p is None:
            return []
        return sorted((p[i], p[i + 1], p[i + 2], p[i + 3] > 0) for i in range(0, len(p), 4))


def _reservoir_slot(n: int, cap: int, rng: random.Random) -> int | None:
    """Where the n-th item (1-based) goes in a uniform reservoir of `cap`; None: not kept."""
    if n <= cap:
        return n - 1
    j = rng.randrange(n)
    return j if j < cap else None


@dataclass
class Aggregate:
    """Everything the page needs, built one record at a time."""

    diffs_cap: int = DIFFS_CAP
    points_cap: int = POINTS_CAP
    seed: int = 1
    sources: dict[str, _Source] = field(default_factory=dict)
    os_pairs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (F^p, F^a) at class:name
    records: int = 0
    answered: int | None = None  # from handshakes.log; None: count the records
    answered_sources: set[str] | None = None
    logged: bool = False  # verdicts come from stepstone.log

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._labels: dict[str, str] = {}  # label -> its class:name part (labels repeat)

    def add(self, r: Record, verdict: dict[str, Any] | None = None,
            key: tuple[float, int] | None = None) -> None:
        self.records += 1
        s = self.sources.get(r.src)
        if s is None:
            s = self.sources[r.src] = _Source(r.t)
        mismatch = False
        if names_an_os(r.fp) and names_an_os(r.fa):
            fp, fa = self._os(r.fp), self._os(r.fa)
            self.os_pairs[(fp, fa)] += 1
            mismatch = fp != fa
        s.add(r, mismatch, self._rng, self.diffs_cap, self.points_cap)
        if verdict is not None and key is not None and key >= s.verdict_key:
            s.verdict, s.verdict_key = verdict, key

    def _os(self, label: str) -> str:
        part = self._labels.get(label)
        if part is None:
            if len(self._labels) > 10_000:
                self._labels.clear()
            part = self._labels[label] = os_part(label, "name")
        return part

    def verdicts(self) -> list[dict[str, Any]]:
        """One verdict dict per source (Verdict.to_dict's keys), sorted by address."""
        out = []
        for src in sorted(self.sources, key=address_order):
            s = self.sources[src]
            if self.logged:
                v = {k: None for k in Verdict.__dataclass_fields__}
                v.update(s.verdict or {})
                v["src"] = src
            else:
                v = s.judge(src).to_dict()
            v["first_seen"], v["last_seen"] = s.first, s.last
            v["n_records"] = s.records
            out.append(v)
        return out


# -- reading ----------------------------------------------------------------------------------


def _objects(path: str, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) per good line; bad lines are reported in offline's words."""
    return json_objects(path, problems, what="a log line or record", read_error_fatal=True)


def _clean_verdict(obj: Any) -> dict[str, Any] | None:
    """The verdict fields the page shows, each of its type, or None if `obj` is not a verdict."""
    if not isinstance(obj, dict) or not isinstance(obj.get("relay"), bool):
        return None
    out: dict[str, Any] = {}
    for k in _FLAGS:
        out[k] = obj.get(k) if isinstance(obj.get(k), bool) else False
    for k in (*_NUMBERS, *_COUNTS):
        value = obj.get(k)
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value) and abs(value) <= 2**53)
        out[k] = value if ok else None
    ref = obj.get("timing_ref")
    out["timing_ref"] = ref if ref in ("ping", "syn", "ping+syn") else None
    pair = obj.get("os_pair")
    out["os_pair"] = (pair if isinstance(pair, list) and len(pair) == 2
                      and all(isinstance(x, str) and len(x) <= 256 for x in pair) else None)
    return out


def read_records(path: str, agg: Aggregate, problems: Problems) -> None:
    for number, obj in _objects(path, problems):
        try:
            agg.add(Record.from_json(obj))
        except RecordError as exc:
            problems.report(f"{path}: line {number}: {exc}")


def read_log_dir(log_dir: Path, agg: Aggregate, problems: Problems) -> None:
    # records.log: one line per measured handshake; an analyzer from before it wrote them all
    # to stepstone.log (which now has one line per verdict change).
    stepstone = log_dir / "records.log"
    if not stepstone.is_file():
        stepstone = log_dir / "stepstone.log"
    if not stepstone.is_file():
        raise InputError(f"{log_dir}: no stepstone.log in it, nor records.log (the analyzer's --log-dir)")
    agg.logged = True
    for number, obj in _objects(str(stepstone), problems):
        try:
            record = Record.from_json(obj)
        except RecordError as exc:
            problems.report(f"{stepstone}: line {number}: {exc}")
            continue
        verdict = _clean_verdict(obj.get("verdict"))
        if verdict is None:
            problems.report(f"{stepstone}: line {number}: no verdict object with a boolean 'relay'")
            continue
        at = obj.get("verdict_at")
        if not (isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)):
            at = 0.0
        agg.add(record, verdict, (float(at), number))
    handshakes = log_dir / "handshakes.log"
    if handshakes.is_file():
        answered, sources = 0, set()
        for number, obj in _objects(str(handshakes), problems):
            src = obj.get("src")
            if not isinstance(src, str) or not isinstance(obj.get("answered"), bool):
                problems.report(f"{handshakes}: line {number}: not a handshake line (src, answered)")
                continue
            if obj["answered"]:
                answered += 1
                sources.add(src[:64])
        agg.answered, agg.answered_sources = answered, sources


# -- the page ---------------------------------------------------------------------------------


def _kind(v: Mapping[str, Any]) -> str:
    if v.get("relay_confident"):
        return "relay (confident)"
    if v.get("relay"):
        return "relay (paper)"
    return "none"


def _flagged(v: Mapping[str, Any]) -> bool:
    return bool(v.get("relay") or v.get("relay_confident"))


def _ms(us: Any, digits: int = 1) -> str:
    if not isinstance(us, int | float):
        return NONE
    return f"{round(us / 1000, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.0"


def _when(t: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if not isinstance(t, int | float):
        return NONE
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def _conditions(v: Mapping[str, Any], *, pair: bool = True) -> str:
    out = []
    if v.get("cond_os"):
        labels = v.get("os_pair") if pair else None
        out.append("(1) OS" + (f": {labels[0]} \u2260 {labels[1]}" if labels else ""))
    if v.get("cond_timing"):
        out.append("(2) timing")
    if v.get("cond_timing_strong"):
        out.append("strong timing")
    return "; ".join(out) or NONE


def _margin_key(v: Mapping[str, Any]) -> float:
    m = v.get("timing_margin_us")
    return m if isinstance(m, int | float) else -math.inf


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "stepstone"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)  # RDF boilerplate


_STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
          "xtick.labelsize": 8, "ytick.labelsize": 8, "font.family": "DejaVu Sans"}
_OUTCOME_COLOR = {"tp": "#1a7f37", "fp": "#cf222e", "fn": "#8250df", "tn": "#8c959f"}


def _source_plot(src: str, s: _Source, v: Mapping[str, Any], truth: Truth | None) -> str:
    import matplotlib
    from matplotlib import dates as mdates

    points = s.series()
    with matplotlib.rc_context(_STYLE):
        fig = _figure(6.0, 2.9)
        ax = fig.add_subplot()
        when = [datetime.fromtimestamp(p[0], UTC) for p in points]
        tp = [p[1] / 1000 for p in points]
        ta = [p[2] / 1000 for p in points]
        threshold = v.get("timing_threshold_us")
        # T^a hollow and T^p drawn last: on a direct source they coincide and both stay visible.
        ax.plot(when, tp, "o", ms=3.5, color="#cf222e", zorder=3, label="$T^p$ (handshake)")
        ping = [(w, a) for w, a, p in zip(when, ta, points, strict=True) if not p[3]]
        syn = [(w, a) for w, a, p in zip(when, ta, points, strict=True) if p[3]]
        if ping:
            ax.plot(*zip(*ping, strict=True), "s", ms=5, mfc="none", mew=1.2, color="#0969da", zorder=2,
                    label="$T^a$ (max ping RTT)")
        if syn:
            ax.plot(*zip(*syn, strict=True), "D", ms=5, mfc="none", mew=1.2, color="#1f883d", zorder=2,
                    label="$T^a$ (SYN RTT)")
        if isinstance(threshold, int | float) and when:
            ax.step(when, [a + threshold / 1000 for a in ta], where="mid", ls="--", lw=1, color="#57606a",
                    label=f"$T^a$ + threshold ({threshold / 1000:.1f} ms)")
        if not points:
            ax.text(0.5, 0.5, "no timing samples: flagged by the OS condition alone",
                    ha="center", va="center", transform=ax.transAxes, color="#57606a")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            locator = mdates.AutoDateLocator(minticks=3, maxticks=6)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
            ax.set_ylabel("ms")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        kept = f" ({len(points)} of {s.n_points} shown)" if s.n_points > len(points) else ""
        margin = _ms(v.get("timing_margin_us"))
        why = f"by {_conditions(v, pair=False)}" if _flagged(v) else "not flagged"
        title = (f"{src}: {_kind(v)}, {why}\nmargin {margin} ms, "
                 f"threshold {_ms(threshold)} ms, {s.n_diffs} timing samples{kept}")
        if v.get("cond_os") and v.get("os_pair"):
            title += f"\nOS: {_wrap(v['os_pair'][0], 40)} \u2260 {_wrap(v['os_pair'][1], 40)}"
        if truth is not None:
            title += (f"\nlab truth: {truth.truth} ({truth.scenario}); paper's rule {truth.outcome.upper()}, "
                      f"confident rule {truth.outcome_strong.upper()}")
        ax.set_title(title, loc="left")
        return _svg(fig)


def _margin_plot(verdicts: list[dict[str, Any]], truth: Mapping[str, Truth] | None) -> str:
    import matplotlib
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows = [(v["timing_margin_us"] / 1000, v) for v in verdicts
            if isinstance(v.get("timing_margin_us"), int | float)]
    with matplotlib.rc_context(_STYLE):
        if not rows:
            fig = _figure(9.0, 1.2)
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no source has a timing margin (no T^p with a ping or SYN RTT)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return _svg(fig)
        values = sorted(m for m, _ in rows)
        floor = TIMING_FLOOR_US / 1000
        # Among many sources, clip the long tails into the edge bins: a few 3-second margins would
        # squash the rest. Among a few (the lab), every one is shown where it is.
        tail = 0.005 if len(values) >= 200 else 0.0
        lo = min(values[int(tail * (len(values) - 1))], -floor)
        hi = max(values[round((1 - tail) * (len(values) - 1))], 2 * floor)
        clip = [min(max(m, lo), hi) for m, _ in rows]
        # Below the histogram, a rug: one tick per flagged source (in the lab: per source, by its
        # outcome), on its own axis so that no tick hides a bar or a tick label.
        if truth:
            lanes = [(k.upper(), _OUTCOME_COLOR[k],
                      [c for c, (_, v) in zip(clip, rows, strict=True)
                       if (t := truth.get(v["src"])) is not None and t.outcome_strong == k])
                     for k in ("tp", "fp", "fn", "tn")]
            lanes = [lane for lane in lanes if lane[2]]
        else:
            flagged = [c for c, (_, v) in zip(clip, rows, strict=True) if _flagged(v)][:RUG_MAX]
            lanes = [("flagged", "#cf222e", flagged)] if flagged else []
        fig = _figure(9.0, 3.2 + 0.22 * len(lanes))
        if lanes:
            ax, rug = fig.subplots(2, 1, sharex=True, height_ratios=[6, 0.5 + 0.45 * len(lanes)])
        else:
            ax, rug = fig.add_subplot(), None
        groups = [("not flagged", "#8c959f", lambda v: not _flagged(v)),
                  ("relay (paper rule only)", "#fb8f44",
                   lambda v: v.get("relay") and not v.get("relay_confident")),
                  ("relay (confident rule)", "#cf222e", lambda v: v.get("relay_confident"))]
        data = [[c for c, (_, v) in zip(clip, rows, strict=True) if test(v)] for _, _, test in groups]
        bins = min(60, max(10, int(math.sqrt(len(rows)))))
        ax.hist(data, bins=bins, range=(lo, hi), stacked=True, color=[g[1] for g in groups],
                label=[f"{g[0]}: {len(d)}" for g, d in zip(groups, data, strict=True)])
        ax.axvline(floor, color="#24292f", ls="--", lw=1, label=f"threshold floor ({floor:.0f} ms)")
        if len(rows) > 50:  # a few thousand direct sources would flatten the few flagged ones
            ax.set_yscale("symlog", linthresh=1)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 100, not 10^2
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.set_ylabel("sources")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_xlim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        bottom = ax
        if rug is not None:
            for i, (_, color, xs) in enumerate(lanes):
                rug.plot(xs, [i] * len(xs), "|", ms=9, mew=1.5, color=color)
            rug.set_yticks(range(len(lanes)), [f"{name} ({len(xs)})" for name, _, xs in lanes])
            rug.set_ylim(-0.7, len(lanes) - 0.3)
            rug.invert_yaxis()
            rug.axvline(floor, color="#24292f", ls="--", lw=1)
            if truth:
                rug.set_title("each lab source, by the confident rule's outcome against the truth",
                              loc="left", fontsize=8)
            bottom = rug
        clipped = values[0] < lo or values[-1] > hi
        bottom.set_xlabel("timing margin $T^p - T^a$, median per source (ms)"
                          + (f"; tails clipped to {lo:.1f} .. {hi:.1f}" if clipped else ""))
        return _svg(fig)


def _matrix_plot(pairs: Counter[tuple[str, str]]) -> str:
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm

    with matplotlib.rc_context(_STYLE):
        if not pairs:
            fig = _figure(9.0, 1.2)
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no record has both an F^p and an F^a OS label "
                    "(no probe SYN+ACK, or unknown labels)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return _svg(fig)
        rows_total: Counter[str] = Counter()
        cols_total: Counter[str] = Counter()
        for (fp, fa), n in pairs.items():
            rows_total[fp] += n
            cols_total[fa] += n

        def axis(totals: Counter[str]) -> list[str]:
            top = [label for label, _ in totals.most_common(MATRIX_LABELS)]
            return top + (["other"] if len(totals) > MATRIX_LABELS else [])

        rows, cols = axis(rows_total), axis(cols_total)
        grid = np.zeros((len(rows), len(cols)))
        for (fp, fa), n in pairs.items():
            i = rows.index(fp) if fp in rows else len(rows) - 1
            j = cols.index(fa) if fa in cols else len(cols) - 1
            grid[i, j] += n
        same = np.array([[r == c and r != "other" for c in cols] for r in rows])
        fig = _figure(min(12.0, 3.0 + 0.75 * len(cols)), 1.6 + 0.38 * len(rows))
        ax = fig.add_subplot()
        vmax = max(grid.max(), 1)
        norm = LogNorm(vmin=1, vmax=max(vmax, 2))
        ax.imshow(np.ma.masked_where(~same | (grid == 0), grid), cmap="Blues", norm=norm, aspect="auto")
        ax.imshow(np.ma.masked_where(same | (grid == 0), grid), cmap="Reds", norm=norm, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if grid[i, j]:
                    dark = grid[i, j] > math.sqrt(vmax) and vmax > 10
                    ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "#24292f")
        ax.set_xticks(range(len(cols)), [_wrap(c) for c in cols], rotation=35, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("$F^a$: the probe's SYN+ACK (class:name)")
        ax.set_ylabel("$F^p$: the source's SYN")
        return _svg(fig)


def _wrap(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[:width - 1] + "\u2026"


_TP = "<i>T</i><sup>p</sup>"
_TA = "<i>T</i><sup>a</sup>"
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#24292f}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d0d7de}
.meta{color:#57606a}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top;white-space:nowrap}
td.c{white-space:normal;min-width:12em;max-width:26em}th{white-space:normal}
.key span{margin-right:1.2em;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f8fa}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" ▲"}table.sortable th[data-dir=desc]::after{content:" ▼"}
tr.flag td:first-child{border-left:3px solid #cf222e}
.tp{color:#1a7f37;font-weight:600}.fp{color:#cf222e;font-weight:600}.fn{color:#8250df;font-weight:600}
.tn{color:#57606a}.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:8px}
svg{max-width:100%;height:auto}.wide{overflow-x:auto}.warn{color:#9a6700}
"""

# Click a header to sort by it (numbers by data-v, else text); no external assets.
_JS = """
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0], asc = th.dataset.dir !== "asc";
  table.querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? "asc" : "desc";
  const key = row => { const c = row.cells[i], v = c.dataset.v ?? c.textContent, n = parseFloat(v);
                       return isNaN(n) ? v : n; };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  });
  body.append(...rows);
}));
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num_cell(value: Any, text: str | None = None) -> str:
    v = value if isinstance(value, int | float) and not isinstance(value, bool) else ""
    shown = text if text is not None else (value if v != "" else NONE)
    return f'<td class="n" data-v="{_e(v)}">{_e(shown)}</td>'


@dataclass
class Summary:
    records: int
    sources: int
    flagged: int
    bad_lines: int
    seconds: float


def render(
    agg: Aggregate,
    *,
    title: str,
    input_name: str,
    darknet_addresses: int | None = None,
    truth: Mapping[str, Truth] | None = None,
    problems: int = 0,
    max_plots: int = MAX_PLOTS,
) -> tuple[str, int]:
    """The page, and the number of flagged sources."""
    verdicts = agg.verdicts()
    by_src = {v["src"]: v for v in verdicts}
    flagged = [v for v in verdicts if _flagged(v)]
    first = min((s.first for s in agg.sources.values()), default=None)
    last = max((s.last for s in agg.sources.values()), default=None)
    answered = agg.answered if agg.answered is not None else agg.records
    seen = set(agg.sources) | (agg.answered_sources or set())
    t3 = [
        ("darknet addresses", f"{NONE} (give --darknet)" if darknet_addresses is None else darknet_addresses),
        ("answered connection requests", answered),
        ("unique sources", len(seen)),
        ("relays by (1) OS mismatch", sum(bool(v.get("cond_os")) for v in verdicts)),
        (f"relays by (2) {_TP} &#8811; {_TA}", sum(bool(v.get("cond_timing")) for v in verdicts)),
        ("relays in total (paper's rule)", sum(bool(v.get("relay")) for v in verdicts)),
        ("relays by the confident rule (not in the paper)",
         sum(bool(v.get("relay_confident")) for v in verdicts)),
    ]
    out: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{_e(input_name)} · period {_e(_when(first))} &ndash; {_e(_when(last))} UTC · '
        f"{agg.records} records from {len(agg.sources)} sources · "
        + ("verdicts as the analyzer logged them (the latest per source)" if agg.logged
           else "each source judged over all its records in the input")
        + f" · written {_e(_when(time.time()))} UTC</p>",
    ]
    if problems:
        out.append(f'<p class="warn">{problems} input lines were not readable and were skipped '
                   "(the command listed the first ones on stderr).</p>")
    out.append("<h2>Table 3 for the period</h2><table>")
    out += [f'<tr><td>{k}</td><td class="n">{_e(v)}</td></tr>' for k, v in t3]  # k: constant HTML
    out.append("</table>")
    if truth:
        out.append(_truth_table(verdicts, truth))

    out.append("<h2>Timing margin over all sources</h2>")
    out.append(f'<p class="meta">The confident rule flags a source whose median {_TP} &minus; {_TA} is above '
               "its threshold: max(5 ms, 3 standard errors of its own noise), so a jittery source needs "
               f"more. The paper's rule compares the means and needs one {_TP} above the max ping RTT.</p>")
    out.append(f'<div class="wide">{_margin_plot(verdicts, truth)}</div>')

    out.append("<h2>OS mismatch matrix (F<sup>p</sup> &times; F<sup>a</sup>)</h2>")
    out.append('<p class="meta">Records per (F<sup>p</sup>, F<sup>a</sup>) pair of OS labels (class:name), '
               "where both are known: blue the same OS, red a mismatch (condition (1)). The "
               f"{MATRIX_LABELS} most frequent labels on each axis; the rest are \"other\".</p>")
    out.append(f'<div class="wide">{_matrix_plot(agg.os_pairs)}</div>')

    plotted = sorted(flagged, key=_margin_key, reverse=True)
    if truth:  # the lab: the relays missed matter as much as the ones found
        plotted += [by_src[src] for src, t in truth.items() if t.outcome_strong == "fn" and src in by_src
                    and not _flagged(by_src[src])]
    shown = plotted[:max_plots]
    out.append("<h2>T<sup>p</sup> against T<sup>a</sup> over time, per flagged source</h2>")
    note = (f"{len(plotted)} sources to plot; the {len(shown)} with the largest margin are shown."
            if len(plotted) > len(shown) else f"{len(shown)} sources.")
    out.append(f'<p class="meta">{note} A sample is beyond the threshold when its {_TP} is above the dashed '
               f"line. Each plot keeps at most {agg.points_cap} points per source, sampled uniformly over "
               "its records.</p>")
    out.append('<p class="key"><span style="color:#cf222e">&#9679; ' + _TP + " (the handshake)</span>"
               '<span style="color:#0969da">&#9633; ' + _TA + " (max ping RTT)</span>"
               '<span style="color:#1f883d">&#9671; ' + _TA + " (SYN RTT, when ICMP is dropped)</span>"
               '<span style="color:#57606a">- - - ' + _TA + " + the source's threshold</span></p>")
    if shown:
        out.append('<div class="plots">')
        truth_of = truth or {}
        out += [f"<div>{_source_plot(v['src'], agg.sources[v['src']], v, truth_of.get(v['src']))}</div>"
                for v in shown]
        out.append("</div>")
    else:
        out.append("<p>No source was flagged.</p>")

    out.append(_verdict_table(verdicts, truth))
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out), len(flagged)


def _truth_table(verdicts: list[dict[str, Any]], truth: Mapping[str, Truth]) -> str:
    have = {v["src"] for v in verdicts}
    rows = ["<h2>Detection against the lab's truth</h2><table><tr><th>rule</th><th>TP</th><th>FP</th>"
            "<th>TN</th><th>FN</th></tr>"]
    rules = (("paper's rule (relay)", "outcome"), ("confident rule (relay_confident)", "outcome_strong"))
    for name, attr in rules:
        counts = Counter(getattr(t, attr) for t in truth.values())
        rows.append(f"<tr><td>{name}</td>" + "".join(
            f'<td class="n {k}">{counts.get(k, 0)}</td>' for k in ("tp", "fp", "tn", "fn")) + "</tr>")
    rows.append("</table>")
    missing = sorted(src for src in truth if src not in have)
    if missing:
        rows.append(f'<p class="warn">No verdict for {len(missing)} lab sources: '
                    f'{_e(", ".join(missing))}.</p>')
    return "".join(rows)


def _verdict_table(verdicts: list[dict[str, Any]], truth: Mapping[str, Truth] | None) -> str:
    ordered = sorted(verdicts, key=lambda v: (not _flagged(v), -_margin_key(v)))
    # Within one year the year is the page's period line's; the cells stay short.
    years = {_when(v.get(k), "%Y") for v in verdicts for k in ("first_seen", "last_seen")}
    fmt = "%m-%d %H:%M:%S" if len(years) == 1 else "%Y-%m-%d %H:%M:%S"
    rows = ordered[:MAX_ROWS]
    head = ["source", "kind", "conditions", "margin ms", "threshold ms", "ref", "timing samples",
            "records", "OS mismatches", f"mean {_TP} ms", f"mean max {_TA} ms", "first seen (UTC)",
            "last seen (UTC)"]
    if truth:  # the truth next to the verdict, where a reader looks first; the scenario last
        head[2:2] = ["truth", "paper rule", "confident rule"]
        head.append("scenario")
    out = ["<h2>Verdicts</h2>"]
    note = (f"{len(rows)} of {len(verdicts)} sources: every flagged one, then the largest margins."
            if len(rows) < len(verdicts) else f"{len(verdicts)} sources.")
    out.append(f'<p class="meta">{note} Click a column to sort. "kind": relay by the confident rule '
               "(OS mismatch or the strong timing test), by the paper's rule only, or none.</p>")
    out.append('<div class="wide"><table class="sortable" id="verdicts"><thead><tr>'
               + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>")  # constants: HTML
    for v in rows:
        version, number = address_order(v["src"])
        cells = [
            f'<td data-v="{version}{number:040d}">{_e(v["src"])}</td>',
            f"<td>{_e(_kind(v))}</td>",
            f'<td class="c">{_e(_conditions(v))}</td>',
            _num_cell(_ms_value(v.get("timing_margin_us")), _ms(v.get("timing_margin_us"))),
            _num_cell(_ms_value(v.get("timing_threshold_us")), _ms(v.get("timing_threshold_us"))),
            f"<td>{_e(v.get('timing_ref') or NONE)}</td>",
            _num_cell(v.get("timing_samples")),
            _num_cell(v.get("n_records")),
            _num_cell(v.get("os_mismatches")),
            _num_cell(_ms_value(v.get("tp_mean_us")), _ms(v.get("tp_mean_us"))),
            _num_cell(_ms_value(v.get("ta_max_mean_us")), _ms(v.get("ta_max_mean_us"))),
            f'<td data-v="{_e(v.get("first_seen"))}">{_e(_when(v.get("first_seen"), fmt))}</td>',
            f'<td data-v="{_e(v.get("last_seen"))}">{_e(_when(v.get("last_seen"), fmt))}</td>',
        ]
        if truth:
            t = truth.get(v["src"])
            if t is None:
                cells[2:2] = [f"<td>{NONE}</td>"] * 3
                cells.append(f"<td>{NONE}</td>")
            else:
                cells[2:2] = [f"<td>{_e(t.truth)}</td>", f'<td class="{t.outcome}">{t.outcome.upper()}</td>',
                              f'<td class="{t.outcome_strong}">{t.outcome_strong.upper()}</td>']
                cells.append(f"<td>{_e(t.scenario)}</td>")
        css = ' class="flag"' if _flagged(v) else ""
        out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _ms_value(us: Any) -> float | None:
    return round(us / 1000, 3) if isinstance(us, int | float) else None


# -- the command ------------------------------------------------------------------------------


def write(out: Path, page: str) -> None:
    """Replace `out` whole (a reader never sees half a page)."""
    folder = out.resolve().parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=folder)
    except OSError as exc:
        raise InputError(f"-o {out}: cannot write in {folder}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"-o {out}: cannot write: {exc.strerror or exc}") from None


def make_report(
    source: str,
    out: Path,
    *,
    darknet_addresses: int | None = None,
    truth: Mapping[str, Truth] | None = None,
    title: str | None = None,
    max_plots: int = MAX_PLOTS,
    problems: Problems | None = None,
    agg: Aggregate | None = None,
) -> Summary:
    """Read `source` (a log dir, a records file, or '-'), write the page to `out`."""
    started = time.monotonic()
    problems = problems or Problems(strict=True)
    agg = agg or Aggregate()
    path = Path(source)
    if source != "-" and path.is_dir():
        read_log_dir(path, agg, problems)
        name = f"log dir {source}"
    else:
        if source != "-" and not path.exists():
            raise InputError(f"{source}: no such file or directory")
        read_records(source, agg, problems)
        name = "records from standard input" if source == "-" else f"records {source}"
    page, flagged = render(agg, title=title or "stepstone report", input_name=name,
                           darknet_addresses=darknet_addresses, truth=truth, problems=problems.count,
                           max_plots=max_plots)
    write(out, page)
    return Summary(records=agg.records, sources=len(agg.sources), flagged=flagged,
                   bad_lines=problems.count, seconds=time.monotonic() - started)


def truth_from_lab(result: Mapping[str, Any]) -> dict[str, Truth]:
    """The truth per source from `lab.report.build`'s result."""
    out = {}
    for h in result.get("hosts", []):
        out[h["src"]] = Truth(truth="direct" if h["truth"] == "direct" else "relay", outcome=h["outcome"],
                              outcome_strong=h["outcome_strong"], scenario=h["scenario"])
    return out


def write_lab_report(log_dir: Path, result: Mapping[str, Any], out: Path, *, darknet_addresses: int,
                     title: str = "stepstone lab run") -> Summary:
    """The page for a lab run (`stepstone-lab demo --html`): its log dir, with the truth of
    `lab.report.build`'s result marked."""
    return make_report(str(log_dir), out, darknet_addresses=darknet_addresses, truth=truth_from_lab(result),
                       title=title, problems=Problems(stream=io.StringIO()))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page: Table 3, the verdicts, and the evidence plotted",
        description="Read the analyzer's --log-dir (stepstone.log, handshakes.log) or a file of "
        "measurement records and write one HTML page (inline SVG, no network access when opened): "
        "Table 3 for the period, the verdicts as a sortable table, T^p against T^a over time for the "
        "flagged sources, the distribution of the timing margin, and the OS mismatch matrix. Prints "
        "one line on stderr with the time it took.",
    )
    p.add_argument("input", metavar="LOG_DIR|RECORDS.jsonl",
                   help="the analyzer's log directory, or measurement records ('-' reads standard input)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="REPORT.html",
                   help="the page to write")
    p.add_argument("--darknet", action="append", default=[], type=_network, metavar="CIDR",
                   help="the darknet (repeat for several): Table 3's darknet addresses")
    p.add_argument("--max-plots", type=int, default=MAX_PLOTS, metavar="N",
                   help="per-source plots, the flagged sources with the largest margin "
                   f"(default {MAX_PLOTS})")
    p.add_argument("--title", default=None, help="the page's title (default: stepstone report)")
    p.set_defaults(func=run_report)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 network: {text[:60]!r}") from None


def run_report(args: argparse.Namespace) -> int:
    if not 0 <= args.max_plots <= 1000:
        raise InputError(f"--max-plots must be 0..1000, not {args.max_plots}")
    problems = Problems(strict=True)
    darknet = sum(n.num_addresses for n in args.darknet) if args.darknet else None
    s = make_report(args.input, args.output, darknet_addresses=darknet, title=args.title,
                    max_plots=args.max_plots, problems=problems)
    print(f"stepstone-analyzer: wrote {args.output}: {s.records} records, {s.sources} sources, "
          f"{s.flagged} flagged, in {s.seconds:.1f} s", file=sys.stderr)
    return problems.exit_status()
