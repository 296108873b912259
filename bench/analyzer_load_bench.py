"""One `stepstone-analyzer run --handshakes` under a darknet's load: what each handshake costs.

A private redis-server per point; the real analyzer as a subprocess (its RSS and CPU time are
read from /proc); the instant prober of bench/service_bench.py (answers every job at once, no
network); bench/darknet_load.py writes the heavy-tailed mix. Every point prints:

  handshakes/s   handshakes the analyzers' group acknowledged per second of the run (the feed is
                 held to --backlog entries ahead of the analyzer, so at --rate 0 this is the
                 analyzer's capacity); measured fully or only counted (--sample-per-source)
  hs/cpu-s       handshakes per second of the analyzer's own CPU time (robust on a shared machine)
  rec/s          records.log lines per second (the measured handshakes: answered, sampled)
  verdicts/s     stepstone.log lines per second (one per source's verdict change or refresh)
  trips/hs       Redis read events (INFO stats total_reads_processed: about one per round trip)
                 per handshake, the load's and the prober's own subtracted
  cmds/hs        commands Redis executed (INFO commandstats, commands inside Lua included) per
                 handshake, the load's and the prober's own subtracted
  bytes/hs       total_net_input_bytes + total_net_output_bytes per handshake (everything; the
                 load's own XADD bytes are printed apart)
  mem/src, mem/hs  used_memory split by key family (SCAN + MEMORY USAGE samples): the families
                 kept per source (src:, probe:, job:, outcome:, cnt:, seen:) per source seen, and hs: per
                 measured handshake (each is kept two minutes after its verdict)
  RSS            the analyzer's peak resident memory (VmHWM)
  p50/p95        SYN-to-verdict of the measured handshakes (verdict_at - t, records.log), under
                 the backlog bound

Curves: against the number of sources (heavy-tailed mix) and against handshakes per source (every
source sends exactly N). Each point stops after --seconds of feeding or --max-handshakes, then
waits at most --seconds for the analyzer to finish what was fed.

--drain N: the wall-clock rate without the generator on the same cores. The load runs live for
--warmup S (the sources' cnt:, seen: and windows are those of a probe period in progress), then
the analyzers are stopped (SIGSTOP), N more handshakes of the same load are written (pipelined,
not timed; Redis's CPU for those XADDs is printed apart as `xadd us`), the analyzers resume
(SIGCONT) and the point times them from then until every handshake is acknowledged, every probe
job answered by the instant prober and every result settled: a measured handshake waiting on its
probe closes inside the timing. It prints per point: the drain's wall seconds (and to the last
handshake acknowledged), hs/s in all and per analyzer process, hs per analyzer CPU-s, each
analyzer's share of a core, the share measured (records.log lines / N; the rest only counted),
Redis CPU per handshake while draining and its share of a core, the benchmark's own (prober and
polling). No SYN-to-verdict latency (the backlog was stamped when written). A stream entry is
~211 B in Redis: N = 1M is ~0.2 GB plus the warm-up's.

    python bench/analyzer_load_bench.py --curve sources --points 1000,10000,100000,1000000
    python bench/analyzer_load_bench.py --curve per-source --points 1,10,100,1000,10000,100000
    python bench/analyzer_load_bench.py --curve sources --points 10000 --profile /tmp/prof
    python bench/analyzer_load_bench.py --points 10000,100000,1000000 --warmup 60 --drain 300000 \
        --analyzers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from darknet_load import DarknetLoad, add_load_args, mix_from_args, write
from service_bench import prober

from lab.redis import RedisServer

ROOT = Path(__file__).resolve().parents[1]
P = "stepstone:"
SAMPLE_KEYS = 200  # MEMORY USAGE calls per key family


def _die_with_parent() -> None:
    # The analyzer must not outlive a benchmark killed with SIGKILL (PR_SET_PDEATHSIG = 1).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Counting:
    """The instant prober's Redis client, counting its own round trips and commands so the
    analyzer's can be told apart in Redis's totals."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.trips = 0
        self.commands = 0
        self.results = 0
        self.start = "0"
        self.jobs_before = 0

    async def xread(self, streams: dict[str, str], *args: Any, **kwargs: Any) -> Any:
        self.trips += 1
        self.commands += 1
        # After a warm-up: jobs from `start` on (the warm-up's own prober answered the rest).
        return await self.r.xread({k: self.start if v == "0" else v for k, v in streams.items()}, *args,
                                  **kwargs)

    def pipeline(self, **kwargs: Any) -> _CountingPipe:
        return _CountingPipe(self, self.r.pipeline(**kwargs))


