"""Seeded fuzzing of the offline commands through their real entry point (issue 9).

Inputs: the small real corpus in tests/fuzz/offline (a pcap, the same packets as pcapng, records),
mutated with a fixed seed: bytes flipped, inserted, deleted, cut; whole records of garbage put
between good ones; truncation at every record boundary; records lines broken in every way JSON
allows. Each case runs `analyzer.cli.main` in-process (a few run as real processes with their
address space capped). Every case asserts:

- no exception escapes (a traceback), and the exit status is 0 or 2;
- it finishes within CASE_SECONDS, and the whole run's memory stays bounded;
- no valid entry is lost next to a bad one: every handshake of the corpus still comes out of a
  capture with garbage packets between its packets, every handshake before a cut comes out of a
  truncated capture, every good records line still gets its verdict.

FUZZ_SEED (environment) replaces the seed; a failure names the seed and the case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from capfiles import _block, pcapng_epb, pcapng_idb, pcapng_shb
from offline_helpers import cli_limited

from analyzer.capture import read_capture
from analyzer.cli import main

CORPUS = Path(__file__).resolve().parent / "fuzz" / "offline"
PCAP = (CORPUS / "vnc-excerpt.pcap").read_bytes()
PCAPNG = (CORPUS / "vnc-excerpt.pcapng").read_bytes()
RECORDS = (CORPUS / "records.jsonl").read_bytes().splitlines()
DARKNET = "136.159.0.0/16"
SEED = int(os.environ.get("FUZZ_SEED", "20260903"))
CASE_SECONDS = 10.0  # one small input; generous for a loaded 2-core machine
MEMORY_GROWTH_KB = 256 * 1024  # the in-process runs together

Frame = tuple[int, bytes, int]  # timestamp ns, frame, original length


def _frames(data: bytes) -> list[Frame]:
    return [(ts, frame, orig) for _n, ts, _lt, frame, orig in read_capture(_tmp_file(data))]


_TMP: list[Path] = []


def _tmp_file(data: bytes, name: str = "case.cap") -> Path:
    path = _TMP[0] / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module", autouse=True)
def _workdir(tmp_path_factory: pytest.TempPathFactory) -> None:
    _TMP[:] = [tmp_path_factory.mktemp("fuzz")]


def run(argv: list[str], case: str) -> tuple[int, str, str]:
    """`stepstone-analyzer ARGV` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:
            raise AssertionError(f"seed {SEED}, {case}: {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - start
    assert status in (0, 2), f"seed {SEED}, {case}: exit {status}\n{err.getvalue()}"
    assert elapsed < CASE_SECONDS, f"seed {SEED}, {case}: {elapsed:.1f} s"
    assert "Traceback" not in err.getvalue()
    if status == 0 and "--strict" in argv:
        assert err.getvalue() == "", f"seed {SEED}, {case}: --strict, problems reported, exit 0"
    return status, out.getvalue(), err.getvalue()


def records_of(stdout: str) -> list[tuple[str, str, int | None, str | None]]:
    return [(r["src"], r["dst"], r["tp_us"], r["fp"]) for r in map(json.loads, stdout.splitlines())]


Rec = tuple[str, str, int | None, str | None]  # src, dst, tp_us, fp


def replay(path: Path, case: str, *extra: str) -> tuple[int, list[Rec], str]:
    status, out, err = run(["replay", str(path), "--darknet", DARKNET, *extra], case)
    return status, records_of(out), err


EXPECTED = None  # the corpus's own records, computed once


def expected() -> list[tuple[str, str, int | None, str | None]]:
    global EXPECTED
    if EXPECTED is None:
        status, recs, err = replay(_tmp_file(PCAP, "clean.pcap"), "clean corpus")
        assert (status, err, len(recs)) == (0, "", 8)
        EXPECTED = recs
    return EXPECTED


# --- Byte-level mutations ---------------------------------------------------------------------

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 12, 13, 20, 60)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:
            at = min(at, len(buf) - 1)
            buf[at] ^= 1 << rng.randrange(8)
            done.append(f"flip@{at}")
        elif op == 1 and buf:
            at = min(at, len(buf) - 1)
            buf[at] = rng.randrange(256)
            done.append(f"set@{at}")
        elif op == 2:
            value = rng.choice(INTERESTING)
            at -= at % 4
            buf[at : at + 4] = struct.pack(rng.choice("<>") + "I", value)
            done.append(f"word@{at}={value:#x}")
        elif op == 3:
            size = rng.randint(1, 16)
            buf[at:at] = rng.randbytes(size)
            done.append(f"insert@{at}+{size}")
        elif op == 4:
            size = rng.randint(1, 64)
            del buf[at : at + size]
            done.append(f"delete@{at}-{size}")
        else:
            size = rng.randint(1, 200)
            start = rng.randrange(len(buf) + 1)
            buf[at:at] = buf[start : start + size]
            done.append(f"copy{start}@{at}")
    if rng.random() < 0.2:
        cut = rng.randrange(len(buf) + 1)
        del buf[cut:]
        done.append(f"cut@{cut}")
    return bytes(buf), ",".join(done)


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_mutated_captures(kind: str) -> None:
    """Byte mutations anywhere: only exit 0 or 2, no traceback, bounded time."""
    rng = random.Random(f"{SEED}-bytes-{kind}")
    seed_data = PCAP if kind == "pcap" else PCAPNG
    outcomes = {0: 0, 2: 0}
    for i in range(150):
        data, how = mutate(seed_data, rng)
        path = _tmp_file(data, f"mutant.{kind}")
        command = rng.choice(["fingerprint", "replay", "replay-summary", "replay-strict"])
        case = f"{kind} mutant {i} ({how}) {command}"
        if command == "fingerprint":
            status, _out, _err = run(["fingerprint", str(path)], case)
        else:
            extra = {"replay": [], "replay-summary": ["--summary", "--json"], "replay-strict": ["--strict"]}
            status, _out, _err = run(["replay", str(path), "--darknet", DARKNET, *extra[command]], case)
        outcomes[status] += 1
    assert outcomes[0] and outcomes[2], outcomes  # both kinds of outcome were reached


