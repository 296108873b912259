"""The analyzer's own Zeek client (`analyzer.zeek.ZeekClient`) against the real zeek on PATH with
the package's WebSocket listener: every handshake of the recorded trace arrives as the `Handshake`
the analyzer works with, on the Zeek versions the package claims (8.0 sends [name, args]; 7.0's
Broker adds a metadata element). Zeek runs the btest script websocket-listener.zeek, which holds
the trace until a client publishes Test::go. Skipped without a zeek binary on PATH."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections import Counter
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


async def _handshakes_from_the_real_zeek(trace: Path, n: int, tmp_path: Path) -> list[Handshake]:
    """The n handshakes the analyzer's client receives from the real zeek reading `trace` with the
    package's WebSocket listener (btest websocket-listener.zeek); Zeek must then exit cleanly."""
    zeek = shutil.which("zeek")
    if zeek is None:
        pytest.skip("no zeek binary on PATH")
    port = free_port()
    env = os.environ | {"WS_PORT": f"{port}/tcp", "ZEEK_SEED_FILE": str(BTEST / "Files" / "random.seed")}
    proc = await asyncio.create_subprocess_exec(
        zeek, "-b", "-r", str(trace), str(ROOT / "zeek-scripts"),
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
                    if len(got) == n:
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
    assert f"the client received {n} handshakes".encode() in out
    return got


async def test_the_analyzers_client_gets_every_handshake_from_the_real_zeek(tmp_path: Path) -> None:
    got = await _handshakes_from_the_real_zeek(BTEST / "Traces" / "handshakes.pcap", len(EXPECTED), tmp_path)
    assert {(h.src, h.sport): (h.reply, h.tp_us, len(h.synack_times)) for h in got} == EXPECTED
    for h in got:
        assert h.feed == "zeek" and h.syn is not None and h.dst in ("198.18.0.5", "2001:db8:ffff::5")
        assert h.tapp_us is None and h.app_data is None  # no banner in this trace


async def test_banner_timing_arrives_from_the_real_zeek(tmp_path: Path) -> None:
    """tapp and the client's bytes (app.zeek) as the analyzer gets them, on the capture the btest
    app-timing.zeek reads (Scripts/mkapp.py): microseconds exact on every Zeek version (an
    interval crosses the WebSocket in nanoseconds), binary bytes intact, 64 at most."""
    trace = tmp_path / "app.pcap"
    mkapp = BTEST / "Scripts" / "mkapp.py"
    writer = await asyncio.create_subprocess_exec(sys.executable, str(mkapp), str(trace),
                                                  stdout=asyncio.subprocess.DEVNULL)
    assert await writer.wait() == 0
    # The last case is held when the trace ends; a Zeek with a listener runs on without time
    # passing, so it goes out only when Zeek stops, to no one: 12 of the 13 arrive.
    got = await _handshakes_from_the_real_zeek(trace, 12, tmp_path)
    by_port = {h.sport: (h.dport, h.reply, h.tapp_us, h.app_data) for h in got}
    ssh = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"
    assert by_port == {
        41001: (22, "ack", 37_500, ssh),
        41002: (22, "ack", 20_250, ssh),
        41003: (25, "ack", 80_000, b"EHLO " + b"x" * 59),
        41004: (23, "ack", 21_000, bytes.fromhex("fffc18fffc20fffc23fffc27")),
        41005: (80, "ack", None, None),  # not a server-first port
        41006: (22, "ack", None, None),  # silent client
        41007: (22, "ack", 30_000, ssh),  # its version before the banner, key exchange after
        41008: (23, "ack", None, None),  # FIN, no banner
        41009: (22, "ack", None, None),  # RST after the banner
        41010: (22, "rst", None, None),
        41012: (22, "ack", None, None),  # spoke before the banner, never after
        41013: (22, "ack", 25_000, ssh),  # a version racing the banner is not its answer
    }
    assert all(h.tp_us == (30_000 if h.reply == "rst" else 20_000) for h in got)


async def test_the_real_zeek_confirms_each_verdict_after_logging_it(tmp_path: Path) -> None:
    """Verdicts through the analyzer's client to a live Zeek with the package: each future becomes
    True on Zeek's StepStone::verdict_ack, by which time the verdict is in stepstone.log (and a
    confident relay in notice.log). Zeek sends the confirmation after Log::write and NOTICE."""
    from analyzer.record import Record
    from analyzer.rules import judge
    from tests.test_zeek_client import RECORD

    zeek = shutil.which("zeek")
    if zeek is None:
        pytest.skip("no zeek binary on PATH")
    port = free_port()
    site = tmp_path / "site.zeek"
    site.write_text(f"redef StepStone::websocket_port = {port}/tcp;\nredef Broker::disable_ssl = T;\n"
                    "redef LogAscii::use_json = T;\n")
    proc = await asyncio.create_subprocess_exec(
        zeek, "-b", str(ROOT / "zeek-scripts"), str(site), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    relay = RECORD.to_dict() | {"tp_us": 150_000, "ping_max_us": 10_000}
    direct = RECORD.to_dict() | {"src": "203.0.113.30", "tp_us": 20_000, "ping_max_us": 20_100}
    try:
        client = ZeekClient(f"ws://127.0.0.1:{port}/v1/messages/json", backoff_initial=0.1, backoff_max=0.5)
        async with client:
            sent = [await client.publish_verdict(judge([Record.from_json(r)]).to_dict(), r)
                    for r in (relay, direct, relay)]
            assert await asyncio.wait_for(asyncio.gather(*sent), 60) == [True, True, True]
            assert client.stats.confirmed == 3 and client.pending == 0
            resent = client.stats.resent
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()

    lines = [json.loads(x) for x in (tmp_path / "stepstone.log").read_text().splitlines()]
    # Zeek 7.0's Broker sometimes drops a connection in its first moments: what it had logged but
    # not yet confirmed is then sent again, and logged again (at least once).
    logged = Counter((x["src"], x["relay_confident"], x.get("noticed_by")) for x in lines)
    assert logged.keys() == {("203.0.113.20", True, "confident"), ("203.0.113.30", False, None)}
    assert logged[("203.0.113.20", True, "confident")] >= 2 and len(lines) <= 3 + resent, (lines, resent)
    # The SYN time behind each verdict, as Zeek logged it: exact on Zeek 8; to the millisecond on
    # Zeek 7.0, whose Broker reads a six-digit fraction as milliseconds (hundreds of seconds off).
    tolerance = 1e-6 if (client.server_version or "").startswith("8.") else 1e-3
    assert all(abs(x["syn_ts"] - RECORD.t) <= tolerance for x in lines), (RECORD.t, lines)
    notices = [json.loads(x) for x in (tmp_path / "notice.log").read_text().splitlines()]
    assert [(n["note"], n["src"]) for n in notices] == [("StepStone::Relay_Detected", "203.0.113.20")]
