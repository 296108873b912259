"""`stepstone-analyzer run`: the live service.

Per handshake (from the Redis stream `handshakes`, which the responder or the Zeek feed fills):
fingerprint the SYN, store the passive record in Redis, enqueue a probe of the source (or attach
to the probe the dedup window points at), and when the probe's result (or its dead letter) arrives,
close every handshake waiting for it: record + the rules over the source's window -> one entry on
the Redis stream `verdicts` and one line in `stepstone.log`. An analyzer started with `--zeek`
reads `verdicts` (every analyzer's, through its own consumer group) and hands each to its Zeek.
The state lives in Redis (`analyzer.state`); the process holds only what it has in hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions

from analyzer.cancellation import cancel_and_wait
from analyzer.errors import InputError
from analyzer.feeds import StreamConsumer, zeek_to_stream
from analyzer.handshake import Handshake, HandshakeError
from analyzer.hops import syn_distance
from analyzer.measurement import passive_record, with_probe
from analyzer.metrics import Metrics, verdict_kind
from analyzer.record import Record
from analyzer.retention import DEAD_KEEP_S, trim_consumed
from analyzer.rules import APP_ALLOWANCE_US, MAX_APP_ALLOWANCE_MS, OsLevel, judge
from analyzer.state import Outcome, State, StateError, Stored, record_dict
from analyzer.verdicts import Encoded, JsonLog, from_entry
from osfp import FingerprintError
from prober import streams
from prober.job import JobError, Result, epoch_seconds, short
from prober.job import address as canonical_address
from prober.options import DAY, YEAR, check_ranges
from prober.queue import MAX_DEADLINE, MAX_DEDUP_WINDOW
from prober.shards import (
    CLUSTER_SCHEMES,
    CLUSTER_TRANSIENT,
    MAX_SHARDS,
    ShardError,
    parse_cluster_url,
    parse_shard_list,
    scheme_of,
)
from prober.shards import client as redis_client

log = logging.getLogger("stepstone.analyzer")

GROUP = "analyzers"
ZEEK_GROUP = "zeek"  # default group of a --zeek analyzer on the verdicts stream (one per sensor)
JOB_SCAN = 2000  # newest jobs searched for an address whose job id was never recorded
MAX_DELIVERIES = 5  # an entry that fails this often is logged and acknowledged, not retried forever
ENQUEUE_CONCURRENCY = 32  # enqueues of one batch in flight at once (one Redis connection each)
RECORD_FIELDS = tuple(Record.__dataclass_fields__)
JSON_SEPARATORS = (",", ":")  # as JsonLog and analyzer.verdicts.entry_fields write
CACHE_MAX = 1 << 20  # addresses remembered by the cheap path's checks before the cache starts over
MAX_ADDRESS_TEXT = 45  # the longest address text (IPv6 with an IPv4 tail); longer is never one
Entry = tuple[str, dict[str, str]]
# Handles a batch of entries: None = acknowledge them all, or the ids to acknowledge (the rest stay
# pending).
Handler = Callable[[list[Entry]], Awaitable[list[str] | None]]
# A handshake to close: (hid, job, how the job ended, why the active half is missing).
Closing = tuple[str, str | None, Outcome | None, str | None]
OS_LEVELS = ("class", "name", "flavor")
# Entry failures that retrying cannot fix: log, count, acknowledge.
POISON = (HandshakeError, JobError, StateError)
JOB_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}", re.ASCII)  # a job is its entry id on `jobs`
MAX_REASON = 1000  # characters of a dead letter's reason kept with the job's outcome
# Every numeric option's range (by argparse dest), checked after the more specific checks.
RANGES: dict[str, tuple[float, float]] = {
    "metrics_port": (0, 65535),
    "window": (1, YEAR),
    "dedup_window": (0.001, MAX_DEDUP_WINDOW),
    "deadline": (0.001, MAX_DEADLINE),
    "claim_after": (0.001, DAY),
    "max_records": (1, 1_000_000),
    "sample_per_source": (0, 1_000_000),
    "hops_offset": (-255, 255),
    "app_allowance": (0, MAX_APP_ALLOWANCE_MS),
    "refresh": (1, YEAR),
}
HANDSHAKES_LOG = ("all", "sampled", "off")
# Default --sample-per-source: the rules need 3 hop pairs and a handful of T^p samples, and all the
# records of one period share one probe; 20 a period is up to 480 a day, more than the window
# keeps of most sources, and at a /16 only 1-12 % of handshakes are then measured (bench/SCALE.md).
SAMPLE_PER_SOURCE = 20
REFRESH = 3600.0  # default --refresh: one probe period (the dedup window's default)
HS_COUNT = 500  # handshakes read per batch: the per-batch Redis work is shared by more of them
STATS_EVERY = 60.0  # seconds between the log lines that say what was measured and what counted
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError,
             *CLUSTER_TRANSIENT)

EPILOG = """\
what it does:
  For every handshake on <prefix>handshakes: p0f label of the SYN (fp), the passive record, one
  probe job on <prefix>jobs (an address probed within --dedup-window is not probed again: the
  handshake waits for that earlier probe instead). For every result on <prefix>results (and every
  job the prober gave up on, <prefix>dead): the record with the active fields, the paper's rules
  over the source's last --window seconds (once per source per batch), one JSON line per
  handshake in LOG_DIR/records.log, and, when the source's verdict changed (or --refresh seconds
  passed since its last one), one entry on <prefix>verdicts and one line in LOG_DIR/stepstone.log.
  Only the first --sample-per-source handshakes of a source per --dedup-window are measured so;
  the rest are counted per source (cnt:<addr>, handshakes_seen in stepstone.log, /metrics).
  LOG_DIR/handshakes.log gets one line per measured handshake (--handshakes-log).
  With --zeek: every analyzer's verdicts (read from <prefix>verdicts with group
  --zeek-group) go to that Zeek; an entry is acknowledged once Zeek confirms it has logged it.

examples:
  stepstone-analyzer run --redis unix:///run/redis/redis.sock --handshakes --log-dir /var/log/stepstone
  stepstone-analyzer run --redis redis://:secret@10.0.0.5:6379/0 \\
      --zeek ws://127.0.0.1:8080/v1/messages/json --log-dir logs --metrics-port 9308

