"""`stepstone-responder run`: answer every TCP connection request to the darknet and hand each
handshake to the analyzer through the Redis stream `<prefix>handshakes` (or print it as JSON)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from analyzer.cancellation import cancel_and_wait
from analyzer.handshake import Handshake
from prober import shards
from prober.job import short
from prober.metrics import serve as serve_metrics
from responder.banners import (
    DEFAULT_SESSIONS,
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    BannerError,
    Banners,
    load_banners,
)
from responder.kernel import Network, Steering, SteeringError
from responder.listener import ListenerError, accept_forever, accept_pending, open_listener
from responder.metrics import registry_for

# Unconsumed handshakes kept in Redis at most; the analyzer reads far faster than a darknet sends.
STREAM_MAXLEN = 1_000_000
# Handshakes held in memory while Redis is unreachable; the oldest are dropped beyond this.
BACKLOG = 100_000


def _darknet(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address prefix: {text!r}") from None


def _port(text: str) -> int:
    # ASCII digits, at most 5: int() refuses '²' and a 5000-digit number with a traceback-ish error.
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {short(text)}")
    return int(text)


def _metrics_port(text: str) -> int:
    return 0 if text == "0" else _port(text)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT:  # NaN fails too
        raise argparse.ArgumentTypeError(f"not a number of seconds in (0, {MAX_TIMEOUT:g}]: {short(text)}")
    return value


def _sessions(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a count 1..999999: {short(text)}")
    return int(text)


BANNERS_EXAMPLE = """\
--banners FILE (TOML): after the handshake on these ports, send the banner,
time the client's first data (tapp_us: banner out -> first byte in, for the
analyzer's cond_app), keep its first 64 bytes (app_data), close. Nothing else
is sent and no session is kept. Other ports are closed at once, as without it.

  # port = banner: a TOML basic string (\\r\\n escapes), sent as Latin-1
  # bytes (\\u00ff is the byte 0xff); ports 1..65535, banners 1..1024 bytes
  [banners]
  21 = "220 (vsFTPd 3.0.3)\\r\\n"
  22 = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\\r\\n"
  # Telnet: IAC DO TERMINAL-TYPE, TSPEED, XDISPLOC, NEW-ENVIRON (as Linux telnetd)
  23 = "\\u00ff\\u00fd\\u0018\\u00ff\\u00fd\\u0020\\u00ff\\u00fd\\u0023\\u00ff\\u00fd\\u0027"
  25 = "220 mail.example.net ESMTP Postfix (Debian/GNU)\\r\\n"

(responder/banners.example.toml is the same file.)
"""


class _Formatter(argparse.HelpFormatter):
    """Paragraphs wrap as usual; a text with line breaks of its own (the example) is kept as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return text
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepstone-responder",
        description="Complete every TCP handshake to a darknet (the kernel answers; nftables steers "
        "every port to one listener) and report each one to the analyzer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="answer the darknet until SIGTERM / Ctrl-C",
        description="Needs root. On start it adds a local route for each darknet prefix and the "
        "nftables table inet stepstone_responder (every TCP port of the darknet -> one listener); "
        "both are removed on exit (SIGTERM, Ctrl-C, errors; after a kill -9 the next start "
        "takes them over). Each completed handshake (the "
        "client's SYN, original destination, the kernel's RTT sample) goes to the Redis stream "
        "<prefix>handshakes (default stepstone:handshakes) for `stepstone-analyzer run --handshakes`.",
        epilog=BANNERS_EXAMPLE, formatter_class=_Formatter,
    )
    run.add_argument("--darknet", type=_darknet, action="append", required=True, metavar="CIDR",
                     help="darknet prefix (repeat for several)")
    run.add_argument("--redis", metavar="URL",
                     help="Redis URL (redis://host:port/0, unix:///path); without it, JSON lines on stdout")
    run.add_argument("--prefix", default="stepstone:", help="Redis key prefix (default %(default)s)")
    run.add_argument("--shards", type=int, default=1, metavar="N",
                     help="with --redis: each handshake goes to its source's shard, "
                     "<prefix>{i}:handshakes (the analyzers' --shards; docs/cluster.md; default 1)")
    run.add_argument("--listen-port", type=_port, default=4, metavar="N",
                     help="the single listener's port (default %(default)s)")
    # As stepstone-analyzer run and stepstone-prober run: the same two options, the same endpoint.
    run.add_argument("--metrics-port", type=_metrics_port, default=0, metavar="N",
                     help="serve Prometheus metrics on http://ADDR:N/metrics (default 0 = off)")
    run.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                     help="address the metrics endpoint binds (default %(default)s)")
    run.add_argument("--banners", metavar="FILE",
                     help="server-first banners per port (TOML, example below); without it every "
                     "connection is closed at once")
    run.add_argument("--banner-timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="S",
                     help="seconds to wait for the client's first data after a banner "
                     "(default %(default)s)")
    run.add_argument("--banner-sessions", type=_sessions, default=DEFAULT_SESSIONS, metavar="N",
                     help="banner exchanges open at once, at most; beyond, a connection is reported "
                     "without a banner and counted as dropped (default %(default)s)")
    return parser


