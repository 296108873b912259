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
    APP_ALLOWANCE_US,
    KINDS,
    MAX_APP_ALLOWANCE_MS,
    RELAY_KINDS,
    TIMING_FLOOR_US,
    Evidence,
    StrongTiming,
    TimingRef,
    Verdict,
    address_order,
    against_reference,
    app_test,
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
APP_ROWS = 40  # sources in the tapp - T^a plot: every cond_app one first, then by app margin
APP_POINTS = 100  # tapp - T^a values drawn per source there (of the DIFFS_CAP kept)
# A source's stepstone.log totals restart when its cnt:<src> key expires, after twice the
# analyzer's --window plus an hour without a handshake: an hour at least.
RESET_GAP = 3600.0

# Verdict fields the page uses, with their types: a stepstone.log line is hostile input too.
_FLAGS = ("cond_os", "cond_timing", "relay", "cond_timing_strong", "relay_confident", "cond_hops", "cond_app")
_NUMBERS = ("tp_mean_us", "ta_max_mean_us", "timing_margin_us", "timing_noise_us",
            "timing_threshold_us", "window_start", "window_end", "hops_margin", "hops_spread", "app_margin")
_COUNTS = ("samples", "records", "with_ping", "tp_exceeds_ta_max", "timing_samples", "os_mismatches",
           "hops_samples", "hops_set_aside", "os_clients", "app_samples")
_EVIDENCE_TESTS = ("timing", "hops", "app", "os", "clients")
_EVIDENCE_UNITS = ("us", "hops", "records", "oses")
_CHANGES = ("first", "changed", "refresh")
_TOTALS = ("handshakes_seen", "handshakes_answered", "handshakes_sampled")


# The lab's classes of truth (lab/report.py's CLASSES) and the kind a right verdict says.
EXPECTED_KIND = {"forwarding": "forwarding", "terminating": "terminating", "direct": "none",
                 "scanner": "none", "route change": "none", "shared": "shared"}
RELAY_TRUTHS = frozenset({"forwarding", "terminating"})  # relays: a rule that flags them is right
# A lab host's `truth` (lab/scenarios.py) -> its class, for a lab result without `class`.
_TRUTH_CLASS = {"direct": "direct", "relay": "forwarding", "proxy": "terminating",
                "terminating": "terminating", "shared": "shared"}


@dataclass(frozen=True, slots=True)
class Truth:
    """What the lab knows about a source: its class of truth (EXPECTED_KIND's keys) and scenario.
    Forwarding and terminating relays are positives; shared (several machines behind one address,
    a home NAT) is not a relay, and is right only when the verdict says `shared` and not
    relay_confident. The page scores the verdict it shows (`score`)."""

    truth: str
    scenario: str = ""

    @property
    def relay(self) -> bool:
        return self.truth in RELAY_TRUTHS

    @property
    def expected(self) -> str:
        return EXPECTED_KIND.get(self.truth, "none")


@dataclass(frozen=True, slots=True)
class Score:
    """A verdict against the truth: each rule's outcome ("tp", "fp", "tn", "fn"), and whether its
    kind is the one the truth calls for."""

    outcome: str  # the paper's rule (relay)
    outcome_strong: str  # the confident rule (relay_confident: kind forwarding or terminating)
    kind_right: bool


def score(truth: Truth, verdict: Mapping[str, Any] | None) -> Score:
    """`verdict` (None: the source got none) against `truth`."""
    v = verdict or {}

    def outcome(flagged: bool) -> str:
        return ("tp" if flagged else "fn") if truth.relay else ("fp" if flagged else "tn")

    confident = bool(v.get("relay_confident"))
    right = v.get("kind") == truth.expected and not (truth.truth == "shared" and confident)
    return Score(outcome(bool(v.get("relay"))), outcome(confident), right)


Marks = Mapping[str, tuple[Truth, Score]]  # per lab source: its truth and its verdict's score


class _HopPair(NamedTuple):
    """What the hop test reads of a record."""

    syn_dist: int | None
    fa_dist: int | None
    fp: str | None


class _Paired:
    """One measured time against the active reference T^a (rules.against_reference, one record at a
    time): the count, a uniform reservoir of measured - T^a, and the ping variance and references
    behind them, which is what `timing_test` and `app_test` take."""

    __slots__ = ("diffs", "n", "refs", "var_n", "var_sum")

    def __init__(self) -> None:
        self.n = 0
        self.diffs: array[float] | None = None
        self.var_sum = 0.0
        self.var_n = 0
        self.refs = 0  # bit 1: a ping reference, bit 2: a SYN one (an int: a set per source is ~200 B)

    def add(self, diff: float, mean_var: float, ref: TimingRef, rng: random.Random, cap: int) -> None:
        self.n += 1
        if ref == "ping":
            self.var_sum += mean_var
            self.var_n += 1
        self.refs |= 1 if ref == "ping" else 2
        slot = _reservoir_slot(self.n, cap, rng)
        if slot is not None:
            if self.diffs is None:
                self.diffs = array("d")
            if slot == len(self.diffs):
                self.diffs.append(diff)
            else:
                self.diffs[slot] = diff

    def ref(self) -> TimingRef:
        return "ping+syn" if self.refs == 3 else ("ping" if self.refs == 1 else "syn")

    def mean_var(self) -> float:
        return self.var_sum / self.var_n if self.var_n else 0.0


_NO_APP = _Paired()  # a source without any application RTT (most): nothing to allocate


def _paired(r: Record, measured: Any) -> tuple[float, float, TimingRef] | None:
    """(measured - T^a, the ping variance, the reference) of one record, by the rules' own pairing."""
    diffs, mean_var, ref = against_reference((r,), measured)
    return (diffs[0], mean_var, ref) if ref is not None else None


