"""Issue 9, the offline side: hostile captures, records and options never lose good data silently,
never give a traceback, and exit 2 only for input that cannot be read (or with --strict).

Each test here failed on the main before the fix of its class.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

from capfiles import pcap_bytes
from offline_helpers import DARK, S, cli, handshake, real_capture

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
    """`tcpdump -w - | stepstone-analyzer fingerprint -`: ~200 MB through a pipe, memory stays flat.

    Before, all of standard input was read before the first packet was parsed.
    """
    ip = bytearray(20)
    ip[0], ip[9] = 0x45, 17  # UDP: read, skipped, counted
    size = 65_000
    struct.pack_into("!H", ip, 2, size - 14)
    frame = b"\x02" * 12 + b"\x08\x00" + bytes(ip) + b"\x00" * (size - 34)
    record = struct.pack("<IIII", 1000, 0, len(frame), len(frame)) + frame
    count = 3000  # 195 MB
    for command in (["fingerprint", "-"], ["replay", "-", "--darknet", DARK, "--summary", "--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "analyzer.cli", *command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        out: list[bytes] = []
        reader = threading.Thread(target=lambda p=proc, o=out: o.append(p.stdout.read()))  # type: ignore[misc]
        reader.start()
        proc.stdin.write(pcap_bytes([])[:24])
        for _ in range(count):
            proc.stdin.write(record)
        proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        reader.join(timeout=30)
        err = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0 and err == "", err
        assert usage.ru_maxrss < 150 * 1024, f"{command[0]}: max RSS {usage.ru_maxrss // 1024} MB"
        if command[0] == "replay":
            assert json.loads(out[0])["packets"] == count


def test_handshakes_in_a_pipe(tmp_path: Path) -> None:
    proc = cli("replay", "-", "--darknet", DARK,
               stdin=pcap_bytes(handshake(1, S) + handshake(2, 2 * S)))
    assert proc.returncode == 0
    assert [json.loads(line)["src"] for line in proc.stdout.splitlines()] == ["203.0.113.1", "203.0.113.2"]
