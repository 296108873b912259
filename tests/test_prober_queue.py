"""The queue client the analyzer uses, against a real redis-server."""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from lab.redis import RedisServer
from prober.job import DEFAULT_PORTS, Job, JobError, Result
from prober.queue import ProbeQueue, QueueConfigError, connect


@pytest.fixture
async def conn(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = await connect(redis_server.url)
    yield client
    await client.aclose()


def result_for(job_id: str, src: str, **extra: object) -> Result:
    return Result(job=job_id, src=src, t=1.0, ping_min_us=100, ping_avg_us=120, ping_max_us=150,
                  ping_var_us2=250.0, ping_loss=0.0, syn_rtt_us=90, fa="unix:Linux:3.x", fa_port=80,
                  probed_at=2.0, **extra)  # type: ignore[arg-type]


async def test_enqueue_writes_contract_fields(conn: aioredis.Redis) -> None:
    queue = ProbeQueue(conn, deadline=30.0)
    before = time.time()
    job_id = await queue.enqueue("203.0.113.5", 1000.5, ports=[80, 443])
    assert job_id is not None
    [(entry_id, fields)] = await conn.xrange("stepstone:jobs")
    assert entry_id == job_id
    assert set(fields) == {"src", "t", "deadline", "ports", "enqueued"}
    job = Job.from_fields(entry_id, fields)
    assert (job.src, job.t, job.deadline, job.ports) == ("203.0.113.5", 1000.5, 1030.5, (80, 443))
    assert job.enqueued is not None and before <= job.enqueued <= time.time()
    assert Job.from_fields(entry_id, (await conn.xrange("stepstone:jobs"))[0][1]).ports == (80, 443)
    other = await queue.enqueue("203.0.113.6", 1000.5)
    assert Job.from_fields(other or "", (await conn.xrange("stepstone:jobs"))[1][1]).ports == DEFAULT_PORTS


async def test_dedup_window_is_atomic_and_expires(conn: aioredis.Redis) -> None:
    queue = ProbeQueue(conn, dedup_window=0.3)
    # Many concurrent enqueues of one address (two analyzers racing): exactly one job.
    ids = await asyncio.gather(*(queue.enqueue("198.51.100.1", time.time()) for _ in range(50)))
    assert sum(i is not None for i in ids) == 1
    assert await conn.xlen("stepstone:jobs") == 1
    assert await queue.enqueue("198.51.100.2", time.time()) is not None  # other address unaffected
    # After the window the address may be queued again (wait on the key, not on time).
    deadline = time.monotonic() + 5
    while await conn.exists("stepstone:seen:198.51.100.1"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await queue.enqueue("198.51.100.1", time.time()) is not None


async def test_prefix_and_invalid_input(conn: aioredis.Redis) -> None:
    queue = ProbeQueue(conn, prefix="lab1:")
    assert await queue.enqueue("2001:db8::1", 5.0) is not None
    assert await conn.xlen("lab1:jobs") == 1 and await conn.xlen("stepstone:jobs") == 0
    with pytest.raises(ValueError, match="src is not an IP address"):
        await queue.enqueue("not-an-ip", 5.0)
    with pytest.raises(ValueError, match="ports out of range"):
        await queue.enqueue("2001:db8::2", 5.0, ports=[0])
    assert await conn.xlen("lab1:jobs") == 1


async def test_results_pending_first_then_new_and_ack(conn: aioredis.Redis) -> None:
    queue = ProbeQueue(conn)
    await queue.ensure_group()
    await conn.xadd("stepstone:results", result_for("1-1", "192.0.2.1").fields())
    await conn.xadd("stepstone:results", {"job": "", "src": "x"})  # malformed: skipped and acked
    await conn.xadd("stepstone:results", result_for("1-2", "192.0.2.2").fields())

    # A first reader takes both and dies before acknowledging the first.
    seen = []
    async for entry_id, result in queue.results("an-1", block_ms=50):
        seen.append((entry_id, result))
        if len(seen) == 2:
            break
    assert [r.job for _, r in seen] == ["1-1", "1-2"]
    assert seen[0][1] == result_for("1-1", "192.0.2.1")
    await queue.ack_result(seen[1][0])

    # The same consumer restarted gets its unacknowledged entry first, then new ones.
    await conn.xadd("stepstone:results", result_for("1-3", "192.0.2.3").fields())
    again = []
    async for entry_id, result in queue.results("an-1", block_ms=50):
        again.append(result.job)
        await queue.ack_result(entry_id)
        if len(again) == 2:
            break
    assert again == ["1-1", "1-3"]
    summary = await conn.xpending("stepstone:results", "analyzers")
    assert summary["pending"] == 0


async def test_results_survive_redis_restart(redis_aof: RedisServer) -> None:
    conn = await connect(redis_aof.url)
    try:
        queue = ProbeQueue(conn)
        await queue.ensure_group()
        got: asyncio.Queue[str] = asyncio.Queue()

        async def read() -> None:
            # The reader ends by itself: cancelling it inside a Redis call can be lost on Python
            # 3.11 (asyncio.wait_for in redis-py's send path, CPython gh-86296).
            async for entry_id, result in queue.results("an-1", block_ms=100):
                await got.put(result.job)
                await queue.ack_result(entry_id)
                if result.job == "2-2":
                    return

        reader = asyncio.create_task(read())

        async def until(job: str) -> None:
            # At least once: an acknowledgement lost in the restart brings its entry back first.
            while True:
                getter = asyncio.ensure_future(got.get())
                done, _ = await asyncio.wait({getter, reader}, timeout=20,
                                             return_when=asyncio.FIRST_COMPLETED)
                if reader in done and getter not in done:
                    getter.cancel()
                    raise AssertionError(f"the reader stopped: {reader.exception()!r}")
                if not done:
                    getter.cancel()
                    raise AssertionError(f"{job} never delivered")
                if getter.result() == job:
                    return

        await conn.xadd("stepstone:results", result_for("2-1", "192.0.2.1").fields())
        await until("2-1")
        # The restart can land while the reader acknowledges 2-1: it must neither stop nor lose 2-2.
        await asyncio.to_thread(redis_aof.restart)
        writer = await connect(redis_aof.url)
        await writer.xadd("stepstone:results", result_for("2-2", "192.0.2.2").fields())
        await writer.aclose()
        await until("2-2")
        await asyncio.wait_for(reader, 10)
    finally:
        await conn.aclose()


async def test_a_lost_acknowledgement_brings_its_result_back(redis_aof: RedisServer) -> None:
    """Redis is down just when a result is acknowledged and back before the next read (redis-py
    then reconnects without raising): the result is handed out again, not left pending forever."""
    conn = await connect(redis_aof.url)
    try:
        queue = ProbeQueue(conn)
        await queue.ensure_group()
        await conn.xadd("stepstone:results", result_for("3-1", "192.0.2.1").fields())
        results = queue.results("an-1", block_ms=100)
        entry_id, first = await asyncio.wait_for(anext(results), 10)
        assert first.job == "3-1"
        await asyncio.to_thread(redis_aof.stop)
        await queue.ack_result(entry_id)  # logged, not raised
        await asyncio.to_thread(redis_aof.start)
        await conn.xadd("stepstone:results", result_for("3-2", "192.0.2.2").fields())
        again = [(await asyncio.wait_for(anext(results), 10))[1].job for _ in range(2)]
        assert again == ["3-1", "3-2"]
        await results.aclose()
    finally:
        await conn.aclose()


async def test_connect_errors_are_one_line(tmp_path: object, redis_server: RedisServer) -> None:
    with pytest.raises(QueueConfigError, match="bad Redis URL 'http://x'"):
        await connect("http://x")
    with pytest.raises(QueueConfigError, match="cannot use Redis at unix:///nonexistent"):
        await connect("unix:///nonexistent/redis.sock")
    # AUTH through the URL; the password never appears in messages.
    admin = await connect(redis_server.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    with pytest.raises(QueueConfigError) as err:
        await connect(f"unix://:wrong@{redis_server.socket}")
    assert "wrong" not in str(err.value) and "***" in str(err.value)
    good = await connect(f"unix://:s3cret@{redis_server.socket}")
    assert await ProbeQueue(good).enqueue("192.0.2.9", 1.0) is not None
    await good.aclose()


@pytest.mark.parametrize(
    ("field", "text", "needle"),
    [
        ("ping_min_us", "1e999", "not finite"),  # int(inf) used to escape as OverflowError
        ("syn_rtt_us", "-inf", "not finite"),
        ("ping_var_us2", "nan", "not finite"),
        ("ping_max_us", "-5", "out of range"),
        ("ping_loss", "1.5", "out of range"),
        ("fa_port", "x", "not a number"),
    ],
)
def test_result_numbers_are_validated(field: str, text: str, needle: str) -> None:
    fields = result_for("1-1", "192.0.2.1").fields()
    assert Result.from_fields(fields) == result_for("1-1", "192.0.2.1")
    with pytest.raises(JobError, match=needle):
        Result.from_fields({**fields, field: text})


async def test_result_with_an_infinite_number_is_dropped_not_fatal(conn: aioredis.Redis) -> None:
    queue = ProbeQueue(conn)
    await queue.ensure_group()
    await conn.xadd("stepstone:results", {**result_for("1-1", "192.0.2.1").fields(), "ping_max_us": "1e999"})
    await conn.xadd("stepstone:results", result_for("1-2", "192.0.2.2").fields())
    async for _entry_id, result in queue.results("an-1", block_ms=50):
        assert result.job == "1-2"
        break



@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only redis-server on loopback with a self-signed certificate: (port, certificate)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    with socket.socket() as s:  # a free loopback port for the TLS listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port), "--tls-cert-file",
         str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no", "--save", "", "--dir",
         str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, cert
    finally:
        server.terminate()
        server.wait(10)


async def test_rediss_url_with_tls(tls_redis: tuple[int, Path]) -> None:
    """rediss:// end to end, the certificate trusted through the URL's ssl_ca_certs; an untrusted
    certificate is one clear error."""
    port, cert = tls_redis
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={cert}"
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = await connect(url)
            break
        except QueueConfigError:
            assert time.monotonic() < deadline, "TLS redis-server did not come up (built without TLS?)"
            await asyncio.sleep(0.05)  # polling for the listener, not synchronising on time
    try:
        job = await ProbeQueue(conn).enqueue("192.0.2.9", 1.0)
        assert job is not None and await conn.xlen("stepstone:jobs") == 1
    finally:
        await conn.aclose()
    with pytest.raises(QueueConfigError, match="certificate verify failed"):
        await connect(f"rediss://localhost:{port}/0")  # not trusted without ssl_ca_certs


@pytest.mark.parametrize(("option", "value"), [("dedup_window", math.nan), ("dedup_window", math.inf),
                                              ("dedup_window", -1.0), ("deadline", math.nan),
                                              ("deadline", math.inf), ("deadline", 0.0)])
def test_queue_settings_must_be_finite(option: str, value: float) -> None:
    with pytest.raises(QueueConfigError, match="both finite"):
        ProbeQueue(None, **{option: value})  # type: ignore[arg-type]  # refused before any use


def test_enqueue_cli_bad_dedup_window_is_one_line(redis_server: RedisServer,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from prober.cli import main

    assert main(["enqueue", "--redis", redis_server.url, "--dedup-window", "nan", "192.0.2.7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dedup_window must be >= 0" in err, err


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["enqueue", "192.0.2.8"]])
def test_unwritable_output_is_one_line_not_a_traceback(redis_server: RedisServer, argv: list[str]) -> None:
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC, as on a full disk
        proc = subprocess.run([sys.executable, "-m", "prober.cli", argv[0], "--redis", redis_server.url,
                               *argv[1:]], stdout=full, stderr=subprocess.PIPE, check=False, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.splitlines() == ["stepstone-prober: cannot write the output: No space left on device"]


@pytest.mark.parametrize(("key", "argv"), [("stepstone:jobs", ["status"]), ("stepstone:results", ["status"]),
                                           ("stepstone:jobs", ["enqueue", "192.0.2.5"])])
def test_a_key_of_the_wrong_type_is_one_line(redis_server: RedisServer, key: str, argv: list[str]) -> None:
    import redis

    redis.Redis(unix_socket_path=str(redis_server.socket)).set(key, "not a stream")  # prefix collision
    proc = subprocess.run([sys.executable, "-m", "prober.cli", argv[0], "--redis", redis_server.url,
                           *argv[1:]], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Redis refused a command: WRONGTYPE" in proc.stderr, proc.stderr
