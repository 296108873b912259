"""Link layer -> IP packet, and a fast IPv4/IPv6 + TCP header decode, all with `struct`.

`ip_from_frame` is public: the capture reader, the Zeek feed (which receives the raw frame Zeek saw)
and any live source use it to find the IP header. `tcp_header` is the tracker's hot path: no scapy,
no objects beyond one tuple per packet.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

# Link-layer header types (tcpdump.org/linktypes.html). Several raw-IP values exist because
# BSDs and Linux disagreed on DLT_RAW: 12 and 14 are "raw IP" on some systems, 101 everywhere.
DLT_NULL = 0
DLT_EN10MB = 1
DLT_RAW_12 = 12
DLT_RAW_14 = 14
DLT_LOOP = 108
DLT_RAW = 101
DLT_LINUX_SLL = 113
DLT_IPV4 = 228
DLT_IPV6 = 229
DLT_LINUX_SLL2 = 276

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))  # 802.1Q, 802.1ad, pre-standard QinQ

# Address families a DLT_NULL / DLT_LOOP header may carry for IPv6 (Linux, BSDs, Darwin differ).
AF_INET = 2
AF_INET6 = frozenset((10, 24, 28, 30))

PROTO_TCP = 6
# IPv6 extension headers we step over to find TCP (RFC 8200 order), and the fragment header.
_IPV6_EXT = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

# TCP flag bits.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

_U16 = struct.Struct("!H")
_U32_LE = struct.Struct("<I")
_U32_BE = struct.Struct("!I")
_TCP = struct.Struct("!HHIIBB")  # sport, dport, seq, ack, data offset byte, flags byte


class PacketError(ValueError):
    """A frame or packet that is malformed (truncated header, impossible length)."""


class UnsupportedLinkError(PacketError):
    """A link-layer type we cannot decode: a property of the whole capture, not of one packet."""


class NotTCPError(PacketError):
    """A well-formed frame that is simply not something we track: not IP, not TCP, or a fragment.

    `reason` is one of "not-ip", "not-tcp", "fragment": callers count these, they are not errors.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def ip_from_frame(linktype: int, frame: bytes) -> bytes:
    """The IP packet (IPv4 or IPv6 header onward) inside one captured frame.

    `linktype` is the pcap LINKTYPE/DLT number: Ethernet (1, any number of stacked 802.1Q/802.1ad
    tags), Linux cooked v1 (113) and v2 (276), raw IP (101, 12, 14, 228, 229), BSD loopback NULL (0,
    host byte order) and LOOP (108, network byte order). Trailing bytes beyond the IP total length
    (Ethernet padding to 60 bytes, a frame check sequence) are cut off, so the result is exactly
    the IP packet as far as it was captured.

    Raises `NotTCPError("not-ip", ...)` for a well-formed frame that carries something else (ARP,
    LLDP), `PacketError` for a truncated link layer, `UnsupportedLinkError` for an unknown one.
    """
    if linktype == DLT_EN10MB:
        if len(frame) < 14:
            raise PacketError(f"Ethernet frame of {len(frame)} bytes is truncated")
        ethertype = (frame[12] << 8) | frame[13]
        offset = 14
        while ethertype in ETH_VLAN:
            if len(frame) < offset + 4:
                raise PacketError("VLAN tag is truncated")
            ethertype = (frame[offset + 2] << 8) | frame[offset + 3]
            offset += 4
        return _ethertype_payload(ethertype, frame, offset)
    if linktype in (DLT_RAW, DLT_RAW_12, DLT_RAW_14, DLT_IPV4, DLT_IPV6):
        return _trim(frame, 0)
    if linktype == DLT_LINUX_SLL:
        if len(frame) < 16:
            raise PacketError(f"Linux cooked (SLL) header of {len(frame)} bytes is truncated")
        return _ethertype_payload((frame[14] << 8) | frame[15], frame, 16)
    if linktype == DLT_LINUX_SLL2:
        if len(frame) < 20:
            raise PacketError(f"Linux cooked (SLL2) header of {len(frame)} bytes is truncated")
        return _ethertype_payload((frame[0] << 8) | frame[1], frame, 20)
    if linktype in (DLT_NULL, DLT_LOOP):
        if len(frame) < 4:
            raise PacketError("loopback header is truncated")
        if linktype == DLT_LOOP:
            family = _U32_BE.unpack_from(frame)[0]
        else:
            # Host byte order of the machine that wrote the file: accept either.
            family = _U32_LE.unpack_from(frame)[0]
            if family > 0xFFFF:
                family = _U32_BE.unpack_from(frame)[0]
        if family == AF_INET or family in AF_INET6:
            return _trim(frame, 4)
        raise NotTCPError("not-ip", f"loopback frame of address family {family}")
    raise UnsupportedLinkError(f"unsupported link-layer type {linktype}")


