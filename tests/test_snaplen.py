"""Captures taken with a small snapshot length (tcpdump -s 54 / -s 68): every SYN's TCP options are
cut off, so p0f can label none of them. That is said once per file, with the cause, the cure and a
count -- not once per SYN -- and the exit status stays 2 (labels are missing). Timing still works.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from capfiles import Conn, ethernet, ip_packet, pcapng_idb, pcapng_shb

from analyzer.capture import read_capture
from analyzer.offline import MAX_REPORTED

S = 1_000_000_000
DARK = "198.18.0.0/15"


def cut_pcap(frames: list[tuple[int, bytes]], snaplen: int) -> bytes:
    """A classic pcap as tcpdump -s SNAPLEN writes it: caplen = min(len, snaplen), original kept."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1)]
    for ts, frame in frames:
        kept = frame[:snaplen]
        out.append(struct.pack("<IIII", ts // S, ts % S // 1000, len(kept), len(frame)) + kept)
    return b"".join(out)


def handshakes(n: int) -> list[tuple[int, bytes]]:
    frames = []
    for i in range(n):
        c = Conn(f"203.0.113.{i + 1}", "198.18.0.1", 40000 + i, 23)
        t = (i + 1) * S
        frames += [(t, ethernet(c.syn())), (t + 1_000, ethernet(c.synack())),
                   (t + 5_001_000, ethernet(c.ack()))]
    return frames


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analyzer.cli", *argv], capture_output=True, text=True,
                          check=False, timeout=120)


def test_reader_yields_the_original_length(tmp_path: Path) -> None:
    frames = handshakes(1)
    path = tmp_path / "cut.pcap"
    path.write_bytes(cut_pcap(frames, 54))
    got = [(len(frame), original) for _, _, _, frame, original in read_capture(path)]
    assert got == [(54, len(frames[0][1])), (54, len(frames[1][1])), (54, 60)]  # the ACK: 54 + padding
    # pcapng: the enhanced packet block's original length.
    syn = frames[0][1]
    body = struct.pack("<IIIII", 0, 0, 1, 54, len(syn)) + syn[:54] + b"\x00" * 2
    epb = struct.pack("<II", 6, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))
    path = tmp_path / "cut.pcapng"
    path.write_bytes(pcapng_shb() + pcapng_idb(1) + epb)
    assert [(len(f), o) for _, _, _, f, o in read_capture(path)] == [(54, len(syn))]


def test_fingerprint_says_it_once_per_file(tmp_path: Path) -> None:
    n = MAX_REPORTED + 5  # more SYNs than problems printed one by one
    path = tmp_path / "s54.pcap"
    path.write_bytes(cut_pcap(handshakes(n), 54))
    proc = cli("fingerprint", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"stepstone-analyzer: {path}: packet 1: captured 54 of 74 bytes (snaplen): TCP options cut off; "
        f"capture with a larger snaplen, e.g. -s 0 ({2 * n} SYNs and SYN+ACKs cut short, not fingerprinted)"
    ]


def test_replay_times_them_and_says_it_once(tmp_path: Path) -> None:
    path = tmp_path / "s68.pcap"
    path.write_bytes(cut_pcap(handshakes(3), 68))  # 14 of the 20 option bytes captured
    proc = cli("replay", str(path), "--darknet", DARK)
    assert proc.returncode == 2
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["tp_us"], r["fp"]) for r in records] == [(5_000, None)] * 3
    (line,) = proc.stderr.splitlines()
    assert "packet 1: captured 68 of 74 bytes (snaplen): TCP options cut off" in line
    assert line.endswith("(3 SYNs cut short, not fingerprinted)")
    proc = cli("replay", str(path), "--darknet", DARK, "--summary", "--json")
    table = json.loads(proc.stdout)
    assert (table["records"], table["snaplen_cut"], table["fingerprint_errors"]) == (3, 3, 3)


def test_other_problems_are_still_reported_one_by_one(tmp_path: Path) -> None:
    """A SYN with a malformed option that was captured whole is its own problem; a full-length
    capture gives no snaplen line at all."""
    bad = bytearray(ip_packet("203.0.113.99", "198.18.0.1", 1, 2, "S", options=[("NOP", None)] * 4))
    bad[40:42] = b"\x02\x00"  # MSS option with length 0
    frames = handshakes(2)
    data = bytearray(cut_pcap(frames, 54))
    frame = ethernet(bytes(bad))
    data += struct.pack("<IIII", 9, 0, len(frame), len(frame)) + frame  # this record is not cut
    path = tmp_path / "mixed.pcap"
    path.write_bytes(bytes(data))
    proc = cli("fingerprint", str(path))
    err = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(err) == 2, err
    assert "packet 7: TCP option MSS has length 0" in err[0]
    assert "packet 1: captured 54 of 74 bytes (snaplen)" in err[1] and "(4 SYNs and SYN+ACKs" in err[1]
    whole = tmp_path / "whole.pcap"
    whole.write_bytes(cut_pcap(frames, 65535))
    proc = cli("fingerprint", str(whole))
    assert (proc.returncode, proc.stderr, len(proc.stdout.splitlines())) == (0, "", 4)


def test_the_snaplen_line_is_printed_past_the_cap(tmp_path: Path) -> None:
    bad = bytearray(ip_packet("203.0.113.99", "198.18.0.1", 1, 2, "S", options=[("NOP", None)] * 4))
    bad[40:42] = b"\x02\x00"  # MSS option with length 0
    frame = ethernet(bytes(bad))
    n = MAX_REPORTED + 5
    data = bytearray(cut_pcap([], 54))
    for i in range(n):
        data += struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame  # whole, and malformed
    data += cut_pcap(handshakes(1), 54)[24:]
    path = tmp_path / "many.pcap"
    path.write_bytes(bytes(data))
    err = cli("fingerprint", str(path)).stderr.splitlines()
    assert len(err) == MAX_REPORTED + 2, err
    assert f"packet {n + 1}: captured 54 of 74 bytes (snaplen)" in err[-2]
    assert err[-1].endswith(f"{n - MAX_REPORTED} more problems not shown ({n + 1} in all)")
