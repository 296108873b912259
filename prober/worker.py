"""The probe worker: takes jobs from the `probers` group, probes within the safety limits, writes
results, and gives up on jobs it must not or cannot probe by moving them to `dead`.

Delivery is at least once: a job leaves the pending list only in the same MULTI that writes its
result (or its dead-letter entry), so a worker killed at any point loses nothing; another worker
takes the job over with XAUTOCLAIM once it has been idle for `claim_idle` seconds. While a job is
in hand its idle time is reset regularly (XCLAIM JUSTID, which does not count as a delivery), so a
slow probe is never taken over from a live worker.

Jobs are read undecoded (`prober.streams`) and decoded one at a time: a job that is not UTF-8 is
dead-lettered like any other malformed job, and never stops the worker or the jobs behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from prober import streams
from prober.audit import AuditLog
from prober.job import Job, JobError, Result
from prober.queue import ANALYZERS, PROBERS, TRANSIENT, Keys, ensure_group
from prober.ratelimit import GlobalRate, TargetLimit
from prober.safety import TargetPolicy

log = logging.getLogger(__name__)

ProbeFn = Callable[[Job], Awaitable[Result]]


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    prefix: str = "stepstone:"
    name: str = field(default_factory=default_name)
    concurrency: int = 64
    rate: float = 50.0  # global probes/s over all workers; 0 = unlimited
    target_interval: float = 60.0  # seconds between two probes of one address
    claim_idle: float = 30.0  # seconds a job may sit idle before another worker takes it
    max_deliveries: int = 5
    block_ms: int = 1000
    heartbeat: float = 5.0
    echo_count: int = 5  # for the audit log
    max_ports: int = 32  # SYNs one job may ask for: a job is not a port scan

    def __post_init__(self) -> None:
        if min(self.concurrency, self.max_deliveries, self.block_ms, self.max_ports) < 1:
            raise ValueError("concurrency, max deliveries, max ports and block time must be positive")
        if not (0 < self.claim_idle < math.inf and 0 < self.heartbeat < math.inf):  # nan, inf too
            raise ValueError("claim idle time and heartbeat must be positive")


class Worker:
    def __init__(self, redis: aioredis.Redis, probe: ProbeFn, *, policy: TargetPolicy,
                 audit: AuditLog, settings: WorkerSettings) -> None:
        self.redis = redis
        self.probe = probe
        self.policy = policy
        self.audit = audit
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.rate = GlobalRate(redis, self.keys.rate, settings.rate)
        self.target_limit = TargetLimit(redis, settings.target_interval)
        self.stats: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_hand: set[str] = set()
        self._claim_cursor = "0-0"
        self._batch: list[tuple[str, Result, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._started = time.time()

    # ---- main loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then finish the jobs in hand and return."""
        s = self.settings
        keeper_done = asyncio.Event()
        keeper = asyncio.create_task(self._keep_alive(stop, keeper_done))
        backoff = 0.1
        resume = True  # (re)read our own pending entries first: after start and after reconnect
        outage = False  # said once per outage, not once per retry
        try:
            while not stop.is_set():
                try:
                    await ensure_group(self.redis, self.keys.jobs, PROBERS)
                    await ensure_group(self.redis, self.keys.results, ANALYZERS)
                    if resume:
                        await self._resume_own(stop)
                        resume = False
                    next_claim = 0.0
                    while not stop.is_set():
                        free = await self._free_slots(stop)
                        if free == 0:
                            continue
                        if time.monotonic() >= next_claim:
                            free -= await self._autoclaim(free)
                            next_claim = time.monotonic() + min(s.claim_idle / 2, 5.0)
                        if free > 0:
                            for entry_id, fields in await streams.read_group(
                                    self.redis, PROBERS, s.name, self.keys.jobs, ">", count=free,
                                    block_ms=s.block_ms):
                                self._spawn(entry_id, fields, 1)
                        backoff = 0.1
                        if outage:
                            log.warning("Redis available again")
                            outage = False
                except TRANSIENT as exc:  # first: a cluster's CLUSTERDOWN is a ResponseError too
                    (log.debug if outage else log.warning)("Redis unavailable (%s); retrying", exc)
                    outage = True
                    self.stats["redis_errors"] += 1
                    resume = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)  # reconnect back-off
                    backoff = min(backoff * 2, 5.0)
                except ResponseError as exc:
                    if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                        raise
                    # The stream or group vanished (deleted, or Redis restarted without
                    # persistence): create them again and carry on.
                    log.warning("consumer group missing (%s); recreating it", exc)
                    resume = True
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            keeper_done.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(keeper, 10)
            await self._leave()

    async def _free_slots(self, stop: asyncio.Event) -> int:
        if len(self._tasks) >= self.settings.concurrency:
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({*self._tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
        return 0 if stop.is_set() else max(0, self.settings.concurrency - len(self._tasks))

    async def _resume_own(self, stop: asyncio.Event) -> None:
        """Entries delivered to this consumer name before and never acknowledged."""
        last = "0"
        while not stop.is_set():
            free = await self._free_slots(stop)
            if free == 0:
                continue
            read = await streams.read_group(self.redis, PROBERS, self.settings.name, self.keys.jobs, last,
                                            count=free)
            if not read:
                return
            last = read[-1][0]
            entries = [e for e in read if e[0] not in self._in_hand]  # after a reconnect
            if entries:
                counts = await self._deliveries([e[0] for e in entries])
                for entry_id, fields in entries:
                    self._spawn(entry_id, fields, counts.get(entry_id, 1))

    async def _autoclaim(self, free: int) -> int:
        """Take over jobs other workers left idle too long; returns how many were taken."""
        s = self.settings
        cursor, claimed = await streams.autoclaim(self.redis, self.keys.jobs, PROBERS, s.name,
                                                  min_idle_ms=int(s.claim_idle * 1000),
                                                  start=self._claim_cursor, count=free)
        self._claim_cursor = cursor or "0-0"
        entries = [e for e in claimed if e[0] not in self._in_hand]
        if not entries:
            return 0
        counts = await self._deliveries([e[0] for e in entries])
        for entry_id, fields in entries:
            self.stats["claimed"] += 1
            self._spawn(entry_id, fields, counts.get(entry_id, 1))
        return len(entries)

    async def _deliveries(self, ids: list[str]) -> dict[str, int]:
        """Delivery counts of pending entries (only needed for re-deliveries: a fresh one is 1)."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            # Undecoded: the reply names the consumer, and a consumer's name is anyone's choice.
            streams.pending_range(pipe, self.keys.jobs, PROBERS, (entry_id, entry_id), count=1)
        out = {}
        for rows in await pipe.execute():
            for row in rows:
                out[row["message_id"].decode("ascii")] = int(row["times_delivered"])
        return out

    def _spawn(self, entry_id: str, fields: streams.RawFields | None, deliveries: int) -> None:
        self._in_hand.add(entry_id)
        task = asyncio.create_task(self._handle(entry_id, fields, deliveries))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._in_hand.discard(entry_id)

        task.add_done_callback(done)

    async def _keep_alive(self, stop: asyncio.Event, done: asyncio.Event) -> None:
        """Heartbeat key for `status`, and reset the idle time of the jobs in hand, until `done`.
        (An event rather than task cancellation: redis-py may swallow a CancelledError that lands
        mid-command.)"""
        s = self.settings
        period = min(s.heartbeat, s.claim_idle / 3)
        while not done.is_set():
            try:
                if self._in_hand:
                    await self.redis.xclaim(self.keys.jobs, PROBERS, s.name, min_idle_time=0,
                                            message_ids=list(self._in_hand), justid=True)
                info = {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started,
                        "in_hand": len(self._in_hand), "stopping": stop.is_set(), **self.stats}
                await self.redis.set(self.keys.worker(s.name), json.dumps(info),
                                     ex=max(3, round(3 * s.heartbeat)))
            except (ResponseError, *TRANSIENT) as exc:
                log.debug("heartbeat: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), period)  # the heartbeat period

    async def _leave(self) -> None:
        """On a clean exit: drop the heartbeat, and the consumer if nothing is pending for it."""
        with contextlib.suppress(ResponseError, *TRANSIENT):
            await self.redis.delete(self.keys.worker(self.settings.name))
            mine = await self.redis.xpending_range(self.keys.jobs, PROBERS, min="-", max="+", count=1,
                                                   consumername=self.settings.name)
            if not mine:
                await self.redis.xgroup_delconsumer(self.keys.jobs, PROBERS, self.settings.name)

    # ---- one job ---------------------------------------------------------------------------

    async def _handle(self, entry_id: str, raw: streams.RawFields | None, deliveries: int) -> None:
        s = self.settings
        try:
            if not raw:
                # Trimmed from the stream while pending: nothing left to probe or report.
                await self.redis.xack(self.keys.jobs, PROBERS, entry_id)
                return
            try:
                fields = streams.decode_entry(raw)
            except streams.EntryError as exc:
                # Dead-lettered with its fields shown escaped, so that `dead` stays readable text.
                fields = {streams.shown(k, 200): streams.shown(v, 200) for k, v in list(raw.items())[:16]}
                self.audit.write("rejected", target=fields.get("src", ""), reason=f"malformed job: {exc}",
                                 job=entry_id)
                await self._dead(entry_id, fields, f"malformed job: {exc}", "malformed")
                return
            src = fields.get("src", "")
            try:
                job = Job.from_fields(entry_id, fields)
            except JobError as exc:
                self.audit.write("rejected", target=src, reason=f"malformed job: {exc}", job=entry_id)
                await self._dead(entry_id, fields, f"malformed job: {exc}", "malformed")
                return
            if deliveries > s.max_deliveries:
                await self._dead(entry_id, fields, f"delivered {deliveries} times (limit {s.max_deliveries}):"
                                 " workers kept dying or failing on it", "dead_lettered")
                return
            if (late := time.time() - job.deadline) > 0:
                await self._dead(entry_id, fields, f"deadline passed {late:.1f}s before the probe",
                                 "deadline_dropped")
                return
            refusal = self.policy.refusal(job.src)
            if refusal is None and len(set(job.ports)) > s.max_ports:
                refusal = f"{len(set(job.ports))} ports asked, at most {s.max_ports} per job (--max-ports)"
            if refusal is None:
                left = await self.target_limit.check(self.keys.target(job.src), entry_id)
                if left is not None:
                    refusal = (f"per-target limit: {job.src} was probed less than "
                               f"{s.target_interval:g}s ago ({left:.1f}s left)")
            if refusal is not None:
                self.audit.refusal(target=job.src, reason=refusal, job=entry_id)
                await self._dead(entry_id, fields, f"refused: {refusal}", "refused")
                return
            wait = await self.rate.reserve(max_wait=job.deadline - time.time())
            if wait is None:
                await self._dead(entry_id, fields, "deadline passed: the global rate limit has no free "
                                 "slot before it", "deadline_dropped")
                return
            if wait > 0:
                await asyncio.sleep(wait)  # our reserved slot under the global rate
            self.audit.probe(target=job.src, ports=job.ports, echo_count=s.echo_count, job=entry_id)
            try:
                result = await self.probe(job)
            except (asyncio.CancelledError, *TRANSIENT):
                raise
            except Exception as exc:
                log.exception("probe of %s (job %s) failed", job.src, entry_id)
                await self._dead(entry_id, fields, f"probe failed: {type(exc).__name__}: {exc}",
                                 "probe_failed")
                return
            await self._complete(entry_id, result)
        except TRANSIENT as exc:
            # Left pending: re-read after reconnecting or taken over by another worker.
            log.warning("job %s left pending, Redis unavailable: %s", entry_id, exc)

    async def _complete(self, entry_id: str, result: Result) -> None:
        """Write the result and acknowledge the job atomically. Completions that arrive while a
        write is in flight go together in the next MULTI: one round trip for many jobs."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((entry_id, result, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await fut
        self.stats["probes"] += 1

    async def _flush(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            second = int(time.time())
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for _entry_id, result, _fut in batch:
                        pipe.xadd(self.keys.results, result.fields())  # type: ignore[arg-type]
                    pipe.xack(self.keys.jobs, PROBERS, *(entry_id for entry_id, _r, _f in batch))
                    pipe.incrby(self.keys.probes_second(second), len(batch))
                    pipe.expire(self.keys.probes_second(second), 120)
                    pipe.hincrby(self.keys.stats, "probes", len(batch))
                    await pipe.execute()
            except Exception as exc:
                for _entry_id, _result, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _entry_id, _result, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def _dead(self, entry_id: str, fields: dict[str, str], reason: str, counter: str) -> None:
        # The job's own fields travel along, cut short: a dead letter is for reading, not a copy.
        entry = {**{k[:200]: v[:1000] for k, v in fields.items()}, "job": entry_id,
                 "src": fields.get("src", "")[:200], "reason": reason,
                 "worker": self.settings.name, "dead_at": repr(time.time())}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead, entry)  # type: ignore[arg-type]
            pipe.xack(self.keys.jobs, PROBERS, entry_id)
            pipe.hincrby(self.keys.stats, counter, 1)
            await pipe.execute()
        self.stats[counter] += 1
        log.info("job %s -> dead: %s", entry_id, reason)
