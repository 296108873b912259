"""Shared by the offline tests of issue 9 (test_offline_hostile.py, test_fuzz_offline.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from capfiles import Conn, ethernet
from conftest import DATA

DARK = "198.18.0.0/15"
S = 1_000_000_000


def real_capture(name: str) -> Path:
    """A real capture kept in the repository (tests/data/captures, with its licence)."""
    return DATA / "captures" / name


def cli(*argv: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command in a child process: what a user sees, tracebacks included if any."""
    proc = subprocess.run([sys.executable, "-m", "analyzer.cli", *argv], capture_output=True, input=stdin,
                          timeout=timeout, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def handshake(n: int, t0: int, darknet: str = "198.18.0.1") -> list[tuple[int, bytes]]:
    """SYN, SYN+ACK 1 µs later, ACK 5 ms after that: one answered handshake of 203.0.113.n."""
    c = Conn(f"203.0.113.{n}", darknet, 40000 + n, 23)
    return [(t0, ethernet(c.syn())), (t0 + 1_000, ethernet(c.synack())), (t0 + 5_001_000, ethernet(c.ack()))]
