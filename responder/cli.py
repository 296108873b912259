"""`stepstone-responder run`: answer every TCP connection request to the darknet and hand each
handshake to the analyzer through the Redis stream `<prefix>handshakes` (or print it as JSON)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from analyzer.cancellation import cancel_and_wait
from analyzer.handshake import Handshake
from prober.job import short
from prober.metrics import serve as serve_metrics
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
    )
    run.add_argument("--darknet", type=_darknet, action="append", required=True, metavar="CIDR",
                     help="darknet prefix (repeat for several)")
    run.add_argument("--redis", metavar="URL",
                     help="Redis URL (redis://host:port/0, unix:///path); without it, JSON lines on stdout")
    run.add_argument("--prefix", default="stepstone:", help="Redis key prefix (default %(default)s)")
    run.add_argument("--listen-port", type=_port, default=4, metavar="N",
                     help="the single listener's port (default %(default)s)")
    # As stepstone-analyzer run and stepstone-prober run: the same two options, the same endpoint.
    run.add_argument("--metrics-port", type=_metrics_port, default=0, metavar="N",
                     help="serve Prometheus metrics on http://ADDR:N/metrics (default 0 = off)")
    run.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                     help="address the metrics endpoint binds (default %(default)s)")
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

    def backlog(self) -> int:
        return self.queue.qsize()

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
            while True:
                try:
                    await self.client.xadd(self.stream, handshake.to_fields(),  # type: ignore[arg-type]
                                           maxlen=STREAM_MAXLEN, approximate=True)
                    self.sent += 1
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


async def serve(darknets: Sequence[Network], port: int, redis_url: str | None, prefix: str,
                metrics: tuple[int, str] = (0, "127.0.0.1")) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    families = sorted({socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in darknets})
    listeners = [open_listener(family, port) for family in families]
    sink = Sink(redis_url, f"{prefix}handshakes")
    tasks: list[asyncio.Task[None]] = []
    stop_metrics = None
    try:
        if metrics[0]:
            # Before the steering: a busy port fails before anything on the host is changed.
            try:
                stop_metrics = serve_metrics(registry_for(sink), *metrics)
            except OSError as exc:
                raise MetricsError(f"--metrics-port: cannot serve on {metrics[1]}:{metrics[0]}: "
                                   f"{exc}") from None
        with Steering(darknets, port):
            print(f"stepstone-responder: answering {', '.join(map(str, darknets))} on port {port}",
                  file=sys.stderr, flush=True)

            async def pump(listener: socket.socket) -> None:
                async for handshake in accept_forever(listener):
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
            await sink.drain(2.0)
    finally:
        await cancel_and_wait(tasks)
        if stop_metrics is not None:
            stop_metrics()
        for sock in listeners:
            sock.close()
        await sink.close()
        print(f"stepstone-responder: stopped; {sink.sent} handshakes reported, {sink.dropped} dropped",
              file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.redis is not None:
        try:
            aioredis.from_url(args.redis)
        except ValueError as exc:
            print(f"stepstone-responder: --redis: {exc}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("stepstone-responder: needs root (a local route and an nftables table)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args.darknet, args.listen_port, args.redis, args.prefix,
                                 (args.metrics_port, args.metrics_addr)))
    except (SteeringError, ListenerError, MetricsError) as exc:
        print(f"stepstone-responder: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
