"""Issue 9, the offline side: hostile captures, records and options never lose good data silently,
never give a traceback, and exit 2 only for input that cannot be read (or with --strict).

Each test here failed on the main before the fix of its class.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
from capfiles import Conn, _block, ethernet, ip_packet, pcap_bytes, pcapng_epb, pcapng_idb, pcapng_shb
from offline_helpers import DARK, S, cli, cli_limited, handshake, real_capture

# --- Pipes and streams: a capture is read in chunks, whatever its kind ------------------------


def test_a_capture_path_that_is_a_pipe(tmp_path: Path) -> None:
    """`fingerprint <(cat x.pcap)`: a FIFO has no size, and was refused as an empty file."""
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    data = real_capture("vnc-scanner.pcap").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    for command in (["fingerprint", str(fifo)], ["replay", str(fifo), "--darknet", "136.159.0.0/16"]):
        writer = threading.Thread(target=feed)
        writer.start()
        proc = cli(*command)
        writer.join(timeout=30)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert len(proc.stdout.splitlines()) == {"fingerprint": 411, "replay": 194}[command[0]]


def test_standard_input_is_streamed_in_bounded_memory() -> None:
    """`tcpdump -w - | stepstone-analyzer fingerprint -`: 400 MB through a pipe, in 384 MiB of
    address space. Before, all of standard input was read before the first packet was parsed."""
    ip = bytearray(20)
    ip[0], ip[9] = 0x45, 17  # UDP: read, skipped, counted
    size = 65_000
    struct.pack_into("!H", ip, 2, size - 14)
    frame = b"\x02" * 12 + b"\x08\x00" + bytes(ip) + b"\x00" * (size - 34)
    record = struct.pack("<IIII", 1000, 0, len(frame), len(frame)) + frame
    count = 6200
    chunks = [pcap_bytes([])[:24], *[record] * count]  # one record object, referenced 6200 times
    for command in (["fingerprint", "-"], ["replay", "-", "--darknet", DARK, "--summary", "--json"]):
        proc = cli_limited(command, chunks, address_space=384 << 20)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
        if command[0] == "replay":
            assert json.loads(proc.stdout)["packets"] == count


def test_handshakes_in_a_pipe(tmp_path: Path) -> None:
    proc = cli("replay", "-", "--darknet", DARK,
               stdin=pcap_bytes(handshake(1, S) + handshake(2, 2 * S)))
    assert proc.returncode == 0
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["203.0.113.1", "203.0.113.2"]


# --- Timestamps that jump ---------------------------------------------------------------------


def _open_handshakes(count: int, t0: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(SYN and SYN+ACK of `count` connections, their ACKs 100 ms later): answered handshakes."""
    opened, acks = [], []
    for i in range(count):
        c = Conn(f"203.0.113.{i % 250 + 1}", "198.18.0.1", 30000 + i, 23)
        t = t0 + i * 1_000_000
        opened += [(t, ethernet(c.syn())), (t + 1_000, ethernet(c.synack()))]
        acks.append((t0 + count * 1_000_000 + 100_000_000 + i * 1_000, ethernet(c.ack())))
    return opened, acks


def _replay_summary(path: Path, *extra: str) -> tuple[dict[str, int], list[str], int]:
    proc = cli("replay", str(path), "--darknet", DARK, "--summary", "--json", *extra)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout), proc.stderr.splitlines(), proc.returncode


@pytest.mark.parametrize("jump_s", [2**31, 2**12, 31, -(2**30)])
def test_one_packet_whose_timestamp_jumps_loses_nothing(tmp_path: Path, jump_s: int) -> None:
    """100 open handshakes, one unrelated packet stamped far off, then the 100 ACKs: 100 records.

    Before: a jump ahead expired every open connection (0 records, exit 0, nothing on stderr).
    """
    opened, acks = _open_handshakes(100, 1_700_000_000 * S)
    unrelated = ip_packet("192.0.2.1", "192.0.2.2", 1, 2, "A")
    odd = (opened[-1][0] + jump_s * S, ethernet(unrelated))
    path = tmp_path / "jump.pcap"
    path.write_bytes(pcap_bytes([*opened, odd, *acks]))
    table, err, status = _replay_summary(path)
    assert (table["records"], table["timed"], table["bad_timestamps"]) == (100, 100, 1), (table, err)
    assert status == 0 and len(err) == 1 and "packet 201: timestamp" in err[0], err
    assert ("ahead of" if jump_s > 0 else "behind") in err[0]
    _table, _err, status = _replay_summary(path, "--strict")
    assert status == 2


