"""What p0f reads from one SYN or SYN+ACK: the IP/TCP header fields, parsed with `struct`.

This follows p0f 3.09b's `parse_packet()` (process.c) field by field, including its oddities,
because p0f's behaviour is the reference for our labels:
- the IPv4 total length trims trailing bytes (Ethernet padding) before anything else is looked at;
- `ack+` is p0f's `RD32(ack) & !(flags & RST)`: a bitwise AND with 1 of the raw (network-order)
  32-bit value read on a little-endian host, i.e. bit 0 of the ACK field's FIRST byte, not "ACK != 0";
- after an EOL option, a non-zero padding byte only counts as `opt+` when it is not the last byte;
- `ts1-`/`ts2+` come from the timestamp option's values; `mss*N` tries `mss-12` only when TSval != 0.
Where p0f silently skips a well-formed packet (IPv6 whose next header is not TCP, e.g. a hop-by-hop
extension header, which p0f 3.09b does not walk; an IPv4 fragment or non-TCP payload) we raise
`NotFingerprinted`, a FingerprintError that callers may count rather than report.
Where p0f would set the `bad` quirk (options it cannot walk, wrong option lengths, more than 24
options) we raise `FingerprintError` instead: no database signature carries `bad`, so p0f never
labels such packets either.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pyp0f.net.quirks import Quirk

from osfp.result import FingerprintError, NotFingerprinted

# Quirk bits are pyp0f's (so packet quirks compare directly with its parsed database signatures).
Q_ECN = Quirk.ECN.value
Q_DF = Quirk.DF.value
Q_NZ_ID = Quirk.NZ_ID.value
Q_ZERO_ID = Quirk.ZERO_ID.value
Q_NZ_MBZ = Quirk.NZ_MBZ.value
Q_FLOW = Quirk.FLOW.value
Q_ZERO_SEQ = Quirk.ZERO_SEQ.value
Q_NZ_ACK = Quirk.NZ_ACK.value
Q_ZERO_ACK = Quirk.ZERO_ACK.value
Q_NZ_URG = Quirk.NZ_URG.value
Q_URG = Quirk.URG.value
Q_PUSH = Quirk.PUSH.value
Q_ZERO_TS1 = Quirk.OPT_ZERO_TS1.value
Q_NZ_TS2 = Quirk.OPT_NZ_TS2.value
Q_EOL_NZ = Quirk.OPT_EOL_NZ.value
Q_EXWS = Quirk.OPT_EXWS.value

MIN_TCP4 = 40  # IPv4 + TCP headers without options
MIN_TCP6 = 60
MAX_TCP_OPT = 24  # p0f stops recording options after this many (and flags the rest as bad)

_FIN, _SYN, _RST, _PSH, _ACK, _URG, _ECE, _CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_TYPE_MASK = _SYN | _ACK | _FIN | _RST

_IP4 = struct.Struct("!BBHHHBB")  # ver_hlen, tos, tot_len, id, flags_off, ttl, proto
_IP6 = struct.Struct("!IHBB")  # ver_tc_flow, payload length, next header, hop limit
_TCP = struct.Struct("!HHIIBBHxxH")  # sport, dport, seq, ack, doff_rsvd, flags, win, (csum), urg
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class TcpFeatures(NamedTuple):
    """Everything p0f's TCP matching and `raw_sig` depend on (and nothing else): the cache key.

    Two packets with equal features get the same fingerprint, whatever their addresses, ports,
    sequence numbers, IP IDs (beyond zero/non-zero) or timestamp values (beyond zero/non-zero).
    """

    synack: bool
    ip_ver: int  # 4 or 6
    ttl: int
    ip_opt_len: int  # bytes of IPv4 options
    tot_hdr: int  # IP header + TCP header bytes (p0f's "MTU (actual size)" window divisor)
    quirks: int  # pyp0f Quirk bits, computed as p0f computes them
    win: int
    mss: int  # 0 without an MSS option
    wscale: int  # 0 without a window scale option
    ts1_set: bool  # timestamp option with a non-zero TSval (p0f then also tries mss-12)
    layout: tuple[int, ...]  # option kinds in order (EOL = 0, unknown kinds as their number)
    eol_pad: int  # bytes after an EOL option
    has_payload: bool


class Endpoints(NamedTuple):
    """Addresses and ports, in the packet's direction (raw address bytes)."""

    src: bytes
    sport: int
    dst: bytes
    dport: int


