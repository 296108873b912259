"""`stepstone-analyzer run`: the live service.

Per handshake (from the Redis stream `handshakes`, which the responder or the Zeek feed fills):
fingerprint the SYN, store the passive record in Redis, enqueue a probe of the source (or attach
to the probe the dedup window points at), and when the probe's result (or its dead letter) arrives,
close every handshake waiting for it: record + the rules over the source's window -> one line in
`stepstone.log`, and the verdict back to Zeek when connected. The state lives in Redis
(`analyzer.state`); the process holds only what it has in hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
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

from analyzer.errors import InputError
from analyzer.feeds import StreamConsumer, zeek_to_stream
from analyzer.handshake import Handshake, HandshakeError
from analyzer.metrics import Metrics
from analyzer.record import Record
from analyzer.state import Outcome, State, StateError, Stored
from analyzer.verdicts import JsonLog
from osfp import FingerprintError
from prober.job import JobError

log = logging.getLogger("stepstone.analyzer")

GROUP = "analyzers"
JOB_SCAN = 2000  # newest jobs searched for an address whose job id was never recorded
OS_LEVELS = ("class", "name", "flavor")
# Entry failures that retrying cannot fix: log, count, acknowledge.
POISON = (HandshakeError, JobError, StateError)
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError)

EPILOG = """\
what it does:
  For every handshake on <prefix>handshakes: p0f label of the SYN (fp), the passive record, one
  probe job on <prefix>jobs (an address probed within --dedup-window is not probed again: the
  handshake waits for that earlier probe instead). For every result on <prefix>results (and every
  job the prober gave up on, <prefix>dead): the record with the active fields, the paper's rules
  over the source's last --window seconds, and one JSON line in LOG_DIR/stepstone.log.
  LOG_DIR/handshakes.log gets one line per handshake received, answered or not.

examples:
  stepstone-analyzer run --redis unix:///run/redis/redis.sock --handshakes --log-dir /var/log/stepstone
  stepstone-analyzer run --redis redis://:secret@10.0.0.5:6379/0 \\
      --zeek ws://127.0.0.1:8080/v1/messages/json --log-dir logs --metrics-port 9308

state (plain redis-cli can read it; keys under --prefix):
  streams handshakes, jobs, results, dead; group 'analyzers' on handshakes, results and dead.
  hs:<id> stored handshake, job:<job> handshakes waiting for a job, outcome:<job> how it ended,
  probe:<addr> latest job of an address, src:<addr> the source's records (the rules' window).
  Several analyzers with different --consumer names share the work; a restarted one takes its
  own unfinished entries first, and entries of a dead one after --claim-after seconds.
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
    os_level: str = "name"
    p0f_db: str | None = None
    consumer: str = field(default_factory=socket.gethostname)
    ports: tuple[int, ...] | None = None
    darknets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dedup_window: float = 3600.0
    deadline: float = 60.0
    claim_after: float = 30.0


def register(sub: Any) -> None:
    """Add the `run` subcommand to `sub` (argparse subparsers)."""
    p = sub.add_parser(
        "run",
        help="the live service: handshakes in, probes out, verdicts to stepstone.log (and Zeek)",
        description="Live stepping-stone detection. Takes handshakes from Redis (--handshakes) "
        "and/or Zeek (--zeek), has the probers measure each source, and writes one measurement "
        "record with the source's verdict per answered handshake.",
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
                       "go onto <prefix>handshakes, verdicts go back as StepStone::verdict events")
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
    p.set_defaults(func=run_command)