class _CountingPipe:
    def __init__(self, owner: Counting, pipe: Any) -> None:
        self.owner = owner
        self.pipe = pipe

    async def __aenter__(self) -> _CountingPipe:
        await self.pipe.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pipe.__aexit__(*exc)

    def xadd(self, *args: Any, **kwargs: Any) -> None:
        self.owner.commands += 1
        self.owner.results += 1
        self.pipe.xadd(*args, **kwargs)

    async def execute(self) -> Any:
        self.owner.trips += 1
        return await self.pipe.execute()


class LineCounter:
    """Lines of a growing file, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            cut = data.rfind(b"\n") + 1
            self.lines += data.count(b"\n", 0, cut)
            self.offset += cut
        return self.lines


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


async def redis_info(r: aioredis.Redis) -> dict[str, Any]:
    info = await r.info("all")
    cmds = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}
    return {"reads": int(info["total_reads_processed"]),
            "bytes": int(info["total_net_input_bytes"]) + int(info["total_net_output_bytes"]),
            "memory": int(info["used_memory"]), "commands": cmds}


async def census(r: aioredis.Redis) -> dict[str, dict[str, float]]:
    """Keys under the prefix by family (the text after the prefix up to ':'): count, and bytes
    estimated from MEMORY USAGE of up to SAMPLE_KEYS of them."""
    counts: Counter[str] = Counter()
    samples: dict[str, list[str]] = defaultdict(list)
    async for key in r.scan_iter(match=P + "*", count=2000):
        family = key.removeprefix(P).split(":", 1)[0]
        counts[family] += 1
        if len(samples[family]) < SAMPLE_KEYS:
            samples[family].append(key)
    out = {}
    for family, n in counts.items():
        sizes = [await r.memory_usage(k, samples=0) or 0 for k in samples[family]]
        each = statistics.fmean(sizes) if sizes else 0.0
        out[family] = {"keys": n, "bytes_each": each, "bytes": each * n}
    return out


def start_analyzer(url: str, log_dir: Path, extra: list[str], consumer: str) -> subprocess.Popen[bytes]:
    err = open(log_dir.parent / f"{consumer}.stderr", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "analyzer.cli", "run", "--redis", url, "--handshakes",
         "--log-dir", str(log_dir), "--consumer", consumer, *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads in this process)
    )
    err.close()
    return proc


def start_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the analyzer (raw collapsed stacks; `--nonblocking`: it never pauses it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "50", "--nonblocking",
                             "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_latencies(path: Path) -> list[float]:
    """SYN-to-verdict of every line of records.log, sorted."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            x = json.loads(line)
            out.append(x["verdict_at"] - x["t"])
    return sorted(out)


def print_stderr_tails(folder: Path) -> None:
    for err in sorted(folder.glob("*.stderr")):
        for line in err.read_text(errors="replace").splitlines()[-5:]:
            print(f"[{err.stem}] {line}", file=sys.stderr)


def append_json(path: Path, x: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(x) + "\n")


