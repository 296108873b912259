"""`stepstone-analyzer report`: the verdicts it shows are the rules' own, the logged verdicts are
shown as logged, bad lines are counted, hostile text is escaped, and memory stays flat as records
grow."""

from __future__ import annotations

import importlib.util
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
    """From a --log-dir the page shows what the analyzer decided (its latest line per source),
    and Table 3 counts handshakes.log's answered requests."""
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
    (["{dir}"], "no stepstone.log in it"),
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
    verdicts = {v.src: v for v in judge_all([Record.from_json(x) for x in lines])}
    truth = {}
    for i, src in enumerate(sorted(verdicts)):
        relay = i % 4 == 1  # the sources _records delays
        flagged = verdicts[src].relay_confident
        outcome = ("tp" if flagged else "fn") if relay else ("fp" if flagged else "tn")
        truth[src] = Truth("relay" if relay else "direct", outcome, outcome, f"scenario {i}")
    truth["198.51.100.200"] = Truth("relay", "fn", "fn", "never seen")
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