def _tp(r: Record) -> int | None:
    return r.tp_us


def _tapp(r: Record) -> int | None:
    return r.tapp_us


class _Counts:
    """What the analyzer's logs say a source sent (log-dir input): handshakes.log lines, and the
    running totals of its stepstone.log lines (handshakes_seen/answered/sampled)."""

    __slots__ = ("answered", "at", "banked", "last", "lines", "seen")

    def __init__(self) -> None:
        self.seen = 0  # handshakes.log lines
        self.answered = 0  # ... of them answered
        self.lines = 0  # stepstone.log lines (first, changed, refresh)
        self.last = (0, 0, 0)  # the newest totals (seen, answered, sampled)
        self.banked = (0, 0, 0)  # totals of the counts' earlier lives (cnt:<src> expired meanwhile)
        self.at = -math.inf

    def totals(self, at: float, counts: tuple[int, int, int]) -> None:
        """A stepstone.log line's totals. They only grow while the source's cnt:<src> key lives; a
        drop after an hour or more (its shortest life) is a new key, so the old totals are kept.
        A drop within the hour is two analyzers' lines out of order: the larger stands."""
        self.lines += 1
        if counts[0] < self.last[0] and at - self.at >= RESET_GAP:
            self.banked = tuple(b + x for b, x in zip(self.banked, self.last, strict=True))  # type: ignore[assignment]
            self.last = counts
        elif counts[0] >= self.last[0]:
            self.last = counts
        self.at = max(self.at, at)

    def logged(self) -> tuple[int, int, int] | None:
        """(seen, answered, sampled) from stepstone.log, None without such lines."""
        if not self.lines:
            return None
        return tuple(b + x for b, x in zip(self.banked, self.last, strict=True))  # type: ignore[return-value]