class MetricsError(RuntimeError):
    pass


class Sink:
    """Where handshakes go: a Redis stream, retried while Redis is down, or stdout."""

    def __init__(self, url: str | None, stream: str) -> None:
        self.stream = stream
        self.client = aioredis.from_url(url, decode_responses=True) if url else None
        self.queue: asyncio.Queue[Handshake] = asyncio.Queue(BACKLOG)
        self.received = 0
        self.sent = 0
        self.dropped = 0
        self.redis_errors = 0
        self.holding = 0  # the handshake in hand: taken off the queue, not yet written

    def backlog(self) -> int:
        return self.queue.qsize() + self.holding

    def put(self, handshake: Handshake) -> None:
        self.received += 1
        if self.queue.full():
            self.queue.get_nowait()
            self.queue.task_done()
            self.dropped += 1
        self.queue.put_nowait(handshake)

    async def run(self) -> None:
        while True:
            handshake = await self.queue.get()
            if self.client is None:
                fields = handshake.to_fields()  # bytes as the stream carries them: base64
                record = asdict(handshake) | {"syn": fields["syn"], "app_data": fields["app_data"] or None}
                print(json.dumps(record), flush=True)
                self.sent += 1
                self.queue.task_done()
                continue
            delay = 0.1
            self.holding = 1
            while True:
                try:
                    await self.client.xadd(self.stream, handshake.to_fields(),  # type: ignore[arg-type]
                                           maxlen=STREAM_MAXLEN, approximate=True)
                    self.sent += 1
                    self.holding = 0
                    self.queue.task_done()
                    break
                except (RedisError, OSError) as exc:
                    self.redis_errors += 1
                    print(f"stepstone-responder: redis: {exc}; retrying", file=sys.stderr, flush=True)
                    await asyncio.sleep(delay)  # backoff before reconnecting, not synchronisation
                    delay = min(delay * 2, 5.0)

    async def drain(self, grace: float) -> None:
        """On shutdown: give queued handshakes a bounded chance to reach Redis."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.queue.join()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def _sink(redis_url: str | None, prefix: str, shard_count: int) -> Sink | shards.Appender:
    """The one stream of old, or (several shards, or a cluster) one per shard (prober.shards)."""
    if redis_url is None or not (layout := shards.layout(prefix, shard_count, redis_url)).tagged:
        return Sink(redis_url, f"{prefix}handshakes")
    replicas, wait_ms = shards.wait_replicas(redis_url)
    return shards.Appender(shards.producer_clients(redis_url, range(shard_count)), layout, backlog=BACKLOG,
                           maxlen=STREAM_MAXLEN, replicas=replicas, timeout_ms=wait_ms)


async def serve(darknets: Sequence[Network], port: int, redis_url: str | None, prefix: str,
                metrics: tuple[int, str] = (0, "127.0.0.1"), *, banners: Banners | None = None,
                shard_count: int = 1) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    families = sorted({socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in darknets})
    listeners = [open_listener(family, port) for family in families]
    sink = _sink(redis_url, prefix, shard_count)
    tasks: list[asyncio.Task[None]] = []
    stop_metrics = None
    try:
        if metrics[0]:
            # Before the steering: a busy port fails before anything on the host is changed.
            try:
                registry = registry_for(sink, banners)
                if isinstance(sink, shards.Appender):
                    registry.register(shards.AppenderMetrics(sink, "stepstone_responder"))  # type: ignore[arg-type]
                stop_metrics = serve_metrics(registry, *metrics)
            except OSError as exc:
                raise MetricsError(f"--metrics-port: cannot serve on {metrics[1]}:{metrics[0]}: "
                                   f"{exc}") from None
        with Steering(darknets, port):
            on = f"; banners on {', '.join(map(str, sorted(banners.banners)))}" if banners else ""
            print(f"stepstone-responder: answering {', '.join(map(str, darknets))} on port {port}{on}",
                  file=sys.stderr, flush=True)

            def take(conn: socket.socket, handshake: Handshake) -> bool:
                """A banner port's connection becomes its own exchange, which reports it later."""
                if banners is None or not banners.wants(handshake):
                    return False
                banners.start(conn, handshake, sink.put)
                return True

            async def pump(listener: socket.socket) -> None:
                async for handshake in accept_forever(listener, take):
                    sink.put(handshake)

            tasks = [asyncio.create_task(pump(sock)) for sock in listeners]
            tasks.append(asyncio.create_task(sink.run()))
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in done:
                if task is not waiter and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            # Stop answering first, report what the kernel already completed, then flush.
            await cancel_and_wait(tasks[:-1])
            for sock in listeners:
                for handshake in accept_pending(sock):
                    sink.put(handshake)
            if banners is not None:
                await banners.stop()  # open exchanges report their handshakes, untimed
            await sink.drain(2.0)
    finally:
        if banners is not None:
            await banners.stop()
        await cancel_and_wait(tasks)
        if stop_metrics is not None:
            stop_metrics()
        for sock in listeners:
            sock.close()
        await sink.close()
        said = (f"; banners: {banners.sent} sent, {banners.answered} answered, {banners.silent} silent, "
                f"{banners.early} spoke first, {banners.dropped} dropped (over --banner-sessions)"
                if banners is not None else "")
        # Never silently: what Redis did not take before the exit is lost, and said so.
        unsent = f", {held} not written (Redis did not take them in time)" if (held := sink.backlog()) else ""
        print(f"stepstone-responder: stopped; {sink.sent} handshakes reported, {sink.dropped} dropped"
              f"{unsent}{said}", file=sys.stderr, flush=True)
    return 0


