"""Seeded, bounded fuzzing of every Redis stream the live services read: the analyzer (handshakes,
results, dead, and verdicts for its Zeek) and a prober worker (jobs) run their real code in this
process on a real redis-server, while random byte-level mutations of valid entries (and the small
corpus in tests/fuzz/streams/) are written to each stream, each one right in front of a valid entry.

It asserts: no traceback is logged, both services are still running and stop cleanly, and every
valid entry was done (a verdict for a handshake, a Zeek event for a verdict, a result for a job, a
stored outcome for a result or a dead letter). Reproducible: STEPSTONE_FUZZ_SEED picks the seed
(default fixed), STEPSTONE_FUZZ_ROUNDS the number of mutated entries per stream.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from service_harness import Harness, P, handshake, lines, result, until
from test_hostile_streams import analyzer, fake_probe, worker
from test_service_zeek import fake_zeek

from analyzer.record import Record
from analyzer.rules import judge
from analyzer.verdicts import entry_fields
from prober.job import Job, Result
from prober.status import gather

SEED = int(os.environ.get("STEPSTONE_FUZZ_SEED", "20260901"))
ROUNDS = int(os.environ.get("STEPSTONE_FUZZ_ROUNDS", "100"))  # mutated entries per stream
CORPUS = Path(__file__).parent / "fuzz" / "streams" / "corpus.json"
STREAMS = ("handshakes", "jobs", "results", "dead", "verdicts")
Raw = dict[bytes, bytes]

MAX_BYTES = 70_000  # a mutated value: past the 64 KiB a field may have, not megabytes
NASTY = [b"", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"nan", b"inf", b"-1", b"1e308", b"-0",
         b"9" * 20, b"9" * 400, b"9" * 5000, b"1" + b"0" * 12, b"3e11", b"\xf0\x9f\x92\xa9", b"[" * 2000,
         b"1_000", b" 1", b"\xd9\xa3", b"\xb2"]


def corpus() -> dict[str, list[Raw]]:
    """The corpus: field names and values as JSON strings whose code points 0-255 are the bytes."""
    data = json.loads(CORPUS.read_text())
    return {stream: [{k.encode("latin-1"): v.encode("latin-1") for k, v in entry.items()}
                     for entry in entries] for stream, entries in data.items()}


def mutate(rng: random.Random, entry: Raw) -> Raw:
    """1-3 byte-level mutations of an entry (values, names, fields added or removed)."""
    out = dict(entry)
    for _ in range(rng.randint(1, 3)):
        if not out:
            out[rng.randbytes(rng.randint(1, 8))] = rng.randbytes(rng.randint(0, 16))
            continue
        name = rng.choice(sorted(out))
        value = out[name]
        kind = rng.randrange(9)
        if kind == 0 and value:  # flip one bit
            i = rng.randrange(len(value))
            out[name] = value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1:]
        elif kind == 1:  # insert random bytes
            i = rng.randint(0, len(value))
            out[name] = value[:i] + rng.randbytes(rng.randint(1, 8)) + value[i:]
        elif kind == 2:  # random bytes instead
            out[name] = rng.randbytes(rng.randint(0, 32))
        elif kind == 3:  # cut short
            out[name] = value[: rng.randint(0, len(value))]
        elif kind == 4:  # drop the field
            del out[name]
        elif kind == 5:  # a field of random bytes
            out[rng.randbytes(rng.randint(1, 8))] = rng.randbytes(rng.randint(0, 32))
        elif kind == 6:  # a value known to hurt parsers
            out[name] = rng.choice(NASTY)
        elif kind == 7:  # the name spoiled
            del out[name]
            out[name + rng.randbytes(1)] = value
        else:  # much longer (up to past the 64 KiB a field may have)
            out[name] = value * rng.choice((2, 100, 5000))
    # XADD needs a field; and keep the memory of the run bounded.
    return {k[:MAX_BYTES]: v[:MAX_BYTES] for k, v in out.items()} or {b"x": b""}


def encoded(fields: dict[str, str]) -> Raw:
    return {k.encode(): v.encode() for k, v in fields.items()}


async def _none_pending(h: Harness) -> bool:
    return int((await h.r.xpending(P + "jobs", "probers"))["pending"]) == 0


async def test_random_entries_on_every_stream_stop_nothing_and_lose_no_valid_entry(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    t = time.time()
    record = Record(t=t, src="198.18.200.1", dst="198.19.0.1", tp_us=20_000)
    verdict = judge([record], window=86400.0).to_dict()
    seeds: dict[str, Raw] = {
        "handshakes": encoded(handshake("198.18.200.1", "198.19.0.1", t=t).to_fields()),
        "jobs": encoded(Job(id="", src="198.18.200.1", t=t, deadline=t + 600, enqueued=t).fields()),
        "results": encoded(result("7-1", "198.18.200.1", t, ping_max=10_000, fa="unix:Linux:3.x").fields()),
        "dead": encoded({"job": "7-1", "src": "198.18.200.1", "reason": "refused: test"}),
        "verdicts": encoded(entry_fields("7-1", verdict, record.to_dict())),
    }
    bad: list[tuple[str, Raw]] = [(s, e) for s, entries in corpus().items() for e in entries if e]
    bad += [(s, mutate(rng, seeds[s])) for _ in range(ROUNDS) for s in STREAMS]
    rng.shuffle(bad)

    want_verdicts: set[str] = set()  # sources of valid handshakes
    want_zeek: set[str] = set()  # sources of valid verdicts entries
    want_results: set[str] = set()  # valid job ids
    want_outcomes: set[str] = set()  # jobs of valid results and dead letters
    probed: set[str] = set()

    async def probe(job: Job) -> Result:
        probed.add(job.id)
        return await fake_probe(job)

    async with fake_zeek() as zeek, analyzer(harness, zeek_url=zeek.url, claim_after=1.0) as (_, service), \
            worker(harness.url, tmp_path, probe=probe) as prober:
        for n, (stream, entry) in enumerate(bad):
            await harness.r.xadd(P + stream, entry)  # type: ignore[arg-type]
            # Right behind it, a valid entry of the same stream (sources and jobs unique to it).
            src = f"198.18.{100 + n // 250}.{n % 250 + 1}"
            if stream == "handshakes":
                await harness.send(handshake(src, "198.19.0.1", t=t + n / 1000))
                want_verdicts.add(src)
            elif stream == "jobs":
                job = Job(id="", src=src, t=time.time(), deadline=time.time() + 600, enqueued=time.time())
                want_results.add(str(await harness.r.xadd(P + "jobs", job.fields())))  # type: ignore[arg-type]
            elif stream == "results":
                job = f"8-{n}"
                await harness.answer(result(job, src, t, ping_max=10_000, fa=None))
                want_outcomes.add(job)
            elif stream == "dead":
                job = f"9-{n}"
                await harness.r.xadd(P + "dead", {"job": job, "src": src, "reason": "refused: test"})
                want_outcomes.add(job)
            else:
                r = Record(t=t, src=src, dst="198.19.0.1", tp_us=20_000)
                fields = entry_fields(f"6-{n}", judge([r], window=86400.0).to_dict(), r.to_dict())
                await harness.r.xadd(P + "verdicts", fields)  # type: ignore[arg-type]
                want_zeek.add(src)

        published: set[str] = set()
        missing: dict[str, set[str]] = {}

        async def all_done() -> bool:
            while not zeek.published.empty():
                published.add(str(zeek.published.get_nowait().event.args[0][0]))  # type: ignore[union-attr]
            verdicts = {x["src"] for x in lines(harness.log_dir / "stepstone.log")}
            async with harness.r.pipeline(transaction=False) as pipe:
                for job in sorted(want_outcomes):
                    pipe.exists(P + f"outcome:{job}")
                outcomes = await pipe.execute()
            stored = {j for j, ok in zip(sorted(want_outcomes), outcomes, strict=True) if ok}
            missing.update(verdicts=want_verdicts - verdicts, zeek=want_zeek - published,
                           results=want_results - probed, outcomes=want_outcomes - stored)
            return not any(missing.values())

        try:
            await until(all_done, within=90, what="every valid entry done")
        except AssertionError:
            raise AssertionError(f"valid entries not done: {missing}") from None
        assert not service.done() and not prober.done()
        # Every probed job's result was written with its acknowledgement (one MULTI): none is left.
        await until(lambda: _none_pending(harness), what="every job acknowledged")
        status = await gather(harness.r, P)  # `stepstone-prober status` over what is left
        assert status["probers"] is not None

    failures = [r.getMessage() for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
    assert not failures, failures[:5]
    assert time.monotonic() - started < 120  # bounded: the whole run, not a hang