def config_from_args(args: argparse.Namespace) -> Config:
    if not args.handshakes and not args.zeek:
        raise InputError("run: give a feed: --handshakes (Redis stream) and/or --zeek URL")
    url = urlsplit(args.redis)
    if url.scheme not in ("redis", "rediss", "unix"):
        raise InputError(f"--redis: not a Redis URL (redis://, rediss://, unix://): {args.redis!r}")
    if args.zeek is not None:
        zurl = urlsplit(args.zeek)
        if zurl.scheme not in ("ws", "wss") or not zurl.hostname:
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
    for name in ("window", "dedup_window", "deadline", "claim_after"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.metrics_port < 65536:
        raise InputError(f"--metrics-port: not a port: {args.metrics_port}")
    if not args.consumer or not args.prefix:
        raise InputError("--consumer and --prefix must not be empty")
    return Config(
        redis_url=args.redis, handshakes=args.handshakes, zeek_url=args.zeek, log_dir=args.log_dir,
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, prefix=args.prefix,
        window=args.window, os_level=args.os_level, p0f_db=args.p0f_db, consumer=args.consumer,
        ports=ports, darknets=tuple(darknets), dedup_window=args.dedup_window, deadline=args.deadline,
        claim_after=args.claim_after,
    )


def run_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stepstone-analyzer %(levelname)s %(message)s")
    return asyncio.run(serve(config))


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop`): finish the entries in hand, then return 0."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    service = await Service.start(config)
    try:
        await service.run(stop)
    finally:
        await service.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    return 0


class Service:
    def __init__(self, config: Config, redis: aioredis.Redis, queue: Any, fingerprinter: Any) -> None:
        self.config = config
        self.redis = redis
        self.queue = queue
        self.fingerprinter = fingerprinter
        self.metrics = Metrics()
        self.state = State(redis, prefix=config.prefix, window=config.window,
                           dedup_window=config.dedup_window)
        self.stepstone_log = JsonLog(config.log_dir / "stepstone.log", "stepstone", self.state)
        self.handshakes_log = JsonLog(config.log_dir / "handshakes.log", "handshakes", self.state)
        self.zeek: Any = None
        self._stop_metrics: Callable[[], None] | None = None

        def consumer(stream: str) -> StreamConsumer:
            return StreamConsumer(redis, config.prefix + stream, GROUP, config.consumer,
                                  claim_idle_ms=int(config.claim_after * 1000),
                                  claim_every=max(0.1, min(5.0, config.claim_after / 2)))

        self.hs_stream = consumer("handshakes")
        self.results_stream = consumer("results")
        self.dead_stream = consumer("dead")

    @classmethod
    async def start(cls, config: Config) -> Service:
        """Check every piece of configuration against reality; InputError (one line) if wrong."""
        from analyzer import measurement, rules  # noqa: F401  (fail early if the core is missing)
        from osfp.fingerprinter import Fingerprinter
        from prober.queue import ProbeQueue

        try:
            fingerprinter = Fingerprinter(config.p0f_db)
        except (OSError, ValueError) as exc:
            db = config.p0f_db or "the default database"
            raise InputError(f"--p0f-db: cannot load {db}: {exc}") from None
        try:
            client = aioredis.from_url(config.redis_url, decode_responses=True,
                                       socket_connect_timeout=5, health_check_interval=30)
        except ValueError as exc:
            raise InputError(f"--redis: {exc}") from None
        try:
            await asyncio.wait_for(client.ping(), 10)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise InputError(f"--redis: cannot reach Redis at {config.redis_url}: {exc}") from None
        queue = ProbeQueue(client, prefix=config.prefix, dedup_window=config.dedup_window,
                           deadline=config.deadline)
        service = cls(config, client, queue, fingerprinter)
        try:
            config.log_dir.mkdir(parents=True, exist_ok=True)
            service.stepstone_log.open()
            service.handshakes_log.open()
        except OSError as exc:
            await service.close()
            raise InputError(f"--log-dir: cannot write logs in {config.log_dir}: {exc}") from None
        recovered = await service.stepstone_log.recover() + await service.handshakes_log.recover()
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
        self.stepstone_log.close()
        self.handshakes_log.close()
        await self.redis.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        log.info("running as consumer %r of group %r, prefix %r, logs in %s", self.config.consumer,
                 GROUP, self.config.prefix, self.config.log_dir)
        loops = [
            asyncio.create_task(self._consume(self.hs_stream, self.handle_handshake, stop)),
            asyncio.create_task(self._consume(self.results_stream, self.handle_result, stop)),
            asyncio.create_task(self._consume(self.dead_stream, self.handle_dead, stop)),
        ]
        side = [asyncio.create_task(self._watch_lag(stop))]
        if self.zeek is not None:
            side.append(asyncio.create_task(self._zeek_feed(stop)))
        await stop.wait()
        # The loops notice `stop` between entries: what is in hand is finished and acknowledged.
        await asyncio.gather(*loops, return_exceptions=True)
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        log.info("stopped")

    async def _consume(
        self,
        consumer: StreamConsumer,
        handle: Callable[[str, dict[str, str]], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                async for entry_id, fields in consumer.entries(stop):
                    try:
                        await handle(entry_id, fields)
                    except POISON as exc:
                        log.warning("%s %s rejected: %s", consumer.stream, entry_id, exc)
                        self.metrics.errors.labels("malformed").inc()
                    except TRANSIENT:
                        raise
                    except Exception:
                        # A bug or an unexpected reply: leave it pending (retried after a restart
                        # or a claim), keep serving the rest.
                        log.exception("%s %s failed; left pending", consumer.stream, entry_id)
                        self.metrics.errors.labels("failed").inc()
                        continue
                    await consumer.ack(entry_id)
                    backoff = 0.5
            except TRANSIENT as exc:
                log.warning("Redis unavailable reading %s (%s); retrying in %.1fs", consumer.stream,
                            exc, backoff)
                self.metrics.errors.labels("redis").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for consumer in (self.hs_stream, self.results_stream, self.dead_stream):
                try:
                    lag = await consumer.lag()
                except redis.exceptions.RedisError:
                    lag = None
                if lag is not None:
                    self.metrics.lag.labels(consumer.stream.removeprefix(self.config.prefix)).set(lag)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

    async def _zeek_feed(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await zeek_to_stream(self.zeek, self.redis, self.config.prefix + "handshakes")
                return  # the client was closed
            except TRANSIENT as exc:
                log.warning("Redis unavailable for the Zeek feed (%s); retrying", exc)
                self.metrics.errors.labels("redis").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    # -- the work -------------------------------------------------------------------------------

    def _fingerprint(self, syn: bytes | None) -> str | None:
        if syn is None:
            return None
        try:
            label: str | None = self.fingerprinter.fingerprint(syn).label
            return label
        except FingerprintError:
            return None

    def _in_darknet(self, dst: str) -> bool:
        if not self.config.darknets:
            return True
        address = ipaddress.ip_address(dst)
        return any(address in net for net in self.config.darknets)

    async def handle_handshake(self, hid: str, fields: dict[str, str]) -> None:
        from analyzer.measurement import passive_record

        h = Handshake.from_fields(fields)
        if not self._in_darknet(h.dst):
            self.metrics.ignored.inc()
            return
        fp = self._fingerprint(h.syn)
        record = passive_record(h, fp) if h.answered else None
        # A previous delivery (before a crash) may have enqueued already: reuse its job.
        job, hs_logged = await self.state.save(Stored(hid=hid, record=record, sport=h.sport,
                                                      dport=h.dport, feed=h.feed, job=None))
        own = deduped = False
        if record is not None and job is None:
            job = await self.queue.enqueue(h.src, h.t, ports=self.config.ports)
            if job is not None:
                own = True
                self.metrics.enqueued.inc()
            else:
                deduped = True
                self.metrics.deduped.inc()
                job = await self._earlier_probe(h.src)
        if not hs_logged and await self.handshakes_log.write(hid, _handshake_line(h, fp, job, deduped),
                                                             checked=True):
            self.metrics.handshakes.inc()
            if h.answered:
                self.metrics.answered.inc()
        if record is None:
            return
        if job is None:
            # Deduped by a probe this analyzer never heard of (e.g. `stepstone-prober probe`, or
            # its record expired): still a record and a verdict, on the passive half only.
            await self.close_handshake(hid, None, None, "deduped: no earlier probe of this address is known")
            return
        outcome = await self.state.attach(hid, job, h.src, own=own)
        if outcome is not None:
            await self.close_handshake(hid, job, outcome)

    async def _earlier_probe(self, src: str) -> str | None:
        # Another analyzer may have enqueued this address a moment ago and not yet said which job
        # it is: give it a moment (a condition polled briefly, not a fixed wait).
        for _ in range(10):
            job = await self.state.last_probe(src)
            if job is not None:
                return job
            await asyncio.sleep(0.02)
        # Or an analyzer died between enqueueing and recording the job: the job is on the stream.
        entries = await self.redis.xrevrange(self.config.prefix + "jobs", count=JOB_SCAN)
        oldest_ms = (time.time() - self.config.dedup_window) * 1000
        for job_id, fields in entries:
            if int(str(job_id).split("-")[0]) < oldest_ms:
                break  # older than the dedup window: its outcome may be gone, never wait on it
            if fields.get("src") == src:
                return str(job_id)
        return None

    async def handle_result(self, entry_id: str, fields: dict[str, str]) -> None:
        from prober.job import Result

        result = Result.from_fields(fields)
        self.metrics.results.inc()
        outcome, hids = await self.state.settle(result.job, Outcome(result=result))
        await self._close_all(hids, result.job, outcome)

    async def handle_dead(self, entry_id: str, fields: dict[str, str]) -> None:
        job = fields.get("job", "")
        if not job:
            raise JobError("dead entry without a job id")
        reason = fields.get("reason") or "no reason given"
        self.metrics.dead.inc()
        outcome, hids = await self.state.settle(job, Outcome(result=None, dead=reason))
        await self._close_all(hids, job, outcome)

    async def _close_all(self, hids: list[str], job: str, outcome: Outcome) -> None:
        for hid in hids:
            try:
                await self.close_handshake(hid, job, outcome)
            except StateError as exc:
                # One unreadable handshake must not keep the others of this job from closing.
                log.warning("handshake %s of job %s not closed: %s", hid, job, exc)
                self.metrics.errors.labels("malformed").inc()

    async def close_handshake(
        self, hid: str, job: str | None, outcome: Outcome | None, reason: str | None = None
    ) -> None:
        """Record + verdict for one handshake: one line in stepstone.log (once), and to Zeek."""
        from analyzer.measurement import with_probe
        from analyzer.rules import judge

        stored = await self.state.load(hid, unless_logged="stepstone")
        if stored is None:
            # Closed before (a redelivery), or expired: waited longer than handshakes are kept.
            return
        if stored.record is None:
            log.warning("handshake %s of job %s was never answered; not closed", hid, job)
            self.metrics.errors.labels("unanswered").inc()
            return
        record: Record = stored.record
        result = outcome.result if outcome is not None else None
        if result is not None:
            try:
                record = with_probe(record, result)
            except ValueError as exc:  # a result for another address: keep the passive half
                result, reason = None, f"probe result unusable: {exc}"
                self.metrics.errors.labels("malformed").inc()
        elif outcome is not None:
            reason = f"probe gave up: {outcome.dead}"
        records = await self.state.add_record(hid, record)
        verdict = judge(records, window=self.config.window, os_level=self.config.os_level)
        verdict_dict = verdict.to_dict()
        now = time.time()
        line = {
            **record.to_dict(),
            "verdict": verdict_dict,
            "job": job,
            "sport": stored.sport,
            "dport": stored.dport,
            "feed": stored.feed,
            "probe": None if result is None else {
                "ping_loss": result.ping_loss, "fa_port": result.fa_port, "probed_at": result.probed_at,
            },
            "reason": reason,
            "verdict_at": now,
        }
        if not await self.stepstone_log.write(hid, line, checked=True):
            return
        self.metrics.verdicts.inc()
        if verdict_dict.get("relay"):
            self.metrics.relays.inc()
        self.metrics.latency.observe(max(0.0, now - record.t))
        if self.zeek is not None:
            try:
                await self.zeek.publish_verdict(verdict_dict, record.to_dict())
            except Exception:
                # The log line is written; Zeek missing one verdict must not stall the pipeline.
                log.exception("could not hand verdict of %s to Zeek", record.src)
                self.metrics.errors.labels("zeek").inc()


def _handshake_line(h: Handshake, fp: str | None, job: str | None, deduped: bool) -> dict[str, Any]:
    return {
        "t": h.t, "src": h.src, "sport": h.sport, "dst": h.dst, "dport": h.dport,
        "reply": h.reply, "reply_time": h.reply_time, "synack_times": list(h.synack_times),
        "tp_us": h.tp_us, "fp": fp, "feed": h.feed, "answered": h.answered,
        "job": job, "deduped": deduped, "received_at": time.time(),
    }

