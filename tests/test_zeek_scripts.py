"""Static checks of the Zeek package: every .zeek file parses (zeekscript) and is zeek-format clean;
configure-site (zkg's build step) writes parseable redefs and refuses bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import zeekscript

ROOT = Path(__file__).resolve().parents[1]
ZEEK_FILES = sorted((ROOT / "zeek-scripts").glob("*.zeek")) + sorted(
    (ROOT / "tests/btest/tests").glob("*.zeek")
)


def test_the_package_has_its_scripts() -> None:
    names = {p.name for p in ZEEK_FILES}
    assert {
        "__load__.zeek",
        "main.zeek",
        "handshake.zeek",
        "verdict.zeek",
        "transport.zeek",
        "site.zeek",
    } <= names


def _parse(path: Path) -> zeekscript.Script:
    script = zeekscript.Script(path)
    assert script.parse(), f"{path}: zeekscript could not parse it"
    assert not script.has_error(), f"{path}: {script.get_error()}"
    return script


@pytest.mark.parametrize("path", ZEEK_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_and_is_zeek_format_clean(path: Path) -> None:
    _parse(path)
    formatted = subprocess.run(["zeek-format", str(path)], capture_output=True, check=True).stdout
    assert formatted.decode() == path.read_text(), f"zeek-format would change {path}"


def test_a_parse_error_is_detected(tmp_path: Path) -> None:
    # The check above means something only if zeekscript reports errors at all.
    bad = tmp_path / "bad.zeek"
    bad.write_text("event zeek_init() { local x = ; }\n")
    script = zeekscript.Script(bad)
    script.parse()
    assert script.has_error()


def test_configure_site_writes_redefs_zeek_can_parse(tmp_path: Path) -> None:
    out = tmp_path / "site.zeek"
    subprocess.run(
        [
            "sh",
            str(ROOT / "zeek-scripts/configure-site"),
            "198.18.0.0/15, 2001:db8::/32",
            "::1",
            "27759",
            str(out),
        ],
        check=True,
    )
    text = out.read_text()
    assert "redef StepStone::darknet_subnets += { 198.18.0.0/15, [2001:db8::]/32 };" in text
    assert "redef StepStone::websocket_addr = [::1];" in text
    assert "redef StepStone::websocket_port = 27759/tcp;" in text
    _parse(out)


def test_configure_site_defaults_write_nothing_to_redef(tmp_path: Path) -> None:
    out = tmp_path / "site.zeek"
    subprocess.run(["sh", str(ROOT / "zeek-scripts/configure-site"), "", "", "0", str(out)], check=True)
    assert "redef" not in out.read_text()
    _parse(out)


@pytest.mark.parametrize(
    "args",
    [
        ("198.18.0.0", "", ""),
        ("198.18.0.0/15; rm -rf /", "", ""),
        ("", "localhost", ""),
        ("", "", "70000"),
        ("", "", "27759/tcp"),
    ],
)
def test_configure_site_refuses_bad_values(tmp_path: Path, args: tuple[str, str, str]) -> None:
    out = tmp_path / "site.zeek"
    result = subprocess.run(
        ["sh", str(ROOT / "zeek-scripts/configure-site"), *args, str(out)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "configure-site:" in result.stderr
    assert not out.exists()