state (plain redis-cli can read it; keys under --prefix):
  streams handshakes, jobs, results, dead, verdicts; group 'analyzers' on handshakes, results
  and dead; group --zeek-group (default 'zeek') of the --zeek analyzer on verdicts.
  hs:<id> stored handshake, job:<job> handshakes waiting for a job, outcome:<job> how it ended,
  probe:<addr> latest job of an address, src:<addr> the source's records (the rules' window),
  cnt:<addr> its handshake counts and last verdict emitted.
  Several analyzers with different --consumer names share the work; a restarted one takes its
  own unfinished entries first, and entries of a dead one after --claim-after seconds.
  Entries of handshakes, results, jobs and dead that every group has acknowledged are trimmed
  (jobs once older than --dedup-window, dead once older than a day); verdicts is capped at about
  100,000 entries.
"""


@dataclass(frozen=True)
class Config:
    redis_url: str
    handshakes: bool
    zeek_url: str | None
    log_dir: Path
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    prefix: str = "stepstone:"
    window: float = 86400.0
    os_level: OsLevel = "name"
    p0f_db: str | None = None
    consumer: str = field(default_factory=socket.gethostname)
    ports: tuple[int, ...] | None = None
    darknets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dedup_window: float = 3600.0
    deadline: float = 60.0
    claim_after: float = 30.0
    max_records: int = 1000
    zeek_group: str = ZEEK_GROUP
    sample_per_source: int = SAMPLE_PER_SOURCE
    refresh: float = REFRESH
    handshakes_log: str = "sampled"
    shards: int = 1  # prober.shards: N > 1 (or a cluster URL) puts shard i under <prefix>{i}:
    shard_ids: tuple[int, ...] = ()  # the shards this process serves (empty: all)
    hops_offset: float = 0.0  # the prober's constant hop offset from the sensor (rules.hop_test)
    app_allowance_us: float = APP_ALLOWANCE_US  # a direct client's time to answer a banner (cond_app)


def register(sub: Any) -> None:
    """Add the `run` subcommand to `sub` (argparse subparsers)."""
    p = sub.add_parser(
        "run",
        help="the live service: handshakes in, probes out, verdicts to stepstone.log (and Zeek)",
        description="Live stepping-stone detection. Takes handshakes from Redis (--handshakes) "
        "and/or Zeek (--zeek), has the probers measure each source, writes one measurement "
        "record with the source's verdict per measured handshake (records.log), and one verdict "
        "line per change of a source's verdict (stepstone.log, Zeek).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--redis", required=True, metavar="URL",
                   help="Redis shared with the probers: redis://[:PASSWORD@]HOST:PORT/DB, rediss://..., "
                   "unix:///path/redis.sock")
    feeds = p.add_argument_group("feeds (at least one)")
    feeds.add_argument("--handshakes", action="store_true",
                       help="consume the Redis stream <prefix>handshakes (the responder writes it)")
    feeds.add_argument("--zeek", metavar="URL",
                       help="Zeek's WebSocket, ws://HOST:PORT/v1/messages/json: its handshake events "
                       "go onto <prefix>handshakes; every analyzer's verdicts (<prefix>verdicts) go "
                       "back as StepStone::verdict events")
    feeds.add_argument("--zeek-group", default=ZEEK_GROUP, metavar="NAME",
                       help="with --zeek: consumer group on <prefix>verdicts; one per sensor, so each "
                       "sensor gets every verdict once (default zeek)")
    p.add_argument("--log-dir", required=True, type=Path, metavar="DIR",
                   help="where stepstone.log and handshakes.log are appended (created if missing)")
    p.add_argument("--metrics-port", type=int, default=0, metavar="N",
                   help="serve Prometheus counters on http://ADDR:N/metrics (default 0 = off)")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address the metrics endpoint binds (default 127.0.0.1)")
    p.add_argument("--prefix", default="stepstone:", help="Redis key prefix (default stepstone:)")
    p.add_argument("--window", type=float, default=86400.0, metavar="S",
                   help="the rules look at each source's records of the last S seconds (default 86400)")
    p.add_argument("--os-level", choices=OS_LEVELS, default="name",
                   help="how much of the p0f label must differ for condition (1) (default name)")
    p.add_argument("--p0f-db", metavar="PATH", help="p0f database (default: the project's)")
    p.add_argument("--consumer", default=socket.gethostname(), metavar="NAME",
                   help="this analyzer's consumer name in group 'analyzers'; stable across restarts "
                   "so a restart resumes its own work; unique per analyzer (default: host name)")
    p.add_argument("--ports", metavar="LIST",
                   help="ports the probe sends SYNs to, comma-separated (default: the prober's)")
    p.add_argument("--darknet", action="append", default=[], metavar="CIDR",
                   help="only handshakes to these networks (repeatable; default: all)")
    p.add_argument("--dedup-window", type=float, default=3600.0, metavar="S",
                   help="an address probed in the last S seconds is not probed again (default 3600)")
    p.add_argument("--deadline", type=float, default=60.0, metavar="S",
                   help="a probe not started S seconds after the SYN is dropped (default 60)")
    p.add_argument("--claim-after", type=float, default=30.0, metavar="S",
                   help="take over entries another analyzer left unacknowledged this long (default 30)")
    p.add_argument("--max-records", type=int, default=1000, metavar="N",
                   help="judge a source on at most its N newest records in the window (default 1000)")
    p.add_argument("--sample-per-source", type=int, default=SAMPLE_PER_SOURCE, metavar="K",
                   help="measure fully (fingerprint, store, probe, judge) only the first K handshakes of "
                   "a source per probe period (--dedup-window); the rest are counted (cnt:<src>, the "
                   "verdict's handshakes_seen, /metrics). 0 = measure every one (default "
                   f"{SAMPLE_PER_SOURCE})")
    p.add_argument("--refresh", type=float, default=REFRESH, metavar="S",
                   help="a source's verdict goes to stepstone.log, the verdicts stream and Zeek when it "
                   "changes, and again when it is judged S seconds or more after its last one "
                   f"(default {REFRESH:.0f}: once per probe period)")
    p.add_argument("--handshakes-log", choices=HANDSHAKES_LOG, default="sampled",
                   help="handshakes.log gets a line for every handshake (all: the whole stream is "
                   "decoded), for the measured ones (sampled, the default), or none (off)")
    p.add_argument("--hops-offset", type=float, default=0.0, metavar="HOPS",
                   help="the prober's constant hop offset from the sensor, taken off every SYN - SYN+ACK "
                   "hop difference (default 0: the prober sits where the sensor is; `stepstone-analyzer "
                   "judge --summary records.log` estimates it from the sources judged direct)")
    p.add_argument("--app-allowance", type=float, default=APP_ALLOWANCE_US / 1000, metavar="MS",
                   help="a direct client's own time to answer a banner, allowed before cond_app calls the "
                   "extra application RTT a proxy's onward leg (default "
                   f"{APP_ALLOWANCE_US / 1000:g}; raise it where slow clients are expected, at the price "
                   "of the proxies with short onward legs)")
    shard = p.add_argument_group("shards (docs/cluster.md)")
    shard.add_argument("--shards", type=int, default=1, metavar="N",
                       help="the sources are split into N shards by address, shard i's keys under "
                       "<prefix>{i}: (the same N for every producer, analyzer and prober; default 1)")
    shard.add_argument("--shard", metavar="LIST",
                       help="the shards this analyzer serves, e.g. 0,3-5 (default all); logs in "
                       "LOG_DIR/shard-<i>/ when sharded")
    p.set_defaults(func=run_command)


def config_from_args(args: argparse.Namespace) -> Config:
    if not args.handshakes and not args.zeek:
        raise InputError("run: give a feed: --handshakes (Redis stream) and/or --zeek URL")
    scheme = scheme_of(args.redis)
    if scheme not in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
        raise InputError(f"--redis: not a Redis URL (redis://, rediss://, unix://, redis+cluster://): "
                         f"{scheme}://...")
    if not 1 <= args.shards <= MAX_SHARDS:
        raise InputError(f"--shards: 1 to {MAX_SHARDS}, not {args.shards}")
    try:
        shard_ids = parse_shard_list(args.shard, args.shards)
        if scheme in CLUSTER_SCHEMES:
            parse_cluster_url(args.redis)
    except ShardError as exc:
        raise InputError(str(exc) if str(exc).startswith("--") else f"--redis: {exc}") from None
    if args.zeek is not None:
        try:
            zurl = urlsplit(args.zeek)
            valid = zurl.scheme in ("ws", "wss") and bool(zurl.hostname) and zurl.port != 0
        except ValueError:  # a malformed [v6] host; .port: out of range or not a number
            valid = False
        if not valid:
            raise InputError(f"--zeek: not a WebSocket URL (ws://HOST:PORT/v1/messages/json): {args.zeek!r}")
    ports = None
    if args.ports:
        try:
            ports = tuple(int(x) for x in args.ports.split(","))
        except ValueError:
            raise InputError(f"--ports: not a comma-separated list of ports: {args.ports!r}") from None
        if any(not 0 < x < 65536 for x in ports):
            raise InputError(f"--ports: ports are 1-65535: {args.ports!r}")
    darknets = []
    for text in args.darknet:
        try:
            darknets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise InputError(f"--darknet: not a network: {text!r}") from None
    for name in ("window", "dedup_window", "deadline", "claim_after", "refresh"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.max_records < 1:
        raise InputError("--max-records must be at least 1")
    if args.sample_per_source < 0:
        raise InputError("--sample-per-source must be 0 (measure all) or more")
    if not 0 <= args.metrics_port < 65536:
        raise InputError(f"--metrics-port: not a port: {args.metrics_port}")
    if not args.consumer or not args.prefix or not args.zeek_group:
        raise InputError("--consumer, --prefix and --zeek-group must not be empty")
    try:
        check_ranges(args, RANGES)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return Config(
        redis_url=args.redis, handshakes=args.handshakes, zeek_url=args.zeek, log_dir=args.log_dir,
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, prefix=args.prefix,
        window=args.window, os_level=args.os_level, p0f_db=args.p0f_db, consumer=args.consumer,
        ports=ports, darknets=tuple(darknets), dedup_window=args.dedup_window, deadline=args.deadline,
        claim_after=args.claim_after, max_records=args.max_records, zeek_group=args.zeek_group,
        sample_per_source=args.sample_per_source, refresh=args.refresh, handshakes_log=args.handshakes_log,
        shards=args.shards, shard_ids=shard_ids, hops_offset=args.hops_offset,
        app_allowance_us=args.app_allowance * 1000,
    )


def run_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stepstone-analyzer %(levelname)s %(message)s")
    return asyncio.run(serve(config))


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop`): finish the entries in hand, then return 0 (1 if the
    service had to stop on an internal failure)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    if config.shards > 1 or scheme_of(config.redis_url) in CLUSTER_SCHEMES:
        from analyzer.sharded import serve_shards  # it imports this module

        try:
            return await serve_shards(config, stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
    service = await Service.start(config)
    try:
        code = await service.run(stop)
    finally:
        await service.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    return code


class Service:
    def __init__(self, config: Config, redis: aioredis.Redis, queue: Any, fingerprinter: Any) -> None:
        self.config = config
        self.redis = redis
        self.queue = queue
        self.fingerprinter = fingerprinter
        self.metrics = Metrics()
        self.state = State(redis, prefix=config.prefix, window=config.window,
                           dedup_window=config.dedup_window, max_records=config.max_records)
        # records.log: one line per measured handshake (its record and its source's verdict);
        # stepstone.log: one line per verdict change or refresh of a source.
        self.records_log = JsonLog(config.log_dir / "records.log", "records", self.state,
                                   ttl_after=self.state.closed_ttl)
        self.stepstone_log = JsonLog(config.log_dir / "stepstone.log", "stepstone", self.state)
        self.handshakes_log = JsonLog(config.log_dir / "handshakes.log", "handshakes", self.state)
        self._srcs: dict[str, bool] = {}  # source text -> canonical address (the cheap path's check)
        self._dsts: dict[str, bool] = {}  # destination text -> inside --darknet
        self._stats = {"seen": 0, "sampled": 0, "counted": 0, "first": 0, "changed": 0, "refresh": 0}
        self.zeek: Any = None
        self._stop_metrics: Callable[[], None] | None = None

        def consumer(stream: str, group: str = GROUP) -> StreamConsumer:
            return StreamConsumer(redis, config.prefix + stream, group, config.consumer,
                                  claim_idle_ms=int(config.claim_after * 1000),
                                  claim_every=max(0.1, min(5.0, config.claim_after / 2)),
                                  on_reject=self._reject)

        self.hs_stream = consumer("handshakes")
        self.hs_stream.count = HS_COUNT
        self.results_stream = consumer("results")
        self.dead_stream = consumer("dead")
        # Read only with --zeek: every analyzer's verdicts, for this analyzer's sensor.
        self.verdicts_stream = consumer("verdicts", config.zeek_group)

    @classmethod
    async def start(cls, config: Config) -> Service:
        """Check every piece of configuration against reality; InputError (one line) if wrong."""
        from osfp.fingerprinter import Fingerprinter
        from prober.queue import ProbeQueue, redact

        try:
            fingerprinter = Fingerprinter(config.p0f_db)
        except (OSError, ValueError) as exc:
            db = config.p0f_db or "the default database"
            raise InputError(f"--p0f-db: cannot load {db}: {exc}") from None
        try:
            client = redis_client(config.redis_url)  # prober.shards: also redis+cluster://
        except ValueError as exc:
            raise InputError(f"--redis: {exc}") from None
        try:
            await asyncio.wait_for(client.ping(), 10)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise InputError(f"--redis: cannot reach Redis at {redact(config.redis_url)}: {exc}") from None
        queue = ProbeQueue(client, prefix=config.prefix, dedup_window=config.dedup_window,
                           deadline=config.deadline)
        service = cls(config, client, queue, fingerprinter)
        try:
            config.log_dir.mkdir(parents=True, exist_ok=True)
            service.records_log.open()
            service.stepstone_log.open()
            service.handshakes_log.open()
        except OSError as exc:
            await service.close()
            raise InputError(f"--log-dir: cannot write logs in {config.log_dir}: {exc}") from None
        try:
            recovered = (await service.records_log.recover() + await service.stepstone_log.recover()
                         + await service.handshakes_log.recover())
        except BaseException:
            # Redis lost while reading back (a sharded start retries): close what is open.
            await service.close()
            raise
        log.info("log tails read back: %d lines already written", recovered)
        if config.metrics_port:
            try:
                service._stop_metrics = service.metrics.serve(config.metrics_port, config.metrics_addr)
            except OSError as exc:
                await service.close()
                raise InputError(f"--metrics-port: cannot serve on {config.metrics_addr}:"
                                 f"{config.metrics_port}: {exc}") from None
        if config.zeek_url:
            from analyzer.zeek import ZeekClient

            service.zeek = ZeekClient(config.zeek_url)
        return service

    async def close(self) -> None:
        if self.zeek is not None:
            with contextlib.suppress(Exception):
                await self.zeek.close()
        if self._stop_metrics is not None:
            self._stop_metrics()
        self.records_log.close()
        self.stepstone_log.close()
        self.handshakes_log.close()
        await self.redis.aclose()

    async def run(self, stop: asyncio.Event) -> int:
        """Work until `stop` is set; 0, or 1 if a stream loop failed."""
        log.info("running as consumer %r of group %r, prefix %r, logs in %s", self.config.consumer,
                 GROUP, self.config.prefix, self.config.log_dir)
        loops = [
            asyncio.create_task(self._consume(self.hs_stream, self.handle_handshakes, stop),
                                name="the handshakes loop"),
            asyncio.create_task(self._consume(self.results_stream, self.handle_results, stop),
                                name="the results loop"),
            asyncio.create_task(self._consume(self.dead_stream, self.handle_dead, stop),
                                name="the dead loop"),
        ]
        side = [asyncio.create_task(self._watch_lag(stop), name="the lag and retention watch")]
        if self.zeek is not None:
            side.append(asyncio.create_task(self._zeek_feed(), name="the Zeek feed"))

            async def to_zeek(batch: list[Entry]) -> list[str]:
                return await self.send_verdicts(batch, stop)

            loops.append(asyncio.create_task(self._consume(self.verdicts_stream, to_zeek, stop),
                                             name="the verdicts-to-Zeek loop"))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *loops, *side], return_when=asyncio.FIRST_COMPLETED)
        # A loop (or the Zeek feed, or the lag/retention watch) only ends by itself before `stop` on
        # a bug or an unexpected Redis reply: stop the whole service (a supervisor restarts it; its
        # pending entries are redone) rather than limp on without it. One that noticed `stop` at
        # this very moment is not a failure.
        asked = stop.is_set()
        failed = [task for task in (*loops, *side)
                  if task.done() and (not asked or task.cancelled() or task.exception() is not None)]
        for task in failed:
            log.error("%s ended: %r; stopping", task.get_name(),
                      None if task.cancelled() else task.exception())
        stop.set()
        await stopping
        # The loops notice `stop` between batches: what is in hand is finished and acknowledged.
        await asyncio.gather(*loops, return_exceptions=True)
        await cancel_and_wait(side)
        log.info("stopped")
        return 1 if failed else 0

    async def _consume(self, consumer: StreamConsumer, handle: Handler, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                async for batch in consumer.batches(stop):
                    try:
                        done = await handle(batch)
                    except TRANSIENT:
                        raise
                    except Exception as exc:
                        # Find the entry at fault: the others still get done and acknowledged.
                        log.warning("%s: a batch of %d failed (%s); retrying one by one",
                                    consumer.stream, len(batch), exc)
                        await self._one_by_one(consumer, handle, batch)
                    else:
                        await consumer.ack(*(entry_id for entry_id, _ in batch) if done is None else done)
                    backoff = 0.5
            except TRANSIENT as exc:
                log.warning("Redis unavailable reading %s (%s); retrying in %.1fs", consumer.stream,
                            exc, backoff)
                self.metrics.errors.labels("redis").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)

    async def _one_by_one(self, consumer: StreamConsumer, handle: Handler, batch: list[Entry]) -> None:
        for entry in batch:
            try:
                done = await handle([entry])
                if done is not None and entry[0] not in done:
                    continue  # the handler left it pending
            except POISON as exc:
                self._reject(consumer.stream, entry[0], exc)
            except TRANSIENT:
                raise
            except Exception:
                # A bug or an unexpected reply: leave it pending (retried after a restart or a
                # claim), keep serving the rest; give up on it after MAX_DELIVERIES tries.
                self.metrics.errors.labels("failed").inc()
                if await consumer.deliveries(entry[0]) < MAX_DELIVERIES:
                    log.exception("%s %s failed; left pending", consumer.stream, entry[0])
                    continue
                log.exception("%s %s failed %d times; abandoned: %s", consumer.stream, entry[0],
                              MAX_DELIVERIES, entry[1])
                self.metrics.errors.labels("abandoned").inc()
            await consumer.ack(entry[0])

    def _reject(self, stream: str, entry_id: str, exc: Exception) -> None:
        """An entry (or stored item) that cannot be used: one line, counted; the caller
        acknowledges it, so it is never read again and never holds up the ones behind it."""
        log.warning("%s %s rejected: %s", stream, entry_id, exc)
        self.metrics.errors.labels("malformed").inc()
        self.metrics.rejected.labels(stream.removeprefix(self.config.prefix)).inc()

    def _log_stats(self) -> None:
        """What was measured and what only counted since the last such line (never silent)."""
        st = self._stats
        if st["seen"] or st["first"] or st["changed"] or st["refresh"]:
            log.info("handshakes: %d received, %d measured, %d counted only (--sample-per-source %d); "
                     "verdict lines: %d first, %d changed, %d refresh", st["seen"], st["sampled"],
                     st["counted"], self.config.sample_per_source, st["first"], st["changed"], st["refresh"])
        for name in st:
            st[name] = 0

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        trim_refused: set[str] = set()
        next_stats = time.monotonic() + STATS_EVERY
        while not stop.is_set():
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_EVERY
                self._log_stats()
            consumers = [self.hs_stream, self.results_stream, self.dead_stream]
            if self.zeek is not None:
                consumers.append(self.verdicts_stream)
            for consumer in consumers:
                try:
                    lag = await consumer.lag()
                except redis.exceptions.RedisError:
                    lag = None
                if lag is not None:
                    self.metrics.lag.labels(consumer.stream.removeprefix(self.config.prefix)).set(lag)
            for name, keep in (("handshakes", 0.0), ("jobs", self.config.dedup_window), ("results", 0.0),
                               ("dead", DEAD_KEEP_S)):
                try:
                    trimmed = await trim_consumed(self.redis, self.config.prefix + name, keep_seconds=keep)
                except TRANSIENT as exc:
                    log.debug("trimming %s: %s", name, exc)  # Redis down: the consumers report it
                    continue
                except redis.exceptions.RedisError as exc:
                    # Refused (an ACL without XTRIM, a key of the wrong type): Redis fills up unless
                    # someone hears of it. Once per stream until trimming works again.
                    if name not in trim_refused:
                        log.warning("cannot trim %s%s: %s", self.config.prefix, name, exc)
                        trim_refused.add(name)
                    self.metrics.errors.labels("retention").inc()
                    continue
                trim_refused.discard(name)
                self.metrics.trimmed.labels(name).inc(trimmed)
            if self.zeek is not None:
                gauge = self.metrics.zeek
                gauge.labels("connected").set(int(self.zeek.connected.is_set()))
                gauge.labels("queued").set(self.zeek.pending)
                gauge.labels("rejected").set(self.zeek.stats.rejected)
                gauge.labels("dropped").set(self.zeek.stats.dropped)
                gauge.labels("oversized").set(self.zeek.stats.oversized)
                gauge.labels("confirmed").set(self.zeek.stats.confirmed)
                gauge.labels("resent").set(self.zeek.stats.resent)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

    async def _zeek_feed(self) -> None:
        async def redis_down(exc: Exception) -> None:
            log.warning("Redis unavailable for the Zeek feed (%s); retrying", exc)
            self.metrics.errors.labels("redis").inc()
            await asyncio.sleep(1.0)  # backoff before retrying; `run` cancels this task on stop

        def rejected(handshake: Handshake, exc: HandshakeError) -> None:
            self._reject("zeek", f"handshake {short(handshake.src)} -> {short(handshake.dst)}", exc)

        # Returns when the client is closed; `run` cancels it on stop.
        await zeek_to_stream(self.zeek, self.redis, self.config.prefix + "handshakes", on_error=redis_down,
                             on_reject=rejected)

    async def send_verdicts(self, batch: list[Entry], stop: asyncio.Event) -> list[str]:
        """Hand a batch of `verdicts` entries to Zeek; the ids to acknowledge: those Zeek
        confirmed (StepStone::verdict_ack, once logged; written, for a package that predates
        confirmations), and malformed ones or ones Zeek refused (counted as rejected). The rest
        stay pending in Redis (the durable buffer; the client's queue is only the short-term one):
        Zeek is down and `stop` came first, or the client dropped them. They are sent again after
        a restart (pending first) or when they are claimed (--claim-after)."""
        done: list[str] = []
        waiting: list[tuple[str, asyncio.Future[bool]]] = []
        for entry_id, fields in batch:
            try:
                _, verdict, record = from_entry(fields)
                waiting.append((entry_id, await self.zeek.publish_verdict(verdict, record)))
            except (ValueError, RecursionError) as exc:  # VerdictEntryError, values that make no event
                self._reject(self.verdicts_stream.stream, entry_id, exc)
                done.append(entry_id)
        if not waiting:
            return done
        stopping = asyncio.ensure_future(stop.wait())
        try:
            # The client sends in order: wait for each in turn while Zeek is down, until `stop`.
            for _, sent in waiting:
                await asyncio.wait({sent, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not sent.done():
                    break
        finally:
            stopping.cancel()
        unsent = []
        for entry_id, sent in waiting:
            if not sent.done():
                unsent.append(entry_id)
            elif (exc := sent.exception()) is not None:  # VerdictRefused: never again
                self._reject(self.verdicts_stream.stream, entry_id, exc)
                done.append(entry_id)
            elif sent.result():
                done.append(entry_id)
            else:
                unsent.append(entry_id)
        if unsent and not stop.is_set():
            log.warning("%d verdicts the Zeek client could not keep; left pending", len(unsent))
            self.metrics.errors.labels("zeek").inc(len(unsent))
        return done

    # -- the work -------------------------------------------------------------------------------

    def _fingerprint(self, h: Handshake) -> tuple[str | None, int | None]:
        """The SYN's p0f label and hop distance (null for a crafted SYN: analyzer.hops)."""
        if h.syn is None:
            return None, None
        try:
            fp = self.fingerprinter.fingerprint(h.syn)
        except FingerprintError:
            return None, None
        return fp.label, syn_distance(fp, h.reply)

    def _in_darknet(self, dst: str) -> bool:
        if not self.config.darknets:
            return True
        inside = self._dsts.get(dst)
        if inside is None:
            if len(self._dsts) > CACHE_MAX:
                self._dsts.clear()
            address = ipaddress.ip_address(dst)
            inside = self._dsts[dst] = any(address in net for net in self.config.darknets)
        return inside

    def _cheap(self, fields: dict[str, str]) -> tuple[str, bool]:
        """The counted path's check: only what a counted handshake uses (its source, time and
        reply); (src, answered). The SYN and the rest are checked (`Handshake.from_fields`) only
        for a handshake that is measured."""
        src = fields.get("src", "")
        ok = self._srcs.get(src)
        if ok is None:
            try:
                ok = canonical_address(src) == src
            except ValueError:
                ok = False
            if len(src) <= MAX_ADDRESS_TEXT:  # a hostile src of 87 kB is checked, never kept
                if len(self._srcs) > CACHE_MAX:
                    self._srcs.clear()
                self._srcs[src] = ok
        if not ok:
            raise HandshakeError(f"src is not an IP address: {short(src)}")
        if epoch_seconds(fields.get("t", "")) is None:
            raise HandshakeError(f"t is not epoch seconds: {short(fields.get('t'))}")
        reply = fields.get("reply", "")
        if reply not in ("ack", "rst", ""):
            raise HandshakeError(f"reply must be ack, rst or empty, not {short(reply)}")
        if self.config.darknets:
            dst = fields.get("dst", "")
            try:
                inside = self._in_darknet(dst)
            except ValueError:
                raise HandshakeError(f"dst is not an IP address: {short(dst)}") from None
            if not inside:
                return "", False
        return src, reply != ""

    async def handle_handshakes(self, batch: list[Entry]) -> None:
        """Count every handshake of a batch per source; measure the first --sample-per-source of
        each source's probe period: store, log, enqueue (a few round trips for the whole batch)."""
        config = self.config
        by_src: dict[str, list[tuple[str, dict[str, str], bool]]] = {}
        for hid, fields in batch:
            try:
                src, answered = self._cheap(fields)
            except HandshakeError as exc:
                self._reject(self.hs_stream.stream, hid, exc)
                continue
            if not src:
                self.metrics.ignored.inc()
                continue
            by_src.setdefault(src, []).append((hid, fields, answered))
        if not by_src:
            return
        grants = await self.state.sample([(src, len(v), sum(a for *_, a in v), v[0][0])
                                          for src, v in by_src.items()],
                                         now=time.time(), period=config.dedup_window,
                                         cap=config.sample_per_source)
        every = config.handshakes_log == "all"
        items: list[tuple[str, Handshake, str | None, Record | None]] = []
        logged_only: list[tuple[str, Handshake]] = []
        answered_n = counted = 0
        for entries, grant in zip(by_src.values(), grants, strict=True):
            for i, (hid, fields, answered) in enumerate(entries):
                if i >= grant and not every:
                    counted += 1
                    answered_n += answered
                    continue
                try:
                    h = Handshake.from_fields(fields)
                except HandshakeError as exc:
                    self._reject(self.hs_stream.stream, hid, exc)
                    continue
                if i >= grant:
                    counted += 1
                    answered_n += answered
                    logged_only.append((hid, h))
                    continue
                fp, syn_dist = self._fingerprint(h)
                items.append((hid, h, fp, passive_record(h, fp, syn_dist) if h.answered else None))
        seen = counted + len(items)
        answered_n += sum(1 for _, h, _, _ in items if h.answered)
        self.metrics.handshakes.inc(seen)
        self.metrics.answered.inc(answered_n)
        self.metrics.sampled.inc(len(items))
        self.metrics.counted.inc(counted)
        self._stats["seen"] += seen
        self._stats["sampled"] += len(items)
        self._stats["counted"] += counted
        if logged_only:
            await self.handshakes_log.write_many(
                [(hid, _handshake_line(h, None, None, False)) for hid, h in logged_only])
        if not items:
            return
        # A previous delivery (before a crash) may have enqueued already: its job is reused.
        answered = [Stored(hid=hid, record=record, sport=h.sport, dport=h.dport, feed=h.feed, job=None)
                    for hid, h, _, record in items if record is not None]
        saved = dict(zip((x.hid for x in answered), await self.state.save(answered), strict=True))
        prior = [saved.get(hid, (None, False, False)) for hid, *_ in items]
        jobs = {hid: job for (hid, *_), (job, _, _) in zip(items, prior, strict=True)}
        # Closed in this batch: no need to read back what was just stored (one that has its
        # records.log line already is a redelivery: `load` says so, as for any other).
        known = {x.hid: x for x in answered if not saved[x.hid][2]}
        fresh = [(hid, h) for hid, h, _, record in items if record is not None and jobs[hid] is None]
        own = await self._enqueue(fresh, jobs)
        deduped = {hid for hid, _ in fresh} - own

        if config.handshakes_log != "off":
            await self.handshakes_log.write_many(
                [(hid, _handshake_line(h, fp, jobs[hid], hid in deduped))
                 for (hid, h, fp, _), (_, logged, _) in zip(items, prior, strict=True) if not logged],
                checked=True,
            )

        waiting = [(hid, job, h.src, hid in own) for hid, h, _, record in items
                   if record is not None and (job := jobs[hid]) is not None]
        outcomes = await self.state.attach(waiting)
        closing: list[Closing] = [(hid, job, outcome, None)
                                  for (hid, job, _, _), outcome in zip(waiting, outcomes, strict=True)
                                  if outcome is not None]
        # Deduped by a probe this analyzer never heard of (e.g. `stepstone-prober probe`, or its
        # state expired): still a record and a verdict, on the passive half only.
        closing += [(hid, None, None, "deduped: no earlier probe of this address is known")
                    for hid, _, _, record in items if record is not None and jobs[hid] is None]
        await self.close_many(closing, known=known)

    async def _enqueue(self, todo: list[tuple[str, Handshake]], jobs: dict[str, str | None]) -> set[str]:
        """One enqueue per source of the batch, all in one round trip (the queue dedups by
        address); fills `jobs` with the job each handshake waits for; returns the handshakes whose
        enqueue created their job (a source's first in the batch)."""
        by_src: dict[str, list[tuple[str, Handshake]]] = {}
        for hid, h in todo:
            by_src.setdefault(h.src, []).append((hid, h))
        own: set[str] = set()
        firsts = [entries[0] for entries in by_src.values()]
        replies = await self.queue.enqueue_many([(h.src, h.t) for _, h in firsts], ports=self.config.ports)
        for ((first, _), entries), (created, named) in zip(zip(firsts, by_src.values(), strict=True), replies,
                                                           strict=True):
            # A dedup mark of an older version holds a time, not the job.
            job = named if named is not None and JOB_ID.fullmatch(named) else None
            if created:
                own.add(first)
                self.metrics.enqueued.inc()
                self.metrics.deduped.inc(len(entries) - 1)
            else:
                self.metrics.deduped.inc(len(entries))
            for hid, _ in entries:
                jobs[hid] = job
        unknown = [src for src, entries in by_src.items() if jobs[entries[0][0]] is None]
        if unknown:
            found = await self._earlier_probes(unknown)
            for src in unknown:
                for hid, _ in by_src[src]:
                    jobs[hid] = found.get(src)
        return own

    async def _earlier_probes(self, srcs: list[str]) -> dict[str, str]:
        """The jobs of addresses whose dedup mark names none (set by an older version, or by
        `stepstone-prober`): their `probe:<src>`, else the newest jobs on the stream, read once for
        the whole batch. Never polled: `enqueue_many` names the job atomically with the mark, so
        there is no moment to wait out (the two-analyzer stall of bench/SCALE.md)."""
        # Redis's bytes, editable by hand: only a job id is waited on (a stray value would keep the
        # handshake waiting for a job that never ends).
        found = {src: job for src, job in zip(srcs, await self.state.last_probes(srcs), strict=True)
                 if job is not None and JOB_ID.fullmatch(job)}
        missing = {src.encode(): src for src in srcs if src not in found}
        if not missing:
            return found
        # Undecoded: anyone may write to `jobs`; an entry that is not UTF-8 is not ours, skip it.
        entries = await streams.newest(self.redis, self.config.prefix + "jobs", count=JOB_SCAN)
        oldest_ms = (time.time() - self.config.dedup_window) * 1000
        for job_id, fields in entries:
            if int(job_id.split("-")[0]) < oldest_ms:
                break  # older than the dedup window: its outcome may be gone, never wait on it
            src = missing.pop(fields.get(b"src", b""), None) if fields else None
            if src is not None:
                found[src] = job_id
            if not missing:
                break
        return found

    async def handle_results(self, batch: list[Entry]) -> None:
        settling: list[tuple[str, Outcome]] = []
        for entry_id, fields in batch:
            try:
                result = Result.from_fields(fields)
            except JobError as exc:
                self._reject(self.results_stream.stream, entry_id, exc)
                job = fields.get("job", "")
                if JOB_ID.fullmatch(job):
                    # Its handshakes are still closed, on their passive half, rather than left to
                    # wait for a result that will not come.
                    settling.append((job, Outcome(result=None, dead=f"its result was rejected: {exc}")))
                continue
            self.metrics.results.inc()
            settling.append((result.job, Outcome(result=result)))
        await self._settle(settling)

    async def handle_dead(self, batch: list[Entry]) -> None:
        settling: list[tuple[str, Outcome]] = []
        for entry_id, fields in batch:
            job = fields.get("job", "")
            if not JOB_ID.fullmatch(job):
                self._reject(self.dead_stream.stream, entry_id,
                             JobError(f"dead entry without a job id: {short(job)}"))
                continue
            self.metrics.dead.inc()
            reason = (fields.get("reason") or "no reason given")[:MAX_REASON]
            settling.append((job, Outcome(result=None, dead=reason)))
        await self._settle(settling)

    async def _settle(self, settling: list[tuple[str, Outcome]]) -> None:
        if not settling:
            return
        settled = await self.state.settle(settling)
        await self.close_many([(hid, job, outcome, None)
                               for (job, _), (outcome, hids) in zip(settling, settled, strict=True)
                               for hid in hids])

    async def close_many(self, closing: list[Closing], *, known: dict[str, Stored] | None = None) -> None:
        """Record per handshake (one records.log line each, once), judged once per source per
        batch over its window; a source whose verdict changed (or is due a refresh) gets one entry
        on the `verdicts` stream and one line in stepstone.log."""
        if not closing:
            return
        known = known or {}
        stored_of: dict[str, Stored | StateError | None] = {
            hid: known[hid] for hid, *_ in closing if hid in known}
        rest = [hid for hid, *_ in closing if hid not in stored_of]
        if rest:
            stored_of.update(zip(rest, await self.state.load(rest, unless_logged="records"), strict=True))
        loaded = [stored_of[hid] for hid, *_ in closing]
        ready: list[tuple[str, str | None, Stored, Record, Result | None, str | None]] = []
        for (hid, job, outcome, why), stored in zip(closing, loaded, strict=True):
            reason = why
            if stored is None:
                continue  # closed before (a redelivery), or expired: waited longer than kept
            if isinstance(stored, StateError):
                # One unreadable handshake must not keep the others from closing.
                self._reject("state", hid, stored)
                continue
            if stored.record is None:
                log.warning("handshake %s of job %s was never answered; not closed", hid, job)
                self.metrics.errors.labels("unanswered").inc()
                continue
            record = stored.record
            result = outcome.result if outcome is not None else None
            if result is not None:
                try:
                    record = with_probe(record, result)
                except ValueError as exc:  # a result for another address: keep the passive half
                    result, reason = None, f"probe result unusable: {exc}"
                    self.metrics.errors.labels("malformed").inc()
            elif outcome is not None:
                reason = f"probe gave up: {outcome.dead}"
            ready.append((hid, job, stored, record, result, reason))
        if not ready:
            return
        windows = await self.state.add_records([(hid, record) for hid, _, _, record, _, _ in ready])
        verdicts: dict[str, Any] = {}
        for src, window in windows.items():
            for why in window.dropped:
                log.warning("a record in the window of %s dropped: %s", src, why)
                self.metrics.errors.labels("bad_record").inc()
                self.metrics.dropped_records.inc()
            newest = max((r for _, _, _, r, _, _ in ready if r.src == src), key=lambda r: r.t)
            verdicts[src] = self._judge(newest, window.records).to_dict()
        # Each source's verdict is encoded once, whatever number of lines and entries carry it.
        verdict_json = {src: json.dumps(v, separators=JSON_SEPARATORS) for src, v in verdicts.items()}
        lines: list[tuple[str, dict[str, Any]]] = []
        texts: dict[str, tuple[str, str]] = {}  # hid -> (the line's JSON, the record's JSON)
        for hid, job, stored, record, result, reason in ready:
            fields = record_dict(record)
            tail = {
                "job": job,
                "sport": stored.sport,
                "dport": stored.dport,
                "feed": stored.feed,
                "probe": None if result is None else {
                    "ping_loss": result.ping_loss, "fa_port": result.fa_port, "probed_at": result.probed_at,
                },
                "reason": reason,
                "verdict_at": time.time(),
            }
            head = json.dumps(fields, separators=JSON_SEPARATORS)
            texts[hid] = (head[:-1] + ',"verdict":' + verdict_json[record.src] + ","
                          + json.dumps(tail, separators=JSON_SEPARATORS)[1:], head)
            lines.append((hid, {**fields, "verdict": verdicts[record.src], **tail}))
        # Per source, its newest record of the batch stands for it on the stream and in the log.
        latest: dict[str, tuple[str, dict[str, Any]]] = {}
        for hid, line in lines:
            if line["src"] not in latest or line["t"] >= latest[line["src"]][1]["t"]:
                latest[line["src"]] = (hid, line)
        # The stream entry first, decided in Redis (atomically, so one change is emitted once
        # whichever analyzer sees it), then the change lines, then the records, last: a handshake
        # whose records.log line is marked counts as done and is never redone, so a batch redone
        # after a failure anywhere before that (it comes back here) gets the same emission back
        # and writes what is missing.
        todo = list(latest.values())
        # The entry is `entry_fields(hid, verdict, record)`, from the texts already encoded.
        emitted = await self.state.emit(
            [(line["src"], _signature(line["verdict"]), hid,
              {"hid": hid, "verdict": verdict_json[line["src"]], "record": texts[hid][1]})
             for hid, line in todo],
            now=time.time(), refresh=self.config.refresh)
        changes: list[tuple[str, dict[str, Any] | Encoded]] = []
        kinds: dict[str, str] = {}
        for (hid, _), done in zip(todo, emitted, strict=True):
            if done is None:
                continue
            kinds[hid] = done.change
            extra = json.dumps({"change": done.change, "verdict_entry": done.entry,
                                "handshakes_seen": done.seen, "handshakes_answered": done.answered,
                                "handshakes_sampled": done.sampled}, separators=JSON_SEPARATORS)
            changes.append((hid, Encoded(texts[hid][0][:-1] + "," + extra[1:])))
        # Not `checked`: a redo's line may be in the log already (Redis's mark, or the tail).
        for hid in await self.stepstone_log.write_many(changes):
            self.metrics.changes.labels(kinds[hid]).inc()
            self._stats[kinds[hid]] = self._stats.get(kinds[hid], 0) + 1
        written = await self.records_log.write_many([(hid, Encoded(texts[hid][0])) for hid, _ in lines],
                                                    checked=True)
        for hid, line in lines:
            if hid not in written:
                continue
            self.metrics.verdicts.inc()
            if line["verdict"].get("relay"):
                self.metrics.relays.inc()
            self.metrics.verdict_kinds.labels(verdict_kind(line["verdict"])).inc()
            self.metrics.latency.observe(max(0.0, line["verdict_at"] - line["t"]))

    def _judge(self, record: Record, window: list[Record]) -> Any:
        """The rules over the window. Every record in it passed the same checks, so this cannot
        fail; should it still, the records the rules cannot take are dropped (and counted) and the
        rest of the window still counts."""
        config = self.config

        def rules(records: list[Record]) -> Any:
            return judge(records, window=config.window, os_level=config.os_level,
                         hops_offset=config.hops_offset, app_allowance_us=config.app_allowance_us)

        try:
            return rules(window)
        except (ArithmeticError, ValueError) as exc:
            log.warning("judging %s over %d records failed (%s); dropping the records it cannot take",
                        record.src, len(window), exc)
        kept: list[Record] = []
        for r in window:
            try:
                rules([*kept, r])
                kept.append(r)
            except (ArithmeticError, ValueError):
                self.metrics.errors.labels("bad_record").inc()
                self.metrics.dropped_records.inc()
        if record not in kept:
            kept.append(record)
        try:
            return rules(kept)
        except (ArithmeticError, ValueError):
            return rules([record])


def _signature(verdict: dict[str, Any]) -> str:
    """What makes a verdict a change for its source: the kind, the paper's conditions and relay,
    relay_confident, and which tests gave evidence (not their margins, which move with every
    sample)."""
    tests = ",".join(sorted(str(e.get("test")) for e in verdict.get("evidence") or ()))
    flags = "".join("1" if verdict.get(k) else "0"
                    for k in ("relay", "relay_confident", "cond_os", "cond_timing"))
    return f"{verdict.get('kind')}|{flags}|{tests}"


def _handshake_line(h: Handshake, fp: str | None, job: str | None, deduped: bool) -> dict[str, Any]:
    return {
        "t": h.t, "src": h.src, "sport": h.sport, "dst": h.dst, "dport": h.dport,
        "reply": h.reply, "reply_time": h.reply_time, "synack_times": list(h.synack_times),
        "tp_us": h.tp_us, "fp": fp, "feed": h.feed, "answered": h.answered,
        "job": job, "deduped": deduped, "received_at": time.time(),
        "tapp_us": h.tapp_us, "app_data": h.app_data_b64,  # base64: the client's bytes are hostile
    }

