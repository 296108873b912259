"""Bench: `stepstone-analyzer report` on a synthetic file of measurement records. Prints the wall
time and the peak memory (max RSS) of the command.

Goal (issue 12): a million records give a report in bounded memory. The file is written to a
temporary directory: --sources sources over one day, most of them direct scanners (T^p about the
ping RTT, a little jitter), one in fifty a NAT relay (T^p 10-60 ms above), one in a hundred with
an OS mismatch, one in ten dropping ICMP (the SYN RTT is the reference), a few real p0f labels.

    python bench/report_bench.py [--records N] [--sources S] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["unix:Linux:3.11 and newer", "win:Windows:7 or 8", "unix:FreeBSD:9.x or newer",
          "unix:Mac OS X:10.x", "unix:Linux:2.2.x-3.x"]  # p0f labels: class:name:flavor
START = 1_714_000_000.0


def write_synthetic(path: Path, records: int, sources: int, seed: int = 1) -> None:
    """`records` JSON lines over `sources` sources (module docstring); deterministic for a seed."""
    rng = random.Random(seed)
    hosts = []
    for i in range(sources):
        src = f"{10 + i // 65536 % 200}.{i // 256 % 256}.{i % 256}.{1 + i % 250}"
        rtt = rng.uniform(5_000, 150_000)
        extra = rng.uniform(10_000, 60_000) if i % 50 == 7 else 0.0
        fp = LABELS[i % len(LABELS)]
        fa = LABELS[(i + 1) % len(LABELS)] if i % 100 == 3 else fp
        hosts.append((src, rtt, extra, fp, fa, i % 10 == 5))
    with open(path, "w") as f:
        lines = []
        for n in range(records):
            src, rtt, extra, fp, fa, no_icmp = hosts[n % sources] if n < sources else rng.choice(hosts)
            t = START + 86400.0 * n / records
            jitter = rng.uniform(0, 2_000)
            tp = round(rtt + extra + jitter)
            ping = round(rtt + rng.uniform(500, 3_000))  # the max of a few pings: above most T^p
            if no_icmp:
                probe = f'"ping_min_us":null,"ping_avg_us":null,"ping_max_us":null,"ping_var_us2":null,' \
                        f'"syn_rtt_us":{round(rtt + rng.uniform(0, 1_000))}'
            else:
                probe = f'"ping_min_us":{ping - 500},"ping_avg_us":{ping - 200},"ping_max_us":{ping},' \
                        f'"ping_var_us2":40000.0,"syn_rtt_us":null'
            lines.append(f'{{"t":{t:.6f},"src":"{src}","dst":"192.0.2.{n % 250 + 1}","tp_us":{tp},{probe},'
                         f'"fp":{json.dumps(fp)},"fa":{json.dumps(fa)}}}\n')
            if len(lines) >= 10_000:
                f.writelines(lines)
                lines = []
        f.writelines(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--sources", type=int, default=20_000)
    ap.add_argument("--keep", type=Path, help="write the records file and the report here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        records = folder / "records.jsonl"
        t0 = time.monotonic()
        write_synthetic(records, args.records, args.sources)
        size = records.stat().st_size
        print(f"wrote {args.records} records ({size / 1e6:.0f} MB) from {args.sources} sources "
              f"in {time.monotonic() - t0:.1f} s")
        out = folder / "report.html"
        t0 = time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "analyzer.cli", "report", str(records), "-o", str(out)],
                              capture_output=True, text=True, check=False)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time as well as wall: on a shared machine the wall time says more about the others.
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            print(f"report failed (exit {proc.returncode})")
            return 1
        print(f"report: {wall:.1f} s wall, {cpu:.1f} s CPU, {args.records / wall:,.0f} records/s, peak RSS "
              f"{after.ru_maxrss / 1024:.0f} MB, page {out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
