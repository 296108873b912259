"""p0f.fp databases: the stock one shipped with pyp0f and the project's own, parsed by pyp0f.

pyp0f's parser reads the file; its TCP records are flattened here into the few integers p0f's
`tcp_find_match` compares, keeping the file order within each direction (p0f's priority order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyp0f.database.database as pyp0f_database
from pyp0f.database.parse.parser import parse_file
from pyp0f.database.records import TCPRecord
from pyp0f.database.signatures import WindowType
from pyp0f.exceptions import DatabaseError
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


class DatabaseLoadError(ValueError):
    """The p0f database file cannot be read or parsed (the message names the file and line)."""


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
    try:
        records = parse_file(path)
        syn = tuple(_convert(r) for r in records.iter_values(TCPRecord, Direction.CLIENT_TO_SERVER))
        synack = tuple(_convert(r) for r in records.iter_values(TCPRecord, Direction.SERVER_TO_CLIENT))
    except DatabaseError as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise DatabaseLoadError(f"{path}: cannot load p0f database: {exc}{cause}") from exc
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise DatabaseLoadError(f"{path}: cannot load p0f database: {exc}") from exc
    return TcpDatabase(Path(path), syn, synack)


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
