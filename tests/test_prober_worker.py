"""Worker decisions that send no packet: malformed jobs, deadlines, refusals, delivery limits.
Real redis-server; the probe function fails the test if it is ever called."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from lab.redis import RedisServer
from prober.audit import AuditLog
from prober.job import Job, Result
from prober.queue import ProbeQueue, connect
from prober.safety import TargetPolicy, parse_networks
from prober.worker import Worker, WorkerSettings


async def must_not_probe(job: Job) -> Result:
    raise AssertionError(f"probed {job.src} although it had to be refused")


@pytest.fixture
async def conn(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = await connect(redis_server.url)
    yield client
    await client.aclose()


async def wait_for(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def run_worker(conn: aioredis.Redis, audit_path: Path, until: Callable[[], Awaitable[bool]], *,
                     policy: TargetPolicy | None = None, **settings: object) -> Worker:
    worker = Worker(conn, must_not_probe, policy=policy or TargetPolicy(),
                    audit=AuditLog(audit_path, worker="w1"),
                    settings=WorkerSettings(name="w1", block_ms=50, **settings))  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_for(until)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return worker


async def dead_entries(conn: aioredis.Redis) -> list[dict[str, str]]:
    return [fields for _id, fields in await conn.xrange("stepstone:dead")]


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_malformed_jobs_go_dead_with_reason(conn: aioredis.Redis, tmp_path: Path) -> None:
    bad = [
        {"src": "not-an-address", "t": "1", "deadline": "9999999999"},
        {"src": "192.0.2.1", "t": "yesterday", "deadline": "9999999999"},
        {"src": "192.0.2.1", "t": "1", "deadline": "9999999999", "ports": "80,http"},
        {"src": "192.0.2.1", "t": "1", "deadline": "9999999999", "ports": "70000"},
        {"t": "1"},
    ]
    ids = [await conn.xadd("stepstone:jobs", fields) for fields in bad]

    async def all_dead() -> bool:
        return await conn.xlen("stepstone:dead") == len(bad)

    worker = await run_worker(conn, tmp_path / "audit.jsonl", all_dead)
    by_job = {d["job"]: d for d in await dead_entries(conn)}
    assert set(by_job) == set(ids)
    dead = [by_job[i] for i in ids]  # jobs are handled concurrently: compare in enqueue order
    assert all(d["reason"].startswith("malformed job: ") for d in dead)
    assert "src is not an IP address: 'not-an-address'" in dead[0]["reason"]
    assert "t is not epoch seconds" in dead[1]["reason"]
    assert "comma-separated" in dead[2]["reason"] and "out of range" in dead[3]["reason"]
    assert dead[0]["src"] == "not-an-address" and dead[4]["src"] == ""
    assert (await conn.xpending("stepstone:jobs", "probers"))["pending"] == 0
    assert worker.stats["malformed"] == len(bad)
    assert await conn.hget("stepstone:prober:stats", "malformed") == str(len(bad))
    assert [e["event"] for e in audit_lines(tmp_path / "audit.jsonl")] == ["rejected"] * len(bad)


async def test_job_past_deadline_is_dropped_counted_and_dead(conn: aioredis.Redis, tmp_path: Path) -> None:
    queue = ProbeQueue(conn, deadline=60.0)
    job_id = await queue.enqueue("198.18.0.9", time.time() - 61)  # SYN seen 61 s ago

    async def dead() -> bool:
        return await conn.xlen("stepstone:dead") == 1

    await run_worker(conn, tmp_path / "audit.jsonl", dead,
                     policy=TargetPolicy(allow=parse_networks(["198.18.0.0/15"], "--allow")))
    [entry] = await dead_entries(conn)
    assert entry["job"] == job_id and entry["src"] == "198.18.0.9"
    assert entry["reason"].startswith("deadline passed ")
    assert {"t", "deadline", "ports", "enqueued"} <= set(entry)  # the job's own fields travel along
    assert await conn.hget("stepstone:prober:stats", "deadline_dropped") == "1"
    assert await conn.xlen("stepstone:results") == 0


async def test_special_purpose_and_excluded_refused_and_audited(conn: aioredis.Redis, tmp_path: Path
                                                                ) -> None:
    queue = ProbeQueue(conn, dedup_window=0)
    targets = ["10.1.2.3", "127.0.0.1", "fe80::1", "2001:db8::5", "192.0.2.44", "8.8.8.8"]
    ids = [await queue.enqueue(t, time.time()) for t in targets]

    async def all_dead() -> bool:
        return await conn.xlen("stepstone:dead") == len(targets)

    policy = TargetPolicy(exclude=parse_networks(["8.8.8.0/24"], "--exclude"))
    await run_worker(conn, tmp_path / "audit.jsonl", all_dead, policy=policy)
    dead = {d["src"]: d for d in await dead_entries(conn)}
    assert set(dead) == set(targets)
    assert all(d["reason"].startswith("refused: ") for d in dead.values())
    assert "private-use" in dead["10.1.2.3"]["reason"]
    assert "loopback" in dead["127.0.0.1"]["reason"]
    assert "link-local" in dead["fe80::1"]["reason"]
    assert "documentation" in dead["2001:db8::5"]["reason"]
    assert "excluded by --exclude 8.8.8.0/24" in dead["8.8.8.8"]["reason"]
    audit = audit_lines(tmp_path / "audit.jsonl")
    assert {(a["event"], a["target"], a["job"]) for a in audit} == {
        ("refused", t, i) for t, i in zip(targets, ids, strict=True)}
    assert all(a["worker"] == "w1" and a["reason"] for a in audit)
    assert await conn.hget("stepstone:prober:stats", "refused") == str(len(targets))


async def test_job_delivered_too_often_goes_dead(conn: aioredis.Redis, tmp_path: Path) -> None:
    queue = ProbeQueue(conn)
    job_id = await queue.enqueue("10.9.9.9", time.time())
    await conn.xgroup_create("stepstone:jobs", "probers", id="0")
    # Three workers in turn took the job and died with it (each delivery counted).
    await conn.xreadgroup("probers", "dead-1", {"stepstone:jobs": ">"}, count=1)
    for name in ("dead-2", "dead-3"):
        await conn.xclaim("stepstone:jobs", "probers", name, min_idle_time=0, message_ids=[job_id])

    async def dead() -> bool:
        return await conn.xlen("stepstone:dead") == 1

    await run_worker(conn, tmp_path / "audit.jsonl", dead, max_deliveries=3, claim_idle=0.05)
    [entry] = await dead_entries(conn)
    assert entry["job"] == job_id and entry["src"] == "10.9.9.9"
    assert entry["reason"].startswith("delivered 4 times (limit 3)")
    assert (await conn.xpending("stepstone:jobs", "probers"))["pending"] == 0


async def test_own_pending_entries_are_read_first(conn: aioredis.Redis, tmp_path: Path) -> None:
    queue = ProbeQueue(conn, dedup_window=0)
    first = await queue.enqueue("10.0.0.1", time.time())
    await conn.xgroup_create("stepstone:jobs", "probers", id="0")
    await conn.xreadgroup("probers", "w1", {"stepstone:jobs": ">"}, count=1)  # w1 died holding it
    await queue.enqueue("10.0.0.2", time.time())

    async def both() -> bool:
        return await conn.xlen("stepstone:dead") == 2

    # claim_idle is long: only reading its own pending list gets the first job back this fast.
    await run_worker(conn, tmp_path / "audit.jsonl", both, claim_idle=3600)
    dead = await dead_entries(conn)
    assert {d["src"] for d in dead} == {"10.0.0.1", "10.0.0.2"}
    assert first in {d["job"] for d in dead}


async def test_status_reports_queue_state(conn: aioredis.Redis, redis_server: RedisServer) -> None:
    from prober import status
    from prober.cli import main

    queue = ProbeQueue(conn, dedup_window=0)
    for i in range(3):
        await queue.enqueue(f"192.0.2.{i}", time.time())
    await conn.xgroup_create("stepstone:jobs", "probers", id="0")
    await conn.xreadgroup("probers", "w9", {"stepstone:jobs": ">"}, count=2)
    info = await status.gather(conn, "stepstone:")
    assert info["streams"] == {"jobs": 3, "results": 0, "dead": 0}
    assert info["probers"]["pending"] == 2 and info["probers"]["lag"] == 1
    assert [(c["name"], c["pending"]) for c in info["probers"]["consumers"]] == [("w9", 2)]
    assert info["probers"]["oldest_pending_age_s"] >= 0
    assert info["analyzers"] is None and info["workers_alive"] == []
    now = int(time.time())
    await conn.set(f"stepstone:prober:probes:{now - 5}", 90)
    await conn.set(f"stepstone:prober:probes:{now - 30}", 30)
    await conn.set(f"stepstone:prober:probes:{now - 200}", 1000)  # outside the minute
    assert (await status.gather(conn, "stepstone:"))["probes_per_s_last_minute"] == 2.0
    text = status.render(info)
    assert "consumer w9: pending 2" in text and "jobs 3" in text
    # The CLI, in a thread: it runs its own event loop.
    rc = await asyncio.to_thread(main, ["status", "--redis", redis_server.url, "--json"])
    assert rc == 0
    assert await asyncio.to_thread(main, ["status", "--redis", "unix:///nonexistent.sock"]) == 2


async def test_group_deleted_under_a_running_worker(conn: aioredis.Redis, tmp_path: Path) -> None:
    queue = ProbeQueue(conn, dedup_window=0)
    await queue.enqueue("10.0.0.1", time.time())
    worker = Worker(conn, must_not_probe, policy=TargetPolicy(), audit=AuditLog(tmp_path / "a", worker="w1"),
                    settings=WorkerSettings(name="w1", block_ms=50))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async def dead(n: int) -> bool:
            return await conn.xlen("stepstone:dead") == n
        await wait_for(lambda: dead(1))
        await conn.delete("stepstone:jobs")  # stream and group gone (an operator's mistake)
        await queue.enqueue("10.0.0.2", time.time())
        await wait_for(lambda: dead(2))
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_job_asking_for_too_many_ports_is_refused(conn: aioredis.Redis, tmp_path: Path) -> None:
    queue = ProbeQueue(conn)
    job_id = await queue.enqueue("198.18.0.7", time.time(), ports=range(1, 101))

    async def dead() -> bool:
        return await conn.xlen("stepstone:dead") == 1

    await run_worker(conn, tmp_path / "audit.jsonl", dead, max_ports=32,
                     policy=TargetPolicy(allow=parse_networks(["198.18.0.0/15"], "--allow")))
    [entry] = await dead_entries(conn)
    assert entry["job"] == job_id
    assert entry["reason"] == "refused: 100 ports asked, at most 32 per job (--max-ports)"
    [audit] = audit_lines(tmp_path / "audit.jsonl")
    assert audit["event"] == "refused" and audit["job"] == job_id
