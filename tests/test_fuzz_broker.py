"""Seeded, bounded fuzzing of the Broker frames a Zeek (or anything at its address) can send.

Inputs: the frames a real Zeek 8.0.10 sent (tests/data/zeek-ws) and the corpus in
tests/fuzz/broker (handshake events as the script sends them, and regressions), mutated byte by
byte and structurally (deep nesting, huge numbers, wrong types, odd strings at any position of the
JSON tree). What must hold for every input:
- `parse_frame` and `handshake_from_event` raise `BrokerError` or `HandshakeError`, nothing else;
- each frame is decided within PER_FRAME_S, and memory stays bounded;
- through the real client, against a real WebSocket server: after any of these frames the valid
  handshake right behind it arrives, on the same connection, and no frame is a bug's log line.

STEPSTONE_FUZZ_SEED and STEPSTONE_FUZZ_ROUNDS change the seed and the number of inputs (a
failure names the seed and the input's number, which reproduce it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import re
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from analyzer import broker
from analyzer.broker import BrokerError, DataMessage, Port
from analyzer.handshake import Handshake, HandshakeError
from analyzer.zeek import HANDSHAKE_EVENT, MAX_FRAME_BYTES, ZeekClient, handshake_from_event
from tests.conftest import DATA
from tests.test_zeek_client import TIMEOUT, FakeZeek, case, handshake_info, hs_frame

SEED = int(os.environ.get("STEPSTONE_FUZZ_SEED", "20251203"))
ROUNDS = int(os.environ.get("STEPSTONE_FUZZ_ROUNDS", "10000"))
CLIENT_ROUNDS = max(1, ROUNDS // 20)
PER_FRAME_S = 2.0  # generous: the machine is shared; a quadratic path takes minutes, not seconds
MAX_RSS_GROWTH = 256 * 2**20
CORPUS = Path(__file__).resolve().parent / "fuzz" / "broker"


def seed_frames() -> list[bytes]:
    recorded = (DATA / "zeek-ws" / "received.bin").read_bytes().splitlines()
    with_metadata = (DATA / "zeek-ws" / "received-with-metadata.jsonl").read_bytes().splitlines()
    corpus = [path.read_bytes() for path in sorted(CORPUS.glob("*.frame"))]
    assert len(corpus) >= 8, f"the corpus in {CORPUS} is missing"
    return recorded + with_metadata + corpus


def decide(frame: bytes) -> Handshake | None:
    """What the client does with a frame, minus the logging: a Handshake, or None for other
    messages; BrokerError/HandshakeError for a rejection."""
    message = broker.parse_frame(frame)
    event = message.event if isinstance(message, DataMessage) else None
    if event is not None and event.name == HANDSHAKE_EVENT:
        return handshake_from_event(event)
    return None


# --- mutations ------------------------------------------------------------------------------------

TOKENS = [b"[", b"]", b"{", b"}", b'"', b"\\", b",", b":", b"-", b"0", b"1e999", b"-1e-999", b"NaN",
          b"Infinity", b"true", b"null", b'"\\ud800"', b"\\u0000", b"\xff", b"\xc3", b"\x00", b"\n",
          b'{"@data-type":"vector","data":[', b'"@data-type"', b'"data"', b"9" * 25, b"9" * 5000]
KINDS = ["none", "boolean", "count", "integer", "real", "timestamp", "timespan", "string",
         "enum-value", "address", "subnet", "port", "vector", "set", "table", "bogus"]


def _odd_scalar(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 2**64, -(2**63) - 1, 1.5, -0.0, 1e308, 5e-324, "", "x",
        "\ud800", "\u00e9\u00fc", "a\x00b\nc", "9" * rng.choice([20, 21, 400, 5000]),
        "1" * rng.choice([19, 20, 21]) + "s", "fe80::1%eth0", "65536/tcp", "\u00b2/tcp", "a b",
        "9999-12-31T23:59:59.999-23:59", "0000-01-01T00:00:00", "x" * rng.choice([100, 70_000]),
        "AAAA\u00fc", "====",
    ])


def _huge_number(rng: random.Random) -> str:
    digits = rng.choice([19, 20, 21, 22, 300, 400, 4300, 5000])
    sign = rng.choice(["", "-"])
    tail = rng.choice(["", ".5", "e400", "e-400", "E+99999"])
    return sign + "9" * digits + tail


LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


class Raw(str):
    """JSON text to splice in as it is (deep nesting that json.dumps would recurse on)."""


def _nest(rng: random.Random, inner: Any) -> Raw:
    depth = rng.choice([30, 31, 32, 33, 63, 64, 65, 400, 5000])
    opening, closing = rng.choice([("[", "]"), ('{"@data-type":"vector","data":[', "]}"), ('{"k":', "}")])
    return Raw(opening * depth + json.dumps(inner) + closing * depth)


def _wrong(rng: random.Random, node: Any) -> Any:
    """A replacement for one node of the JSON tree."""
    choice = rng.randrange(7)
    if choice == 0:
        return _nest(rng, node if rng.random() < 0.5 else _odd_scalar(rng))
    if choice == 1:
        return _odd_scalar(rng)
    if choice == 2:
        return {"@data-type": rng.choice(KINDS), "data": _odd_scalar(rng)}
    if choice == 3 and isinstance(node, dict) and node:
        node = dict(node)
        key = rng.choice(sorted(node))
        if rng.random() < 0.5:
            del node[key]
        else:
            node[key] = rng.choice(KINDS) if key == "@data-type" else _odd_scalar(rng)
        return node
    if choice == 4 and isinstance(node, list) and node:
        node = list(node)
        op = rng.randrange(3)
        if op == 0:
            node.pop(rng.randrange(len(node)))
        elif op == 1:
            node.insert(rng.randrange(len(node) + 1), rng.choice(node))
        else:
            rng.shuffle(node)
        return node
    if choice == 5:  # many values
        return [rng.choice([0, None, [], {}, ""])] * rng.choice([2, 300, 50_000, 120_000])
    return rng.choice([[], {}, [node], {"key": node, "value": node}])


def _random_path(rng: random.Random, tree: Any) -> tuple[Any, ...]:
    """A node picked by a random walk from the root: cheap whatever the tree's size."""
    path: tuple[Any, ...] = ()
    node = tree
    for _ in range(rng.randrange(14)):
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        if not keys:
            break
        key = rng.choice(keys)
        path, node = (*path, key), node[key]
    return path


