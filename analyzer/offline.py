"""Offline commands: `fingerprint` and `replay` read capture files, `judge` reads measurement records.

All three write JSON lines on stdout. Bad input is reported as one line per problem on stderr,
naming the file and the position (byte offset, packet number or line number), the first
MAX_REPORTED of them and then a count; the good input around it is still processed and printed.

Exit status 2 (docs/offline.md, "Bad input"): a capture that
cannot be read on (bad header, cut mid-record: everything before is still processed), a capture
whose snapshot length cut off the SYNs' options, a records line that is not a record, bad options
or database. A malformed packet inside a readable capture (a runt frame, a broken header, options
p0f cannot read, a timestamp that jumps) is what real taps record: counted and reported, exit 0,
unless --strict.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TextIO

from analyzer.capture import CaptureError, read_capture
from analyzer.errors import InputError
from analyzer.handshake import Handshake
from analyzer.hops import syn_distance
from analyzer.measurement import passive_record
from analyzer.packet import (
    ACK,
    FIN,
    RST,
    SYN,
    NotTCPError,
    PacketError,
    TcpHeader,
    UnsupportedLinkError,
    address_text,
    ip_from_frame,
    tcp_header,
)
from analyzer.record import Record, RecordError
from analyzer.rules import (
    APP_ALLOWANCE_US,
    DEFAULT_WINDOW,
    MAX_APP_ALLOWANCE_MS,
    OS_LEVELS,
    estimate_hop_offset,
    judge_all,
    kind_counts,
    summary,
)
from analyzer.timejumps import JumpGuard
from analyzer.tracker import HandshakeTracker
from osfp.result import Fingerprint, FingerprintError, NotFingerprinted
from prober.job import DURATION_MAX_US, EPOCH_MAX, NUMBER_MAX_CHARS, short
from prober.options import check_ranges

EXIT_BAD_INPUT = 2
MAX_REPORTED = 20  # per-packet / per-line problems printed individually; the rest are counted
_OUT_BATCH = 512  # lines per stdout write
# A records line longer than this is refused unread (a record is ~300 bytes; a 100 MB line once
# took 2.8 GB to parse).
MAX_LINE = 1 << 20
_EPOCH_MAX_NS = int(EPOCH_MAX) * 1_000_000_000
_MIN_JUMP_NS = 1_000_000_000  # the time-jump threshold's floor (--idle-timeout may be 0)

# Ranges of the numeric options (checked after parsing; one line and exit 2 outside).
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    # A T^p is at most an hour (the record bound), so is the wait for a reply.
    "replay": {"idle_timeout": (0, DURATION_MAX_US / 1e6)},
    "judge": {"window": (0, EPOCH_MAX), "now": (0, EPOCH_MAX)},
}


def register(sub: Any) -> None:
    """Add the `fingerprint`, `replay` and `judge` subcommands to `sub` (argparse subparsers)."""
    p = sub.add_parser(
        "fingerprint",
        help="p0f fingerprint of every SYN and SYN+ACK in a capture (JSON lines)",
        description="One JSON line per SYN and SYN+ACK in CAPTURE (pcap or pcapng): ts, src, sport, "
        "dst, dport, kind (syn|synack), label, generic, match, distance, sig.",
    )
    p.add_argument("capture", help="pcap or pcapng file ('-' reads standard input)")
    _p0f_db_option(p)
    _strict_option(p)
    p.set_defaults(func=run_fingerprint)

    p = sub.add_parser(
        "replay",
        help="measurement records of the handshakes towards a darknet in a capture (JSON lines)",
        description="One measurement record per answered handshake towards --darknet in CAPTURE: t, "
        "src, dst, tp_us and fp; the active fields (ping_*, syn_rtt_us, fa) are null.",
    )
    p.add_argument("capture", help="pcap or pcapng file ('-' reads standard input)")
    p.add_argument(
        "--darknet", action="append", required=True, type=_network, metavar="CIDR",
        help="darknet network (IPv4 or IPv6); repeat for several",
    )
    p.add_argument(
        "--idle-timeout", type=_seconds, default=30.0, metavar="SECONDS",
        help="forget a connection idle this long in capture time (0-3600, default 30)",
    )
    _p0f_db_option(p)
    _strict_option(p)
    _summary_options(p, "print the passive half of the paper's Table 3 instead of the records")
    p.set_defaults(func=run_replay)

    p = sub.add_parser(
        "judge",
        help="one verdict per source from measurement records (the paper's conditions (1) and (2))",
        description="Read measurement records (JSON lines, as `replay` or the live service write "
        "them) and print one verdict per source address: the paper's fields (cond_os, cond_timing, "
        "relay, ...) and the analyzer's own stronger evidence (cond_timing_strong, timing_margin_us, "
        "timing_noise_us, timing_threshold_us, timing_ref, relay_confident), the hop-count test "
        "(cond_hops, hops_margin, ...) and what the verdict found (kind, evidence).",
    )
    p.add_argument("records", help="JSON-lines file of measurement records ('-' reads standard input)")
    p.add_argument(
        "--window", type=_seconds, default=DEFAULT_WINDOW, metavar="SECONDS",
        help="past time window per source, ending at its latest record (default 86400; at most 2^32)",
    )
    p.add_argument(
        "--os-level", choices=OS_LEVELS, default="name",
        help="how much of the p0f label condition (1) compares (default name = class:name)",
    )
    p.add_argument(
        "--now", type=_seconds, default=None, metavar="EPOCH",
        help="end every window here instead of at each source's latest record (0 to 2^32)",
    )
    p.add_argument(
        "--hops-offset", type=float, default=0.0, metavar="HOPS",
        help="the prober's constant hop offset from the sensor, subtracted from every SYN - SYN+ACK "
        "hop difference (default 0: the prober sits where the sensor is; --summary estimates it "
        "from the sources judged direct)",
    )
    p.add_argument(
        "--app-allowance", type=float, default=APP_ALLOWANCE_US / 1000, metavar="MS",
        help="a direct client's own time to answer a banner, allowed before cond_app calls the "
        f"extra application RTT a proxy's onward leg (default {APP_ALLOWANCE_US / 1000:g} ms; raise it "
        "where slow clients are expected, at the price of the proxies with short onward legs)",
    )
    _summary_options(p, "print Table 3's detection rows instead of the verdicts")
    p.set_defaults(func=run_judge)


def _p0f_db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--p0f-db", metavar="PATH", default=None,
        help="p0f signature database (default: the project's own, osfp/data/stepstone.fp)",
    )


def _strict_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strict", action="store_true",
        help="exit 2 on any malformed packet too (by default one in a readable capture is reported "
        "and counted, and the exit status stays 0)",
    )


def _check_ranges(args: argparse.Namespace) -> None:
    try:
        check_ranges(args, RANGES.get(args.command, {}))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _summary_options(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--summary", action="store_true", help=text)
    p.add_argument("--json", action="store_true", help="with --summary: one JSON object instead of a table")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 network: {short(text)}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative number of seconds: {short(text)}")
    return value


class Problems:
    """Reports bad input on stderr, one line each (the first MAX_REPORTED), and remembers it.

    A `fatal` problem (the input cannot be read on, or cannot give what was asked) makes the exit
    status 2; the others (one malformed packet among good ones) only with `strict`.
    """

    def __init__(self, *, strict: bool = False, stream: TextIO | None = None) -> None:
        self.count = 0
        self.fatal = 0
        self.strict = strict
        self._shown = 0
        self._stream = stream or sys.stderr

    def report(self, message: str, *, fatal: bool = False, always: bool = False) -> None:
        """`always`: printed even past the cap (a once-per-file summary of many packets)."""
        self.count += 1
        self.fatal += fatal
        if self.count <= MAX_REPORTED or always:
            self._shown += 1
            print(f"stepstone-analyzer: {message}", file=self._stream)

    def exit_status(self) -> int:
        if self.count > self._shown:
            print(f"stepstone-analyzer: {self.count - self._shown} more problems not shown "
                  f"({self.count} in all)", file=self._stream)
        return EXIT_BAD_INPUT if self.fatal or (self.strict and self.count) else 0


class _Output:
    """Buffered JSON lines on stdout (one write per batch keeps the per-packet cost low)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def line(self, text: str) -> None:
        self._lines.append(text)
        if len(self._lines) >= _OUT_BATCH:
            self.flush()

    def flush(self) -> None:
        try:
            if self._lines:
                self._lines.append("")
                sys.stdout.write("\n".join(self._lines))
                self._lines = []
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # `... | head`: handled (quietly) by the cli
        except OSError as exc:
            # Disk full, quota, EIO: the output is lost, so say so in one line and exit 2. Point
            # stdout at /dev/null so that the interpreter's own flush at exit does not fail again.
            self._lines = []
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise InputError(f"cannot write the output: {exc.strerror or exc}") from None


