"""Handshake tracking: IP packets (any source: a capture file, a live socket) -> `Handshake`s.

A connection is keyed by (client address, client port, darknet address, darknet port) and starts
with a client SYN towards a darknet address. The tracker notes every SYN+ACK the darknet sends
back and the client's reply: its first ACK (with or without data) or a RST (stack-less scanners
answer our SYN+ACK with a kernel RST: an RTT sample all the same).

Rules (the Zeek scripts implement the same ones):
- T^p = reply time - time of the SYN+ACK the reply answers, in integer microseconds.
- More than one SYN+ACK stamped before the reply: the SYN+ACK was retransmitted and we cannot tell
  which copy the reply answers (Karn's rule). The connection counts as answered, `tp_us` is None.
- A reply stamped before every SYN+ACK (capture clocks or merged captures out of order) cannot be
  timed either: answered, `tp_us` None, counted as `misordered` — never a negative T^p. Nor can a
  reply more than an hour after the SYN+ACK (prober.job.DURATION_MAX_US, the bound every record
  keeps): no round trip takes that long, so one of the two timestamps is wrong.
- A reply that appears in the file before the SYN+ACK (out-of-order capture) is held until the
  SYN+ACK arrives, then timed by the rules above. Likewise a SYN+ACK (and reply) that appears
  before its SYN — captures merged from two taps do this — waits for the SYN it acknowledges; if
  that SYN never comes, it ends as `stray` and gives no handshake.
- Repeated SYNs: the darknet's first SYN+ACK answers the latest SYN before it, so `t` and the SYN
  bytes are those of the last SYN seen before the first SYN+ACK. A SYN repeated after a SYN+ACK
  (the client missed it) provokes another SYN+ACK, which makes the timing ambiguous by the rule
  above; it does not move `t`. A SYN with a different sequence number on the same four-tuple is a
  new connection: the old one ends as it stands.
- A SYN+ACK never answered: the connection ends as unanswered (a `Handshake` with `reply` None)
  once idle for `idle_timeout` seconds, or at `flush()`. A SYN the darknet never answered ends as
  `no_synack` and gives no handshake (there is no handshake to measure).
- Time is capture time: the latest timestamp seen. Idle connections are expired against it, and
  `max_connections` bounds the table whatever the timestamps do. A corrupt timestamp far ahead
  would expire everything: `analyzer.timejumps` keeps such packets from the tracker, and calls
  `rewind` when capture time really goes back.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from analyzer.handshake import Feed, Handshake, Reply
from analyzer.packet import ACK, RST, SYN, TcpHeader, address_text, tcp_header
from prober.job import DURATION_MAX_US

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NOTHING: tuple[Handshake, ...] = ()
_MAX_TP_NS = DURATION_MAX_US * 1000


@dataclass(slots=True)
class TrackerStats:
    """Counters over everything the tracker has seen (the passive half of the paper's Table 3)."""

    packets: int = 0  # TCP packets offered
    connections: int = 0  # connection requests (SYNs towards the darknet, repeats not counted)
    answered: int = 0  # the client replied (ACK or RST) to our SYN+ACK, timed or not
    timed: int = 0  # answered with a usable T^p
    ambiguous: int = 0  # answered after a retransmitted SYN+ACK (Karn's rule: no T^p)
    misordered: int = 0  # answered, but the reply is stamped before (or hours after) the SYN+ACK
    unanswered: int = 0  # SYN+ACK sent, no reply before the connection expired or input ended
    no_synack: int = 0  # the darknet never answered the SYN
    repeated_syns: int = 0
    stray: int = 0  # SYN+ACK whose SYN never showed (capture began mid-handshake, ...)
    evicted: int = 0  # connections dropped early because the table was full
    sources: set[bytes] = field(default_factory=set)  # clients with an answered handshake
    darknet_addresses: set[bytes] = field(default_factory=set)  # darknet addresses sent a SYN

    def summary(self) -> dict[str, int]:
        return {
            "darknet_addresses": len(self.darknet_addresses),
            "connection_requests": self.connections,
            "answered": self.answered,
            "unique_sources": len(self.sources),
            "timed": self.timed,
            "ambiguous": self.ambiguous,
            "misordered": self.misordered,
            "unanswered": self.unanswered,
            "no_synack": self.no_synack,
            "repeated_syns": self.repeated_syns,
            "stray": self.stray,
            "evicted": self.evicted,
        }


class _Conn:
    __slots__ = ("key", "last", "reply", "reply_ns", "seq", "syn", "syn_ns", "synacks")

    def __init__(self, key: bytes, syn_ns: int, syn: bytes | None, seq: int) -> None:
        self.key = key
        self.syn_ns = syn_ns
        self.syn = syn
        self.seq = seq
        self.synacks: list[int] = []
        self.reply: Reply | None = None
        self.reply_ns = 0
        self.last = syn_ns


class HandshakeTracker:
    """Follows TCP handshakes towards `darknets` and hands out each one when it ends.

    Feed it `packet(ts_ns, ip)` (or `packet_at(ts_seconds, ip)`) in capture order; each call returns
    the handshakes that ended (answered now, or expired). Call `flush()` at the end of input.
    Packets that are not TCP raise `analyzer.packet.NotTCPError`, malformed ones `PacketError`:
    the caller counts or reports them.
    """

    def __init__(
        self,
        darknets: Sequence[Network],
        *,
        idle_timeout: float = 30.0,
        max_connections: int = 1_000_000,
        feed: Feed = "pcap",
    ) -> None:
        if not darknets:
            raise ValueError("at least one darknet network is needed")
        self._nets4 = [(int(n.network_address), int(n.netmask)) for n in darknets if n.version == 4]
        self._nets6 = [(int(n.network_address), int(n.netmask)) for n in darknets if n.version == 6]
        self._dark: dict[bytes, bool] = {}  # membership cache per address
        self._conns: OrderedDict[bytes, _Conn] = OrderedDict()  # least recently active first
        self._idle_ns = int(idle_timeout * 1e9)
        self._max = max_connections
        self._now = 0
        self._feed = feed
        self._out: list[Handshake] = []  # handshakes ended by the packet in hand
        self.stats = TrackerStats()

    @property
    def active(self) -> int:
        """Connections currently tracked."""
        return len(self._conns)

    def _is_dark(self, addr: bytes) -> bool:
        known = self._dark.get(addr)
        if known is None:
            value = int.from_bytes(addr, "big")
            nets = self._nets4 if len(addr) == 4 else self._nets6
            known = any(value & mask == net for net, mask in nets)
            if len(self._dark) > 1_000_000:  # a sweep of a huge darknet: keep the cache bounded
                self._dark.clear()
            self._dark[addr] = known
        return known

    def packet_at(self, ts: float, ip: bytes) -> Sequence[Handshake]:
        """`packet` with the timestamp in epoch seconds."""
        return self.packet(round(ts * 1e9), ip)

    def packet(self, ts_ns: int, ip: bytes, h: TcpHeader | None = None) -> Sequence[Handshake]:
        """Take one IP packet stamped `ts_ns` (epoch nanoseconds); return the handshakes it ended.

        `h`: the packet's `tcp_header(ip)` when the caller has decoded it already.
        Eager (not a generator): the packet is accounted for whether or not the caller looks at
        the result. Usually the result is empty.
        """
        if h is None:
            h = tcp_header(ip)
        self.stats.packets += 1
        if ts_ns > self._now:
            self._now = ts_ns
            if self._conns:
                self._expire()
        self._track(ts_ns, ip, h)
        if not self._out:
            return _NOTHING
        out, self._out = self._out, []
        return out

    def _track(self, ts_ns: int, ip: bytes, h: TcpHeader) -> None:
        stats = self.stats
        emit = self._out.append
        flags = h.flags
        conns = self._conns
        if flags & SYN:
            if flags & ACK:
                # SYN+ACK from the darknet to a client.
                off = h.tcp_offset
                key = h.dst + h.src + ip[off + 2 : off + 4] + ip[off : off + 2]
                conn = conns.get(key)
                if conn is None:
                    if not self._is_dark(h.src):
                        return
                    # Merged or skewed captures can hold the SYN+ACK before its SYN: keep it
                    # for the SYN (which it acknowledges) to claim.
                    conn = _Conn(key, 0, None, (h.ack - 1) & 0xFFFFFFFF)
                    conns[key] = conn
                    self._bound()
                elif (conn.seq + 1) & 0xFFFFFFFF != h.ack:
                    # It acknowledges another sequence number: it answers some other SYN.
                    stats.stray += 1
                    return
                conn.synacks.append(ts_ns)
                conn.last = max(conn.last, ts_ns)
                conns.move_to_end(key)
                if conn.reply is not None and conn.syn is not None:
                    emit(self._finish(conn))  # a reply seen earlier in the file waited for this
                return
            # SYN from a client.
            if not self._is_dark(h.dst):
                return
            key = h.src + h.dst + ip[h.tcp_offset : h.tcp_offset + 4]
            conn = conns.get(key)
            if conn is not None:
                if conn.seq == h.seq:
                    if conn.syn is None:  # claims a SYN+ACK that came first in the file
                        self._open(conn, ts_ns, ip, h.dst)
                        if conn.reply is not None:
                            emit(self._finish(conn))
                        return
                    stats.repeated_syns += 1
                    if not conn.synacks and conn.reply is None:
                        conn.syn_ns = ts_ns  # the darknet will answer the latest SYN
                        conn.syn = ip
                    conn.last = max(conn.last, ts_ns)
                    conns.move_to_end(key)
                    return
                # Same four-tuple, new sequence number: a new connection request.
                del conns[key]
                ended = self._end(conn)
                if ended is not None:
                    emit(ended)
            conn = _Conn(key, ts_ns, None, h.seq)
            conns[key] = conn
            self._open(conn, ts_ns, ip, h.dst)
            self._bound()
            return
        if flags & (ACK | RST):
            # Possibly the client's reply to our SYN+ACK.
            key = h.src + h.dst + ip[h.tcp_offset : h.tcp_offset + 4]
            conn = conns.get(key)
            if conn is None or conn.reply is not None:
                return  # not a handshake we follow (later packets of a finished one, or unrelated)
            conn.reply = "rst" if flags & RST else "ack"
            conn.reply_ns = ts_ns
            conn.last = max(conn.last, ts_ns)
            if conn.synacks and conn.syn is not None:
                emit(self._finish(conn))
            else:
                conns.move_to_end(key)

    def _open(self, conn: _Conn, ts_ns: int, syn: bytes, dst: bytes) -> None:
        conn.syn_ns = ts_ns
        conn.syn = syn
        conn.last = max(conn.last, ts_ns)
        self.stats.connections += 1
        self.stats.darknet_addresses.add(dst)

    def _bound(self) -> None:
        """Keep the table within max_connections: the least recently active connection goes."""
        while len(self._conns) > self._max:
            _, oldest = self._conns.popitem(last=False)
            self.stats.evicted += 1
            ended = self._end(oldest)
            if ended is not None:
                self._out.append(ended)

    def _finish(self, conn: _Conn) -> Handshake:
        """The reply and at least one SYN+ACK are known: time it and drop the state."""
        del self._conns[conn.key]
        stats = self.stats
        stats.answered += 1
        stats.sources.add(conn.key[: len(conn.key) // 2 - 2])
        before = [t for t in conn.synacks if t <= conn.reply_ns]
        tp_us: int | None = None
        if len(before) == 1 and conn.reply_ns - before[0] <= _MAX_TP_NS:
            tp_us = (conn.reply_ns - before[0] + 500) // 1000  # nearest microsecond
            stats.timed += 1
        elif len(before) > 1:
            stats.ambiguous += 1
        else:
            stats.misordered += 1
        return self._handshake(conn, tp_us)

    def _end(self, conn: _Conn) -> Handshake | None:
        """A connection leaves the table unfinished (expired, replaced, evicted, flushed)."""
        if conn.syn is None:  # SYN+ACK (and maybe a reply) whose SYN we never saw
            self.stats.stray += 1
            return None
        if not conn.synacks:
            self.stats.no_synack += 1
            return None
        self.stats.unanswered += 1
        return self._handshake(conn, None)

    def _handshake(self, conn: _Conn, tp_us: int | None) -> Handshake:
        key = conn.key
        size = len(key) // 2 - 2  # address length: key = src + dst + sport + dport
        answered = tp_us is not None or (conn.reply is not None and bool(conn.synacks))
        return Handshake(
            t=conn.syn_ns / 1e9,
            src=address_text(key[:size]),
            sport=int.from_bytes(key[2 * size : 2 * size + 2], "big"),
            dst=address_text(key[size : 2 * size]),
            dport=int.from_bytes(key[2 * size + 2 :], "big"),
            syn=conn.syn,
            synack_times=tuple(t / 1e9 for t in conn.synacks),
            reply=conn.reply if answered else None,
            reply_time=conn.reply_ns / 1e9 if answered else None,
            tp_us=tp_us,
            feed=self._feed,
        )

    def _expire(self) -> None:
        limit = self._now - self._idle_ns
        conns = self._conns
        while conns:
            key, conn = next(iter(conns.items()))
            if conn.last >= limit:
                return
            del conns[key]
            ended = self._end(conn)
            if ended is not None:
                self._out.append(ended)

    def rewind(self, ts_ns: int) -> list[Handshake]:
        """Capture time goes back to `ts_ns` for good (captures concatenated out of order): every
        open connection ends as it stands (none of its packets can follow in the earlier time), and
        the clock restarts there, so that expiry goes on working. Returns those handshakes."""
        out = self.flush()
        self._now = ts_ns
        return out

    def flush(self) -> list[Handshake]:
        """End of input: every connection still open ends as it stands; returns those handshakes."""
        out: list[Handshake] = []
        while self._conns:
            _, conn = self._conns.popitem(last=False)
            ended = self._end(conn)
            if ended is not None:
                out.append(ended)
        return out
