"""`stepstone-analyzer report`: the verdicts it shows are the rules' own, the logged verdicts are
shown as logged, bad lines are counted, hostile text is escaped, and memory stays flat as records
grow."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from analyzer import htmlreport
from analyzer.htmlreport import Aggregate, Truth, make_report, read_records
from analyzer.offline import MAX_REPORTED, Problems
from analyzer.record import Record
from analyzer.rules import judge_all

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("report_bench", ROOT / "bench" / "report_bench.py")
assert _spec is not None and _spec.loader is not None
report_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_bench)

LINUX, WIN = "unix:Linux:3.11 and newer", "win:Windows:7 or 8"


def _record(rng: random.Random, src: str, t: float, *, extra: int = 0,
            mismatch: bool = False) -> dict[str, Any]:
    """A record with a random mix of what real ones lack: no T^p (Karn), no ping (ICMP dropped),
    no SYN RTT, unknown labels."""
    rtt = rng.randrange(5_000, 80_000)
    kind = rng.random()
    ping = kind > 0.3
    return {
        "t": t, "src": src, "dst": "192.0.2.1",
        "tp_us": None if kind < 0.05 else rtt + extra + rng.randrange(0, 3000),
        "ping_min_us": rtt if ping else None,
        "ping_avg_us": rtt + 300 if ping else None,
        "ping_max_us": rtt + rng.randrange(0, 2500) if ping else None,
        "ping_var_us2": float(rng.randrange(0, 90_000)) if ping else None,
        "syn_rtt_us": rtt + rng.randrange(0, 1000) if kind < 0.6 else None,
        "fp": None if kind < 0.1 else LINUX,
        "fa": (WIN if mismatch else LINUX) if kind > 0.2 else None,
    }


def _records(n_sources: int, per_source: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(per_source * n_sources):
        s = i % n_sources
        out.append(_record(rng, f"198.51.100.{s + 1}", 1_700_000_000 + i * 1.5,
                           extra=25_000 if s % 4 == 1 else 0, mismatch=s % 7 == 3 and rng.random() < 0.3))
    rng.shuffle(out)  # the report must not depend on the order of the lines
    return out


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analyzer.cli", "report", *args],
                          capture_output=True, text=True, check=False, cwd=ROOT, timeout=120)


def test_verdicts_are_the_rules_own(tmp_path: Path) -> None:
    """Aggregated one record at a time, the verdicts equal judge_all over all of each source's
    records (while no source has more timing samples than the reservoir holds)."""
    lines = _records(12, 40)
    agg = Aggregate()
    read_records(str(_write(tmp_path / "r.jsonl", lines)), agg, Problems())
    got = {v["src"]: v for v in agg.verdicts()}
    want = judge_all([Record.from_json(x) for x in lines], window=2.0**33)
    assert len(got) == len(want) == 12
    assert any(v.relay_confident for v in want) and any(not v.relay for v in want)
    for w in want:
        g = got[w.src]
        for key, value in w.to_dict().items():
            if key == "window_start":  # judge: the window's start (end - window); here first seen
                continue
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-9), (w.src, key)
            else:
                assert g[key] == value, (w.src, key)


def test_reservoir_keeps_counts_exact_and_memory_flat() -> None:
    """Past the caps, counts stay exact, the median is estimated from the sample, and the memory
    the aggregate holds does not grow with the records (20k records vs 5k, 20 sources)."""
    rng = random.Random(3)

    def peak(n: int) -> tuple[int, Aggregate]:
        agg = Aggregate(diffs_cap=64, points_cap=32)
        lines = [_record(rng, f"203.0.113.{i % 20 + 1}", 1_700_000_000 + i, extra=20_000 * (i % 20 == 0))
                 for i in range(n)]
        records = [Record.from_json(x) for x in lines]
        tracemalloc.start()
        try:
            for r in records:
                agg.add(r)
            return tracemalloc.get_traced_memory()[1], agg
        finally:
            tracemalloc.stop()

    small, _ = peak(5_000)
    large, agg = peak(20_000)
    assert large < small + 64 * 1024, (small, large)  # 4x the records, not 4x the memory
    v = {x["src"]: x for x in agg.verdicts()}
    relay, direct = v["203.0.113.1"], v["203.0.113.2"]
    assert relay["n_records"] == 1000 and relay["relay_confident"]
    assert relay["timing_samples"] > 900  # every record with T^p and a reference, not the sample
    assert 20_000 < relay["timing_margin_us"] < 23_500
    assert not direct["cond_timing_strong"]
    assert len(agg.sources["203.0.113.1"].series()) == 32


def test_records_file_makes_a_page(tmp_path: Path) -> None:
    records = _write(tmp_path / "r.jsonl", _records(12, 30))
    out = tmp_path / "report.html"
    proc = _cli(str(records), "-o", str(out), "--darknet", "192.0.2.0/24")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"stepstone-analyzer: wrote {re.escape(str(out))}: 360 records, 12 sources, \d+ flagged, "
        r"in [\d.]+ s", lines[0]), lines
    page = out.read_text()
    # Nothing to fetch when opened (namespace names like xmlns="http://www.w3.org/2000/svg" are not).
    fetch = r"""(href|src)\s*=\s*["']?(https?:|//)|url\(\s*["']?(https?:|//)|@import|<link"""
    assert not re.search(fetch, page)
    assert "<metadata>" not in page
    assert page.count("<svg") >= 3 + 1  # margin, matrix, and a plot per flagged source
    assert "<td>darknet addresses</td><td class=\"n\">256</td>" in page
    assert '<td>answered connection requests</td><td class="n">360</td>' in page
    assert page.count("<tr") - page.count("<tr><td>") >= 12  # a verdict row per source


def test_log_dir_shows_the_logged_verdicts(tmp_path: Path) -> None:
    """From a --log-dir an older analyzer wrote (stepstone.log: one line per handshake, no
    records.log) the page shows what the analyzer decided (its latest line per source), and
    Table 3 counts handshakes.log's answered requests."""
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = []
    for i in range(6):
        rec = _record(random.Random(i), "198.51.100.9", 1_700_000_000 + i)
        verdict = {"relay": i == 5, "cond_os": False, "cond_timing": i == 5, "relay_confident": False,
                   "timing_margin_us": 1234.0 + i, "timing_threshold_us": 5000.0, "timing_samples": i + 1}
        lines.append({"hid": f"1-{i}", **rec, "verdict": verdict, "verdict_at": 1_700_000_010.0 + i})
    # Hostile values in a verdict are not shown as given.
    lines.append({"hid": "2-0", **_record(random.Random(9), "198.51.100.10", 1_700_000_000),
                  "verdict": {"relay": False, "timing_margin_us": "<b>x</b>", "timing_samples": 1e300,
                              "os_pair": ["<script>", 5]}, "verdict_at": 1.0})
    _write(logs / "stepstone.log", lines)
    _write(logs / "handshakes.log", [{"src": "198.51.100.9", "answered": True}] * 6
           + [{"src": "198.51.100.10", "answered": True}, {"src": "198.51.100.11", "answered": False}])
    out = tmp_path / "r.html"
    proc = _cli(str(logs), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    row = re.search(r"<tr class=\"flag\"><td[^>]*>198\.51\.100\.9</td>(.*?)</tr>", page)
    assert row and "relay (paper)" in row.group(1) and ">1.2<" in row.group(1)  # the latest line's
    assert '<td>answered connection requests</td><td class="n">7</td>' in page
    assert '<td>relays in total (paper\'s rule)</td><td class="n">1</td>' in page
    # An analyzer from before sampling measured every handshake and logged each in handshakes.log.
    cells = _row(page, "198.51.100.9")
    assert [cells[_column(page, c)] for c in ("handshakes seen", "answered", "measured", "records")] == [
        "6", "6", "6", "6"]
    assert "Handshakes seen 8, measured 7" in page and "one line per measured handshake" in page
    assert "<b>x</b>" not in page and "<script>" not in page.split("<script>")[0]


def test_bad_lines_are_counted_and_the_page_still_written(tmp_path: Path) -> None:
    good = _records(3, 5)
    bad = ["not json", "[1,2]", json.dumps({"t": 1, "src": "nope", "dst": "192.0.2.1"}), "\xff"] * 7
    records = _write(tmp_path / "r.jsonl", good[:5] + bad + good[5:])
    out = tmp_path / "r.html"
    proc = _cli(str(records), "-o", str(out))
    assert proc.returncode == 2
    err = proc.stderr.splitlines()
    assert sum("r.jsonl: line" in line for line in err) == MAX_REPORTED
    more = f"{len(bad) - MAX_REPORTED} more problems not shown ({len(bad)} in all)"
    assert sum(more in line for line in err) == 1
    assert sum(line.startswith("stepstone-analyzer: wrote ") for line in err) == 1
    page = out.read_text()
    assert f"{len(bad)} input lines were not readable" in page
    assert "15 records from 3 sources" in page


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/x.jsonl"], "no such file or directory"),
    (["{dir}"], "no records.log or stepstone.log in it"),
    (["{dir}/r.jsonl", "--app-allowance", "-3"], "--app-allowance must be within 0..10000 ms"),
    (["{dir}/r.jsonl", "--max-plots", "-1"], "--max-plots must be 0..1000"),
    (["{dir}/r.jsonl", "--darknet", "300.1.1.0/24"], "not an IPv4 or IPv6 network"),
])
def test_bad_usage_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    _write(tmp_path / "r.jsonl", _records(2, 2))
    proc = _cli(*[a.format(dir=tmp_path) for a in args], "-o", str(tmp_path / "out.html"))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.html").exists()


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    records = _write(tmp_path / "r.jsonl", _records(2, 2))
    proc = _cli(str(records), "-o", str(tmp_path / "no" / "such" / "dir" / "r.html"))
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_labels_are_escaped(tmp_path: Path) -> None:
    rng = random.Random(1)
    lines = [{**_record(rng, "198.51.100.1", 1_700_000_000 + i), "fp": "<img src=x onerror=alert(1)>:a:b",
              "fa": LINUX} for i in range(4)]
    out = tmp_path / "r.html"
    make_report(str(_write(tmp_path / "r.jsonl", lines)), out)
    page = out.read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_lab_truth_is_marked(tmp_path: Path) -> None:
    lines = _records(8, 10)
    truth = {src: Truth("forwarding" if i % 4 == 1 else "direct", f"scenario {i}")  # _records delays 1 in 4
             for i, src in enumerate(sorted({x["src"] for x in lines}))}
    truth["198.51.100.200"] = Truth("forwarding", "never seen")
    out = tmp_path / "r.html"
    make_report(str(_write(tmp_path / "r.jsonl", lines)), out, truth=truth, darknet_addresses=65536)
    page = out.read_text()
    assert "Detection against the lab&#x27;s truth" in page or "Detection against the lab's truth" in page
    assert '<td class="tp">TP</td>' in page
    assert "No verdict for 1 lab sources: 198.51.100.200" in page
    assert "TP (" in page  # the rug's lanes name the outcomes


