"""Bad input: one clear line per problem on stderr naming file and position, no traceback, and the
good input around the bad still processed. Exit 2 for input that cannot be read on (and for bad
records lines); a malformed packet in a readable capture is reported with exit 0, or 2 with --strict."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from capfiles import Conn, ethernet, ip_packet, pcap_bytes, pcapng_epb, pcapng_idb, pcapng_shb
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from analyzer.capture import CaptureError, read_capture
from analyzer.cli import main
from analyzer.offline import MAX_REPORTED
from analyzer.packet import PacketError, ip_from_frame, tcp_header

DARK = "198.18.0.0/15"
S = 1_000_000_000


def cli(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in a child process: what a user sees, tracebacks included if any."""
    proc = subprocess.run([sys.executable, "-m", "analyzer.cli", *argv], capture_output=True, input=stdin,
                          check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str, lines: int = 1,
                         status: int = 2) -> None:
    assert proc.returncode == status, proc
    assert "Traceback" not in proc.stderr
    err = proc.stderr.splitlines()
    assert len(err) == lines, err
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def handshake(n: int, t0: int) -> list[tuple[int, bytes]]:
    c = Conn(f"203.0.113.{n}", "198.18.0.1", 40000 + n, 23)
    return [(t0, ethernet(c.syn())), (t0 + 1_000, ethernet(c.synack())), (t0 + 5_001_000, ethernet(c.ack()))]


GOOD = handshake(1, 1 * S) + handshake(2, 2 * S)  # 6 packets, two answered handshakes


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"GIF89a not a capture at all", "byte offset 0: not a pcap or pcapng file"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "pcap file header truncated"),
        (b"", "empty"),
        (pcapng_shb()[:10], "pcapng block header truncated"),
    ],
)
def test_unreadable_files(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(data)
    for command in (["fingerprint", str(path)], ["replay", str(path), "--darknet", DARK]):
        proc = cli(*command)
        assert_clean_failure(proc, str(path), needle)
        assert proc.stdout == ""


def test_missing_file_and_bad_options(tmp_path: Path) -> None:
    missing = cli("replay", str(tmp_path / "nope.pcap"), "--darknet", DARK)
    assert_clean_failure(missing, "nope.pcap", "cannot open")
    assert_clean_failure(cli("judge", str(tmp_path / "nope.jsonl")), "nope.jsonl", "cannot open")
    path = tmp_path / "ok.pcap"
    path.write_bytes(pcap_bytes(GOOD))
    assert_clean_failure(cli("fingerprint", str(path), "--p0f-db", str(tmp_path / "none.fp")), "none.fp")
    garbage = tmp_path / "garbage.fp"
    garbage.write_bytes(b"[tcp:request]\nlabel = s:unix:Linux:x\nsig = 1:2:3\n")
    assert_clean_failure(cli("fingerprint", str(path), "--p0f-db", str(garbage)), "garbage.fp", "line 3")
    # argparse's own errors: usage plus one line, exit 2, no traceback.
    proc = cli("replay", str(path), "--darknet", "300.1.2.0/24")
    assert proc.returncode == 2 and "not an IPv4 or IPv6 network" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("judge", str(path), "--window", "-5")
    assert proc.returncode == 2 and "non-negative" in proc.stderr


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        (8, "packet 7: record header truncated (8 of 16 bytes)"),
        (16 + 20, "packet 7: packet data truncated (20 of 74 bytes)"),
    ],
)
def test_truncated_last_record_keeps_the_good_ones(tmp_path: Path, cut: int, needle: str) -> None:
    data = pcap_bytes(GOOD) + pcap_bytes(handshake(3, 3 * S))[24:][: cut]
    path = tmp_path / "cut.pcap"
    path.write_bytes(data)
    proc = cli("replay", str(path), "--darknet", DARK)
    assert_clean_failure(proc, str(path), needle, f"byte offset {len(pcap_bytes(GOOD))}")
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["203.0.113.1", "203.0.113.2"]