def _replace(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return tree


def structural(rng: random.Random, frame: bytes) -> bytes:
    # surrogateescape keeps the raw bytes of Zeek's unescaped binary strings through the round trip.
    text = frame.decode("utf-8", "surrogateescape")
    try:
        tree = json.loads(text, strict=False)
    except ValueError:
        return byte_level(rng, frame)
    raws: list[Raw] = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        path = _random_path(rng, tree)
        node = tree
        for key in path:
            node = node[key]
        new = _wrong(rng, node)
        if isinstance(new, Raw):
            raws.append(new)
            new = f"\x00raw{len(raws) - 1}\x00"
        tree = _replace(tree, path, new)
    try:
        out = json.dumps(tree, ensure_ascii=False, separators=(",", ":"), check_circular=False)
    except RecursionError:  # a seed deeper than json.dumps goes
        return byte_level(rng, frame)
    for n, raw in enumerate(raws):
        out = out.replace(json.dumps(f"\x00raw{n}\x00", ensure_ascii=False), raw)
    if rng.random() < 0.3:  # a number no json.dumps writes
        out = out.replace("1", _huge_number(rng), 1)
    # A lone surrogate becomes a JSON escape ("\\ud800"); \udc80-\udcff are the seed's raw bytes.
    out = LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)
    return out.encode("utf-8", "surrogateescape")


def byte_level(rng: random.Random, frame: bytes, seeds: list[bytes] | None = None) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        op = rng.randrange(7)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at:at] = rng.choice(TOKENS) * rng.choice([1, 1, 2, 100])
        elif op == 2:
            del data[at : at + rng.choice([1, 2, 8, 64])]
        elif op == 3:
            data[at:at] = data[at : at + rng.choice([1, 8, 64, 512])]
        elif op == 4:
            del data[at:]
        elif op == 5 and seeds:
            other = rng.choice(seeds)
            start = rng.randrange(len(other))
            data[at:at] = other[start : start + rng.choice([4, 32, 256])]
        else:
            digits = rng.choice([b"0", b"1", b"9"])
            data[at:at] = digits * rng.choice([20, 21, 400, 5000])
    return bytes(data)