def test_synthetic_bench_file_reads_back(tmp_path: Path) -> None:
    """The bench's generator writes records that read back and give relays and direct sources."""
    path = tmp_path / "s.jsonl"
    report_bench.write_synthetic(path, 2000, 100)
    agg = Aggregate()
    problems = Problems()
    read_records(str(path), agg, problems)
    assert problems.count == 0 and agg.records == 2000 and len(agg.sources) == 100
    flagged = [v for v in agg.verdicts() if v["relay_confident"]]
    assert 2 <= len(flagged) <= 6  # two delayed, one OS mismatch (of 100 sources)


def test_page_without_timing_or_labels(tmp_path: Path) -> None:
    """Passive records only (replay's output: no probe): the plots say why they are empty."""
    lines = [{"t": 1_700_000_000 + i, "src": "198.51.100.1", "dst": "192.0.2.1", "tp_us": 1000,
              "fp": LINUX} for i in range(3)]
    out = tmp_path / "r.html"
    s = make_report(str(_write(tmp_path / "r.jsonl", lines)), out)
    page = out.read_text()
    assert s.flagged == 0 and "no source has a timing margin" in page
    assert "no record has both an F^p and an F^a OS label" in page and "No source was flagged." in page


def test_module_says_why_matplotlib() -> None:
    assert htmlreport.__doc__ and "Why matplotlib" in htmlreport.__doc__


