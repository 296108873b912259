"""Both ends of the live analyzer's Redis streams, for its tests: the responder's (XADD handshakes)
and the prober's (read `jobs`, XADD `results` in the prober's format); plus real SYN packets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from scapy.layers.inet import IP, TCP

from analyzer.handshake import Handshake
from analyzer.service import Config, serve
from lab.redis import RedisServer
from osfp.fingerprinter import Fingerprinter
from prober.job import Result

ROOT = Path(__file__).resolve().parents[1]
P = "stepstone:"
LINUX_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
WINDOWS_OPTS = [("MSS", 1460), ("NOP", None), ("WScale", 8), ("NOP", None), ("NOP", None), ("SAckOK", b"")]


def syn(src: str, dst: str, sport: int, dport: int, *, windows: bool = False) -> bytes:
    """A real SYN as Linux (or Windows) sends it: p0f labels it from the project's database."""
    return bytes(
        IP(src=src, dst=dst, ttl=128 if windows else 64, flags="DF", id=4321)
        / TCP(sport=sport, dport=dport, flags="S", seq=1000, window=64240,
              options=WINDOWS_OPTS if windows else LINUX_OPTS)
    )


def label(packet: bytes) -> str | None:
    return Fingerprinter().fingerprint(packet).label


def handshake(src: str, dst: str, *, t: float, tp_us: int | None = 20_000, answered: bool = True,
              sport: int = 40000, dport: int = 22, windows: bool = False) -> Handshake:
    synack = t + 0.0002
    return Handshake(
        t=t, src=src, sport=sport, dst=dst, dport=dport, syn=syn(src, dst, sport, dport, windows=windows),
        synack_times=(synack,), reply="ack" if answered else None,
        reply_time=synack + (tp_us or 0) / 1e6 if answered else None,
        tp_us=tp_us if answered else None, feed="responder",
    )


def result(job: str, src: str, t: float, *, ping_max: int, fa: str | None, ping_min: int | None = None
           ) -> Result:
    low = ping_min if ping_min is not None else ping_max * 8 // 10
    return Result(job=job, src=src, t=t, ping_min_us=low, ping_avg_us=(low + ping_max) // 2,
                  ping_max_us=ping_max, ping_var_us2=1.5e6, ping_loss=0.0, syn_rtt_us=ping_max,
                  fa=fa, fa_port=22 if fa else None, probed_at=t + 0.5)


async def until(check: Callable[[], Awaitable[Any]], within: float = 20.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (a condition with a timeout, not a sleep)."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a log (a reader can catch the service in the middle of a write)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines() if x.strip()]


class Harness:
    """One Redis; the responder's and the prober's ends of the streams."""

    def __init__(self, server: RedisServer, log_dir: Path) -> None:
        self.url = server.url
        self.r = aioredis.from_url(server.url, decode_responses=True)
        self.log_dir = log_dir

    async def send(self, h: Handshake) -> str:
        return str(await self.r.xadd(P + "handshakes", h.to_fields()))

    async def jobs(self, n: int) -> list[tuple[str, dict[str, str]]]:
        async def enough() -> Any:
            entries = await self.r.xrange(P + "jobs")
            return entries if len(entries) >= n else None

        return list(await until(enough, what=f"{n} jobs"))

    async def answer(self, res: Result) -> None:
        await self.r.xadd(P + "results", res.fields())  # type: ignore[arg-type]

    async def verdicts(self, n: int) -> list[dict[str, Any]]:
        """The first `n` records.log lines: one per measured handshake, with its source's verdict."""
        async def enough() -> Any:
            got = lines(self.log_dir / "records.log")
            return got if len(got) >= n else None

        return list(await until(enough, what=f"{n} lines in records.log"))


@contextlib.asynccontextmanager
async def open_harness(server: RedisServer, log_dir: Path) -> AsyncIterator[Harness]:
    h = Harness(server, log_dir)
    try:
        yield h
    finally:
        await h.r.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for row in text.splitlines():
        if row and not row.startswith("#"):
            name, value = row.rsplit(" ", 1)
            out[name] = float(value)
    return out


@contextlib.asynccontextmanager
async def running_service(h: Harness, **overrides: Any) -> AsyncIterator[Config]:
    """The analyzer service in this process (fast), on the harness's Redis and log dir, consumer
    a1 unless overridden; when the block ends it must stop cleanly (exit status 0)."""
    settings: dict[str, Any] = {"consumer": "a1", **overrides}
    config = Config(redis_url=h.url, handshakes=True, zeek_url=None, log_dir=h.log_dir, **settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop))
    try:
        yield config
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0