class _FingerprintCache:
    """p0f fingerprints pre-rendered as JSON for the output lines.

    The fingerprinter caches matches on the fields p0f reads (and remembers each SYN's MSS for the
    SYN+ACK of its flow, so every packet goes through it in file order); this adds the rendering:
    a flood of identical scanner SYNs costs one JSON encoding.
    """

    MAX_ENTRIES = 100_000

    def __init__(self, db_path: str | None) -> None:
        try:
            from osfp.fingerprinter import Fingerprinter
        except ImportError as exc:
            raise InputError(f"the fingerprinting package is not available: {exc}") from None
        if db_path is not None and not os.path.isfile(db_path):
            why = "not a regular file" if os.path.exists(db_path) else "no such file"
            raise InputError(f"--p0f-db {db_path}: {why}")
        try:
            self._fp = Fingerprinter(db_path=db_path)
        except (OSError, ValueError) as exc:
            raise InputError(f"--p0f-db: {exc}") from None  # the message names the file and line
        self._json: dict[Fingerprint, str] = {}

    def fingerprint(self, ip: bytes) -> Fingerprint:
        """The fingerprint itself (the fingerprinter's cache); raises as `lookup` does."""
        return self._fp.fingerprint(ip)

    def lookup(self, ip: bytes) -> tuple[str, str | None]:
        """(JSON fragment `"label":..,"generic":..,"match":..,"distance":..,"sig":..`, label).

        Raises FingerprintError for packets p0f cannot read; NotFingerprinted (a subclass) for
        well-formed ones p0f silently passes over (IPv6 extension headers): not bad input.
        """
        fp = self._fp.fingerprint(ip)
        text = self._json.get(fp)
        if text is None:
            text = json.dumps(fp.to_dict(), separators=(",", ":"))[1:-1]
            if len(self._json) >= self.MAX_ENTRIES:
                self._json.clear()
            self._json[fp] = text
        return text, fp.label


