"""p0f.fp databases: the stock one shipped with pyp0f and the project's own, parsed by pyp0f.

pyp0f's parser reads the file; its TCP records are flattened here into the few integers p0f's
`tcp_find_match` compares, keeping the file order within each direction (p0f's priority order).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyp0f.database.database as pyp0f_database
from pyp0f.database.parse.parser import _parse_file
from pyp0f.database.records import TCPRecord
from pyp0f.database.records_database import RecordsDatabase
from pyp0f.database.signatures import WindowType
from pyp0f.exceptions import DatabaseError, ParsingError
from pyp0f.net.packet import Direction

WIN_ANY, WIN_NORMAL, WIN_MOD, WIN_MSS, WIN_MTU = range(5)
_WIN_TYPES = {
    WindowType.ANY: WIN_ANY,
    WindowType.NORMAL: WIN_NORMAL,
    WindowType.MOD: WIN_MOD,
    WindowType.MSS: WIN_MSS,
    WindowType.MTU: WIN_MTU,
}
ANY = -1  # pyp0f's WILDCARD for numeric fields

# p0f's stock database is ~60 KB; anything this large is not a signature file (and is read whole).
MAX_DATABASE_BYTES = 16 * 1024 * 1024
# The section headers p0f 3 knows (config.c); pyp0f accepts `[tcp]` and then fails with a TypeError.
_SECTIONS = ("[mtu]", "[tcp:request]", "[tcp:response]", "[http:request]", "[http:response]")


class DatabaseLoadError(ValueError):
    """The p0f database file cannot be read or parsed (the message names the file and line).

    A ValueError, so that every caller that already reports (OSError, ValueError) as one line and
    exit 2 (`fingerprint`, `replay`, `run`, the prober) reports this one too.
    """


def stock_database_path() -> Path:
    """p0f 3.09b's own database as pyp0f ships it (identical to Debian's /etc/p0f/p0f.fp)."""
    return Path(pyp0f_database.DEFAULT_DATABASE_PATH)


def default_database_path() -> Path:
    """The project's database: the stock one plus current Linux/Windows/macOS/BSD/mobile signatures."""
    return Path(__file__).resolve().parent / "data" / "stepstone.fp"


@dataclass(frozen=True, slots=True)
class TcpSig:
    """One `sig =` line of a [tcp:request] or [tcp:response] section."""

    label: str  # class:name:flavor
    os_text: str  # what p0f prints after `os=`: "name flavor" (or just the name)
    generic: bool
    user_app: bool  # class "!" (tools such as NMap): never matched fuzzily
    ip_ver: int  # 4, 6 or ANY
    ttl: int  # initial TTL (with +dist already added)
    bad_ttl: bool  # "ttl-": any TTL up to this one
    ip_opt_len: int
    mss: int  # ANY or the value
    win_type: int  # WIN_*
    win: int
    wscale: int  # ANY or the value
    layout: tuple[int, ...]
    eol_pad: int
    quirks: int
    pay_class: int  # ANY, 0 or 1
    line: int  # line number in the file
    raw: str


@dataclass(frozen=True, slots=True)
class TcpDatabase:
    path: Path
    syn: tuple[TcpSig, ...]  # [tcp:request], file order
    synack: tuple[TcpSig, ...]  # [tcp:response], file order


def load(path: Path) -> TcpDatabase:
    """Parse a p0f.fp file. Any fault in it is a DatabaseLoadError naming the file and the line.

    The file is hostile input (`--p0f-db` may name anything): pyp0f reports most faults as
    DatabaseError with a line number, but some (a section header without a direction, a line of
    blanks) escape as TypeError or IndexError. So the lines are checked for what pyp0f mishandles
    first, and whatever else it raises is pinned to the line it was reading.
    """
    lines = _read_lines(Path(path))
    reading = _LineCounter(lines)
    try:
        records = _parse_file(reading)  # type: ignore[arg-type]
    except ParsingError as exc:
        raise _error(path, exc.line_number, _parsing_message(exc)) from exc
    except Exception as exc:  # pyp0f on malformed input: anything, never a traceback
        raise _error(path, reading.line, _describe(exc)) from exc
    syn = _section(path, records, Direction.CLIENT_TO_SERVER)
    synack = _section(path, records, Direction.SERVER_TO_CLIENT)
    return TcpDatabase(Path(path), syn, synack)