# --- Garbage records between good ones: nothing good is lost -----------------------------------


def _garbage_frame(rng: random.Random, frames: list[Frame]) -> tuple[bytes, int, str]:
    """(frame, original length, description): a frame that is bad or belongs to no corpus flow."""
    kind = rng.randrange(6)
    if kind == 0:
        size = rng.randrange(14)
        return rng.randbytes(size), size, f"runt {size}"
    if kind == 1:
        size = rng.randrange(14, 200)
        return rng.randbytes(size), size, f"random {size}"
    # A corpus packet moved to addresses outside the darknet (no corpus flow), then broken.
    frame = bytearray(rng.choice(frames)[1])
    ip = 18  # 14-byte Ethernet header + one 802.1Q tag
    frame[ip + 12 : ip + 20] = bytes((192, 0, 2, rng.randrange(256), 198, 51, 100, rng.randrange(256)))
    if kind == 2:  # TCP data offset past the packet
        frame[ip + 20 + 12] = 0xF0 | (frame[ip + 20 + 12] & 0x0F)
        what = "data offset 60"
    elif kind == 3:  # cut inside the IP or TCP header
        del frame[rng.randrange(ip, ip + 40) :]
        what = f"cut to {len(frame)}"
    elif kind == 4:  # IHL / version / total length wrong
        frame[ip] = rng.choice((0x40, 0x41, 0x4F, 0x65, 0x00, 0xF5))
        what = f"first IP byte {frame[ip]:#x}"
    else:  # flipped bytes in the headers and options
        for _ in range(rng.randint(1, 6)):
            frame[rng.randrange(ip + 20, len(frame))] = rng.randrange(256)
        what = "header bytes"
    return bytes(frame), len(frame), f"unrelated packet, {what}"


def _garbage_ts(rng: random.Random, near: int) -> tuple[int, str]:
    choice = rng.randrange(4)
    if choice == 0:
        return near, "same time"
    if choice == 1:
        k = rng.randrange(0, 33)
        sign = rng.choice((1, -1))
        return max(0, near + sign * (1 << k) * 1_000_000_000), f"{'+' if sign > 0 else '-'}2^{k} s"
    if choice == 2:
        return rng.randrange(1 << 32) * 1_000_000_000, "random second"
    return near + rng.randrange(1_000_000_000), "within a second"