class _Addresses:
    """Packed address -> text, cached (scanners repeat addresses; inet_ntop per packet adds up)."""

    def __init__(self) -> None:
        self._text: dict[bytes, str] = {}

    def __call__(self, packed: bytes) -> str:
        text = self._text.get(packed)
        if text is None:
            text = address_text(packed)
            if len(self._text) > 1_000_000:
                self._text.clear()
            self._text[packed] = text
        return text


def _ts(ts_ns: int) -> str:
    """Epoch seconds with 6 decimals, the nanoseconds floored to the microsecond (-1 ns is
    -0.000001: the sign applies to the whole number, as JSON reads it)."""
    us = ts_ns // 1000
    sign, us = ("-", -us) if us < 0 else ("", us)
    return f"{sign}{us // 1_000_000}.{us % 1_000_000:06d}"


def _seconds_text(ns: int) -> str:
    seconds = abs(ns) / 1e9
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.3g} s"


class _PacketCounts:
    def __init__(self) -> None:
        self.packets = 0
        self.skipped: dict[str, int] = {"not-ip": 0, "not-tcp": 0, "fragment": 0}
        self.errors = 0  # malformed frames and headers, and records the reader skipped
        self.bad_timestamps = 0  # outside 1970..2106, or a jump the packets around it refute
        self.time_rewinds = 0  # capture time went back for good

    def to_dict(self) -> dict[str, int]:
        return {
            "packets": self.packets,
            "not_ip": self.skipped["not-ip"],
            "not_tcp": self.skipped["not-tcp"],
            "fragments": self.skipped["fragment"],
            "packet_errors": self.errors,
            "bad_timestamps": self.bad_timestamps,
            "time_rewinds": self.time_rewinds,
        }


