"""A darknet's handshakes, as a real one delivers them, onto the `handshakes` stream.

    python bench/darknet_load.py --redis unix:///tmp/redis.sock --darknet 198.18.0.0/16 --duration 60
    python bench/darknet_load.py --darknet 198.18.0.0/16 --count 2000 --summary   (no Redis: the mix)

Where the proportions come from (defaults of `Mix`; every one is a parameter):

- Rate: Merit ORION sees ~41.5k packets/s on ~475k dark addresses, ~0.087 packets/s per address
  (/work/shared/REFERENCES.md): a /24 ~22/s, a /16 ~5,700/s, a /8 ~1.5M/s. `--rate` defaults to
  0.087 x the darknet's size.
- Who sends them: a telescope's sources are heavy-tailed; Kepner et al., "Temporal Correlation of
  Internet Observatories and Outposts" (2022, CAIDA telescope) fit source brightness with a
  Zipf-Mandelbrot law. Each class of sources below shares its packets out by Zipf-Mandelbrot rank
  (exponent `zipf_s`, shift `zipf_q`), so in every class a few sources send most of its packets
  and most send a handful. Aggressive "heavy hitter" scanners (Griffioen/Kallitsis et al.,
  "Aggressive Internet-Wide Scanners", 2023, a large telescope) are the head of that tail.
- Stack-less scanners: Spoki (Hiesgen et al., USENIX Security 2022) finds that a predominant
  fraction of the TCP SYNs reaching a reactive telescope are irregular: written on raw sockets by
  ZMap, masscan and Mirai-like bots, whose kernel answers our SYN+ACK with a RST (no socket knows
  the connection). Default: 0.5 % of sources (`scanners`), 75 % of handshakes
  (`scanner_packets`): "predominant" made a number. The shift `zipf_q` = 30 keeps every scanner
  at "millions of SYNs a day": with 100k sources on a /16 at the ORION rate the 500 scanners send
  0.24M to 4.2M SYNs a day each (ZMap at 1.4M packets/s over all of IPv4 puts ~1.8M a day on
  a /16). Their SYNs carry the tools' own headers: masscan (no options, window 1024, TTL 255),
  ZMap (MSS only, window 65535, TTL 255, IP ID 54321), Mirai (no options, sequence number =
  destination address, TTL 64) and nmap's SYN scan (p0f's `!:NMap:SYN scan`).
- Stateful clients complete the handshake with an ACK (bots brute-forcing telnet/SSH through a
  real stack, second-phase connections of two-phase scanners, Spoki again). Their SYNs are exact
  p0f signatures of common stacks (Linux, Windows, macOS/iOS, Android, FreeBSD), TTL lowered by
  their hop count. Maier et al. (IMC 2011): more than 90 % of DSL lines are behind a NAT, so the
  persona behind many of them is a Windows host behind a Linux router (`natted`: a Windows SYN;
  the ground truth a probe would find is the router). About 1 % of handshakes saw the SYN+ACK
  retransmitted before the ACK (Karn's rule: no T^p).
- Silent sources never answer the SYN+ACK (spoofed or firewalled senders, scanners that drop
  their own replies): the sensor reports the handshake after its SYN+ACK retransmissions (Linux's
  tcp_synack_retries = 5: 0, 1, 3, 7, 15, 31 s). Default 30 % of sources, 5 % of handshakes.

A stack-less scanner's RST or a client's ACK can only be seen by a Zeek sensor (the responder
reports accepted connections only), so `feed` is "zeek" by default.

Deterministic: the same seed, darknet, sources, mix and `--start` give the same entries, byte for
byte. The XADDs are pipelined (`--batch` per round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ipaddress
import itertools
import random
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from analyzer.handshake import Handshake
from osfp import craft
from osfp.database import default_database_path, load

ORION_PPS_PER_ADDRESS = 0.087  # Merit ORION: ~41.5k packets/s over ~475k dark addresses
SOURCE_SPACE = ipaddress.ip_network("10.0.0.0/8")  # sources: private, never probed for real
SCANNER_PORTS = ((23, 30), (22, 15), (80, 10), (443, 8), (8080, 6), (2323, 5), (445, 5), (3389, 5),
                 (5555, 4), (6379, 3), (8443, 3), (81, 3), (1433, 3))
CLIENT_PORTS = ((23, 40), (22, 35), (80, 15), (443, 10))
SYNACK_RETRIES = (0.0, 1.0, 3.0, 7.0, 15.0, 31.0)  # Linux tcp_synack_retries = 5, from the first
SENSOR_DELAY = 0.0001  # SYN -> SYN+ACK at the sensor


@dataclass(frozen=True)
class Mix:
    """Shares of sources and of handshakes per class (module docstring: where they come from)."""

    scanners: float = 0.005  # share of sources: stack-less scanners (RST replies, crafted SYNs)
    scanner_packets: float = 0.75  # share of handshakes they send
    silent: float = 0.30  # share of sources that never answer the SYN+ACK
    silent_packets: float = 0.05
    natted: float = 0.30  # share of stateful clients that are a Windows host behind a NAT
    retransmitted: float = 0.01  # share of ACKed handshakes whose SYN+ACK was sent twice
    zipf_s: float = 1.0  # Zipf-Mandelbrot exponent of packets by source rank within a class
    zipf_q: float = 30.0  # ... and its shift (flattens the very head; see the module docstring)

    def check(self) -> Mix:
        for name in ("scanners", "scanner_packets", "silent", "silent_packets", "natted", "retransmitted"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} is a share, 0..1")
        if self.scanners + self.silent > 1 or self.scanner_packets + self.silent_packets > 1:
            raise ValueError("scanners + silent must leave room for the stateful clients (shares > 1)")
        if not self.zipf_s > 0 or not self.zipf_q >= 0:
            raise ValueError("--zipf-s must be positive, --zipf-q at least 0")
        return self


# (persona, share within its class). Stack-less tools first, then the stacks of stateful clients.
TOOLS = (("masscan", 0.40), ("zmap", 0.30), ("mirai", 0.25), ("nmap", 0.05))
STACKS = (("s:unix:Linux:3.11 and newer", 0.45), ("s:win:Windows:10 or 11", 0.25),
          ("s:unix:Linux:4.19 and newer", 0.10), ("s:unix:Mac OS X:recent or iOS", 0.08),
          ("s:unix:Linux:Android (window 65535)", 0.07), ("s:unix:FreeBSD:12 or newer", 0.05))
KINDS = ("scanner", "client", "silent")


@dataclass(frozen=True, slots=True)
class Source:
    addr: str
    kind: str  # scanner (RST), client (ACK), silent (no reply)
    persona: str  # the tool or the p0f label of its SYNs (natted: "<label> behind NAT")
    shape: craft.Shape
    rtt: float  # seconds, sensor <-> source
    seq_is_dst: bool = False  # Mirai: the SYN's sequence number is the destination address


def _shapes() -> dict[str, craft.Shape]:
    """One SYN shape per persona: stacks from the project's p0f database, tools by their headers."""
    db = load(default_database_path())
    by_label: dict[str, str] = {}
    for sig in db.syn:
        by_label.setdefault(f"s:{sig.label}" if not sig.generic else f"g:{sig.label}", sig.raw)
    out = {label: craft.from_signature(by_label[label]) for label, _ in STACKS}
    out["nmap"] = craft.from_signature(by_label["s:!:NMap:SYN scan"])
    none: frozenset[str] = frozenset()
    out["masscan"] = craft.Shape(ttl=255, mss=None, win=1024, layout=(), quirks=none)
    out["zmap"] = craft.Shape(ttl=255, mss=1460, win=65535, layout=(2,), quirks=none)
    out["mirai"] = craft.Shape(ttl=64, mss=None, win=14600, layout=(), quirks=frozenset({"df", "id+"}))
    return out


