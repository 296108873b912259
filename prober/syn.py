"""Raw TCP SYN probes to several ports at once; the first SYN+ACK is kept for p0f (F^a) with its
SYN -> SYN+ACK time.

Sending: a raw IPPROTO_TCP socket per family; the kernel writes the IP header (TTL, DF, ID as for
its own connections) and routes in whatever network namespace the process runs in (no scapy: it
reads routes at import). The TCP header carries Linux's own SYN option layout
(mss,sok,ts,nop,ws), so the SYN+ACK that comes back carries options for p0f to read.

Receiving: one AF_PACKET (cooked) socket with a classic BPF filter (incoming IPv4/IPv6 TCP only)
gives whole IP packets with kernel timestamps; replies are matched on (address, our source port,
their source port, ack == our seq + 1).

The source port is reserved by binding an ordinary TCP socket to it for the duration of the probe,
so no local connection can pick it; since nothing listens or connects there, the kernel answers the
SYN+ACK with a RST, as after nmap -sS (see docs/running.md: why we keep that RST).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import random
import socket
import struct
import time
from dataclasses import dataclass, field

from osfp.checksum import tcp_checksum
from prober import rawsock

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE as an unsigned offset

SYN, RST, ACK = 0x02, 0x04, 0x10

# Classic BPF over the network header (cooked socket): accept only incoming IPv4/IPv6 TCP segments
# with ACK and SYN or RST set, so the host's other TCP traffic (its Redis connection, say) never
# wakes us up.
_DROP = 17
_TCP_IN = (
    (0x20, 0, 0, SKF_AD_PKTTYPE),  # 0  ld  pkttype
    (0x15, _DROP - 2, 0, PACKET_OUTGOING),  # 1  our own packets -> drop
    (0x30, 0, 0, 0),  # 2  ldb [0]
    (0x74, 0, 0, 4),  # 3  rsh #4: IP version
    (0x15, 0, 4, 4),  # 4  v4 ? 5 : 9
    (0x30, 0, 0, 9),  # 5  ldb [9]: IPv4 protocol
    (0x15, 0, _DROP - 7, 6),  # 6  TCP ? 7 : drop
    (0xB1, 0, 0, 0),  # 7  ldx 4*([0]&0xf): IPv4 header length
    (0x05, 0, 0, 4),  # 8  ja 13
    (0x15, 0, _DROP - 10, 6),  # 9  v6 ? 10 : drop
    (0x30, 0, 0, 6),  # 10 ldb [6]: IPv6 next header
    (0x15, 0, _DROP - 12, 6),  # 11 TCP ? 12 : drop
    (0x01, 0, 0, 40),  # 12 ldx #40
    (0x50, 0, 0, 13),  # 13 ldb [x+13]: TCP flags
    (0x45, 0, _DROP - 15, ACK),  # 14 ACK ? 15 : drop
    (0x45, 0, 1, SYN | RST),  # 15 SYN or RST ? accept : drop
    (0x06, 0, 0, 0xFFFF),  # 16 accept
    (0x06, 0, 0, 0),  # 17 drop
)
_DROP_ALL = ((0x06, 0, 0, 0),)


class SynPermissionError(PermissionError):
    pass


def attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    code = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program), ctypes.addressof(buf)))



def syn_mss(dst: str) -> int:
    return 1440 if ":" in dst else 1460


def syn_segment(src: str, dst: str, sport: int, dport: int, *, seq: int, tsval: int) -> bytes:
    """A SYN as Linux sends it: window 44*MSS, options mss,sok,ts,nop,ws=7."""
    v6 = ":" in dst
    mss = syn_mss(dst)
    options = (struct.pack("!BBH", 2, 4, mss) + b"\x04\x02"
               + struct.pack("!BBII", 8, 10, tsval, 0) + b"\x01" + b"\x03\x03\x07")
    header_len = 20 + len(options)
    window = 64800 if v6 else 64240
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, (header_len // 4) << 4, SYN, window, 0, 0)
    tcp += options
    csum = tcp_checksum(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, tcp)
    return tcp[:16] + struct.pack("!H", csum) + tcp[18:]


@dataclass
class SynOutcome:
    """What the ports said: open (SYN+ACK), closed (RST), or nothing (filtered/unanswered)."""

    open: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    synack: bytes | None = None  # the first SYN+ACK's IP packet
    synack_port: int | None = None
    rtt_us: int | None = None  # SYN -> first SYN+ACK
    sent: list[int] = field(default_factory=list)
    mss: int = 0  # the MSS our SYN offered (p0f reads the SYN+ACK's against it)


@dataclass
class _Probe:
    seq: int
    sent_at: dict[int, float]
    outcome: SynOutcome
    done: asyncio.Future[None]


def _source_for(dst: str) -> str:
    """The local address the kernel would use towards `dst` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((dst, 9))
        return str(ipaddress.ip_address(s.getsockname()[0].split("%", 1)[0]))


