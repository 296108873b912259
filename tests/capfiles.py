"""Capture files for the analyzer tests: packets built with scapy, files written byte by byte.

Writing the files ourselves (not with scapy's wrpcap) lets the tests choose every detail the
reader must cope with: byte order, time resolution, link type, pcapng blocks, corruption.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)), ("NOP", None), ("WScale", 7)]

Packet = tuple[int, bytes]  # (timestamp ns, IP packet)


def ip_packet(src: str, dst: str, sport: int, dport: int, flags: str, *, seq: int = 0, ack: int = 0,
              options: list | None = None, payload: bytes = b"", ttl: int = 64) -> bytes:
    """One TCP/IP packet (IPv4 or IPv6 by the address) as raw bytes, checksums filled in."""
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240,
              options=options if options is not None else (OPTS if "S" in flags else []))
    layer = IPv6(src=src, dst=dst, hlim=ttl) if ":" in src else IP(src=src, dst=dst, ttl=ttl, flags="DF")
    return bytes(layer / tcp / payload) if payload else bytes(layer / tcp)


class Conn:
    """Packets of one client <-> darknet connection, with consistent sequence numbers."""

    def __init__(self, client: str, darknet: str, sport: int = 40000, dport: int = 23, *,
                 isn: int = 1000, server_isn: int = 5000) -> None:
        self.client, self.darknet, self.sport, self.dport = client, darknet, sport, dport
        self.isn, self.server_isn = isn, server_isn

    def syn(self, seq: int | None = None, **kw: object) -> bytes:
        return ip_packet(self.client, self.darknet, self.sport, self.dport, "S",
                         seq=self.isn if seq is None else seq, **kw)  # type: ignore[arg-type]

    def synack(self, ack: int | None = None) -> bytes:
        return ip_packet(self.darknet, self.client, self.dport, self.sport, "SA", seq=self.server_isn,
                         ack=self.isn + 1 if ack is None else ack)

    def ack(self, payload: bytes = b"") -> bytes:
        return ip_packet(self.client, self.darknet, self.sport, self.dport, "PA" if payload else "A",
                         seq=self.isn + 1, ack=self.server_isn + 1, payload=payload)

    def rst(self) -> bytes:
        return ip_packet(self.client, self.darknet, self.sport, self.dport, "R", seq=self.isn + 1)


# Link layers: frame = header + IP packet.
def ethernet(ip: bytes, vlans: Sequence[int] = (), tpid: int = 0x8100, pad: bool = True) -> bytes:
    ethertype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    header = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
    for i, vid in enumerate(vlans):
        # Outer tag uses `tpid` (802.1ad S-tag when 0x88a8), inner ones 802.1Q.
        header += struct.pack("!HH", tpid if i == 0 else 0x8100, vid)
    frame = header + struct.pack("!H", ethertype) + ip
    if pad and len(frame) < 60:
        frame += b"\x00" * (60 - len(frame))  # Ethernet minimum frame size, as NICs pad
    return frame


def sll(ip: bytes) -> bytes:
    proto = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", proto) + ip


def sll2(ip: bytes) -> bytes:
    proto = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00") + ip


def null(ip: bytes, order: str = "<") -> bytes:
    family = 30 if ip[0] >> 4 == 6 else 2
    return struct.pack(order + "I", family) + ip


# Files.
def pcap_bytes(frames: Sequence[tuple[int, bytes]], linktype: int = 1, *, nano: bool = False,
               order: str = "<", snaplen: int = 65535) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for ts_ns, frame in frames:
        sec, frac = divmod(ts_ns, 1_000_000_000)
        if not nano:
            frac //= 1000
        out.append(struct.pack(order + "IIII", sec, frac, len(frame), len(frame)) + frame)
    return b"".join(out)


def write_pcap(path: Path, frames: Sequence[tuple[int, bytes]], linktype: int = 1, **kw: object) -> Path:
    path.write_bytes(pcap_bytes(frames, linktype, **kw))  # type: ignore[arg-type]
    return path


def _block(block_type: int, body: bytes, order: str = "<") -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def pcapng_shb(order: str = "<") -> bytes:
    return _block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def pcapng_idb(linktype: int, tsresol: int | None = None, order: str = "<") -> bytes:
    options = b""
    if tsresol is not None:
        options = struct.pack(order + "HH", 9, 1) + bytes((tsresol,)) + b"\x00\x00\x00"
        options += struct.pack(order + "HH", 0, 0)
    return _block(1, struct.pack(order + "HHI", linktype, 0, 0) + options, order)


def pcapng_epb(iface: int, ts_units: int, frame: bytes, order: str = "<") -> bytes:
    body = struct.pack(order + "IIIII", iface, ts_units >> 32, ts_units & 0xFFFFFFFF, len(frame), len(frame))
    return _block(6, body + frame, order)


def pcapng_spb(frame: bytes, order: str = "<") -> bytes:
    return _block(3, struct.pack(order + "I", len(frame)) + frame, order)


def handshake_cases(client_base: str = "203.0.113.", darknet: str = "198.18.0.5") -> list[Packet]:
    """The six cases of shared/zeek-ws/handshakes-mkpcap.py, written by us (times in ns).

    direct (T^p 20 ms), SYN+ACK retransmitted (ambiguous), RST reply (30 ms), unanswered,
    IPv6 (40 ms), first ACK carrying data (10 ms).
    """
    s = 1_000_000_000
    us = 1_000
    c1 = Conn(client_base + "10", darknet, 40001, 23, isn=1000, server_isn=5000)
    c2 = Conn(client_base + "11", darknet, 40002, 80, isn=2000, server_isn=6000)
    c3 = Conn(client_base + "12", darknet, 40003, 445, isn=3000, server_isn=7000)
    c4 = Conn(client_base + "13", darknet, 40004, 22, isn=4000, server_isn=8000)
    c6 = Conn("2001:db8::10", "2001:db8:ffff::5", 40005, 443, isn=9000, server_isn=9500)
    c5 = Conn(client_base + "14", darknet, 40006, 8080, isn=100, server_isn=200)
    return [
        (1000 * s, c1.syn()), (1000 * s + 100 * us, c1.synack()), (1000 * s + 20_100 * us, c1.ack()),
        (1001 * s, c2.syn()), (1001 * s + 100 * us, c2.synack()), (1002 * s + 100 * us, c2.synack()),
        (1002 * s + 50_100 * us, c2.ack()),
        (1003 * s, c3.syn(options=[])), (1003 * s + 100 * us, c3.synack()),
        (1003 * s + 30_100 * us, c3.rst()),
        (1004 * s, c4.syn()), (1004 * s + 100 * us, c4.synack()),
        (1005 * s, c6.syn()), (1005 * s + 100 * us, c6.synack()), (1005 * s + 40_100 * us, c6.ack()),
        (1006 * s, c5.syn()), (1006 * s + 100 * us, c5.synack()),
        (1006 * s + 10_100 * us, c5.ack(b"GET / HTTP/1.0\r\n\r\n")),
    ]