def test_a_syn_ack_stamped_far_back_makes_no_absurd_tp(tmp_path: Path) -> None:
    c = Conn("203.0.113.50", "198.18.0.1", 41000, 23)
    t0 = 1_700_000_000 * S
    frames = [(t0, ethernet(c.syn())), (t0 - 2**30 * S, ethernet(c.synack())),
              (t0 + 1_000, ethernet(c.synack())), (t0 + 5_001_000, ethernet(c.ack())),
              *handshake(1, t0 + S), *handshake(2, t0 + 2 * S)]
    path = tmp_path / "back.pcap"
    path.write_bytes(pcap_bytes(frames))
    proc = cli("replay", str(path), "--darknet", DARK)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["src"], r["tp_us"]) for r in records] == [
        ("203.0.113.50", 5000), ("203.0.113.1", 5000), ("203.0.113.2", 5000)]
    assert proc.returncode == 0 and "packet 2: timestamp" in proc.stderr


def test_real_gaps_and_concatenated_captures_are_not_bad_input(tmp_path: Path) -> None:
    """A quiet darknet (handshakes hours apart) is read as it is; two captures concatenated in the
    wrong order are read whole, with one line saying that time went back."""
    hour = 3600 * S
    sparse = [p for n in range(1, 6) for p in handshake(n, n * hour)]
    path = tmp_path / "sparse.pcap"
    path.write_bytes(pcap_bytes(sparse))
    table, err, status = _replay_summary(path)
    assert (table["records"], table["bad_timestamps"], status, err) == (5, 0, 0, [])
    later = [p for n in range(1, 4) for p in handshake(n, 10 * hour + n * S)]
    earlier = [p for n in range(4, 7) for p in handshake(n, 5 * hour + n * S)]
    path = tmp_path / "concatenated.pcap"
    path.write_bytes(pcap_bytes(later + earlier))
    table, err, status = _replay_summary(path)
    assert (table["records"], table["time_rewinds"], table["bad_timestamps"]) == (6, 1, 0), (table, err)
    assert status == 0 and len(err) == 1 and "capture time goes back" in err[0]
    # A single handshake after a long silence at the very end is not dropped either.
    path = tmp_path / "tail.pcap"
    path.write_bytes(pcap_bytes(handshake(1, S) + handshake(2, 2 * S) + handshake(3, 20 * hour)))
    table, err, status = _replay_summary(path)
    assert (table["records"], status, err) == (3, 0, [])


def test_timestamps_outside_the_record_range_are_reported(tmp_path: Path) -> None:
    """pcapng can stamp before 1970 (a negative if_tsoffset) or after 2106 (if_tsresol of seconds);
    a record must read back, so replay skips such packets, and says so."""
    c = Conn("203.0.113.1", "198.18.0.1")
    options = struct.pack("<HH", 9, 1) + bytes((0,)) + b"\0\0\0" + struct.pack("<HH", 0, 0)  # seconds
    idb = _block(1, struct.pack("<HHI", 1, 0, 0) + options)
    data = pcapng_shb() + idb + b"".join(pcapng_epb(0, 2**40, ethernet(ip)) for ip in (c.syn(), c.synack()))
    data += pcapng_idb(1, tsresol=9) + b"".join(pcapng_epb(1, ts, f) for ts, f in handshake(2, 1000 * S))
    path = tmp_path / "range.pcapng"
    path.write_bytes(data)
    table, err, status = _replay_summary(path)
    assert (table["records"], table["bad_timestamps"], status) == (1, 2, 0), (table, err)
    assert "outside 0..4294967296 s" in err[0]


def test_negative_pcapng_timestamps_print_as_they_are(tmp_path: Path) -> None:
    """-1 ns came out as -1.999999 (floor division on the seconds, then a positive fraction)."""
    c = Conn("203.0.113.1", "198.18.0.1")
    options = (struct.pack("<HH", 9, 1) + bytes((9,)) + b"\0\0\0" + struct.pack("<HHq", 14, 8, -1)
               + struct.pack("<HH", 0, 0))  # nanoseconds, offset -1 s
    idb = _block(1, struct.pack("<HHI", 1, 0, 0) + options)
    stamps = [999_999_999, 0, 1_500_000_000, 2_000_000_000]
    data = pcapng_shb() + idb + b"".join(pcapng_epb(0, ts, ethernet(c.syn())) for ts in stamps)
    path = tmp_path / "negative.pcapng"
    path.write_bytes(data)
    proc = cli("fingerprint", str(path))
    assert proc.returncode == 0, proc.stderr
    assert [line.split(",")[0] for line in proc.stdout.splitlines()] == [
        '{"ts":-0.000001', '{"ts":-1.000000', '{"ts":0.500000', '{"ts":1.000000']
    assert [json.loads(line)["ts"] for line in proc.stdout.splitlines()] == [-0.000001, -1.0, 0.5, 1.0]


