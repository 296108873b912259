"""The Internet checksum (RFC 1071) and the TCP checksum over its IPv4/IPv6 pseudo-header.

Shared by everything that writes packets: the prober's SYNs, the responder putting a redirected
SYN back as the client sent it, and the crafted packets of the tests and benches.
"""

from __future__ import annotations

import struct

TCP = 6


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """Checksum of a TCP segment (its checksum field zeroed) between two packed addresses; the
    pseudo-header's layout follows the address size (4 bytes: RFC 793, 16 bytes: RFC 8200)."""
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!xBH", TCP, len(segment))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), TCP)
    return internet_checksum(pseudo + segment)
