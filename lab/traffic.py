"""What runs inside a lab host: listeners (so the prober's SYN gets a SYN+ACK) and the client that
opens connections to darknet addresses, one every `spacing` seconds. One JSON line on stdout per
connection attempt; keeps listening until SIGTERM.

    python -m lab.traffic --listen 22,80 --connect 198.18.0.7:23 --connect ... --spacing 6 --offset 1.5

With --craft it is a stack-less scanner instead (masscan-like): each attempt is one SYN written on
a raw socket, with a TTL of its own (random in 200..255), no TCP options and window 1024; no
socket expects the SYN+ACK, so the kernel answers it with a RST.

With --client ssh|smtp it is a server-first client: each connection reads the server's banner line,
waits --think-ms (the client's own processing), sends one line (CLIENT_LINES), waits for the server
to close and closes. With --socks ADDR:PORT every connection goes through that SOCKS5 proxy
(no authentication, CONNECT to the target), as a client behind a SOCKS relay does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence

from osfp.checksum import internet_checksum

CLIENT_LINES: dict[str, bytes] = {
    "ssh": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "smtp": b"EHLO client.example\r\n",
}
MAX_BANNER = 1024  # a banner line longer than this is not one


class SocksError(OSError):
    pass


def socks5_request(dst: str, dport: int) -> bytes:
    """SOCKS5 (RFC 1928) CONNECT to an IPv4 address: VER 5, CMD 1, RSV, ATYP 1, address, port."""
    return b"\x05\x01\x00\x01" + socket.inet_aton(dst) + struct.pack("!H", dport)


async def socks5_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dst: str,
                         dport: int) -> None:
    """The client's side of a SOCKS5 CONNECT, no authentication; raises SocksError on refusal."""
    writer.write(b"\x05\x01\x00")  # VER 5, one method: 0 (no authentication)
    await writer.drain()
    try:
        chosen = await reader.readexactly(2)
        if chosen != b"\x05\x00":
            raise SocksError(f"SOCKS server refused no-authentication: {chosen.hex()}")
        writer.write(socks5_request(dst, dport))
        await writer.drain()
        head = await reader.readexactly(4)  # VER, REP, RSV, ATYP
        if head[0] != 5 or head[1] != 0:
            raise SocksError(f"SOCKS CONNECT to {dst}:{dport} refused: reply {head[1]}")
        # The bound address: IPv4, IPv6 or a name (length byte first), then the port.
        size = {1: 4, 4: 16}.get(head[3])
        if size is None:
            if head[3] != 3:
                raise SocksError(f"SOCKS reply with address type {head[3]}")
            size = (await reader.readexactly(1))[0]
        await reader.readexactly(size + 2)
    except asyncio.IncompleteReadError:
        raise SocksError("SOCKS server closed the connection during the handshake") from None


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, not {text!r}")
    return host, int(port)


async def _serve(port: int) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        del reader
        writer.close()

    return await asyncio.start_server(answer, "0.0.0.0", port, reuse_address=True)


async def _open(dst: str, dport: int, socks: tuple[str, int] | None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if socks is None:
        return await asyncio.open_connection(dst, dport)
    reader, writer = await asyncio.open_connection(*socks)
    try:
        await socks5_connect(reader, writer, dst, dport)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str,
                    think_s: float, limit_s: float) -> dict[str, object]:
    """A server-first client's exchange: the banner line, think, one line back, the server's close."""
    start = time.monotonic()
    out: dict[str, object] = {"client": client, "banner": False, "answered": False}
    try:
        async with asyncio.timeout(limit_s):
            banner = await reader.readline()
        if not banner.endswith(b"\n") or len(banner) > MAX_BANNER:
            return out  # no banner (closed at once, or not a line): nothing to answer
        out["banner"] = True
        out["banner_s"] = round(time.monotonic() - start, 6)
        if think_s > 0:
            await asyncio.sleep(think_s)  # the client's own processing: simulated, not a wait on anything
        writer.write(CLIENT_LINES[client])
        await writer.drain()
        out["answered"] = True
        # The server reads our line and closes; leave when it has, so we never reset it first.
        async with asyncio.timeout(limit_s):
            while await reader.read(4096):
                pass
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a line over the reader's limit
        out["error"] = str(exc) or type(exc).__name__
    return out


