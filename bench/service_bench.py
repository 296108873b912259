"""Throughput and latency of `stepstone-analyzer run` with a no-op prober.

A private redis-server; the analyzer runs as a real subprocess; this script plays the responder
(XADDs handshakes with real SYN bytes) and an instant prober (answers every job as it appears).
Prints handshakes/s into handshakes.log, verdicts/s into stepstone.log, and SYN->verdict latency.

    python bench/service_bench.py [--handshakes N] [--sources S] [--analyzers K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from scapy.layers.inet import IP, TCP

from analyzer.handshake import Handshake
from lab.redis import RedisServer
from prober.job import Result

ROOT = Path(__file__).resolve().parents[1]
P = "stepstone:"
OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def start_analyzer(url: str, log_dir: Path, consumer: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "analyzer.cli", "run", "--redis", url, "--handshakes",
         "--log-dir", str(log_dir), "--consumer", consumer],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )


async def prober(r: aioredis.Redis, stop: asyncio.Event) -> None:
    """Answer every job at once (the prober's side of the contract, no network)."""
    last = "0"
    while not stop.is_set():
        reply = await r.xread({P + "jobs": last}, count=500, block=200)
        for _stream, entries in reply or []:
            async with r.pipeline(transaction=False) as pipe:
                for entry_id, f in entries:
                    last = entry_id
                    res = Result(job=entry_id, src=f["src"], t=float(f["t"]), ping_min_us=9000,
                                 ping_avg_us=10000, ping_max_us=12000, ping_var_us2=1e6, ping_loss=0.0,
                                 syn_rtt_us=10000, fa=None, fa_port=None, probed_at=time.time())
                    pipe.xadd(P + "results", res.fields())  # type: ignore[arg-type]
                await pipe.execute()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=3000)
    ap.add_argument("--sources", type=int, default=1000, help="distinct source addresses (dedup)")
    ap.add_argument("--analyzers", type=int, default=1)
    args = ap.parse_args()

    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="stepstone-bench-") as tmp:
        r = aioredis.from_url(server.url, decode_responses=True)
        dirs = [Path(tmp) / f"logs{i}" for i in range(args.analyzers)]
        procs = [start_analyzer(server.url, d, f"bench{i}") for i, d in enumerate(dirs)]
        stop = asyncio.Event()
        prober_task = asyncio.create_task(prober(r, stop))
        try:
            syn_cache: dict[str, bytes] = {}
            fields = []
            t0 = time.time()
            for i in range(args.handshakes):
                src = f"198.18.{(i % args.sources) // 250}.{1 + (i % args.sources) % 250}"
                if src not in syn_cache:
                    syn_cache[src] = bytes(IP(src=src, dst="198.19.0.1", ttl=64, flags="DF")
                                           / TCP(sport=40000, dport=22, flags="S", options=OPTS))
                h = Handshake(t=t0, src=src, sport=40000 + i % 20000, dst=f"198.19.0.{1 + i % 250}",
                              dport=22, syn=syn_cache[src], synack_times=(t0,), reply="ack",
                              reply_time=t0 + 0.03, tp_us=30_000, feed="responder")
                fields.append(h.to_fields())
            start = time.monotonic()
            async with r.pipeline(transaction=False) as pipe:
                for f in fields:
                    # Each handshake stamped as it is sent, for the latency figure.
                    pipe.xadd(P + "handshakes", {**f, "t": repr(time.time())})
                await pipe.execute()
            sent = time.monotonic() - start
            done_hs = done_v = None
            while True:
                hs = sum(count_lines(d / "handshakes.log") for d in dirs)
                v = sum(count_lines(d / "stepstone.log") for d in dirs)
                now = time.monotonic()
                if done_hs is None and hs >= args.handshakes:
                    done_hs = now - start
                if v >= args.handshakes:
                    done_v = now - start
                    break
                if now - start > 600:
                    raise SystemExit(f"timed out: {hs} handshakes logged, {v} verdicts")
                await asyncio.sleep(0.05)  # progress polling of a benchmark, not synchronisation
        finally:
            stop.set()
            await prober_task
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
        latencies = []
        for d in dirs:
            for line in (d / "stepstone.log").read_text().splitlines():
                x = json.loads(line)
                latencies.append(x["verdict_at"] - x["t"])
        latencies.sort()
        jobs = await r.xlen(P + "jobs")
        await r.aclose()
    assert done_hs is not None and done_v is not None
    print(f"analyzers: {args.analyzers}  handshakes: {args.handshakes}  sources: {args.sources}  "
          f"probe jobs: {jobs}")
    print(f"handshakes XADDed in {sent:.2f}s (all at once, the analyzer reads a backlog)")
    print(f"handshakes.log complete after {done_hs:.2f}s: {args.handshakes / done_hs:,.0f} handshakes/s")
    print(f"stepstone.log complete after {done_v:.2f}s: {args.handshakes / done_v:,.0f} verdicts/s")
    print(f"SYN->verdict latency under this backlog: p50 {statistics.median(latencies):.3f}s "
          f"p95 {latencies[int(0.95 * (len(latencies) - 1))]:.3f}s")


if __name__ == "__main__":
    asyncio.run(main())
