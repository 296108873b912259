"""`zkg install` of the package from a git clone, into a scratch zkg state. With a real zeek (and its
zeek-config) on PATH, zkg runs the package's btests before installing, as an operator's `zkg install`
does: those tests must run and pass, and a failing one must stop the install. The other tests skip
zkg's test step; without `zeek-config` on PATH zkg warns and leaves the `depends = zeek >=6.0.0`
constraint unchecked (zeekpkg/manager.py adds the `zeek` node only when it finds a version), so
neither --nodeps nor a fake zeek is needed; where zeek is installed, zkg checks the constraint."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the btests read of the repository (zkg clones all of it): the flood-bounded btest writes its
# trace with bench/zeek_overhead.py (standard library only).
PACKAGE_FILES = ("zkg.meta", "zeek-scripts", "tests/btest", "bench/zeek_overhead.py")


def _zkg() -> str:
    exe = shutil.which("zkg") or str(Path(sys.executable).with_name("zkg"))
    if not Path(exe).exists():
        pytest.skip("zkg is not installed")
    return exe


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=stepstone", "-c", "user.email=stepstone@localhost", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A git repository holding the package files of this working tree (committed or not), named
    `stepstone` like the real repository, so that zkg calls the package `stepstone`."""
    repo = tmp_path / "src" / "stepstone"
    repo.mkdir(parents=True)
    for name in PACKAGE_FILES:
        source, target = ROOT / name, repo / name
        if source.is_dir():
            # Traces/ comes too: the btests read their captures from there.
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(".tmp", ".btest.failed.dat"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "package")
    return repo


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = configparser.ConfigParser()
    cfg["sources"] = {}  # no package source: nothing is fetched from the network
    cfg["paths"] = {
        name: str(tmp_path / "zkg" / name) for name in ("state_dir", "script_dir", "plugin_dir", "bin_dir")
    }
    path = tmp_path / "zkg.cfg"
    with path.open("w") as f:
        cfg.write(f)
    return path


def _install(
    config: Path, clone: Path, *user_vars: str, tests: bool = False
) -> subprocess.CompletedProcess[str]:
    args = [_zkg(), "--configfile", str(config), "install", "--force", str(clone)]
    if not tests:
        args.insert(-1, "--skiptests")
    for var in user_vars:
        args += ["--user-var", var]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSTONE_")}
    # zkg runs the package's test_command (btest) with this PATH, whether or not the venv is active.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=600)


def test_metadata_is_what_zkg_needs() -> None:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(ROOT / "zkg.meta")
    package = meta["package"]
    assert package["script_dir"] == "zeek-scripts"
    assert "zeek >=6.0.0" in package["depends"]
    assert "btest" in package["test_command"] and "tests/btest" in package["test_command"]
    assert {"darknet", "stepping stone"} <= {t.strip() for t in package["tags"].split(",")}
    assert package["summary"] and package["description"]
    for var in ("STEPSTONE_DARKNET", "STEPSTONE_WS_ADDR", "STEPSTONE_WS_PORT"):
        assert var in package["user_vars"]
        assert f"%({var})s" in package["build_command"]


def test_zkg_installs_the_package_with_the_operators_settings(
    config: Path, clone: Path, tmp_path: Path
) -> None:
    result = _install(
        config, clone, "STEPSTONE_DARKNET=198.18.0.0/15 2001:db8:ffff::/48", "STEPSTONE_WS_PORT=27759"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = tmp_path / "zkg" / "script_dir"
    installed = scripts / "packages" / "stepstone"
    for name in ("__load__.zeek", "main.zeek", "handshake.zeek", "verdict.zeek", "transport.zeek"):
        assert (installed / name).read_text() == (ROOT / "zeek-scripts" / name).read_text()
    site = (installed / "site.zeek").read_text()
    assert "redef StepStone::darknet_subnets += { 198.18.0.0/15, [2001:db8:ffff::]/48 };" in site
    assert "redef StepStone::websocket_port = 27759/tcp;" in site
    assert "redef StepStone::websocket_addr = 127.0.0.1;" in site  # the user variable's default
    # Loaded: zkg's packages.zeek loads it, so `@load packages` in local.zeek picks it up.
    assert "@load ./stepstone" in (scripts / "packages" / "packages.zeek").read_text()
    listed = subprocess.run(
        [_zkg(), "--configfile", str(config), "list", "installed"], capture_output=True, text=True, check=True
    )
    assert "stepstone" in listed.stdout


def test_zkg_install_fails_on_a_bad_darknet_value(config: Path, clone: Path, tmp_path: Path) -> None:
    result = _install(config, clone, "STEPSTONE_DARKNET=every dark address")
    assert result.returncode != 0
    assert not (tmp_path / "zkg" / "script_dir" / "packages" / "stepstone").exists()


def _real_zeek() -> None:
    if shutil.which("zeek") is None or shutil.which("zeek-config") is None:
        pytest.skip("no zeek (with zeek-config) on PATH")


BTESTS = sorted(p.stem for p in (ROOT / "tests" / "btest" / "tests").glob("*.zeek"))


@pytest.mark.zeek
def test_zkg_install_runs_the_btests_on_the_real_zeek(config: Path, clone: Path, tmp_path: Path) -> None:
    _real_zeek()
    # An operator's settings, which the btests must not depend on.
    result = _install(config, clone, "STEPSTONE_DARKNET=192.0.2.0/24", "STEPSTONE_WS_PORT=27759", tests=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Running unit tests for "' in result.stdout
    ran = tmp_path / "zkg" / "state_dir" / "testing" / "stepstone" / "clones" / "stepstone"
    # btest's report goes to either stream, depending on its version and terminal.
    summary = "".join((ran / f"zkg.test_command.{name}").read_text() for name in ("stdout", "stderr"))
    for name in BTESTS:
        assert re.search(rf"^tests\.{re.escape(name)} \.\.\. ok$", summary, re.M), summary
    assert f"all {len(BTESTS)} tests successful" in summary, summary
    assert "skipped" not in summary
    installed = tmp_path / "zkg" / "script_dir" / "packages" / "stepstone"
    assert "192.0.2.0/24" in (installed / "site.zeek").read_text()


@pytest.mark.zeek
def test_a_failing_btest_stops_zkg_install(config: Path, clone: Path, tmp_path: Path) -> None:
    _real_zeek()
    # The baseline claims a T^p the recording does not have: the suite must fail, so the install.
    baseline = clone / "tests" / "btest" / "Baseline" / "tests.handshakes-recorded" / "output"
    baseline.write_text(baseline.read_text().replace("tp=0.020000", "tp=0.021000", 1))
    _git(clone, "commit", "-q", "-a", "-m", "wrong baseline")
    result = _install(config, clone, tests=True)
    assert result.returncode != 0
    assert "test_command failed" in result.stderr
    assert not (tmp_path / "zkg" / "script_dir" / "packages" / "stepstone").exists()