def test_lab_html_to_an_unwritable_place_is_refused_first(tmp_path: Path) -> None:
    """`stepstone-lab demo --html` in a folder that does not exist: one line, exit 2, before any
    namespace is built (the check runs after the root check, so only as root)."""
    if os.geteuid() != 0:
        pytest.skip("stepstone-lab demo checks for root first")
    out = tmp_path / "no" / "r.html"
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--html", str(out)],
                          capture_output=True, text=True, check=False, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"stepstone-lab: --html {out}: cannot write in {out.parent}"


# -- application-layer timing: the page's kinds are judge's -------------------------------------


def _client(rng: random.Random, src: str, n: int, *, leg_ms: float = 0.0, think_ms: float = 0.3,
            nat_ms: float = 0.0, syn_ref: bool = False, answers: float = 1.0,
            t0: float = 1_700_000_000.0) -> list[dict[str, Any]]:
    """A server-first client's records: tapp = RTT + twice a proxy's onward leg + the client's
    think time (+ jitter); a NAT relay's extra leg shows in T^p and T^app both. `answers`: the
    share of banners answered (the rest: tapp_us null); `syn_ref`: ICMP dropped."""
    rtt = rng.randrange(8_000, 60_000)
    out = []
    for i in range(n):
        ping = rtt + rng.randrange(200, 1500)
        tp = rtt + int(2000 * nat_ms) + rng.randrange(0, 600)
        tapp = rtt + int(2000 * (leg_ms + nat_ms) + 1000 * think_ms) + rng.randrange(0, 1500)
        out.append({
            "t": t0 + 7 * i + rng.random(), "src": src, "dst": "192.0.2.9", "tp_us": tp,
            "ping_min_us": None if syn_ref else rtt, "ping_avg_us": None if syn_ref else rtt + 300,
            "ping_max_us": None if syn_ref else ping, "ping_var_us2": None if syn_ref else 4e4,
            "syn_rtt_us": rtt + rng.randrange(0, 800), "fp": LINUX, "fa": LINUX,
            "syn_dist": 3, "fa_dist": 3, "tapp_us": tapp if rng.random() < answers else None,
        })
    return out


