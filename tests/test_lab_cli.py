"""`stepstone-lab` as a user runs it: Ctrl-C in the middle tears everything down, a non-root user
is refused with one clear line, and `clean` removes what a killed run left."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab.netns import Network
from lab.process import wait_for


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


SMALL = """
[lab]
connections = 4
traffic_s = 30
[[host]]
name = "nat"
kind = "nat"
rtt_ms = 10
extra_delay_ms = 20
"""


@pytest.mark.netns
def test_ctrl_c_mid_run_tears_everything_down(net: Network, tmp_path: Path) -> None:
    del net  # only for the root / namespace skip
    scenarios = tmp_path / "s.toml"
    scenarios.write_text(SMALL)
    err = tmp_path / "err"
    keep = tmp_path / "run"
    with err.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "demo", "--scenarios", str(scenarios),
                                 "--keep", str(keep)], stderr=sink, stdout=subprocess.PIPE)
    try:
        wait_for(lambda: "connections 1/" in err.read_text(), 60, "the traffic to start",
                 alive=lambda: None if proc.poll() is None else f"exited: {err.read_text()}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert "interrupted; the lab was torn down" in text
    tag = re.search(r"namespaces (sst\w+)\*", text).group(1)  # type: ignore[union-attr]
    assert tag not in _netns()
    leftover = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(keep).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                leftover.append(pid)
        except OSError:
            pass
    assert leftover == []


DROP = """
import os, sys
import lab.cli, lab.demo, lab.report  # imported while root can still read the interpreter's files
os.setgid(65534)
os.setuid(65534)
sys.exit(lab.cli.main(["demo"]))
"""


def test_non_root_is_refused_clearly() -> None:
    if os.geteuid() != 0:
        proc = subprocess.run([sys.executable, "-m", "lab.cli", "demo"], capture_output=True, text=True,
                              check=False)
    else:
        proc = subprocess.run([sys.executable, "-c", DROP], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("stepstone-lab: needs root"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_scenario_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[host]]\nkind = 'vpn'\n")
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--scenarios", str(bad)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "kind must be one of direct, nat, proxy, scanner, homenat" in proc.stderr


def test_an_unusable_keep_dir_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--keep", str(not_a_dir / "run")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("stepstone-lab: --keep") and proc.stderr.count("\n") == 1, proc.stderr


def test_a_keep_dir_too_long_for_the_redis_socket_is_one_line(tmp_path: Path) -> None:
    keep = tmp_path / ("x" * 100)
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--keep", str(keep)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("stepstone-lab: --keep") and proc.stderr.count("\n") == 1, proc.stderr
    assert "108" in proc.stderr and not keep.exists()


@pytest.mark.netns
def test_clean_removes_stray_namespaces(net: Network) -> None:
    del net
    # A namespace as a run killed with -9 leaves it: our prefix, a process still inside.
    stray = Network()
    ns = stray.add("zz")
    sleeper = ns.popen("sleep", "300")
    try:
        # Only this stray's prefix: other test runs on this machine keep their namespaces.
        out = subprocess.run([sys.executable, "-m", "lab.cli", "clean", "--prefix", f"sst{stray.tag}"],
                             capture_output=True, text=True, check=True).stdout
        assert f"removed namespace {ns.name}" in out
        assert ns.name not in _netns()
        assert sleeper.wait(10) == -9
    finally:
        stray.close()


def test_zeek_sensor_without_zeek_is_refused() -> None:
    if shutil.which("zeek"):
        pytest.skip("zeek is installed here")
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--sensor", "zeek"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2
    assert "missing programs: zeek" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.netns
def test_clean_after_kill_9_of_the_lab(net: Network, tmp_path: Path) -> None:
    """The lab itself killed with -9 (no finally runs): `clean` removes every trace of that run."""
    del net
    scenarios = tmp_path / "s.toml"
    scenarios.write_text(SMALL)
    err = tmp_path / "err"
    with err.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "demo", "--scenarios", str(scenarios)],
                                stderr=sink, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: "connections 1/" in err.read_text(), 60, "the traffic to start",
                 alive=lambda: None if proc.poll() is None else f"exited: {err.read_text()}")
    finally:
        proc.kill()
        proc.wait()
    tag = re.search(r"namespaces (sst\w+)\*", err.read_text()).group(1)  # type: ignore[union-attr]
    assert tag in _netns()  # left behind, as expected after -9
    out = subprocess.run([sys.executable, "-m", "lab.cli", "clean", "--prefix", tag], capture_output=True,
                         text=True, check=True).stdout
    assert "removed namespace" in out and "killed" in out and "-lab-" in out
    assert tag not in _netns()
    wait_for(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and _mentions(p, tag)], 10,
             "the run's processes to be gone")
    assert not list(Path(tempfile.gettempdir()).glob(f"{tag}-lab-*"))


def _mentions(pid: str, tag: str) -> bool:
    try:
        return tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
