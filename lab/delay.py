"""A userspace delay line between two TUN devices in two network namespaces (this kernel has no
netem): every packet read from one side is written to the other after a fixed one-way delay plus
optional jitter. Run as its own process (`python -m lab.delay LINK ...`) so the lab's other work
never holds packets up; the TUN devices vanish when it exits, so nothing outlives it.

LINK is JSON: {"a": [netns, ifname], "b": [netns, ifname], "ab_ms": 10, "ba_ms": 10, "jitter_ms": 0}.
Once every device exists it prints "ready" on stdout; the caller then assigns addresses.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65535


class DelayError(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    a_ns: str
    a_if: str
    b_ns: str
    b_if: str
    ab_ms: float = 0.0  # one way, a -> b
    ba_ms: float = 0.0
    jitter_ms: float = 0.0  # extra delay, uniform in [0, jitter], per packet, per direction

    def to_json(self) -> str:
        return json.dumps({"a": [self.a_ns, self.a_if], "b": [self.b_ns, self.b_if], "ab_ms": self.ab_ms,
                           "ba_ms": self.ba_ms, "jitter_ms": self.jitter_ms})

    @classmethod
    def from_json(cls, text: str) -> Link:
        try:
            raw = json.loads(text)
            link = cls(str(raw["a"][0]), str(raw["a"][1]), str(raw["b"][0]), str(raw["b"][1]),
                       float(raw.get("ab_ms", 0)), float(raw.get("ba_ms", 0)), float(raw.get("jitter_ms", 0)))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DelayError(f"bad link spec {text!r}: {exc}") from None
        if min(link.ab_ms, link.ba_ms, link.jitter_ms) < 0:
            raise DelayError(f"negative delay in {text!r}")
        for name in (link.a_if, link.b_if):
            if not 0 < len(name) < 16:
                raise DelayError(f"interface name must be 1-15 characters: {name!r}")
        return link


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DelayError(f"setns: {os.strerror(err)}")


def open_tun(netns: str, ifname: str) -> int:
    """Create TUN device `ifname` inside network namespace `netns`; returns its (non-blocking) fd.

    The calling thread enters the namespace only while creating the device: the fd keeps working
    wherever this process is afterwards."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        except OSError as exc:
            raise DelayError(f"no network namespace {netns!r}: {exc}") from None
        try:
            _setns(target)
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            except OSError as exc:
                raise DelayError(f"/dev/net/tun: {exc} (is the tun module available?)") from None
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI))
            except OSError as exc:
                os.close(fd)
                raise DelayError(f"TUNSETIFF {ifname}: {exc}") from None
        finally:
            os.close(target)
            _setns(home)
    finally:
        os.close(home)
    return fd


PR_SET_TIMERSLACK = 29


class Direction:
    """One direction of a link: read from `src`, write to `dst` `delay` seconds later, in order."""

    def __init__(self, src: int, dst: int, delay_ms: float, jitter_ms: float) -> None:
        self.src, self.dst = src, dst
        self.delay, self.jitter = delay_ms / 1000, jitter_ms / 1000
        self.last = 0.0
        self.forwarded = 0
        self.dropped = 0

    def due(self, now: float) -> float:
        due = now + self.delay + (random.uniform(0, self.jitter) if self.jitter else 0.0)
        # Jitter never reorders packets: a real queue delays the ones behind a slow one too.
        self.last = max(due, self.last)
        return self.last

    def deliver(self, packet: bytes) -> None:
        try:
            os.write(self.dst, packet)
            self.forwarded += 1
        except OSError as exc:
            # A full queue or a device going down loses the packet, as a real link would.
            if exc.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL, errno.EBADF):
                raise
            self.dropped += 1


class Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    del signum, frame
    raise Stop


def run(links: Sequence[Link]) -> None:
    """Forward until SIGTERM/SIGINT/SIGHUP.

    A plain select() loop rather than asyncio: select's timeout has microsecond resolution where
    asyncio's epoll timer rounds up to whole milliseconds, which would add up to 1 ms per crossing
    and blur the very RTT differences the lab is about."""
    with contextlib.suppress(OSError):
        # Let the kernel wake us within a microsecond of the deadline, not its default 50 us.
        _libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    with contextlib.suppress(OSError, AttributeError):
        # A busy machine (tests in parallel, 2 cores) must not hold packets back: a descheduled
        # delay line adds milliseconds to one RTT sample and fakes the very signal the lab tests.
        # Real-time priority where allowed (root); the loop sleeps in select(), so it cannot hog.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    fds: list[int] = []
    readers: dict[int, Direction] = {}
    try:
        for link in links:
            a = open_tun(link.a_ns, link.a_if)
            fds.append(a)
            b = open_tun(link.b_ns, link.b_if)
            fds.append(b)
            readers[a] = Direction(a, b, link.ab_ms, link.jitter_ms)
            readers[b] = Direction(b, a, link.ba_ms, link.jitter_ms)
        print("ready", flush=True)
        queue: list[tuple[float, int, Direction, bytes]] = []
        seq = 0
        while True:
            timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
            ready, _, _ = select.select(fds, [], [], timeout)
            now = time.monotonic()
            for fd in ready:
                direction = readers[fd]
                while True:
                    try:
                        packet = os.read(fd, MAX_PACKET)
                    except BlockingIOError:
                        break
                    except OSError:
                        direction.dropped += 1
                        break
                    seq += 1
                    heapq.heappush(queue, (direction.due(now), seq, direction, packet))
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, _, direction, packet = heapq.heappop(queue)
                direction.deliver(packet)
    except Stop:
        pass
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.delay", description=__doc__.split("\n\n")[0])
    parser.add_argument("links", nargs="+", metavar="LINK", help="JSON link spec (see module doc)")
    args = parser.parse_args(argv)
    try:
        links = [Link.from_json(text) for text in args.links]
        run(links)
    except DelayError as exc:
        print(f"lab.delay: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