def summarize_profile(path: Path, top: int = 25) -> list[tuple[str, float, float]]:
    """(function, inclusive share, self share) from py-spy's raw collapsed stacks, by inclusive.
    Line numbers are dropped so a function counts once per stack."""
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        for name in set(frames):
            incl[name] += n
        own[frames[-1]] += n
    return [(name, n / total, own[name] / total) for name, n in incl.most_common(top)] if total else []


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for(cond: Any, limit: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + limit
    while not await cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the analyzer exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling a condition with a deadline


async def point(args: argparse.Namespace, sources: int, per_source: int | None) -> dict[str, Any]:
    setup = time.monotonic()
    darknet = ipaddress.ip_network(args.darknet, strict=False)
    load = DarknetLoad(darknet, sources, mix_from_args(args), seed=args.seed, per_source=per_source)
    setup = time.monotonic() - setup

    async def warm_room(n: int) -> None:
        groups = {g["name"]: g for g in await r.xinfo_groups(P + "handshakes")}
        g = groups.get("analyzers") or {}
        while int(g.get("lag") or 0) + int(g.get("pending") or 0) + n > args.backlog:
            await asyncio.sleep(0.005)
            groups = {g["name"]: g for g in await r.xinfo_groups(P + "handshakes")}
            g = groups.get("analyzers") or {}
    count = args.max_handshakes if per_source is None else min(args.max_handshakes, sources * per_source)
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="stepstone-load-") as tmp:
        dirs = [Path(tmp) / f"logs{i}" for i in range(args.analyzers)]
        r = aioredis.from_url(server.url, decode_responses=True)
        procs = []
        for i, d in enumerate(dirs):
            d.mkdir()
            procs.append(start_analyzer(server.url, d, args.analyzer_args.split(), f"bench{i}"))
        proc = procs[0]
        spy: subprocess.Popen[bytes] | None = None
        stop = asyncio.Event()
        prober_task: asyncio.Task[None] | None = None
        done_hs = sent = 0
        try:
            async def ready() -> bool:
                with contextlib.suppress(Exception):
                    return any(g["name"] == "analyzers" for g in await r.xinfo_groups(P + "handshakes"))
                return False

            for p in procs:
                await wait_for(ready, 60, "the analyzer's consumer group", p)
            if args.warmup:
                # The same load for --warmup seconds first, not measured: the busy sources have
                # had their first --sample-per-source handshakes measured, as later in a probe
                # period; the point then measures the steady state, not the start.
                warm_counting = Counting(aioredis.from_url(server.url, decode_responses=True))
                warm_prober = asyncio.create_task(prober(warm_counting, stop))  # type: ignore[arg-type]
                warm = await write(r, P + "handshakes", load, count=None, duration=args.warmup,
                                   rate=args.rate, batch=args.batch, room=warm_room)
                warm_sent = int(warm["handshakes"])

                async def warm_drained() -> bool:
                    groups = {g["name"]: g for g in await r.xinfo_groups(P + "handshakes")}
                    g = groups["analyzers"]
                    if int(g.get("lag") or 0) + int(g.get("pending") or 0):
                        return False
                    # ... and every job of the warm-up answered and its result settled, so the
                    # point starts with nothing of the warm-up in flight.
                    if warm_counting.results < await r.xlen(P + "jobs"):
                        return False
                    groups = {g["name"]: g for g in await r.xinfo_groups(P + "results")}
                    g = groups.get("analyzers") or {}
                    return int(g.get("lag") or 0) + int(g.get("pending") or 0) == 0

                await wait_for(warm_drained, 120, "the analyzer to finish the warm-up", proc)
                stop.set()
                await warm_prober
                stop.clear()
                print(f"  warm-up: {warm_sent:,} handshakes in {args.warmup:.0f}s", file=sys.stderr)
            handshakes_of: list[str] = []
            real = load.handshake

            def remembered(i: int, now: float) -> Any:
                h = real(i, now)
                handshakes_of.append(h.src)
                return h

            load.handshake = remembered  # type: ignore[method-assign]
            drain_write: dict[str, float] = {}
            if args.drain:
                # The analyzers (and so their instant prober, which only answers their jobs) stop
                # where the warm-up left them; the next --drain handshakes of the same load go in
                # while nothing reads them. Not timed: the generator's CPU is not the analyzer's.
                for p in procs:
                    os.kill(p.pid, signal.SIGSTOP)
                assert server.proc is not None
                w_cpu0, w_reads0 = proc_cpu(server.proc.pid), (await redis_info(r))["reads"]
                wrote = await write(r, P + "handshakes", load, count=args.drain, duration=None, rate=0.0,
                                    batch=args.drain_batch)
                drain_write = {"redis_cpu": proc_cpu(server.proc.pid) - w_cpu0, "seconds": wrote["seconds"],
                               "reads": (await redis_info(r))["reads"] - w_reads0 - 1}
                count, fed0 = 0, wrote
            if args.profile:
                name = f"sources{sources}" if per_source is None else f"per{per_source}"
                spy = start_spy(proc.pid, Path(args.profile) / f"{name}.txt")
            before = await redis_info(r)
            cpu0 = sum(proc_cpu(p.pid) for p in procs)
            assert server.proc is not None
            redis_cpu0, own_cpu0 = proc_cpu(server.proc.pid), time.process_time()
            rec_lines = [LineCounter(d / "records.log") for d in dirs]
            v_lines = [LineCounter(d / "stepstone.log") for d in dirs]

            base = (sum(c.count() for c in rec_lines), sum(c.count() for c in v_lines))  # the warm-up's

            def logged() -> tuple[int, int]:
                return (sum(c.count() for c in rec_lines) - base[0],
                        sum(c.count() for c in v_lines) - base[1])

            async def backlog(stream: str) -> int:
                """Entries of `stream` the analyzers' group has not acknowledged yet."""
                groups = await r.xinfo_groups(P + stream)
                group = next((g for g in groups if g["name"] == "analyzers"), None)
                return 0 if group is None else int(group.get("lag") or 0) + int(group.get("pending") or 0)
            counting = Counting(aioredis.from_url(server.url, decode_responses=True))
            if args.warmup:
                newest = await r.xrevrange(P + "jobs", count=1)
                counting.start = newest[0][0] if newest else "0"
                counting.jobs_before = await r.xlen(P + "jobs")
            prober_task = asyncio.create_task(prober(counting, stop))  # type: ignore[arg-type]
            own = {"trips": 0, "commands": 0}

            async def room(n: int) -> None:
                # Hold the feed to --backlog entries ahead of the analyzer (one XINFO per batch).
                while True:
                    own["trips"] += 1
                    own["commands"] += 1
                    groups = await r.xinfo_groups(P + "handshakes")
                    group = next(g for g in groups if g["name"] == "analyzers")
                    if int(group.get("lag") or 0) + int(group.get("pending") or 0) + n <= args.backlog:
                        return
                    for p in procs:
                        if p.poll() is not None:
                            raise RuntimeError(f"an analyzer exited ({p.returncode})")
                    await asyncio.sleep(0.005)

            acked_at: float | None = None
            if args.drain:
                # The backlog is already in the stream: time the analyzers from SIGCONT to the last
                # handshake acknowledged, job answered and result settled (the measured path's
                # probe round trip included: a measured handshake closes when its result does).
                fed = {"handshakes": 0, "round_trips": 0, "bytes": 0}
                sent = int(fed0["handshakes"])
                start = time.monotonic()
                for p in procs:
                    os.kill(p.pid, signal.SIGCONT)
                fed_at = 0.0
            else:
                start = time.monotonic()
                fed = await write(r, P + "handshakes", load, count=count, duration=args.seconds,
                                  rate=args.rate, batch=args.batch, room=room)
                fed_at = time.monotonic() - start
                sent = int(fed["handshakes"])

            async def drained() -> bool:
                # Every handshake acknowledged, every job answered, every result acknowledged.
                nonlocal acked_at
                if await backlog("handshakes"):
                    return False
                if acked_at is None:
                    acked_at = time.monotonic() - start
                if counting.results < await r.xlen(P + "jobs") - counting.jobs_before:
                    return False
                return not await backlog("results")

            with contextlib.suppress(RuntimeError):
                await wait_for(drained, args.drain_timeout if args.drain else args.seconds,
                               "the analyzer to finish the feed", proc)
            elapsed = time.monotonic() - start
            cpu = sum(proc_cpu(p.pid) for p in procs) - cpu0
            redis_cpu, own_cpu = proc_cpu(server.proc.pid) - redis_cpu0, time.process_time() - own_cpu0
            mem = {"VmHWM": max(proc_mem(p.pid).get("VmHWM", 0) for p in procs)}
            done_hs = sent - await backlog("handshakes")
            stop.set()
            await prober_task
            prober_task = None
            after = await redis_info(r)
            keys = await census(r)
            done_rec, done_v = logged()
        finally:
            stop.set()
            for p in procs:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGCONT)  # a --drain point cut off while they were stopped
            if prober_task is not None:
                prober_task.cancel()
                with contextlib.suppress(BaseException):
                    await prober_task
            if spy is not None:
                stop_process(spy, signal.SIGINT)
            for p in procs:
                stop_process(p)
            if done_hs < sent:
                # A point that did not finish: say what the analyzers said (their stderr).
                print_stderr_tails(Path(tmp))
            await r.aclose()
        # --drain: every handshake of the backlog was stamped when written, not when read: no latency.
        latencies = [] if args.drain else sorted(x for d in dirs for x in read_latencies(d / "records.log"))
    cmds = {k: after["commands"].get(k, 0) - before["commands"].get(k, 0) for k in after["commands"]}
    # Subtract what this benchmark sent itself: the load's XADDs, its XINFOs, the prober's work,
    # the INFO calls (and the census after `after`, not counted).
    theirs = fed["handshakes"] + own["commands"] + counting.commands + 1
    trips = after["reads"] - before["reads"] - fed["round_trips"] - own["trips"] - counting.trips - 1
    seen = Counter(handshakes_of[:done_hs])
    src_families = ("src", "probe", "job", "outcome", "cnt", "seen")
    per_src_bytes = sum(keys.get(f, {}).get("bytes", 0.0) for f in src_families)
    n = max(1, done_hs)
    return {
        "sources": sources, "per_source": per_source, "analyzers": args.analyzers, "setup_s": round(setup, 1),
        "fed": sent, "fed_s": round(fed_at, 2), "done": done_hs, "verdicts": done_v, "records": done_rec,
        "elapsed_s": round(elapsed, 2), "sources_seen": len(seen),
        "busiest": max(seen.values()) if seen else 0,
        "hs_per_s": done_hs / elapsed, "verdicts_per_s": done_v / elapsed,
        "records_per_s": done_rec / elapsed,
        "hs_per_cpu_s": done_hs / cpu if cpu else 0.0, "analyzer_cpu_s": cpu,
        # Redis's and this benchmark's (load + prober) CPU, per handshake: who else uses the cores.
        "redis_cpu_us_per_hs": redis_cpu / n * 1e6, "bench_cpu_us_per_hs": own_cpu / n * 1e6,
        "trips_per_hs": trips / n, "cmds_per_hs": (sum(cmds.values()) - theirs) / n,
        "top_cmds": {k: round(v / n, 2) for k, v in sorted(cmds.items(), key=lambda x: -x[1])[:8]},
        "bytes_per_hs": (after["bytes"] - before["bytes"]) / n,
        "load_bytes_per_hs": fed["bytes"] / max(1, sent),
        "mem_delta": after["memory"] - before["memory"],
        # Per source Redis holds anything for (every source seen has its cnt: key).
        "mem_per_src": per_src_bytes / max(1, int(keys.get("cnt", {}).get("keys", 0)) or len(seen)),
        "mem_per_hs": keys.get("hs", {}).get("bytes", 0.0) / max(1, done_rec),
        "mem_total": sum(v["bytes"] for v in keys.values()),
        "keys": {f: int(v["keys"]) for f, v in keys.items()},
        "src_keys_per_source": keys.get("src", {}).get("keys", 0) / max(1, len(seen)),
        "rss": mem.get("VmHWM", 0),
        # --drain: the write while the analyzers were stopped (Redis's XADD cost, apart), the time
        # to the last handshake acknowledged (before the last result settled), the machine's load.
        "drain": args.drain, "drain_write_s": drain_write.get("seconds"),
        "xadd_redis_us_per_hs": drain_write["redis_cpu"] / max(1, sent) * 1e6 if drain_write else None,
        "acked_s": None if acked_at is None else round(acked_at, 2),
        "redis_cpu_s": redis_cpu, "bench_cpu_s": own_cpu,
        "p50": statistics.median(latencies) if latencies else None,
        "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


def show(x: dict[str, Any]) -> str:
    lat = "-" if x["p50"] is None else f"{x['p50']:.2f}/{x['p95']:.2f}"
    return (f"{x['sources']:>8} {x['per_source'] or '-':>7} {x['done']:>7}/{x['fed']:<7} "
            f"{x['sources_seen']:>7} "
            f"{x['hs_per_s']:>7,.0f} {x['hs_per_cpu_s']:>7,.0f} {x['records_per_s']:>6,.0f} "
            f"{x['verdicts_per_s']:>6,.0f} "
            f"{x['trips_per_hs']:>6.2f} {x['cmds_per_hs']:>6.1f} {x['bytes_per_hs']:>7,.0f} "
            f"{x['mem_per_src']:>9,.0f} {x['mem_per_hs']:>6,.0f} {x['rss'] / 2**20:>6.0f} {lat:>11} "
            f"{x['redis_cpu_us_per_hs']:>8.0f}")


def show_drain(x: dict[str, Any]) -> str:
    k, t = x["analyzers"], x["elapsed_s"]
    return (f"{x['sources']:>8} {k:>2} {x['done']:>9,}/{x['fed']:<9,} {t:>7.2f} {x['acked_s'] or 0:>7.2f} "
            f"{x['hs_per_s']:>8,.0f} {x['hs_per_s'] / k:>8,.0f} {x['hs_per_cpu_s']:>8,.0f} "
            f"{x['analyzer_cpu_s'] / t / k:>5.0%} {x['records'] / max(1, x['done']):>6.1%} "
            f"{x['redis_cpu_us_per_hs']:>6.1f} {x['xadd_redis_us_per_hs'] or 0:>6.1f} "
            f"{x['redis_cpu_s'] / t:>5.0%} {x['bench_cpu_s'] / t:>5.0%} {x['trips_per_hs']:>6.3f} "
            f"{x['verdicts']:>7,} {x['rss'] / 2**20:>6.0f}")


# wall s: SIGCONT to the last result settled; acked s: to the last handshake acknowledged; hs/s/an:
# per analyzer process; an cpu: each analyzer's share of a core; redis us: redis-server CPU per
# handshake while draining, xadd us: while the backlog was written; redis, bench: their share of a
# core while draining (bench: the instant prober and this process's polling).
DRAIN_HEADER = (f"{'sources':>8} {'K':>2} {'done/backlog':>19} {'wall s':>7} {'acked s':>7} {'hs/s':>8} "
                f"{'hs/s/an':>8} {'hs/cpu':>8} {'an cpu':>5} {'meas':>6} {'redis us':>6} {'xadd us':>6} "
                f"{'redis':>5} {'bench':>5} {'trip/hs':>6} {'verdict':>7} {'RSS MB':>6}")

# net B/hs: Redis traffic per handshake; mem B/src, B/hs: Redis memory kept per source, per handshake;
# redis us: redis-server CPU microseconds per handshake.
HEADER = (f"{'sources':>8} {'hs/src':>7} {'done/fed':>15} {'seen':>7} {'hs/s':>7} {'hs/cpu':>7} "
          f"{'rec/s':>6} {'vrd/s':>6} {'trip/hs':>6} {'cmd/hs':>6} {'net B/hs':>7} {'mem B/src':>7} "
          f"{'B/hs':>6} "
          f"{'RSS MB':>6} {'p50/p95 s':>11} {'redis us':>8}")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(ap)
    ap.add_argument("--curve", choices=("sources", "per-source"), default="sources")
    ap.add_argument("--points", help="comma-separated: sources (default 1000,10000,100000,1000000) or "
                    "handshakes per source (default 1,10,100,1000,10000,100000)")
    ap.add_argument("--per-source-budget", type=int, default=20_000,
                    help="per-source curve: sources = budget / N, at least 1 (default 20000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="feeding time cap per point (default 20)")
    ap.add_argument("--max-handshakes", type=int, default=200_000, help="per point (default 200000)")
    ap.add_argument("--rate", type=float, default=0.0, help="offered handshakes/s (default 0: flat out, "
                    "held to --backlog)")
    ap.add_argument("--backlog", type=int, default=2000, help="entries the feed may run ahead (default 2000)")
    ap.add_argument("--batch", type=int, default=200, help="XADDs per pipeline of the load (default 200)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per point (default 1)")
    ap.add_argument("--warmup", type=float, default=0.0, metavar="S",
                    help="feed the same load S seconds before measuring (default 0: measure from the "
                    "start of a probe period, when every source is new)")
    ap.add_argument("--drain", type=int, default=0, metavar="N",
                    help="wall-clock without the generator: after --warmup, stop the analyzers "
                    "(SIGSTOP), write N more handshakes of the load, resume them (SIGCONT) and time "
                    "how long they take to work the backlog off, probe results included (default 0: "
                    "feed and measure at once)")
    ap.add_argument("--drain-batch", type=int, default=1000, help="XADDs per pipeline while writing "
                    "the --drain backlog (default 1000)")
    ap.add_argument("--drain-timeout", type=float, default=1800.0, metavar="S",
                    help="--drain: give up on a point after S seconds of draining (default 1800)")
    ap.add_argument("--analyzers", type=int, default=1, help="analyzer processes sharing the work "
                    "(consumers of one group; hs/cpu is per CPU second of all of them; RSS the largest)")
    ap.add_argument("--analyzer-args", default="", metavar="ARGS",
                    help="more options of stepstone-analyzer run, e.g. '--max-records 10'")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record the analyzer (raw stacks) per point")
    ap.add_argument("--json", metavar="FILE", help="append every point's numbers as JSON lines")
    ap.add_argument("--summarize", metavar="FILE", help="print the top functions of a --profile file, exit")
    args = ap.parse_args()
    if args.summarize:
        for name, inclusive, itself in summarize_profile(Path(args.summarize), 40):
            print(f"{inclusive:6.1%} {itself:6.1%}  {name}")
        return 0
    # SIGTERM like Ctrl-C: cancel, so every point's `finally` stops its analyzer and Redis.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        mix_from_args(args)
        if args.curve == "sources":
            points = [int(x) for x in (args.points or "1000,10000,100000,1000000").split(",")]
        else:
            points = [int(x) for x in (args.points or "1,10,100,1000,10000,100000").split(",")]
        if (any(p < 1 for p in points) or args.seconds <= 0 or args.backlog < args.batch or args.repeat < 1
                or args.analyzers < 1 or args.drain < 0 or args.drain_batch < 1 or args.drain_timeout <= 0):
            raise ValueError("points, --analyzers, --repeat, --drain-batch >= 1; --seconds, --drain-timeout "
                             "> 0; --backlog >= --batch; --drain >= 0")
        if args.drain and args.profile:
            raise ValueError("--drain and --profile: py-spy cannot attach to a stopped analyzer")
    except ValueError as exc:
        print(f"analyzer_load_bench: {exc}", file=sys.stderr)
        return 2
    print(f"darknet {args.darknet}, seed {args.seed}, {args.seconds:.0f}s per point, backlog {args.backlog}, "
          f"{args.analyzers} analyzer(s), "
          f"analyzer {args.analyzer_args or 'defaults'}, "
          f"rate {'flat out' if not args.rate else f'{args.rate:,.0f}/s'}; machine load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.drain:
        print(f"--drain: warm-up {args.warmup:.0f}s, then a backlog of {args.drain:,} handshakes worked off "
              "with the generator stopped")
    print(DRAIN_HEADER if args.drain else HEADER)
    for p in points:
        for _ in range(args.repeat):
            if args.curve == "sources":
                x = await point(args, p, None)
            else:
                x = await point(args, max(1, args.per_source_budget // p), p)
            x["load"] = os.getloadavg()[0]
            print(show_drain(x) if args.drain else show(x), flush=True)
            if args.json:
                append_json(Path(args.json), x)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