class _Snaplen:
    """Packets the capture's snapshot length cut short, so that a SYN p0f cannot read for that
    reason is reported once per file, with a count and the cure, rather than once per packet.

    Only frames shorter than their original length are remembered (by their IP bytes, which is
    what the fingerprinter is later given: the tracker keeps the SYN's bytes as they were), in a
    bounded table; a full capture of uncut packets never touches it.
    """

    MAX_ENTRIES = 65_536

    def __init__(self) -> None:
        self._cut: dict[bytes, tuple[int, int, int]] = {}  # IP packet -> (number, captured, original)
        self.count = 0
        self._first: tuple[bytes, int, int, int] | None = None

    def saw(self, ip: bytes, number: int, captured: int, original: int) -> None:
        if len(self._cut) >= self.MAX_ENTRIES:
            self._cut.clear()  # at worst, later SYNs are reported one by one as before
        self._cut[ip] = (number, captured, original)

    def explains(self, ip: bytes) -> bool:
        """Was `ip` (which p0f cannot read) cut by the snaplen? Then it is counted here."""
        where = self._cut.get(ip)
        if where is None:
            return False
        self.count += 1
        if self._first is None:
            self._first = (ip, *where)
        return True

    def report(self, path: str, problems: Problems, what: tuple[str, str]) -> None:
        """One problem line for the file (the exit status stays 2: those labels are missing)."""
        if self._first is None:
            return
        ip, number, captured, original = self._first
        try:
            h = tcp_header(ip)
            part = "TCP options" if h.tcp_offset + h.tcp_length > len(ip) else "TCP payload"
        except PacketError:
            part = "TCP header"
        problems.report(
            f"{path}: packet {number}: captured {captured} of {original} bytes (snaplen): {part} cut "
            f"off; capture with a larger snaplen, e.g. -s 0 ({self.count} "
            f"{what[0] if self.count == 1 else what[1]} cut short, not fingerprinted)",
            fatal=True, always=True,
        )


def _packets(
    path: str,
    problems: Problems,
    counts: _PacketCounts,
    snaplen: _Snaplen,
    handle: Callable[[int, int, bytes], None],
) -> None:
    """Feed every IP packet of the capture to `handle(number, ts_ns, ip)`; report what is wrong.

    `handle` may raise PacketError (malformed header): reported with the packet number. Packets
    the snapshot length cut short are remembered in `snaplen`. A capture that cannot be read on
    is a fatal problem; a record the reader skips is a packet error.
    """
    skipped = counts.skipped
    unsupported: set[int] = set()  # link types already reported

    def skipped_record(message: str) -> None:
        counts.errors += 1
        problems.report(message)

    try:
        for number, ts_ns, linktype, frame, original in read_capture(path, on_error=skipped_record):
            counts.packets += 1
            try:
                ip = ip_from_frame(linktype, frame)
                if original > len(frame):
                    snaplen.saw(ip, number, len(frame), original)
                handle(number, ts_ns, ip)
            except NotTCPError as exc:
                skipped[exc.reason] += 1
            except UnsupportedLinkError as exc:
                # The capture's (or interface's) link type: nothing in it can be read, so this is
                # the capture failing, said once, not a malformed packet.
                counts.errors += 1
                if linktype not in unsupported:
                    unsupported.add(linktype)
                    problems.report(f"{path}: packet {number}: {exc} (every such packet skipped)", fatal=True)
            except PacketError as exc:
                counts.errors += 1
                problems.report(f"{path}: packet {number}: {exc}")
    except CaptureError as exc:
        problems.report(str(exc), fatal=True)


