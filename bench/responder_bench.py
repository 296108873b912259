"""How many handshakes per second the responder completes and hands to Redis.

Two network namespaces joined by a veth pair; the client opens N connections to random darknet
addresses and ports with C in flight; we time from the first connection to the moment all N are on
the stream. Needs root. Prints numbers; asserts nothing.

    sudo .venv/bin/python bench/responder_bench.py [-n 5000] [-c 64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import redis

from lab.netns import Network
from lab.process import wait_for
from lab.redis import RedisServer

CLIENT = """
import asyncio, random, sys, time
n, c = int(sys.argv[1]), int(sys.argv[2])
async def one(i):
    _, w = await asyncio.open_connection(f"198.18.{random.randint(0, 255)}.{random.randint(1, 254)}",
                                         random.randint(1, 65535))
    w.close()
async def main():
    sem = asyncio.Semaphore(c)
    async def bounded(i):
        async with sem:
            await one(i)
    await asyncio.gather(*(bounded(i) for i in range(n)))
asyncio.run(main())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="connections")
    parser.add_argument("-c", type=int, default=64, help="connections in flight")
    args = parser.parse_args()
    with RedisServer() as server, Network() as net:
        sensor, client = net.add("bs"), net.add("bc")
        net.link(sensor, "198.19.0.1/24", client, "198.19.0.2/24")
        client.run("ip", "route", "add", "198.18.0.0/16", "via", "198.19.0.1")
        # A short-lived client burns through ephemeral ports: widen the range, reuse TIME_WAIT.
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        client.sysctl("net.ipv4.tcp_tw_reuse", 1)
        proc = sensor.python("-m", "responder.cli", "run", "--darknet", "198.18.0.0/16",
                             "--redis", server.url, stderr=subprocess.DEVNULL)
        r = redis.Redis(unix_socket_path=str(server.socket))
        try:
            wait_for(lambda: "stepstone_responder" in sensor.run("nft", "list", "tables"), 15, "responder")
            start = time.monotonic()
            client.run(sys.executable, "-c", CLIENT, str(args.n), str(args.c))
            client_done = time.monotonic() - start
            wait_for(lambda: r.xlen("stepstone:handshakes") >= args.n, 120, "all handshakes on the stream")
            total = time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(15)
            r.close()
    print(f"responder: {args.n} handshakes, {args.c} in flight")
    print(f"  client finished after {client_done:.2f} s; all on the Redis stream after {total:.2f} s")
    print(f"  {args.n / total:.0f} handshakes/s end to end "
          "(client, kernel, responder and Redis sharing the machine's cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
