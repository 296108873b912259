"""Header parsing: what p0f reads from a packet, and clear errors for what it cannot read."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osfp import Fingerprinter, FingerprintError
from osfp.craft import Shape, build
from osfp.packet import parse

LINUX = Shape()  # mss,sok,ts,nop,ws; df,id+
OPT = 40  # first option byte of an IPv4 packet without IP options
_SHARED = Fingerprinter()


@pytest.fixture(scope="module")
def fp() -> Fingerprinter:
    return Fingerprinter()


def _set(packet: bytes, offset: int, value: int) -> bytes:
    b = bytearray(packet)
    b[offset] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"", "too short"),
        (build(LINUX)[:39], "too short"),
        (build(LINUX)[:50], "exceeds"),  # IPv4 total length says 60
        (build(replace(LINUX, ip_ver=6), src="2001:db8::1", dst="2001:db8::2")[:70], "exceeds"),
        (_set(build(LINUX), 0, 0x44), "below 20"),  # IHL 4
        (_set(build(LINUX), 0, 0x4F), "no room for TCP"),  # IHL 15 = 60 bytes of IP header
        (_set(build(LINUX), 9, 17), "not TCP"),
        (_set(build(LINUX), 6, 0x60), "fragment"),  # DF + MF
        (_set(build(LINUX), 0, 0x55), "neither 4 nor 6"),
        (_set(build(LINUX), 32, 0x40), "below 20"),  # TCP data offset 4 words
        (_set(build(LINUX), 32, 0xF0), "past the end"),  # TCP data offset 60 bytes
        (_set(build(LINUX), 33, 0x10), "flags 0x10"),  # a bare ACK
        (_set(build(LINUX), 33, 0x03), "flags 0x03"),  # SYN+FIN
        (_set(build(LINUX), 33, 0x06), "flags 0x06"),  # SYN+RST
        (_set(build(LINUX), 33, 0x14), "flags 0x14"),  # RST+ACK
        (_set(build(LINUX), OPT + 1, 0), "MSS has length 0"),
        (_set(build(LINUX), OPT + 1, 1), "MSS has length 1"),
        (_set(build(LINUX), OPT + 5, 0), "SACKOK has length 0"),
        (_set(build(LINUX), OPT + 7, 40), "TS has length 40"),
        (_set(build(LINUX), OPT + 18, 1), "WS has length 1"),
        # The last option (ws, bytes 57-59) turned into kind 30 / SACK with its length byte (58).
        (_set(_set(build(LINUX), OPT + 17, 30), OPT + 18, 5), r"option 30 \(length 5\) runs past"),
        (_set(_set(build(LINUX), OPT + 17, 30), OPT + 18, 1), "option 30 has invalid length 1"),
        (_set(build(LINUX), OPT + 17, 5), "option 5 has invalid length 3"),  # SACK needs 10-34
        (_set(_set(_set(build(LINUX), OPT + 17, 1), OPT + 18, 1), OPT + 19, 30), "30 has no room"),
    ],
)
def test_bad_packets_raise_fingerprint_error(fp: Fingerprinter, packet: bytes, message: str) -> None:
    with pytest.raises(FingerprintError, match=message):
        fp.fingerprint(packet)


def test_option_running_past_the_header() -> None:
    # Options end with a window scale option whose value byte lies past the TCP header.
    shape = replace(LINUX, layout=(2, 1, 3), wscale=7)  # 4 + 1 + 3 = 8 bytes
    packet = bytearray(build(shape))
    packet[OPT + 5 :] = b"\x01\x01\x03"  # nop, nop, ws kind with no room for length and value
    with pytest.raises(FingerprintError, match="WS runs past"):
        parse(bytes(packet))


def test_more_than_24_options() -> None:
    shape = replace(LINUX, layout=(1,) * 28, mss=None)
    with pytest.raises(FingerprintError, match="more than 24"):
        parse(build(shape))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(min_value=0, max_value=119), st.integers(0, 255))
def test_garbage_only_ever_raises_fingerprint_error(noise: bytes, where: int, value: int) -> None:
    """Random bytes, and real packets with one byte changed: a Fingerprint or FingerprintError."""
    fp = _SHARED
    for packet in (noise, _set(build(LINUX), where % 60, value), build(LINUX)[: where % 61]):
        with contextlib.suppress(FingerprintError):
            fp.fingerprint(packet)


def test_trailing_bytes_beyond_total_length_are_ignored(fp: Fingerprinter) -> None:
    """Ethernet padding after the IP packet: p0f honours the IP total length."""
    packet = build(LINUX)
    assert fp.fingerprint(packet + b"\x00" * 6) == fp.fingerprint(packet)
    assert fp.fingerprint(packet + b"junk").sig.endswith(":0")  # not payload


def _quirks(packet: bytes) -> str:
    return Fingerprinter().fingerprint(packet).sig.split(":")[6]


def test_quirks_as_p0f_computes_them() -> None:
    assert _quirks(build(LINUX)) == "df,id+"
    assert _quirks(build(LINUX, ip_id=0)) == "df"
    assert _quirks(build(LINUX.with_quirks(remove={"df", "id+"}), ip_id=0)) == "id-"
    assert _quirks(build(LINUX.with_quirks(add={"ecn", "0+", "seq-", "pushf+", "ts1-", "ts2+"}))) == (
        "df,id+,ecn,0+,seq-,pushf+,ts1-,ts2+"
    )
    assert _quirks(build(LINUX.with_quirks(add={"urgf+"}))) == "df,id+,urgf+"
    assert _quirks(build(LINUX.with_quirks(add={"uptr+"}))) == "df,id+,uptr+"
    v6 = build(replace(LINUX, ip_ver=6).with_quirks(add={"flow"}), src="2001:db8::1", dst="2001:db8::2")
    assert _quirks(v6) == "flow"


def test_ack_quirk_reads_bit_0_of_the_first_ack_byte() -> None:
    """p0f 3.09b: `RD32(ack) & !(flags & RST)` -- a bitwise AND with 1 of the raw value."""
    packet = build(LINUX)

    def with_ack(value: int) -> bytes:
        return packet[:28] + struct.pack("!I", value) + packet[32:]

    assert "ack+" in _quirks(with_ack(0x0100_0000))
    assert "ack+" not in _quirks(with_ack(0x0000_0001))
    assert "ack+" not in _quirks(with_ack(0xFE00_0000))
    assert "ack+" in _quirks(with_ack(0xFFFF_FFFF))


def test_nonzero_eol_padding_counts_unless_it_is_the_last_byte() -> None:
    shape = replace(LINUX, layout=(2, 0), eol_pad=3, quirks=frozenset({"df", "id+"}))
    packet = bytearray(build(shape))
    assert _quirks(bytes(packet)) == "df,id+"
    packet[OPT + 5] = 7  # first padding byte
    assert _quirks(bytes(packet)) == "df,id+,opt+"
    packet[OPT + 5] = 0
    packet[OPT + 7] = 7  # the last byte: p0f's loop steps past it and sees no leftover
    assert _quirks(bytes(packet)) == "df,id+"


def test_exws_and_signature_string() -> None:
    sig = Fingerprinter().fingerprint(build(replace(LINUX, wscale=15, ttl=57))).sig
    assert sig == "4:57+7:0:1460:mss*44,15:mss,sok,ts,nop,ws:df,id+,exws:0"
    far = Fingerprinter().fingerprint(build(replace(LINUX, ttl=20))).sig
    assert far.startswith("4:20+12:")
    assert Fingerprinter().fingerprint(build(replace(LINUX, ttl=150))).sig.startswith("4:150+?:")


def test_synack_window_uses_the_mss_of_its_syn() -> None:
    """SYN+ACK window 12010 = 10 x 1201, the SYN's MSS; p0f finds `mss*10` only through it."""
    fp = Fingerprinter()
    syn = build(replace(LINUX, mss=1201), src="10.0.0.1", dst="10.0.0.2", sport=1111, dport=80)
    synack_shape = replace(LINUX, synack=True, win=12010, quirks=frozenset({"df"}))
    synack = build(synack_shape, src="10.0.0.2", dst="10.0.0.1", sport=80, dport=1111)
    assert fp.fingerprint(synack).sig.split(":")[4] == "12010,7"  # SYN not seen yet
    fp.fingerprint(syn)
    assert fp.fingerprint(synack).sig.split(":")[4] == "mss*10,7"
    assert Fingerprinter().fingerprint(synack, syn_mss=1201).sig.split(":")[4] == "mss*10,7"
    assert fp.fingerprint(synack, syn_mss=0).sig.split(":")[4] == "12010,7"  # explicit wins