_SHAPE_BITS = SYN | ACK | FIN | RST


def run_fingerprint(args: argparse.Namespace) -> int:
    cache = _FingerprintCache(args.p0f_db)
    problems = Problems(strict=args.strict)
    counts = _PacketCounts()
    snaplen = _Snaplen()
    out = _Output()
    addr = _Addresses()
    path: str = args.capture

    def handle(number: int, ts_ns: int, ip: bytes) -> None:
        h = tcp_header(ip)
        flags = h.flags
        # As p0f: exactly SYN or SYN+ACK among SYN/ACK/FIN/RST (ECN and PSH bits may be set);
        # SYN+FIN or SYN+RST scanner oddities are not fingerprinted, and not errors either.
        shape = flags & _SHAPE_BITS
        if shape == SYN:
            kind = "syn"
        elif shape == SYN | ACK:
            kind = "synack"
        else:
            return
        try:
            fragment, _label = cache.lookup(ip)
        except NotFingerprinted:
            return  # as p0f: no line, and not an error
        except FingerprintError as exc:
            if not snaplen.explains(ip):
                problems.report(f"{path}: packet {number}: {exc}")
            return
        out.line(
            f'{{"ts":{_ts(ts_ns)},"src":"{addr(h.src)}","sport":{h.sport},"dst":"{addr(h.dst)}",'
            f'"dport":{h.dport},"kind":"{kind}",{fragment}}}'
        )

    try:
        _packets(path, problems, counts, snaplen, handle)
        snaplen.report(path, problems, ("SYN or SYN+ACK", "SYNs and SYN+ACKs"))
    finally:
        out.flush()
    return problems.exit_status()


def _record_line(r: Record, fp_json: str) -> str:
    tp = "null" if r.tp_us is None else str(r.tp_us)
    return (
        f'{{"t":{r.t!r},"src":"{r.src}","dst":"{r.dst}","tp_us":{tp},"ping_min_us":null,'
        f'"ping_avg_us":null,"ping_max_us":null,"ping_var_us2":null,"syn_rtt_us":null,'
        f'"fp":{fp_json},"fa":null,"syn_dist":{"null" if r.syn_dist is None else r.syn_dist},'
        '"fa_dist":null}'
    )