class _Source:
    """One source's running aggregate (module docstring)."""

    __slots__ = ("app", "clients", "counts", "exceeds", "first", "hop_pairs", "labelled", "last", "n_hops",
                 "n_pairs", "n_points", "os_known", "os_mismatches", "os_pair", "points", "records", "sum_ta",
                 "sum_tp", "timing", "verdict", "verdict_key", "with_ping")

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
        self.timing = _Paired()  # T^p - T^a
        self.app = _NO_APP  # tapp - T^a, its own _Paired from the first application RTT
        self.n_points = 0
        # t, T^p (NaN: none), T^a, 1.0 if T^a is the SYN RTT, T^app (NaN: none)
        self.points: array[float] | None = None
        self.clients: set[str] = set()  # client OSes (class:name) among the SYN labels
        self.labelled = 0  # records whose SYN label names an OS
        self.os_known = 0  # records with both labels naming an OS
        self.n_hops = 0
        # A uniform sample for the hop test, packed: (SYN distance, SYN+ACK distance, 1 if the SYN's
        # label is a userland tool's) per pair, 6 bytes each.
        self.hop_pairs: array[int] | None = None
        self.verdict: dict[str, Any] | None = None  # the logged verdict (log-dir input)
        self.verdict_key: tuple[float, int] = (-math.inf, -1)
        self.counts: _Counts | None = None  # log-dir input: what the logs say it sent

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
        tp = _paired(r, _tp) if r.tp_us is not None else None
        app = _paired(r, _tapp) if r.tapp_us is not None else None
        if tp is not None:
            self.timing.add(*tp, rng, diffs_cap)
        if app is not None:
            if self.app is _NO_APP:
                self.app = _Paired()
            self.app.add(*app, rng, diffs_cap)
        if tp is None and app is None:
            return
        nan = math.nan
        ta = float(r.tp_us - tp[0]) if tp is not None else float(r.tapp_us - app[0])  # type: ignore[index,operator]
        syn = 1.0 if (tp or app)[2] == "syn" else 0.0  # type: ignore[index]
        self.n_points += 1
        slot = _reservoir_slot(self.n_points, points_cap, rng)
        if slot is not None:
            if self.points is None:
                self.points = array("d")
            point = (r.t, float(r.tp_us) if tp is not None else nan, ta, syn,
                     float(r.tapp_us) if app is not None else nan)  # type: ignore[arg-type]
            if slot * 5 == len(self.points):
                self.points.extend(point)
            else:
                self.points[slot * 5:slot * 5 + 5] = array("d", point)

    def app_result(self, allowance_us: float) -> StrongTiming:
        """cond_app over the kept sample, as rules.app_timing would over every record."""
        a = self.app
        if not a.n or a.diffs is None:
            return StrongTiming()
        return app_test(list(a.diffs), samples=a.n, mean_ping_var=a.mean_var(), ref=a.ref(),
                        allowance_us=allowance_us)

    def judge(self, src: str, app_allowance_us: float = APP_ALLOWANCE_US) -> Verdict:
        """analyzer.rules.judge over every record of the source (os level "name"), from the
        running sums and the kept samples, with the rules' own tests (`timing_test`, `app_test`,
        `hop_test`, `findings`)."""
        tp_mean = ta_mean = None
        cond_timing = False
        if self.n_pairs:
            tp_mean = self.sum_tp / self.n_pairs
            ta_mean = self.sum_ta / self.n_pairs
            cond_timing = self.exceeds > 0 and tp_mean > ta_mean
        strong = StrongTiming()
        t = self.timing
        if t.n and t.diffs is not None:
            strong = timing_test(list(t.diffs), samples=t.n, mean_ping_var=t.mean_var(), ref=t.ref())
        app = self.app_result(app_allowance_us)
        p = self.hop_pairs or array("h")
        # Only what hop_test reads of the label: whether it is a userland tool's.
        hops = hop_test(_HopPair(p[i], p[i + 1], "!:" if p[i + 2] else None) for i in range(0, len(p), 3))
        evidence, kind = findings(strong, hops, os_mismatches=self.os_mismatches, os_known=self.os_known,
                                  clients=len(self.clients), labelled=self.labelled, app=app)
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
            kind=kind, evidence=tuple(evidence), cond_app=app.holds, app_margin=app.margin_us,
            app_samples=app.samples,
        )

    def series(self) -> list[tuple[float, float, float, bool, float]]:
        """The kept (t, T^p, T^a, T^a is the SYN RTT, T^app) points, in time order (NaN: none)."""
        p = self.points
        if p is None:
            return []
        return sorted((p[i], p[i + 1], p[i + 2], p[i + 3] > 0, p[i + 4]) for i in range(0, len(p), 5))

    def app_diffs(self, most: int) -> list[float]:
        """Up to `most` of the kept tapp - T^a values (a uniform sample), µs."""
        return list(self.app.diffs[:most]) if self.app.diffs is not None else []


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
    app_allowance_us: float = APP_ALLOWANCE_US  # records input: cond_app's allowance (judge's)
    sources: dict[str, _Source] = field(default_factory=dict)
    os_pairs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (F^p, F^a) at class:name
    records: int = 0
    logged: bool = False  # verdicts come from the analyzer's logs
    # Log-dir input: per source what handshakes.log and stepstone.log say it sent, including
    # sources with no measured record (unanswered, or only counted).
    counts: dict[str, _Counts] = field(default_factory=dict)
    changes: Counter[str] = field(default_factory=Counter)  # stepstone.log lines by `change`
    handshakes_lines: int = 0  # handshakes.log lines read

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
        if verdict is not None and key is not None:
            self.set_verdict(s, verdict, key)

    @staticmethod
    def set_verdict(s: _Source, verdict: dict[str, Any], key: tuple[float, int]) -> None:
        if key >= s.verdict_key:
            s.verdict, s.verdict_key = verdict, key

    def counts_of(self, src: str) -> _Counts:
        c = self.counts.get(src)
        if c is None:
            c = self.counts[src] = _Counts()
        return c

    def _os(self, label: str) -> str:
        part = self._labels.get(label)
        if part is None:
            if len(self._labels) > 10_000:
                self._labels.clear()
            part = self._labels[label] = os_part(label, "name")
        return part

    def handshake_counts(self, src: str) -> tuple[int, int, int] | None:
        """Log-dir input: (seen, answered, measured) handshakes of a source. Each is the largest
        that a log shows: handshakes.log has every handshake (--handshakes-log all, or an analyzer
        from before sampling) or the sampled ones; stepstone.log's totals include the handshakes
        only counted, as of the source's last verdict line; records.log has the answered measured
        ones. An analyzer from before sampling measured every handshake."""
        if not self.logged:
            return None
        c = self.counts.get(src)
        s = self.sources.get(src)
        records = s.records if s is not None else 0
        logged = c.logged() if c is not None else None
        seen = max(c.seen if c else 0, logged[0] if logged else 0, records)
        answered = max(c.answered if c else 0, logged[1] if logged else 0, records)
        measured = max(logged[2], records) if logged else seen
        return seen, answered, measured

    def verdicts(self) -> list[dict[str, Any]]:
        """One verdict dict per source (Verdict.to_dict's keys), sorted by address; from a log
        dir, also `handshakes_seen`, `handshakes_answered` and `handshakes_measured`."""
        out = []
        for src in sorted(self.sources, key=address_order):
            s = self.sources[src]
            if self.logged:
                v = {k: None for k in Verdict.__dataclass_fields__}
                v.update(s.verdict or {})
                v["src"] = src
            else:
                v = s.judge(src, self.app_allowance_us).to_dict()
            v["first_seen"], v["last_seen"] = s.first, s.last
            v["n_records"] = s.records
            counts = self.handshake_counts(src)
            if counts is not None:
                v["handshakes_seen"], v["handshakes_answered"], v["handshakes_measured"] = counts
            out.append(v)
        return out

    def table3_counts(self) -> tuple[int, int]:
        """(answered connection requests, unique sources among them): from the logs' counts per
        source (log dir), else one per record."""
        if not self.logged:
            return self.records, len(self.sources)
        answered = sources = 0
        for src in set(self.sources) | set(self.counts):
            counts = self.handshake_counts(src)
            if counts is not None and counts[1]:
                answered += counts[1]
                sources += 1
        return answered, sources


# -- reading ----------------------------------------------------------------------------------


def _objects(path: str, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) per good line; bad lines are reported in offline's words."""
    return json_objects(path, problems, what="a log line or record", read_error_fatal=True)


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= 2**53)


