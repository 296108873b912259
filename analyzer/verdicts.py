"""Where the live analyzer's verdicts go: its JSON-lines logs (`stepstone.log`, `handshakes.log`
in `--log-dir`), and the entries of the Redis stream `verdicts` (`entry_fields`, `from_entry`),
which the analyzers started with `--zeek` hand to their sensors.

Each line carries `hid` (the handshake's entry id on the `handshakes` stream). A line is written
only if neither Redis (the stored handshake's `logged_<log>` field) nor this process says it was,
and marked right after; a crash between the two is repaired on start by reading the file's tail
back, so a restart writes no duplicate line. (Unanswered handshakes are not stored in Redis: for
them the tail alone guards a restart.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analyzer.record import Record, RecordError
from analyzer.state import State
from prober.job import short

# Lines written but not yet marked in Redis when a process dies are among the last few; a
# generous tail covers every handshake a process can have in hand at once.
TAIL_BYTES = 1 << 20
RECENT = 4096
# A verdict's numbers are counts and microseconds (analyzer.rules): beyond 2^53 they are not exact
# in a double and no Zeek count takes them.
VERDICT_NUMBER_MAX = 2**53


class Encoded(str):
    """A log line's object already encoded as JSON text (`{...}`, separators `,` and `:`), for
    `JsonLog.write_many`: a caller that writes the same verdict into several lines encodes it
    once."""


class VerdictEntryError(ValueError):
    """A `verdicts` stream entry that does not decode (another version, or written by hand)."""


def entry_fields(hid: str, verdict: dict[str, Any], record: dict[str, Any]) -> dict[str, str]:
    """A `verdicts` stream entry: the handshake, and the verdict and record dicts (JSON) that
    `ZeekClient.publish_verdict` takes."""
    return {
        "hid": hid,
        "verdict": json.dumps(verdict, separators=(",", ":")),
        "record": json.dumps(record, separators=(",", ":")),
    }


def from_entry(fields: dict[str, str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(hid, verdict, record) of a `verdicts` entry; VerdictEntryError if it is not one: the
    record must pass `Record.from_json` (bounded times and durations), and every number in the
    verdict must be finite and within +-2^53. (What makes a Zeek event is checked again where it
    becomes one: `analyzer.zeek.verdict_event`.)"""
    hid = fields.get("hid")
    if not hid or len(hid) > 64:
        raise VerdictEntryError(f"verdicts entry without a hid: {short(hid)}")
    about = f"verdicts entry {short(hid)}"
    out: list[dict[str, Any]] = []
    for name in ("verdict", "record"):
        try:
            value = json.loads(fields[name])
        except KeyError:
            raise VerdictEntryError(f"{about} without {name}") from None
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise VerdictEntryError(f"{about}: {name} is not JSON: {short(str(exc))}") from None
        if not isinstance(value, dict):
            raise VerdictEntryError(f"{about}: {name} is not an object")
        out.append(value)
    verdict, record = out
    try:
        Record.from_json(record)
    except RecordError as exc:
        raise VerdictEntryError(f"{about}: record: {exc}") from None
    for key, value in verdict.items():
        if not _fits(value):
            raise VerdictEntryError(f"{about}: verdict {short(key)} out of range: {short(value)}")
    return hid, verdict, record


def _fits(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    # Ints are compared as they are: math.isfinite() of a 400-digit one overflows.
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return -VERDICT_NUMBER_MAX <= value <= VERDICT_NUMBER_MAX


class JsonLog:
    def __init__(self, path: Path, name: str, state: State, *, ttl_after: int = 0) -> None:
        self.path = path
        self.name = name  # the field `logged_<name>` of a stored handshake in Redis
        self.state = state
        self.ttl_after = ttl_after  # keep a handshake only this long once its line is here (0: as is)
        self._fd: int | None = None
        self._writing: set[str] = set()  # hids between the Redis check and the mark, this process
        # Recently written hids: a second closer that checked Redis before the first one marked
        # (a claim racing a slow handler) must not write again.
        self._recent: dict[str, None] = {}
        self._recovered: set[str] = set()  # hids found in the tail on start

    def open(self) -> None:
        """Open for appending (OSError if the directory is not writable) and repair the tail."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._repair()

    def _repair(self) -> None:
        size = os.path.getsize(self.path)
        start = max(0, size - TAIL_BYTES)
        with open(self.path, "rb") as f:
            f.seek(start)
            tail = f.read()
        if tail and not tail.endswith(b"\n"):
            # A line cut short by a crash: drop it; it was never marked, so it is written again.
            os.truncate(self.path, start + tail.rfind(b"\n") + 1)

    def tail_hids(self) -> list[str]:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().split(b"\n")
        if size > TAIL_BYTES:
            lines = lines[1:]  # the first one is probably a fragment
        hids = []
        for line in lines:
            try:
                hid = json.loads(line).get("hid")
            except (ValueError, AttributeError):
                continue
            if isinstance(hid, str):
                hids.append(hid)
        return hids

    async def recover(self) -> int:
        """Mark every line in the tail as written (covers a crash after writing, before marking)."""
        hids = self.tail_hids()
        self._recovered = set(hids)
        await self.state.mark_logged(self.name, hids, ttl=self.ttl_after)
        return len(hids)

    async def write(self, hid: str, obj: dict[str, Any], *, checked: bool = False) -> bool:
        """Append one line for `hid` unless one was written before; True if written."""
        return hid in await self.write_many([(hid, obj)], checked=checked)

    async def write_many(self, items: Sequence[tuple[str, dict[str, Any] | Encoded]], *,
                         checked: bool = False) -> set[str]:
        """Append one line per (hid, object) unless one was written before; the hids written.
        `checked`: the caller has just seen in Redis that they were not (saves a round trip)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not open")
        todo = [(hid, obj) for hid, obj in items
                if hid not in self._writing and hid not in self._recent and hid not in self._recovered]
        if todo and not checked:
            seen = await self.state.logged(self.name, [hid for hid, _ in todo])
            todo = [item for item, done in zip(todo, seen, strict=True) if not done]
        if not todo:
            return set()
        hids = [hid for hid, _ in todo]
        self._writing.update(hids)
        try:
            data = "".join(_line(hid, obj) for hid, obj in todo).encode()
            # One write() on an O_APPEND file: a killed process leaves whole lines (the kernel
            # finishes a write syscall to a local file once it has started), never a mix.
            os.write(self._fd, data)
            for hid in hids:
                self._recent[hid] = None
            while len(self._recent) > RECENT:
                del self._recent[next(iter(self._recent))]
            await self.state.mark_logged(self.name, hids, ttl=self.ttl_after)
            return set(hids)
        finally:
            self._writing.difference_update(hids)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line(hid: str, obj: dict[str, Any] | Encoded) -> str:
    if isinstance(obj, Encoded):
        rest = obj[1:].lstrip()
        return '{"hid":' + json.dumps(hid) + ("" if rest.startswith("}") else ",") + rest + "\n"
    return json.dumps({"hid": hid, **obj}, separators=(",", ":")) + "\n"