def mutations(seed: int, rounds: int) -> Iterator[tuple[int, bytes]]:
    """`rounds` mutants, each within the client's frame limit (larger ones never reach the codec)."""
    rng = random.Random(seed)
    seeds = seed_frames()
    for i in range(rounds):
        frame = rng.choice(seeds)
        mutant = structural(rng, frame) if rng.random() < 0.5 else byte_level(rng, frame, seeds)
        if rng.random() < 0.002:  # now and then as large as the client lets in
            mutant = mutant[:-10] + b" " * (MAX_FRAME_BYTES - len(mutant)) + mutant[-10:]
        yield i, mutant[:MAX_FRAME_BYTES]


# --- the codec ------------------------------------------------------------------------------------


def test_mutated_frames_raise_only_the_documented_errors_in_bounded_time() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes: dict[str, int] = {"handshake": 0, "other": 0, "rejected": 0}
    reasons: set[str] = set()
    slowest = 0.0
    for i, frame in mutations(SEED, ROUNDS):
        started = time.perf_counter()
        try:
            result = decide(frame)
        except (BrokerError, HandshakeError) as exc:
            outcomes["rejected"] += 1
            reasons.add(str(exc).split(":")[0][:40])
            assert len(str(exc)) < 600, f"seed {SEED} input {i}: message of {len(str(exc))} chars"
        except Exception as exc:  # the one thing this test is about
            pytest.fail(f"seed {SEED} input {i}: {type(exc).__name__}: {broker.quote(str(exc), 200)} "
                        f"from frame {broker.quote(frame, 200)}")
        else:
            outcomes["handshake" if result is not None else "other"] += 1
        elapsed = time.perf_counter() - started
        slowest = max(slowest, elapsed)
        assert elapsed < PER_FRAME_S, f"seed {SEED} input {i}: {elapsed:.2f} s for {len(frame)} bytes"
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert rss_growth < MAX_RSS_GROWTH, f"max RSS grew by {rss_growth / 2**20:.0f} MiB"
    # Not a degenerate run: mutants were accepted and rejected, for many different reasons.
    assert outcomes["handshake"] >= ROUNDS // 500 and outcomes["rejected"] > ROUNDS // 2, outcomes
    assert len(reasons) >= 20, sorted(reasons)


def test_the_regression_corpus_is_rejected_and_the_handshakes_in_it_accepted() -> None:
    for path in sorted(CORPUS.glob("*.frame")):
        frame = path.read_bytes()
        if path.name.startswith("regress-"):
            with pytest.raises((BrokerError, HandshakeError)):
                decide(frame)
        else:
            assert isinstance(decide(frame), Handshake), path.name


# --- the client -----------------------------------------------------------------------------------


def _marker(i: int) -> bytes:
    """A valid handshake no mutant can pass for: its own source and port."""
    info = list(handshake_info(case("direct").segments))
    info[3] = ipaddress.ip_address("192.0.2.99")
    info[4] = Port(20000 + i, "tcp")
    return hs_frame(tuple(info))


async def test_after_any_mutated_frame_the_next_valid_one_arrives_on_the_same_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frames = [(i, f) for i, f in mutations(SEED + 1, CLIENT_ROUNDS) if len(f) <= MAX_FRAME_BYTES]
    zeek = FakeZeek()
    zeek.script = [frame for n, (_, mutant) in enumerate(frames) for frame in (mutant, _marker(n))]
    await zeek.start()
    client = ZeekClient(zeek.url, backoff_initial=0.02, backoff_max=0.1)
    try:
        expected = [20000 + n for n in range(len(frames))]
        seen: list[int] = []
        stream = client.handshakes()
        async with asyncio.timeout(TIMEOUT * 3):
            while len(seen) < len(expected):
                h = await anext(stream)
                if h.src == "192.0.2.99":
                    seen.append(h.sport)
        assert seen == expected  # every marker, in order, none lost
        assert zeek.connections == 1 and client.stats.connects == 1
        bugs = [r.getMessage() for r in caplog.records
                if r.levelname == "ERROR" and r.name == "stepstone.zeek"]
        assert not bugs, f"seed {SEED + 1}: {bugs[:3]}"
    finally:
        await client.close()
        await zeek.stop()


def test_seeds_reproduce() -> None:
    first: Callable[[], list[bytes]] = lambda: [f for _, f in mutations(SEED, 50)]  # noqa: E731
    assert first() == first()
