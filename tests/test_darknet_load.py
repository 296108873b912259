"""bench/darknet_load.py: the heavy-tailed darknet load lands on a real Redis in the analyzer's
own format, with the mix it claims, the same bytes for the same seed."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

from analyzer.handshake import Handshake
from analyzer.hops import crafted
from lab.redis import RedisServer
from osfp.fingerprinter import Fingerprinter
from prober import streams

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("darknet_load", ROOT / "bench" / "darknet_load.py")
assert _spec is not None and _spec.loader is not None
darknet_load = importlib.util.module_from_spec(_spec)
sys.modules["darknet_load"] = darknet_load  # dataclasses look their module up there
_spec.loader.exec_module(darknet_load)

DARKNET = ipaddress.ip_network("198.18.0.0/16")
START = 1_750_000_000.0
COUNT = 2000


def written(server: RedisServer, load: object) -> tuple[dict[str, float], list[Handshake]]:
    async def go() -> tuple[dict[str, float], list[Handshake]]:
        r = aioredis.from_url(server.url)
        try:
            out = await darknet_load.write(r, "stepstone:handshakes", load, count=COUNT, duration=None,
                                           rate=5000.0, batch=250, start=START)
            rows = await r.execute_command("XRANGE", "stepstone:handshakes", "-", "+", **{NEVER_DECODE: []})
        finally:
            await r.aclose()
        # The analyzer's own boundary: decode the entry, then Handshake.from_fields (which checks).
        return out, [Handshake.from_fields(streams.decode_entry(fields)) for _id, fields in rows]

    return asyncio.run(go())


def test_load_on_redis_follows_the_contract_and_the_mix(redis_server: RedisServer) -> None:
    load = darknet_load.DarknetLoad(DARKNET, 5000, seed=7)
    out, hs = written(redis_server, load)
    assert out["handshakes"] == COUNT == len(hs)
    assert out["round_trips"] == COUNT // 250  # pipelined

    kind = {s.addr: s for s in load.pool}
    by_kind = Counter(kind[h.src].kind for h in hs)
    mix = darknet_load.Mix()
    # Handshake shares per class, within sampling error of 2,000 draws.
    assert abs(by_kind["scanner"] / COUNT - mix.scanner_packets) < 0.06
    assert abs(by_kind["silent"] / COUNT - mix.silent_packets) < 0.03
    assert Counter(s.kind for s in load.pool)["scanner"] == round(5000 * mix.scanners)
    # Heavy tail: the busiest 0.5 % of the sources send most handshakes; many send one.
    per_source = Counter(h.src for h in hs).most_common()
    head = sum(n for _, n in per_source[: len(load.pool) // 200])
    assert head / COUNT > 0.5
    assert sum(1 for _, n in per_source if n == 1) > len(per_source) / 3

    fp = Fingerprinter()
    for h in hs:
        source = kind[h.src]
        assert ipaddress.ip_address(h.dst) in DARKNET and h.feed == "zeek"
        assert h.syn is not None
        label = fp.fingerprint(h.syn)
        if source.kind == "scanner":
            # A stack-less scanner: RST with T^p, and a SYN the analyzer calls crafted.
            assert h.reply == "rst" and h.tp_us is not None and crafted(label, h.reply)
        elif source.kind == "silent":
            assert h.reply is None and len(h.synack_times) == 6 and h.tp_us is None
        else:
            assert h.reply == "ack" and h.reply_time is not None
            assert h.tp_us is not None or len(h.synack_times) == 2  # Karn: retransmitted SYN+ACK
            # A real stack's SYN: p0f names the persona's own label (Windows behind a NAT).
            assert label.label is not None and not crafted(label, h.reply)
            assert source.persona.startswith(f"s:{label.label}")
        assert h.synack_times[0] >= h.t and (h.reply_time is None or h.reply_time >= h.synack_times[-1])


def test_same_seed_same_bytes_other_seed_other_load() -> None:
    def fields(seed: int) -> list[dict[str, str]]:
        load = darknet_load.DarknetLoad(DARKNET, 1000, seed=seed)
        return [h.to_fields() for h in load.handshakes(300, START, 1000.0)]

    assert fields(3) == fields(3)
    assert fields(3) != fields(4)


def test_per_source_mode_sends_exactly_n_each() -> None:
    load = darknet_load.DarknetLoad(ipaddress.ip_network("198.18.7.0/24"), 40, seed=1, per_source=25)
    hs = list(load.handshakes(40 * 25, START, 100.0))
    assert set(Counter(h.src for h in hs).values()) == {25}
    assert all(ipaddress.ip_address(h.dst) in ipaddress.ip_network("198.18.7.0/24") for h in hs)


def test_bad_parameters_are_one_line_and_exit_2(capsys: object) -> None:
    assert asyncio.run(darknet_load.main(["--darknet", "10.0.0.0/30", "--summary"])) == 2
    assert asyncio.run(darknet_load.main(["--scanners", "0.8", "--silent", "0.5", "--summary"])) == 2
    assert asyncio.run(darknet_load.main(["--count", "5"])) == 2  # no --redis


def test_analyzer_bench_drain_works_off_the_whole_backlog(tmp_path: Path) -> None:
    """--drain: the analyzer, stopped while a backlog is written, works all of it off (probe results
    settled) once resumed, and the point says how much of it was measured."""
    out = tmp_path / "points.jsonl"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "analyzer_load_bench.py"), "--points", "1000", "--warmup", "2",
         "--drain", "3000", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    x = json.loads(out.read_text())
    assert x["drain"] == 3000 and x["fed"] == x["done"] == 3000
    assert 0 < x["acked_s"] <= x["elapsed_s"] and x["hs_per_s"] > 0 and x["xadd_redis_us_per_hs"] is not None
    # The first handshakes of sources new to the backlog were measured (and closed: records.log).
    assert 0 < x["records"] < 3000


def test_analyzer_bench_bad_drain_is_one_line_and_exit_2() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "analyzer_load_bench.py"), "--drain", "-5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