def run_replay(args: argparse.Namespace) -> int:
    _check_ranges(args)
    cache = _FingerprintCache(args.p0f_db)
    problems = Problems(strict=args.strict)
    counts = _PacketCounts()
    snaplen = _Snaplen()
    out = _Output()
    path: str = args.capture
    tracker = HandshakeTracker(args.darknet, idle_timeout=args.idle_timeout)
    labels: dict[str | None, str] = {}
    fingerprint_errors = 0
    not_fingerprinted = 0
    records = 0
    print_records = not args.summary

    def emit(hs: Handshake) -> None:
        nonlocal fingerprint_errors, not_fingerprinted, records
        if not hs.answered:
            return
        label: str | None = None
        syn_dist: int | None = None
        if hs.syn is not None:
            try:
                fp = cache.fingerprint(hs.syn)
                label, syn_dist = fp.label, syn_distance(fp, hs.reply)
            except NotFingerprinted:
                not_fingerprinted += 1  # fp null, as p0f gives no label; not an error
            except FingerprintError as exc:
                fingerprint_errors += 1
                # A SYN the snaplen cut short: one line for the whole file, after it.
                if not snaplen.explains(hs.syn):
                    where = f"SYN {hs.src}:{hs.sport} -> {hs.dst}:{hs.dport} at {hs.t:.6f}"
                    problems.report(f"{path}: {where}: {exc}")
        records += 1
        if print_records:
            fp_json = labels.get(label)
            if fp_json is None:
                fp_json = labels[label] = json.dumps(label)
            out.line(_record_line(passive_record(hs, label, syn_dist), fp_json))

    Held = tuple[int, bytes, TcpHeader]  # packet number, IP packet, its decoded header

    def accept(ts_ns: int, item: Held) -> None:
        for hs in tracker.packet(ts_ns, item[1], item[2]):
            emit(hs)

    def outlier(ts_ns: int, item: Held, jump_ns: int) -> None:
        counts.bad_timestamps += 1
        side = "ahead of" if jump_ns > 0 else "behind"
        problems.report(f"{path}: packet {item[0]}: timestamp {_ts(ts_ns)} is {_seconds_text(jump_ns)} "
                        f"{side} the packets around it; skipped")

    def rewind(ts_ns: int, item: Held) -> None:
        counts.time_rewinds += 1
        problems.report(f"{path}: packet {item[0]}: capture time goes back to {_ts(ts_ns)} "
                        f"({_seconds_text(guard.now - ts_ns if guard.now else 0)}) and stays there; "
                        "connections open before it were ended")
        for hs in tracker.rewind(ts_ns):
            emit(hs)

    # A jump further than the idle timeout would expire every open connection at once.
    guard = JumpGuard(max(int(args.idle_timeout * 1e9), _MIN_JUMP_NS), accept, outlier, rewind)
    admit = guard.admit

    def handle(number: int, ts_ns: int, ip: bytes) -> None:
        h = tcp_header(ip)  # malformed or not TCP: raised here, for this packet's number
        if not 0 <= ts_ns <= _EPOCH_MAX_NS:
            # A record must read back (judge, the live window): its time within 0..2^32 s.
            counts.bad_timestamps += 1
            problems.report(f"{path}: packet {number}: timestamp {_ts(ts_ns)} is outside "
                            f"0..{EPOCH_MAX:.0f} s (1970-2106); skipped")
            return
        if admit(ts_ns):
            for hs in tracker.packet(ts_ns, ip, h):
                emit(hs)
        else:
            guard.packet(ts_ns, (number, ip, h))

    try:
        _packets(path, problems, counts, snaplen, handle)
        guard.finish()
        for hs in tracker.flush():
            emit(hs)
        snaplen.report(path, problems, ("SYN", "SYNs"))
        if args.summary:
            table = {**tracker.stats.summary(), "records": records,
                     "fingerprint_errors": fingerprint_errors, "snaplen_cut": snaplen.count,
                     "not_fingerprinted": not_fingerprinted, **counts.to_dict()}
            _print_summary(out, table, args.json, _REPLAY_ROWS)
    finally:
        out.flush()
    return problems.exit_status()


_REPLAY_ROWS = {
    "darknet_addresses": "darknet addresses",
    "answered": "answered connection requests",
    "unique_sources": "unique sources",
}
_JUDGE_ROWS = {
    "relays_by_os": "relays by (1) OS mismatch",
    "relays_by_timing": "relays by (2) timing",
    "relays": "relays in total",
}


def _print_summary(out: _Output, table: dict[str, Any], as_json: bool, headline: dict[str, str]) -> None:
    """JSON: one object. Text: the paper's rows first, then every other counter by its key."""
    if as_json:
        out.line(json.dumps(table))
        return
    rows = [(text, table[key]) for key, text in headline.items()]
    rows += [(key.replace("_", " "), value) for key, value in table.items() if key not in headline]
    width = max(len(text) for text, _ in rows)
    for text, value in rows:
        out.line(f"{text:<{width}}  {value:>8}")


class _NotARecordNumber(ValueError):
    """A JSON number a record cannot hold: too long to convert, or NaN/Infinity (not JSON)."""


def _parse_int(text: str) -> int:
    # Before int(): a 5000-digit literal exceeds Python's int-digits limit (ValueError deep inside
    # json), and no record field needs more than a few digits.
    if len(text) > NUMBER_MAX_CHARS:
        raise _NotARecordNumber(f"a number of {len(text)} digits")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _NotARecordNumber(f"{text} is not JSON")


