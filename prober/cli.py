"""`stepstone-prober`: probe workers (run), queue inspection (status), one-off probes (probe)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prober import shards
from prober.audit import AuditLog, default_path
from prober.job import DEFAULT_PORTS, EPOCH_MAX, Job, JobError, short
from prober.metrics import ProberMetrics, serve
from prober.options import DAY, YEAR, check_ranges
from prober.probe import Prober, ProbeSettings
from prober.queue import (
    DEFAULT_PREFIX,
    MAX_DEADLINE,
    MAX_DEDUP_WINDOW,
    ProbeQueue,
    QueueConfigError,
    connect,
)
from prober.safety import TargetPolicy, parse_networks
from prober.worker import Worker, WorkerSettings, default_name

DEFAULT_REDIS = os.environ.get("STEPSTONE_REDIS", "redis://localhost:6379/0")


class UsageError(Exception):
    """Bad configuration: one line on stderr, exit 2."""


# Every numeric option's range (by argparse dest), checked after the more specific checks below.
RANGES: dict[str, tuple[float, float]] = {
    "concurrency": (1, 10_000),
    "rate": (0, 1e6),
    "target_interval": (0, YEAR),
    "claim_idle": (0.001, DAY),
    "max_deliveries": (1, 1000),
    "max_ports": (1, 65535),
    "count": (1, 100),
    "interval": (0, 10),
    "reply_wait": (0.01, 30),
    "t": (0, EPOCH_MAX),
    "deadline": (0.001, MAX_DEADLINE),
    "dedup_window": (0, MAX_DEDUP_WINDOW),
    "metrics_port": (0, 65535),
}


def _ranges(args: argparse.Namespace) -> None:
    try:
        check_ranges(args, RANGES)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _ports(text: str) -> tuple[int, ...]:
    try:
        return Job.from_fields("", {"src": "0.0.0.0", "t": "0", "deadline": "0", "ports": text}).ports
    except JobError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_redis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=DEFAULT_REDIS, metavar="URL",
                   help="redis://[user:password@]host:port/db, rediss://... (TLS), "
                   "unix://[user:password@]/path/redis.sock or redis+cluster://host:port[,host:port...] "
                   "(default: $STEPSTONE_REDIS or %(default)s)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help="key prefix of the streams and counters (default %(default)s)")


def _add_shards(p: argparse.ArgumentParser, which: str | None) -> None:
    g = p.add_argument_group("shards (docs/cluster.md)")
    g.add_argument("--shards", type=int, default=1, metavar="N",
                   help="the sources are split into N shards, shard i's keys under <prefix>{i}: (the "
                   "analyzers' --shards; default 1)")
    if which is not None:
        g.add_argument("--shard", metavar="LIST", help=which)


def _layout(args: argparse.Namespace) -> tuple[shards.Layout, tuple[int, ...]]:
    try:
        layout = shards.layout(args.prefix, args.shards, args.redis)
        served = shards.parse_shard_list(getattr(args, "shard", None), args.shards)
        if shards.is_cluster(args.redis):
            shards.parse_cluster_url(args.redis)
    except shards.ShardError as exc:
        raise UsageError(str(exc)) from None
    return layout, served


def _add_safety(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "safety", "Special-purpose address space (private, loopback, link-local, CGN, documentation, "
        "benchmarking, multicast, reserved; IPv4 and IPv6, per the IANA registries) is never probed "
        "unless --allow names it. --exclude always wins.")
    g.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="open this network even if special-purpose (repeatable), e.g. the lab's "
                   "198.18.0.0/15")
    g.add_argument("--exclude", action="append", default=[], metavar="CIDR",
                   help="never probe this network (repeatable)")
    g.add_argument("--audit-log", default=None, metavar="PATH",
                   help=f"JSON lines: every probe sent and every refusal (default {default_path()})")


def _add_probe(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probe", "One probe = COUNT echo requests INTERVAL apart plus one SYN to "
                             "each port at once; replies count up to REPLY_WAIT after their request.")
    g.add_argument("--count", type=int, default=5, help="echo requests per probe (default %(default)s)")
    g.add_argument("--interval", type=float, default=0.05,
                   help="seconds between echo requests (default %(default)s)")
    g.add_argument("--reply-wait", type=float, default=1.0,
                   help="seconds to wait for each reply (default %(default)s)")
    # --p0f-db as in stepstone-analyzer, so that one option name selects the database everywhere.
    g.add_argument("--p0f-db", "--db", dest="db", default=None, metavar="PATH",
                   help="p0f database for the SYN+ACK (default: the project's, as the analyzer)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepstone-prober",
        description="Active measurement for stepstone: ping statistics (T^a) and the p0f label of the "
        "SYN+ACK (F^a) of addresses queued by the analyzer on Redis Streams. Needs root or "
        "CAP_NET_RAW to send.",
        epilog="Inspect the queue: stepstone-prober status --redis URL, or with redis-cli: "
        "XINFO GROUPS stepstone:jobs, XPENDING stepstone:jobs probers - + 10, XRANGE stepstone:dead - +")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="work on the job queue until SIGTERM",
        description="Take probe jobs from <prefix>jobs (group probers), probe, write <prefix>results; "
        "give up on jobs to <prefix>dead with a reason. Run any number of these on any number of hosts: "
        "they share the work. SIGTERM finishes the jobs in hand, then exits 0.")
    _add_redis(run)
    run.add_argument("--name", default=None,
                     help="consumer name (default HOST-PID); a stable name lets a restarted worker "
                     "resume its own unacknowledged jobs at once")
    run.add_argument("--concurrency", type=int, default=64, help="probes in flight (default %(default)s)")
    run.add_argument("--rate", type=float, default=50.0, metavar="PROBES_PER_S",
                     help="global limit over ALL workers sharing this Redis (default %(default)s; "
                     "0 = unlimited)")
    run.add_argument("--target-interval", type=float, default=60.0, metavar="SECONDS",
                     help="minimum time between two probes of one address (default %(default)s; 0 = off)")
    run.add_argument("--claim-idle", type=float, default=30.0, metavar="SECONDS",
                     help="take over jobs another worker left unacknowledged this long (default "
                     "%(default)s)")
    run.add_argument("--max-deliveries", type=int, default=5,
                     help="dead-letter a job delivered more often than this (default %(default)s)")
    run.add_argument("--max-ports", type=int, default=32,
                     help="refuse jobs asking for more SYN ports than this (default %(default)s)")
    # As stepstone-analyzer run: the same two options, the same endpoint.
    run.add_argument("--metrics-port", type=int, default=0, metavar="N",
                     help="serve Prometheus metrics on http://ADDR:N/metrics (default 0 = off)")
    run.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                     help="address the metrics endpoint binds (default %(default)s)")
    _add_shards(run, "the shards this worker serves, e.g. 0,3-5 (default all); --rate is split evenly "
                "over all N shards, --concurrency over the shards served")
    _add_safety(run)
    _add_probe(run)
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status", help="queue state: lengths, pending, workers, probe rate",
        description="Stream lengths, pending entries per consumer, oldest pending age, workers alive "
        "(heartbeat), dead-letter count, probes/s over the last minute, counters.")
    _add_redis(status)
    _add_shards(status, "the shards to show, e.g. 0,3-5 (default all)")
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.set_defaults(func=cmd_status)

    probe = sub.add_parser(
        "probe", help="probe one address now and print the result as JSON",
        description="One probe of ADDR outside the queue (same safety rules and audit log), printed as "
        "JSON: the result fields plus the per-port answers and the SYN+ACK's p0f signature.")
    probe.add_argument("address", metavar="ADDR")
    probe.add_argument("--ports", type=_ports, default=DEFAULT_PORTS,
                       help=f"comma-separated SYN ports (default {','.join(map(str, DEFAULT_PORTS))})")
    _add_safety(probe)
    _add_probe(probe)
    probe.set_defaults(func=cmd_probe)

    enqueue = sub.add_parser(
        "enqueue", help="queue a probe job by hand (as the analyzer does)",
        description="Add a job for ADDR to <prefix>jobs, unless ADDR was queued within the dedup window.")
    _add_redis(enqueue)
    _add_shards(enqueue, None)
    enqueue.add_argument("address", metavar="ADDR")
    enqueue.add_argument("--t", type=float, default=None, help="SYN time, epoch seconds (default now)")
    enqueue.add_argument("--deadline", type=float, default=60.0,
                         help="seconds after --t the job expires (default %(default)s)")
    enqueue.add_argument("--dedup-window", type=float, default=3600.0,
                         help="seconds (default %(default)s; 0 = always enqueue)")
    enqueue.add_argument("--ports", type=_ports, default=None, help="comma-separated SYN ports")
    enqueue.set_defaults(func=cmd_enqueue)
    return parser


def _policy(args: argparse.Namespace) -> TargetPolicy:
    try:
        return TargetPolicy(allow=parse_networks(args.allow, "--allow"),
                            exclude=parse_networks(args.exclude, "--exclude"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _settings(args: argparse.Namespace) -> ProbeSettings:
    try:
        return ProbeSettings(count=args.count, interval=args.interval, reply_wait=args.reply_wait)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _open(prober: Prober) -> None:
    try:
        prober.open()
    except PermissionError as exc:
        raise UsageError(f"{exc} (run as root, or setcap cap_net_raw+ep on the interpreter)") from None
    except (OSError, ValueError) as exc:
        prober.close()
        raise UsageError(f"--db: cannot load the p0f database: {exc}") from None


def _audit(args: argparse.Namespace, name: str) -> AuditLog:
    audit = AuditLog(args.audit_log, worker=name)
    try:
        audit.open()
    except OSError as exc:
        raise UsageError(f"cannot open the audit log {audit.path}: {exc.strerror or exc}") from None
    return audit


async def _connect(url: str):  # type: ignore[no-untyped-def]
    try:
        return await connect(url)
    except (QueueConfigError, shards.ShardError) as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    name = args.name or default_name()
    policy, probe_settings = _policy(args), _settings(args)
    try:
        settings = WorkerSettings(prefix=args.prefix, name=name, concurrency=args.concurrency,
                                  rate=args.rate, target_interval=args.target_interval,
                                  claim_idle=args.claim_idle, max_deliveries=args.max_deliveries,
                                  echo_count=probe_settings.count, max_ports=args.max_ports)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # `not 0 <= x < inf`, not `x < 0`: nan and inf pass a plain comparison and then break the
    # rate limiter's arithmetic on the first job (a safety limit must fail at start-up).
    if not (0 <= args.rate < math.inf and 0 <= args.target_interval < math.inf):
        raise UsageError("--rate and --target-interval must be finite numbers >= 0")
    _ranges(args)
    layout, served = _layout(args)
    audit = _audit(args, name)
    if layout.tagged:
        return asyncio.run(_run_shards(args, layout, served, settings=settings, policy=policy,
                                       probe_settings=probe_settings, audit=audit))

    async def main() -> int:
        conn = await _connect(args.redis)
        prober = Prober(probe_settings, db_path=args.db)
        _open(prober)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(conn, prober, policy=policy, audit=audit, settings=settings)
        stop_metrics, lag = None, None
        if args.metrics_port:
            metrics = ProberMetrics(worker.stats)
            worker.probe = metrics.timed(worker.probe)
            try:
                stop_metrics = serve(metrics.registry, args.metrics_port, args.metrics_addr)
            except OSError as exc:
                prober.close()
                audit.close()
                await conn.aclose()
                raise UsageError(f"--metrics-port: cannot serve on {args.metrics_addr}:{args.metrics_port}: "
                                 f"{exc}") from None
            lag = asyncio.create_task(metrics.watch_lag(conn, worker.keys.jobs, stop))
        print(f"stepstone-prober: worker {name} ready (audit log {audit.path})", file=sys.stderr, flush=True)
        try:
            await worker.run(stop)
        except ResponseError as exc:  # e.g. WRONGTYPE (a key of ours holds something else), NOPERM
            raise UsageError(f"Redis refused a command: {exc}") from None
        finally:
            if lag is not None:
                stop.set()  # the lag watch ends on `stop` (also when the worker failed)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(lag, 10)
            if stop_metrics is not None:
                stop_metrics()
            prober.close()
            audit.close()
            await conn.aclose()
        return 0

    return asyncio.run(main())


async def _run_shards(args: argparse.Namespace, layout: shards.Layout, served: Sequence[int], *,
                      settings: WorkerSettings, policy: TargetPolicy, probe_settings: ProbeSettings,
                      audit: AuditLog) -> int:
    """One worker per shard served, each with its own client and keys (`<prefix>{i}:`), sharing
    the probe sockets, the audit log and one /metrics endpoint (samples labelled `shard`). The
    global rate is split evenly over the N shards (each shard's workers, in any process, share its
    part), so N shards together never exceed --rate; a dead shard's workers retry, the others go on."""
    clients = shards.clients(args.redis, served)
    rate = settings.rate / layout.count
    concurrency = max(1, -(-settings.concurrency // len(served)))
    prober = Prober(probe_settings, db_path=args.db)
    try:
        _open(prober)
    except UsageError:
        for conn in clients.values():
            await conn.aclose()
        raise
    workers = {i: Worker(clients[i], prober, policy=policy, audit=audit,
                         settings=replace(settings, prefix=layout.prefix_of(i), rate=rate,
                                          concurrency=concurrency))
               for i in served}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stop_metrics, lags = None, []
    if args.metrics_port:
        registries = {}
        for i, worker in workers.items():
            metrics = ProberMetrics(worker.stats)
            worker.probe = metrics.timed(worker.probe)
            registries[i] = metrics.registry
            lags.append(asyncio.create_task(metrics.watch_lag(clients[i], worker.keys.jobs, stop)))
        try:
            stop_metrics = serve(shards.merge(registries), args.metrics_port, args.metrics_addr)
        except OSError as exc:
            stop.set()
            await asyncio.gather(*lags, return_exceptions=True)
            prober.close()
            audit.close()
            for conn in clients.values():
                await conn.aclose()
            raise UsageError(f"--metrics-port: cannot serve on {args.metrics_addr}:{args.metrics_port}: "
                             f"{exc}") from None
    print(f"stepstone-prober: worker {settings.name} ready for shards {','.join(map(str, served))} of "
          f"{layout.count} (audit log {audit.path})", file=sys.stderr, flush=True)
    try:
        runs = [asyncio.create_task(w.run(stop), name=f"shard {i}") for i, w in workers.items()]
        await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()  # a worker that failed (a refused command) stops the others, as unsharded
        for outcome in await asyncio.gather(*runs, return_exceptions=True):
            if isinstance(outcome, ResponseError):
                raise UsageError(f"Redis refused a command: {outcome}") from None
            if isinstance(outcome, BaseException):
                raise outcome
    finally:
        stop.set()
        await asyncio.gather(*lags, return_exceptions=True)
        if stop_metrics is not None:
            stop_metrics()
        prober.close()
        audit.close()
        for conn in clients.values():
            await conn.aclose()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from prober import status

    layout, served = _layout(args)

    async def main() -> int:
        conn = await _connect(args.redis)
        try:
            if not layout.tagged:
                info = await status.gather(conn, args.prefix)
                _output(json.dumps(info, indent=2) if args.json else status.render(info))
                return 0
            # Sharded: each shard on its own; one whose node is down says so, the others show.
            per: dict[str, Any] = {}
            for i in served:
                try:
                    per[str(i)] = await status.gather(conn, layout.prefix_of(i))
                except (RedisConnectionError, RedisTimeoutError, OSError, *shards.CLUSTER_TRANSIENT) as exc:
                    per[str(i)] = {"error": f"unreachable: {exc}"}
        finally:
            await conn.aclose()
        if args.json:
            _output(json.dumps({"shards": per}, indent=2))
        else:
            _output("\n\n".join(f"shard {i}: {info['error']}" if "error" in info else
                                 f"shard {i}:\n{status.render(info)}" for i, info in per.items()))
        return 0

    return asyncio.run(main())


def cmd_probe(args: argparse.Namespace) -> int:
    policy, probe_settings = _policy(args), _settings(args)
    _ranges(args)
    try:
        job = Job.from_fields("cli", {"src": args.address, "t": repr(time.time()),
                                      "deadline": repr(time.time() + 3600),
                                      "ports": ",".join(map(str, args.ports))})
    except JobError as exc:
        raise UsageError(str(exc)) from None
    audit = _audit(args, f"cli-{default_name()}")
    refusal = policy.refusal(job.src)
    if refusal is not None:
        audit.refusal(target=job.src, reason=refusal, job="cli")
        raise UsageError(f"refused to probe {job.src}: {refusal}")

    async def main() -> int:
        prober = Prober(probe_settings, db_path=args.db)
        _open(prober)
        try:
            audit.probe(target=job.src, ports=job.ports, echo_count=probe_settings.count, job="cli")
            measurement = await prober.measure(job)
        finally:
            prober.close()
            audit.close()
        _output(json.dumps(measurement.to_dict()))
        return 0

    return asyncio.run(main())


def cmd_enqueue(args: argparse.Namespace) -> int:
    try:
        ProbeQueue.check_settings(args.dedup_window, args.deadline)  # the same limits, its message
    except QueueConfigError as exc:
        raise UsageError(str(exc)) from None
    _ranges(args)

    layout, _ = _layout(args)
    try:
        prefix = layout.prefix_for(args.address)  # the address's shard: where its analyzer looks
    except ValueError:
        raise UsageError(f"not an IP address: {short(args.address)}") from None

    async def main() -> int:
        conn = await _connect(args.redis)
        try:
            queue = ProbeQueue(conn, prefix=prefix, dedup_window=args.dedup_window,
                               deadline=args.deadline)
            job_id = await queue.enqueue(args.address, time.time() if args.t is None else args.t,
                                         ports=args.ports)
        except (JobError, QueueConfigError) as exc:
            raise UsageError(str(exc)) from None
        finally:
            await conn.aclose()
        _output(job_id if job_id is not None else f"{args.address}: queued within the dedup window, skipped")
        return 0

    return asyncio.run(main())


def _output(text: str) -> None:
    """One result on stdout, flushed now so that a full disk is reported here, in one line."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise  # `... | head`: quiet, see main
    except OSError as exc:
        # Point stdout at /dev/null so that the interpreter's flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise UsageError(f"cannot write the output: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"stepstone-prober: {exc}", file=sys.stderr)
        return 2
    except ResponseError as exc:  # status, enqueue: e.g. WRONGTYPE (a key of ours holds something else)
        print(f"stepstone-prober: Redis refused a command: {exc}", file=sys.stderr)
        return 2
    except (RedisConnectionError, RedisTimeoutError) as exc:  # Redis went away after connecting
        print(f"stepstone-prober: lost the connection to Redis: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