def _clean_verdict(obj: Any) -> dict[str, Any] | None:
    """The verdict fields the page shows, each of its type, or None if `obj` is not a verdict.
    An older analyzer's verdict lacks the later fields: they read as absent (False, None, 0)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("relay"), bool):
        return None
    out: dict[str, Any] = {}
    for k in _FLAGS:
        out[k] = obj.get(k) if isinstance(obj.get(k), bool) else False
    for k in (*_NUMBERS, *_COUNTS):
        value = obj.get(k)
        out[k] = value if _number(value) else None
    ref = obj.get("timing_ref")
    out["timing_ref"] = ref if ref in ("ping", "syn", "ping+syn") else None
    pair = obj.get("os_pair")
    out["os_pair"] = (pair if isinstance(pair, list) and len(pair) == 2
                      and all(isinstance(x, str) and len(x) <= 256 for x in pair) else None)
    kind = obj.get("kind")
    out["kind"] = kind if kind in KINDS else None
    evidence = obj.get("evidence")
    out["evidence"] = [
        {"test": e["test"], "margin": e["margin"], "threshold": e.get("threshold"),
         "samples": e.get("samples"), "unit": e.get("unit")}
        for e in (evidence[:len(_EVIDENCE_TESTS)] if isinstance(evidence, list) else [])
        if isinstance(e, dict) and e.get("test") in _EVIDENCE_TESTS and _number(e.get("margin"))
        and _number(e.get("threshold")) and _number(e.get("samples")) and e.get("unit") in _EVIDENCE_UNITS
    ]
    return out


def read_records(path: str, agg: Aggregate, problems: Problems) -> None:
    for number, obj in _objects(path, problems):
        try:
            agg.add(Record.from_json(obj))
        except RecordError as exc:
            problems.report(f"{path}: line {number}: {exc}")


LOGS = ("records.log", "stepstone.log")  # a log dir has one of them at least


def log_dirs(log_dir: Path) -> list[Path]:
    """The analyzer's log dirs under `log_dir`: itself, and a sharded analyzer's shard-<i>/ ones."""
    shards = sorted((d for d in log_dir.glob("shard-*") if d.is_dir() and d.name[6:].isdigit()),
                    key=lambda d: int(d.name[6:]))
    found = [d for d in (log_dir, *shards) if any((d / name).is_file() for name in LOGS)]
    if not found:
        raise InputError(f"{log_dir}: no records.log or stepstone.log in it, nor in a shard-<i>/ "
                         "(the analyzer's --log-dir)")
    return found


def read_log_dir(log_dir: Path, agg: Aggregate, problems: Problems) -> None:
    """Read the analyzer's --log-dir, as an analyzer of any version left it:
    - records.log: one line per measured handshake, its record and its source's verdict;
    - stepstone.log: one line per verdict change or refresh (a `change` field, and the source's
      handshake totals); an analyzer from before sampling wrote one line per handshake there, as
      records.log's (no `change`), and a dir it wrote before an upgrade has both kinds;
    - handshakes.log: one line per handshake (every one before sampling, else per --handshakes-log);
    - shard-<i>/: the same, per shard of a sharded analyzer."""
    agg.logged = True
    for d in log_dirs(log_dir):
        for name in LOGS:
            if (d / name).is_file():
                _read_lines(d / name, agg, problems)
        handshakes = d / "handshakes.log"
        if handshakes.is_file():
            _read_handshakes(handshakes, agg, problems)


def _read_lines(path: Path, agg: Aggregate, problems: Problems) -> None:
    """A records.log or stepstone.log: record lines (each with its verdict), and change lines."""
    for number, obj in _objects(str(path), problems):
        try:
            record = Record.from_json(obj)
        except RecordError as exc:
            problems.report(f"{path}: line {number}: {exc}")
            continue
        verdict = _clean_verdict(obj.get("verdict"))
        if verdict is None:
            problems.report(f"{path}: line {number}: no verdict object with a boolean 'relay'")
            continue
        at = obj.get("verdict_at")
        at = float(at) if _number(at) else 0.0
        change = obj.get("change")
        if change is None:  # a measured handshake's line
            agg.add(record, verdict, (at, number))
            continue
        totals = [obj.get(k) for k in _TOTALS]
        if change not in _CHANGES or not all(_number(x) and x >= 0 and x == int(x) for x in totals):
            problems.report(f"{path}: line {number}: a verdict line needs change (first, changed, refresh) "
                            "and handshakes_seen/answered/sampled counts")
            continue
        agg.changes[change] += 1
        agg.counts_of(record.src).totals(at, (int(totals[0]), int(totals[1]), int(totals[2])))
        # Its record has its own records.log line; its verdict is that line's, and stands in for
        # it should records.log have lost it.
        s = agg.sources.get(record.src)
        if s is None:
            s = agg.sources[record.src] = _Source(record.t)
        agg.set_verdict(s, verdict, (at, number))


def _read_handshakes(path: Path, agg: Aggregate, problems: Problems) -> None:
    for number, obj in _objects(str(path), problems):
        src = obj.get("src")
        if not isinstance(src, str) or not isinstance(obj.get("answered"), bool):
            problems.report(f"{path}: line {number}: not a handshake line (src, answered)")
            continue
        try:
            src = str(ipaddress.ip_address(src))
        except ValueError:
            problems.report(f"{path}: line {number}: src is not an IP address")
            continue
        agg.handshakes_lines += 1
        c = agg.counts_of(src)
        c.seen += 1
        c.answered += obj["answered"]


# -- the page ---------------------------------------------------------------------------------


def _rule(v: Mapping[str, Any]) -> str:
    """Which rule calls the source a relay: the confident one, the paper's only, or none."""
    if v.get("relay_confident"):
        return "relay (confident)"
    if v.get("relay"):
        return "relay (paper)"
    return "none"


def _kind(v: Mapping[str, Any]) -> str:
    """The verdict's kind (an older analyzer's logged verdict has none)."""
    kind = v.get("kind")
    return kind if isinstance(kind, str) else NONE


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
    if v.get("cond_hops"):
        out.append("hops")
    if v.get("cond_app"):
        out.append("application RTT")
    return "; ".join(out) or NONE


def _evidence(v: Mapping[str, Any]) -> str:
    """The evidence that held, one token each as the logs write it (`app=+40.6ms/5`)."""
    return " ".join(Evidence(**e).brief() for e in v.get("evidence") or []) or NONE


def _app_threshold(v: Mapping[str, Any], s: _Source | None, allowance_us: float) -> float | None:
    """What the source's app margin had to pass: the verdict's own `app` evidence where it held,
    else the rules' app_test over the records read here."""
    for e in v.get("evidence") or []:
        if e.get("test") == "app":
            return float(e["threshold"])
    if s is None:
        return None
    return s.app_result(allowance_us).threshold_us


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


