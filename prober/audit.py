"""The audit trail: one JSON line per probe sent and per refusal, flushed as written, so an
operator can always answer who probed what, when, and why (which job)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, TextIO


def default_path() -> Path:
    """/var/log/stepstone when we may write there (root), else the XDG state directory."""
    system = Path("/var/log/stepstone")
    if os.geteuid() == 0:
        return system / "prober-audit.jsonl"
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "stepstone" / "prober-audit.jsonl"


class AuditLog:
    def __init__(self, path: Path | str | None, *, worker: str) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.worker = worker
        self.host = socket.gethostname()
        self._file: TextIO | None = None

    def open(self) -> None:
        """Open (append) now, so a bad path is a start-up error and not a failure mid-probe."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        self.open()
        assert self._file is not None
        record = {"ts": time.time(), "event": event, "worker": self.worker, "host": self.host,
                  "pid": os.getpid(), **fields}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def probe(self, *, target: str, ports: tuple[int, ...], echo_count: int, job: str) -> None:
        self.write("probe", target=target, ports=list(ports), echo_count=echo_count, job=job)

    def refusal(self, *, target: str, reason: str, job: str) -> None:
        self.write("refused", target=target, reason=reason, job=job)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