def _lines(stream: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each line; the line is None when longer than MAX_LINE (its bytes
    are read past, never held)."""
    number = 0
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
        else:
            yield number, line


def json_objects(path: str, problems: Problems, *, what: str = "a record",
                 read_error_fatal: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for each good line of a JSON-lines file (`-`: stdin), read in
    bounded memory; every bad line is one problem naming its line, and is skipped. `what` names
    what a line should be, in those messages."""
    try:
        stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        for number, raw in _lines(stream):
            if raw is None:
                problems.report(f"{path}: line {number}: longer than {MAX_LINE} bytes, not {what}; skipped")
                continue
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line.decode("utf-8"), parse_int=_parse_int, parse_constant=_parse_constant)
            except UnicodeDecodeError as exc:
                problems.report(f"{path}: line {number}: not UTF-8 (byte {exc.start + 1})")
                continue
            except json.JSONDecodeError as exc:
                problems.report(f"{path}: line {number}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            except _NotARecordNumber as exc:
                problems.report(f"{path}: line {number}: not {what}: {exc}")
                continue
            except RecursionError:
                problems.report(f"{path}: line {number}: JSON nested too deeply")
                continue
            if not isinstance(obj, dict):
                problems.report(f"{path}: line {number}: {what} must be a JSON object")
                continue
            yield number, obj
    except OSError as exc:
        problems.report(f"{path}: read error: {exc.strerror}", fatal=read_error_fatal)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _read_records(path: str, problems: Problems) -> list[Record]:
    records: list[Record] = []
    for number, obj in json_objects(path, problems):
        try:
            records.append(Record.from_json(obj))
        except RecordError as exc:
            problems.report(f"{path}: line {number}: {exc}")
    return records


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _verdict_json(verdict: dict[str, Any], problems: Problems) -> str:
    """Strict JSON. Bounded records cannot make a non-finite number; if one ever does, it is
    written as null and reported, never as `Infinity` (which no JSON reader accepts)."""
    try:
        return json.dumps(verdict, allow_nan=False)
    except ValueError:
        bad = sorted(k for k, v in verdict.items() if isinstance(v, float) and not math.isfinite(v))
        problems.report(f"verdict for {verdict.get('src')}: {', '.join(bad)} not finite; written as null",
                        fatal=True)
        return json.dumps(_finite(verdict), allow_nan=False)


def run_judge(args: argparse.Namespace) -> int:
    _check_ranges(args)
    problems = Problems(strict=True)  # a line that is not a record is a broken file: exit 2
    out = _Output()
    path: str = args.records
    records = _read_records(path, problems)
    if not -255 <= args.hops_offset <= 255:
        raise InputError(f"--hops-offset must be within -255..255 hops, not {args.hops_offset:g}")
    if not 0 <= args.app_allowance <= MAX_APP_ALLOWANCE_MS:
        raise InputError(f"--app-allowance must be within 0..{MAX_APP_ALLOWANCE_MS} ms, "
                         f"not {args.app_allowance:g}")
    verdicts = judge_all(records, window=args.window, os_level=args.os_level, now=args.now,
                         hops_offset=args.hops_offset, app_allowance_us=args.app_allowance * 1000)
    try:
        if args.summary:
            # The paper's rows, then the analyzer's own stronger verdict (analyzer/rules.py), the
            # kinds, and the prober's hop offset as the direct sources show it.
            table: dict[str, Any] = {**summary(verdicts),
                                     "relays_confident": sum(v.relay_confident for v in verdicts),
                                     **{f"kind_{k}": n for k, n in kind_counts(verdicts).items()}}
            offset = estimate_hop_offset(records, verdicts)
            if offset is not None:
                table["hops_offset_estimate"], table["hops_offset_sources"] = offset
            _print_summary(out, table, args.json, _JUDGE_ROWS)
        else:
            for v in verdicts:
                out.line(_verdict_json(v.to_dict(), problems))
    finally:
        out.flush()
    return problems.exit_status()
