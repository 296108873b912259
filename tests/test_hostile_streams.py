"""Hostile entries on the Redis streams never stop a live service, block a source, or take the
valid entry behind them down with them (issue 9). Real redis-server; the analyzer and the prober
worker run their real code in this process; a fake Zeek takes the verdicts.

Each bad entry is written right in front of a valid one, which must still get its verdict (or
result, or Zeek event); the bad one is rejected once, counted, and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from service_harness import Harness, P, free_port, handshake, lines, result, scrape, until
from test_service_zeek import fake_zeek

from analyzer.feeds import zeek_to_stream
from analyzer.handshake import Handshake, HandshakeError
from analyzer.record import Record
from analyzer.rules import judge
from analyzer.service import Config, serve
from analyzer.verdicts import entry_fields
from lab.redis import RedisServer
from prober.audit import AuditLog
from prober.job import Job, Result
from prober.queue import ProbeQueue, connect
from prober.safety import TargetPolicy, parse_networks
from prober.worker import Worker, WorkerSettings

BAD = b"\xff\xfe"  # never UTF-8


@contextlib.asynccontextmanager
async def analyzer(h: Harness, **overrides: Any) -> AsyncIterator[tuple[int, asyncio.Task[int]]]:
    """The service with metrics on a free port; it must still be running at the end and stop
    with 0 (a side task that died would make it 1)."""
    port = free_port()
    settings: dict[str, Any] = {"handshakes": True, "zeek_url": None, "consumer": "a1", **overrides}
    config = Config(redis_url=h.url, log_dir=h.log_dir, metrics_port=port, **settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop))
    try:
        yield port, task
        assert not task.done(), "the service stopped by itself"
    finally:
        stop.set()
        code = await asyncio.wait_for(task, 30)
    assert code == 0


def rejected(port: int, stream: str) -> float:
    return scrape(port).get(f'stepstone_analyzer_rejected_entries_total{{stream="{stream}"}}', 0.0)


def spoiled(fields: dict[str, str]) -> list[dict[bytes, bytes]]:
    """One entry per field with a byte that is not UTF-8 in its value, and one per field with one
    in its name."""
    out = []
    for name in fields:
        raw = {k.encode(): v.encode() for k, v in fields.items()}
        out.append({**raw, name.encode(): raw[name.encode()] + BAD})
        renamed = dict(raw)
        renamed[name.encode() + BAD] = renamed.pop(name.encode())
        out.append(renamed)
    return out


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    failures = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not failures, failures


# --- class 1: bytes that are not UTF-8 ------------------------------------------------------------


async def test_non_utf8_in_any_handshake_field_is_rejected_and_the_next_one_closes(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    t = time.time()
    template = handshake("198.18.90.1", "198.19.0.1", t=t).to_fields()
    bad_entries = spoiled(template)
    goods = [handshake(f"198.18.91.{i}", "198.19.0.1", t=t + i / 100) for i in range(len(bad_entries))]
    async with analyzer(harness) as (port, _):
        bad_ids = []
        for bad, good in zip(bad_entries, goods, strict=True):
            bad_ids.append(str(await harness.r.xadd(P + "handshakes", bad)))  # type: ignore[arg-type]
            await harness.send(good)
        jobs = await harness.jobs(len(goods))
        for job_id, fields in jobs:
            await harness.answer(result(job_id, fields["src"], t, ping_max=10_000, fa=None))
        out = await harness.verdicts(len(goods))
        await until(lambda: asyncio.to_thread(rejected, port, "handshakes"), what="the rejections counted")
        assert rejected(port, "handshakes") == len(bad_entries)
    assert sorted(x["src"] for x in out) == sorted(g.src for g in goods)
    for entry_id in bad_ids:  # one line each, naming the stream and the entry
        assert sum(f"{P}handshakes {entry_id} rejected" in r.getMessage() for r in caplog.records) == 1
    assert (await harness.r.xpending(P + "handshakes", "analyzers"))["pending"] == 0
    no_traceback(caplog)


async def test_non_utf8_in_any_result_or_dead_field_is_rejected_and_the_next_one_closes(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    t = time.time()
    n_result = len(spoiled(result("1-1", "198.18.92.1", t, ping_max=1, fa=None).fields()))
    n_dead = len(spoiled({"job": "1-1", "src": "198.18.92.1", "reason": "refused"}))
    hs = [handshake(f"198.18.{92 + i // 200}.{i % 200 + 1}", "198.19.0.1", t=t + i / 1000)
          for i in range(n_result + n_dead)]
    async with analyzer(harness) as (port, _):
        for h in hs:
            await harness.send(h)
        jobs = dict((f["src"], job_id) for job_id, f in await harness.jobs(len(hs)))
        for i, h in enumerate(hs):
            job = jobs[h.src]
            if i < n_result:
                good = result(job, h.src, t, ping_max=12_345, fa=None).fields()
                await harness.r.xadd(P + "results", spoiled(good)[i])  # type: ignore[arg-type]
                await harness.r.xadd(P + "results", good)  # type: ignore[arg-type]
            else:
                good = {"job": job, "src": h.src, "reason": "refused: test"}
                await harness.r.xadd(P + "dead", spoiled(good)[i - n_result])  # type: ignore[arg-type]
                await harness.r.xadd(P + "dead", good)
        out = {x["src"]: x for x in await harness.verdicts(len(hs))}
        await until(lambda: asyncio.to_thread(
            lambda: rejected(port, "results") == n_result and rejected(port, "dead") == n_dead),
            what="the rejections counted")
    for i, h in enumerate(hs):
        if i < n_result:
            assert out[h.src]["ping_max_us"] == 12_345
        else:
            assert out[h.src]["reason"] == "probe gave up: refused: test"
    no_traceback(caplog)


async def test_non_utf8_in_any_verdicts_field_is_rejected_and_the_next_one_reaches_zeek(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    t = time.time()
    record = Record(t=t, src="198.18.93.1", dst="198.19.0.1", tp_us=20_000)
    good = entry_fields("1-1", judge([record], window=86400.0).to_dict(), record.to_dict())
    bad_entries = spoiled(good)
    async with fake_zeek() as zeek, analyzer(harness, zeek_url=zeek.url) as (port, _):
        for bad in bad_entries:
            await harness.r.xadd(P + "verdicts", bad)  # type: ignore[arg-type]
            await harness.r.xadd(P + "verdicts", good)  # type: ignore[arg-type]
        for _ in bad_entries:
            async with asyncio.timeout(20):
                await zeek.published.get()
        await until(lambda: asyncio.to_thread(rejected, port, "verdicts"), what="the rejections counted")
        assert rejected(port, "verdicts") == len(bad_entries)
    no_traceback(caplog)


async def test_group_and_consumer_names_that_are_not_utf8_stop_nothing(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The lag and retention watch reads every group of the streams; `status` lists consumers."""
    for stream in ("handshakes", "results", "dead", "jobs"):
        await harness.r.execute_command("XGROUP", "CREATE", P + stream, b"grp" + BAD, "0", "MKSTREAM")
    await harness.r.xgroup_create(P + "jobs", "probers", id="0")
    await harness.r.xadd(P + "jobs", {"src": "198.18.94.1", "t": "1", "deadline": "2"})
    # A consumer with a bad name in the analyzers' own group, holding an entry (so XPENDING names it).
    await harness.r.xgroup_create(P + "handshakes", "analyzers", id="0")
    await harness.r.xadd(P + "handshakes", {"junk": "1"})
    await harness.r.execute_command("XREADGROUP", "GROUP", "analyzers", b"c" + BAD, "COUNT", 1,
                                    "STREAMS", P + "handshakes", ">")
    await harness.r.execute_command("XREADGROUP", "GROUP", "probers", b"w" + BAD, "COUNT", 1,
                                    "STREAMS", P + "jobs", ">")
    t = time.time()
    h = handshake("198.18.94.2", "198.19.0.1", t=t)
    async with analyzer(harness, claim_after=0.2) as (port, _):
        await harness.send(h)
        [(job_id, _fields)] = [j for j in await harness.jobs(2) if j[1]["src"] == h.src]
        await harness.answer(result(job_id, h.src, t, ping_max=10_000, fa=None))
        await harness.verdicts(1)
        # The watch ran over the bad names (it sets the lag gauges every 2 s) and goes on.
        await until(lambda: asyncio.to_thread(
            lambda: scrape(port).get('stepstone_analyzer_queue_lag{stream="handshakes"}') is not None),
            what="the lag gauge")
    proc = await asyncio.to_thread(status, harness.url)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "consumer w\\xff\\xfe: pending 1" in proc.stdout, proc.stdout
    as_json = await asyncio.to_thread(status, harness.url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["probers"]["consumers"][0]["name"] == "w\\xff\\xfe"
    no_traceback(caplog)


def status(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prober.cli", "status", "--redis", url, *extra],
                          capture_output=True, text=True, check=False, timeout=60)


async def fake_probe(job: Job) -> Result:
    return Result(job=job.id, src=job.src, t=job.t, ping_min_us=1000, ping_avg_us=2000, ping_max_us=3000,
                  ping_var_us2=10.0, ping_loss=0.0, syn_rtt_us=2500, fa=None, fa_port=None,
                  probed_at=time.time())


@contextlib.asynccontextmanager
async def worker(url: str, tmp_path: Path, probe: Any = fake_probe) -> AsyncIterator[asyncio.Task[None]]:
    """A real prober worker whose probe sends nothing (fake_probe), allowed to probe 198.18/15."""
    conn = await connect(url)
    w = Worker(conn, probe, policy=TargetPolicy(allow=parse_networks(["198.18.0.0/15"], "--allow")),
               audit=AuditLog(tmp_path / "audit.jsonl", worker="w1"),
               settings=WorkerSettings(name="w1", block_ms=50, rate=0, target_interval=0))
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        yield task
        assert not task.done(), "the worker stopped by itself"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await conn.aclose()


async def test_non_utf8_in_any_job_field_is_dead_lettered_and_the_next_job_probed(
        redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    conn = aioredis.from_url(redis_server.url, decode_responses=True)
    queue = ProbeQueue(conn, dedup_window=0)
    template = Job(id="", src="198.18.95.1", t=time.time(), deadline=time.time() + 600,
                   enqueued=time.time()).fields()
    bad_entries = spoiled(template)
    try:
        async with worker(redis_server.url, tmp_path):
            good_ids = []
            for i, bad in enumerate(bad_entries):
                await conn.xadd("stepstone:jobs", bad)  # type: ignore[arg-type]
                good_ids.append(await queue.enqueue(f"198.18.96.{i + 1}", time.time()))

            async def done() -> bool:
                return (await conn.xlen("stepstone:results") == len(good_ids)
                        and await conn.xlen("stepstone:dead") == len(bad_entries))

            await until(done, what="a result per good job, a dead letter per bad one")
        results = {f["job"] for _, f in await conn.xrange("stepstone:results")}
        dead = [f for _, f in await conn.xrange("stepstone:dead")]
    finally:
        await conn.aclose()
    assert results == set(good_ids)
    assert all(d["reason"].startswith("malformed job: ") and "not UTF-8" in d["reason"] for d in dead)
    assert any("\\xff\\xfe" in value for d in dead for value in d.values())  # shown escaped
    no_traceback(caplog)


# --- class 2: a poisoned result or record never blocks a source ----------------------------------


@pytest.mark.parametrize(("name", "value"), [("fa", "garbage"), ("ping_var_us2", "1.7e308"),
                                             ("ping_max_us", "4e9"), ("fa", "a:b:" + "c" * 300)])
async def test_a_result_the_record_would_refuse_is_refused_and_the_source_still_judged(
        harness: Harness, name: str, value: str, caplog: pytest.LogCaptureFixture) -> None:
    t = time.time()
    src = "198.18.97.1"
    first = handshake(src, "198.19.0.1", t=t)
    async with analyzer(harness) as (port, _):
        await harness.send(first)
        [(job, _)] = await harness.jobs(1)
        poisoned = {**result(job, src, t, ping_max=10_000, fa=None).fields(), name: value}
        await harness.r.xadd(P + "results", poisoned)  # type: ignore[arg-type]
        (line,) = await harness.verdicts(1)
        # Later handshakes of the source (deduped to the same job, then a fresh one) are judged too.
        await harness.send(handshake(src, "198.19.0.2", t=t + 1))
        await harness.verdicts(2)
        await harness.r.delete(P + "seen:" + src)  # the dedup window, passed
        third = handshake(src, "198.19.0.3", t=t + 2)
        await harness.send(third)
        jobs = await harness.jobs(2)
        await harness.answer(result(jobs[-1][0], src, t + 2, ping_max=11_000, fa=None))
        out = await harness.verdicts(3)
        assert rejected(port, "results") == 1
    assert line["reason"].startswith("probe gave up: its result was rejected: ")
    assert out[-1]["ping_max_us"] == 11_000 and out[-1]["verdict"]["samples"] == 1
    assert await harness.r.zcard(P + "src:" + src) == 3  # all three records are in its window
    no_traceback(caplog)


async def test_a_stored_record_that_does_not_read_back_is_dropped_and_the_window_still_counts(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Records already in a source's window (another version, a hand edit): each bad one is
    dropped and counted, the good ones still count."""
    t = time.time()
    src = "198.18.98.1"
    good = Record(t=t - 10, src=src, dst="198.19.0.1", tp_us=20_000, ping_max_us=10_000, ping_avg_us=9_000)
    planted = [
        {"hid": "0-1", "record": {**good.to_dict(), "fa": "garbage"}},
        {"hid": "0-2", "record": {**good.to_dict(), "ping_var_us2": 1.7e308}},
        {"hid": "0-3", "record": {**good.to_dict(), "tp_us": 10**400}},
        {"hid": "0-4", "record": {**good.to_dict(), "t": 3e11}},  # after the year 9999
        {"hid": "0-5", "record": good.to_dict()},
    ]
    key = P + "src:" + src
    for member in planted:
        await harness.r.zadd(key, {json.dumps(member, sort_keys=True): t - 10})
    await harness.r.zadd(key, {b"\xff not a record": t - 10})
    h = handshake(src, "198.19.0.1", t=t)
    async with analyzer(harness) as (port, _):
        await harness.send(h)
        [(job, _)] = await harness.jobs(1)
        await harness.answer(result(job, src, t, ping_max=10_000, fa=None))
        (line,) = await harness.verdicts(1)
        dropped = scrape(port)["stepstone_analyzer_window_records_dropped_total"]
    assert line["verdict"]["samples"] == 2  # the good planted record and this one
    assert dropped == 5
    assert await harness.r.zcard(key) == 2  # the bad ones are gone from the window
    no_traceback(caplog)


# --- class 3: numbers too big --------------------------------------------------------------------


async def test_numbers_too_big_are_rejected_at_the_boundary_and_the_next_handshake_closes(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    t = time.time()
    base = handshake("198.18.99.1", "198.19.0.1", t=t).to_fields()
    too_big = [
        {**base, "tp_us": "9" * 400},  # made a record whose float() overflows
        {**base, "tp_us": "9" * 5000},  # past Python's int-digits limit: ValueError in int()
        {**base, "t": "300000000000"},  # after the year 9999: no Zeek time, no datetime
        {**base, "t": "1" * 400},
        {**base, "synack_times": ",".join([str(t)] * 1000)},
        {**base, "tp_us": "3600000001"},  # beyond an hour
        {**base, "sport": "0" * 5000 + "1"},
    ]
    goods = [handshake(f"198.18.99.{i + 10}", "198.19.0.1", t=t + i / 100) for i in range(len(too_big))]
    async with analyzer(harness) as (port, _):
        for bad, good in zip(too_big, goods, strict=True):
            await harness.r.xadd(P + "handshakes", bad)  # type: ignore[arg-type]
            await harness.send(good)
        for job_id, fields in await harness.jobs(len(goods)):
            await harness.answer(result(job_id, fields["src"], t, ping_max=10_000, fa=None))
        out = await harness.verdicts(len(goods))
        await until(lambda: asyncio.to_thread(rejected, port, "handshakes"), what="the rejections counted")
        assert rejected(port, "handshakes") == len(too_big)
        metrics = scrape(port)
    assert sorted(x["src"] for x in out) == sorted(g.src for g in goods)
    assert metrics.get('stepstone_analyzer_errors_total{kind="failed"}', 0) == 0  # no retries
    no_traceback(caplog)


@pytest.mark.parametrize(("name", "value"), [("t", "300000000000"), ("probed_at", "9" * 5000),
                                             ("ping_min_us", "9" * 400), ("fa_port", "70000"),
                                             ("ping_loss", "1.5"), ("job", "1-" + "9" * 5000)])
def test_result_numbers_are_bounded(name: str, value: str) -> None:
    from prober.job import JobError

    fields = result("1-1", "198.18.99.1", time.time(), ping_max=1, fa=None).fields()
    with pytest.raises(JobError):
        Result.from_fields({**fields, name: value})


@pytest.mark.parametrize(("name", "value"), [("t", "300000000000"), ("deadline", "9" * 5000),
                                             ("enqueued", "1e300"), ("ports", "1" + "0" * 5000)])
def test_job_numbers_are_bounded(name: str, value: str) -> None:
    from prober.job import JobError

    fields = Job(id="", src="198.18.99.1", t=1.0, deadline=2.0).fields()
    with pytest.raises(JobError):
        Job.from_fields("1-1", {**fields, name: value})


@pytest.mark.parametrize("record", [
    {"t": 3e11}, {"t": 10**400}, {"tp_us": 10**400}, {"ping_var_us2": 1.7e308}, {"ping_max_us": 4e9},
    {"src": True}, {"dst": 3232235777}, {"fa": "garbage"},
])
async def test_verdicts_entries_out_of_range_never_reach_zeek_and_the_next_one_does(
        harness: Harness, record: dict[str, Any]) -> None:
    t = time.time()
    good_record = Record(t=t, src="198.18.100.1", dst="198.19.0.1", tp_us=20_000)
    verdict = judge([good_record], window=86400.0).to_dict()
    good = entry_fields("1-1", verdict, good_record.to_dict())
    bad = {**good, "record": json.dumps({**good_record.to_dict(), **record})}
    async with fake_zeek() as zeek, analyzer(harness, zeek_url=zeek.url) as (port, _):
        await harness.r.xadd(P + "verdicts", bad)  # type: ignore[arg-type]
        await harness.r.xadd(P + "verdicts", good)  # type: ignore[arg-type]
        async with asyncio.timeout(20):
            message = await zeek.published.get()
        await until(lambda: asyncio.to_thread(rejected, port, "verdicts"), what="the rejection counted")
    assert str(message.event.args[0][0]) == good_record.src


async def test_a_zeek_handshake_out_of_range_never_reaches_the_stream(redis_server: RedisServer) -> None:
    """The Zeek feed runs the stream's own check (Handshake.check) before it writes."""
    queue: asyncio.Queue[Handshake] = asyncio.Queue()

    class Source:
        async def handshakes(self) -> AsyncIterator[Handshake]:
            while True:
                yield await queue.get()

    client = aioredis.from_url(redis_server.url, decode_responses=True)
    refused: list[HandshakeError] = []

    async def on_error(exc: Exception) -> None:
        raise AssertionError(exc)

    feed = asyncio.create_task(zeek_to_stream(Source(), client, "t:handshakes", on_error=on_error,
                                              on_reject=lambda _h, exc: refused.append(exc)))
    try:
        good = handshake("198.18.101.1", "198.19.0.1", t=time.time())
        for bad in (Handshake(**{**_as_dict(good), "t": 3e11}),
                    Handshake(**{**_as_dict(good), "tp_us": 10**400}),
                    Handshake(**{**_as_dict(good), "synack_times": (1.0,) * 100})):
            await queue.put(bad)
        await queue.put(good)
        await until(lambda: client.xlen("t:handshakes"), what="the good handshake on the stream")
        entries = await client.xrange("t:handshakes")
    finally:
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        await client.aclose()
    assert [Handshake.from_fields(f) for _, f in entries] == [good]
    assert len(refused) == 3


def _as_dict(h: Handshake) -> dict[str, Any]:
    return {name: getattr(h, name) for name in Handshake.__dataclass_fields__}


# --- class 4: option values huge but finite ------------------------------------------------------

ANALYZER_RUN = ["run", "--redis", "redis://127.0.0.1:1", "--handshakes", "--log-dir", "/nonexistent"]


@pytest.mark.parametrize(("option", "value"), [
    ("--dedup-window", "1e308"), ("--claim-after", "1e308"), ("--window", "1e308"),
    ("--deadline", "1e308"), ("--max-records", "10000000000"), ("--metrics-port", "99999"),
    ("--claim-after", "nan"), ("--window", "inf"),
])
def test_analyzer_run_options_out_of_range_are_one_line(option: str, value: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from analyzer.cli import main

    assert main([*ANALYZER_RUN, option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "Traceback" not in err, err


@pytest.mark.parametrize(("argv", "option"), [
    (["run", "--claim-idle", "1e308"], "--claim-idle"),
    (["run", "--target-interval", "1e308"], "--target-interval"),
    (["run", "--rate", "1e308"], "--rate"),
    (["run", "--concurrency", "1000000000"], "--concurrency"),
    (["run", "--max-deliveries", "1000000000"], "--max-deliveries"),
    (["run", "--max-ports", "100000"], "--max-ports"),
    (["enqueue", "--t", "1e308", "192.0.2.1"], "--t"),
    (["enqueue", "--deadline", "1e308", "192.0.2.1"], "deadline"),
    (["enqueue", "--dedup-window", "1e308", "192.0.2.1"], "dedup_window"),
    (["probe", "--reply-wait", "1e308", "192.0.2.1"], "reply wait"),
    (["probe", "--interval", "1e308", "192.0.2.1"], "interval"),
])
def test_prober_options_out_of_range_are_one_line(argv: list[str], option: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from prober.cli import main

    extra = ["--audit-log", str(tmp_path / "a")] if argv[0] in ("run", "probe") else []
    redis = ["--redis", "redis://127.0.0.1:1"] if argv[0] != "probe" else []
    assert main([argv[0], *redis, *extra, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "Traceback" not in err, err


def test_responder_port_out_of_range_is_one_clear_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "responder.cli", "run", "--darknet", "198.18.0.0/24",
                           "--listen-port", "9" * 5000], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "not a TCP port" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr) < 1000  # the value is cut short, not echoed in full


def test_the_analyzer_cli_keeps_running_over_a_non_utf8_entry(redis_server: RedisServer,
                                                               tmp_path: Path) -> None:
    """The real command: an entry that is not UTF-8, pending from an earlier run, used to stop
    `stepstone-analyzer run` with status 1 on every start."""
    import redis

    r = redis.Redis(unix_socket_path=str(redis_server.socket))
    r.xgroup_create(P + "handshakes", "analyzers", id="0", mkstream=True)
    r.xadd(P + "handshakes", {"t": BAD})
    r.xreadgroup("analyzers", "a1", {P + "handshakes": ">"})  # pending for a1, read first on start
    h = handshake("198.18.102.1", "198.19.0.1", t=time.time(), answered=False)
    r.xadd(P + "handshakes", h.to_fields())  # type: ignore[arg-type]
    proc = subprocess.Popen([sys.executable, "-m", "analyzer.cli", "run", "--redis", redis_server.url,
                             "--handshakes", "--consumer", "a1", "--log-dir", str(tmp_path)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not lines(tmp_path / "handshakes.log"):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no handshakes.log line"
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    r.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "is not UTF-8" in err, err


async def test_a_page_of_only_bad_pending_entries_does_not_end_the_pending_pass(
        redis_server: RedisServer) -> None:
    """On restart a consumer reads its own pending entries first, a page at a time: a whole page
    of entries that do not decode (acknowledged as rejected) is followed by the next page, so the
    valid entry behind them is done at once, not after the claim sweep (found in review)."""
    import redis.asyncio as aioredis

    from analyzer.feeds import StreamConsumer

    r = aioredis.from_url(redis_server.url)
    try:
        stream = "t:handshakes"
        await r.xgroup_create(stream, "g", id="0", mkstream=True)
        for _ in range(3):
            await r.xadd(stream, {b"src": b"\xff"})
        good = (await r.xadd(stream, {"src": "203.0.113.9"})).decode()
        await r.xreadgroup("g", "c", {stream: ">"})  # all four now pending for consumer c
        rejected: list[str] = []
        consumer = StreamConsumer(r, stream, "g", "c", count=2, claim_idle_ms=3_600_000, claim_every=3600,
                                  block_ms=50, on_reject=lambda _s, entry_id, _e: rejected.append(entry_id))
        stop = asyncio.Event()
        async with asyncio.timeout(10):
            async for batch in consumer.batches(stop):
                assert [entry_id for entry_id, _ in batch] == [good]
                break
        assert len(rejected) == 3
    finally:
        await r.aclose()