async def _connect(dst: str, dport: int, limit_s: float, *, client: str | None = None, think_s: float = 0.0,
                   socks: tuple[str, int] | None = None) -> dict[str, object]:
    started = time.time()
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await _open(dst, dport, socks)
    except (OSError, TimeoutError) as exc:
        error = str(exc) or type(exc).__name__
        return {"t": started, "dst": dst, "dport": dport, "ok": False, "error": error}
    line: dict[str, object] = {"t": started, "dst": dst, "dport": dport,
                               "sport": writer.get_extra_info("sockname")[1], "ok": True,
                               "connect_s": round(time.time() - started, 6)}
    try:
        if client is not None:
            line.update(await _converse(reader, writer, client, think_s, limit_s))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return line


CRAFT_WINDOW = 1024  # masscan's default window
CRAFT_TTL = (200, 255)  # a TTL per SYN, as scanners that randomise it do


def crafted_syn(src: str, dst: str, sport: int, dport: int, *, ttl: int, seq: int) -> bytes:
    """An IPv4 SYN as a stack-less scanner writes it: no options, window 1024, IP ID random."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, CRAFT_WINDOW, 0, 0)
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", internet_checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, ttl, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return ip + tcp


def _craft(dst: str, dport: int) -> dict[str, object]:
    started = time.time()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((dst, dport))  # sends nothing: picks the source address the route gives
            src = probe.getsockname()[0]
        sport, ttl = random.randint(40000, 60000), random.randint(*CRAFT_TTL)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(crafted_syn(src, dst, sport, dport, ttl=ttl, seq=random.getrandbits(32)), (dst, 0))
        return {"t": started, "dst": dst, "dport": dport, "sport": sport, "ok": True, "crafted": True,
                "ttl": ttl}
    except OSError as exc:
        return {"t": started, "dst": dst, "dport": dport, "ok": False, "error": str(exc)}


async def run(listen: Sequence[int], targets: Sequence[tuple[str, int]], spacing: float, offset: float,
              limit_s: float, *, craft: bool = False, client: str | None = None, think_s: float = 0.0,
              socks: tuple[str, int] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    servers = [await _serve(port) for port in listen]
    print(json.dumps({"ready": True, "listen": list(listen)}), flush=True)
    try:
        start = loop.time() + offset
        pending: set[asyncio.Task[None]] = set()

        async def one(dst: str, dport: int) -> None:
            line = (_craft(dst, dport) if craft else
                    await _connect(dst, dport, limit_s, client=client, think_s=think_s, socks=socks))
            print(json.dumps(line), flush=True)

        for i, (dst, dport) in enumerate(targets):
            with contextlib.suppress(TimeoutError):
                # Waiting for the schedule or for a stop request, whichever first.
                async with asyncio.timeout_at(start + i * spacing):
                    await stop.wait()
            if stop.is_set():
                break
            task = asyncio.create_task(one(dst, dport))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)
        print(json.dumps({"done": True}), flush=True)
        await stop.wait()
    finally:
        for server in servers:
            server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="", help="comma-separated TCP ports to accept on")
    parser.add_argument("--connect", type=_target, action="append", default=[], metavar="ADDR:PORT")
    parser.add_argument("--spacing", type=float, default=5.0, help="seconds between connections")
    parser.add_argument("--offset", type=float, default=0.0, help="seconds before the first connection")
    parser.add_argument("--timeout", type=float, default=5.0, help="per connection attempt")
    parser.add_argument("--craft", action="store_true",
                        help="send crafted SYNs on a raw socket instead of connecting (a stack-less scanner)")
    parser.add_argument("--client", choices=sorted(CLIENT_LINES),
                        help="a server-first client: read the banner, think, answer one line, close")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="--client: milliseconds between the banner and the answer")
    parser.add_argument("--socks", type=_target, metavar="ADDR:PORT",
                        help="connect through this SOCKS5 proxy (CONNECT, no authentication)")
    args = parser.parse_args(argv)
    try:
        ports = [int(p) for p in args.listen.split(",") if p]
    except ValueError:
        parser.error(f"--listen: not a list of ports: {args.listen!r}")
    if args.think_ms < 0 or (args.think_ms and not args.client):
        parser.error("--think-ms must be >= 0 and needs --client")
    asyncio.run(run(ports, args.connect, args.spacing, args.offset, args.timeout, craft=args.craft,
                    client=args.client, think_s=args.think_ms / 1000, socks=args.socks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
