"""Fingerprinting speed: `stepstone-analyzer fingerprint` against the original `p0f -r` on one file.

Writes (to a temporary directory) a pcap of N SYNs (default 100,000) drawn from about 200 distinct
p0f signatures -- every SYN signature of the stock database in IPv4 and, where allowed, IPv6, at a
few TTLs -- with varying addresses, ports, sequence numbers and IP IDs like a darknet's scanners.
Then times, on that same file and database (the project's, `osfp/data/stepstone.fp`):
  - `stepstone-analyzer fingerprint FILE > /dev/null` (the whole command: reading, fingerprinting,
    JSON output; interpreter start included), if installed;
  - `p0f -r FILE -o LOG -f DB > /dev/null`;
  - `Fingerprinter.fingerprint()` alone over the packets in memory, and pyp0f's uncached
    `fingerprint_tcp` on a sample (what a scapy packet per SYN costs).
Prints packets/s for each and the ratio ours / p0f (goal: >= 0.5). Noisy on a shared machine:
run it twice.

    python bench/fingerprint_bench.py [--packets 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from osfp import Fingerprinter, default_database_path, stock_database_path
from osfp.craft import Shape, build, from_signature, write_pcap
from osfp.database import load
from osfp.reference import p0f_binary


def distinct_shapes(target: int = 200) -> list[Shape]:
    shapes: list[Shape] = []
    for sig in load(stock_database_path()).syn:
        for ip_ver in (4, 6) if sig.ip_ver == -1 else (sig.ip_ver,):
            shapes.append(from_signature(sig.raw, ip_ver=ip_ver))
    extra = [replace(s, ttl=max(1, s.ttl - 10)) for s in shapes]
    random.Random(7).shuffle(extra)
    return (shapes + extra)[:target]


def make_packets(count: int, shapes: list[Shape]) -> list[bytes]:
    rng = random.Random(42)
    # Real darknet traffic is skewed: a few scanner stacks send most SYNs.
    weights = [1.0 / (rank + 1) for rank in range(len(shapes))]
    picks = rng.choices(range(len(shapes)), weights=weights, k=count)
    packets = []
    for i, pick in enumerate(picks):
        shape = shapes[pick]
        if shape.ip_ver == 4:
            src = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            dst = f"198.51.{100 + i % 2}.{rng.randrange(1, 255)}"
        else:
            src = f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}"
            dst = f"2001:db8:ffff::{rng.randrange(1, 65536):x}"
        packets.append(
            build(
                shape,
                src=src,
                dst=dst,
                sport=rng.randrange(1024, 65536),
                dport=rng.choice((22, 23, 80, 443, 445, 3389, 8080)),
                seq=rng.randrange(1, 2**32),
                ip_id=rng.randrange(1, 65536),
            )
        )
    return packets


def timed(args: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="write the pcap here and keep it")
    args = parser.parse_args()

    shapes = distinct_shapes()
    t0 = time.perf_counter()
    packets = make_packets(args.packets, shapes)
    db = default_database_path()
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        pcap = (args.keep or Path(tmp)) / "syns.pcap"
        pcap.parent.mkdir(parents=True, exist_ok=True)
        write_pcap(pcap, ((1_700_000_000 + i * 1e-5, p) for i, p in enumerate(packets)))
        n = len(packets)
        print(
            f"capture: {n} SYNs, {len(shapes)} distinct signatures, {pcap.stat().st_size / 1e6:.1f} MB "
            f"(made in {time.perf_counter() - t0:.1f} s); database {db.name}"
        )

        rates: dict[str, float] = {}
        fp = Fingerprinter(db)
        start = time.perf_counter()
        for p in packets:
            fp.fingerprint(p)
        rates["Fingerprinter alone (in memory)"] = n / (time.perf_counter() - start)
        print(f"  cache: {fp.misses} misses, {fp.hits} hits")

        sample = packets[:2000]
        try:
            from pyp0f.database import DATABASE
            from pyp0f.fingerprint import fingerprint_tcp
            from scapy.layers.inet import IP
            from scapy.layers.inet6 import IPv6

            DATABASE.load(stock_database_path())
            start = time.perf_counter()
            for p in sample:
                fingerprint_tcp(IP(p) if p[0] >> 4 == 4 else IPv6(p))
            rates["pyp0f uncached (2,000 sample)"] = len(sample) / (time.perf_counter() - start)
        except ImportError as exc:
            print(f"  pyp0f: skipped ({exc})")

        analyzer = shutil.which("stepstone-analyzer") or str(
            Path(sys.executable).with_name("stepstone-analyzer")
        )
        if Path(analyzer).exists():
            elapsed = timed([analyzer, "fingerprint", str(pcap), "--p0f-db", str(db)])
            rates["stepstone-analyzer fingerprint"] = n / elapsed
        else:
            print("  stepstone-analyzer: not installed; comparing Fingerprinter alone")

        binary = p0f_binary()
        if binary:
            log = Path(tmp) / "p0f.log"
            lf_db = Path(tmp) / "p0f.fp"
            lf_db.write_bytes(db.read_bytes().replace(b"\r\n", b"\n"))
            elapsed = timed([binary, "-r", str(pcap), "-o", str(log), "-f", str(lf_db)])
            rates["p0f -r (C, 3.09b)"] = n / elapsed
        else:
            print("  p0f: not installed")

        for name, rate in rates.items():
            print(f"  {name:38s} {rate:12,.0f} packets/s")
        ours = rates.get("stepstone-analyzer fingerprint", rates["Fingerprinter alone (in memory)"])
        if "p0f -r (C, 3.09b)" in rates:
            ratio = ours / rates["p0f -r (C, 3.09b)"]
            print(f"  ratio ours / p0f: {ratio:.2f} (goal >= 0.5): {'met' if ratio >= 0.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
