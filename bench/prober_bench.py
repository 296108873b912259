"""Probes/s against many responsive targets in a network namespace, side by side with fping
pinging the same targets the same number of times (goal: one worker >= half of fping's rate at
concurrency 256). Needs root; every packet stays inside the namespaces this script creates.

    sudo .venv/bin/python bench/prober_bench.py [--targets 200] [--rounds 5] [--concurrency 256]

Numbers:
  fping          targets/s: fping -C COUNT -p INTERVAL -i 0 (as fast as fping goes) over all targets
  pinger only    targets/s: our ICMP engine alone, COUNT echoes per target (same work as fping)
  probe engine   probes/s: full probes (COUNT echoes + SYNs to 7 ports + p0f), no Redis
  worker         probes/s: `stepstone-prober run` fed through Redis (enqueue -> result)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.netns import Namespace, Network
from lab.redis import RedisServer

SUBNET = "10.63.0.0/16"


def addresses(n: int) -> list[str]:
    return [f"10.63.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


async def inner(args: argparse.Namespace) -> None:
    """Runs inside the prober namespace: time our engine against the targets."""
    from prober.job import Job
    from prober.probe import Prober, ProbeSettings

    targets = args.inner_targets.split(",")
    prober = Prober(ProbeSettings(count=args.count, interval=args.interval, reply_wait=1.0))
    prober.open()
    sem = asyncio.Semaphore(args.concurrency)
    out = {}

    async def ping(addr: str) -> int:
        async with sem:
            stats = await prober.pinger.ping(addr, count=args.count, interval=args.interval, reply_wait=1.0)
            return len(stats.rtts_us)

    async def probe(addr: str) -> int:
        async with sem:
            now = time.time()
            m = await prober.measure(Job(id="bench", src=addr, t=now, deadline=now + 60))
            return int(m.syn.rtt_us is not None or bool(m.syn.closed))

    for name, fn in (("pinger", ping), ("engine", probe)):
        start = time.perf_counter()
        answered = 0
        for _ in range(args.rounds):
            answered += sum(await asyncio.gather(*(fn(a) for a in targets)))
        elapsed = time.perf_counter() - start
        out[name] = {"rate": len(targets) * args.rounds / elapsed, "elapsed": elapsed,
                     "answered": answered}
    prober.close()
    print(json.dumps(out))


def fping(ns: Namespace, targets: list[str], count: int, interval_ms: int) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(["ip", "netns", "exec", ns.name, "fping", "-q", "-C", str(count), "-p",
                           str(interval_ms), "-i", "0", "-t", "1000", *targets],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    replies = sum(1 for line in proc.stderr.splitlines() for v in line.split(":", 1)[-1].split()
                  if v != "-")
    return elapsed, replies


async def worker_rate(ns: Namespace, targets: list[str], rounds: int, args: argparse.Namespace) -> float:
    from prober.queue import ProbeQueue, connect

    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        proc = ns.python("-m", "prober.cli", "run", "--redis", server.url, "--allow", SUBNET, "--rate", "0",
                         "--target-interval", "0", "--concurrency", str(args.concurrency), "--name", "bench",
                         "--count", str(args.count), "--interval", str(args.interval),
                         "--audit-log", f"{tmp}/audit.jsonl", stderr=subprocess.DEVNULL)
        conn = await connect(server.url)
        try:
            while not await conn.exists("stepstone:prober:worker:bench"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            queue = ProbeQueue(conn, dedup_window=0)
            total = len(targets) * rounds
            start = time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(*(queue.enqueue(a, time.time()) for a in targets))
            while await conn.xlen("stepstone:results") < total:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return total / (time.perf_counter() - start)
        finally:
            await conn.aclose()
            proc.terminate()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=5, help="echoes per target (default 5)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between echoes to one target")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--inner-targets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_targets:
        asyncio.run(inner(args))
        return

    targets = addresses(args.targets)
    with Network() as net:
        p, t = net.add("p"), net.add("t")
        _, t_if = net.link(p, "10.63.0.1/16", t, "10.63.0.2/16")
        t.run("ip", "-batch", "-", input="".join(f"addr add {a}/16 dev {t_if}\n" for a in targets))
        subprocess.run(["ip", "netns", "exec", p.name, "fping", "-q", "-c", "1", "-t", "1000", *targets],
                       capture_output=True, check=False)  # resolve neighbours once for everyone

        fp_elapsed, fp_replies = 0.0, 0
        for _ in range(args.rounds):
            e, r = fping(p, targets, args.count, round(args.interval * 1000))
            fp_elapsed, fp_replies = fp_elapsed + e, fp_replies + r
        fp_rate = len(targets) * args.rounds / fp_elapsed

        out = p.run(sys.executable, __file__, "--inner-targets", ",".join(targets), "--rounds",
                    str(args.rounds), "--count", str(args.count), "--interval", str(args.interval),
                    "--concurrency", str(args.concurrency))
        ours = json.loads(out)
        w_rate = asyncio.run(worker_rate(p, targets, args.rounds, args))

    n = len(targets) * args.rounds
    print(f"{args.targets} targets x {args.rounds} rounds, {args.count} echoes each "
          f"{args.interval * 1000:.0f} ms apart, concurrency {args.concurrency}")
    print(f"fping -C {args.count}:   {fp_rate:8.1f} targets/s  ({fp_replies}/{n * args.count} replies)")
    pg = ours["pinger"]
    print(f"pinger only:    {pg['rate']:8.1f} targets/s  ({pg['answered']}/{n * args.count} replies)  "
          f"= {pg['rate'] / fp_rate:.2f} x fping")
    en = ours["engine"]
    print(f"probe engine:   {en['rate']:8.1f} probes/s   (echoes + SYN to 7 ports + p0f; "
          f"{en['answered']}/{n} TCP-answered)  = {en['rate'] / fp_rate:.2f} x fping")
    print(f"worker (Redis): {w_rate:8.1f} probes/s   = {w_rate / fp_rate:.2f} x fping "
          f"(goal >= 0.5)")


if __name__ == "__main__":
    main()