# --- Malformed packets in a readable capture: counted, reported, exit 0 ------------------------


def test_a_runt_frame_at_the_start_of_a_real_capture(tmp_path: Path) -> None:
    real = real_capture("vnc-scanner.pcap").read_bytes()
    path = tmp_path / "runt.pcap"
    path.write_bytes(real[:24] + struct.pack("<IIII", 1, 0, 4, 4) + b"\x01\x02\x03\x04" + real[24:])
    proc = cli("fingerprint", str(path))
    assert (proc.returncode, len(proc.stdout.splitlines())) == (0, 411), proc.stderr
    assert proc.stderr.splitlines() == [
        f"stepstone-analyzer: {path}: packet 1: Ethernet frame of 4 bytes is truncated"]
    table, err, status = _replay_summary(path, "--darknet", "136.159.0.0/16")
    assert (table["records"], table["packet_errors"], status, len(err)) == (194, 1, 0, 1)
    assert cli("fingerprint", str(path), "--strict").returncode == 2


def test_a_syn_whose_header_length_runs_past_the_packet(tmp_path: Path) -> None:
    syn = bytearray(ip_packet("203.0.113.9", "198.18.0.1", 1, 2, "S", options=[]))
    syn[32] = 0xF0  # data offset 60 bytes, 20 captured
    c = Conn("203.0.113.9", "198.18.0.1", 1, 2)
    frames = [(S, ethernet(bytes(syn))), (S + 1000, ethernet(c.synack(ack=1))),
              (S + 5_001_000, ethernet(c.ack())), *handshake(3, 2 * S)]
    path = tmp_path / "long-header.pcap"
    path.write_bytes(pcap_bytes(frames))
    proc = cli("fingerprint", str(path))
    assert proc.returncode == 0 and "packet 1: TCP header length 60 runs past" in proc.stderr
    assert len(proc.stdout.splitlines()) == 3  # the good SYN, both SYN+ACKs
    proc = cli("replay", str(path), "--darknet", DARK)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    # The broken SYN's handshake is still timed; only its label is missing.
    assert [(r["src"], r["fp"] is None) for r in records] == [("203.0.113.9", True), ("203.0.113.3", False)]
    assert proc.returncode == 0 and len(proc.stderr.splitlines()) == 1
    assert cli("replay", str(path), "--darknet", DARK, "--strict").returncode == 2


def test_many_malformed_packets_first_few_then_a_count(tmp_path: Path) -> None:
    runts = [(S, b"\x00" * 4)] * 30
    path = tmp_path / "runts.pcap"
    path.write_bytes(pcap_bytes([*runts, *handshake(1, 2 * S)]))
    proc = cli("replay", str(path), "--darknet", DARK)
    err = proc.stderr.splitlines()
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
    assert len(err) == 21 and err[-1].endswith("10 more problems not shown (30 in all)"), err


def test_unreadable_captures_still_exit_2(tmp_path: Path) -> None:
    data = pcap_bytes(handshake(1, S) + handshake(2, 2 * S))
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[:-10])  # cut in the middle of the last record
    proc = cli("replay", str(path), "--darknet", DARK)
    assert proc.returncode == 2 and "packet 6: packet data truncated" in proc.stderr
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["203.0.113.1"]


# --- judge input ----------------------------------------------------------------------------

GOOD_RECORD = {"t": 5.0, "src": "192.0.2.1", "dst": "198.18.0.1", "tp_us": 10, "ping_min_us": 1,
               "ping_avg_us": 2, "ping_max_us": 3, "ping_var_us2": 0.5, "syn_rtt_us": 2, "fp": None,
               "fa": None}