def _ethertype_payload(ethertype: int, frame: bytes, offset: int) -> bytes:
    if ethertype in (ETH_IPV4, ETH_IPV6):
        return _trim(frame, offset)
    raise NotTCPError("not-ip", f"ethertype 0x{ethertype:04x} is not IP")


def _trim(frame: bytes, offset: int) -> bytes:
    """frame[offset:] cut to the IP total length (padding and FCS dropped)."""
    if len(frame) <= offset:
        raise PacketError("no IP header after the link layer")
    version = frame[offset] >> 4
    if version == 4:
        if len(frame) >= offset + 4:
            total = (frame[offset + 2] << 8) | frame[offset + 3]
            # Total length 0 happens with TCP segmentation offload: keep what was captured.
            if 20 <= total < len(frame) - offset:
                return frame[offset : offset + total]
    elif version == 6:
        if len(frame) >= offset + 6:
            payload = (frame[offset + 4] << 8) | frame[offset + 5]
            total = 40 + payload
            # Payload length 0 with more bytes: a jumbogram or segmentation offload; keep them.
            if payload and total < len(frame) - offset:
                return frame[offset : offset + total]
    else:
        raise PacketError(f"IP version {version} after the link layer")
    return frame[offset:] if offset else frame


class TcpHeader(NamedTuple):
    """What the tracker needs from one TCP segment. Addresses stay packed bytes (4 or 16)."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int  # the low 8 flag bits (FIN .. CWR)
    tcp_offset: int  # where the TCP header starts in the IP packet
    tcp_length: int  # declared TCP header length in bytes (data offset * 4); may exceed the packet


def tcp_header(ip: bytes) -> TcpHeader:
    """Decode the IP and TCP headers of one IP packet.

    Raises `NotTCPError` ("not-tcp", "fragment") for packets that are not a TCP segment we can read
    whole: any IPv4 fragment (MF set or offset non-zero: the first fragment of a SYN is too rare
    to be worth reassembly, and p0f skips them too) or IPv6 with a fragment header. Raises
    `PacketError` for truncated IP headers, a TCP header shorter than its fixed 20 bytes, and
    impossible length fields.

    A data offset reaching past the end of the packet (options cut off, or lying about their
    length — real scanners send such SYNs) is not an error here: tracking needs only the fixed
    header. `tcp_length` is the declared length; the fingerprinter judges the options.
    """
    n = len(ip)
    if n < 20:
        raise PacketError(f"IP packet of {n} bytes is truncated")
    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ihl < 20:
            raise PacketError(f"IPv4 header length {ihl} is below 20")
        if n < ihl:
            raise PacketError(f"IPv4 header of {ihl} bytes is truncated at {n}")
        total = (ip[2] << 8) | ip[3]
        if total and total < ihl:
            raise PacketError(f"IPv4 total length {total} is shorter than its header ({ihl})")
        if ip[9] != PROTO_TCP:
            raise NotTCPError("not-tcp", f"IP protocol {ip[9]}")
        if ((ip[6] << 8) | ip[7]) & 0x3FFF:
            raise NotTCPError("fragment", "IPv4 fragment")
        src = ip[12:16]
        dst = ip[16:20]
        offset = ihl
    elif version == 6:
        if n < 40:
            raise PacketError(f"IPv6 packet of {n} bytes is truncated")
        nxt = ip[6]
        offset = 40
        while nxt != PROTO_TCP:
            if nxt == _IPV6_FRAGMENT:
                raise NotTCPError("fragment", "IPv6 fragment")
            if nxt in _IPV6_EXT or nxt == _IPV6_AH:
                if n < offset + 2:
                    raise PacketError("IPv6 extension header is truncated")
                size = (ip[offset + 1] + 2) * 4 if nxt == _IPV6_AH else (ip[offset + 1] + 1) * 8
                nxt = ip[offset]
                offset += size
                continue
            raise NotTCPError("not-tcp", f"IPv6 next header {nxt}")
        src = ip[8:24]
        dst = ip[24:40]
    else:
        raise PacketError(f"IP version {version}")
    if n < offset + 20:
        raise PacketError(f"TCP header is truncated ({n - offset} of 20 bytes)")
    sport, dport, seq, ack, off_byte, flags = _TCP.unpack_from(ip, offset)
    tcp_length = (off_byte >> 4) * 4
    if tcp_length < 20:
        raise PacketError(f"TCP data offset {tcp_length} is below 20")
    return TcpHeader(src, dst, sport, dport, seq, ack, flags, offset, tcp_length)


def address_text(packed: bytes) -> str:
    """A packed IPv4/IPv6 address as text, exactly as `str(ipaddress.ip_address(...))` writes it.

    The project compares addresses as text (records, probe results, Redis fields, all normalised
    by `ipaddress`), so the forms must agree. inet_ntop is faster and agrees for IPv4; for IPv6 it
    writes IPv4-mapped and -compatible addresses dotted (`::ffff:1.2.3.4`) where this Python's
    `ipaddress` does not, so IPv6 goes through `ipaddress`.
    """
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    return str(ipaddress.IPv6Address(packed))
