"""A SYN with an IPv6 extension header before TCP: p0f 3.09b passes over it without a word
(process.c: "One day, we may try to parse and skip IPv6 extensions"), so it gets no label, and it
is not bad input either: no error line, exit status 0, `not_fingerprinted` counted by `replay`.
The tracker still times the handshake (it steps over extension headers itself).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from capfiles import OPTS, Conn, ethernet, ip_packet, pcap_bytes
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from service_harness import open_harness, until

from analyzer.handshake import Handshake
from lab.redis import RedisServer
from osfp import Fingerprinter, FingerprintError, NotFingerprinted
from osfp.database import stock_database_path
from osfp.reference import p0f_binary, run_p0f

S = 1_000_000_000
CLIENT, DARK = "2001:db8::10", "2001:db8:ffff::5"


def ext_syn(*ext: object, sport: int = 40005) -> bytes:
    """A Linux-like IPv6 SYN with the given extension headers between IPv6 and TCP."""
    layer = IPv6(src=CLIENT, dst=DARK)
    for header in ext:
        layer = layer / header  # type: ignore[operator]
    return bytes(layer / TCP(sport=sport, dport=443, flags="S", seq=9000, window=64240, options=OPTS))


def capture(tmp_path: Path) -> Path:
    """One handshake whose SYN carries hop-by-hop + destination options, then a plain IPv6 one."""
    odd = Conn(CLIENT, DARK, 40005, 443, isn=9000, server_isn=9500)
    plain = Conn("2001:db8::11", DARK, 40006, 443, isn=100, server_isn=200)
    frames = [
        (1 * S, ethernet(ext_syn(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()))),
        (1 * S + 100_000, ethernet(odd.synack())),
        (1 * S + 20_100_000, ethernet(odd.ack())),
        (2 * S, ethernet(plain.syn())),
        (2 * S + 100_000, ethernet(plain.synack())),
        (2 * S + 30_100_000, ethernet(plain.ack())),
    ]
    path = tmp_path / "ext.pcap"
    path.write_bytes(pcap_bytes(frames))
    return path


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analyzer.cli", *argv], capture_output=True, text=True,
                          check=False, timeout=120)


def test_fingerprinter_raises_not_fingerprinted_for_extension_headers() -> None:
    fp = Fingerprinter()
    for ext in ((IPv6ExtHdrHopByHop(),), (IPv6ExtHdrDestOpt(),), (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())):
        with pytest.raises(NotFingerprinted, match="next header"):
            fp.fingerprint(ext_syn(*ext))
    assert issubclass(NotFingerprinted, FingerprintError)  # callers that only want a label: unchanged
    assert fp.fingerprint(ext_syn()).label is not None  # the same SYN without them is labelled


def test_malformed_packets_stay_errors() -> None:
    fp = Fingerprinter()
    truncated = ext_syn(IPv6ExtHdrHopByHop())[:-4]  # payload length says 4 more bytes
    bad_option = bytearray(ip_packet("203.0.113.6", "198.18.0.1", 1, 2, "S", options=[("NOP", None)] * 4))
    bad_option[40:42] = b"\x02\x00"  # MSS option with length 0
    for packet in (truncated, bytes(bad_option)):
        with pytest.raises(FingerprintError) as info:
            fp.fingerprint(packet)
        assert not isinstance(info.value, NotFingerprinted)


def test_fingerprint_skips_the_syn_without_an_error(tmp_path: Path) -> None:
    proc = cli("fingerprint", str(capture(tmp_path)))
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    syns = [(r["src"], r["sport"]) for r in rows if r["kind"] == "syn"]
    assert syns == [("2001:db8::11", 40006)]
    assert sum(r["kind"] == "synack" for r in rows) == 2


def test_replay_times_it_with_fp_null_and_counts_it(tmp_path: Path) -> None:
    path = capture(tmp_path)
    proc = cli("replay", str(path), "--darknet", "2001:db8:ffff::/48")
    assert (proc.returncode, proc.stderr) == (0, "")
    records = {r["src"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert (records[CLIENT]["tp_us"], records[CLIENT]["fp"]) == (20_000, None)
    assert records["2001:db8::11"]["fp"] is not None
    proc = cli("replay", str(path), "--darknet", "2001:db8:ffff::/48", "--summary", "--json")
    assert (proc.returncode, proc.stderr) == (0, "")
    table = json.loads(proc.stdout)
    assert (table["records"], table["not_fingerprinted"], table["fingerprint_errors"]) == (2, 1, 0)
    proc = cli("replay", str(path), "--darknet", "2001:db8:ffff::/48", "--summary")
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and ["not", "fingerprinted", "1"] in rows


@pytest.mark.skipif(p0f_binary() is None, reason="needs Debian's p0f binary")
def test_p0f_itself_passes_over_it(tmp_path: Path) -> None:
    theirs = run_p0f(capture(tmp_path), db=stock_database_path())
    syns = {(e.src, e.sport) for e in theirs if e.kind == "syn"}
    assert syns == {("2001:db8::11", 40006)}  # the plain SYN only; no complaint about the other
    proc = cli("fingerprint", str(capture(tmp_path)), "--p0f-db", str(stock_database_path()))
    ours = {(r["src"], r["sport"]) for r in map(json.loads, proc.stdout.splitlines()) if r["kind"] == "syn"}
    assert ours == syns and proc.returncode == 0


async def test_live_service_keeps_fp_null(redis_server: RedisServer, tmp_path: Path) -> None:
    from analyzer.service import Config, serve

    t = time.time()
    h = Handshake(t=t, src=CLIENT, sport=40005, dst=DARK, dport=443, syn=ext_syn(IPv6ExtHdrHopByHop()),
                  synack_times=(t + 0.0002,), reply="ack", reply_time=t + 0.0202, tp_us=20_000,
                  feed="responder")
    async with open_harness(redis_server, tmp_path / "logs") as harness:
        config = Config(redis_url=harness.url, handshakes=True, zeek_url=None, log_dir=harness.log_dir,
                        consumer="a1")
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop=stop))
        try:
            await harness.send(h)
            await harness.jobs(1)  # fingerprinting did not stop the handshake from being probed
            log = harness.log_dir / "handshakes.log"

            async def logged() -> list[dict[str, object]]:
                text = log.read_text() if log.exists() else ""
                return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines() if x.strip()]

            (line,) = await until(logged, what="the handshake in handshakes.log")
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 20) == 0
    assert line["src"] == CLIENT and line["fp"] is None and line["tp_us"] == 20_000
