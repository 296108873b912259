"""The sharding contract (prober/shards.py) and sharded serving on one Redis: which shard a source
belongs to (fixed: every producer and consumer of a deployment must agree, across versions), the
shard options at every command's boundary, and an analyzer with --zeek over 3 shards: Zeek's
handshakes go to their sources' shards, each shard's verdicts go back to the one Zeek."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_harness import ROOT, free_port, lines, scrape, until
from test_service_zeek import fake_zeek, handshake_event

from analyzer.broker import event_frame
from analyzer.service import Config
from analyzer.service import serve as serve_analyzer
from lab.redis import RedisServer
from prober import shards
from prober.audit import AuditLog
from prober.job import Job, Result
from prober.queue import redact
from prober.safety import TargetPolicy
from prober.worker import Worker, WorkerSettings


def test_shard_of_is_crc32_of_the_canonical_text() -> None:
    # Fixed values: a change here moves sources between shards in every running deployment.
    assert [shards.shard_of(a, 16) for a in ("198.18.0.1", "2001:db8::1", "203.0.113.77")] == [4, 14, 14]
    assert shards.shard_of("203.0.113.77", 6) == 2
    assert shards.shard_of("2001:DB8:0::1", 16) == shards.shard_of("2001:db8::1", 16)
    assert shards.shard_of("anything", 1) == 0
    with pytest.raises(ValueError):
        shards.shard_of("not-an-address", 4)


def test_layout_keeps_one_redis_as_it_was() -> None:
    assert shards.layout("stepstone:", 1, "redis://h:6379/0").prefix_of(0) == "stepstone:"
    assert shards.layout("stepstone:", 4, "unix:///r.sock").prefix_of(3) == "stepstone:{3}:"
    # A cluster needs the hash tag even for one shard: the scripts' keys must share a slot.
    assert shards.layout("x:", 1, "redis+cluster://h:1").prefix_of(0) == "x:{0}:"
    assert shards.parse_shard_list("0,3-5", 8) == (0, 3, 4, 5)
    assert shards.parse_shard_list(None, 3) == (0, 1, 2)


def test_a_brace_in_a_sharded_prefix_is_refused() -> None:
    # With `{x}` in the prefix every shard's keys would hash `x`: one slot, one node.
    for prefix, count, url in (("ss{x}:", 2, "redis://h"), ("ss}", 1, "redis+cluster://h:1")):
        with pytest.raises(shards.ShardError, match="--prefix"):
            shards.layout(prefix, count, url)
    assert shards.layout("ss{x}:", 1, "redis://h").prefix_of(0) == "ss{x}:"  # one Redis: unchanged


def test_urls_are_split_by_hand() -> None:
    # Several [v6]:port hosts are no netloc urlsplit takes (Debian's Python 3.11 raises "Invalid
    # IPv6 URL"): the scheme, the parse and the redaction never go through it.
    url = "redis+cluster://u:secret@[2001:db8::5]:7000,[2001:db8::6]:7001/0?wait_replicas=1#x"
    assert shards.scheme_of(url) == "redis+cluster" and shards.is_cluster(url)
    assert shards.split_url(url) == ("redis+cluster", "u:secret@[2001:db8::5]:7000,[2001:db8::6]:7001", "/0",
                                     "wait_replicas=1")
    assert redact(url) == "redis+cluster://u:***@[2001:db8::5]:7000,[2001:db8::6]:7001/0?wait_replicas=1#x"
    assert redact("redis://h:6379/0") == "redis://h:6379/0" and shards.scheme_of("h:6379") == ""


def test_cluster_url() -> None:
    spec = shards.parse_cluster_url("rediss+cluster://u:p%40ss@10.0.0.1:7000,[2001:db8::5]:7001"
                                    "?wait_replicas=1&wait_timeout=500")
    assert spec.nodes == (("10.0.0.1", 7000), ("2001:db8::5", 7001))
    assert spec.tls and spec.username == "u" and spec.password == "p@ss"
    assert (spec.wait_replicas, spec.wait_timeout_ms) == (1, 500)
    for bad in ("redis+cluster://h", "redis+cluster://h:1/3", "redis+cluster://h:1?wait=1",
                "redis+cluster://h:99999", "redis+cluster://h:1?wait_replicas=x"):
        with pytest.raises(shards.ShardError):
            shards.parse_cluster_url(bad)


@pytest.mark.parametrize("argv, message", [
    (["analyzer.cli", "run", "--redis", "redis://h/0", "--handshakes", "--log-dir", "x", "--shards", "0"],
     "stepstone-analyzer: --shards: 1 to 16384, not 0"),
    (["analyzer.cli", "run", "--redis", "redis://h/0", "--handshakes", "--log-dir", "x", "--shards", "4",
      "--shard", "2-9"], "stepstone-analyzer: --shard: 2-9 is not within 0-3 (--shards 4)"),
    (["analyzer.cli", "run", "--redis", "redis+cluster://h:1/2", "--handshakes", "--log-dir", "x"],
     "stepstone-analyzer: --redis: redis+cluster: a cluster has database 0 only (no /DB)"),
    (["analyzer.cli", "run", "--redis", "redis+cluster://127.0.0.1:1", "--handshakes", "--log-dir", "x"],
     "stepstone-analyzer: --redis: cannot reach Redis at redis+cluster://127.0.0.1:1: Redis Cluster cannot "
     "be connected. Please provide at least one reachable node: Error 111 connecting to 127.0.0.1:1. "
     "Connect call failed ('127.0.0.1', 1)."),
    (["prober.cli", "run", "--redis", "redis://h/0", "--shards", "3", "--shard", "x"],
     "stepstone-prober: --shard: not a list of shard numbers and ranges (0,3-5): 'x'"),
    (["prober.cli", "enqueue", "--redis", "redis://h/0", "--shards", "3", "nope"],
     "stepstone-prober: not an IP address: 'nope'"),
    (["responder.cli", "run", "--darknet", "198.19.0.0/24", "--redis", "redis+cluster://h:1?x=1"],
     "stepstone-responder: --redis: redis+cluster: unknown option 'x' (known: wait_replicas, wait_timeout)"),
    (["responder.cli", "run", "--darknet", "198.19.0.0/24", "--shards", "0"],
     "stepstone-responder: --shards: 1 to 16384, not 0"),
    (["prober.cli", "run", "--redis", "redis://h/0", "--shards", "3", "--prefix", "ss{x}:"],
     "stepstone-prober: --prefix: no '{' or '}' in a sharded prefix (the shard's hash tag follows it): "
     "'ss{x}:'"),
])
def test_bad_shard_options_one_line_exit_2(argv: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == message


async def instant(job: Job) -> Result:
    return Result(job=job.id, src=job.src, t=job.t, ping_min_us=9000, ping_avg_us=10000, ping_max_us=12000,
                  ping_var_us2=1e6, ping_loss=0.0, syn_rtt_us=10000, fa=None, fa_port=None,
                  probed_at=time.time())


async def test_zeek_over_three_shards_on_one_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    n = 3
    layout = shards.layout("stepstone:", n, redis_server.url)
    sources = [f"198.18.40.{i}" for i in range(1, 13)]
    assert {layout.shard_of(s) for s in sources} == set(range(n))  # every shard has some
    stop = asyncio.Event()
    audit = AuditLog(tmp_path / "audit.log", worker="p")
    audit.open()
    workers = [Worker(shards.client(redis_server.url), instant,
                      policy=TargetPolicy(allow=(ipaddress.ip_network("198.18.0.0/15"),)), audit=audit,
                      settings=WorkerSettings(prefix=layout.prefix_of(i), name="p", rate=0, target_interval=0,
                                              block_ms=200))
               for i in range(n)]
    port = free_port()
    async with fake_zeek() as zeek:
        config = Config(redis_url=redis_server.url, handshakes=True, zeek_url=zeek.url,
                        log_dir=tmp_path / "logs", consumer="z", metrics_port=port, shards=n)
        tasks = [asyncio.create_task(serve_analyzer(config, stop=stop)),
                 *(asyncio.create_task(w.run(stop)) for w in workers)]
        try:
            t = time.time()
            for k, src in enumerate(sources):
                await zeek.to_send.put(event_frame("stepstone/handshake",
                                                   handshake_event(f"C{k}", src, "198.19.0.7", t, 90_000)))
            back: set[str] = set()
            while back != set(sources):
                message = await asyncio.wait_for(zeek.published.get(), 30)
                assert message.event is not None and message.event.name == "StepStone::verdict"
                back.add(str(message.event.args[0][0]))

            async def counted() -> bool:
                metrics = await asyncio.to_thread(scrape, port)
                return (metrics.get('stepstone_analyzer_zeek_feed_shard_writes_total{what="written"}')
                        == len(sources))

            await until(counted, what="the sharded feed's writes on /metrics")
        finally:
            stop.set()
            codes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            for w in workers:
                await w.redis.aclose()
            audit.close()
    assert codes[0] == 0
    # Each source judged in its own shard's log, nowhere else.
    for i in range(n):
        got = {line["src"] for line in lines(tmp_path / "logs" / f"shard-{i}" / "stepstone.log")}
        assert got == {s for s in sources if layout.shard_of(s) == i}
