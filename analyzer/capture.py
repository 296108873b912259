"""Capture file reader: pcap (micro/nanosecond, either byte order) and pcapng.

Yields `(number, ts_ns, linktype, frame, orig_len)` tuples — plain tuples, because this is the
per-packet hot path of `replay` and `fingerprint`. `orig_len` is the frame's length on the wire:
larger than `len(frame)` when the capture's snapshot length cut the frame short. Timestamps are
integer nanoseconds so that T^p (a difference of two timestamps) is exact in microseconds whatever
the file's resolution.

The input is read in chunks, never whole: a regular file, a pipe (`<(zcat x.pcap.gz)`), a
character device or standard input (`tcpdump -w - | ...`) all take memory bounded by the chunk
size and the largest record allowed (MAX_CAPLEN, MAX_BLOCK).

A framing error (bad magic, truncated header or record, impossible length) makes the rest of the
file unreadable: the reader raises `CaptureError` naming the byte offset and packet number after
yielding every packet before it. A record that is readable but odd (captured length larger than the
original length, an undeclared pcapng interface) is reported through `on_error` and skipped, and
reading goes on.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from collections.abc import Callable, Iterator

# packet number (1-based), timestamp ns, linktype, frame bytes (as captured), original length
Frame = tuple[int, int, int, bytes, int]

# Larger than any snapshot length tools write (262144; 256 MiB is libpcap's hard limit for some
# link types, but nothing we read comes close): a bigger length means a corrupt file.
MAX_CAPLEN = 262_144 * 4
# A pcapng block we parse (section and interface headers, packets) is at most a packet plus its
# options; longer means a corrupt file. Blocks we skip (statistics, name resolution, custom) may be
# any length: they are read past in chunks, never held.
MAX_BLOCK = MAX_CAPLEN + 65_536
CHUNK = 1 << 20  # bytes per read

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000, 16),  # microseconds, little endian
    b"\xa1\xb2\xc3\xd4": (">", 1_000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1, 16),  # nanoseconds
    b"\xa1\xb2\x3c\x4d": (">", 1, 16),
    b"\x34\xcd\xb2\xa1": ("<", 1_000, 24),  # Kuznetsov's modified pcap: 8 more bytes per record
    b"\xa1\xb2\xcd\x34": (">", 1_000, 24),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_PCAPNG_PARSED = frozenset((0x0A0D0D0A, 1, 2, 3, 6))  # SHB, IDB, PB, SPB, EPB


class CaptureError(ValueError):
    """The capture file cannot be read on from here. The message names file and position."""


ErrorHandler = Callable[[str], None]


class _Input:
    """The bytes of a capture, read in chunks: `buf[pos:]` is read but not yet parsed.

    `base` is the file offset of `buf[0]`, so `base + pos` is the byte offset errors name.
    """

    __slots__ = ("base", "buf", "eof", "fd", "name", "pos")

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.buf = b""
        self.pos = 0
        self.base = 0
        self.eof = False

    def fill(self, need: int) -> bool:
        """Make `buf[pos:pos + need]` available; False when the input ends first."""
        have = len(self.buf) - self.pos
        if have >= need:
            return True
        parts = [self.buf[self.pos :]]
        self.base += self.pos
        self.pos = 0
        while have < need and not self.eof:
            data = self._read(max(CHUNK, need - have))
            if data:
                parts.append(data)
                have += len(data)
            else:
                self.eof = True
        self.buf = b"".join(parts)
        return have >= need

    def skip(self, count: int) -> int:
        """Pass over `count` bytes without keeping them; returns how many there were."""
        have = len(self.buf) - self.pos
        if have >= count:
            self.pos += count
            return count
        skipped = have
        self.base += len(self.buf)
        self.buf = b""
        self.pos = 0
        while skipped < count and not self.eof:
            data = self._read(min(CHUNK, count - skipped))
            if data:
                skipped += len(data)
            else:
                self.eof = True
        self.base += skipped - have
        return skipped

    @property
    def available(self) -> int:
        return len(self.buf) - self.pos

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _read(self, size: int) -> bytes:
        try:
            return os.read(self.fd, size)
        except OSError as exc:
            raise CaptureError(f"{self.name}: byte offset {self.base + len(self.buf)}: read error: "
                               f"{exc.strerror or exc}") from None


def read_capture(path: str | os.PathLike[str], on_error: ErrorHandler | None = None) -> Iterator[Frame]:
    """Every packet of a pcap or pcapng file, in file order. '-' reads standard input."""
    name = os.fspath(path)
    if name == "-":
        yield from _read(_Input("standard input", sys.stdin.fileno()), on_error)
        return
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError as exc:
        raise CaptureError(f"{name}: cannot open: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CaptureError(f"{name}: cannot open: Is a directory")
        # A pipe or device (`<(zcat x.pcap.gz)`, /dev/stdin) has no size: read it as a stream.
        if stat.S_ISREG(mode) and os.fstat(fd).st_size == 0:
            raise CaptureError(f"{name}: empty file, not a capture")
        yield from _read(_Input(name, fd), on_error)
    finally:
        os.close(fd)


def _read(src: _Input, on_error: ErrorHandler | None) -> Iterator[Frame]:
    report = on_error or (lambda message: None)
    src.fill(4)
    magic = bytes(src.buf[:4])
    if magic in _PCAP_MAGIC:
        yield from _pcap(src, magic, report)
    elif magic == _PCAPNG_SHB:
        yield from _pcapng(src, report)
    elif not magic:
        raise CaptureError(f"{src.name}: empty, not a capture")
    else:
        raise CaptureError(f"{src.name}: byte offset 0: not a pcap or pcapng file (magic {magic.hex()})")


def _pcap(src: _Input, magic: bytes, report: ErrorHandler) -> Iterator[Frame]:
    name = src.name
    order, scale, record_size = _PCAP_MAGIC[magic]
    if not src.fill(24):
        raise CaptureError(f"{name}: byte offset 0: pcap file header truncated ({src.available} of 24 bytes)")
    linktype = struct.unpack_from(order + "I", src.buf, src.pos + 20)[0] & 0xFFFF  # upper bits: FCS info
    unpack = struct.Struct(order + "IIII").unpack_from
    buf = src.buf
    pos = src.pos + 24
    end = len(buf)
    number = 0
    while True:
        if pos + record_size > end:
            src.pos = pos
            if not src.fill(record_size):
                if not src.available:
                    return
                raise CaptureError(
                    f"{name}: byte offset {src.offset}: packet {number + 1}: record header truncated "
                    f"({src.available} of {record_size} bytes)"
                )
            buf, pos, end = src.buf, src.pos, len(src.buf)
        number += 1
        sec, frac, caplen, wirelen = unpack(buf, pos)
        if caplen > MAX_CAPLEN:
            raise CaptureError(
                f"{name}: byte offset {src.base + pos}: packet {number}: absurd captured length {caplen}"
            )
        start = pos + record_size
        if start + caplen > end:
            src.pos = pos
            if not src.fill(record_size + caplen):
                raise CaptureError(
                    f"{name}: byte offset {src.offset}: packet {number}: packet data truncated "
                    f"({src.available - record_size} of {caplen} bytes)"
                )
            buf, pos, end = src.buf, src.pos, len(src.buf)
            start = pos + record_size
        record_offset = src.base + pos
        pos = start + caplen
        if caplen > wirelen:
            report(f"{name}: byte offset {record_offset}: packet {number}: captured length {caplen} "
                   f"exceeds original length {wirelen}; skipped")
            continue
        yield number, sec * 1_000_000_000 + frac * scale, linktype, buf[start:pos], wirelen


class _Interface:
    __slots__ = ("linktype", "offset_ns", "snaplen", "to_ns")

    def __init__(self, linktype: int, snaplen: int, to_ns: Callable[[int], int], offset_ns: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.to_ns = to_ns
        self.offset_ns = offset_ns


def _resolution(code: int) -> Callable[[int], int]:
    """if_tsresol: high bit clear = 10^-n seconds, set = 2^-n seconds (pcapng spec)."""
    n = code & 0x7F
    if code & 0x80:
        return lambda ts: (ts * 1_000_000_000) >> n
    if n <= 9:
        factor = 10 ** (9 - n)
        return lambda ts: ts * factor
    divisor = 10 ** (n - 9)
    return lambda ts: ts // divisor


def _pcapng(src: _Input, report: ErrorHandler) -> Iterator[Frame]:
    name = src.name
    number = 0
    order = "<"
    interfaces: list[_Interface] = []
    while True:
        if not src.fill(12):
            if not src.available:
                return
            raise CaptureError(f"{name}: byte offset {src.offset}: pcapng block header truncated "
                               f"({src.available} of 12 bytes)")
        where = f"{name}: byte offset {src.offset}"
        buf, offset = src.buf, src.pos
        if buf[offset : offset + 4] == _PCAPNG_SHB:
            bom = bytes(buf[offset + 8 : offset + 12])
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise CaptureError(f"{where}: pcapng section header with bad byte-order magic {bom.hex()}")
            interfaces = []  # interface ids are per section
        block_type, length = struct.unpack_from(order + "II", buf, offset)
        if length < 12 or length % 4:
            raise CaptureError(f"{where}: pcapng block length {length} is impossible")
        if block_type not in _PCAPNG_PARSED:
            # Name resolution, statistics, custom, decryption secrets: skipped, whatever their size.
            got = src.skip(length - 4)
            if got < length - 4 or not src.fill(4):
                have = got + src.available
                raise CaptureError(f"{where}: pcapng block truncated ({have} of {length} bytes)")
            trailer = struct.unpack_from(order + "I", src.buf, src.pos)[0]
            if trailer != length:
                raise CaptureError(f"{where}: pcapng block lengths disagree ({length} and {trailer})")
            src.pos += 4
            continue
        if length > MAX_BLOCK:
            raise CaptureError(f"{where}: pcapng block length {length} is absurd")
        if not src.fill(length):
            raise CaptureError(f"{where}: pcapng block truncated ({src.available} of {length} bytes)")
        buf, offset = src.buf, src.pos
        trailer = struct.unpack_from(order + "I", buf, offset + length - 4)[0]
        if trailer != length:
            raise CaptureError(f"{where}: pcapng block lengths disagree ({length} and {trailer})")
        src.pos = offset + length
        body = offset + 8
        body_end = offset + length - 4
        if block_type == 1:  # Interface Description Block
            if body + 8 > body_end:
                raise CaptureError(f"{where}: interface description block too short")
            linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", buf, body)
            tsresol, tsoffset = 6, 0
            for code, value in _options(buf, body + 8, body_end, order):
                if code == 9 and len(value) >= 1:
                    tsresol = value[0]
                elif code == 14 and len(value) == 8:
                    tsoffset = struct.unpack(order + "q", value)[0]
            interfaces.append(_Interface(linktype, snaplen, _resolution(tsresol), tsoffset * 1_000_000_000))
        elif block_type in (6, 2):  # Enhanced Packet Block, obsolete Packet Block
            number += 1
            if body + 20 > body_end:
                raise CaptureError(f"{where}: packet {number}: packet block too short")
            if block_type == 6:
                iface_id, ts_high, ts_low, caplen, wirelen = struct.unpack_from(order + "IIIII", buf, body)
            else:
                iface_id, _drops, ts_high, ts_low, caplen, wirelen = struct.unpack_from(
                    order + "HHIIII", buf, body
                )
            start = body + 20
            if start + caplen > body_end:
                raise CaptureError(f"{where}: packet {number}: captured length {caplen} runs past its block")
            if iface_id >= len(interfaces):
                report(f"{where}: packet {number}: unknown interface {iface_id}; skipped")
            elif caplen > wirelen:
                report(f"{where}: packet {number}: captured length {caplen} exceeds original length "
                       f"{wirelen}; skipped")
            else:
                iface = interfaces[iface_id]
                ts = iface.to_ns((ts_high << 32) | ts_low) + iface.offset_ns
                yield number, ts, iface.linktype, bytes(buf[start : start + caplen]), wirelen
        elif block_type == 3:  # Simple Packet Block: interface 0, no timestamp
            number += 1
            if body + 4 > body_end:
                raise CaptureError(f"{where}: packet {number}: simple packet block too short")
            if not interfaces:
                report(f"{where}: packet {number}: simple packet block before any interface; skipped")
            else:
                wirelen = struct.unpack_from(order + "I", buf, body)[0]
                caplen = min(wirelen, body_end - body - 4)
                if interfaces[0].snaplen:
                    caplen = min(caplen, interfaces[0].snaplen)
                yield number, 0, interfaces[0].linktype, bytes(buf[body + 4 : body + 4 + caplen]), wirelen
        # A section header needs nothing more: its byte order was taken above.


def _options(data: bytes, pos: int, end: int, order: str) -> Iterator[tuple[int, bytes]]:
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", data, pos)
        if code == 0:
            return
        value = bytes(data[pos + 4 : min(pos + 4 + length, end)])
        pos += 4 + ((length + 3) & ~3)
        yield code, value