def parse(packet: bytes) -> tuple[TcpFeatures, Endpoints]:
    """Read a raw IPv4/IPv6 packet (from the IP header on) that must be a SYN or SYN+ACK."""
    packet_len = len(packet)
    if packet_len < MIN_TCP4:
        raise FingerprintError(f"packet too short for IP + TCP headers ({packet_len} bytes)")
    version = packet[0] >> 4
    quirks = 0
    if version == 4:
        ver_hlen, tos, tot_len, ip_id, flags_off, ttl, proto = _IP4.unpack_from(packet)
        hdr_len = (ver_hlen & 0x0F) * 4
        # p0f honours a total length shorter than the capture (Ethernet padding, etherleak).
        packet_len = min(packet_len, tot_len)
        if packet_len < MIN_TCP4:
            raise FingerprintError(f"IPv4 total length {tot_len} too short for IP + TCP headers")
        if hdr_len < 20:
            raise FingerprintError(f"IPv4 header length {hdr_len} is below 20")
        if tot_len > packet_len:
            raise FingerprintError(f"IPv4 total length {tot_len} exceeds the {packet_len} bytes given")
        if hdr_len + 20 > packet_len:
            raise FingerprintError(f"IPv4 header length {hdr_len} leaves no room for TCP")
        if proto != 6:
            raise NotFingerprinted(f"IPv4 protocol {proto} is not TCP")
        if flags_off & 0x3FFF:  # MF or a fragment offset (p0f: anything but DF and MBZ)
            raise NotFingerprinted("IPv4 fragment (MF set or non-zero offset)")
        if tos & 0x03:
            quirks |= Q_ECN
        if flags_off & 0x8000:
            quirks |= Q_NZ_MBZ
        if flags_off & 0x4000:
            quirks |= Q_DF
            if ip_id:
                quirks |= Q_NZ_ID
        elif not ip_id:
            quirks |= Q_ZERO_ID
        ip_opt_len = hdr_len - 20
        src, dst = packet[12:16], packet[16:20]
        tcp_off = hdr_len
    elif version == 6:
        ver_tos, pay_len, next_header, ttl = _IP6.unpack_from(packet)
        tot_len = pay_len + 40
        packet_len = min(packet_len, tot_len)
        if packet_len < MIN_TCP6:
            raise FingerprintError(f"IPv6 packet of {packet_len} bytes too short for IP + TCP headers")
        if tot_len > packet_len:
            raise FingerprintError(f"IPv6 payload length {pay_len} exceeds the bytes given")
        if next_header != 6:
            # Like p0f (process.c: "One day, we may try to parse and skip IPv6 extensions"): no
            # walking of extension headers, and no complaint either.
            raise NotFingerprinted(f"IPv6 next header {next_header} is not TCP (p0f walks no extensions)")
        if ver_tos & 0xFFFFF:
            quirks |= Q_FLOW
        if (ver_tos >> 20) & 0x03:
            quirks |= Q_ECN
        ip_opt_len = 0
        src, dst = packet[8:24], packet[24:40]
        tcp_off = 40
    else:
        raise FingerprintError(f"IP version {version} is neither 4 nor 6")

    tcp_len = packet_len - tcp_off
    sport, dport, seq, ack, doff_rsvd, flags, win, urg = _TCP.unpack_from(packet, tcp_off)
    doff = (doff_rsvd >> 4) * 4
    if doff < 20:
        raise FingerprintError(f"TCP data offset {doff} is below 20")
    if doff > tcp_len:
        raise FingerprintError(f"TCP header length {doff} runs past the end of the packet ({tcp_len})")
    tcp_type = flags & _TYPE_MASK
    if tcp_type == _SYN:
        synack = False
    elif tcp_type == _SYN | _ACK:
        synack = True
    else:
        raise FingerprintError(f"not a SYN or SYN+ACK (TCP flags 0x{flags:02x})")

    if flags & (_ECE | _CWR) or doff_rsvd & 0x01:
        quirks |= Q_ECN
    if not seq:
        quirks |= Q_ZERO_SEQ
    if synack:
        if not ack:
            quirks |= Q_ZERO_ACK
    elif packet[tcp_off + 8] & 0x01:
        # p0f 3.09b: `RD32(tcp->ack) & !(flags & RST)` -- see the module docstring.
        quirks |= Q_NZ_ACK
    if flags & _URG:
        quirks |= Q_URG
    elif urg:
        quirks |= Q_NZ_URG
    if flags & _PSH:
        quirks |= Q_PUSH

    # TCP options, walked exactly as p0f walks them.
    pos = tcp_off + 20
    opt_end = tcp_off + doff
    layout: list[int] = []
    mss = wscale = eol_pad = 0
    ts1_set = False
    while pos < opt_end and len(layout) < MAX_TCP_OPT:
        kind = packet[pos]
        layout.append(kind)
        pos += 1
        if kind == 0:  # EOL: the rest is padding
            eol_pad = opt_end - pos
            while pos < opt_end:
                byte = packet[pos]
                pos += 1
                if byte:
                    break
            if pos != opt_end:
                quirks |= Q_EOL_NZ
                pos = opt_end
        elif kind == 1:  # NOP
            continue
        elif kind == 2:  # MSS
            if pos + 3 > opt_end:
                raise FingerprintError("TCP option MSS runs past the end of the TCP header")
            _check_len(packet[pos], 4, "MSS")
            mss = _U16.unpack_from(packet, pos + 1)[0]
            pos += 3
        elif kind == 3:  # window scale
            if pos + 2 > opt_end:
                raise FingerprintError("TCP option WS runs past the end of the TCP header")
            _check_len(packet[pos], 3, "WS")
            wscale = packet[pos + 1]
            if wscale > 14:
                quirks |= Q_EXWS
            pos += 2
        elif kind == 4:  # SACK permitted
            if pos + 1 > opt_end:
                raise FingerprintError("TCP option SACKOK runs past the end of the TCP header")
            _check_len(packet[pos], 2, "SACKOK")
            pos += 1
        elif kind == 8:  # timestamps
            if pos + 9 > opt_end:
                raise FingerprintError("TCP option TS runs past the end of the TCP header")
            _check_len(packet[pos], 10, "TS")
            ts1 = _U32.unpack_from(packet, pos + 1)[0]
            if ts1:
                ts1_set = True
            else:
                quirks |= Q_ZERO_TS1
            if not synack and _U32.unpack_from(packet, pos + 5)[0]:
                quirks |= Q_NZ_TS2
            pos += 9
        else:  # SACK (5) and unknown kinds: a length byte, then length - 2 bytes
            if pos == opt_end:
                raise FingerprintError(f"TCP option {kind} has no room for its length byte")
            length = packet[pos]
            low, high = (10, 34) if kind == 5 else (2, 40)
            if not low <= length <= high:
                raise FingerprintError(f"TCP option {kind} has invalid length {length}")
            if pos - 1 + length > opt_end:
                raise FingerprintError(f"TCP option {kind} (length {length}) runs past the TCP header")
            pos += length - 1
    if pos != opt_end:
        raise FingerprintError(f"more than {MAX_TCP_OPT} TCP options")

    features = TcpFeatures(
        synack,
        version,
        ttl,
        ip_opt_len,
        tcp_off + doff,
        quirks,
        win,
        mss,
        wscale,
        ts1_set,
        tuple(layout),
        eol_pad,
        packet_len > opt_end,
    )
    return features, Endpoints(src, sport, dst, dport)


def _check_len(length: int, expected: int, name: str) -> None:
    if length != expected:
        raise FingerprintError(f"TCP option {name} has length {length}, expected {expected}")
