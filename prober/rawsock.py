"""Receive side of the prober's raw sockets: kernel receive timestamps and large buffers.

Both engines (ICMP echo and SYN) time replies by the kernel's receive stamp (SO_TIMESTAMPNS), not by
when the event loop got round to reading them, so RTTs do not grow with the worker's load.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def prepare(sock: socket.socket) -> None:
    """Kernel receive timestamps, a large buffer, non-blocking reads."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    grow_buffer(sock)
    sock.setblocking(False)


def grow_buffer(sock: socket.socket, size: int = 8 << 20) -> None:
    """A large receive buffer (hundreds of replies can arrive in one burst; the default holds ~300);
    SO_RCVBUFFORCE passes net.core.rmem_max when we hold CAP_NET_ADMIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def drain(sock: socket.socket, bufsize: int) -> Iterator[tuple[bytes, Any, float]]:
    """Every datagram waiting on a non-blocking socket: (data, peer address, kernel receive time)."""
    while True:
        try:
            data, ancdata, _flags, addr = sock.recvmsg(bufsize, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        stamp = time.time()
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack("@qq", value[:16])
                stamp = sec + nsec / 1e9
        yield data, addr, stamp