DESCRIPTOR_HEADROOM = 64  # the listeners, Redis, metrics, the event loop, `ip`/`nft` at exit


def _descriptors_for(sessions: int) -> str | None:
    """Every open banner exchange holds a descriptor: raise the soft RLIMIT_NOFILE to what
    `sessions` need (up to the hard limit). None if it fits; else the one line to warn with (the
    exchanges beyond it wait for a descriptor: the accept loop backs off, it does not die)."""
    need = sessions + DESCRIPTOR_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft >= need:
        return None
    return (f"--banner-sessions {sessions} needs {need} open files, the limit is {soft} (raise it: "
            f"ulimit -n, systemd LimitNOFILE=); exchanges beyond it wait for a descriptor")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.redis is not None:
        try:
            shards.client(args.redis)  # also redis+cluster://; no I/O yet
        except ValueError as exc:
            print(f"stepstone-responder: --redis: {exc}", file=sys.stderr)
            return 2
    try:  # without --redis too: a bad --shards is refused, never ignored
        shards.layout(args.prefix, args.shards, args.redis or "")
    except ValueError as exc:
        print(f"stepstone-responder: {exc}", file=sys.stderr)
        return 2
    banners = None
    if args.banners is not None:
        try:
            banners = Banners(load_banners(args.banners), args.banner_timeout, args.banner_sessions)
        except BannerError as exc:
            print(f"stepstone-responder: {exc}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("stepstone-responder: needs root (a local route and an nftables table)", file=sys.stderr)
        return 2
    if banners is not None and (short_of := _descriptors_for(args.banner_sessions)) is not None:
        print(f"stepstone-responder: warning: {short_of}", file=sys.stderr)
    try:
        return asyncio.run(serve(args.darknet, args.listen_port, args.redis, args.prefix,
                                 (args.metrics_port, args.metrics_addr), banners=banners,
                                 shard_count=args.shards))
    except (SteeringError, ListenerError, MetricsError) as exc:
        print(f"stepstone-responder: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
