"""Server-first banners (`stepstone-responder run --banners FILE`): on the ports the operator names,
the responder sends one banner after the handshake, times the client's first data and closes.

What it measures (issue 10 item 2, analyzer/rules.py `cond_app`): T^app, from our banner leaving
to the client's first data byte arriving. A direct client answers one path RTT after the banner
(plus its own processing); behind a terminating proxy (socat, SOCKS, `ssh -D`) the banner crosses
the proxy's onward leg to the real client and the answer comes back the same way, a delay that
neither the SYN nor ping shows.

This is not a honeypot: one banner out, at most MAX_APP_DATA bytes in, then close. No session is
kept and nothing else is ever sent.

Timing: the banner's time is the wall clock read just before the send (the send itself goes
straight to an empty socket buffer); the data's time is the kernel's receive timestamp of the
segment (SO_TIMESTAMPNS), so a busy event loop that notices the data late does not add to T^app.
Without a usable kernel timestamp, the wall clock when recvmsg returns is used.

The file (TOML):

    [banners]
    22 = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\\r\\n"

Banners are sent byte for byte as Latin-1: each character U+0000..U+00FF is one byte, so a TOML
escape "\\u00ff" is the byte 0xff (Telnet's IAC); a character beyond U+00FF is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from analyzer.handshake import MAX_APP_DATA, Handshake
from prober.job import DURATION_MAX_US, short

MAX_BANNER = 1024  # bytes; real banners are a line or two
DEFAULT_TIMEOUT = 5.0  # seconds to wait for the client's first data
MAX_TIMEOUT = 300.0
# Banner exchanges open at once, at most: each holds a socket until the client answers or the
# timeout; beyond this a connection is reported at once, without a banner (counted as dropped).
DEFAULT_SESSIONS = 512

# Not exported by Python's socket module (asm-generic/socket.h): SO_TIMESTAMPNS_OLD, whose control
# message (SCM_TIMESTAMPNS, the same number) carries a struct timespec of two native longs.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")


class BannerError(ValueError):
    """A banners file that does not follow the format; the message names the file and the fault."""


def load_banners(path: str | Path) -> dict[int, bytes]:
    """The banner per port from a TOML file, or BannerError saying what is wrong (one line)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise BannerError(f"--banners {short(str(path))}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BannerError(f"--banners {short(str(path))}: not TOML: {exc}") from None
    return parse_banners(doc, str(path))


def parse_banners(doc: dict[str, object], name: str = "banners") -> dict[int, bytes]:
    where = f"--banners {short(name)}"
    unknown = sorted(set(doc) - {"banners"})
    if unknown:
        raise BannerError(f"{where}: unknown key {short(unknown[0])} (expected one [banners] table)")
    table = doc.get("banners")
    if not isinstance(table, dict) or not table:
        raise BannerError(f"{where}: no [banners] table with at least one port = \"banner\"")
    out: dict[int, bytes] = {}
    for key, value in table.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 5) or not 0 < int(key) < 65536:
            raise BannerError(f"{where}: {short(key)} is not a TCP port 1..65535")
        port = int(key)
        if port in out:  # "22" and "022" are two TOML keys but one port
            raise BannerError(f"{where}: port {port} is given twice")
        if not isinstance(value, str):
            raise BannerError(f"{where}: port {port}: the banner must be a string, not {short(value)}")
        try:
            banner = value.encode("latin-1")
        except UnicodeEncodeError:
            raise BannerError(f"{where}: port {port}: a character beyond U+00FF (banners are "
                              "bytes, written as Latin-1 or \\u00XX escapes)") from None
        if not 0 < len(banner) <= MAX_BANNER:
            raise BannerError(f"{where}: port {port}: the banner must be 1..{MAX_BANNER} bytes, "
                              f"not {len(banner)}")
        out[port] = banner
    return out


@dataclass
class Banners:
    """The banner exchanges of one responder: what to send where, how long to wait, and counts."""

    banners: dict[int, bytes]
    timeout: float = DEFAULT_TIMEOUT
    limit: int = DEFAULT_SESSIONS
    sent: int = 0  # banners sent
    answered: int = 0  # clients that sent data after the banner (tapp_us set)
    silent: int = 0  # no data before the timeout, or the client closed without data
    early: int = 0  # the client spoke before our banner: no timing
    dropped: int = 0  # connections to a banner port past `limit`: reported without a banner
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def active(self) -> int:
        return len(self._tasks)

    def wants(self, handshake: Handshake) -> bool:
        return handshake.dport in self.banners

    def start(self, conn: socket.socket, handshake: Handshake, report: Callable[[Handshake], None]) -> None:
        """Run the exchange on `conn` (ours from now on) as its own task; `report` gets the
        handshake when it ends, with tapp_us/app_data or without. Never blocks the caller."""
        if len(self._tasks) >= self.limit:
            self.dropped += 1
            with contextlib.suppress(OSError):
                conn.close()
            report(handshake)
            return
        task = asyncio.create_task(self._session(conn, handshake, report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel the open exchanges; each still reports its handshake (without timing)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _session(self, conn: socket.socket, handshake: Handshake,
                       report: Callable[[Handshake], None]) -> None:
        result: tuple[int, bytes] | None = None
        try:
            result = await self.exchange(conn, self.banners[handshake.dport])
        except OSError:
            pass  # reset by the client, or gone: the handshake still counts, without timing
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            if result is not None:
                self.answered += 1
                handshake = dataclasses.replace(handshake, tapp_us=result[0], app_data=result[1])
            report(handshake)

    async def exchange(self, conn: socket.socket, banner: bytes) -> tuple[int, bytes] | None:
        """Send `banner`, wait for the client's first data: (tapp_us, its first bytes), or None."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        with contextlib.suppress(OSError):  # without it: the wall clock at recvmsg
            conn.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if _readable_now(conn):
            self.early += 1  # data before any banner answers nothing of ours
            return None
        sent_at = time.time()
        await loop.sock_sendall(conn, banner)
        self.sent += 1
        try:
            async with asyncio.timeout(self.timeout):
                await _wait_readable(loop, conn)
        except TimeoutError:
            self.silent += 1
            return None
        data, ancdata, _flags, _addr = conn.recvmsg(MAX_APP_DATA, socket.CMSG_SPACE(_TIMESPEC.size))
        now = time.time()
        if not data:
            self.silent += 1  # closed without a word
            return None
        arrived = now
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(payload)
                stamp = sec + nsec / 1e9
                if sent_at - 1.0 <= stamp <= now:  # plausible: a kernel stamp, not junk
                    arrived = stamp
        if arrived < sent_at:
            self.early += 1  # it arrived before our banner left: an answer to nothing of ours
            return None
        tapp_us = round((arrived - sent_at) * 1e6)
        return (tapp_us, data[:MAX_APP_DATA]) if tapp_us <= DURATION_MAX_US else None


def _readable_now(conn: socket.socket) -> bool:
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False


async def _wait_readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Until `conn` has data (or EOF); the data stays for recvmsg, which reads its timestamp."""
    ready = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
