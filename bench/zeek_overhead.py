"""Cost of the Zeek package on the sensor: `zeek -C -r` on a large darknet-like capture, with and
without zeek-scripts/ loaded, and the package's state under a SYN flood that is never answered.

Captures (written here with plain struct, deterministic for a seed, cached under
$TMPDIR/stepstone-zeek-bench so reruns skip the writing):
  darknet  many sources (a few heavy scanners, a long tail) towards 198.18.0.0/15 and
           2001:db8:ffff::/48 (1 in 10 darknet connections over IPv6):
             55 %  stack-less scanner: option-less (or MSS-only) SYN, SYN+ACK, RST
             15 %  full handshake: SYN, SYN+ACK, ACK; half of them send data (ACKed), then
                   close with FIN or RST
              2 %  SYN+ACK retransmitted after 1 s before the reply (Karn's rule)
              5 %  SYN+ACK (and its retransmissions at 1 s and 3 s) never answered
             13 %  SYN the darknet never answers (3 in 10 repeated after 1 s)
             10 %  not darknet traffic: TCP conversations between outside hosts (~10 packets)
  flood    random sources (a fresh one per SYN) over simulated minutes; the darknet answers half
           of the SYNs with a SYN+ACK and its retransmissions at 1 s and 3 s; no client answers.
Checksums are left zero: Zeek runs with -C, as on a sensor behind a NIC offloading them.

"Zeek alone" is `zeek -C -r capture`: Zeek with its default scripts (base/, which writes conn.log
and the rest), not site/local.zeek, which each site tunes; --local loads `local` in both runs.
"With the package" adds zeek-scripts/ with darknet_subnets set to the capture's darknet and no
WebSocket listener (websocket_port 0/tcp), so what is measured is the scripts' cost. Each figure
is the best (lowest) of --runs runs, from os.wait4's rusage of that Zeek process: wall time, CPU
time (user + system, all of Zeek's threads) and peak resident memory; runs with and without the
package take turns. The goal (the package adds
at most 30 % to Zeek's own time) is judged on CPU time: on a shared machine wall time also counts
the other processes.

For the flood, a small script loaded with the package samples |StepStone::tracks| every 10 s of
trace time and prints the largest and the last sample before Zeek shut down.

    python bench/zeek_overhead.py [--zeek PATH] [--runs 3] [--connections 800000]
                                  [--flood-syns 1000000] [--no-flood] [--local]
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zeek-scripts"
GENERATOR = 3  # part of the cached file names: bump when the traffic written changes
START_US = 1_700_000_000 * 1_000_000  # first packet, epoch microseconds
DARKNET4 = ipaddress.ip_network("198.18.0.0/15")
DARKNET6 = ipaddress.ip_network("2001:db8:ffff::/48")
GOAL = 30.0  # %: the most the package may add to Zeek's own CPU time

MAC_TAP = bytes.fromhex("020000000001")  # the upstream router, as the tap sees it
MAC_DARK = bytes.fromhex("020000000002")  # the darknet's responder
ETH4_IN = MAC_DARK + MAC_TAP + b"\x08\x00"
ETH4_OUT = MAC_TAP + MAC_DARK + b"\x08\x00"
ETH6_IN = MAC_DARK + MAC_TAP + b"\x86\xdd"
ETH6_OUT = MAC_TAP + MAC_DARK + b"\x86\xdd"

IP4 = struct.Struct("!BBHHHBBH4s4s")
IP6 = struct.Struct("!IHBB16s16s")
TCP = struct.Struct("!HHIIBBHHH")
UDP = struct.Struct("!HHHH")
RECORD = struct.Struct("<IIII")
# MSS, SACK permitted, timestamps, NOP, window scale: a Linux SYN and SYN+ACK.
LINUX_OPTS = struct.pack("!BBH BB BBII B BBB", 2, 4, 1460, 4, 2, 8, 10, 1, 0, 1, 3, 3, 7)
MSS_OPT = struct.pack("!BBH", 2, 4, 1460)
FIN, SYN, RST, PSH, ACK = 1, 2, 4, 8, 16
PORTS = (23, 22, 80, 443, 445, 3389, 8080, 2323, 5555, 6379, 1433, 3306, 5900, 8443, 81, 8291)
PAYLOAD = bytes(random.Random(7).randrange(256) for _ in range(4096))


class Pcap:
    """A pcap file (DLT_EN10MB, microsecond times) written in big buffered chunks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_suffix(".part")
        self.file = self.tmp.open("wb")
        self.file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        self.buf: list[bytes] = []
        self.packets = 0

    def write(self, t_us: int, frame: bytes) -> None:
        if len(frame) < 60:
            frame += bytes(60 - len(frame))  # Ethernet pads short frames
        n = len(frame)
        self.buf.append(RECORD.pack(t_us // 1_000_000, t_us % 1_000_000, n, n) + frame)
        self.packets += 1
        if len(self.buf) >= 65536:
            self.file.write(b"".join(self.buf))
            self.buf.clear()

    def close(self) -> None:
        self.file.write(b"".join(self.buf))
        self.file.close()
        self.tmp.replace(self.path)  # a run cut short leaves no half capture in the cache


def tcp_frame(  # noqa: PLR0917 - the header's fields, in the header's order
    inbound: bool,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    win: int,
    ttl: int,
    opts: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    """An Ethernet frame with a TCP segment over IPv4, or IPv6 when the addresses are 16 bytes."""
    tcp = TCP.pack(sport, dport, seq, ack, (5 + len(opts) // 4) << 4, flags, win, 0, 0)
    if len(src) == 16:
        ip = IP6.pack(0x60000000, 20 + len(opts) + len(payload), 6, ttl, src, dst)
        return (ETH6_IN if inbound else ETH6_OUT) + ip + tcp + opts + payload
    ip = IP4.pack(0x45, 0, 40 + len(opts) + len(payload), seq & 0xFFFF, 0x4000, ttl, 6, 0, src, dst)
    return (ETH4_IN if inbound else ETH4_OUT) + ip + tcp + opts + payload


Packets = list[tuple[int, bytes]]  # (offset from the first SYN in microseconds, frame)


class Traffic:
    """Darknet-like connections, each as its packets; `rng` decides everything."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.handshakes = 0  # darknet connections the darknet answered: one StepStone::handshake each
        self.sources4 = [self._outside4() for _ in range(60_000)]
        self.sources6 = [
            struct.pack("!QQ", 0x2001_0DB8_0000_0000 | rng.getrandbits(32), rng.getrandbits(64))
            for _ in range(6_000)
        ]
        self.servers4 = [bytes((192, 0, 2, i)) for i in range(1, 255)]

    def _outside4(self) -> bytes:
        rng = self.rng
        while True:
            a = rng.randrange(1 << 24, 224 << 24)
            if not (0xC6120000 <= a < 0xC6140000 or a >> 24 in (10, 127)):
                return a.to_bytes(4, "big")

    def _source(self, v6: bool) -> bytes:
        pool = self.sources6 if v6 else self.sources4
        # Skewed: a few sources send most of the SYNs, as on a real darknet.
        return pool[int(len(pool) * self.rng.random() ** 3)]

    def _darknet(self, v6: bool) -> bytes:
        if v6:
            return DARKNET6.network_address.packed[:6] + self.rng.getrandbits(80).to_bytes(10, "big")
        return (0xC6120000 | self.rng.getrandbits(17)).to_bytes(4, "big")

    def _tp(self) -> int:
        """Client round trip, microseconds: 5 ms to 800 ms around 80 ms."""
        return min(800_000, max(5_000, int(self.rng.lognormvariate(11.3, 0.8))))

    def darknet(self) -> Packets:
        rng = self.rng
        v6 = rng.random() < 0.1
        tcp = tcp_frame
        src, dst = self._source(v6), self._darknet(v6)
        sport, dport = rng.randrange(1024, 65536), rng.choice(PORTS)
        cseq, sseq = rng.getrandbits(32), rng.getrandbits(32)
        kind = rng.random()
        self.handshakes += kind < 0.77
        synack_at = rng.randrange(50, 400)
        ttl = rng.randrange(30, 250)

        def synack(at: int) -> tuple[int, bytes]:
            return at, tcp(False, dst, src, dport, sport, sseq, cseq + 1, SYN | ACK, 65160, 64, LINUX_OPTS)

        def client(at: int, flags: int, payload: bytes = b"", seq: int = 1) -> tuple[int, bytes]:
            return at, tcp(
                True, src, dst, sport, dport, cseq + seq, sseq + 1, flags, 502, ttl, payload=payload
            )

        if kind < 0.55:  # stack-less scanner
            opts = MSS_OPT if rng.random() < 0.5 else b""
            syn = (0, tcp(True, src, dst, sport, dport, cseq, 0, SYN, rng.choice((1024, 65535)), ttl, opts))
            at = synack_at + self._tp()
            rst = (at, tcp(True, src, dst, sport, dport, cseq + 1, 0, RST, 0, ttl))
            return [syn, synack(synack_at), rst]
        syn = (0, tcp(True, src, dst, sport, dport, cseq, 0, SYN, 64240, ttl, LINUX_OPTS))
        if kind < 0.70:  # a stack that completes the handshake
            at = synack_at + self._tp()
            out = [syn, synack(synack_at), client(at, ACK)]
            seq = 1
            if rng.random() < 0.5:
                size = rng.randrange(20, 400)
                data = PAYLOAD[rng.randrange(4096 - size) :][:size]
                out.append(client(at + 200, PSH | ACK, data))
                out.append(
                    (at + 400, tcp(False, dst, src, dport, sport, sseq + 1, cseq + 1 + size, ACK, 509, 64))
                )
                seq += size
            if rng.random() < 0.5:
                rtt = at - synack_at
                out.append(client(at + 1000, FIN | ACK, seq=seq))
                out.append(
                    (
                        at + 1200,
                        tcp(False, dst, src, dport, sport, sseq + 1, cseq + seq + 1, FIN | ACK, 509, 64),
                    )
                )
                out.append(client(at + 1200 + rtt, ACK, seq=seq + 1))
            else:
                out.append(client(at + 1000, RST | ACK, seq=seq))
            return out
        if kind < 0.72:  # the reply comes after a retransmitted SYN+ACK
            at = 1_000_000 + synack_at + self._tp()
            return [syn, synack(synack_at), synack(1_000_000 + synack_at), client(at, RST)]
        if kind < 0.77:  # SYN+ACK never answered
            return [syn, synack(synack_at), synack(1_000_000 + synack_at), synack(3_000_000 + synack_at)]
        if rng.random() < 0.3:  # the darknet does not answer this port; the client tries again
            return [syn, (1_000_000, syn[1])]
        return [syn]

    def outside(self) -> Packets:
        """A short TCP conversation between two hosts outside the darknet."""
        rng = self.rng
        src, dst = self._source(False), rng.choice(self.servers4)
        sport, dport = rng.randrange(1024, 65536), rng.choice((443, 80, 8443))
        cseq, sseq = rng.getrandbits(32), rng.getrandbits(32)
        rtt = self._tp() // 4
        out: Packets = [
            (0, tcp_frame(False, src, dst, sport, dport, cseq, 0, SYN, 64240, 60, LINUX_OPTS)),
            (rtt, tcp_frame(True, dst, src, dport, sport, sseq, cseq + 1, SYN | ACK, 65160, 64, LINUX_OPTS)),
            (rtt + 50, tcp_frame(False, src, dst, sport, dport, cseq + 1, sseq + 1, ACK, 502, 60)),
        ]
        at, c, s = rtt + 100, 1, 1
        for _ in range(rng.randrange(1, 4)):
            ask, answer = rng.randrange(50, 300), rng.randrange(100, 1400)
            out.append(
                (
                    at,
                    tcp_frame(
                        False,
                        src,
                        dst,
                        sport,
                        dport,
                        cseq + c,
                        sseq + s,
                        PSH | ACK,
                        502,
                        60,
                        payload=PAYLOAD[:ask],
                    ),
                )
            )
            c += ask
            at += rtt
            out.append(
                (
                    at,
                    tcp_frame(
                        True,
                        dst,
                        src,
                        dport,
                        sport,
                        sseq + s,
                        cseq + c,
                        PSH | ACK,
                        509,
                        64,
                        payload=PAYLOAD[ask : ask + answer],
                    ),
                )
            )
            s += answer
            at += 100
        out.append((at, tcp_frame(False, src, dst, sport, dport, cseq + c, sseq + s, FIN | ACK, 502, 60)))
        out.append(
            (at + rtt, tcp_frame(True, dst, src, dport, sport, sseq + s, cseq + c + 1, FIN | ACK, 509, 64))
        )
        out.append((
            at + rtt + 50,
            tcp_frame(False, src, dst, sport, dport, cseq + c + 1, sseq + s + 1, ACK, 502, 60),
        ))
        return out

    def flood(self) -> Packets:
        """One SYN from a fresh random source; half get a SYN+ACK (retransmitted), none a reply."""
        rng = self.rng
        src, dst = self._outside4(), self._darknet(False)
        sport, dport = rng.randrange(1024, 65536), rng.choice(PORTS)
        cseq, sseq = rng.getrandbits(32), rng.getrandbits(32)
        out = [(0, tcp_frame(True, src, dst, sport, dport, cseq, 0, SYN, 1024, rng.randrange(30, 250)))]
        if rng.random() < 0.5:
            self.handshakes += 1
            for at in (100, 1_000_100, 3_000_100):
                out.append(
                    (
                        at,
                        tcp_frame(
                            False, dst, src, dport, sport, sseq, cseq + 1, SYN | ACK, 65160, 64, LINUX_OPTS
                        ),
                    )
                )
        return out


def udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    ip = IP4.pack(0x45, 0, 28 + len(payload), 0, 0x4000, 64, 17, 0, src, dst)
    return ETH4_OUT + ip + UDP.pack(sport, dport, 8 + len(payload), 0) + payload


def write_capture(  # noqa: PLR0917
    path: Path, count: int, rate: float, make: Callable[[], Packets], rng: random.Random, tail: int = 0
) -> int:
    """`count` connections starting at `rate` per second (Poisson), merged in time order, then
    `tail` seconds of an unrelated UDP packet every 10 ms: trace time moves on, so that the timers
    of the last connections fire (Zeek runs at most max_timer_expires = 300 timers per packet)."""
    pcap = Pcap(path)
    pending: list[tuple[int, int, bytes]] = []  # heap of (time, tie-break, frame)
    order = 0
    t = START_US
    for _ in range(count):
        t += int(rng.expovariate(rate) * 1e6) + 1
        while pending and pending[0][0] <= t:
            at, _, frame = heapq.heappop(pending)
            pcap.write(at, frame)
        for offset, frame in make():
            order += 1
            heapq.heappush(pending, (t + offset, order, frame))
    tick = udp4(bytes((192, 0, 2, 1)), bytes((192, 0, 2, 2)), 5000, 5001, b"tick")
    for n in range(1, tail * 100 + 1):
        order += 1
        heapq.heappush(pending, (t + n * 10_000, order, tick))
    while pending:
        at, _, frame = heapq.heappop(pending)
        pcap.write(at, frame)
    pcap.close()
    return pcap.packets


@dataclass
class Capture:
    path: Path
    packets: int
    connections: int
    handshakes: int  # connections the darknet answered (the package publishes one event each)
    seconds: float  # of trace time


def write(path: Path, name: str, count: int, rate: float, seed: int, tail: int) -> tuple[int, int]:  # noqa: PLR0917
    """Writes the capture `name` ("darknet" or "flood"); returns its packets and handshakes."""
    rng = random.Random(f"{name}/{seed}")
    traffic = Traffic(rng)
    if name == "flood":
        make = traffic.flood
    else:

        def make() -> Packets:
            return traffic.outside() if rng.random() < 0.10 else traffic.darknet()

    return write_capture(path, count, rate, make, rng, tail), traffic.handshakes


def capture(cache: Path, name: str, count: int, rate: float, seed: int, tail: int = 0) -> Capture:  # noqa: PLR0917
    """The capture `name`, from `cache` or written there first."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-g{GENERATOR}-n{count}-r{rate:g}-s{seed}-t{tail}.pcap"
    meta = path.with_suffix(".packets")
    if not (path.exists() and meta.exists()):
        began = time.perf_counter()
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        packets, handshakes = write(path, name, count, rate, seed, tail)
        meta.write_text(f"{packets} {handshakes}\n")
        print(f"  {packets} packets in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    packets, handshakes = (int(n) for n in meta.read_text().split())
    return Capture(path, packets, count, handshakes, count / rate + tail)


@dataclass
class Run:
    wall: float
    cpu: float
    rss_mb: float
    stdout: str


def run_zeek(zeek: str, args: list[str], workdir: Path) -> Run:
    """One `zeek` process in a fresh directory (its logs are written and thrown away)."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    out, err = workdir / "stdout", workdir / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        began = time.perf_counter()
        proc = subprocess.Popen([zeek, *args], cwd=workdir, stdout=o, stderr=e)
        # wait4: the rusage of this one child (RUSAGE_CHILDREN would keep the largest RSS so far).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(
            f"zeek_overhead: {zeek} {' '.join(args)} exited {proc.returncode}: "
            f"{err.read_text(errors='replace').strip()[-500:]}"
        )
    text = out.read_text(errors="replace")
    shutil.rmtree(workdir, ignore_errors=True)
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text)


def best(runs: list[Run]) -> Run:
    return Run(
        min(r.wall for r in runs), min(r.cpu for r in runs), min(r.rss_mb for r in runs), runs[-1].stdout
    )


SITE = """\
# Written by bench/zeek_overhead.py: the capture's darknet, no WebSocket listener.
redef StepStone::darknet_subnets = {{ {v4}, [{v6}]/{v6len} }};
redef StepStone::websocket_port = 0/tcp;
"""

SAMPLER = """\
# Written by bench/zeek_overhead.py: |StepStone::tracks| and Zeek's own open
# connections every 10 s of trace time.
global stepstone_bench_max = 0;
global stepstone_bench_last = 0;
global stepstone_bench_conns = 0;
global stepstone_bench_at: time;

event stepstone_bench_sample()
	{
	if ( zeek_is_terminating() )
		return;
	stepstone_bench_last = |StepStone::tracks|;
	stepstone_bench_conns = get_conn_stats()$current_conns;
	stepstone_bench_at = network_time();
	if ( stepstone_bench_last > stepstone_bench_max )
		stepstone_bench_max = stepstone_bench_last;
	schedule 10sec { stepstone_bench_sample() };
	}

event network_time_init()
	{
	schedule 10sec { stepstone_bench_sample() };
	}

event zeek_done()
	{
	print fmt("%d %d %d %.0f", stepstone_bench_max, stepstone_bench_last,
		stepstone_bench_conns, time_to_double(stepstone_bench_at));
	}
"""


def measure(  # noqa: PLR0917
    zeek: str, cap: Capture, alone: list[str], package: list[str], runs: int, work: Path
) -> tuple[Run, Run]:
    """Best of `runs` of Zeek alone and with the package, run in turns: a shared machine's load
    then weighs on both alike."""
    runs_alone: list[Run] = []
    runs_pkg: list[Run] = []
    for _ in range(runs):
        runs_alone.append(run_zeek(zeek, ["-C", "-r", str(cap.path), *alone], work))
        runs_pkg.append(run_zeek(zeek, ["-C", "-r", str(cap.path), *package], work))
    return best(runs_alone), best(runs_pkg)


def row(label: str, r: Run) -> str:
    return f"  {label:<22} {r.wall:9.2f} {r.cpu:9.2f} {r.rss_mb:9.0f}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--zeek", default=shutil.which("zeek"), help="zeek binary (default: zeek on PATH)")
    add("--runs", type=int, default=3, help="runs of each measure; the best counts")
    add("--connections", type=int, default=800_000, help="connections in the capture")
    add("--rate", type=float, default=2000.0, help="new connections per second of trace")
    add("--flood-syns", type=int, default=1_000_000, help="SYNs in the flood capture")
    add("--flood-rate", type=float, default=2000.0, help="flood SYNs per second of trace")
    add("--flood-tail", type=int, default=50, help="quiet seconds of trace after the flood")
    add("--no-flood", action="store_true", help="skip the flood")
    add("--write-flood", type=Path, metavar="PCAP", help="only write the flood capture to PCAP")
    add("--local", action="store_true", help="load site/local.zeek in both runs")
    add("--seed", type=int, default=1)
    add("--cache", type=Path, default=Path(tempfile.gettempdir()) / "stepstone-zeek-bench")
    return parser.parse_args(argv)


def report(args: argparse.Namespace, version: str, dark: Capture, alone: Run, pkg: Run) -> None:
    baseline = "base scripts + site/local.zeek" if args.local else "its default (base) scripts"
    print(f"{version}: Zeek with {baseline}; best of {args.runs} runs; zeek-scripts/ without a listener")
    print(
        f"capture: {dark.packets} packets, {dark.connections} connections, {dark.handshakes} darknet "
        f"handshakes, {dark.seconds:.0f} s of trace"
    )
    print(f"  {'':<22} {'wall s':>9} {'CPU s':>9} {'peak MB':>9}")
    print(row("Zeek alone", alone))
    print(row("with the package", pkg))
    cpu = (pkg.cpu / alone.cpu - 1) * 100
    wall = (pkg.wall / alone.wall - 1) * 100
    verdict = "met" if cpu <= GOAL else "NOT met"
    print(
        f"  overhead: CPU {cpu:+.1f} %, wall {wall:+.1f} %, peak memory {pkg.rss_mb - alone.rss_mb:+.0f} MB; "
        f"goal <= {GOAL:.0f} % CPU: {verdict}"
    )


def report_flood(args: argparse.Namespace, flood: Capture, alone: Run, pkg: Run) -> None:
    largest, last, conns, at = (int(n) for n in pkg.stdout.split())
    after = at - START_US / 1e6 - flood.connections / args.flood_rate
    print(
        f"flood: {flood.packets} packets, {flood.connections} SYNs from random sources at "
        f"{args.flood_rate:g}/s ({flood.handshakes} answered by the darknet, none by the client), "
        f"{flood.seconds:.0f} s of trace"
    )
    print(row("Zeek alone", alone))
    print(row("with the package", pkg))
    print(
        f"  package memory {pkg.rss_mb - alone.rss_mb:+.0f} MB; |StepStone::tracks| every 10 s: "
        f"largest {largest} (SYNs in one reply_wait of 30 s: {args.flood_rate * 30:.0f}), "
        f"last {last} (about {after:.0f} s after the flood; Zeek's own open connections then: {conns})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if min(args.runs, args.connections, args.flood_syns) < 1 or min(args.rate, args.flood_rate) <= 0:
        print(
            "zeek_overhead: --runs, --connections, --flood-syns and the rates must be positive",
            file=sys.stderr,
        )
        return 2
    if args.flood_tail < 0:
        print("zeek_overhead: --flood-tail must not be negative", file=sys.stderr)
        return 2
    if args.write_flood:
        packets, _ = write(
            args.write_flood, "flood", args.flood_syns, args.flood_rate, args.seed, args.flood_tail
        )
        print(f"{args.write_flood}: {packets} packets, {args.flood_syns} SYNs", file=sys.stderr)
        return 0
    if not args.zeek or not Path(args.zeek).is_file() or not os.access(args.zeek, os.X_OK):
        print(
            f"zeek_overhead: no zeek binary ({args.zeek or 'none on PATH'}); use --zeek PATH", file=sys.stderr
        )
        return 2
    zeek = str(Path(args.zeek).resolve())
    version = subprocess.run([zeek, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    args.cache.mkdir(parents=True, exist_ok=True)
    site = args.cache / "bench-site.zeek"
    site.write_text(SITE.format(v4=DARKNET4, v6=DARKNET6.network_address, v6len=DARKNET6.prefixlen))
    sampler = args.cache / "bench-tracks.zeek"
    sampler.write_text(SAMPLER)
    base = ["local"] if args.local else []
    package = [*base, str(PACKAGE), str(site)]
    work = args.cache / f"run-{os.getpid()}"

    dark = capture(args.cache, "darknet", args.connections, args.rate, args.seed)
    print(f"measuring {version} on {dark.path.name}, best of {args.runs} ...", file=sys.stderr, flush=True)
    alone, pkg = measure(zeek, dark, base, package, args.runs, work)
    report(args, version, dark, alone, pkg)
    if not args.no_flood:
        flood = capture(args.cache, "flood", args.flood_syns, args.flood_rate, args.seed, args.flood_tail)
        print(
            f"measuring {version} on {flood.path.name}, best of {args.runs} ...", file=sys.stderr, flush=True
        )
        flood_alone, flood_pkg = measure(zeek, flood, base, [*package, str(sampler)], args.runs, work)
        report_flood(args, flood, flood_alone, flood_pkg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
