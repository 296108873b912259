"""The analyzer's own Zeek client (`analyzer.zeek.ZeekClient`) against the real zeek on PATH with
the package's WebSocket listener: every handshake of the recorded trace arrives as the `Handshake`
the analyzer works with, on the Zeek versions the package claims (8.0 sends [name, args]; 7.0's
Broker adds a metadata element). Zeek runs the btest script websocket-listener.zeek, which holds
the trace until a client publishes Test::go. Skipped without a zeek binary on PATH."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from service_harness import free_port

from analyzer.broker import Count, Event
from analyzer.handshake import Handshake
from analyzer.zeek import VERDICT_TOPIC, ZeekClient

ROOT = Path(__file__).resolve().parents[1]
BTEST = ROOT / "tests" / "btest"

pytestmark = pytest.mark.zeek

# (source, sport) -> (reply, T^p in µs, SYN+ACKs): Traces/README.md's six cases.
EXPECTED = {
    ("203.0.113.10", 40001): ("ack", 20_000, 1),
    ("203.0.113.11", 40002): ("ack", None, 2),
    ("203.0.113.12", 40003): ("rst", 30_000, 1),
    ("203.0.113.13", 40004): (None, None, 1),
    ("2001:db8::10", 40005): ("ack", 40_000, 1),
    ("203.0.113.14", 40006): ("ack", 10_000, 1),
}


async def test_the_analyzers_client_gets_every_handshake_from_the_real_zeek(tmp_path: Path) -> None:
    zeek = shutil.which("zeek")
    if zeek is None:
        pytest.skip("no zeek binary on PATH")
    port = free_port()
    env = os.environ | {"WS_PORT": f"{port}/tcp", "ZEEK_SEED_FILE": str(BTEST / "Files" / "random.seed")}
    proc = await asyncio.create_subprocess_exec(
        zeek, "-b", "-r", str(BTEST / "Traces" / "handshakes.pcap"), str(ROOT / "zeek-scripts"),
        str(BTEST / "tests" / "websocket-listener.zeek"),
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        client = ZeekClient(f"ws://127.0.0.1:{port}/v1/messages/json", backoff_initial=0.1, backoff_max=0.5)
        got: list[Handshake] = []
        async with client:
            # Queued until the subscription is acknowledged, then sent: Zeek starts reading.
            await client.publish(VERDICT_TOPIC, Event("Test::go", ()))

            async def collect() -> None:
                async for h in client.handshakes():
                    got.append(h)
                    if len(got) == len(EXPECTED):
                        return

            await asyncio.wait_for(collect(), 60)
            sent = await client.publish(VERDICT_TOPIC, Event("Test::done", (Count(len(got)), "")))
            assert await asyncio.wait_for(sent, 10)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"the client received 6 handshakes" in out
    assert {(h.src, h.sport): (h.reply, h.tp_us, len(h.synack_times)) for h in got} == EXPECTED
    for h in got:
        assert h.feed == "zeek" and h.syn is not None and h.dst in ("198.18.0.5", "2001:db8:ffff::5")
