#!/usr/bin/env python3
"""Writes the btest trace: darknet handshakes, direct and relayed, as a pcap (Ethernet).

Standard library only, so it runs wherever Zeek and btest run. Checksums are real (Zeek drops TCP
segments with bad ones). Times are small epoch seconds (1000.0 onward) in whole microseconds.

Cases (darknet 198.18.0.0/15 and 2001:db8:ffff::/48; the pytest suite reads CASES too):
  direct      ACK 20 ms after the SYN+ACK
  relayed     two handshakes from one source, ACK 150 ms and 160 ms after the SYN+ACK
  karn        SYN+ACK retransmitted after 1 s, ACK after the second (T^p ambiguous)
  rst         stack-less scanner: option-less SYN (a 60-byte padded frame), RST after 30 ms
  unanswered  SYN+ACK never answered
  ipv6        direct over IPv6, ACK after 40 ms
  outside     a full handshake to an address outside the darknet
  vlan        802.1Q-tagged (VLAN 42), first ACK carries data, 10 ms
  synretx     SYN repeated after 1 s, then answered: the second SYN is the one timed; ACK 25 ms
  nosynack    a SYN the darknet never answered: no handshake at all
  rstack      the SYN+ACK answered with RST+ACK after 40 ms: a RST all the same (Zeek raises
              connection_first_ACK for it before connection_reset)
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field, replace

DLT_EN10MB = 1
MAC_CLIENT = bytes.fromhex("020000000001")
MAC_DARKNET = bytes.fromhex("020000000002")
# MSS, SACK permitted, timestamps, NOP, window scale: a Linux-like SYN (20 bytes).
OPTIONS = struct.pack("!BBH BB BBII B BBB", 2, 4, 1460, 4, 2, 8, 10, 100, 0, 1, 3, 3, 7)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr(text: str) -> bytes:
    if ":" not in text:
        return bytes(int(x) for x in text.split("."))
    head, _, tail = text.partition("::")
    groups = [int(g, 16) for g in head.split(":") if g]
    rest = [int(g, 16) for g in tail.split(":") if g]
    groups += [0] * (8 - len(groups) - len(rest)) + rest
    return struct.pack("!8H", *groups)


@dataclass
class Segment:
    t: float
    src: str
    dst: str
    sport: int
    dport: int
    flags: str
    seq: int
    ack: int = 0
    window: int = 64240
    options: bytes = b""
    payload: bytes = b""
    ttl: int = 64
    vlan: int | None = None

    def tcp(self, pseudo: bytes) -> bytes:
        bits = sum(v for k, v in {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16}.items() if k in self.flags)
        offset = (20 + len(self.options)) // 4
        header = struct.pack(
            "!HHIIBBHHH", self.sport, self.dport, self.seq, self.ack, offset << 4, bits, self.window, 0, 0
        )
        segment = header + self.options + self.payload
        csum = _checksum(pseudo + segment)
        return segment[:16] + struct.pack("!H", csum) + segment[18:]

    def ip(self) -> bytes:
        src, dst = _addr(self.src), _addr(self.dst)
        length = 20 + len(self.options) + len(self.payload)
        if len(src) == 4:
            tcp = self.tcp(src + dst + struct.pack("!BBH", 0, 6, length))
            header = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0x1234, 0x4000, self.ttl, 6, 0, src, dst
            )
            header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
            return header + tcp
        tcp = self.tcp(src + dst + struct.pack("!I3xB", length, 6))
        return struct.pack("!IHBB16s16s", 6 << 28, length, 6, self.ttl, src, dst) + tcp

    def frame(self) -> bytes:
        ip = self.ip()
        ethertype = 0x86DD if ":" in self.src else 0x0800
        to_darknet = self.src.startswith(("203.", "2001:db8::"))
        macs = (MAC_DARKNET + MAC_CLIENT) if to_darknet else (MAC_CLIENT + MAC_DARKNET)
        if self.vlan is None:
            frame = macs + struct.pack("!H", ethertype) + ip
        else:
            frame = macs + struct.pack("!HHH", 0x8100, self.vlan, ethertype) + ip
        return frame.ljust(60, b"\0")  # Ethernet's minimum frame (without FCS) is padded


@dataclass
class Case:
    name: str
    client: str
    server: str
    sport: int
    dport: int
    segments: list[Segment] = field(default_factory=list)


def _handshake(  # noqa: PLR0917 - one positional slot per column of the CASES table
    name: str,
    client: str,
    server: str,
    sport: int,
    dport: int,
    t: float,
    synacks: list[float],
    reply: tuple[str, float] | None,
    *,
    syn_options: bytes = OPTIONS,
    window: int = 64240,
    ttl: int = 50,
    vlan: int | None = None,
    payload: bytes = b"",
) -> Case:
    case = Case(name, client, server, sport, dport)
    seq, srv = 1000 + sport, 5000 + dport
    case.segments.append(
        Segment(t, client, server, sport, dport, "S", seq, 0, window, syn_options, ttl=ttl, vlan=vlan)
    )
    for at in synacks:
        case.segments.append(
            Segment(at, server, client, dport, sport, "SA", srv, seq + 1, 65160, OPTIONS, vlan=vlan)
        )
    if reply is not None:
        kind, at = reply
        flags = {"rst": "R", "rstack": "RA"}.get(kind, "PA" if payload else "A")
        ack = 0 if kind == "rst" else srv + 1
        case.segments.append(
            Segment(
                at,
                client,
                server,
                sport,
                dport,
                flags,
                seq + 1,
                ack,
                502,
                payload=payload,
                ttl=ttl,
                vlan=vlan,
            )
        )
    return case


DARK = "198.18.0.5"
CASES = [
    _handshake("direct", "203.0.113.10", DARK, 40001, 23, 1000.0, [1000.0001], ("ack", 1000.0201)),
    _handshake("relayed", "203.0.113.20", "198.18.0.6", 40010, 22, 1001.0, [1001.0001], ("ack", 1001.1501)),
    _handshake("relayed", "203.0.113.20", "198.18.0.7", 40011, 80, 1002.0, [1002.0001], ("ack", 1002.1601)),
    _handshake("karn", "203.0.113.11", DARK, 40002, 80, 1003.0, [1003.0001, 1004.0001], ("ack", 1004.0501)),
    _handshake(
        "rst",
        "203.0.113.12",
        DARK,
        40003,
        445,
        1005.0,
        [1005.0001],
        ("rst", 1005.0301),
        syn_options=b"",
        window=1024,
    ),
    _handshake("unanswered", "203.0.113.13", DARK, 40004, 22, 1006.0, [1006.0001], None),
    _handshake(
        "ipv6",
        "2001:db8::10",
        "2001:db8:ffff::5",
        40005,
        443,
        1007.0,
        [1007.0001],
        ("ack", 1007.0401),
        ttl=55,
    ),
    _handshake("outside", "203.0.113.30", "192.0.2.1", 40020, 80, 1008.0, [1008.0001], ("ack", 1008.0101)),
    _handshake(
        "vlan",
        "203.0.113.14",
        DARK,
        40006,
        8080,
        1009.0,
        [1009.0001],
        ("ack", 1009.0101),
        vlan=42,
        payload=b"GET / HTTP/1.0\r\n\r\n",
    ),
    _handshake("synretx", "203.0.113.15", DARK, 40007, 3389, 1010.0, [1011.0001], ("ack", 1011.0251)),
    _handshake("nosynack", "203.0.113.16", DARK, 40008, 25, 1012.0, [], None),
    _handshake("rstack", "203.0.113.17", DARK, 40009, 139, 1013.0, [1013.0001], ("rstack", 1013.0401)),
]
_retx = CASES[-3].segments
_retx.insert(1, replace(_retx[0], t=1011.0))  # the same SYN (same sequence number) again


def packets() -> list[tuple[float, bytes]]:
    """Every frame of every case, in time order."""
    out = [(s.t, s.frame()) for case in CASES for s in case.segments]
    return sorted(out, key=lambda p: p[0])


def write_frames(path: str, frames: list[tuple[float, bytes]]) -> int:
    """A pcap (Ethernet, microsecond times) of (time, frame) pairs in the order given."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, DLT_EN10MB))
        for t, frame in frames:
            us = round(t * 1_000_000)
            f.write(struct.pack("<IIII", us // 1_000_000, us % 1_000_000, len(frame), len(frame)))
            f.write(frame)
    return len(frames)


def write(path: str) -> int:
    return write_frames(path, packets())


if __name__ == "__main__":
    n = write(sys.argv[1] if len(sys.argv) > 1 else "handshakes.pcap")
    print(n, "packets")
