"""What runs inside a lab host: listeners (so the prober's SYN gets a SYN+ACK) and the client that
opens connections to darknet addresses, one every `spacing` seconds. One JSON line on stdout per
connection attempt; keeps listening until SIGTERM.

    python -m lab.traffic --listen 22,80 --connect 198.18.0.7:23 --connect ... --spacing 6 --offset 1.5

With --craft it is a stack-less scanner instead (masscan-like): each attempt is one SYN written on
a raw socket, with a TTL of its own (random in 200..255), no TCP options and window 1024; no
socket expects the SYN+ACK, so the kernel answers it with a RST.
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


async def _connect(dst: str, dport: int, limit_s: float) -> dict[str, object]:
    started = time.time()
    try:
        async with asyncio.timeout(limit_s):
            _, writer = await asyncio.open_connection(dst, dport)
        sport = writer.get_extra_info("sockname")[1]
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return {"t": started, "dst": dst, "dport": dport, "sport": sport, "ok": True,
                "connect_s": round(time.time() - started, 6)}
    except (OSError, TimeoutError) as exc:
        error = str(exc) or type(exc).__name__
        return {"t": started, "dst": dst, "dport": dport, "ok": False, "error": error}


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
              limit_s: float, *, craft: bool = False) -> None:
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
            line = _craft(dst, dport) if craft else await _connect(dst, dport, limit_s)
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
    args = parser.parse_args(argv)
    try:
        ports = [int(p) for p in args.listen.split(",") if p]
    except ValueError:
        parser.error(f"--listen: not a list of ports: {args.listen!r}")
    asyncio.run(run(ports, args.connect, args.spacing, args.offset, args.timeout, craft=args.craft))
    return 0


if __name__ == "__main__":
    sys.exit(main())
