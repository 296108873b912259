"""The live analyzer with the Zeek feed: handshake events in over a WebSocket server that speaks
Broker's JSON v1 protocol (as the Zeek helper's tests do), verdict events back out."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from service_harness import Harness, free_port, handshake, open_harness, result, scrape, syn, until
from websockets.asyncio.server import Server, ServerConnection, serve

from analyzer.broker import (
    Count,
    DataMessage,
    Enum,
    Event,
    Port,
    Timespan,
    Timestamp,
    event_frame,
    parse_frame,
)
from analyzer.service import Config
from analyzer.service import serve as serve_analyzer
from lab.redis import RedisServer

ETHER = bytes.fromhex("02000000000102000000000208 00".replace(" ", ""))  # dst, src, IPv4


def handshake_event(uid: str, src: str, dst: str, t: float, tp_us: int) -> Event:
    synack = t + 0.0003
    info = (
        uid,
        Timestamp.from_seconds(t),
        Timespan.from_seconds(t),
        ipaddress.ip_address(src), Port(41000, "tcp"),
        ipaddress.ip_address(dst), Port(23, "tcp"),
        base64.b64encode(ETHER + syn(src, dst, 41000, 23)).decode(),
        1, Enum("LINK_ETHERNET"), Enum("L3_IPV4"), None, None, Count(0x0800),
        Count(1), (Timespan.from_seconds(synack),),
        "ack", Timespan.from_seconds(synack + tp_us / 1e6), Timespan.from_us(tp_us),
    )
    return Event("StepStone::handshake", (info,))


class FakeZeek:
    """Accepts the subscription, sends handshake events, collects what the client publishes."""

    def __init__(self) -> None:
        self.published: asyncio.Queue[DataMessage] = asyncio.Queue()
        self.to_send: asyncio.Queue[str] = asyncio.Queue()
        self.server: Server | None = None

    async def handler(self, ws: ServerConnection) -> None:
        topics = json.loads(await ws.recv())
        assert topics == ["stepstone/handshake"]
        await ws.send(json.dumps({"type": "ack", "endpoint": "fake-zeek", "version": "8.0.10"}))

        async def pump() -> None:
            while True:
                await ws.send(await self.to_send.get())

        sender = asyncio.create_task(pump())
        try:
            async for frame in ws:
                message = parse_frame(frame)
                assert isinstance(message, DataMessage)
                await self.published.put(message)
        finally:
            sender.cancel()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/messages/json"


@pytest.fixture
async def zeek() -> AsyncIterator[FakeZeek]:
    fake = FakeZeek()
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        fake.server = server
        yield fake


@pytest.fixture
async def harness(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(redis_server, tmp_path / "logs") as h:
        yield h


async def test_zeek_handshakes_get_verdicts_back_in_zeek(
    harness: Harness, zeek: FakeZeek
) -> None:
    port = free_port()
    config = Config(redis_url=harness.url, handshakes=False, zeek_url=zeek.url, log_dir=harness.log_dir,
                    consumer="z1", metrics_port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_analyzer(config, stop=stop))
    try:
        t = time.time()
        await zeek.to_send.put(event_frame("stepstone/handshake",
                                           handshake_event("CzEek1", "198.18.30.1", "198.19.0.7", t, 90_000)))
        (job_id, fields), = await harness.jobs(1)
        assert fields["src"] == "198.18.30.1"
        await harness.answer(result(job_id, "198.18.30.1", t, ping_max=15_000, fa=None))
        (line,) = await harness.verdicts(1)
        message = await asyncio.wait_for(zeek.published.get(), 20)

        async def connected() -> bool:
            metrics = await asyncio.to_thread(scrape, port)
            return metrics.get('stepstone_analyzer_zeek{what="connected"}') == 1

        await until(connected, what="the metrics to show the Zeek link")
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0

    assert line["feed"] == "zeek" and line["tp_us"] == 90_000 and line["dport"] == 23
    assert line["fp"] is not None and line["fp"].startswith("unix:Linux")  # SYN found behind Ethernet
    assert line["verdict"]["relay"] is True
    assert message.topic == "stepstone/verdict"
    assert message.event is not None and message.event.name == "StepStone::verdict"
    values: Any = message.event.args[0]
    assert str(values[0]) == "198.18.30.1" and values[3] is True  # src, relay


async def test_zeek_unreachable_does_not_stop_the_redis_feed(harness: Harness) -> None:
    """Zeek down: the client keeps reconnecting; handshakes from Redis still reach verdicts."""
    config = Config(redis_url=harness.url, handshakes=True, zeek_url="ws://127.0.0.1:9/v1/messages/json",
                    log_dir=harness.log_dir, consumer="z2")
    stop = asyncio.Event()
    task = asyncio.create_task(serve_analyzer(config, stop=stop))
    try:
        h = handshake("198.18.31.1", "198.19.0.1", t=time.time())
        await harness.send(h)
        (job_id, _), = await harness.jobs(1)
        await harness.answer(result(job_id, h.src, h.t, ping_max=30_000, fa=None))
        (line,) = await harness.verdicts(1)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0
    assert line["src"] == h.src