def _pcap_file(records: list[tuple[int, bytes, int]], linktype: int = 1) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)]
    for ts, frame, orig in records:
        sec, frac = divmod(ts // 1000, 1_000_000)
        out.append(struct.pack("<IIII", sec & 0xFFFFFFFF, frac, len(frame), orig) + frame)
    return b"".join(out)


def _pcapng_file(records: list[tuple[int, bytes, int]], rng: random.Random) -> bytes:
    out = [pcapng_shb(), pcapng_idb(1, tsresol=6)]
    for ts, frame, orig in records:
        if orig < 0:  # a block of another kind (read past), or a packet on no interface
            if rng.random() < 0.5:
                out.append(_block(0x40000BAD, rng.randbytes(rng.randrange(64))))
            else:
                out.append(pcapng_epb(7, ts // 1000, frame))
            continue
        block = bytearray(pcapng_epb(0, ts // 1000, frame))
        struct.pack_into("<I", block, 24, orig)  # original length
        out.append(bytes(block))
    return b"".join(out)


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_garbage_between_good_packets_loses_no_handshake(kind: str) -> None:
    """One or two bad records anywhere, with any timestamp: the 8 handshakes still come out whole."""
    rng = random.Random(f"{SEED}-between-{kind}")
    frames = _frames(PCAP)
    want = expected()
    for i in range(120):
        records: list[tuple[int, bytes, int]] = list(frames)
        how = []
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(records) + 1)
            near = records[min(at, len(records) - 1)][0]
            ts, when = _garbage_ts(rng, near)
            if rng.random() < 0.15:  # a record the reader skips
                frame = rng.choice(frames)[1]
                orig = len(frame) - 1 if kind == "pcap" else -1
                records.insert(at, (ts, frame, orig))
                how.append(f"@{at} skipped record ({when})")
                continue
            frame, orig, what = _garbage_frame(rng, frames)
            records.insert(at, (ts, frame, orig))
            how.append(f"@{at} {what} ({when})")
        data = _pcap_file(records) if kind == "pcap" else _pcapng_file(records, rng)
        path = _tmp_file(data, f"between.{kind}")
        case = f"{kind} case {i}: {'; '.join(how)}"
        status, got, err = replay(path, case)
        assert status == 0, f"seed {SEED}, {case}: exit {status}\n{err}"
        assert sorted(got) == sorted(want), f"seed {SEED}, {case}\n{err}\n{got}"
        if i % 10 == 0:
            status, _out, err = run(["fingerprint", str(path), "--strict"], case)
            assert status == (2 if err else 0)


# --- Truncation: everything before the cut comes out --------------------------------------------


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_truncations_keep_every_handshake_before_the_cut(kind: str) -> None:
    rng = random.Random(f"{SEED}-cut-{kind}")
    data = PCAP if kind == "pcap" else PCAPNG
    # Byte offsets where each packet's record ends (and every block, for pcapng), and the records
    # of each clean prefix.
    ends: list[int] = []
    boundaries = set()
    if kind == "pcap":
        header_end = offset = 24
        while offset < len(data):
            offset += 16 + struct.unpack_from("<I", data, offset + 8)[0]
            ends.append(offset)
    else:
        offset, header_end = 0, 0
        while offset < len(data):
            block_type, length = struct.unpack_from("<II", data, offset)
            if block_type == 6 and not header_end:
                header_end = offset
            offset += length
            boundaries.add(offset)
            if block_type == 6:
                ends.append(offset)
    boundaries.update(ends)
    cuts = sorted({*ends[:-1], *(e + d for e in ends[:-1] for d in (1, 5, 17)),
                   *(rng.randrange(header_end, len(data)) for _ in range(30)),
                   *(rng.randrange(1, header_end) for _ in range(5))})
    prefix_records: dict[int, list[tuple[str, str, int | None, str | None]]] = {}
    for cut in cuts:
        status, got, err = replay(_tmp_file(data[:cut], f"cut.{kind}"), f"{kind} cut at {cut}")
        if cut < header_end:
            assert got == [] and status in (0, 2)
            continue
        whole = sum(1 for e in ends if e <= cut)  # packets wholly before the cut
        if whole not in prefix_records:
            clean = data[: ends[whole - 1]] if whole else data[:header_end]
            _s, prefix_records[whole], _e = replay(_tmp_file(clean, f"prefix.{kind}"), f"prefix {whole}")
        assert status == (0 if cut in boundaries else 2), f"seed {SEED}, {kind} cut at {cut}: {status}\n{err}"
        assert got == prefix_records[whole], f"seed {SEED}, {kind} cut at {cut}\n{err}"


# --- Records lines ---------------------------------------------------------------------------


def _record_mutants() -> list[Callable[[dict[str, object], random.Random], bytes]]:
    def dump(obj: object) -> bytes:
        return json.dumps(obj).encode()

    def swap(r: dict[str, object], rng: random.Random) -> bytes:
        field = rng.choice(list(r))
        value = rng.choice([True, False, "x", [], {}, -1, -0.5, 1e300, 2**64, "", "1.2.3.4", 0,
                            "::1", "a:b:c", 3232235777, None])
        return dump({**r, field: value})

    def drop(r: dict[str, object], rng: random.Random) -> bytes:
        field = rng.choice(list(r))
        return dump({k: v for k, v in r.items() if k != field})

    def raw_number(r: dict[str, object], rng: random.Random) -> bytes:
        field = rng.choice(["t", "tp_us", "ping_min_us", "ping_avg_us", "ping_max_us", "ping_var_us2",
                            "syn_rtt_us"])
        text = rng.choice(["1" * rng.choice((41, 401, 5000, 20000)), "NaN", "Infinity", "-Infinity",
                           "1e400", "-0", "1e-400", "4294967297", "3600000001", "1.0e19", "9" * 39])
        return dump({**r, field: "@@"}).replace(b'"@@"', text.encode())

    def flip(r: dict[str, object], rng: random.Random) -> bytes:
        line = bytearray(dump(r))
        for _ in range(rng.randint(1, 3)):
            line[rng.randrange(len(line))] = rng.randrange(256)
        return bytes(line).replace(b"\n", b" ")

    def cut(r: dict[str, object], rng: random.Random) -> bytes:
        line = dump(r)
        return line[: rng.randrange(len(line))]

    def nest(r: dict[str, object], rng: random.Random) -> bytes:
        depth = rng.choice((10, 1000, 100_000))
        return dump({**r, "fa": "@@"}).replace(b'"@@"', b"[" * depth + b"]" * depth)

    def other(r: dict[str, object], rng: random.Random) -> bytes:
        return rng.choice([b"[1, 2]", b"null", b"42", b'"text"', b"{}", b"\xff\xfe{}", b"{" * 3,
                           b'{"t": 1, "t": 2}', b"a" * (2 << 20), b"\x00" * 100])

    def duplicate_key(r: dict[str, object], rng: random.Random) -> bytes:
        return dump(r)[:-1] + b', "src": true}'

    return [swap, drop, raw_number, flip, cut, nest, other, duplicate_key]


def _no_constant(text: str) -> None:
    raise AssertionError(f"seed {SEED}: {text} in the output of judge (not JSON)")


def test_mutated_records_lose_no_good_line() -> None:
    rng = random.Random(f"{SEED}-records")
    corpus = [json.loads(line) for line in RECORDS]
    mutants = _record_mutants()
    for i in range(150):
        lines: list[bytes] = []
        good: dict[str, int] = {}
        how = []
        for j in range(rng.randint(2, 12)):
            template = dict(rng.choice(corpus))
            if rng.random() < 0.5:
                src = f"192.0.2.{len(good) + 1}"  # unique: each good source has exactly one record
                template["src"] = src
                good[src] = 1
                lines.append(json.dumps(template).encode())
            else:
                template["src"] = f"198.51.100.{j}"
                mutant = rng.choice(mutants)
                lines.append(mutant(template, rng))
                how.append(f"line {j + 1}: {mutant.__name__}")
        path = _tmp_file(b"\n".join(lines) + b"\n", "records.jsonl")
        case = f"records case {i}: {'; '.join(how)}"
        summary = rng.random() < 0.2
        status, out, err = run(["judge", str(path), *(["--summary", "--json"] if summary else [])], case)
        if summary:
            table = json.loads(out)
            assert table["sources"] >= len(good), f"seed {SEED}, {case}\n{err}"
            continue
        verdicts = [json.loads(line, parse_constant=_no_constant) for line in out.splitlines()]
        got = {v["src"]: v["records"] for v in verdicts if v["src"].startswith("192.0.2.")}
        assert got == good, f"seed {SEED}, {case}\n{err}"
        assert status == (2 if err else 0), f"seed {SEED}, {case}"


# --- As real processes, address space capped ---------------------------------------------------


def test_real_processes_with_capped_memory() -> None:
    """A few mutants through a pipe into a real `stepstone-analyzer` in 384 MiB of address space."""
    rng = random.Random(f"{SEED}-process")
    cases: list[tuple[list[str], bytes]] = []
    for seed_data in (PCAP, PCAPNG):
        data, _how = mutate(seed_data, rng)
        cases.append((["fingerprint", "-"], data))
        cases.append((["replay", "-", "--darknet", DARKNET], data))
    mutants = _record_mutants()
    lines = [m(json.loads(rng.choice(RECORDS)), rng) for m in mutants] + RECORDS
    cases.append((["judge", "-"], b"\n".join(lines) + b"\n"))
    for argv, data in cases:
        start = time.perf_counter()
        proc = cli_limited(argv, [data], address_space=384 << 20, timeout=60)
        assert proc.returncode in (0, 2), (argv, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr
        assert time.perf_counter() - start < 30


def test_memory_of_the_in_process_runs_stayed_bounded() -> None:
    """Runs last in the module (pytest keeps file order): the high-water mark of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert usage - _START_RSS < MEMORY_GROWTH_KB, f"grew {(usage - _START_RSS) // 1024} MB"


_START_RSS = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