def _source_plot(src: str, s: _Source, v: Mapping[str, Any], mark: tuple[Truth, Score] | None,
                 allowance_us: float) -> str:
    import matplotlib
    from matplotlib import dates as mdates

    points = s.series()
    with matplotlib.rc_context(_STYLE):
        fig = _figure(6.0, 2.9)
        ax = fig.add_subplot()
        when = [datetime.fromtimestamp(p[0], UTC) for p in points]
        ta = [p[2] / 1000 for p in points]
        threshold = v.get("timing_threshold_us")
        app_threshold = _app_threshold(v, s, allowance_us) if s.app.n else None
        # T^a hollow and T^p drawn last: on a direct source they coincide and both stay visible.
        tp = [(w, p[1] / 1000) for w, p in zip(when, points, strict=True) if not math.isnan(p[1])]
        if tp:
            ax.plot(*zip(*tp, strict=True), "o", ms=3.5, color="#cf222e", zorder=3, label="$T^p$ (handshake)")
        app = [(w, p[4] / 1000) for w, p in zip(when, points, strict=True) if not math.isnan(p[4])]
        if app:
            ax.plot(*zip(*app, strict=True), "^", ms=4.5, color="#8250df", zorder=3,
                    label="$T^{app}$ (banner to answer)")
        ping = [(w, a) for w, a, p in zip(when, ta, points, strict=True) if not p[3]]
        syn = [(w, a) for w, a, p in zip(when, ta, points, strict=True) if p[3]]
        if ping:
            ax.plot(*zip(*ping, strict=True), "s", ms=5, mfc="none", mew=1.2, color="#0969da", zorder=2,
                    label="$T^a$ (max ping RTT)")
        if syn:
            ax.plot(*zip(*syn, strict=True), "D", ms=5, mfc="none", mew=1.2, color="#1f883d", zorder=2,
                    label="$T^a$ (SYN RTT)")
        if isinstance(threshold, int | float) and tp:
            ax.step(when, [a + threshold / 1000 for a in ta], where="mid", ls="--", lw=1, color="#57606a",
                    label=f"$T^a$ + threshold ({threshold / 1000:.1f} ms)")
        if app_threshold is not None and app:
            ax.step(when, [a + app_threshold / 1000 for a in ta], where="mid", ls=":", lw=1.2,
                    color="#8250df", label=f"$T^a$ + app threshold ({app_threshold / 1000:.1f} ms)")
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
        why = f"by {_conditions(v, pair=False)}" if _flagged(v) else "not flagged"
        title = (f"{src}: {_kind(v)}, {_rule(v)}, {why}\ntiming margin {_ms(v.get('timing_margin_us'))} ms, "
                 f"threshold {_ms(threshold)} ms, {s.timing.n} timing samples{kept}")
        if s.app.n or v.get("app_samples"):
            title += (f"\napp margin {_ms(v.get('app_margin'))} ms, threshold {_ms(app_threshold)} ms, "
                      f"{v.get('app_samples') or 0} app samples")
        if v.get("cond_os") and v.get("os_pair"):
            title += f"\nOS: {_wrap(v['os_pair'][0], 40)} \u2260 {_wrap(v['os_pair'][1], 40)}"
        if mark is not None:
            t, sc = mark
            right = "right" if sc.kind_right else "WRONG"
            title += (f"\nlab truth: {t.truth} ({_wrap(t.scenario, 30)}); paper {sc.outcome.upper()}, "
                      f"confident {sc.outcome_strong.upper()}, kind {right}")
        ax.set_title(title, loc="left")
        return _svg(fig)


_KIND_COLOR = {"forwarding": "#cf222e", "terminating": "#8250df", "shared": "#bc4c00", "none": "#8c959f"}


