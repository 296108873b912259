#!/usr/bin/env python3
"""Copies an Ethernet pcap, tagging every untagged IPv4 frame with VLANs (standard library only).

usage: vlan-tag.py IN OUT

The frame's server is the address in 136.159.0.0/16 (Traces/vnc-scanner.pcap's servers). Servers
whose last octet is even get one 802.1Q tag (VLAN 1411); odd ones get two, 802.1ad outer VLAN 100
and 802.1Q inner VLAN 1411 (QinQ). IP and TCP bytes are untouched, so checksums stay right.
"""

from __future__ import annotations

import struct
import sys

SERVERS = bytes((136, 159))


def tag(frame: bytes) -> bytes:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    src, dst = frame[26:30], frame[30:34]
    server = dst if dst[:2] == SERVERS else src
    if server[3] % 2 == 0:
        tags = struct.pack("!HH", 0x8100, 1411)
    else:
        tags = struct.pack("!HHHH", 0x88A8, 100, 0x8100, 1411)
    return frame[:12] + tags + frame[12:]


def main(src: str, dst: str) -> int:
    with open(src, "rb") as f:
        data = f.read()
    magic, major, minor, zone, sigfigs, snaplen, dlt = struct.unpack_from("<IHHiIII", data)
    if magic != 0xA1B2C3D4 or dlt != 1:
        print(f"vlan-tag.py: {src} is not a little-endian microsecond Ethernet pcap", file=sys.stderr)
        return 2
    out = [struct.pack("<IHHiIII", magic, major, minor, zone, sigfigs, snaplen + 8, dlt)]
    offset, n = 24, 0
    while offset < len(data):
        sec, usec, caplen, origlen = struct.unpack_from("<IIII", data, offset)
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        tagged = tag(frame)
        grown = len(tagged) - len(frame)
        out.append(struct.pack("<IIII", sec, usec, caplen + grown, origlen + grown) + tagged)
        n += 1
    with open(dst, "wb") as f:
        f.write(b"".join(out))
    print(n, "frames")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