def _zipf_weights(n: int, total: float, s: float, q: float) -> list[float]:
    raw = [1.0 / (rank + q) ** s for rank in range(1, n + 1)]
    scale = total / sum(raw) if raw else 0.0
    return [w * scale for w in raw]


def _picker(table: tuple[tuple[Any, float], ...]) -> Any:
    """A draw from `table` (value, weight) by one uniform number."""
    values = [x for x, _ in table]
    cum = list(itertools.accumulate(w for _, w in table))

    def pick(rng: random.Random) -> Any:
        return values[min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(values) - 1)]

    return pick


_tool, _stack = _picker(TOOLS), _picker(STACKS)
_scanner_port, _client_port = _picker(SCANNER_PORTS), _picker(CLIENT_PORTS)


@dataclass
class DarknetLoad:
    """The sources of one darknet and the handshakes they send, deterministic from `seed`.

    `per_source`: every source sends exactly that many handshakes, round robin (the benchmark's
    curve against handshakes per source); None: handshakes are drawn by the heavy-tailed weights.
    """

    darknet: ipaddress.IPv4Network | ipaddress.IPv6Network
    sources: int
    mix: Mix = field(default_factory=Mix)
    seed: int = 1
    per_source: int | None = None
    feed: str = "zeek"

    def __post_init__(self) -> None:
        self.mix.check()
        if self.sources < 1 or self.sources > SOURCE_SPACE.num_addresses // 2:
            raise ValueError(f"--sources: 1..{SOURCE_SPACE.num_addresses // 2}")
        if self.darknet.version != 4 or self.darknet.prefixlen > 24 or self.darknet.prefixlen < 8:
            raise ValueError("--darknet: an IPv4 network from /8 to /24")
        rng = random.Random(self.seed)
        shapes = _shapes()
        mix = self.mix
        n_scan = min(self.sources, max(1, round(self.sources * mix.scanners)) if mix.scanners else 0)
        n_silent = min(self.sources - n_scan, round(self.sources * mix.silent))
        n_client = self.sources - n_scan - n_silent
        client_packets = 1.0 - mix.scanner_packets - mix.silent_packets
        # Distinct addresses: an odd multiplier permutes the 2^24 addresses of 10/8.
        base = int(SOURCE_SPACE.network_address)
        size = SOURCE_SPACE.num_addresses
        start = rng.randrange(size)
        self.pool: list[Source] = []
        shaped: dict[tuple[str, int], craft.Shape] = {}  # from_signature's ttl is the initial - 1
        weights: list[float] = []
        for kind, n, share in (("scanner", n_scan, mix.scanner_packets), ("client", n_client, client_packets),
                               ("silent", n_silent, mix.silent_packets)):
            weights += _zipf_weights(n, share, mix.zipf_s, mix.zipf_q)
            for _ in range(n):
                i = len(self.pool)
                addr = socket.inet_ntoa(struct.pack("!I", base + (start + i * 2_654_435_761) % size))
                hops = rng.randint(6, 24)
                if kind == "scanner" or (kind == "silent" and rng.random() < 0.5):
                    persona = label = _tool(rng)
                else:
                    persona = label = _stack(rng)
                    if kind == "client" and rng.random() < mix.natted:
                        label = "s:win:Windows:10 or 11"
                        persona = f"{label} behind NAT"
                        hops += 1  # the router in front of it
                key = (label, hops)
                shape = shaped.get(key)
                if shape is None:
                    shape = shaped[key] = replace(shapes[label], ttl=max(1, shapes[label].ttl + 1 - hops))
                rtt = min(2.0, max(0.005, rng.lognormvariate(-2.1, 0.6)))  # median ~120 ms
                self.pool.append(Source(addr, kind, persona, shape, rtt, seq_is_dst=label == "mirai"))
        self.cum = list(itertools.accumulate(weights))
        self._rng = random.Random(self.seed + 1)

    def handshake(self, i: int, now: float) -> Handshake:
        """The i-th handshake (call in order), reported by the sensor at `now`."""
        rng = self._rng
        if self.per_source is not None:
            source = self.pool[i % len(self.pool)]
        else:
            source = self.pool[min(bisect.bisect_left(self.cum, rng.random() * self.cum[-1]),
                                   len(self.pool) - 1)]
        net = self.darknet
        dst_int = int(net.network_address) + rng.randrange(net.num_addresses)
        dst = socket.inet_ntoa(struct.pack("!I", dst_int))
        dport = _client_port(rng) if source.kind == "client" else _scanner_port(rng)
        sport = rng.randrange(32768, 61000)
        seq = dst_int if source.seq_is_dst else rng.getrandbits(32)
        syn = craft.build(source.shape, src=source.addr, dst=dst, sport=sport, dport=dport, seq=seq,
                          ip_id=54321 if source.persona == "zmap" else rng.getrandbits(16))
        rtt = source.rtt * rng.uniform(0.9, 1.3)
        if source.kind == "silent":
            synacks = tuple(SENSOR_DELAY + x for x in SYNACK_RETRIES)
            t = now - synacks[-1] - 1.0  # reported when the last retransmission timed out
            return Handshake(t=t, src=source.addr, sport=sport, dst=dst, dport=dport, syn=syn,
                             synack_times=tuple(t + x for x in synacks), feed=self.feed)  # type: ignore[arg-type]
        if source.kind == "scanner":
            reply, offsets, tp = "rst", (SENSOR_DELAY,), rtt
        elif rng.random() < self.mix.retransmitted:
            reply, offsets, tp = "ack", (SENSOR_DELAY, SENSOR_DELAY + 1.0), None
            rtt += 1.0  # the ACK came after the retransmission: which one it answers is unknown
        else:
            reply, offsets, tp = "ack", (SENSOR_DELAY,), rtt + rng.uniform(0.0, 0.0005)
        t = now - offsets[0] - (tp if tp is not None else rtt)
        return Handshake(
            t=t, src=source.addr, sport=sport, dst=dst, dport=dport, syn=syn,
            synack_times=tuple(t + x for x in offsets), reply=reply,  # type: ignore[arg-type]
            reply_time=now, tp_us=None if tp is None else round(tp * 1e6), feed=self.feed,  # type: ignore[arg-type]
        )

    def handshakes(self, count: int, start: float, rate: float) -> Iterator[Handshake]:
        """`count` handshakes reported at `rate` per second from `start` (epoch seconds)."""
        for i in range(count):
            yield self.handshake(i, start + i / rate)

    def summary(self, handshakes: list[Handshake]) -> dict[str, Any]:
        """The mix as drawn: sources and handshakes per class, the head's share, labels."""
        kind_of = {s.addr: s.kind for s in self.pool}
        per_source = Counter(h.src for h in handshakes)
        by_kind = Counter(kind_of[h.src] for h in handshakes)
        replies = Counter(h.reply or "none" for h in handshakes)
        ranked = [n for _, n in per_source.most_common()]
        top = max(1, len(self.pool) // 100)
        return {
            "handshakes": len(handshakes),
            "sources": len(self.pool),
            "sources_by_kind": dict(Counter(s.kind for s in self.pool)),
            "sources_seen": len(per_source),
            "handshakes_by_kind": {k: by_kind.get(k, 0) for k in KINDS},
            "replies": dict(replies),
            "top_1pct_share": round(sum(ranked[:top]) / max(1, len(handshakes)), 3),
            "busiest_source": ranked[0] if ranked else 0,
            "sources_with_one": sum(1 for n in ranked if n == 1),
        }


def resp_bytes(args: list[str]) -> int:
    """Bytes of one command as RESP on the wire (the load's own share of Redis traffic)."""
    return len(f"*{len(args)}\r\n") + sum(len(f"${len(a.encode())}\r\n") + len(a.encode()) + 2 for a in args)


async def write(redis: Any, stream: str, load: DarknetLoad, *, count: int | None, duration: float | None,
                rate: float, batch: int = 500, start: float | None = None,
                room: Any = None) -> dict[str, float]:
    """XADD handshakes at `rate`/s (0: as fast as Redis takes them) until `count` or `duration`,
    pipelined by `batch`. `room(n)`, if given, is awaited before each batch (a benchmark bounds
    the backlog with it). Returns counts: handshakes, round trips, bytes sent."""
    if count is None and duration is None:
        raise ValueError("give a count or a duration")
    begin = time.time() if start is None else start
    clock0 = time.monotonic()
    stop_at = clock0 + duration if duration is not None else float("inf")
    sent = trips = sent_bytes = 0
    while (count is None or sent < count) and time.monotonic() < stop_at:
        n = batch if count is None else min(batch, count - sent)
        if room is not None:
            await room(n)
        if rate > 0:
            # Paced: batch i goes out when its last handshake is due.
            ahead = (sent + n) / rate - (time.monotonic() - clock0)
            if ahead > 0:
                await asyncio.sleep(ahead)
            stamps = [begin + (sent + k) / rate for k in range(n)]
        else:
            now = begin + (time.monotonic() - clock0)
            stamps = [now] * n
        async with redis.pipeline(transaction=False) as pipe:
            for k in range(n):
                fields = load.handshake(sent + k, stamps[k]).to_fields()
                pipe.xadd(stream, fields)
                sent_bytes += resp_bytes(["XADD", stream, "*", *itertools.chain(*fields.items())])
            await pipe.execute()
        sent += n
        trips += 1
    return {"handshakes": sent, "round_trips": trips, "bytes": sent_bytes,
            "seconds": time.monotonic() - clock0}


def mix_from_args(args: argparse.Namespace) -> Mix:
    return Mix(scanners=args.scanners, scanner_packets=args.scanner_packets, silent=args.silent,
               silent_packets=args.silent_packets, natted=args.natted, zipf_s=args.zipf_s,
               zipf_q=args.zipf_q).check()


def add_load_args(ap: argparse.ArgumentParser) -> None:
    d = Mix()
    ap.add_argument("--darknet", default="198.18.0.0/16", help="dark IPv4 network, /8../24 (default "
                    "198.18.0.0/16, the benchmarking range)")
    ap.add_argument("--sources", type=int, default=10_000, help="distinct source addresses (default 10000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scanners", type=float, default=d.scanners, help="share of sources that are "
                    f"stack-less scanners (default {d.scanners})")
    ap.add_argument("--scanner-packets", type=float, default=d.scanner_packets,
                    help=f"share of handshakes from them (default {d.scanner_packets})")
    ap.add_argument("--silent", type=float, default=d.silent,
                    help=f"share of sources that never answer (default {d.silent})")
    ap.add_argument("--silent-packets", type=float, default=d.silent_packets,
                    help=f"share of handshakes from them (default {d.silent_packets})")
    ap.add_argument("--natted", type=float, default=d.natted,
                    help=f"share of stateful clients that are Windows behind a NAT (default {d.natted})")
    ap.add_argument("--zipf-s", type=float, default=d.zipf_s, help="Zipf-Mandelbrot exponent")
    ap.add_argument("--zipf-q", type=float, default=d.zipf_q, help="Zipf-Mandelbrot shift")


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", metavar="URL", help="Redis to XADD into (unix:///..., redis://...)")
    ap.add_argument("--prefix", default="stepstone:", help="key prefix (default stepstone:)")
    add_load_args(ap)
    ap.add_argument("--rate", type=float, help="handshakes/s (default 0.087 x darknet size; 0 = flat out)")
    ap.add_argument("--duration", type=float, help="seconds to run")
    ap.add_argument("--count", type=int, help="handshakes to write")
    ap.add_argument("--per-source", type=int, help="every source sends exactly N (round robin)")
    ap.add_argument("--feed", choices=("zeek", "responder"), default="zeek")
    ap.add_argument("--batch", type=int, default=500, help="XADDs per pipeline (default 500)")
    ap.add_argument("--start", type=float, help="epoch of the first report (default now): fixes the bytes")
    ap.add_argument("--summary", action="store_true", help="print the mix of --count handshakes, no Redis")
    args = ap.parse_args(argv)
    try:
        darknet = ipaddress.ip_network(args.darknet, strict=False)
        load = DarknetLoad(darknet, args.sources, mix_from_args(args), seed=args.seed,
                           per_source=args.per_source, feed=args.feed)
    except ValueError as exc:
        print(f"darknet_load: {exc}", file=sys.stderr)
        return 2
    rate = args.rate if args.rate is not None else ORION_PPS_PER_ADDRESS * darknet.num_addresses
    if (args.rate is not None and args.rate < 0) or args.batch < 1 or (args.count or 0) < 0:
        print("darknet_load: --rate, --batch and --count must not be negative (--batch at least 1)",
              file=sys.stderr)
        return 2
    if args.summary:
        count = args.count or 10_000
        hs = list(load.handshakes(count, args.start or time.time(), rate or 1.0))
        for key, value in load.summary(hs).items():
            print(f"{key}: {value}")
        return 0
    if not args.redis or (args.count is None and args.duration is None):
        print("darknet_load: give --redis URL and --count N or --duration S (or --summary)", file=sys.stderr)
        return 2
    import redis.asyncio as aioredis
    import redis.exceptions

    r = aioredis.from_url(args.redis)
    try:
        out = await write(r, args.prefix + "handshakes", load, count=args.count, duration=args.duration,
                          rate=rate, batch=args.batch, start=args.start)
    except (redis.exceptions.RedisError, OSError) as exc:
        print(f"darknet_load: Redis: {exc}", file=sys.stderr)
        return 2
    finally:
        await r.aclose()
    print(f"{out['handshakes']:.0f} handshakes in {out['seconds']:.2f}s "
          f"({out['handshakes'] / max(out['seconds'], 1e-9):,.0f}/s offered {rate:,.0f}/s), "
          f"{out['round_trips']:.0f} round trips, {out['bytes'] / max(1, out['handshakes']):.0f} bytes each")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
