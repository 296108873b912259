"""Shared by the offline tests of issue 9 (test_offline_hostile.py, test_fuzz_offline.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

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


def cli_limited(argv: Sequence[str], chunks: Iterable[bytes], *, address_space: int,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command with its address space capped (RLIMIT_AS), `chunks` streamed to its stdin
    (never all in memory here). A command that holds its input whole fails with MemoryError."""

    # The limit is set in the child itself, before the analyzer is imported (no preexec_fn).
    launcher = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({address_space}, "
                f"{address_space})); sys.argv[0] = 'stepstone-analyzer'; "
                "runpy.run_module('analyzer.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launcher, *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}

    def drain(name: str, stream: IO[bytes]) -> None:
        out[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(name, stream))
               for name, stream in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    assert proc.stdin is not None
    try:
        for chunk in chunks:
            proc.stdin.write(chunk)
    except BrokenPipeError:
        pass  # it stopped reading (died): the status and stderr say why
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    proc.wait(timeout)
    for reader in readers:
        reader.join(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out["out"].decode(errors="replace"),
                                       out["err"].decode(errors="replace"))