def test_judge_a_100_mb_line_in_bounded_memory() -> None:
    """A 100 MB line took 2.8 GB; now it is refused unread (in 384 MiB of address space), and the
    record after it still counts."""
    piece = b"a" * (1 << 20)
    chunks = [b'{"t": 1, "src": "', *[piece] * 100, b'"}\n', json.dumps(GOOD_RECORD).encode() + b"\n"]
    proc = cli_limited(["judge", "-"], chunks, address_space=384 << 20)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "stepstone-analyzer: -: line 1: longer than 1048576 bytes, not a record; skipped"]
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["192.0.2.1"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"src": True}, "field 'src' is not an IP address: True"),
        ({"dst": 3232235777}, "field 'dst' is not an IP address: 3232235777"),
        ({"t": 2**40}, "field 't' out of range"),
        ({"tp_us": 3_600_000_001}, "field 'tp_us' out of range"),
        ({"ping_var_us2": 1.7e308}, "field 'ping_var_us2' out of range"),
        ({"ping_max_us": "DIGITS401"}, "not a record: a number of 401 digits"),
        ({"syn_rtt_us": "DIGITS5000"}, "not a record: a number of 5000 digits"),
    ],
)
def test_judge_refuses_values_outside_the_record_contract(tmp_path: Path, bad: dict[str, object],
                                                          needle: str) -> None:
    other = {**GOOD_RECORD, "src": "192.0.2.2", "tp_us": 100}
    # Python's own int-digits limit stops json.dumps at 4300 digits: the long ones are spliced in.
    text = "\n".join(json.dumps(r) for r in ({**GOOD_RECORD, **bad}, other))
    text = text.replace('"DIGITS401"', "1" * 401).replace('"DIGITS5000"', "9" * 5000)
    path = tmp_path / "records.jsonl"
    path.write_text(text + "\n")
    proc = cli("judge", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert needle in proc.stderr and "line 1" in proc.stderr, proc.stderr
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["192.0.2.2"]


def test_judge_output_is_strict_json(tmp_path: Path) -> None:
    """NaN and Infinity are not JSON: refused on input, never written (json.loads would accept them:
    parse_constant turns them into errors)."""
    lines = ['{"t": 5.0, "src": "192.0.2.1", "dst": "198.18.0.1", "tp_us": Infinity}',
             '{"t": NaN, "src": "192.0.2.1", "dst": "198.18.0.1"}',
             json.dumps({**GOOD_RECORD, "ping_var_us2": 1.2e19, "tp_us": 3_600_000_000}),
             json.dumps({**GOOD_RECORD, "t": 6.0, "ping_var_us2": 1.2e19, "tp_us": 0,
                         "ping_max_us": 3_600_000_000})]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = cli("judge", str(path))
    assert proc.returncode == 2
    assert "line 1: not a record: Infinity is not JSON" in proc.stderr
    assert "line 2: not a record: NaN is not JSON" in proc.stderr
    for line in proc.stdout.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the output"))
    assert len(proc.stdout.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["replay", "{cap}", "--darknet", DARK, "--idle-timeout", "1e300"], "--idle-timeout must be from 0"),
        (["replay", "{cap}", "--darknet", DARK, "--idle-timeout", "3601"], "--idle-timeout must be from 0"),
        (["judge", "{rec}", "--window", "1e308"], "--window must be from 0 to 4294967296"),
        (["judge", "{rec}", "--now", "1e20"], "--now must be from 0 to 4294967296"),
    ],
)
def test_numeric_options_have_ranges(tmp_path: Path, argv: list[str], needle: str) -> None:
    cap = tmp_path / "ok.pcap"
    cap.write_bytes(pcap_bytes(handshake(1, S)))
    rec = tmp_path / "ok.jsonl"
    rec.write_text(json.dumps(GOOD_RECORD) + "\n")
    proc = cli(*(a.format(cap=cap, rec=rec) for a in argv))
    assert proc.returncode == 2 and proc.stderr.startswith(f"stepstone-analyzer: {needle}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_5000_digit_option_is_one_line() -> None:
    proc = cli("judge", "-", "--now", "9" * 5000, stdin=b"")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr) < 1000


def test_an_unsupported_link_type_is_the_capture_failing_said_once(tmp_path: Path) -> None:
    """Not a malformed packet: nothing in such a capture can be read, so exit 2, one line."""
    c = Conn("203.0.113.1", "198.18.0.1")
    path = tmp_path / "radiotap.pcap"
    path.write_bytes(pcap_bytes([(S, c.syn()), (S + 1000, c.synack()), (S + 2000, c.ack())], linktype=127))
    table, err, status = _replay_summary(path)
    assert (status, table["packet_errors"], table["packets"]) == (2, 3, 3)
    assert err == [f"stepstone-analyzer: {path}: packet 1: unsupported link-layer type 127 "
                   "(every such packet skipped)"]
