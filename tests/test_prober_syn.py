"""The SYN probe's shape (what the probed host and p0f see) and the ping statistics, without
sending anything."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from osfp.checksum import internet_checksum as checksum
from osfp.fingerprinter import Fingerprinter
from prober.ping import PingStats
from prober.syn import SynOutcome, SynProber, _Probe, syn_segment


def ipv4(src: str, dst: str, segment: bytes) -> bytes:
    # What the kernel puts in front of our segment: TTL 64, DF, a non-zero ID.
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0x1234, 0x4000, 64, 6, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + segment


def ipv6(src: str, dst: str, segment: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(segment), 6, 64, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed) + segment


@given(sport=st.integers(1024, 65535), dport=st.integers(1, 65535), seq=st.integers(0, 2**32 - 1),
       tsval=st.integers(0, 2**32 - 1))
def test_syn_checksum_and_options_as_scapy_reads_them(sport: int, dport: int, seq: int, tsval: int) -> None:
    packet = IP(ipv4("198.18.0.1", "198.18.7.9", syn_segment("198.18.0.1", "198.18.7.9", sport, dport,
                                                             seq=seq, tsval=tsval)))
    tcp = packet[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags) == (sport, dport, seq, 0, "S")
    assert tcp.options == [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval, 0)), ("NOP", None),
                           ("WScale", 7)]
    sent = tcp.chksum
    del tcp.chksum
    assert IP(bytes(packet))[TCP].chksum == sent  # scapy's own computation agrees


def test_ipv6_syn_checksum() -> None:
    packet = IPv6(ipv6("fd00::1", "2001:db8::2", syn_segment("fd00::1", "2001:db8::2", 40000, 443,
                                                             seq=7, tsval=9)))
    sent = packet[TCP].chksum
    del packet[TCP].chksum
    assert IPv6(bytes(packet))[TCP].chksum == sent
    assert packet[TCP].options[0] == ("MSS", 1440) and packet[TCP].window == 64800


@pytest.mark.parametrize("family", [4, 6])
def test_our_syn_looks_like_linux_to_p0f(family: int) -> None:
    # A realistic SYN: the probed host answers it like a connection from a Linux client.
    if family == 4:
        packet = ipv4("198.18.0.1", "198.18.0.2", syn_segment("198.18.0.1", "198.18.0.2", 40000, 80,
                                                               seq=1, tsval=2))
    else:
        packet = ipv6("fd00::1", "fd00::2", syn_segment("fd00::1", "fd00::2", 40000, 80, seq=1, tsval=2))
    fp = Fingerprinter().fingerprint(packet)
    assert fp.label is not None and fp.label.startswith("unix:Linux:") and not fp.generic, fp
    assert ":mss,sok,ts,nop,ws:" in fp.sig


def test_ping_statistics() -> None:
    stats = PingStats(sent=5, rtts_us=(1000.0, 2000.0, 3000.0, 4000.4))
    assert (stats.min_us, stats.max_us, stats.avg_us) == (1000, 4000, 2500)
    assert stats.loss == pytest.approx(0.2)
    mean = (1000 + 2000 + 3000 + 4000.4) / 4
    assert stats.var_us2 == pytest.approx(sum((x - mean) ** 2 for x in stats.rtts_us) / 4)
    one = PingStats(sent=3, rtts_us=(500.0,))
    assert one.var_us2 == 0.0 and one.loss == pytest.approx(2 / 3)
    none = PingStats(sent=5, rtts_us=())
    assert (none.min_us, none.avg_us, none.max_us, none.var_us2, none.loss) == (None, None, None, None, 1.0)


@pytest.mark.parametrize(("stamp_offset", "expected"), [(0.002, 2000), (-0.5, None)])
async def test_synack_rtt_is_never_negative(stamp_offset: float, expected: int | None) -> None:
    engine = SynProber()  # not opened: _handle is fed a captured SYN+ACK directly
    sent_at = 1_000_000.0
    probe = _Probe(seq=41, sent_at={80: sent_at}, outcome=SynOutcome(),
                   done=asyncio.get_running_loop().create_future())
    engine._waiting[("192.0.2.9", 40000)] = probe
    synack = bytes(IP(src="192.0.2.9", dst="192.0.2.1") / TCP(sport=80, dport=40000, flags="SA", ack=42))
    engine._handle(synack, sent_at + stamp_offset)  # a clock step back gives a stamp before the send
    assert probe.outcome.synack_port == 80 and probe.done.done()
    assert probe.outcome.rtt_us == expected