def test_absurd_caplen(tmp_path: Path) -> None:
    data = bytearray(pcap_bytes(GOOD))
    offset = len(pcap_bytes(GOOD[:3]))  # the 4th record header
    struct.pack_into("<I", data, offset + 8, 0x7FFFFFFF)
    path = tmp_path / "absurd.pcap"
    path.write_bytes(bytes(data))
    proc = cli("replay", str(path), "--darknet", DARK)
    assert_clean_failure(proc, f"byte offset {offset}: packet 4: absurd captured length 2147483647")
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["203.0.113.1"]


def test_caplen_above_original_length_is_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    data = bytearray(pcap_bytes(GOOD))
    offset = len(pcap_bytes(GOOD[:1]))  # the 2nd record: the first SYN+ACK
    struct.pack_into("<I", data, offset + 12, 10)  # original length 10 < captured 74
    path = tmp_path / "len.pcap"
    path.write_bytes(bytes(data))
    proc = cli("replay", str(path), "--darknet", DARK, "--summary", "--json")
    assert_clean_failure(proc, "packet 2: captured length 74 exceeds original length 10", status=0)
    table = json.loads(proc.stdout)
    assert table["answered"] == 1 and table["packets"] == 5 and table["no_synack"] == 1
    assert table["packet_errors"] == 1
    proc = cli("replay", str(path), "--darknet", DARK, "--summary", "--json", "--strict")
    assert_clean_failure(proc, "packet 2: captured length 74 exceeds original length 10", status=2)


