"""ICMP echo RTT statistics (T^a) for many targets at once over one raw socket per family.

icmplib builds and sends the echo requests (privileged raw sockets). Replies are read here by one
reader per socket instead of icmplib's per-call receive: `async_ping` opens a raw socket per call,
and every raw ICMP socket gets a copy of every ICMP packet, so 256 concurrent pings would cost
256 copies and wake-ups per reply. Receive times are the kernel's (SO_TIMESTAMPNS), so RTTs do not
include the event loop's scheduling delay when it is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
import time
from dataclasses import dataclass

from icmplib import ICMPRequest, ICMPv4Socket, ICMPv6Socket
from icmplib.exceptions import ICMPLibError, SocketPermissionError

from prober import rawsock

ECHO_REPLY = {4: 0, 6: 129}


class PingPermissionError(PermissionError):
    pass


@dataclass(frozen=True, slots=True)
class PingStats:
    sent: int
    rtts_us: tuple[float, ...]

    @property
    def loss(self) -> float:
        return 1.0 - len(self.rtts_us) / self.sent if self.sent else 1.0

    @property
    def min_us(self) -> int | None:
        return round(min(self.rtts_us)) if self.rtts_us else None

    @property
    def max_us(self) -> int | None:
        return round(max(self.rtts_us)) if self.rtts_us else None

    @property
    def avg_us(self) -> int | None:
        return round(sum(self.rtts_us) / len(self.rtts_us)) if self.rtts_us else None

    @property
    def var_us2(self) -> float | None:
        # Population variance of the received samples (0.0 for one sample).
        if not self.rtts_us:
            return None
        mean = sum(self.rtts_us) / len(self.rtts_us)
        return math.fsum((r - mean) ** 2 for r in self.rtts_us) / len(self.rtts_us)


class Pinger:
    """Shared echo engine; open() needs CAP_NET_RAW. Use from one event loop."""

    def __init__(self) -> None:
        self._socks: dict[int, ICMPv4Socket | ICMPv6Socket] = {}
        self._waiting: dict[tuple[str, int, int], asyncio.Future[float]] = {}
        # Echo ids are ours (one per ping call) so replies to other pingers on the host are ignored.
        self._next_id = random.randrange(1, 0x10000)

    def open(self, families: tuple[int, ...] = (4, 6)) -> None:
        loop = asyncio.get_running_loop()
        for family in families:
            if family in self._socks:
                continue
            try:
                sock = ICMPv4Socket(privileged=True) if family == 4 else ICMPv6Socket(privileged=True)
            except SocketPermissionError:
                raise PingPermissionError(
                    "ICMP raw sockets need root or CAP_NET_RAW") from None
            except ICMPLibError as exc:
                if family == 6:
                    continue  # no IPv6 on this host: IPv6 targets then count as lost
                raise PingPermissionError(str(exc)) from None
            rawsock.prepare(sock.sock)
            only_echo_replies(sock.sock, family)
            self._socks[family] = sock
            loop.add_reader(sock.sock.fileno(), self._on_readable, family)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._socks.values():
            loop.remove_reader(sock.sock.fileno())
            sock.close()
        self._socks.clear()

    async def ping(self, address: str, *, count: int = 5, interval: float = 0.05,
                   reply_wait: float = 1.0) -> PingStats:
        """Send `count` echoes `interval` apart without waiting for replies; each reply counts if
        it arrives within `reply_wait` seconds of its request."""
        family = 6 if ":" in address else 4
        sock = self._socks.get(family)
        if sock is None:
            return PingStats(sent=0, rtts_us=())
        ident = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1
        loop = asyncio.get_running_loop()
        pending: list[tuple[asyncio.Future[float], float]] = []
        try:
            for seq in range(count):
                if seq:
                    await asyncio.sleep(interval)  # pacing between echoes
                fut: asyncio.Future[float] = loop.create_future()
                self._waiting[(address, ident, seq)] = fut
                request = ICMPRequest(destination=address, id=ident, sequence=seq)
                try:
                    sock.send(request)
                except ICMPLibError:
                    continue  # e.g. no route: counts as lost
                pending.append((fut, request.time))
            rtts = []
            for fut, sent_at in pending:
                if not fut.done():
                    try:
                        left = max(sent_at + reply_wait - time.time(), 0.0)
                        await asyncio.wait_for(asyncio.shield(fut), left)
                    except TimeoutError:
                        continue  # lost
                rtt = (fut.result() - sent_at) * 1e6
                if rtt >= 0:
                    rtts.append(rtt)
            return PingStats(sent=count, rtts_us=tuple(rtts))
        finally:
            for seq in range(count):
                self._waiting.pop((address, ident, seq), None)

    def _on_readable(self, family: int) -> None:
        for data, addr, stamp in rawsock.drain(self._socks[family].sock, 2048):
            # Raw IPv4 sockets hand us the IP header, IPv6 ones do not.
            offset = (data[0] & 0x0F) * 4 if family == 4 and data else 0
            if len(data) < offset + 8 or data[offset] != ECHO_REPLY[family]:
                continue
            ident, seq = struct.unpack_from("!HH", data, offset + 4)
            fut = self._waiting.get((_canonical(addr[0]), ident, seq))
            if fut is not None and not fut.done():
                fut.set_result(stamp)


def only_echo_replies(sock: socket.socket, family: int) -> None:
    """Kernel-side ICMP type filter (a set bit blocks a type): no wake-ups for the host's other ICMP
    traffic (neighbour discovery, errors, echo requests to us)."""
    with contextlib.suppress(OSError):
        if family == 4:
            mask = 0xFFFFFFFF & ~(1 << ECHO_REPLY[4])
            sock.setsockopt(255, 1, struct.pack("I", mask))  # SOL_RAW, ICMP_FILTER
        else:
            words = [0xFFFFFFFF] * 8
            words[ECHO_REPLY[6] >> 5] &= ~(1 << (ECHO_REPLY[6] & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, 1, struct.pack("8I", *words))  # ICMP6_FILTER


def _canonical(address: str) -> str:
    # recvmsg gives IPv6 addresses possibly with a %scope; jobs carry canonical text.
    return address.split("%", 1)[0]
