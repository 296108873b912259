"""What runs inside a lab host: listeners (so the prober's SYN gets a SYN+ACK) and the client that
opens connections to darknet addresses, one every `spacing` seconds. One JSON line on stdout per
connection attempt; keeps listening until SIGTERM.

    python -m lab.traffic --listen 22,80 --connect 198.18.0.7:23 --connect ... --spacing 6 --offset 1.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence


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


async def run(listen: Sequence[int], targets: Sequence[tuple[str, int]], spacing: float, offset: float,
              limit_s: float) -> None:
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
            print(json.dumps(await _connect(dst, dport, limit_s)), flush=True)

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
    args = parser.parse_args(argv)
    try:
        ports = [int(p) for p in args.listen.split(",") if p]
    except ValueError:
        parser.error(f"--listen: not a list of ports: {args.listen!r}")
    asyncio.run(run(ports, args.connect, args.spacing, args.offset, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