@pytest.mark.parametrize(
    ("mangle", "needle"),
    [
        (lambda b: b[:-4] + b"\x00\x00\x00\x00", "block lengths disagree"),
        (lambda b: b[:4] + struct.pack("<I", 13) + b[8:], "block length 13 is impossible"),
        (lambda b: b[:4] + struct.pack("<I", 4096) + b[8:], "block truncated"),
    ],
)
def test_corrupt_pcapng_block_after_good_ones(tmp_path: Path, mangle: object, needle: str) -> None:
    head = pcapng_shb() + pcapng_idb(1)
    good = b"".join(pcapng_epb(0, ts // 1000, frame) for ts, frame in GOOD[:3])
    bad = mangle(pcapng_epb(0, 4 * S // 1000, GOOD[3][1]))  # type: ignore[operator]
    path = tmp_path / "bad.pcapng"
    path.write_bytes(head + good + bad)
    proc = cli("replay", str(path), "--darknet", DARK)
    assert_clean_failure(proc, f"byte offset {len(head + good)}", needle)
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["203.0.113.1"]


def test_packet_on_an_undeclared_pcapng_interface(tmp_path: Path) -> None:
    head = pcapng_shb() + pcapng_idb(1)
    blocks = [pcapng_epb(3 if i == 0 else 0, ts // 1000, frame) for i, (ts, frame) in enumerate(GOOD)]
    path = tmp_path / "iface.pcapng"
    path.write_bytes(head + b"".join(blocks))
    proc = cli("replay", str(path), "--darknet", DARK, "--summary", "--json")
    assert_clean_failure(proc, "packet 1: unknown interface 3; skipped", status=0)
    assert json.loads(proc.stdout)["answered"] == 1


def test_non_tcp_and_fragments_are_counted_not_errors(tmp_path: Path) -> None:
    frames = [
        (S // 2, bytes(Ether() / ARP())),
        (S // 2, ethernet(bytes(IP(src="203.0.113.9", dst="198.18.0.1") / UDP()))),
        (S // 2, ethernet(bytes(IP(src="203.0.113.9", dst="198.18.0.1", flags="MF") / TCP(flags="S")))),
        (S // 2, ethernet(bytes(IP(src="203.0.113.9", dst="198.18.0.1", frag=10, proto=6) / (b"x" * 8)))),
        *GOOD,
    ]
    path = tmp_path / "mixed.pcap"
    path.write_bytes(pcap_bytes(frames))
    proc = cli("replay", str(path), "--darknet", DARK, "--summary", "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    table = json.loads(proc.stdout)
    assert (table["not_ip"], table["not_tcp"], table["fragments"], table["answered"]) == (1, 1, 2, 2)
    proc = cli("fingerprint", str(path))
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 4  # 2 SYNs, 2 SYN+ACKs


def test_malformed_headers_are_reported_by_packet_number(tmp_path: Path) -> None:
    broken = bytearray(Conn("203.0.113.5", "198.18.0.1").syn())
    broken[0] = 0x43  # IHL 12 bytes
    frames = [*GOOD[:3], (3 * S, ethernet(bytes(broken))), (3 * S, ethernet(bytes(broken[:30]))), *GOOD[3:]]
    path = tmp_path / "broken.pcap"
    path.write_bytes(pcap_bytes(frames))
    for strict, status in (((), 0), (("--strict",), 2)):
        proc = cli("replay", str(path), "--darknet", DARK, *strict)
        assert_clean_failure(proc, "packet 4: IPv4 header length 12 is below 20", "packet 5: ", lines=2,
                             status=status)
        assert len(proc.stdout.splitlines()) == 2


def test_malformed_tcp_options(tmp_path: Path) -> None:
    """Option length 0 and an option running past the header: the fingerprinter refuses them."""
    zero_length = bytearray(ip_packet("203.0.113.6", "198.18.0.1", 1, 2, "S", options=[("NOP", None)] * 4))
    zero_length[40:42] = b"\x02\x00"  # MSS option with length 0
    past_end = bytearray(ip_packet("203.0.113.7", "198.18.0.1", 1, 2, "S", options=[("NOP", None)] * 4))
    past_end[42:44] = b"\x02\x08"  # option claims 8 bytes, 2 remain
    frames = [(S, ethernet(bytes(zero_length))), (S, ethernet(bytes(past_end))), *GOOD]
    path = tmp_path / "opts.pcap"
    path.write_bytes(pcap_bytes(frames))
    for strict, status in (((), 0), (("--strict",), 2)):
        proc = cli("fingerprint", str(path), *strict)
        assert_clean_failure(proc, f"{path}: packet 1: ", f"{path}: packet 2: ", lines=2, status=status)
        assert len(proc.stdout.splitlines()) == 4  # the good SYNs and SYN+ACKs are still printed


def test_bad_record_lines(tmp_path: Path) -> None:
    good = {"t": 5.0, "src": "192.0.2.1", "dst": "198.18.0.1", "tp_us": 10, "ping_min_us": 1,
            "ping_avg_us": 2, "ping_max_us": 3, "ping_var_us2": 0.5, "syn_rtt_us": 2, "fp": None, "fa": None}
    lines = [
        json.dumps(good).encode(),  # 1
        b"{not json",  # 2
        b"[1, 2]",  # 3
        json.dumps({**good, "src": "192.0.2.999"}).encode(),  # 4
        json.dumps({**good, "tp_us": -1}).encode(),  # 5
        json.dumps({**good, "fp": "Linux"}).encode(),  # 6
        b"",  # 7: blank lines are fine
        b'{"t": 1, "src": "\xff\xfe"}',  # 8
        json.dumps({k: v for k, v in good.items() if k != "t"}).encode(),  # 9
        b'{"t": 1e999, "src": "192.0.2.2", "dst": "198.18.0.1"}',  # 10: JSON accepts it, the record does not
        json.dumps({**good, "src": "192.0.2.3", "tp_us": 100}).encode(),  # 11
    ]
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = cli("judge", str(path))
    assert_clean_failure(
        proc,
        f"{path}: line 2: not JSON", f"{path}: line 3: a record must be a JSON object",
        f"{path}: line 4: field 'src'", f"{path}: line 5: field 'tp_us'", f"{path}: line 6: field 'fp'",
        f"{path}: line 8: not UTF-8", f"{path}: line 9: field 't' is missing", f"{path}: line 10: field 't'",
        lines=8,
    )
    verdicts = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [v["src"] for v in verdicts] == ["192.0.2.1", "192.0.2.3"]
    assert verdicts[1]["cond_timing"] is True


def test_many_problems_are_capped(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_text("junk\n" * (MAX_REPORTED + 7))
    assert main(["judge", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == MAX_REPORTED + 1
    assert err[-1].endswith(f"7 more problems not shown ({MAX_REPORTED + 7} in all)")


def test_capture_on_stdin(tmp_path: Path) -> None:
    proc = cli("replay", "-", "--darknet", DARK, stdin=pcap_bytes(GOOD))
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    proc = cli("replay", "-", "--darknet", DARK, stdin=b"junk")
    assert_clean_failure(proc, "standard input: byte offset 0: not a pcap")


# Fuzzing: whatever the bytes, only the documented errors come out.
@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 147]), st.binary(max_size=120))
def test_decoding_arbitrary_bytes_raises_only_packet_errors(linktype: int, frame: bytes) -> None:
    with contextlib.suppress(PacketError):
        tcp_header(ip_from_frame(linktype, frame))


_SEED_PCAP = pcap_bytes(GOOD)
_SEED_PCAPNG = pcapng_shb() + pcapng_idb(1, tsresol=9) + b"".join(pcapng_epb(0, ts, f) for ts, f in GOOD)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([_SEED_PCAP, _SEED_PCAPNG]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.integers(0, 10**6),
)
def test_corrupted_captures_raise_only_capture_errors(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    data = data[: max(1, len(data) - cut % 64)]
    reported: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.cap"
        path.write_bytes(bytes(data))
        try:
            for number, _ts, _lt, frame, _orig in read_capture(path, on_error=reported.append):
                assert number >= 1 and isinstance(frame, bytes)
        except CaptureError as exc:
            assert str(path) in str(exc)
    assert all(str(path) in line for line in reported)


def test_syn_with_fin_or_rst_is_not_fingerprinted_nor_an_error(tmp_path: Path) -> None:
    odd = [ip_packet("203.0.113.8", "198.18.0.1", 1, 2, flags) for flags in ("SF", "SR", "SEC", "SP")]
    path = tmp_path / "odd.pcap"
    path.write_bytes(pcap_bytes([(S, ethernet(ip)) for ip in odd]))
    proc = cli("fingerprint", str(path))
    assert proc.returncode == 0 and proc.stderr == ""
    # SYN+ECE+CWR (ECN setup) and SYN+PSH are still SYNs to p0f; SYN+FIN and SYN+RST are not.
    assert [json.loads(line)["kind"] for line in proc.stdout.splitlines()] == ["syn", "syn"]


@pytest.mark.parametrize("command", ["fingerprint", "replay", "judge"])
def test_unwritable_output_is_one_line_not_a_traceback(tmp_path: Path, command: str) -> None:
    capture = tmp_path / "good.pcap"
    capture.write_bytes(pcap_bytes(GOOD))
    records = tmp_path / "records.jsonl"
    records.write_text(cli("replay", str(capture), "--darknet", DARK).stdout)
    argv = {"fingerprint": ["fingerprint", str(capture)], "judge": ["judge", str(records)],
            "replay": ["replay", str(capture), "--darknet", DARK]}[command]
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC, as on a full disk
        proc = subprocess.run([sys.executable, "-m", "analyzer.cli", *argv], stdout=full,
                              stderr=subprocess.PIPE, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.splitlines() == ["stepstone-analyzer: cannot write the output: No space left on device"]


def test_p0f_db_that_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "ok.pcap"
    path.write_bytes(pcap_bytes(GOOD))
    proc = cli("fingerprint", str(path), "--p0f-db", str(tmp_path))
    assert_clean_failure(proc, f"--p0f-db {tmp_path}: not a regular file")
    proc = cli("fingerprint", str(path), "--p0f-db", str(tmp_path / "none.fp"))
    assert_clean_failure(proc, "none.fp: no such file")