class SynProber:
    """Shared SYN engine for one event loop; open() needs CAP_NET_RAW."""

    def __init__(self) -> None:
        self._send: dict[int, socket.socket] = {}
        self._recv: socket.socket | None = None
        self._waiting: dict[tuple[str, int], _Probe] = {}

    def open(self) -> None:
        if self._recv is not None:
            return
        try:
            recv = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise SynPermissionError("raw sockets (SYN probes) need root or CAP_NET_RAW") from None
        attach_filter(recv, _TCP_IN)
        rawsock.prepare(recv)
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            try:
                s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
            except PermissionError:
                recv.close()
                raise SynPermissionError("raw sockets (SYN probes) need root or CAP_NET_RAW") from None
            except OSError:
                continue  # family not supported here
            attach_filter(s, _DROP_ALL)  # a raw TCP socket also receives; we read replies elsewhere
            s.setblocking(False)
            self._send[version] = s
        self._recv = recv
        asyncio.get_running_loop().add_reader(recv.fileno(), self._on_readable)

    def close(self) -> None:
        if self._recv is not None:
            asyncio.get_running_loop().remove_reader(self._recv.fileno())
            self._recv.close()
            self._recv = None
        for s in self._send.values():
            s.close()
        self._send.clear()

    async def probe(self, address: str, ports: tuple[int, ...], *, reply_wait: float = 1.0
                    ) -> SynOutcome:
        """SYNs to every port at once; returns at the first SYN+ACK, when every port answered RST,
        or after `reply_wait` seconds."""
        outcome = SynOutcome(mss=syn_mss(address))
        version = 6 if ":" in address else 4
        sender = self._send.get(version)
        if sender is None:
            return outcome
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        try:
            src = _source_for(address)
        except OSError:
            return outcome  # no route: nothing sent
        with socket.socket(family, socket.SOCK_STREAM) as reservation:
            reservation.bind((src, 0))
            sport = reservation.getsockname()[1]
            probe = _Probe(seq=random.getrandbits(32), sent_at={}, outcome=outcome,
                           done=asyncio.get_running_loop().create_future())
            key = (address, sport)
            self._waiting[key] = probe
            try:
                tsval = int(time.monotonic() * 1000) & 0xFFFFFFFF
                for port in dict.fromkeys(ports):
                    segment = syn_segment(src, address, sport, port, seq=probe.seq, tsval=tsval)
                    probe.sent_at[port] = time.time()
                    try:
                        sender.sendto(segment, (address, 0))
                    except OSError:
                        del probe.sent_at[port]  # e.g. unreachable, buffer full: not sent
                        continue
                    outcome.sent.append(port)
                if outcome.sent:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(probe.done), reply_wait)
            finally:
                self._waiting.pop(key, None)
        return outcome

    def _on_readable(self) -> None:
        assert self._recv is not None
        for data, _addr, stamp in rawsock.drain(self._recv, 65535):
            self._handle(data, stamp)

    def _handle(self, data: bytes, stamp: float) -> None:
        if not data:
            return
        version = data[0] >> 4
        if version == 4 and len(data) >= 20:
            ihl = (data[0] & 0x0F) * 4
            total = struct.unpack_from("!H", data, 2)[0]
            packet = data[:total]  # drop Ethernet padding
            src = socket.inet_ntop(socket.AF_INET, data[12:16])
            tcp_at = ihl
        elif version == 6 and len(data) >= 40:
            packet = data[:40 + struct.unpack_from("!H", data, 4)[0]]
            src = str(ipaddress.IPv6Address(data[8:24]))
            tcp_at = 40
        else:
            return
        if len(packet) < tcp_at + 20:
            return
        sport, dport, _seq, ack, _off, flags = struct.unpack_from("!HHIIBB", packet, tcp_at)
        probe = self._waiting.get((src, dport))
        if probe is None or sport not in probe.sent_at or ack != (probe.seq + 1) & 0xFFFFFFFF:
            return
        out = probe.outcome
        if flags & (SYN | ACK) == SYN | ACK:
            if sport in out.open:
                return  # a retransmission
            out.open.append(sport)
            if out.synack is None:
                out.synack, out.synack_port = packet, sport
                rtt_us = round((stamp - probe.sent_at[sport]) * 1e6)
                # Wall clock stepped back between send and receive (NTP): no RTT rather than a
                # negative one, which every reader of the result rejects (as ping.py does).
                out.rtt_us = rtt_us if rtt_us >= 0 else None
                if not probe.done.done():
                    probe.done.set_result(None)
        elif flags & RST and sport not in out.closed:
            out.closed.append(sport)
            if len(out.closed) == len(out.sent) and not probe.done.done():
                probe.done.set_result(None)