def _app_plot(verdicts: list[dict[str, Any]], agg: Aggregate, marks: Marks | None) -> tuple[str, int, int]:
    """tapp - T^a per source with application RTTs, one row each (every cond_app source first,
    then by app margin), its threshold marked: the evidence behind `terminating`. The SVG, the
    rows shown and the sources with application RTTs."""
    import matplotlib

    have = [v for v in verdicts if (s := agg.sources.get(v["src"])) is not None and s.app.n]
    have.sort(key=lambda v: (not v.get("cond_app"), -(v.get("app_margin") or -math.inf)))
    rows = have[:APP_ROWS]
    with matplotlib.rc_context(_STYLE):
        if not rows:
            fig = _figure(9.0, 1.2)
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no record has an application RTT (tapp_us): no banner was sent "
                    "(the responder's --banners, Zeek's server_first_ports) or no client answered one",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return _svg(fig), 0, 0
        fig = _figure(9.0, 1.3 + 0.3 * len(rows))
        ax = fig.add_subplot()
        labels = []
        for i, v in enumerate(rows):
            s = agg.sources[v["src"]]
            values = [d / 1000 for d in s.app_diffs(APP_POINTS)]
            color = _KIND_COLOR.get(str(v.get("kind")), "#8c959f")
            ax.plot(values, [i] * len(values), "|", ms=8, mew=1.2, color=color, alpha=0.7)
            if isinstance(v.get("app_margin"), int | float):
                ax.plot([v["app_margin"] / 1000], [i], "o", ms=5, color=color, mec="#24292f", zorder=3)
            threshold = _app_threshold(v, s, agg.app_allowance_us)
            if threshold is not None:
                ax.plot([threshold / 1000], [i], marker=">", ms=6, color="#24292f", ls="none", zorder=3)
            label = f"{v['src']} {_kind(v)} ({v.get('app_samples') or 0})"
            if marks and v["src"] in marks:
                label += f" [{marks[v['src']][0].truth}]"
            labels.append(label)
        ax.set_yticks(range(len(rows)), labels)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.invert_yaxis()
        floor = (agg.app_allowance_us + TIMING_FLOOR_US) / 1000
        ax.axvline(floor, color="#24292f", ls="--", lw=1, label=f"allowance + floor ({floor:.0f} ms)")
        ax.axvline(0, color="#8c959f", lw=0.8)
        ax.set_xlabel("$T^{app} - T^a$ per record (ms)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(loc="lower right", frameon=False)
        return _svg(fig), len(rows), len(have)


def _margin_plot(verdicts: list[dict[str, Any]], truth: Marks | None) -> str:
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
                       if (t := truth.get(v["src"])) is not None and t[1].outcome_strong == k])
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
_TAPP = "<i>T</i><sup>app</sup>"
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
svg{max-width:100%;height:auto}.wide{overflow-x:auto}.warn{color:#9a6700}table+table{margin-top:.8em}
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
    marks: dict[str, tuple[Truth, Score]] | None = (
        {src: (t, score(t, by_src.get(src))) for src, t in truth.items()} if truth else None)
    flagged = [v for v in verdicts if _flagged(v)]
    first = min((s.first for s in agg.sources.values()), default=None)
    last = max((s.last for s in agg.sources.values()), default=None)
    answered, unique = agg.table3_counts()
    kinds = Counter(v.get("kind") for v in verdicts)
    t3 = [
        ("darknet addresses", f"{NONE} (give --darknet)" if darknet_addresses is None else darknet_addresses),
        ("answered connection requests", answered),
        ("unique sources", unique),
        ("relays by (1) OS mismatch", sum(bool(v.get("cond_os")) for v in verdicts)),
        (f"relays by (2) {_TP} &#8811; {_TA}", sum(bool(v.get("cond_timing")) for v in verdicts)),
        ("relays in total (paper's rule)", sum(bool(v.get("relay")) for v in verdicts)),
        ("relays by the confident rule (not in the paper)",
         sum(bool(v.get("relay_confident")) for v in verdicts)),
        *((f"&nbsp;&nbsp;kind {k}", kinds.get(k, 0)) for k in KINDS),
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
    if agg.logged:
        out.append(_handshakes_note(agg, verdicts))
    if marks:
        out.append(_truth_table(verdicts, marks))

    out.append("<h2>Timing margin over all sources</h2>")
    out.append(f'<p class="meta">The confident rule flags a source whose median {_TP} &minus; {_TA} is above '
               "its threshold: max(5 ms, 3 standard errors of its own noise), so a jittery source needs "
               f"more. The paper's rule compares the means and needs one {_TP} above the max ping RTT.</p>")
    out.append(f'<div class="wide">{_margin_plot(verdicts, marks)}</div>')

    app_svg, app_rows, app_sources = _app_plot(verdicts, agg, marks)
    out.append(f"<h2>Application RTT: {_TAPP} &minus; {_TA} per source (terminating proxies)</h2>")
    shown = (f"The {app_rows} of {app_sources} sources with application RTTs that matter most are shown: "
             if app_rows < app_sources else f"{app_sources} sources with application RTTs. ")
    out.append(f'<p class="meta">{shown}On server-first ports the sensor sends a banner and times the '
               f"client's answer ({_TAPP}). A proxy that completes the handshake itself adds its onward leg "
               f"twice to {_TAPP} and nothing to {_TP}: it is <i>terminating</i> when the median "
               f"{_TAPP} &minus; {_TA} exceeds {agg.app_allowance_us / 1000:g} ms (the client's own time "
               "to answer) plus max(5 ms, 3 standard errors) over 3 records or more, and nothing "
               "forwarding holds. Per source: | a record (at most "
               f"{APP_POINTS} drawn), &#9679; the median (its app margin), &#9654; its threshold (the "
               "dashed line: the least a threshold can be); colour: the verdict's kind; the label: "
               "kind, samples [lab truth]. Sources with cond_app first, then by app margin.</p>")
    out.append(f'<div class="wide">{app_svg}</div>')

    out.append("<h2>OS mismatch matrix (F<sup>p</sup> &times; F<sup>a</sup>)</h2>")
    out.append('<p class="meta">Records per (F<sup>p</sup>, F<sup>a</sup>) pair of OS labels (class:name), '
               "where both are known: blue the same OS, red a mismatch (condition (1)). The "
               f"{MATRIX_LABELS} most frequent labels on each axis; the rest are \"other\".</p>")
    out.append(f'<div class="wide">{_matrix_plot(agg.os_pairs)}</div>')

    plotted = sorted(flagged, key=_margin_key, reverse=True)
    if marks:  # the lab: the relays missed matter as much as the ones found
        plotted += [by_src[src] for src, (_, sc) in marks.items() if sc.outcome_strong == "fn"
                    and src in by_src and not _flagged(by_src[src])]
    shown_plots = plotted[:max_plots]
    out.append(f"<h2>{_TP} and {_TAPP} against {_TA} over time, per flagged source</h2>")
    note = (f"{len(plotted)} sources to plot; the {len(shown_plots)} with the largest margin are shown."
            if len(plotted) > len(shown_plots) else f"{len(shown_plots)} sources.")
    out.append(f'<p class="meta">{note} A sample is beyond the threshold when its {_TP} is above the dashed '
               f"line ({_TAPP}: the dotted one). Each plot keeps at most {agg.points_cap} points per source, "
               "sampled uniformly over its records.</p>")
    # Spaces between the spans: the key wraps between its entries, never inside one.
    out.append('<p class="key"><span style="color:#cf222e">&#9679; ' + _TP + " (the handshake)</span> "
               '<span style="color:#8250df">&#9650; ' + _TAPP + " (banner to the client's answer)</span> "
               '<span style="color:#0969da">&#9633; ' + _TA + " (max ping RTT)</span> "
               '<span style="color:#1f883d">&#9671; ' + _TA + " (SYN RTT, when ICMP is dropped)</span> "
               '<span style="color:#57606a">- - - ' + _TA + " + the source's threshold</span> "
               '<span style="color:#8250df">&middot;&middot;&middot; ' + _TA
               + " + its app threshold</span></p>")
    if shown_plots:
        out.append('<div class="plots">')
        for v in shown_plots:
            svg = _source_plot(v["src"], agg.sources[v["src"]], v, (marks or {}).get(v["src"]),
                               agg.app_allowance_us)
            out.append(f"<div>{svg}</div>")
        out.append("</div>")
    else:
        out.append("<p>No source was flagged.</p>")

    out.append(_verdict_table(verdicts, marks, logged=agg.logged))
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out), len(flagged)


def _handshakes_note(agg: Aggregate, verdicts: list[dict[str, Any]]) -> str:
    """What the analyzer measured and what it only counted (log-dir input)."""
    seen = sum(v.get("handshakes_seen") or 0 for v in verdicts)
    measured = sum(v.get("handshakes_measured") or 0 for v in verdicts)
    # Sources with handshakes but no measured record: unanswered, or never measured.
    others = [c for src, c in agg.counts.items() if src not in agg.sources]
    seen += sum(max(c.seen, (c.logged() or (0,))[0]) for c in others)
    changes = ", ".join(f"{agg.changes.get(k, 0)} {k}" for k in _CHANGES)
    lines = (f"stepstone.log has {sum(agg.changes.values())} verdict lines ({changes})"
             if agg.changes else "stepstone.log has one line per measured handshake (an analyzer from "
             "before sampling: every handshake measured)")
    return (f'<p class="meta">Handshakes seen {seen}, measured {measured} (the first '
            "--sample-per-source of each source per probe period), only counted "
            f"{max(0, seen - measured)}; {agg.handshakes_lines} handshakes.log lines. {lines}. "
            "A source's counts are the largest its logs show: stepstone.log's totals as of its last "
            "verdict line (a change, or a refresh every --refresh seconds), handshakes.log's lines, "
            "its records.log records.</p>")


def _truth_table(verdicts: list[dict[str, Any]], marks: Marks) -> str:
    have = {v["src"] for v in verdicts}
    by_src = {v["src"]: v for v in verdicts}
    rows = ["<h2>Detection against the lab's truth</h2>",
            '<p class="meta">Forwarding and terminating relays are positives; direct hosts, scanners, '
            "route changes and home NATs (shared) are negatives. A home NAT is right when its verdict "
            "says <i>shared</i> and not relay_confident.</p>",
            "<table><tr><th>rule</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th><th>precision</th>"
            "<th>recall</th></tr>"]
    rules = (("paper's rule (relay)", "outcome"),
             ("confident rule (relay_confident: kind forwarding or terminating)", "outcome_strong"))
    for name, attr in rules:
        counts = Counter(getattr(sc, attr) for _, sc in marks.values())
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        ratios = [_ratio(tp, tp + fp), _ratio(tp, tp + fn)]
        rows.append(f"<tr><td>{name}</td>" + "".join(
            f'<td class="n {k}">{counts.get(k, 0)}</td>' for k in ("tp", "fp", "tn", "fn"))
            + "".join(f'<td class="n">{r}</td>' for r in ratios) + "</tr>")
    rows.append("</table>")
    # Per class: the kind each should get, and what the verdicts said.
    rows.append('<table><tr><th>truth</th><th>sources</th><th>kind expected</th><th>kind right</th>'
                "<th>kinds said</th></tr>")
    order = list(EXPECTED_KIND)
    classes = sorted({t.truth for t, _ in marks.values()},
                     key=lambda c: (order.index(c) if c in order else len(order), c))
    for c in classes:
        of = [(src, t, sc) for src, (t, sc) in marks.items() if t.truth == c]
        said = Counter(_kind(by_src[src]) if src in by_src else "no verdict" for src, _, _ in of)
        right = sum(sc.kind_right for _, _, sc in of)
        css = "tp" if right == len(of) else "fp"
        rows.append(f"<tr><td>{_e(c)}</td><td class=\"n\">{len(of)}</td><td>{_e(of[0][1].expected)}</td>"
                    f'<td class="n {css}">{right}/{len(of)}</td>'
                    f"<td>{_e(', '.join(f'{k} {n}' for k, n in said.most_common()))}</td></tr>")
    rows.append("</table>")
    missing = sorted(src for src in marks if src not in have)
    if missing:
        rows.append(f'<p class="warn">No verdict for {len(missing)} lab sources: '
                    f'{_e(", ".join(missing))}.</p>')
    return "".join(rows)


def _ratio(num: int, den: int) -> str:
    return f"{num / den:.2f}" if den else NONE


def _verdict_table(verdicts: list[dict[str, Any]], marks: Marks | None, *, logged: bool) -> str:
    ordered = sorted(verdicts, key=lambda v: (not _flagged(v), -_margin_key(v)))
    # Within one year the year is the page's period line's; the cells stay short.
    years = {_when(v.get(k), "%Y") for v in verdicts for k in ("first_seen", "last_seen")}
    fmt = "%m-%d %H:%M:%S" if len(years) == 1 else "%Y-%m-%d %H:%M:%S"
    rows = ordered[:MAX_ROWS]
    head = ["source", "kind", "rule", "evidence", "conditions", "timing margin ms", "threshold ms", "ref",
            "timing samples", "app margin ms", "app samples", "records", "OS mismatches",
            f"mean {_TP} ms", f"mean max {_TA} ms", "first seen (UTC)", "last seen (UTC)"]
    if logged:  # what the analyzer saw of the source, and how much of it it measured
        head[12:12] = ["handshakes seen", "answered", "measured"]
    if marks:  # the truth next to the verdict, where a reader looks first; the scenario last
        head[2:2] = ["truth", "kind right", "paper rule", "confident rule"]
        head.append("scenario")
    out = ["<h2>Verdicts</h2>"]
    note = (f"{len(rows)} of {len(verdicts)} sources: every flagged one, then the largest margins."
            if len(rows) < len(verdicts) else f"{len(verdicts)} sources.")
    out.append(f'<p class="meta">{note} Click a column to sort. "kind": what the verdict found '
               "(forwarding: timing or hops; terminating: the application RTT; shared: several machines "
               "behind one address, not a relay; none). \"rule\": relay by the confident rule (kind "
               "forwarding or terminating), by the paper's rule only, or none. \"evidence\": each test "
               "that held, margin/samples."
               + (" \"measured\": the handshakes the analyzer measured fully; the rest of those seen "
                  "were only counted." if logged else "") + "</p>")
    out.append('<div class="wide"><table class="sortable" id="verdicts"><thead><tr>'
               + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>")  # constants: HTML
    for v in rows:
        version, number = address_order(v["src"])
        cells = [
            f'<td data-v="{version}{number:040d}">{_e(v["src"])}</td>',
            f'<td class="k-{_e(_kind(v))}">{_e(_kind(v))}</td>',
            f"<td>{_e(_rule(v))}</td>",
            f'<td class="c">{_e(_evidence(v))}</td>',
            f'<td class="c">{_e(_conditions(v))}</td>',
            _num_cell(_ms_value(v.get("timing_margin_us")), _ms(v.get("timing_margin_us"))),
            _num_cell(_ms_value(v.get("timing_threshold_us")), _ms(v.get("timing_threshold_us"))),
            f"<td>{_e(v.get('timing_ref') or NONE)}</td>",
            _num_cell(v.get("timing_samples")),
            _num_cell(_ms_value(v.get("app_margin")), _ms(v.get("app_margin"))),
            _num_cell(v.get("app_samples")),
            _num_cell(v.get("n_records")),
            _num_cell(v.get("os_mismatches")),
            _num_cell(_ms_value(v.get("tp_mean_us")), _ms(v.get("tp_mean_us"))),
            _num_cell(_ms_value(v.get("ta_max_mean_us")), _ms(v.get("ta_max_mean_us"))),
            f'<td data-v="{_e(v.get("first_seen"))}">{_e(_when(v.get("first_seen"), fmt))}</td>',
            f'<td data-v="{_e(v.get("last_seen"))}">{_e(_when(v.get("last_seen"), fmt))}</td>',
        ]
        if logged:
            cells[12:12] = [_num_cell(v.get("handshakes_seen")), _num_cell(v.get("handshakes_answered")),
                            _num_cell(v.get("handshakes_measured"))]
        if marks:
            m = marks.get(v["src"])
            if m is None:
                cells[2:2] = [f"<td>{NONE}</td>"] * 4
                cells.append(f"<td>{NONE}</td>")
            else:
                t, sc = m
                right = ("tp", "yes") if sc.kind_right else ("fp", "NO")
                cells[2:2] = [f"<td>{_e(t.truth)}</td>",
                              f'<td class="{right[0]}">{right[1]} ({_e(t.expected)})</td>',
                              f'<td class="{sc.outcome}">{sc.outcome.upper()}</td>',
                              f'<td class="{sc.outcome_strong}">{sc.outcome_strong.upper()}</td>']
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
    """The truth per source from `lab.report.build`'s result: the host's class of scenario
    (forwarding, terminating, direct, scanner, shared, route change), else its truth's class."""
    out = {}
    for h in result.get("hosts", []):
        klass = h.get("class")
        if klass not in EXPECTED_KIND:
            klass = _TRUTH_CLASS.get(h["truth"], "direct")
        out[h["src"]] = Truth(truth=klass, scenario=h["scenario"])
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
        description="Read the analyzer's --log-dir (records.log, stepstone.log, handshakes.log) or a file of "
        "measurement records and write one HTML page (inline SVG, no network access when opened): "
        "Table 3 for the period, the verdicts as a sortable table, T^p against T^a over time for the "
        "flagged sources, the distribution of the timing margin, the application RTT (tapp - T^a) "
        "behind terminating proxies, and the OS mismatch matrix. A log dir may be a sharded "
        "analyzer's (shard-<i>/) or one an older analyzer wrote. Prints one line on stderr with the "
        "time it took.",
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
    p.add_argument("--app-allowance", type=float, default=APP_ALLOWANCE_US / 1000, metavar="MS",
                   help="records input: cond_app's allowance for a client's own time to answer a banner, as "
                   f"judge's (default {APP_ALLOWANCE_US / 1000:g}); a log dir's verdicts are shown as logged")
    p.set_defaults(func=run_report)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 network: {text[:60]!r}") from None


def run_report(args: argparse.Namespace) -> int:
    if not 0 <= args.max_plots <= 1000:
        raise InputError(f"--max-plots must be 0..1000, not {args.max_plots}")
    if not 0 <= args.app_allowance <= MAX_APP_ALLOWANCE_MS:
        raise InputError(f"--app-allowance must be within 0..{MAX_APP_ALLOWANCE_MS:g} ms, "
                         f"not {args.app_allowance:g}")
    problems = Problems(strict=True)
    darknet = sum(n.num_addresses for n in args.darknet) if args.darknet else None
    s = make_report(args.input, args.output, darknet_addresses=darknet, title=args.title,
                    max_plots=args.max_plots, problems=problems,
                    agg=Aggregate(app_allowance_us=args.app_allowance * 1000))
    print(f"stepstone-analyzer: wrote {args.output}: {s.records} records, {s.sources} sources, "
          f"{s.flagged} flagged, in {s.seconds:.1f} s", file=sys.stderr)
    return problems.exit_status()
