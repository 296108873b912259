"""The report as a person sees it: rendered by headless Chromium (Debian's `chromium`), the page
loads without a JavaScript error, the plots are in its DOM, a click on a column header sorts the
verdicts, and the screenshot is not blank."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analyzer.htmlreport import Truth, make_report
from analyzer.record import Record
from analyzer.rules import judge_all

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    # --no-sandbox: tests run as root; own profile dir: no clash with another run.
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _console_errors(stderr: str) -> list[str]:
    """Console messages Chromium logs for the page (uncaught exceptions, console.error)."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab-like report: three relays delayed 20-40 ms, a terminating proxy (its clients' answers
    to the banner 50 ms late), direct sources, one OS mismatch, one direct source the paper's rule
    flags (its max ping RTT barely above its RTT), the truth."""
    folder = tmp_path_factory.mktemp("report")
    rng = random.Random(5)
    lines = []
    relays = {"198.18.1.12", "198.18.1.15", "198.18.1.17"}
    proxy = "198.18.1.16"
    for s in range(10):
        src = f"198.18.1.{s + 10}"
        for i in range(8):
            rtt = 10_000 + 4_000 * s
            ping_max = rtt + (rng.randrange(0, 300) if s == 3 else rng.randrange(1000, 1900))
            lines.append({"t": 1_700_000_000 + 4 * i + s / 10, "src": src, "dst": "198.18.0.5",
                          "tp_us": rtt + (2 * (10_000 + 5_000 * s) if src in relays else 0)
                          + rng.randrange(0, 800),
                          "ping_min_us": rtt, "ping_avg_us": rtt + 200, "ping_max_us": ping_max,
                          "ping_var_us2": 9e4, "syn_rtt_us": None, "fp": "unix:Linux:3.11 and newer",
                          "fa": "win:Windows:7 or 8" if s == 8 else "unix:Linux:3.11 and newer",
                          "syn_dist": None, "fa_dist": None,
                          "tapp_us": rtt + (50_000 if src == proxy else 0) + rng.randrange(200, 1500)})
    truth = {}
    for v in judge_all([Record.from_json(x) for x in lines]):
        klass = "forwarding" if v.src in relays else "terminating" if v.src == proxy else "direct"
        truth[v.src] = Truth(klass, f"host {v.src[-2:]}")
        assert v.kind == {"forwarding": "forwarding", "terminating": "terminating"}.get(
            klass, "shared" if v.src == "198.18.1.18" else "none"), v
    records = folder / "records.jsonl"
    records.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = folder / "report.html"
    summary = make_report(str(records), out, truth=truth, darknet_addresses=256)
    assert summary.flagged == 6
    return out


def test_loads_without_errors_and_the_plots_are_there(page: Path, tmp_path: Path) -> None:
    proc = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _console_errors(proc.stderr) == []
    dom = proc.stdout
    # Margin distribution, application RTTs, OS matrix, and one plot per flagged source, each an
    # inline <svg> with drawn paths (not an empty canvas).
    svgs = re.findall(r"<svg\b.*?</svg>", dom, flags=re.DOTALL)
    assert len(svgs) == 3 + 6, len(svgs)
    assert all(svg.count("<path") >= 5 for svg in svgs)
    assert "198.18.1.12: forwarding, relay (confident)" in dom  # a per-source plot's title, as text
    assert "198.18.1.16: terminating, relay (confident), by application RTT" in dom
    # Both rules find the three relays; only the confident one (its application RTT) the proxy.
    assert dom.count('<td class="tp">TP</td>') == 2 * 3 + 1
    assert dom.count('<td class="fn">FN</td>') == 1
    # The paper's rule on the OS mismatch and on .13; the confident rule calls the mismatch alone
    # `shared` (likely a home NAT), not a relay.
    assert dom.count('<td class="fp">FP</td>') == 2


def test_a_header_click_sorts_the_verdicts(page: Path, tmp_path: Path) -> None:
    """The sorting script runs: click "margin ms" (descending after two clicks) in a copy of the
    page whose extra script records the order."""
    probe = tmp_path / "sorted.html"
    script = ("<script>const ths = [...document.querySelectorAll('#verdicts th')];"
              "const i = ths.findIndex(h => h.textContent.startsWith('timing margin'));"
              "ths[i].click(); ths[i].click();"
              "document.body.dataset.order = [...document.querySelectorAll('#verdicts tbody tr')]"
              ".map(r => r.cells[i].dataset.v).join(',');</script></body>")
    probe.write_text(page.read_text().replace("</body>", script))
    proc = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert _console_errors(proc.stderr) == []
    order = re.search(r'data-order="([^"]*)"', proc.stdout)
    assert order, "the probe script did not run"
    values = [float(x) for x in order.group(1).split(",")]
    assert len(values) == 10 and values == sorted(values, reverse=True)


def test_a_script_error_would_be_seen(page: Path, tmp_path: Path) -> None:
    """The check above can fail: a page with a broken script shows up in the console log."""
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>undefinedThing.call();</script></body>"))
    proc = _chromium(tmp_path, "--dump-dom", broken.as_uri())
    assert any("undefinedThing" in line for line in _console_errors(proc.stderr)), proc.stderr[-2000:]


def test_screenshot_is_not_blank(page: Path, tmp_path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        grey = im.convert("L").resize((128, 200))
        dark = sum(grey.histogram()[:200])  # pixels darker than near-white
    assert dark > 0.01 * 128 * 200  # text, bars and points drawn, not an empty white page (~0)
