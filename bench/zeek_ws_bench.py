"""Zeek link speed: how many `StepStone::handshake` events per second the analyzer's WebSocket client
takes in, and how many verdicts per second it sends out.

Measures, on loopback against a local WebSocket server that sends frames exactly as Zeek would:
  - decoding alone: `parse_frame` + `handshake_from_event` (Broker JSON -> Handshake, SYN IP bytes
    found in the Ethernet frame) on one thread;
  - end to end: N frames sent by the server, N `Handshake`s out of `ZeekClient.handshakes()`;
  - verdicts: M `publish_verdict` calls until the server has parsed all M events.
For scale: a /16 darknet sees about 5,700 packets/s (ORION's average rate, REFERENCES.md), of which
connection requests are a part. Noisy on a shared machine: run it twice.

    python bench/zeek_ws_bench.py [--handshakes 20000] [--verdicts 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import struct
import time

from websockets.asyncio.server import ServerConnection, serve

from analyzer import broker
from analyzer.broker import Count, Enum, Event, Port, Timespan, Timestamp
from analyzer.zeek import HANDSHAKE_EVENT, HANDSHAKE_TOPIC, ZeekClient, handshake_from_event

ACK = b'{"type":"ack","endpoint":"bench-websocket-0","version":"8.0.10"}'


def syn_frame(i: int) -> bytes:
    """An Ethernet + IPv4 + TCP SYN with Linux-like options (checksums left zero: not checked)."""
    options = struct.pack("!BBH BB BBII B BBB", 2, 4, 1460, 4, 2, 8, 10, i, 0, 1, 3, 3, 7)
    tcp = struct.pack("!HHIIBBHHH", 40000 + i % 20000, 23, i, 0, 10 << 4, 2, 64240, 0, 0) + options
    src = bytes([203, 0, 113, i % 250 + 1])
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0x4000, 50, 6, 0, src, bytes([198, 18, 0, 5])
    )
    return bytes(12) + b"\x08\x00" + ip + tcp


def handshake_frame(i: int) -> bytes:
    t = 1764212880.0 + i * 0.001
    info = (
        f"C{i:017d}",
        Timestamp(round(t * 1000) * 1_000_000),
        Timespan.from_seconds(t),
        ipaddress.ip_address(f"203.0.113.{i % 250 + 1}"),
        Port(40000 + i % 20000, "tcp"),
        ipaddress.ip_address("198.18.0.5"),
        Port(23, "tcp"),
        base64.b64encode(syn_frame(i)).decode(),
        1,
        Enum("LINK_ETHERNET"),
        Enum("L3_IPV4"),
        None,
        None,
        Count(0x0800),
        Count(1),
        (Timespan.from_seconds(t + 0.0001),),
        "ack",
        Timespan.from_seconds(t + 0.0201),
        Timespan(20_000_000),
    )
    return broker.event_frame(HANDSHAKE_TOPIC, Event(HANDSHAKE_EVENT, (info,))).encode()


VERDICT = {
    "src": "203.0.113.20",
    "cond_os": False,
    "cond_timing": True,
    "relay": True,
    "tp_mean_us": 155000.0,
    "ta_max_mean_us": 12250.0,
    "samples": 2,
}
RECORD = {
    "t": 1764212880.123456,
    "src": "203.0.113.20",
    "dst": "198.18.0.6",
    "tp_us": 150000,
    "ping_min_us": 4000,
    "ping_avg_us": 8000,
    "ping_max_us": 12500,
    "ping_var_us2": 4.0,
    "syn_rtt_us": 9000,
    "fp": "unix:Linux:3.11 and newer",
    "fa": None,
}


def bench_decode(frames: list[bytes]) -> float:
    start = time.perf_counter()
    for frame in frames:
        message = broker.parse_frame(frame)
        assert isinstance(message, broker.DataMessage) and message.event is not None
        handshake_from_event(message.event)
    return len(frames) / (time.perf_counter() - start)


async def bench_link(frames: list[bytes], verdicts: int) -> tuple[float, float]:
    received = 0
    all_verdicts = asyncio.Event()
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        nonlocal received
        await ws.recv()
        await ws.send(ACK, text=True)
        await go.wait()
        for frame in frames:
            await ws.send(frame, text=True)
        async for text in ws:
            broker.parse_frame(text)
            received += 1
            if received == verdicts:
                all_verdicts.set()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = ZeekClient(f"ws://127.0.0.1:{port}/v1/messages/json")
        stream = client.handshakes()
        client.start()
        await client.connected.wait()
        start = time.perf_counter()
        go.set()
        for _ in frames:
            await anext(stream)
        in_rate = len(frames) / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(verdicts):
            await client.publish_verdict(VERDICT, RECORD)
        await all_verdicts.wait()
        out_rate = verdicts / (time.perf_counter() - start)
        await client.close()
    return in_rate, out_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=20000)
    parser.add_argument("--verdicts", type=int, default=5000)
    args = parser.parse_args()
    frames = [handshake_frame(i) for i in range(args.handshakes)]
    print(f"frame size: {len(frames[0])} bytes")
    print(f"decode only:      {bench_decode(frames):10,.0f} handshakes/s")
    in_rate, out_rate = asyncio.run(bench_link(frames, args.verdicts))
    print(f"end to end (ws):  {in_rate:10,.0f} handshakes/s")
    print(f"verdicts out:     {out_rate:10,.0f} verdicts/s")


if __name__ == "__main__":
    main()