def _clients() -> list[dict[str, Any]]:
    rng = random.Random(11)
    sources = [
        ("198.51.100.1", {}),  # a direct client
        ("198.51.100.2", {"leg_ms": 20}),  # a proxy +20 ms: terminating
        ("198.51.100.3", {"leg_ms": 50, "syn_ref": True}),  # a proxy dropping ICMP
        ("198.51.100.4", {"nat_ms": 20}),  # a NAT relay: forwarding wins over the app test
        ("198.51.100.5", {"think_ms": 150}),  # the thinker: terminating too (docs' limit)
        ("198.51.100.6", {"leg_ms": 40, "answers": 0.0}),  # a proxy whose client never answers
        ("198.51.100.8", {"leg_ms": 3}),  # a leg under the floor: not claimed
    ]
    out = [x for src, kw in sources for x in _client(rng, src, 9, **kw)]  # type: ignore[arg-type]
    # One sample short of APP_MIN_SAMPLES, then exactly APP_MIN_SAMPLES, of a +40 ms proxy.
    out += _client(rng, "198.51.100.9", 2, leg_ms=40)
    out += _client(rng, "198.51.100.10", 3, leg_ms=40)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("allowance_ms", [10.0, 0.0, 200.0])
def test_terminating_kinds_are_judges(tmp_path: Path, allowance_ms: float) -> None:
    """With application RTTs (tapp_us) the streaming verdicts are judge_all's, field for field,
    cond_app, app_margin, app_samples and the kind `terminating` included, at judge's default
    allowance and at others."""
    lines = _clients()
    agg = Aggregate(app_allowance_us=allowance_ms * 1000)
    read_records(str(_write(tmp_path / "r.jsonl", lines)), agg, Problems())
    got = {v["src"]: v for v in agg.verdicts()}
    want = judge_all([Record.from_json(x) for x in lines], window=2.0**33,
                     app_allowance_us=allowance_ms * 1000)
    assert len(got) == len(want) == 9
    for w in want:
        g = got[w.src]
        for key, value in w.to_dict().items():
            if key == "window_start":
                continue
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-9), (w.src, key)
            elif key == "evidence":
                assert [e["test"] for e in g[key]] == [e["test"] for e in value], w.src
                for ge, we in zip(g[key], value, strict=True):
                    assert ge == {k: pytest.approx(x, rel=1e-9) if isinstance(x, float) else x
                                  for k, x in we.items()}, w.src
            else:
                assert g[key] == value, (w.src, key)
    kinds = {w.src: w.kind for w in want}
    if allowance_ms == 10.0:
        assert kinds == {"198.51.100.1": "none", "198.51.100.2": "terminating", "198.51.100.3": "terminating",
                         "198.51.100.4": "forwarding", "198.51.100.5": "terminating", "198.51.100.6": "none",
                         "198.51.100.8": "none", "198.51.100.9": "none", "198.51.100.10": "terminating"}
        assert got["198.51.100.9"]["app_samples"] == 2 and not got["198.51.100.9"]["cond_app"]
        assert got["198.51.100.6"]["app_samples"] == 0 and got["198.51.100.6"]["app_margin"] is None
        assert got["198.51.100.4"]["cond_app"]  # it holds, but forwarding evidence wins
    elif allowance_ms == 200.0:
        assert "terminating" not in kinds.values()


