"""Queue overhead: jobs/s through enqueue -> claim -> result + ack with a no-op probe (goal: at
least 5,000 jobs/s on one worker). A private redis-server on a unix socket; no packet is sent.

    python bench/queue_bench.py [--jobs 20000] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from lab.redis import RedisServer
from prober.audit import AuditLog
from prober.job import Job, Result
from prober.queue import ProbeQueue, connect
from prober.safety import TargetPolicy, parse_networks
from prober.worker import Worker, WorkerSettings


async def noop_probe(job: Job) -> Result:
    return Result(job=job.id, src=job.src, t=job.t, ping_min_us=1, ping_avg_us=1, ping_max_us=1,
                  ping_var_us2=0.0, ping_loss=0.0, syn_rtt_us=1, fa=None, fa_port=None,
                  probed_at=time.time())


def address(i: int) -> str:
    return f"198.18.{i // 250 % 250}.{i % 250 + 1}"


async def enqueue_all(queue: ProbeQueue, n: int, offset: int) -> None:
    batch = 500  # concurrent enqueues in flight, as an analyzer with many handshakes would have
    for start in range(0, n, batch):
        await asyncio.gather(*(queue.enqueue(address(offset + i), time.time())
                               for i in range(start, min(n, start + batch))))


async def drain(worker: Worker, conn: object, n: int) -> float:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    start = time.perf_counter()
    while worker.stats["probes"] < n:  # noqa: ASYNC110 - polling a counter for the measurement
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    return elapsed


async def main(args: argparse.Namespace) -> None:
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        conn = await connect(server.url)
        queue = ProbeQueue(conn, dedup_window=0)
        policy = TargetPolicy(allow=parse_networks(["198.18.0.0/15"], "--allow"))

        def worker(name: str) -> Worker:
            return Worker(conn, noop_probe, policy=policy, audit=AuditLog(Path(tmp) / f"{name}.jsonl",
                          worker=name), settings=WorkerSettings(name=name, concurrency=args.concurrency,
                          rate=0, target_interval=0, block_ms=100))

        n = args.jobs
        t0 = time.perf_counter()
        await enqueue_all(queue, n, 0)
        enq = time.perf_counter() - t0
        print(f"enqueue only:             {n / enq:8.0f} jobs/s  ({n} jobs, {enq:.2f} s)")

        took = await drain(worker("w1"), conn, n)
        print(f"claim+probe+result+ack:   {n / took:8.0f} jobs/s  (one worker, no-op probe, "
              f"concurrency {args.concurrency})")

        # Both sides at once, as in service: an analyzer process enqueues while the worker drains.
        w2 = worker("w2")
        t0 = time.perf_counter()
        producer = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--produce", server.url, "--jobs", str(n), "--offset", str(n))
        took = await drain(w2, conn, n)
        await producer.wait()
        total = time.perf_counter() - t0
        print(f"end to end (concurrent):  {n / total:8.0f} jobs/s  (enqueue in another process -> "
              "result + ack)")
        print(f"audit lines written: {sum(1 for _ in (Path(tmp) / 'w1.jsonl').open())} (worker 1)")
        await conn.aclose()


async def produce(url: str, n: int, offset: int) -> None:
    conn = await connect(url)
    await enqueue_all(ProbeQueue(conn, dedup_window=0), n, offset)
    await conn.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--produce", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        asyncio.run(produce(args.produce, args.jobs, args.offset))
    else:
        asyncio.run(main(args))
