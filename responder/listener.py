"""The single listener every darknet connection is steered to, and what the kernel tells us about
each connection: the client's SYN (TCP_SAVED_SYN), the address it was sent to (SO_ORIGINAL_DST)
and the handshake RTT sample (TCP_INFO)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable

from analyzer.handshake import Handshake
from osfp.checksum import internet_checksum, tcp_checksum
from prober.job import DURATION_MAX_US

# Not exported by Python's socket module (linux/tcp.h, linux/netfilter_ipv4.h, ..._ipv6.h).
TCP_SAVE_SYN = 27
TCP_SAVED_SYN = 28
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

# struct tcp_info: 8 single bytes, then u32 fields; tcpi_rtt is the 16th u32, tcpi_total_retrans
# the 24th (linux/tcp.h, stable ABI).
_TCPI_RTT = 8 + 15 * 4
_TCPI_TOTAL_RETRANS = 8 + 23 * 4

# accept(2) failures that leave the listener usable. Out of descriptors or memory: the connection
# stays in the kernel's accept queue until something closes (banner exchanges hold a descriptor
# each until --banner-timeout), so wait a little and accept again. A connection that failed
# before it was accepted: man 2 accept says retry at once.
ACCEPT_RETRY_S = 0.25
_ACCEPT_WAIT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_AGAIN = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                           errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                           errno.ENETUNREACH})


class ListenerError(RuntimeError):
    pass


def open_listener(family: socket.AddressFamily, port: int, backlog: int = 4096) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # The kernel keeps each connection's SYN (IP + TCP headers) for us to read after accept.
        sock.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on TCP port {port}: {exc}") from exc
    return sock


def original_destination(conn: socket.socket) -> tuple[str, int]:
    """Where the client sent its SYN, before nftables redirected it to us."""
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack_from("!2xH4s", raw)
        return str(ipaddress.IPv4Address(addr)), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port, addr = struct.unpack_from("!2xH4x16s", raw)
    return str(ipaddress.IPv6Address(addr)), port



def restore_destination(syn: bytes, dst: str, dport: int) -> bytes:
    """The saved SYN is the packet after nftables' redirect rewrote its destination; put back the
    address and port the client really used (and fix the checksums), so the bytes are what the
    client sent. Options and everything p0f reads are untouched by the redirect."""
    pkt = bytearray(syn)
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        pkt[16:20] = ipaddress.IPv4Address(dst).packed
        pkt[10:12] = b"\0\0"
        pkt[10:12] = struct.pack("!H", internet_checksum(bytes(pkt[:ihl])))
        src, dst_packed = bytes(pkt[12:16]), bytes(pkt[16:20])
        tcp_off = ihl
    elif version == 6:
        pkt[24:40] = ipaddress.IPv6Address(dst).packed
        # Our listener only sees SYNs without extension headers in practice; the TCP header
        # follows the fixed 40-byte header when next-header is TCP.
        if pkt[6] != socket.IPPROTO_TCP:
            return bytes(pkt)
        tcp_off = 40
        src, dst_packed = bytes(pkt[8:24]), bytes(pkt[24:40])
    else:
        return syn
    if len(pkt) < tcp_off + 20:
        return bytes(pkt)
    pkt[tcp_off + 2:tcp_off + 4] = struct.pack("!H", dport)
    pkt[tcp_off + 16:tcp_off + 18] = b"\0\0"
    pkt[tcp_off + 16:tcp_off + 18] = struct.pack("!H", tcp_checksum(src, dst_packed, bytes(pkt[tcp_off:])))
    return bytes(pkt)


def describe(conn: socket.socket, peer: tuple[str, int] | tuple[str, int, int, int], now: float) -> Handshake:
    """Read what the kernel kept about an accepted connection and build its Handshake."""
    dst, dport = original_destination(conn)
    try:
        syn: bytes | None = conn.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 1024) or None
    except OSError:
        syn = None  # e.g. the connection came in through a SYN cookie: nothing was saved
    if syn is not None:
        syn = restore_destination(syn, dst, dport)
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    (rtt_us,) = struct.unpack_from("=I", info, _TCPI_RTT)
    (retrans,) = struct.unpack_from("=I", info, _TCPI_TOTAL_RETRANS)
    # A retransmitted SYN+ACK makes the sample ambiguous (Karn): keep the connection, drop the time.
    # (An RTT past the streams' bound, an hour, is no measurement either: the analyzer refuses it.)
    tp_us = rtt_us if retrans == 0 and 0 < rtt_us <= DURATION_MAX_US else None
    # Accept happens just after the ACK; the SYN+ACK went out one RTT earlier, a moment after the SYN.
    synack = now - (tp_us or 0) / 1e6
    src = str(ipaddress.ip_address(peer[0].split("%")[0]))
    return Handshake(
        t=synack,
        src=src,
        sport=peer[1],
        dst=dst,
        dport=dport,
        syn=syn,
        synack_times=(synack,),
        reply="ack",
        reply_time=now,
        tp_us=tp_us,
        feed="responder",
    )


def accept_pending(listener: socket.socket) -> list[Handshake]:
    """On shutdown: the connections already completed and waiting in the accept queue."""
    out: list[Handshake] = []
    while True:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:
            return out
        try:
            out.append(describe(conn, peer, time.time()))
        except OSError:
            pass
        finally:
            conn.close()


async def accept_forever(listener: socket.socket,
                         take: Callable[[socket.socket, Handshake], bool] | None = None
                         ) -> AsyncIterator[Handshake]:
    """Accept, describe, close; one Handshake per connection. `take`, when given, sees each
    connection first and may keep it (a banner port, responder/banners.py): it returns True, owns
    the socket from then on and reports that handshake itself, later; the loop goes on at once."""
    loop = asyncio.get_running_loop()
    short_of: int | None = None  # the errno accept is failing with, said once per episode
    while True:
        try:
            conn, peer = await loop.sock_accept(listener)
        except OSError as exc:
            # Without this, one EMFILE (more banner exchanges open than RLIMIT_NOFILE allows) ended
            # the accept loop and with it the responder.
            if exc.errno in _ACCEPT_AGAIN:
                continue
            if exc.errno not in _ACCEPT_WAIT:
                raise
            if short_of != exc.errno:
                short_of = exc.errno
                print(f"stepstone-responder: cannot accept ({exc.strerror}); accepting again as "
                      "connections close (see --banner-sessions and the open-file limit)",
                      file=sys.stderr, flush=True)
            await asyncio.sleep(ACCEPT_RETRY_S)
            continue
        short_of = None
        now = time.time()
        try:
            handshake: Handshake | None = describe(conn, peer, now)
        except OSError:
            handshake = None  # the client vanished between accept and getsockopt: nothing to report
        if handshake is not None and take is not None and take(conn, handshake):
            continue
        with contextlib.suppress(OSError):
            conn.close()
        if handshake is not None:
            yield handshake