def test_the_app_reservoir_follows_judge_past_its_cap() -> None:
    """More application RTTs than the reservoir keeps: the count is exact, the margin an estimate
    close to judge's, and the kind the same."""
    rng = random.Random(4)
    lines = _client(rng, "198.51.100.2", 400, leg_ms=20) + _client(rng, "198.51.100.1", 400)
    agg = Aggregate(diffs_cap=64)
    for x in lines:
        agg.add(Record.from_json(x))
    got = {v["src"]: v for v in agg.verdicts()}
    want = {w.src: w for w in judge_all([Record.from_json(x) for x in lines])}
    for src, w in want.items():
        assert got[src]["kind"] == w.kind and got[src]["app_samples"] == w.app_samples == 400
        assert got[src]["app_margin"] == pytest.approx(w.app_margin, abs=1500)


def test_page_shows_the_application_rtt(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    make_report(str(_write(tmp_path / "r.jsonl", _clients())), out)
    page = out.read_text()
    row = re.search(r"<tr class=\"flag\"><td[^>]*>198\.51\.100\.2</td>(.*?)</tr>", page)
    assert row, "the proxy's row"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert cells[0] == "terminating" and cells[1] == "relay (confident)"
    assert cells[2].startswith("app=+4") and cells[2].endswith("ms/9")  # the evidence, as the logs say it
    assert "application RTT" in cells[3]
    assert float(cells[8]) > 35 and cells[9] == "9"  # the app margin (ms) and its samples
    assert "Application RTT: <i>T</i><sup>app</sup> &minus; <i>T</i><sup>a</sup> per source" in page
    assert "8 sources with application RTTs." in page  # every source but the never-answering one
    app_svg = page.split("per source (terminating proxies)</h2>")[1].split("<h2>")[0]
    assert app_svg.count("<svg") == 1
    assert "198.51.100.2 terminating (9)" in app_svg and "198.51.100.6" not in app_svg
    # The proxy's own plot draws its T^app and says the app margin.
    assert "app margin 4" in page and "9 app samples" in page
    assert "<td>&nbsp;&nbsp;kind terminating</td><td class=\"n\">4</td>" in page


def test_page_without_application_rtts_says_why(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    make_report(str(_write(tmp_path / "r.jsonl", _records(4, 5))), out)
    assert "no record has an application RTT (tapp_us)" in out.read_text()


# -- the lab's truth -------------------------------------------------------------------------------


def test_truth_from_lab_keeps_each_class() -> None:
    """Every class of the lab's truth is kept (not folded into "relay"); a lab result from before
    the classes maps each host's truth word."""
    hosts = [("198.18.0.1", "relay", "forwarding"), ("198.18.0.2", "terminating", "terminating"),
             ("198.18.0.3", "proxy", "terminating"), ("198.18.0.4", "shared", "shared"),
             ("198.18.0.5", "direct", "scanner"), ("198.18.0.6", "direct", "route change"),
             ("198.18.0.7", "direct", "direct")]
    result = {"hosts": [{"src": src, "truth": t, "class": c, "scenario": f"s{i}"}
                        for i, (src, t, c) in enumerate(hosts)]}
    truth = htmlreport.truth_from_lab(result)
    assert {src: t.truth for src, t in truth.items()} == {src: c for src, _, c in hosts}
    assert [truth[src].relay for src, _, _ in hosts] == [True, True, True, False, False, False, False]
    assert [truth[src].expected for src, _, _ in hosts] == [
        "forwarding", "terminating", "terminating", "shared", "none", "none", "none"]
    older = {"hosts": [{"src": src, "truth": t, "scenario": "x"} for src, t, _ in hosts]}
    assert [t.truth for t in htmlreport.truth_from_lab(older).values()] == [
        "forwarding", "terminating", "terminating", "shared", "direct", "direct", "direct"]


def _v(kind: str, *, relay: bool = False) -> dict[str, Any]:
    return {"kind": kind, "relay_confident": kind in ("forwarding", "terminating"), "relay": relay}


@pytest.mark.parametrize("truth, verdict, want", [
    ("shared", _v("shared", relay=True), ("fp", "tn", True)),  # the paper calls a home NAT a relay
    ("shared", _v("forwarding", relay=True), ("fp", "fp", False)),
    ("shared", {**_v("shared"), "relay_confident": True}, ("tn", "fp", False)),  # shared, yet confident
    ("shared", _v("none"), ("tn", "tn", False)),  # not a relay, but not seen as shared either
    ("terminating", _v("terminating"), ("fn", "tp", True)),
    ("terminating", _v("forwarding", relay=True), ("tp", "tp", False)),  # a relay, of the other kind
    ("forwarding", _v("none"), ("fn", "fn", False)),
    ("forwarding", _v("forwarding", relay=True), ("tp", "tp", True)),
    ("direct", _v("terminating"), ("tn", "fp", False)),
    ("scanner", _v("none"), ("tn", "tn", True)),
    ("route change", _v("forwarding"), ("tn", "fp", False)),
    ("forwarding", None, ("fn", "fn", False)),  # no verdict at all
])
def test_score(truth: str, verdict: dict[str, Any] | None, want: tuple[str, str, bool]) -> None:
    s = htmlreport.score(Truth(truth), verdict)
    assert (s.outcome, s.outcome_strong, s.kind_right) == want


def test_lab_page_scores_each_class(tmp_path: Path) -> None:
    """A proxy called terminating, a home NAT called shared and a thinker called terminating: the
    page's tables count them as the lab does."""
    rng = random.Random(2)
    lines = (_client(rng, "198.18.0.2", 6, leg_ms=20) + _client(rng, "198.18.0.3", 6)
             + _client(rng, "198.18.0.5", 6, think_ms=150))
    home = _client(rng, "198.18.0.4", 6)
    for i, x in enumerate(home):  # two OSes behind one router, a hop further than the router
        x.update(fp=WIN if i % 2 else LINUX, fa=LINUX, syn_dist=4, fa_dist=3)
    lines += home
    verdicts = {w.src: w for w in judge_all([Record.from_json(x) for x in lines])}
    assert [verdicts[s].kind for s in ("198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5")] == [
        "terminating", "none", "shared", "terminating"]
    result = {"hosts": [
        {"src": "198.18.0.2", "truth": "terminating", "class": "terminating", "scenario": "socat +20"},
        {"src": "198.18.0.3", "truth": "direct", "class": "direct", "scenario": "ssh client"},
        {"src": "198.18.0.4", "truth": "shared", "class": "shared", "scenario": "home NAT"},
        {"src": "198.18.0.5", "truth": "direct", "class": "direct", "scenario": "thinker 150 ms"},
    ]}
    out = tmp_path / "r.html"
    make_report(str(_write(tmp_path / "r.jsonl", lines)), out, truth=htmlreport.truth_from_lab(result))
    page = out.read_text()
    confident = re.search(r"<tr><td>confident rule[^<]*</td>(.*?)</tr>", page)
    assert confident and re.findall(r">([\d.]+)</td>", confident.group(1)) == [
        "1", "1", "2", "0", "0.50", "1.00"]  # TP, FP (the thinker), TN, FN, precision, recall
    for klass, expected, right in (("terminating", "terminating", "1/1"), ("direct", "none", "1/2"),
                                   ("shared", "shared", "1/1")):
        assert re.search(rf"<tr><td>{klass}</td><td class=\"n\">\d</td><td>{expected}</td>"
                         rf"<td class=\"n (tp|fp)\">{right}</td>", page), klass
    home_row = re.search(r"<td[^>]*>198\.18\.0\.4</td>(.*?)</tr>", page)
    assert home_row and "<td>shared</td><td class=\"tp\">yes (shared)</td>" in home_row.group(1)


# -- the analyzer's log dir, as each version writes it ---------------------------------------------


def _row(page: str, src: str) -> list[str]:
    row = re.search(rf"<tr[^>]*><td[^>]*>{re.escape(src)}</td>(.*?)</tr>", page)
    assert row, src
    return re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))


