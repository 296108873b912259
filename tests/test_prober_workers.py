"""Worker processes (`stepstone-prober run`) inside a prober namespace, sharing one real
redis-server: crash recovery, SIGTERM, Redis restarts with AOF, rate limits across workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from lab.netns import Namespace, Network
from lab.redis import RedisServer
from prober.queue import ProbeQueue, connect

pytestmark = pytest.mark.netns

RESPONSIVE, SILENT = "10.62.1.2", "10.62.1.4"


async def wait_for(check: Callable[[], Awaitable[bool]], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@dataclass
class Workers:
    prober: Namespace
    url: str
    tmp: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    async def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = self.prober.python(
            "-m", "prober.cli", "run", "--redis", self.url, "--name", name, "--allow", "10.62.0.0/16",
            "--audit-log", str(self.audit(name)), "--count", "2", "--interval", "0.02", *extra,
            stdout=subprocess.DEVNULL, stderr=log)
        self.procs[name] = proc
        conn = await connect(self.url)
        try:
            async def ready() -> bool:
                assert proc.poll() is None, (self.tmp / f"{name}.log").read_text()
                return bool(await conn.exists(f"stepstone:prober:worker:{name}"))
            await wait_for(ready)
        finally:
            await conn.aclose()
        return proc

    def audit(self, name: str) -> Path:
        return self.tmp / f"{name}.audit.jsonl"

    def events(self, name: str, kind: str = "probe") -> list[dict[str, object]]:
        path = self.audit(name)
        if not path.exists():
            return []
        return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def prober_ns(net: Network) -> Namespace:
    p, t = net.add("p"), net.add("t")
    _, t_if = net.link(p, "10.62.1.1/24", t, f"{RESPONSIVE}/24")
    t.run("ip", "addr", "add", f"{SILENT}/24", "dev", t_if)
    rules = f"chain input {{\n type filter hook input priority 0;\n ip daddr {SILENT} drop\n }}\n"
    t.run("nft", "-f", "-", input="table ip silent {\n" + rules + "}\n")
    return p


@pytest.fixture
async def workers(prober_ns: Namespace, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Workers]:
    w = Workers(prober_ns, redis_server.url, tmp_path)
    yield w
    w.stop_all()


async def results_for(conn: aioredis.Redis) -> dict[str, dict[str, str]]:
    return {f["job"]: f for _id, f in await conn.xrange("stepstone:results")}


async def test_killed_worker_job_completed_by_another(workers: Workers) -> None:
    conn = await connect(workers.url)
    try:
        # A silent target keeps the first worker busy for its whole reply wait.
        a = await workers.start("wa", "--reply-wait", "5", "--claim-idle", "1.5")
        job = await ProbeQueue(conn).enqueue(SILENT, time.time())

        async def a_probing() -> bool:
            return any(e["job"] == job for e in workers.events("wa"))
        await wait_for(a_probing)
        a.send_signal(signal.SIGKILL)
        await asyncio.to_thread(a.wait, 10)
        assert job not in await results_for(conn)

        await workers.start("wb", "--reply-wait", "0.5", "--claim-idle", "1.5")

        async def done() -> bool:
            return job in await results_for(conn)
        await wait_for(done)
        result = (await results_for(conn))[job]
        assert result["src"] == SILENT and result["ping_loss"] == "1.0" and result["fa"] == ""
        assert [e["job"] for e in workers.events("wb")] == [job]
        assert (await conn.xpending("stepstone:jobs", "probers"))["pending"] == 0
        assert await conn.xlen("stepstone:dead") == 0
    finally:
        await conn.aclose()


async def test_sigterm_finishes_jobs_in_hand_and_exits_0(workers: Workers) -> None:
    conn = await connect(workers.url)
    try:
        w = await workers.start("wt", "--reply-wait", "2")
        job = await ProbeQueue(conn).enqueue(SILENT, time.time())

        async def probing() -> bool:
            return any(e["job"] == job for e in workers.events("wt"))
        await wait_for(probing)
        w.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(w.wait, 20) == 0
        assert job in await results_for(conn)  # finished, not abandoned
        assert (await conn.xpending("stepstone:jobs", "probers"))["pending"] == 0
        assert not await conn.exists("stepstone:prober:worker:wt")  # left cleanly
        consumers = await conn.xinfo_consumers("stepstone:jobs", "probers")
        assert "wt" not in [c["name"] for c in consumers]
    finally:
        await conn.aclose()


async def test_redis_restart_with_aof_loses_nothing(prober_ns: Namespace, redis_aof: RedisServer,
                                                    tmp_path: Path) -> None:
    workers = Workers(prober_ns, redis_aof.url, tmp_path)
    try:
        conn = await connect(redis_aof.url)
        first = await ProbeQueue(conn).enqueue(RESPONSIVE, time.time())
        await conn.aclose()
        await asyncio.to_thread(redis_aof.restart)  # between enqueue and any claim

        conn = await connect(redis_aof.url)
        assert await conn.xlen("stepstone:jobs") == 1
        await workers.start("wr", "--reply-wait", "0.5", "--target-interval", "0")

        async def has(job: str | None) -> bool:
            try:
                return job in await results_for(conn)
            except (ConnectionError, OSError):
                return False
        await wait_for(lambda: has(first))

        # Again while the worker is running: it reconnects and carries on.
        await conn.aclose()
        await asyncio.to_thread(redis_aof.restart)
        conn = await connect(redis_aof.url)
        second = await ProbeQueue(conn).enqueue("10.62.1.1", time.time())  # its own gateway, responsive
        await wait_for(lambda: has(second), limit=30)
        results = await results_for(conn)
        assert results[first]["ping_loss"] == "0.0" and results[second]["ping_loss"] == "0.0"
        assert (await conn.xpending("stepstone:jobs", "probers"))["pending"] == 0
        assert workers.procs["wr"].poll() is None
        await conn.aclose()
    finally:
        workers.stop_all()


async def test_global_rate_limit_holds_across_two_workers(workers: Workers) -> None:
    rate, jobs = 10, 25
    conn = await connect(workers.url)
    try:
        for name in ("w1", "w2"):
            await workers.start(name, "--rate", str(rate), "--target-interval", "0", "--reply-wait", "0.3",
                                "--concurrency", "32")
        queue = ProbeQueue(conn, dedup_window=0)
        ids = [await queue.enqueue(RESPONSIVE, time.time()) for _ in range(jobs)]

        async def all_done() -> bool:
            return len(await results_for(conn)) == jobs
        await wait_for(all_done, limit=30)
        stamps = sorted(float(e["ts"]) for name in ("w1", "w2")  # type: ignore[arg-type]
                        for e in workers.events(name))
        per_worker = [len(workers.events(name)) for name in ("w1", "w2")]
        assert sum(per_worker) == jobs and min(per_worker) > 0, per_worker  # both took work
        # Never more than `rate` probes in any one second (+2: a late timer on a loaded machine can
        # squeeze the audit stamps of two slots together). Unlimited, all 25 would go in ~0.1 s.
        for i in range(len(stamps) - rate - 2):
            assert stamps[i + rate + 2] - stamps[i] >= 1.0, (i, stamps)
        assert stamps[-1] - stamps[0] >= (jobs - 1) / rate * 0.9
        assert set(await results_for(conn)) == set(ids)
    finally:
        await conn.aclose()


async def test_per_target_limit_refuses_and_audits(workers: Workers) -> None:
    conn = await connect(workers.url)
    try:
        await workers.start("wp", "--target-interval", "60", "--reply-wait", "0.3", "--concurrency", "1")
        queue = ProbeQueue(conn, dedup_window=0)  # a careless client: the same address twice
        first = await queue.enqueue(RESPONSIVE, time.time())
        second = await queue.enqueue(RESPONSIVE, time.time())

        async def both() -> bool:
            return await conn.xlen("stepstone:results") + await conn.xlen("stepstone:dead") == 2
        await wait_for(both)
        assert list(await results_for(conn)) == [first]
        [(_id, dead)] = await conn.xrange("stepstone:dead")
        assert dead["job"] == second and dead["src"] == RESPONSIVE
        assert dead["reason"].startswith("refused: per-target limit")
        [refusal] = workers.events("wp", "refused")
        assert refusal["job"] == second and refusal["target"] == RESPONSIVE
    finally:
        await conn.aclose()


def test_cli_errors_are_one_line(tmp_path: Path, redis_server: RedisServer) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prober.cli", *args], capture_output=True, text=True,
                              check=False, timeout=60)

    bad_url = run("run", "--redis", "http://localhost", "--audit-log", str(tmp_path / "a"))
    assert bad_url.returncode == 2 and bad_url.stderr.count("\n") == 1 and "bad Redis URL" in bad_url.stderr
    down = run("run", "--redis", "unix:///nonexistent.sock", "--audit-log", str(tmp_path / "a"))
    assert down.returncode == 2 and "cannot use Redis" in down.stderr and "Traceback" not in down.stderr
    bad_cidr = run("probe", "1.2.3.4", "--allow", "10.0.0.0/33", "--audit-log", str(tmp_path / "a"))
    assert bad_cidr.returncode == 2 and "--allow '10.0.0.0/33'" in bad_cidr.stderr
    assert "--allow CIDR" in run("run", "--help").stdout
    if os.geteuid() != 0:
        return  # the rest needs root (raw sockets, dropping a capability)
    # A key of ours holding something else: Redis refuses, the worker says so in one line.
    import redis

    redis.Redis(unix_socket_path=str(redis_server.socket)).set("stepstone:jobs", "not a stream")
    wrong = run("run", "--redis", redis_server.url, "--audit-log", str(tmp_path / "a"))
    assert wrong.returncode == 2 and "Redis refused a command: WRONGTYPE" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr
    # Without CAP_NET_RAW (dropped from the bounding set, so even root lacks it): one line, exit 2.
    no_raw = subprocess.run(["setpriv", "--bounding-set=-net_raw", sys.executable, "-m", "prober.cli",
                             "probe", "127.0.0.1", "--allow", "127.0.0.0/8", "--audit-log",
                             str(tmp_path / "a")], capture_output=True, text=True, check=False, timeout=60)
    assert no_raw.returncode == 2 and "need root or CAP_NET_RAW" in no_raw.stderr, no_raw.stderr
    assert no_raw.stderr.count("\n") == 1 and no_raw.stdout == ""


async def test_jobs_the_rate_limit_cannot_serve_in_time_go_dead_without_wasting_slots(
        workers: Workers) -> None:
    conn = await connect(workers.url)
    try:
        await workers.start("wd", "--rate", "2", "--target-interval", "0", "--reply-wait", "0.3")
        short = ProbeQueue(conn, dedup_window=0, deadline=1.2)
        now = time.time()
        ids = [await short.enqueue(RESPONSIVE, now) for _ in range(8)]  # 8 jobs, room for ~3

        async def settled() -> bool:
            return await conn.xlen("stepstone:results") + await conn.xlen("stepstone:dead") == len(ids)
        await wait_for(settled)
        probed = await results_for(conn)
        dead = [f for _id, f in await conn.xrange("stepstone:dead")]
        assert 1 <= len(probed) <= 3 and len(probed) + len(dead) == len(ids)
        assert all(d["reason"] == "deadline passed: the global rate limit has no free slot before it"
                   for d in dead)
        # The refused jobs took no slot: a later job goes out one interval (0.5 s) after the last
        # probe, not after the 5+ slots they would have burnt.
        late = await ProbeQueue(conn, dedup_window=0).enqueue(RESPONSIVE, time.time())

        async def done() -> bool:
            return late in await results_for(conn)
        await wait_for(done)
        stamps = sorted(float(e["ts"]) for e in workers.events("wd"))  # type: ignore[arg-type]
        assert len(stamps) == len(probed) + 1
        assert stamps[-1] - stamps[-2] < 1.5, stamps
    finally:
        await conn.aclose()
