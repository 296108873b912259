"""The live analyzer service against a real redis-server.

The tests play the responder (XADD handshakes) and the prober (read `jobs`, XADD `results` and
`dead` entries in the prober's format); the real prober is exercised end to end by the lab's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from service_harness import (
    ROOT,
    Harness,
    P,
    free_port,
    handshake,
    label,
    lines,
    open_harness,
    result,
    running_service,
    scrape,
    until,
)

from analyzer.cli import main as cli_main
from analyzer.record import Record
from analyzer.service import Config, Service, serve
from analyzer.state import State, Stored
from analyzer.verdicts import JsonLog
from lab.redis import RedisServer

service = running_service


async def test_relayed_and_direct_sources_get_the_right_verdicts(harness: Harness) -> None:
    t = time.time()
    relay = handshake("198.18.5.1", "198.19.0.10", t=t, tp_us=80_000)  # Linux SYN, slow handshake
    direct = handshake("198.18.5.2", "198.19.0.11", t=t + 0.01, tp_us=20_000, dport=443)
    silent = handshake("198.18.5.3", "198.19.0.12", t=t + 0.02, answered=False)
    async with service(harness):
        ids = {h.src: await harness.send(h) for h in (relay, direct, silent)}
        jobs = await harness.jobs(2)
        by_src = {f["src"]: (job_id, f) for job_id, f in jobs}
        assert set(by_src) == {relay.src, direct.src}  # the unanswered one is not probed
        assert float(by_src[relay.src][1]["t"]) == pytest.approx(relay.t)
        fp = label(relay.syn or b"")
        # The relay's own stack answers the probe: another OS, and a short ping.
        await harness.answer(result(by_src[relay.src][0], relay.src, t, ping_max=10_000,
                                    fa="win:Windows:7 or 8"))
        await harness.answer(result(by_src[direct.src][0], direct.src, t, ping_max=25_000, fa=fp))
        out = {x["src"]: x for x in await harness.verdicts(2)}
        hs_lines = lines(harness.log_dir / "handshakes.log")

    assert fp is not None and fp.startswith("unix:Linux")
    r = out[relay.src]
    assert r["hid"] == ids[relay.src] and r["job"] == by_src[relay.src][0]
    assert (r["tp_us"], r["ping_max_us"], r["fp"], r["fa"]) == (80_000, 10_000, fp, "win:Windows:7 or 8")
    assert r["verdict"]["relay"] is True
    assert r["verdict"]["cond_os"] is True and r["verdict"]["cond_timing"] is True
    assert r["verdict"]["samples"] == 1 and r["verdict"]["src"] == relay.src
    assert (r["sport"], r["dport"], r["feed"], r["dst"]) == (40000, 22, "responder", relay.dst)
    assert r["verdict_at"] >= r["t"] and r["reason"] is None

    d = out[direct.src]
    assert d["verdict"]["relay"] is False
    assert d["verdict"]["cond_os"] is False and d["verdict"]["cond_timing"] is False
    assert d["tp_us"] == 20_000 and d["ping_max_us"] == 25_000 and d["dport"] == 443

    # Every handshake received, answered or not, is in handshakes.log, once.
    assert sorted(x["hid"] for x in hs_lines) == sorted(ids.values())
    quiet = next(x for x in hs_lines if x["src"] == silent.src)
    assert quiet["answered"] is False and quiet["job"] is None and quiet["tp_us"] is None

    # The example lines of docs/output.md (section `live`) show this relay: same fields as written,
    # so the documentation follows the verdict when it gains fields.
    readme = (ROOT / "docs" / "output.md").read_text()
    section = readme.split("<!-- section: live -->")[1].split("<!-- /section: live -->")[0]
    examples = [json.loads(x) for x in section.splitlines() if x.startswith('{"hid"')]
    readme_stepstone = next(x for x in examples if "verdict" in x)
    readme_handshake = next(x for x in examples if "verdict" not in x)
    assert list(readme_stepstone) == list(r) and list(readme_stepstone["verdict"]) == list(r["verdict"])
    assert list(readme_stepstone["probe"]) == list(r["probe"])
    assert list(readme_handshake) == list(hs_lines[0])
    # ... and the stepstone.log line of a verdict change: the record's fields, then the change's.
    readme_change = next(x for x in examples if "change" in x)
    changes = {x["src"]: x for x in lines(harness.log_dir / "stepstone.log")}
    assert list(readme_change) == list(changes[relay.src])
    assert changes[relay.src]["change"] == "first" and changes[relay.src]["verdict"] == r["verdict"]
    # Lines assembled from pre-encoded parts are exactly what encoding the whole object gives.
    for name in ("records.log", "stepstone.log"):
        for raw in (harness.log_dir / name).read_text().splitlines():
            assert raw == json.dumps(json.loads(raw), separators=(",", ":")), raw


async def test_dedup_attaches_handshakes_to_the_earlier_probe(harness: Harness) -> None:
    t = time.time()
    src = "198.18.6.1"
    first = handshake(src, "198.19.0.1", t=t, tp_us=30_000)
    second = handshake(src, "198.19.0.2", t=t + 1, tp_us=90_000, sport=40001)
    async with service(harness):
        await harness.send(first)
        await harness.send(second)
        (job_id, _), = await harness.jobs(1)
        await until(lambda: harness.r.scard(P + "job:" + job_id), what="both attached")
        assert await harness.r.xlen(P + "jobs") == 1  # one probe for the address
        await harness.answer(result(job_id, src, t, ping_max=40_000, fa=None))
        out = await harness.verdicts(2)
        # A handshake arriving after the probe's result is closed with it at once.
        third = handshake(src, "198.19.0.3", t=t + 2, tp_us=35_000, sport=40002)
        await harness.send(third)
        out = await harness.verdicts(3)

    assert [x["job"] for x in out] == [job_id] * 3
    assert sorted(x["tp_us"] for x in out) == [30_000, 35_000, 90_000]
    assert all(x["ping_max_us"] == 40_000 for x in out)
    # The window grows record by record: the last verdict saw all three samples.
    last = max(out, key=lambda x: x["verdict"]["samples"])
    assert last["verdict"]["samples"] == 3
    # mean T^p 51.7 ms > mean max T^a 40 ms: condition (2) over the window.
    assert last["verdict"]["cond_timing"] is True
    hs = {x["dst"]: x for x in lines(harness.log_dir / "handshakes.log")}
    assert hs["198.19.0.1"]["deduped"] is False and hs["198.19.0.2"]["deduped"] is True


async def test_dead_jobs_close_their_handshakes(harness: Harness) -> None:
    t = time.time()
    h = handshake("198.18.7.1", "198.19.0.1", t=t, tp_us=12_000)
    async with service(harness):
        hid = await harness.send(h)
        (job_id, fields), = await harness.jobs(1)
        await harness.r.xadd(P + "dead", {**fields, "job": job_id, "reason": "deadline passed by 3.2s"})
        (line,) = await harness.verdicts(1)
        # A malformed dead entry is dropped, not fatal.
        await harness.r.xadd(P + "dead", {"reason": "no job id"})
        await until(lambda: _group_drained(harness.r, P + "dead"), what="dead entries acknowledged")

    assert line["hid"] == hid and line["job"] == job_id
    assert line["reason"] == "probe gave up: deadline passed by 3.2s"
    assert line["ping_max_us"] is None and line["fa"] is None and line["probe"] is None
    assert line["tp_us"] == 12_000
    assert line["verdict"]["relay"] is False and line["verdict"]["samples"] == 0


async def _group_drained(r: aioredis.Redis, stream: str) -> bool:
    groups = await r.xinfo_groups(stream)
    g = next(x for x in groups if x["name"] == "analyzers")
    return bool(g["pending"] == 0 and (g.get("lag") or 0) == 0)


async def test_malformed_entries_are_acknowledged_and_counted(harness: Harness) -> None:
    port = free_port()
    async with service(harness, metrics_port=port):
        await harness.r.xadd(P + "handshakes", {"t": "yesterday", "src": "x"})
        await harness.r.xadd(P + "results", {"job": "", "src": "1.2.3.4"})
        good = handshake("198.18.8.1", "198.19.0.1", t=time.time())
        await harness.send(good)
        (job_id, _), = await harness.jobs(1)
        await harness.answer(result(job_id, good.src, good.t, ping_max=30_000, fa=None))
        await harness.verdicts(1)
        for stream in ("handshakes", "results"):
            await until(lambda s=stream: _group_drained(harness.r, P + s), what=f"{stream} drained")
        metrics = await asyncio.to_thread(scrape, port)
    assert metrics['stepstone_analyzer_errors_total{kind="malformed"}'] == 2
    assert metrics["stepstone_analyzer_handshakes_total"] == 1


async def test_metrics_endpoint_counts_the_pipeline(harness: Harness) -> None:
    port = free_port()
    t = time.time()
    async with service(harness, metrics_port=port):
        for i, src in enumerate(("198.18.9.1", "198.18.9.1", "198.18.9.2")):
            await harness.send(handshake(src, f"198.19.0.{i + 1}", t=t + i, tp_us=70_000, sport=40000 + i))
        await harness.send(handshake("198.18.9.3", "198.19.0.9", t=t, answered=False))
        jobs = await harness.jobs(2)
        for job_id, f in jobs:
            await harness.answer(result(job_id, f["src"], t, ping_max=10_000, fa=None))
        await harness.verdicts(3)
        metrics = await asyncio.to_thread(scrape, port)
    assert metrics["stepstone_analyzer_handshakes_total"] == 4
    assert metrics["stepstone_analyzer_answered_total"] == 3
    assert metrics["stepstone_analyzer_probes_enqueued_total"] == 2
    assert metrics["stepstone_analyzer_probes_deduped_total"] == 1
    assert metrics["stepstone_analyzer_results_total"] == 2
    assert metrics["stepstone_analyzer_verdicts_total"] == 3
    assert metrics["stepstone_analyzer_relays_total"] == 3  # T^p 70 ms against a 10 ms ping
    assert metrics["stepstone_analyzer_verdict_latency_seconds_count"] == 3
    assert 'stepstone_analyzer_queue_lag{stream="handshakes"}' in metrics


async def test_log_written_but_not_marked_before_a_crash_is_not_written_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    state = State(r)
    record = Record(t=1.0, src="198.18.0.1", dst="198.19.0.1", tp_us=1000)
    await state.save([Stored(hid=hid, record=record, sport=1, dport=2, feed="responder", job=None)
                      for hid in ("1-0", "2-0", "3-0")])
    path = tmp_path / "stepstone.log"
    # What a crash can leave: a whole line never marked in Redis, and a line cut short.
    path.write_text(json.dumps({"hid": "1-0", "src": "198.18.0.1"}) + "\n" + '{"hid": "2-0", "sr')
    log = JsonLog(path, "stepstone", state, ttl_after=state.closed_ttl)
    log.open()
    assert await log.recover() == 1
    assert await log.write("1-0", {"src": "198.18.0.1"}) is False
    assert await log.write("2-0", {"src": "198.18.0.2"}) is True
    assert await log.write("2-0", {"src": "198.18.0.2"}) is False
    log.close()
    assert [x["hid"] for x in lines(path)] == ["1-0", "2-0"]
    # Another process (nothing in memory, no tail read) learns it from Redis.
    other = JsonLog(path, "stepstone", state)
    other.open()
    assert await other.write("1-0", {}) is False and await other.write("2-0", {}) is False
    assert await other.write("3-0", {"src": "198.18.0.3"}) is True
    other.close()
    assert [x["hid"] for x in lines(path)] == ["1-0", "2-0", "3-0"]
    # Once closed, a handshake is kept only for redeliveries.
    assert 0 < await r.ttl(P + "hs:2-0") <= state.closed_ttl
    await r.aclose()


def _start(url: str, log_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "analyzer.cli", "run", "--redis", url, "--handshakes",
         "--log-dir", str(log_dir), "--consumer", "sub1", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def test_killed_service_loses_nothing_and_duplicates_nothing(harness: Harness) -> None:
    """A real subprocess, SIGKILLed while it works through results, then restarted. 1,000
    results: the service closes about 2,000 a second, so the kill after its first verdict lands
    mid-run even on a fast, idle machine (200 were sometimes all done by then)."""
    n = 1000
    t = time.time()
    proc = _start(harness.url, harness.log_dir)
    try:
        srcs = [f"198.18.{10 + i // 200}.{1 + i % 200}" for i in range(n)]
        for i, src in enumerate(srcs):
            await harness.send(handshake(src, "198.19.0.1", t=t + i * 0.001, tp_us=50_000 + i))
        jobs = await harness.jobs(n)
        for job_id, f in jobs:
            await harness.answer(result(job_id, f["src"], t, ping_max=20_000, fa=None))
        await harness.verdicts(1)
        proc.kill()  # mid-run: results are still being worked through
        proc.wait(10)
        written = len(lines(harness.log_dir / "records.log"))
        assert written < n, "the kill came too late to test anything"
        # Two more handshakes while it is down.
        late = [handshake(f"198.18.99.{i}", "198.19.0.2", t=time.time(), tp_us=5_000) for i in (1, 2)]
        for h in late:
            await harness.send(h)
        proc = _start(harness.url, harness.log_dir)
        late_jobs = await harness.jobs(n + 2)
        for job_id, f in late_jobs[n:]:
            await harness.answer(result(job_id, f["src"], t, ping_max=20_000, fa=None))
        out = await harness.verdicts(n + 2)
        await until(lambda: _group_drained(harness.r, P + "results"), what="results drained")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    out = lines(harness.log_dir / "records.log")
    hids = [x["hid"] for x in out]
    assert len(hids) == len(set(hids)) == n + 2, f"{written} lines before the kill"
    assert {x["src"] for x in out} == {*srcs, *(h.src for h in late)}
    assert all(x["ping_max_us"] == 20_000 for x in out)
    hs = [x["hid"] for x in lines(harness.log_dir / "handshakes.log")]
    assert len(hs) == len(set(hs)) == n + 2
    assert await harness.r.xlen(P + "jobs") == n + 2  # nothing probed twice


async def test_sigterm_and_sigint_exit_zero_and_restart_resumes_pending(harness: Harness) -> None:
    proc = _start(harness.url, harness.log_dir)
    h = handshake("198.18.20.1", "198.19.0.1", t=time.time())
    try:
        await harness.send(h)
        (job_id, _), = await harness.jobs(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    # The result arrives while no analyzer runs; the next one picks it up.
    await harness.answer(result(job_id, h.src, h.t, ping_max=30_000, fa=None))
    proc = _start(harness.url, harness.log_dir)
    try:
        (line,) = await harness.verdicts(1)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the same orderly stop
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert line["job"] == job_id and line["ping_max_us"] == 30_000


async def test_entries_of_a_dead_analyzer_are_claimed(harness: Harness) -> None:
    h = handshake("198.18.21.1", "198.19.0.1", t=time.time())
    hid = await harness.send(h)
    # Analyzer "gone" read the entry and died before acknowledging it.
    await harness.r.xgroup_create(P + "handshakes", "analyzers", id="0", mkstream=True)
    await harness.r.xreadgroup("analyzers", "gone", {P + "handshakes": ">"})
    async with service(harness, claim_after=0.2):
        (job_id, _), = await harness.jobs(1)
        await harness.answer(result(job_id, h.src, h.t, ping_max=30_000, fa=None))
        (line,) = await harness.verdicts(1)
    assert line["hid"] == hid


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--redis", "unix:///nonexistent/redis.sock", "--handshakes"], "cannot reach Redis"),
        (["--redis", "redis://:hunter2@127.0.0.1:1/0", "--handshakes"], "cannot reach Redis"),
        (["--redis", "http://localhost", "--handshakes"], "not a Redis URL"),
        (["--redis", "redis://localhost"], "give a feed"),
        (["--redis", "redis://localhost", "--zeek", "http://x/v1"], "not a WebSocket URL"),
        (["--redis", "redis://localhost", "--zeek", "ws://[::1]:99999/v1/messages/json"], "WebSocket URL"),
        (["--redis", "redis://localhost", "--zeek", "ws://127.0.0.1:port/v1/messages/json"], "WebSocket URL"),
        (["--redis", "redis://localhost", "--zeek", "ws://127.0.0.1:0/v1/messages/json"], "WebSocket URL"),
        (["--redis", "redis://localhost", "--handshakes", "--ports", "22,0"], "--ports"),
        (["--redis", "redis://localhost", "--handshakes", "--darknet", "10.0.0.300/8"], "--darknet"),
        (["--redis", "redis://localhost", "--handshakes", "--hops-offset", "300"], "--hops-offset"),
        (["--redis", "redis://localhost", "--handshakes", "--hops-offset", "nan"], "--hops-offset"),
        (["--redis", "redis://localhost", "--handshakes", "--app-allowance", "-1"], "--app-allowance"),
        (["--redis", "redis://localhost", "--handshakes", "--app-allowance", "inf"], "--app-allowance"),
        # Unclosed [v6] hosts: urlsplit raises on them (on newer Pythons on any multi-host [v6] URL).
        (["--redis", "redis://localhost", "--zeek", "ws://[::1/v1/messages/json"], "--zeek"),
        (["--redis", "redis://[::1", "--handshakes"], "--redis"),
        (["--redis", "redis+cluster://[::1:7000", "--handshakes"], "--redis"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["run", "--log-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "hunter2" not in err  # no password in messages


def test_unwritable_log_dir(redis_server: RedisServer, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli_main(["run", "--redis", redis_server.url, "--handshakes", "--log-dir", str(blocker / "logs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--log-dir" in err and len(err.splitlines()) == 1


def test_help_teaches() -> None:
    out = subprocess.run([sys.executable, "-m", "analyzer.cli", "run", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "100"})
    for word in ("--handshakes", "--zeek", "--log-dir", "--metrics-port", "stepstone.log", "examples:"):
        assert word in out.stdout


async def test_two_analyzers_share_the_work_without_duplicates(harness: Harness, tmp_path: Path) -> None:
    t = time.time()
    srcs = [f"198.18.40.{i}" for i in range(1, 21)]
    second = Harness.__new__(Harness)  # the same Redis, its own log folder
    second.url, second.r, second.log_dir = harness.url, harness.r, tmp_path / "logs2"
    async with service(harness), service(second, consumer="a2"):
        for k in range(3):  # each source three times: one probe, two attached
            for i, src in enumerate(srcs):
                await harness.send(handshake(src, f"198.19.1.{k}", t=t + k + i * 0.001, sport=40000 + k))
        jobs = await harness.jobs(len(srcs))
        for job_id, f in jobs:
            await harness.answer(result(job_id, f["src"], t, ping_max=20_000, fa=None))

        async def all_closed() -> Any:
            got = lines(harness.log_dir / "records.log") + lines(second.log_dir / "records.log")
            return got if len(got) >= 3 * len(srcs) else None

        out = await until(all_closed, what="60 lines across both logs")
        await until(lambda: _group_drained(harness.r, P + "results"), what="results drained")
    # Both took part (results are read in batches, so neither gets everything in practice).
    assert lines(harness.log_dir / "records.log") and lines(second.log_dir / "records.log")
    assert await harness.r.xlen(P + "jobs") == len(srcs)
    hids = [x["hid"] for x in out]
    assert len(hids) == len(set(hids)) == 3 * len(srcs)
    assert all(x["ping_max_us"] == 20_000 for x in out)  # every handshake got its source's probe


async def test_job_enqueued_by_a_crashed_analyzer_is_found_on_the_stream(harness: Harness) -> None:
    """An analyzer died after enqueueing and before recording the job: the redelivered handshake
    is deduped, and finds its job on the `jobs` stream instead of going unprobed."""
    from prober.queue import ProbeQueue

    h = handshake("198.18.50.1", "198.19.0.1", t=time.time())
    job_id = await ProbeQueue(harness.r).enqueue(h.src, h.t)
    assert job_id is not None
    async with service(harness):
        await harness.send(h)
        await until(lambda: harness.r.scard(P + "job:" + job_id), what="attached to the earlier job")
        await harness.answer(result(job_id, h.src, h.t, ping_max=30_000, fa=None))
        (line,) = await harness.verdicts(1)
    assert line["job"] == job_id and line["ping_max_us"] == 30_000
    assert await harness.r.xlen(P + "jobs") == 1


async def test_redis_restart_mid_run_loses_nothing(redis_aof: RedisServer, tmp_path: Path) -> None:
    async with open_harness(redis_aof, tmp_path / "logs") as h, service(h):
        first = handshake("198.18.60.1", "198.19.0.1", t=time.time())
        await h.send(first)
        (job1, _), = await h.jobs(1)
        await asyncio.to_thread(redis_aof.restart)  # kill -9 and start again, AOF on
        await h.answer(result(job1, first.src, first.t, ping_max=30_000, fa=None))
        second = handshake("198.18.60.2", "198.19.0.1", t=time.time())
        await h.send(second)
        jobs = await h.jobs(2)
        await h.answer(result(jobs[1][0], second.src, second.t, ping_max=30_000, fa=None))
        out = await h.verdicts(2)
    assert sorted(x["src"] for x in out) == [first.src, second.src]
    assert all(x["ping_max_us"] == 30_000 for x in out)


async def test_result_for_another_address_keeps_the_passive_half(harness: Harness) -> None:
    h = handshake("198.18.61.1", "198.19.0.1", t=time.time(), tp_us=15_000)
    async with service(harness):
        await harness.send(h)
        (job_id, _), = await harness.jobs(1)
        await harness.answer(result(job_id, "198.18.61.99", h.t, ping_max=30_000, fa=None))
        (line,) = await harness.verdicts(1)
    assert line["ping_max_us"] is None and line["tp_us"] == 15_000
    assert line["reason"].startswith("probe result unusable")


async def test_a_bad_entry_does_not_hold_up_its_batch(harness: Harness) -> None:
    t = time.time()
    bad, good = (handshake(f"198.18.62.{i}", "198.19.0.1", t=t) for i in (1, 2))
    async with service(harness):
        await harness.send(bad)
        await harness.send(good)
        jobs = {f["src"]: job_id for job_id, f in await harness.jobs(2)}
    # Someone wrote garbage where the analyzer keeps the bad job's outcome; both results arrive
    # while the analyzer is down, so it reads them as one batch.
    await harness.r.hset(P + "outcome:" + jobs[bad.src], "ping_max_us", "lots")
    for h in (bad, good):
        await harness.answer(result(jobs[h.src], h.src, t, ping_max=30_000, fa=None))
    async with service(harness):
        (line,) = await harness.verdicts(1)
        await until(lambda: _group_drained(harness.r, P + "results"), what="both results acknowledged")
    assert line["src"] == good.src and line["ping_max_us"] == 30_000


async def test_darknet_filter_and_record_cap(harness: Harness) -> None:
    t = time.time()
    src = "198.18.63.1"
    async with service(harness, darknets=(ipaddress.ip_network("198.19.0.0/16"),), max_records=2):
        await harness.send(handshake(src, "203.0.113.9", t=t))  # not to the darknet: skipped
        for i in range(4):
            await harness.send(handshake(src, f"198.19.0.{i + 1}", t=t + i, sport=41000 + i))
        (job_id, _), = await harness.jobs(1)
        await until(lambda: _group_drained(harness.r, P + "handshakes"), what="handshakes done")
        await harness.answer(result(job_id, src, t, ping_max=30_000, fa=None))
        out = await harness.verdicts(4)
    logged = {x["dst"] for x in lines(harness.log_dir / "handshakes.log")}
    assert logged == {f"198.19.0.{i}" for i in range(1, 5)}
    assert max(x["verdict"]["records"] for x in out) == 2  # judged on the newest two only


async def test_consumed_work_is_trimmed_from_the_streams(harness: Harness) -> None:
    """Handshakes and results every group has acknowledged leave Redis; jobs stay for the dedup
    window, acknowledged or not (a later analyzer looks there for a crashed one's job), dead
    letters for a day."""
    await harness.r.config_set("stream-node-max-entries", 1)  # trimming is then exact
    port = free_port()
    t = time.time()
    srcs = [f"198.18.64.{i}" for i in range(1, 11)]
    async with service(harness, metrics_port=port):
        for i, src in enumerate(srcs):
            await harness.send(handshake(src, "198.19.0.1", t=t + i * 0.001))
        jobs = await harness.jobs(len(srcs))
        # Played prober: take and acknowledge every job, as `stepstone-prober run` does.
        await harness.r.xgroup_create(P + "jobs", "probers", id="0")
        taken = await harness.r.xreadgroup("probers", "p1", {P + "jobs": ">"})
        await harness.r.xack(P + "jobs", "probers", *(entry_id for entry_id, _ in taken[0][1]))
        answered, given_up = jobs[:-2], jobs[-2:]
        for job_id, f in answered:
            await harness.answer(result(job_id, f["src"], t, ping_max=10_000, fa=None))
        for job_id, f in given_up:
            await harness.r.xadd(P + "dead", {**f, "job": job_id, "reason": "deadline passed"})
        await harness.verdicts(len(srcs))
        await until(lambda: _group_drained(harness.r, P + "dead"), what="dead entries acknowledged")

        async def trimmed() -> bool:
            # The newest entry of each may stay (the floor keeps a group's last delivered entry).
            return (await harness.r.xlen(P + "handshakes") <= 1
                    and await harness.r.xlen(P + "results") <= 1)

        await until(trimmed, what="acknowledged handshakes and results trimmed")
        metrics = await asyncio.to_thread(scrape, port)
    assert await harness.r.xlen(P + "jobs") == len(srcs)
    assert await harness.r.xlen(P + "dead") == 2  # read, but dead letters stay a day for operators
    assert metrics['stepstone_analyzer_stream_entries_trimmed_total{stream="handshakes"}'] >= len(srcs) - 1
    assert metrics['stepstone_analyzer_stream_entries_trimmed_total{stream="results"}'] >= len(srcs) - 3


async def test_an_entry_that_keeps_failing_is_abandoned_not_retried_forever(harness: Harness) -> None:
    t = time.time()
    stuck, fine = handshake("198.18.64.1", "198.19.0.1", t=t), handshake("198.18.64.2", "198.19.0.1", t=t)
    # The source's window key holds the wrong type: every attempt to close `stuck` fails in Redis.
    await harness.r.set(P + "src:" + stuck.src, "not a sorted set")
    port = free_port()
    async with service(harness, claim_after=0.1, metrics_port=port):
        for h in (stuck, fine):
            await harness.send(h)
        jobs = {f["src"]: job_id for job_id, f in await harness.jobs(2)}
        for h in (stuck, fine):
            await harness.answer(result(jobs[h.src], h.src, t, ping_max=30_000, fa=None))
        (line,) = await harness.verdicts(1)
        await until(lambda: _group_drained(harness.r, P + "results"), what="the stuck result given up")
        metrics = await asyncio.to_thread(scrape, port)
    assert line["src"] == fine.src
    assert metrics['stepstone_analyzer_errors_total{kind="abandoned"}'] == 1


async def test_a_broken_stream_stops_the_service_with_status_1(harness: Harness) -> None:
    """Someone put a plain string where the dead-letter stream belongs: the service must not go on
    half-working (no dead letters read) but stop, non-zero, for its supervisor to see."""
    await harness.r.set(P + "dead", "not a stream")
    config = Config(redis_url=harness.url, handshakes=True, zeek_url=None, log_dir=harness.log_dir,
                    consumer="a1")
    assert await asyncio.wait_for(serve(config), 20) == 1


async def test_a_side_task_that_dies_stops_the_service_with_status_1(
        harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The lag and retention watch dies of a bug (injected here): the service must not run on
    without it (Redis would fill up unseen) but stop, non-zero, and say which task died."""
    import analyzer.service

    async def broken(*_args: Any, **_kwargs: Any) -> int:
        raise RuntimeError("injected retention bug")

    monkeypatch.setattr(analyzer.service, "trim_consumed", broken)
    config = Config(redis_url=harness.url, handshakes=True, zeek_url=None, log_dir=harness.log_dir,
                    consumer="a1")
    assert await asyncio.wait_for(serve(config), 20) == 1
    assert "the lag and retention watch ended: RuntimeError('injected retention bug')" in caplog.text


async def test_refused_trimming_is_reported_once_and_work_goes_on(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """An ACL that forbids XTRIM: the analyzer keeps working, says once per stream that it cannot
    trim (Redis would fill up unseen otherwise) and counts every refusal."""
    await harness.r.execute_command("ACL", "SETUSER", "analyst", "on", ">pw", "~*", "&*", "+@all", "-xtrim")
    port = free_port()
    t = time.time()
    await harness.send(handshake("198.18.65.1", "198.19.0.1", t=t))
    config = Config(redis_url=harness.url.replace("unix://", "unix://analyst:pw@"), handshakes=True,
                    zeek_url=None, log_dir=harness.log_dir, consumer="a1", metrics_port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop=stop))
    try:
        (job_id, f), = await harness.jobs(1)
        await harness.answer(result(job_id, f["src"], t, ping_max=10_000, fa=None))
        await harness.verdicts(1)

        async def two_rounds() -> bool:
            # handshakes, results and dead have a group (jobs has none here: no prober): 3 a round.
            metrics = await asyncio.to_thread(scrape, port)
            return metrics.get('stepstone_analyzer_errors_total{kind="retention"}', 0) >= 6

        await until(two_rounds, what="refused trims counted over two rounds")
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0
    warnings = [r.getMessage() for r in caplog.records if "cannot trim" in r.getMessage()]
    assert sorted(w.split(":", 2)[1] for w in warnings) == ["dead", "handshakes", "results"]
    assert all("no permissions" in w for w in warnings), warnings


async def test_only_the_first_k_handshakes_of_a_source_are_measured(harness: Harness) -> None:
    """--sample-per-source 3: a scanner's 10 handshakes in one probe period make 3 records and 1
    probe; the other 7 are counted (the verdict line, cnt:<src>, /metrics), never silently lost."""
    port = free_port()
    t = time.time()
    src = "198.18.70.1"
    async with service(harness, sample_per_source=3, metrics_port=port):
        ids = [await harness.send(handshake(src, f"198.19.2.{i}", t=t + i * 0.01, sport=41000 + i,
                                            tp_us=30_000)) for i in range(10)]
        await harness.send(handshake("198.18.70.2", "198.19.2.99", t=t, answered=False))
        await until(lambda: _group_drained(harness.r, P + "handshakes"), what="handshakes drained")
        (job_id, _), = await harness.jobs(1)
        await harness.answer(result(job_id, src, t, ping_max=40_000, fa=None))
        out = await harness.verdicts(3)
        await until(lambda: _group_drained(harness.r, P + "results"), what="results drained")
        metrics = await asyncio.to_thread(scrape, port)
        counts = await harness.r.hgetall(P + f"cnt:{src}")
    assert sorted(x["hid"] for x in out) == sorted(ids[:3])  # the first three, in stream order
    assert len(lines(harness.log_dir / "records.log")) == 3
    hs = lines(harness.log_dir / "handshakes.log")
    assert sorted(x["hid"] for x in hs if x["src"] == src) == sorted(ids[:3])
    (change,) = lines(harness.log_dir / "stepstone.log")
    assert change["src"] == src and change["change"] == "first"
    counted = (change["handshakes_seen"], change["handshakes_answered"], change["handshakes_sampled"])
    assert counted == (10, 10, 3)
    assert change["verdict"]["records"] == 3
    assert (counts["seen"], counts["answered"], counts["sampled"]) == ("10", "10", "3")
    assert metrics["stepstone_analyzer_handshakes_total"] == 11
    assert metrics["stepstone_analyzer_answered_total"] == 10
    assert metrics["stepstone_analyzer_handshakes_sampled_total"] == 4  # the silent one is sampled too
    assert metrics["stepstone_analyzer_handshakes_counted_total"] == 7
    assert metrics['stepstone_analyzer_verdict_lines_total{change="first"}'] == 1
    assert await harness.r.xlen(P + "jobs") == 1


async def test_a_verdict_is_emitted_when_it_changes_or_is_due_a_refresh(harness: Harness) -> None:
    """stepstone.log and the verdicts stream (-> Zeek) get a source's verdict once per change and
    once per --refresh, not once per handshake; records.log keeps every measured handshake."""
    t = time.time()
    src = "198.18.71.1"

    async def closed(n: int) -> list[dict[str, Any]]:
        await harness.verdicts(n)
        await until(lambda: _group_drained(harness.r, P + "handshakes"), what="handshakes drained")
        await until(lambda: _group_drained(harness.r, P + "results"), what="results drained")
        return lines(harness.log_dir / "stepstone.log")

    async with service(harness, refresh=1.0):
        await harness.send(handshake(src, "198.19.3.1", t=t, tp_us=20_000))
        (job_id, _), = await harness.jobs(1)
        await harness.answer(result(job_id, src, t, ping_max=25_000, fa=None))
        assert [x["change"] for x in await closed(1)] == ["first"]
        # The same again, at once: the verdict is unchanged, nothing is emitted.
        await harness.send(handshake(src, "198.19.3.2", t=t + 0.1, tp_us=21_000, sport=40001))
        assert [x["change"] for x in await closed(2)] == ["first"]
        # A slow handshake: mean T^p now beats the ping (condition 2), the verdict changes.
        await harness.send(handshake(src, "198.19.3.3", t=t + 0.2, tp_us=200_000, sport=40002))
        changes = await closed(3)
        assert [x["change"] for x in changes] == ["first", "changed"]
        assert changes[1]["verdict"]["relay"] is True and changes[0]["verdict"]["relay"] is False
        # Unchanged, but a refresh is due once --refresh has passed since the last line.
        last = changes[1]["verdict_at"]
        await until(lambda: asyncio.sleep(0, time.time() > last + 1.0), what="the refresh interval to pass")
        await harness.send(handshake(src, "198.19.3.4", t=t + 0.3, tp_us=200_000, sport=40003))
        changes = await closed(4)
    assert [x["change"] for x in changes] == ["first", "changed", "refresh"]
    entries = await harness.r.xrange(P + "verdicts")
    assert [e["hid"] for _, e in entries] == [x["hid"] for x in changes]
    assert [x["verdict_entry"] for x in changes] == [entry_id for entry_id, _ in entries]
    assert changes[2]["handshakes_seen"] == 4


async def test_a_redone_emission_gets_its_entry_back_and_appends_nothing(redis_server: RedisServer) -> None:
    """A batch that emitted a verdict and then failed (Redis failed over, the process died) is
    redone: the same handshake with the same verdict gets the same change and entry back, so its
    stepstone.log line is still written, and the stream gets no second entry."""
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    state = State(r)
    fields = {"hid": "5-0", "verdict": "{}", "record": "{}"}
    first = await state.emit([("198.18.80.1", "none|0000|", "5-0", fields)], now=100.0, refresh=3600)
    again = await state.emit([("198.18.80.1", "none|0000|", "5-0", fields)], now=101.0, refresh=3600)
    other = await state.emit([("198.18.80.1", "none|0000|", "6-0", {**fields, "hid": "6-0"})], now=102.0,
                             refresh=3600)
    changed = await state.emit([("198.18.80.1", "shared|1010|os", "7-0", {**fields, "hid": "7-0"})],
                               now=103.0, refresh=3600)
    entries = await r.xrange(P + "verdicts")
    await r.aclose()
    assert first[0] is not None and first[0].change == "first"
    assert again == first  # the redo: the same change and entry
    assert other == [None]  # another handshake, the same verdict: nothing to say
    assert changed[0] is not None and changed[0].change == "changed"
    assert [e["hid"] for _, e in entries] == ["5-0", "7-0"]


async def test_an_emission_for_a_source_never_sampled_leaves_its_counts_to_expire(
    redis_server: RedisServer,
) -> None:
    """A verdict emitted for a source whose cnt:<src> is gone (expired or evicted while its
    handshake waited, or sampled by an older version) creates the key: it must get the counts'
    TTL, not live forever."""
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    state = State(r)
    fields = {"hid": "5-0", "verdict": "{}", "record": "{}"}
    (done,) = await state.emit([("198.18.77.1", "none|0000|", "5-0", fields)], now=100.0, refresh=3600)
    ttl = await r.ttl(P + "cnt:198.18.77.1")
    await r.aclose()
    assert done is not None and done.change == "first"
    assert 0 < ttl <= state.src_ttl


async def test_a_batch_redone_after_its_change_line_failed_still_writes_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A batch that emitted a verdict and failed before its stepstone.log line was written (the
    disk refused it; a Redis failover or a kill at that point does the same) is redone: the
    change line is written then, once, with the entry emitted the first time. (A handshake whose
    records.log line is marked is never redone, so that line must come last.)"""
    log_dir = tmp_path / "logs"
    config = Config(redis_url=redis_server.url, handshakes=True, zeek_url=None, log_dir=log_dir,
                    consumer="a1")
    service = await Service.start(config)
    try:
        record = Record(t=time.time(), src="198.18.72.1", dst="198.19.4.1", tp_us=30_000)
        await service.state.save([Stored(hid="9-0", record=record, sport=40000, dport=22,
                                         feed="responder", job=None)])
        closing = [("9-0", None, None, "deduped: no earlier probe of this address is known")]
        with refusing_writes(service.stepstone_log, log_dir / "stepstone.log"), pytest.raises(OSError):
            await service.close_many(closing)  # the change line's write fails
        await service.close_many(closing)  # the redo
        await service.close_many(closing)  # and a redelivery after it: nothing more
        entries = await service.redis.xrange(P + "verdicts")
    finally:
        await service.close()
    (change,) = lines(log_dir / "stepstone.log")
    assert change["hid"] == "9-0" and change["change"] == "first"
    assert [entry_id for entry_id, _ in entries] == [change["verdict_entry"]]
    assert [x["hid"] for x in lines(log_dir / "records.log")] == ["9-0"]


@contextlib.contextmanager
def refusing_writes(log: Any, path: Path) -> Iterator[None]:
    """`log`'s writes fail while inside (EBADF: its descriptor swapped for one not open for
    writing, as a full or failing disk would make them fail); restored after."""
    good = log._fd
    log._fd = os.open(path, os.O_RDONLY)
    try:
        yield
    finally:
        os.close(log._fd)
        log._fd = good


async def test_a_job_closing_thousands_of_one_sources_handshakes_adds_them_all(
    redis_server: RedisServer,
) -> None:
    """--sample-per-source 0: a scanner's handshakes of a whole probe period wait for one job, and
    its result closes them in one batch. Adding them to the window is one Lua call, whose ZADD
    must not take them all as one unpack (Lua refuses about 8,000 values: the batch failed)."""
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    state = State(r, max_records=10_000)
    t = time.time()
    batch = [(f"{i + 1}-0", Record(t=t + i * 0.001, src="198.18.73.1", dst="198.19.5.1", tp_us=30_000))
             for i in range(5000)]
    windows = await state.add_records(batch)
    assert len(windows["198.18.73.1"].records) == 5000
    assert await r.zcard(P + "src:198.18.73.1") == 5000
    await r.aclose()


async def test_a_batch_redone_after_a_failure_gets_its_grants_back_and_is_counted_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """--sample-per-source 3: a batch with 5 handshakes of a source is granted 3, then fails (here
    handshakes.log refuses the write; a Redis failover does the same) and is read again. The redo
    measures the same 3 (they were measured nowhere: the grant must not be used up by the failed
    try) and counts the 5 once."""
    log_dir = tmp_path / "logs"
    config = Config(redis_url=redis_server.url, handshakes=True, zeek_url=None, log_dir=log_dir,
                    consumer="a1", sample_per_source=3)
    service = await Service.start(config)
    src = "198.18.74.1"
    t = time.time()
    batch = [(f"{i + 1}-0", handshake(src, f"198.19.6.{i}", t=t + i * 0.01, sport=42000 + i).to_fields())
             for i in range(5)]
    try:
        with refusing_writes(service.handshakes_log, log_dir / "handshakes.log"), pytest.raises(OSError):
            await service.handle_handshakes(batch)
        await service.handle_handshakes(batch)  # the redo
        counts = await service.redis.hgetall(P + f"cnt:{src}")
    finally:
        await service.close()
    assert [x["hid"] for x in lines(log_dir / "handshakes.log")] == ["1-0", "2-0", "3-0"]
    counted = (counts["seen"], counts["answered"], counts["sampled"], counts["p_sampled"])
    assert counted == ("5", "5", "3", "3")


async def test_a_hand_edited_probe_period_starts_a_new_one(redis_server: RedisServer) -> None:
    """cnt:<src> is Redis's, readable and editable by hand: a p_start that is not a number makes a
    new period (the script once failed on it, and with it every batch with that source)."""
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    state = State(r)
    await r.hset(P + "cnt:198.18.75.1", mapping={"p_start": "yesterday", "p_sampled": "many"})
    grants = await state.sample([("198.18.75.1", 4, 4, "1-0")], now=1000.0, period=3600.0, cap=3)
    counts = await r.hgetall(P + "cnt:198.18.75.1")
    await r.aclose()
    assert grants == [3]
    assert (counts["p_start"], counts["p_sampled"], counts["seen"]) == ("1000.0", "3", "4")


async def test_hand_edited_counts_start_again(redis_server: RedisServer) -> None:
    """Counts in cnt:<src> that are not whole numbers (or would overflow Redis's 64-bit HINCRBY)
    restart from 0 instead of failing the sampling script for every batch with that source."""
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    state = State(r)
    await r.hset(P + "cnt:198.18.75.2", mapping={"seen": "lots", "answered": "9" * 19, "sampled": "-1"})
    grants = await state.sample([("198.18.75.2", 4, 3, "1-0")], now=1000.0, period=3600.0, cap=3)
    counts = await r.hgetall(P + "cnt:198.18.75.2")
    await r.aclose()
    assert grants == [3]
    assert (counts["seen"], counts["answered"], counts["sampled"]) == ("4", "3", "3")


async def test_hostile_sources_are_not_kept_by_the_cheap_paths_cache(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The counted path remembers each source text it has checked (1M of them at most), bad ones
    too. A src of tens of kB (an entry's fields may be 87 kB) is rejected and not kept: a million
    of them would hold 87 GB."""
    config = Config(redis_url=redis_server.url, handshakes=True, zeek_url=None, log_dir=tmp_path / "logs",
                    consumer="a1")
    service = await Service.start(config)
    good = handshake("198.18.76.1", "198.19.7.1", t=time.time()).to_fields()
    batch = [(f"{i + 1}-0", {**good, "src": f"{i}" + "x" * 60_000}) for i in range(3)]
    try:
        await service.handle_handshakes([*batch, ("9-0", good)])
    finally:
        await service.close()
    assert service.metrics.rejected.labels("handshakes")._value.get() == 3
    assert max(map(len, service._srcs)) <= 45 and "198.18.76.1" in service._srcs
