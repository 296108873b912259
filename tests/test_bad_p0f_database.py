"""A broken p0f database is one line naming the file and the line, and exit 2, wherever it is loaded:
`fingerprint`, `replay`, `stepstone-analyzer run`, `stepstone-prober probe` and `run` (issue 9).

pyp0f itself raises TypeError on a section header without a direction (`[tcp]`) and IndexError on
a line of blanks; the loader (osfp/database.py) turns every fault into DatabaseLoadError.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from capfiles import Conn, ethernet, pcap_bytes

from lab.redis import RedisServer
from osfp import DatabaseLoadError, Fingerprinter, default_database_path
from osfp.database import load

SECTION_LINE = default_database_path().read_text().splitlines().index("[tcp:request]") + 1

# Each: how to break the project's own database, and the line the message must name.
BREAKAGES = {
    "no direction": (lambda t: t.replace("[tcp:request]\n", "[tcp]\n", 1), SECTION_LINE),
    "empty direction": (lambda t: t.replace("[tcp:request]\n", "[tcp:]\n", 1), SECTION_LINE),
    "double colon": (lambda t: t.replace("[tcp:request]\n", "[tcp::request]\n", 1), SECTION_LINE),
    "mtu with direction": (lambda t: t.replace("[tcp:request]\n", "[mtu:request]\n", 1), SECTION_LINE),
    "unclosed": (lambda t: t.replace("[tcp:request]\n", "[tcp:request\n", 1), SECTION_LINE),
    "blank line of spaces": (lambda t: t.replace("[tcp:request]\n", "[tcp:request]\n   \nsig = x\n", 1),
                             SECTION_LINE + 2),
    "not utf-8": (lambda t: t.replace("[tcp:request]\n", "[tcp:request]\n\udcff\n", 1), SECTION_LINE + 1),
}


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_loader_names_file_and_line(tmp_path: Path, name: str) -> None:
    breakage, line = BREAKAGES[name]
    path = _write(tmp_path / "broken.fp", breakage(default_database_path().read_text()))
    with pytest.raises(DatabaseLoadError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: line {line}: "), info.value
    assert "\n" not in str(info.value)


def test_indented_comments_and_blank_lines_are_skipped_as_p0f_does(tmp_path: Path) -> None:
    text = default_database_path().read_text().replace("[tcp:request]\n", "[tcp:request]\n  ; note\n \t\n", 1)
    db = load(_write(tmp_path / "ok.fp", text))
    assert len(db.syn) == len(load(default_database_path()).syn)


def test_a_database_without_tcp_signatures(tmp_path: Path) -> None:
    for text in ("", "; only a comment\n", "[mtu]\nlabel = Ethernet or modem\nsig = 1500\n"):
        with pytest.raises(DatabaseLoadError, match=r"no \[tcp:request\] section"):
            load(_write(tmp_path / "empty.fp", text))


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "db.fifo"
    os.mkfifo(fifo)
    with pytest.raises(DatabaseLoadError, match="not a regular file"):
        load(fifo)


def test_mutated_databases_raise_only_database_load_errors(tmp_path: Path) -> None:
    """Seeded: 150 databases with bytes flipped, lines cut, duplicated or salted with p0f syntax."""
    rng = random.Random(9)
    lines = default_database_path().read_bytes().split(b"\n")
    path = tmp_path / "mutant.fp"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        mutant = list(lines)
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(len(mutant))
            line = bytearray(mutant[j])
            op = rng.randrange(4)
            if op == 0 and line:
                line[rng.randrange(len(line))] = rng.randrange(256)
            elif op == 1 and line:
                del line[rng.randrange(len(line)):]
            elif op == 2:
                line[rng.randrange(len(line) + 1):0] = bytes(rng.choice(b"[]:=,*+-.;0123456789ws \t")
                                                             for _ in range(rng.randint(1, 4)))
            else:
                line = bytearray(mutant[rng.randrange(len(mutant))])
            mutant[j] = bytes(line)
        path.write_bytes(b"\n".join(mutant))
        try:
            load(path)
            outcomes["loaded"] += 1
        except DatabaseLoadError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            outcomes["refused"] += 1
    assert outcomes["loaded"] and outcomes["refused"], outcomes  # both kinds were exercised


# The command lines: one line on stderr, exit 2.
def _broken_db(tmp_path: Path) -> Path:
    return _write(tmp_path / "broken.fp", BREAKAGES["no direction"][0](default_database_path().read_text()))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, check=False)


def _assert_one_line(proc: subprocess.CompletedProcess[str], db: Path) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"{db}: line {SECTION_LINE}: " in proc.stderr, proc.stderr


def test_offline_commands(tmp_path: Path) -> None:
    db = _broken_db(tmp_path)
    c = Conn("203.0.113.1", "198.18.0.1")
    capture = tmp_path / "ok.pcap"
    capture.write_bytes(pcap_bytes([(10**9, ethernet(c.syn())), (10**9 + 1000, ethernet(c.synack()))]))
    _assert_one_line(_run("-m", "analyzer.cli", "fingerprint", str(capture), "--p0f-db", str(db)), db)
    _assert_one_line(_run("-m", "analyzer.cli", "replay", str(capture), "--darknet", "198.18.0.0/15",
                          "--p0f-db", str(db)), db)


def test_services(tmp_path: Path, redis_server: RedisServer) -> None:
    db = _broken_db(tmp_path)
    _assert_one_line(_run("-m", "analyzer.cli", "run", "--handshakes", "--redis", redis_server.url,
                          "--log-dir", str(tmp_path / "logs"), "--p0f-db", str(db)), db)
    _assert_one_line(_run("-m", "prober.cli", "run", "--redis", redis_server.url,
                          "--audit-log", str(tmp_path / "audit"), "--p0f-db", str(db)), db)
    # `probe` loads the database before sending anything (loopback only, all the same).
    _assert_one_line(_run("-m", "prober.cli", "probe", "127.0.0.1", "--allow", "127.0.0.0/8", "--ports", "9",
                          "--count", "1", "--audit-log", str(tmp_path / "audit"), "--p0f-db", str(db)), db)


def test_the_fingerprinter_raises_the_same_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseLoadError):
        Fingerprinter(_broken_db(tmp_path))
