#!/usr/bin/env python3
"""Writes the tunnel btest trace: mkpcap's "direct" handshake carried inside IP-in-IP (outer
192.0.2.100 <-> 192.0.2.200, protocol 4), which Zeek decapsulates. Standard library only."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkpcap

OUTER = {True: (mkpcap._addr("192.0.2.100"), mkpcap._addr("192.0.2.200")),
         False: (mkpcap._addr("192.0.2.200"), mkpcap._addr("192.0.2.100"))}


def tunnelled(segment: mkpcap.Segment) -> bytes:
    inner = segment.ip()
    to_darknet = segment.src.startswith("203.")
    src, dst = OUTER[to_darknet]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(inner), 0x4321, 0x4000, 64, 4, 0, src, dst)
    header = header[:10] + struct.pack("!H", mkpcap._checksum(header)) + header[12:]
    client, darknet = mkpcap.MAC_CLIENT, mkpcap.MAC_DARKNET
    macs = (darknet + client) if to_darknet else (client + darknet)
    return macs + struct.pack("!H", 0x0800) + header + inner


def main(path: str) -> None:
    (case,) = [c for c in mkpcap.CASES if c.name == "direct"]
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, mkpcap.DLT_EN10MB))
        for s in case.segments:
            frame = tunnelled(s)
            us = round(s.t * 1_000_000)
            f.write(struct.pack("<IIII", us // 1_000_000, us % 1_000_000, len(frame), len(frame)))
            f.write(frame)


if __name__ == "__main__":
    main(sys.argv[1])