def _column(page: str, name: str) -> int:
    """A verdict table column's index among the cells after the source's."""
    head = re.search(r'<table class="sortable" id="verdicts"><thead><tr>(.*?)</tr>', page)
    assert head
    return re.findall(r"<th>(.*?)</th>", head.group(1)).index(name) - 1


async def test_log_dir_of_a_sampling_analyzer(redis_server: Any, tmp_path: Path) -> None:
    """A real analyzer measuring 2 handshakes per source per probe period: of a source's 5
    answered handshakes, records.log has 2 and handshakes.log 2, stepstone.log one verdict line
    with the totals. Table 3 counts all 5, and the page shows 5 seen, 2 measured."""
    import asyncio
    import time

    from service_harness import handshake, open_harness, result, until

    from analyzer.service import Config, serve

    logs = tmp_path / "logs"
    async with open_harness(redis_server, logs) as h:
        config = Config(redis_url=h.url, handshakes=True, zeek_url=None, log_dir=logs, consumer="r1",
                        sample_per_source=2)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop=stop))
        try:
            t = time.time()
            src, other = "198.18.7.1", "198.18.7.2"
            for i in range(5):
                await h.send(handshake(src, "198.19.0.10", t=t + i / 100, tp_us=80_000, sport=40000 + i))
            await h.send(handshake(other, "198.19.0.11", t=t, answered=False))

            async def counted() -> bool:
                return await h.r.hget(f"stepstone:cnt:{src}", "seen") == "5"

            await until(counted, what="the 5 handshakes counted")
            ((job, _),) = await h.jobs(1)
            await h.answer(result(job, src, t, ping_max=10_000, fa="win:Windows:7 or 8"))
            await h.verdicts(2)

            async def verdict_line() -> bool:
                return (logs / "stepstone.log").is_file() and bool((logs / "stepstone.log").read_text())

            await until(verdict_line, what="the verdict line")
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 20) == 0
    change = [json.loads(x) for x in (logs / "stepstone.log").read_text().splitlines()]
    assert [(c["change"], c["handshakes_seen"], c["handshakes_sampled"]) for c in change] == [("first", 5, 2)]
    assert len((logs / "handshakes.log").read_text().splitlines()) == 3  # 2 sampled of src, 1 of other

    out = tmp_path / "r.html"
    proc = _cli(str(logs), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r": 2 records, 1 sources, 1 flagged", proc.stderr)
    page = out.read_text()
    assert '<td>answered connection requests</td><td class="n">5</td>' in page
    assert '<td>unique sources</td><td class="n">1</td>' in page
    row = _row(page, src)
    assert [row[_column(page, c)] for c in ("handshakes seen", "answered", "measured", "records")] == [
        "5", "5", "2", "2"]
    assert row[_column(page, "kind")] == "forwarding"
    assert "Handshakes seen 6, measured 2" in page  # the unanswered one was seen too
    assert "1 verdict lines (1 first, 0 changed, 0 refresh)" in page


