"""The capture reader and the link-layer / header decoding."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from capfiles import (
    Conn,
    ethernet,
    ip_packet,
    null,
    pcap_bytes,
    pcapng_epb,
    pcapng_idb,
    pcapng_shb,
    pcapng_spb,
    sll,
    sll2,
    write_pcap,
)
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether

from analyzer.capture import read_capture
from analyzer.packet import (
    ACK,
    SYN,
    NotTCPError,
    PacketError,
    ip_from_frame,
    tcp_header,
)

V4 = Conn("203.0.113.7", "198.18.0.9", 41000, 22, isn=77, server_isn=99)
V6 = Conn("2001:db8::7", "2001:db8:ffff::9", 41001, 443, isn=88, server_isn=111)


@pytest.mark.parametrize("nano", [False, True])
@pytest.mark.parametrize("order", ["<", ">"])
def test_pcap_byte_orders_and_resolutions(tmp_path: Path, nano: bool, order: str) -> None:
    syn = V4.syn()
    ts = 1_700_000_000_123_456_789
    path = write_pcap(tmp_path / "a.pcap", [(ts, ethernet(syn)), (ts + 1000, ethernet(V4.synack()))],
                      nano=nano, order=order)
    frames = list(read_capture(path))
    assert [f[0] for f in frames] == [1, 2]
    # Microsecond files keep microseconds: the nanoseconds are truncated, not rounded.
    assert frames[0][1] == (ts if nano else 1_700_000_000_123_456_000)
    assert frames[1][1] == (ts + 1000 if nano else 1_700_000_000_123_457_000)
    assert frames[0][2] == 1
    assert ip_from_frame(1, frames[0][3]) == syn  # Ethernet padding trimmed: exactly the IP packet


def test_pcap_linktype_fcs_bits_are_ignored(tmp_path: Path) -> None:
    data = bytearray(pcap_bytes([(0, ethernet(V4.syn()))]))
    data[20:24] = (1 | 0x1 << 28 | 0x4 << 26).to_bytes(4, "little")  # FCS present, 4 bytes
    path = tmp_path / "fcs.pcap"
    path.write_bytes(bytes(data))
    assert next(iter(read_capture(path)))[2] == 1


def test_pcapng_interfaces_resolutions_and_blocks(tmp_path: Path) -> None:
    syn, synack = V4.syn(), V4.synack()
    ip6 = V6.syn()
    data = (
        pcapng_shb()
        + pcapng_idb(1)  # interface 0: Ethernet, default microseconds
        + pcapng_idb(101, tsresol=9)  # interface 1: raw IP, nanoseconds
        + pcapng_idb(113, tsresol=0x80 | 10)  # interface 2: SLL, 2^-10 s
        + pcapng_epb(0, 1_700_000_000_000_001, ethernet(syn))
        + pcapng_epb(1, 1_700_000_000_000_002_345, synack)
        + pcapng_epb(2, 1024 * 5 + 512, sll(ip6))
        + pcapng_spb(ethernet(syn))
    )
    path = tmp_path / "a.pcapng"
    path.write_bytes(data)
    frames = list(read_capture(path))
    assert [(n, ts, lt) for n, ts, lt, _, _ in frames] == [
        (1, 1_700_000_000_000_001_000, 1),
        (2, 1_700_000_000_000_002_345, 101),
        (3, 5_500_000_000, 113),
        (4, 0, 1),  # simple packet blocks carry no timestamp
    ]
    assert ip_from_frame(1, frames[0][3]) == syn
    assert ip_from_frame(101, frames[1][3]) == synack
    assert ip_from_frame(113, frames[2][3]) == ip6
    assert ip_from_frame(1, frames[3][3]) == syn


def test_pcapng_big_endian_and_second_section(tmp_path: Path) -> None:
    syn = V4.syn()
    data = (
        pcapng_shb(">") + pcapng_idb(101, order=">") + pcapng_epb(0, 7_000_000, syn, order=">")
        # A new section resets interfaces and byte order.
        + pcapng_shb("<") + pcapng_idb(1) + pcapng_epb(0, 8_000_000, ethernet(syn))
    )
    path = tmp_path / "be.pcapng"
    path.write_bytes(data)
    frames = list(read_capture(path))
    assert [(n, ts, lt) for n, ts, lt, _, _ in frames] == [(1, 7_000_000_000, 101), (2, 8_000_000_000, 1)]


@pytest.mark.parametrize(
    ("linktype", "wrap"),
    [
        (1, ethernet),
        (1, lambda ip: ethernet(ip, vlans=[100])),
        (1, lambda ip: ethernet(ip, vlans=[100, 200], tpid=0x88A8)),  # 802.1ad QinQ
        (1, lambda ip: ethernet(ip, vlans=[5, 6, 7])),
        (113, sll),
        (276, sll2),
        (101, lambda ip: ip),
        (12, lambda ip: ip),
        (14, lambda ip: ip),
        (0, lambda ip: null(ip, "<")),
        (0, lambda ip: null(ip, ">")),
        (108, lambda ip: null(ip, ">")),
    ],
)
@pytest.mark.parametrize("conn", [V4, V6], ids=["v4", "v6"])
def test_ip_from_frame_link_types(linktype: int, wrap: object, conn: Conn) -> None:
    ip = conn.syn()
    assert ip_from_frame(linktype, wrap(ip)) == ip  # type: ignore[operator]


def test_ip_from_frame_raw_v4_v6_link_types() -> None:
    assert ip_from_frame(228, V4.syn()) == V4.syn()
    assert ip_from_frame(229, V6.syn()) == V6.syn()


def test_ip_from_frame_not_ip_and_bad_frames() -> None:
    arp = bytes(Ether() / ARP())
    with pytest.raises(NotTCPError) as info:
        ip_from_frame(1, arp)
    assert info.value.reason == "not-ip"
    with pytest.raises(PacketError, match="truncated"):
        ip_from_frame(1, b"\x00" * 10)
    with pytest.raises(PacketError, match="VLAN"):
        ip_from_frame(1, b"\x00" * 12 + b"\x81\x00\x00")
    with pytest.raises(PacketError, match="link-layer type 147"):
        ip_from_frame(147, V4.syn())
    with pytest.raises(PacketError, match="IP version 5"):
        ip_from_frame(101, b"\x50" + bytes(39))
    with pytest.raises(PacketError, match="SLL"):
        ip_from_frame(113, b"\x00" * 15)


def test_tcp_header_fields() -> None:
    h = tcp_header(V4.synack())
    assert socket.inet_ntoa(h.src) == "198.18.0.9"
    assert socket.inet_ntoa(h.dst) == "203.0.113.7"
    assert (h.sport, h.dport, h.seq, h.ack) == (22, 41000, 99, 78)
    assert h.flags & SYN and h.flags & ACK
    assert h.tcp_offset == 20
    assert h.tcp_length == 20 + 20  # the five options pad to 20 bytes
    h6 = tcp_header(V6.syn())
    assert socket.inet_ntop(socket.AF_INET6, h6.src) == "2001:db8::7"
    assert h6.tcp_offset == 40


def test_tcp_header_ipv6_extension_headers() -> None:
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2")
    ip = bytes(v6 / IPv6ExtHdrHopByHop() / TCP(sport=1, dport=2, flags="S"))
    h = tcp_header(ip)
    assert (h.sport, h.dport, h.tcp_offset) == (1, 2, 48)


def test_tcp_header_skips_fragments_and_other_protocols() -> None:
    first_fragment = bytes(IP(src="1.2.3.4", dst="5.6.7.8", flags="MF") / TCP(flags="S"))
    later_fragment = bytes(IP(src="1.2.3.4", dst="5.6.7.8", frag=3) / TCP(flags="S"))
    v6_fragment = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment() / TCP(flags="S"))
    for packet in (first_fragment, later_fragment, v6_fragment):
        with pytest.raises(NotTCPError) as info:
            tcp_header(packet)
        assert info.value.reason == "fragment"
    for packet in (bytes(IP() / UDP()), bytes(IPv6() / UDP())):
        with pytest.raises(NotTCPError) as info:
            tcp_header(packet)
        assert info.value.reason == "not-tcp"


def test_tcp_header_malformed() -> None:
    syn = bytearray(V4.syn())
    with pytest.raises(PacketError, match="truncated"):
        tcp_header(bytes(syn[:30]))
    bad_ihl = bytearray(syn)
    bad_ihl[0] = 0x44
    with pytest.raises(PacketError, match="below 20"):
        tcp_header(bytes(bad_ihl))
    bad_offset = bytearray(syn)
    bad_offset[20 + 12] = 0x40  # data offset 16 bytes
    with pytest.raises(PacketError, match="data offset 16"):
        tcp_header(bytes(bad_offset))
    short_total = bytearray(syn)
    short_total[2:4] = (12).to_bytes(2, "big")
    with pytest.raises(PacketError, match="total length 12"):
        tcp_header(bytes(short_total))


def test_tcp_header_options_running_past_the_packet_still_track() -> None:
    # Real scanner SYNs claim options the packet does not hold (shared/data/captures/scan-ng):
    # the fixed header is enough to track the connection.
    ip = bytearray(ip_packet("1.2.3.4", "5.6.7.8", 1, 2, "S", options=[]))
    ip[32] = 0x60  # data offset 24, packet has 20
    h = tcp_header(bytes(ip))
    assert h.tcp_length == 24 and h.flags == SYN
