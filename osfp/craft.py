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

from osfp.checksum import internet_checksum
from osfp.database import WIN_MSS, TcpSig

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
    limits = (("window", shape.win, 65535), ("ttl", shape.ttl, 255), ("mss", shape.mss or 0, 65535))
    for name, value, top in limits:
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} out of range")
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
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
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


# --- whole databases as packets (agreement tests, benchmarks) ---------------------------------

Key = tuple[str, int, str, int, str]  # src, sport, dst, dport, "syn" | "synack"


@dataclass(frozen=True)
class Crafted:
    ip: bytes
    key: Key
    sig: TcpSig  # the database line the packet was made from
    variant: str


PEER_MSS = 1201  # divides none of the other candidates p0f tries (1460, 1448, 1500, ...)


def _variants(shape: Shape, sig: TcpSig) -> dict[str, Shape]:
    """The exact shape, and shapes pushed off it one field at a time."""
    out = {
        "exact": shape,
        "ttl_far": replace(shape, ttl=max(1, sig.ttl - 45)),  # beyond p0f's 35 hops: fuzzy TTL
        "ttl_above": replace(shape, ttl=min(255, sig.ttl + 3)),  # above the initial TTL
        "ttl_32": replace(shape, ttl=30),
        "ttl_200": replace(shape, ttl=200),
        "win_plus_1": replace(shape, win=(shape.win + 1) % 65536),
        "win_scale": replace(shape, wscale=(shape.wscale + 1) % 15),
        "mss_minus_20": replace(shape, mss=(shape.mss or 1460) - 20),
        "no_df": shape.with_quirks(remove={"df"}),
        "no_id": shape.with_quirks(remove={"id+"}),
        "ecn": shape.with_quirks(add={"ecn"}),
        "id_zero_no_df": shape.with_quirks(add={"id-"}, remove={"df", "id+"}),
        "ts1_zero": shape.with_quirks(add={"ts1-"}),
        "push": shape.with_quirks(add={"pushf+"}),
        "ecn_no_df": shape.with_quirks(add={"ecn"}, remove={"df"}),
        "ecn_ttl_far": replace(shape.with_quirks(add={"ecn"}), ttl=max(1, sig.ttl - 50)),
        "payload": replace(shape, payload=b"hello"),
        "flow": shape.with_quirks(add={"flow"}) if shape.ip_ver == 6 else shape.with_quirks(add={"0+"}),
    }
    if shape.synack and sig.win_type == WIN_MSS:
        # A window that is a multiple of the SYN's MSS only (PEER_MSS, sent in the flow's SYN).
        out["peer_mss"] = replace(shape, win=sig.win * PEER_MSS)
    if not shape.synack:
        out["ack_plus"] = shape.with_quirks(add={"ack+"})
        out["ts2"] = shape.with_quirks(add={"ts2+"})
    return out


def database_packets(
    sigs: Iterable[TcpSig], *, synack: bool, variants: Iterable[str] = ("exact",), first: int = 0
) -> list[Crafted]:
    """Packets for every signature (both IP versions for `*` ones) in every requested variant.

    A SYN+ACK is preceded by a SYN of its flow (the original p0f fingerprints a SYN+ACK only after
    that SYN); the returned list holds both, in capture order, the SYN with variant "flow-syn".
    Flows are numbered from `first` (use distinct ranges for lists that go into one capture).
    """
    wanted = tuple(variants)
    out: list[Crafted] = []
    n = first
    for sig in sigs:
        for ip_ver in (4, 6) if sig.ip_ver == ANY else (sig.ip_ver,):
            base = from_signature(sig.raw, synack=synack, ip_ver=ip_ver)
            shapes = _variants(base, sig)
            for name in wanted:
                shape = shapes.get(name)
                if shape is None:
                    continue
                n += 1
                port = 1024 + n % 60000
                if ip_ver == 4:
                    client = f"10.{64 + n // 60000}.0.1"
                    server = "198.51.100.1"
                else:
                    client = str(ipaddress.ip_address(f"2001:db8:{n // 60000:x}::1"))
                    server = "2001:db8:ffff::1"
                try:
                    if synack:
                        flow_syn = Shape(ip_ver=ip_ver, mss=PEER_MSS if name == "peer_mss" else 1460)
                        syn = build(flow_syn, src=client, dst=server, sport=port, dport=80)
                        ip = build(shape, src=server, dst=client, sport=80, dport=port)
                    else:
                        ip = build(shape, src=client, dst=server, sport=port, dport=80)
                except ValueError:
                    continue  # a variant that cannot be put on the wire for this signature
                if synack:
                    out.append(Crafted(syn, (client, port, server, 80, "syn"), sig, "flow-syn"))
                    out.append(Crafted(ip, (server, 80, client, port, "synack"), sig, name))
                else:
                    out.append(Crafted(ip, (client, port, server, 80, "syn"), sig, name))
    return out


VARIANTS = (
    "exact",
    "ttl_far",
    "ttl_above",
    "ttl_32",
    "ttl_200",
    "win_plus_1",
    "win_scale",
    "mss_minus_20",
    "no_df",
    "no_id",
    "ecn",
    "id_zero_no_df",
    "ts1_zero",
    "push",
    "ecn_no_df",
    "ecn_ttl_far",
    "payload",
    "flow",
    "ack_plus",
    "ts2",
    "peer_mss",
)