def _line(src: str, t: float, at: float, verdict: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rec = {"t": t, "src": src, "dst": "192.0.2.1", "tp_us": 30_000, "ping_min_us": 9000, "ping_avg_us": 9500,
           "ping_max_us": 10_000, "ping_var_us2": 1e4, "syn_rtt_us": None, "fp": LINUX, "fa": LINUX}
    return {"hid": f"{int(t)}-0", **rec, "verdict": verdict, "verdict_at": at, **extra}


_FWD = {"relay": True, "cond_timing": True, "relay_confident": True, "kind": "forwarding",
        "timing_margin_us": 20_000.0, "evidence": [{"test": "timing", "margin": 20_000.0, "threshold": 5000.0,
                                                    "samples": 1, "unit": "us"}]}


def _totals(seen: int, answered: int, sampled: int, change: str = "refresh") -> dict[str, Any]:
    return {"change": change, "verdict_entry": "1-0", "handshakes_seen": seen,
            "handshakes_answered": answered, "handshakes_sampled": sampled}


def test_log_dir_totals_survive_a_reset_and_disorder(tmp_path: Path) -> None:
    """stepstone.log's totals restart when the source's cnt:<src> key expired (an hour or more of
    silence): the totals before are kept. A smaller total within the hour is another analyzer's
    line written late: the larger stands. A bad verdict line is reported, the rest read."""
    logs = tmp_path / "logs"
    logs.mkdir()
    a, b = "198.51.100.7", "198.51.100.8"
    t = 1_700_000_000.0
    _write(logs / "records.log", [_line(a, t, t + 1, _FWD), _line(b, t, t + 1, _FWD)])
    _write(logs / "stepstone.log", [
        _line(a, t, t + 1, _FWD, **_totals(30, 25, 4, "first")),
        _line(a, t, t + 900, _FWD, **_totals(50, 40, 6)),
        _line(a, t, t + 1000, _FWD, **_totals(45, 38, 6)),  # out of order: 50 stands
        _line(a, t, t + 9000, _FWD, **_totals(3, 3, 1)),  # the key expired: 50 + 3
        _line(b, t, t + 1, _FWD, **_totals(7, 7, 2, "first")),
        _line(b, t, t + 2, _FWD, **_totals(9, 9, 2, "changed")),
        _line(b, t, t + 3, _FWD, change="sometimes", handshakes_seen=1, handshakes_answered=1,
              handshakes_sampled=1),
        _line(b, t, t + 4, _FWD, **_totals(-1, 9, 2)),
    ])
    agg = Aggregate()
    problems = Problems(stream=io.StringIO())
    htmlreport.read_log_dir(logs, agg, problems)
    assert problems.count == 2
    assert agg.handshake_counts(a) == (53, 43, 7) and agg.handshake_counts(b) == (9, 9, 2)
    assert agg.table3_counts() == (52, 2)
    assert agg.changes == {"first": 2, "refresh": 3, "changed": 1}


def test_log_dir_of_an_upgraded_and_a_sharded_analyzer(tmp_path: Path) -> None:
    """An upgrade in place leaves an older analyzer's per-handshake lines in stepstone.log before
    the change lines (and records.log after); a sharded analyzer writes shard-<i>/. Both read."""
    logs = tmp_path / "logs"
    (logs / "shard-0").mkdir(parents=True)
    (logs / "shard-1").mkdir()
    a, b = "198.51.100.7", "198.51.100.8"
    t = 1_700_000_000.0
    none = {"relay": False}  # an older analyzer's verdict: no kind, no evidence
    _write(logs / "shard-0" / "stepstone.log", [
        _line(a, t, t + 1, none), _line(a, t + 1, t + 2, none),  # before the upgrade
        _line(a, t + 5, t + 6, _FWD, **_totals(1, 1, 1, "first")),
    ])
    _write(logs / "shard-0" / "records.log", [_line(a, t + 5, t + 6, _FWD)])
    _write(logs / "shard-0" / "handshakes.log", [{"src": a, "answered": True}] * 3)
    _write(logs / "shard-1" / "records.log", [_line(b, t, t + 1, none)])
    _write(logs / "shard-1" / "stepstone.log", [_line(b, t, t + 1, none, **_totals(4, 2, 1, "first"))])
    _write(logs / "shard-1" / "handshakes.log", [{"src": b, "answered": True},
                                                 {"src": "nope", "answered": True},
                                                 {"src": "198.51.100.9", "answered": False}])
    (logs / "shard-x").mkdir()  # not a shard's
    out = tmp_path / "r.html"
    proc = _cli(str(logs), "-o", str(out))
    assert proc.returncode == 2 and "src is not an IP address" in proc.stderr  # one bad line, reported
    page = out.read_text()
    assert "4 records from 2 sources" in page
    row = _row(page, a)
    assert row[_column(page, "kind")] == "forwarding"  # the newest verdict, after the upgrade
    assert [row[_column(page, c)] for c in ("handshakes seen", "answered", "measured", "records")] == [
        "3", "3", "3", "3"]
    row = _row(page, b)
    assert row[_column(page, "kind")] == "\u2013"  # an older verdict has no kind
    assert [row[_column(page, c)] for c in ("handshakes seen", "answered", "measured")] == ["4", "2", "1"]
    assert '<td>answered connection requests</td><td class="n">5</td>' in page
    assert "Handshakes seen 8, measured 4" in page
