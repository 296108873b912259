"""Child processes of a lab run (each optionally inside a namespace), with their output in files,
stopped on every exit path; and waiting on conditions with a deadline instead of sleeping."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from lab.netns import Namespace

T = TypeVar("T")


class LabError(RuntimeError):
    """The lab cannot run or a component failed; the message says which and why."""


def wait_for(check: Callable[[], T], timeout: float, what: str, *, every: float = 0.05,
             alive: Callable[[], str | None] | None = None) -> T:
    """Poll `check` until it returns something truthy; LabError naming `what` after `timeout` s.
    `alive` (optional) returns why waiting is pointless (a process died), checked on each round."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if alive is not None and (reason := alive()):
            raise LabError(f"while waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)  # polling a condition, not synchronising on time


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def exited(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        tail = self.err.read_text(errors="replace").strip().splitlines()[-5:]
        return f"{self.name} exited with {code}: " + " | ".join(tail)


@dataclass
class Children:
    logdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], ns: Namespace | None = None, *,
              python: bool = False, cwd: Path | None = None) -> Child:
        argv = [sys.executable, *args] if python else list(args)
        if ns is not None:
            argv = ["ip", "netns", "exec", ns.name, *argv]
        out, err = self.logdir / f"{name}.out", self.logdir / f"{name}.err"
        with out.open("wb") as fout, err.open("wb") as ferr:
            # Own process group: a Ctrl-C in the terminal reaches the lab, which stops them in order.
            proc = subprocess.Popen(argv, stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=cwd)
        child = Child(name, proc, out, err)
        self.children.append(child)
        return child

    def find(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def any_exited(self, names: Sequence[str]) -> str | None:
        for child in self.children:
            if child.name in names and (reason := child.exited()):
                return reason
        return None

    def stop(self, child: Child, *, kill: bool = False, grace: float = 5.0) -> None:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def stop_all(self) -> None:
        # Reverse start order: traffic first, the delay line (links) last.
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        for child in reversed(self.children):
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
