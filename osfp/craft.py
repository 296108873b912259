"""Raw SYN / SYN+ACK packets with a chosen p0f signature, and a minimal pcap writer.

For tests and benchmarks (agreement with the real p0f, the lab's personas): deterministic bytes,
no scapy. `from_signature` picks concrete values for a database signature's wildcards and derived
fields; `Shape` holds them so a caller can push single fields off (TTL, window, quirks, IP version).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from pyp0f.database.signatures import TCPSignature, WindowType

ANY = -1
_OPTION_KINDS = {"nop": 1, "mss": 2, "ws": 3, "sok": 4, "sack": 5, "ts": 8}
QUIRKS = frozenset(
    "df id+ id- ecn 0+ flow seq- ack+ ack- uptr+ urgf+ pushf+ ts1- ts2+ opt+ exws".split()  # noqa: SIM905
)


@dataclass(frozen=True)
class Shape:
    """Concrete header values of one SYN or SYN+ACK (what p0f will see)."""

    synack: bool = False
    ip_ver: int = 4
    ttl: int = 64
    ip_opt_len: int = 0  # multiple of 4 (filled with IPv4 NOP options)
    mss: int | None = 1460  # None: no value needed (the layout has no mss option)
    win: int = 64240
    wscale: int = 7
    layout: tuple[int, ...] = (2, 4, 8, 1, 3)  # option kinds; 0 = EOL (then eol_pad bytes)
    eol_pad: int = 0
    quirks: frozenset[str] = frozenset({"df", "id+"})
    payload: bytes = b""

    def with_quirks(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> Shape:
        return replace(self, quirks=(self.quirks | frozenset(add)) - frozenset(remove))


def from_signature(raw_sig: str, *, synack: bool = False, ip_ver: int = 4, mss: int = 1460) -> Shape:
    """A packet shape that p0f's matcher accepts as an exact match of `raw_sig` (database syntax)."""
    sig = TCPSignature.parse(raw_sig)
    if sig.ip_version != ANY:
        ip_ver = sig.ip_version
    layout = tuple(int(kind) for kind in sig.options.layout)
    quirk_names = frozenset(raw_sig.split(":")[6].split(",")) - {""}
    if sig.options.mss != ANY:
        mss = sig.options.mss
    win_type, size = sig.window.type, sig.window.size
    if win_type == WindowType.MSS and mss * size > 65535:
        mss = 65535 // size
    if win_type == WindowType.NORMAL:
        win = size
    elif win_type == WindowType.MOD:
        win = size * max(1, 16384 // size)
    elif win_type == WindowType.MSS:
        win = mss * size
    elif win_type == WindowType.MTU:
        win = (mss + 40) * size
    else:
        win = 5111  # prime: a multiple of nothing p0f tries
    wscale = sig.window.scale
    if wscale == ANY:
        wscale = 15 if "exws" in quirk_names else 7
    ttl = sig.ttl - 1
    payload = b"x" * 8 if sig.payload_class == 1 else b""
    return Shape(
        synack=synack,
        ip_ver=ip_ver,
        ttl=ttl,
        ip_opt_len=sig.ip_options_length,
        mss=mss,
        win=win,
        wscale=wscale,
        layout=layout,
        eol_pad=sig.options.eol_padding_length,
        quirks=quirk_names,
        payload=payload,
    )


def build(
    shape: Shape,
    *,
    src: str = "192.0.2.1",
    dst: str = "198.51.100.1",
    sport: int = 40000,
    dport: int = 80,
    seq: int = 0x1234_5678,
    ip_id: int = 0x4242,
) -> bytes:
    """Raw IP packet bytes of `shape` (ValueError if the shape cannot be put on the wire)."""
    q = shape.quirks
    unknown = q - QUIRKS
    if unknown:
        raise ValueError(f"cannot craft quirks {sorted(unknown)}")
    options = _options(shape)
    if len(options) % 4:
        raise ValueError(f"options of {len(options)} bytes are not a multiple of 4 (no eol+N to pad)")
    if len(options) > 40:
        raise ValueError("more than 40 bytes of TCP options")
    doff = 20 + len(options)
    flags = 0x12 if shape.synack else 0x02
    if "urgf+" in q:
        flags |= 0x20
    if "pushf+" in q:
        flags |= 0x08
    seq = 0 if "seq-" in q else seq
    # p0f 3.09b sees `ack+` (on a SYN) only through bit 0 of the ACK field's first byte.
    ack_syn = 0x0100_0001 if "ack+" in q else 0
    ack = (0 if "ack-" in q else 0x0BAD_CAFE) if shape.synack else ack_syn
    urg = 0x0101 if "uptr+" in q and not flags & 0x20 else 0
    tcp = (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff // 4) << 4, flags, shape.win, 0, urg)
        + options
        + shape.payload
    )
    if shape.ip_ver == 6:
        if shape.ip_opt_len:
            raise ValueError("IPv6 has no IP options")
        ver_tc_flow = (6 << 28) | ((0x02 if "ecn" in q else 0) << 20) | (0x12345 if "flow" in q else 0)
        header = struct.pack("!IHBB", ver_tc_flow, len(tcp), 6, shape.ttl)
        return header + _addr(src, 16) + _addr(dst, 16) + tcp
    if shape.ip_opt_len % 4:
        raise ValueError(f"IPv4 option length {shape.ip_opt_len} is not a multiple of 4")
    hdr_len = 20 + shape.ip_opt_len
    flags_off = 0
    if "df" in q:
        flags_off |= 0x4000
        ident = ip_id if "id+" in q else 0
    else:
        ident = 0 if "id-" in q else ip_id
    if "0+" in q:
        flags_off |= 0x8000
    tos = 0x02 if "ecn" in q else 0
    header = struct.pack(
        "!BBHHHBBH", 0x40 | hdr_len // 4, tos, hdr_len + len(tcp), ident, flags_off, shape.ttl, 6, 0
    )
    header += _addr(src, 4) + _addr(dst, 4) + b"\x01" * shape.ip_opt_len
    checksum = _checksum(header)
    header = header[:10] + struct.pack("!H", checksum) + header[12:]
    return header + tcp


def _options(shape: Shape) -> bytes:
    out = bytearray()
    q = shape.quirks
    for kind in shape.layout:
        if kind == 0:
            pad = bytearray(shape.eol_pad)
            if "opt+" in q:
                if shape.eol_pad < 2:
                    raise ValueError("opt+ needs at least 2 padding bytes (p0f ignores the last one)")
                pad[0] = 0x55
            out += b"\x00" + pad
        elif kind == 1:
            out += b"\x01"
        elif kind == 2:
            out += struct.pack("!BBH", 2, 4, shape.mss or 0)
        elif kind == 3:
            out += struct.pack("!BBB", 3, 3, shape.wscale)
        elif kind == 4:
            out += b"\x04\x02"
        elif kind == 5:
            out += b"\x05\x0a" + bytes(8)
        elif kind == 8:
            ts1 = 0 if "ts1-" in q else 0x00AB_CDEF
            ts2 = 0x0000_1234 if "ts2+" in q and not shape.synack else 0
            if shape.synack and "ts2+" not in q:
                ts2 = 0x0000_5678  # a SYN+ACK echoes the peer's TSval; p0f ignores it there
            out += struct.pack("!BBII", 8, 10, ts1, ts2)
        else:
            out += bytes((kind, 2))
    return bytes(out)


def _addr(text: str, size: int) -> bytes:
    packed = ipaddress.ip_address(text).packed
    if len(packed) != size:
        raise ValueError(f"{text} is not an IPv{4 if size == 4 else 6} address")
    return packed


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
LINKTYPE_ETHERNET = 1


def write_pcap(path: Path, packets: Iterable[tuple[float, bytes]], *, vlan: int | None = None) -> int:
    """Write raw IP packets (with their timestamps) as Ethernet frames; returns the count."""
    count = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
        for ts, ip in packets:
            ethertype = ETHERTYPE_IPV6 if ip[0] >> 4 == 6 else ETHERTYPE_IPV4
            frame = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
            if vlan is not None:
                frame += struct.pack("!HH", 0x8100, vlan)
            frame += struct.pack("!H", ethertype) + ip
            sec = int(ts)
            usec = round((ts - sec) * 1_000_000)
            out.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
            count += 1
    return count
