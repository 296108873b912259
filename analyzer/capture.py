"""Capture file reader: pcap (micro/nanosecond, either byte order) and pcapng.

Yields `(number, ts_ns, linktype, frame, orig_len)` tuples — plain tuples, because this is the
per-packet hot path of `replay` and `fingerprint`. `orig_len` is the frame's length on the wire:
larger than `len(frame)` when the capture's snapshot length cut the frame short. Timestamps are
integer nanoseconds so that T^p (a difference of two timestamps) is exact in microseconds whatever
the file's resolution.

A framing error (bad magic, truncated header or record, impossible length) makes the rest of the
file unreadable: the reader raises `CaptureError` naming the byte offset and packet number after
yielding every packet before it. A record that is readable but odd (captured length larger than the
original length) is reported through `on_error` and skipped, and reading goes on.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO

# packet number (1-based), timestamp ns, linktype, frame bytes (as captured), original length
Frame = tuple[int, int, int, bytes, int]

# Larger than any snapshot length tools write (262144; 256 MiB is libpcap's hard limit for some
# link types, but nothing we read comes close): a bigger length means a corrupt file.
MAX_CAPLEN = 262_144 * 4

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000, 16),  # microseconds, little endian
    b"\xa1\xb2\xc3\xd4": (">", 1_000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1, 16),  # nanoseconds
    b"\xa1\xb2\x3c\x4d": (">", 1, 16),
    b"\x34\xcd\xb2\xa1": ("<", 1_000, 24),  # Kuznetsov's modified pcap: 8 more bytes per record
    b"\xa1\xb2\xcd\x34": (">", 1_000, 24),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


class CaptureError(ValueError):
    """The capture file cannot be read on from here. The message names file and position."""


ErrorHandler = Callable[[str], None]


def read_capture(path: str | os.PathLike[str], on_error: ErrorHandler | None = None) -> Iterator[Frame]:
    """Every packet of a pcap or pcapng file, in file order."""
    name = os.fspath(path)
    if name == "-":
        yield from _read_bytes("standard input", sys.stdin.buffer.read(), on_error)
        return
    try:
        f: BinaryIO = open(name, "rb")  # noqa: SIM115 (closed in finally; mmap needs the file)
    except OSError as exc:
        raise CaptureError(f"{name}: cannot open: {exc.strerror}") from None
    data: bytes | mmap.mmap = b""
    try:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CaptureError(f"{name}: empty file, not a capture")
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            data = f.read()  # a pipe or special file: read it whole
        yield from _read_bytes(name, data, on_error)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
        f.close()


def _read_bytes(name: str, data: bytes | mmap.mmap, on_error: ErrorHandler | None) -> Iterator[Frame]:
    report = on_error or (lambda message: None)
    magic = bytes(data[:4])
    if magic in _PCAP_MAGIC:
        yield from _pcap(name, data, magic, report)
    elif magic == _PCAPNG_SHB:
        yield from _pcapng(name, data, report)
    elif not magic:
        raise CaptureError(f"{name}: empty, not a capture")
    else:
        raise CaptureError(f"{name}: byte offset 0: not a pcap or pcapng file (magic {magic.hex()})")


def _pcap(name: str, data: bytes | mmap.mmap, magic: bytes, report: ErrorHandler) -> Iterator[Frame]:
    order, scale, record_size = _PCAP_MAGIC[magic]
    if len(data) < 24:
        raise CaptureError(f"{name}: byte offset 0: pcap file header truncated ({len(data)} of 24 bytes)")
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0xFFFF  # upper bits: FCS info
    record = struct.Struct(order + "IIII")
    unpack = record.unpack_from
    end = len(data)
    offset = 24
    number = 0
    while offset < end:
        number += 1
        if offset + record_size > end:
            raise CaptureError(
                f"{name}: byte offset {offset}: packet {number}: record header truncated "
                f"({end - offset} of {record_size} bytes)"
            )
        sec, frac, caplen, wirelen = unpack(data, offset)
        start = offset + record_size
        if caplen > MAX_CAPLEN:
            raise CaptureError(
                f"{name}: byte offset {offset}: packet {number}: absurd captured length {caplen}"
            )
        if start + caplen > end:
            raise CaptureError(
                f"{name}: byte offset {offset}: packet {number}: packet data truncated "
                f"({end - start} of {caplen} bytes)"
            )
        offset = start + caplen
        if caplen > wirelen:
            report(f"{name}: byte offset {start - record_size}: packet {number}: captured length {caplen} "
                   f"exceeds original length {wirelen}; skipped")
            continue
        yield number, sec * 1_000_000_000 + frac * scale, linktype, data[start:offset], wirelen


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


def _pcapng(name: str, data: bytes | mmap.mmap, report: ErrorHandler) -> Iterator[Frame]:
    end = len(data)
    offset = 0
    number = 0
    order = "<"
    interfaces: list[_Interface] = []
    while offset < end:
        where = f"{name}: byte offset {offset}"
        if offset + 12 > end:
            raise CaptureError(f"{where}: pcapng block header truncated ({end - offset} of 12 bytes)")
        block_type_raw = bytes(data[offset : offset + 4])
        if block_type_raw == _PCAPNG_SHB:
            bom = bytes(data[offset + 8 : offset + 12])
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise CaptureError(f"{where}: pcapng section header with bad byte-order magic {bom.hex()}")
            interfaces = []  # interface ids are per section
        block_type, length = struct.unpack_from(order + "II", data, offset)
        if length < 12 or length % 4:
            raise CaptureError(f"{where}: pcapng block length {length} is impossible")
        if offset + length > end:
            raise CaptureError(f"{where}: pcapng block truncated ({end - offset} of {length} bytes)")
        trailer = struct.unpack_from(order + "I", data, offset + length - 4)[0]
        if trailer != length:
            raise CaptureError(f"{where}: pcapng block lengths disagree ({length} and {trailer})")
        body = offset + 8
        body_end = offset + length - 4
        if block_type == 1:  # Interface Description Block
            if body + 8 > body_end:
                raise CaptureError(f"{where}: interface description block too short")
            linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", data, body)
            tsresol, tsoffset = 6, 0
            for code, value in _options(data, body + 8, body_end, order):
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
                iface_id, ts_high, ts_low, caplen, wirelen = struct.unpack_from(order + "IIIII", data, body)
            else:
                iface_id, _drops, ts_high, ts_low, caplen, wirelen = struct.unpack_from(
                    order + "HHIIII", data, body
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
                yield number, ts, iface.linktype, bytes(data[start : start + caplen]), wirelen
        elif block_type == 3:  # Simple Packet Block: interface 0, no timestamp
            number += 1
            if body + 4 > body_end:
                raise CaptureError(f"{where}: packet {number}: simple packet block too short")
            if not interfaces:
                report(f"{where}: packet {number}: simple packet block before any interface; skipped")
            else:
                wirelen = struct.unpack_from(order + "I", data, body)[0]
                caplen = min(wirelen, body_end - body - 4)
                if interfaces[0].snaplen:
                    caplen = min(caplen, interfaces[0].snaplen)
                yield number, 0, interfaces[0].linktype, bytes(data[body + 4 : body + 4 + caplen]), wirelen
        # Every other block (name resolution, statistics, custom, decryption secrets) is skipped.
        offset += length


def _options(data: bytes | mmap.mmap, pos: int, end: int, order: str) -> Iterator[tuple[int, bytes]]:
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", data, pos)
        if code == 0:
            return
        value = bytes(data[pos + 4 : pos + 4 + length])
        pos += 4 + ((length + 3) & ~3)
        yield code, value