def _error(path: Path | str, line: int, message: str) -> DatabaseLoadError:
    return DatabaseLoadError(f"{path}: line {line}: bad p0f database: {message}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parsing_message(exc: ParsingError) -> str:
    """pyp0f's message without its own "Error in line N: " prefix, plus the cause if it adds news."""
    text = str(exc)
    prefix = f"Error in line {exc.line_number}: "
    if text.startswith(prefix):
        text = text[len(prefix):]
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


def _read_lines(path: Path) -> list[str]:
    """The file's lines, checked where pyp0f would crash, and normalised as p0f reads them."""
    try:
        # Not a FIFO or a device: opening one could block, or read without end.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DatabaseLoadError(f"{path}: cannot load p0f database: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_DATABASE_BYTES + 1)
    except OSError as exc:
        raise DatabaseLoadError(f"{path}: cannot load p0f database: {exc.strerror or exc}") from None
    if len(data) > MAX_DATABASE_BYTES:
        raise DatabaseLoadError(
            f"{path}: cannot load p0f database: larger than {MAX_DATABASE_BYTES} bytes, not a signature file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _error(path, line, f"not UTF-8 (byte 0x{data[exc.start]:02x})") from None
    lines: list[str] = []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):
        stripped = line.strip()
        if "\0" in line:
            raise _error(path, number, "NUL byte")
        if not stripped or stripped.startswith(";"):
            lines.append("\n")  # as p0f: blank lines and comments, indented or not, are skipped
            continue
        if stripped.startswith("[") and stripped not in _SECTIONS:
            known = " ".join(_SECTIONS)
            raise _error(path, number, f"unknown section header {_clip(stripped)} (p0f knows {known})")
        lines.append(stripped + "\n")
    return lines


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _LineCounter:
    """Hands lines to pyp0f's parser and remembers which one it is on (for errors it cannot place)."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines
        self.line = 0

    def __iter__(self) -> Iterator[str]:
        for number, text in enumerate(self._lines, 1):
            self.line = number
            yield text


def _section(path: Path | str, records: RecordsDatabase, direction: Direction) -> tuple[TcpSig, ...]:
    name = "[tcp:request]" if direction == Direction.CLIENT_TO_SERVER else "[tcp:response]"
    try:
        found = list(records.iter_values(TCPRecord, direction))
    except DatabaseError:
        raise DatabaseLoadError(f"{path}: cannot load p0f database: no {name} section") from None
    out = []
    for record in found:
        try:
            out.append(_convert(record))
        except Exception as exc:  # a signature pyp0f accepted but we cannot use
            raise _error(path, record.line_number, _describe(exc)) from exc
    return tuple(out)


def _convert(record: TCPRecord) -> TcpSig:
    label = record.label
    sig = record.signature
    os_text = f"{label.name} {label.flavor}" if label.flavor else label.name
    return TcpSig(
        label=f"{label.os_class}:{label.name}:{label.flavor}",
        os_text=os_text,
        generic=label.is_generic,
        user_app=label.is_user_app,
        ip_ver=sig.ip_version,
        ttl=sig.ttl,
        bad_ttl=sig.is_bad_ttl,
        ip_opt_len=sig.ip_options_length,
        mss=sig.options.mss,
        win_type=_WIN_TYPES[sig.window.type],
        win=sig.window.size,
        wscale=sig.window.scale,
        layout=tuple(int(kind) for kind in sig.options.layout),
        eol_pad=sig.options.eol_padding_length,
        quirks=sig.quirks.value,
        pay_class=sig.payload_class,
        line=record.line_number,
        raw=record.raw_signature,
    )
