"""Offline commands: `fingerprint` and `replay` read capture files, `judge` reads measurement records.

All three write JSON lines on stdout. Bad input is reported as one line per problem on stderr,
naming the file and the position (byte offset, packet number or line number); the good input
around it is still processed and printed, and the exit status is 2 when anything was wrong.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from analyzer.capture import CaptureError, read_capture
from analyzer.errors import InputError
from analyzer.handshake import Handshake
from analyzer.measurement import passive_record
from analyzer.packet import (
    ACK,
    FIN,
    RST,
    SYN,
    NotTCPError,
    PacketError,
    address_text,
    ip_from_frame,
    tcp_header,
)
from analyzer.record import Record, RecordError
from analyzer.rules import DEFAULT_WINDOW, OS_LEVELS, judge_all, summary
from analyzer.tracker import HandshakeTracker
from osfp.result import Fingerprint, FingerprintError, NotFingerprinted

EXIT_BAD_INPUT = 2
MAX_REPORTED = 20  # per-packet / per-line problems printed individually; the rest are counted
_OUT_BATCH = 512  # lines per stdout write


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
        help="forget a connection idle this long in capture time (default 30)",
    )
    _p0f_db_option(p)
    _summary_options(p, "print the passive half of the paper's Table 3 instead of the records")
    p.set_defaults(func=run_replay)

    p = sub.add_parser(
        "judge",
        help="one verdict per source from measurement records (the paper's conditions (1) and (2))",
        description="Read measurement records (JSON lines, as `replay` or the live service write "
        "them) and print one verdict per source address: the paper's fields (cond_os, cond_timing, "
        "relay, ...) and the analyzer's own stronger evidence (cond_timing_strong, timing_margin_us, "
        "timing_noise_us, timing_threshold_us, timing_ref, relay_confident).",
    )
    p.add_argument("records", help="JSON-lines file of measurement records ('-' reads standard input)")
    p.add_argument(
        "--window", type=_seconds, default=DEFAULT_WINDOW, metavar="SECONDS",
        help="past time window per source, ending at its latest record (default 86400)",
    )
    p.add_argument(
        "--os-level", choices=OS_LEVELS, default="name",
        help="how much of the p0f label condition (1) compares (default name = class:name)",
    )
    p.add_argument(
        "--now", type=_seconds, default=None, metavar="EPOCH",
        help="end every window here instead of at each source's latest record",
    )
    _summary_options(p, "print Table 3's detection rows instead of the verdicts")
    p.set_defaults(func=run_judge)


def _p0f_db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--p0f-db", metavar="PATH", default=None,
        help="p0f signature database (default: the project's own, osfp/data/stepstone.fp)",
    )


def _summary_options(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--summary", action="store_true", help=text)
    p.add_argument("--json", action="store_true", help="with --summary: one JSON object instead of a table")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 network: {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative number of seconds: {text!r}")
    return value


class _Problems:
    """Reports bad input on stderr, one line each (the first MAX_REPORTED), and remembers it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.count = 0
        self._shown = 0
        self._stream = stream or sys.stderr

    def report(self, message: str, *, always: bool = False) -> None:
        """`always`: printed even past the cap (a once-per-file summary of many packets)."""
        self.count += 1
        if self.count <= MAX_REPORTED or always:
            self._shown += 1
            print(f"stepstone-analyzer: {message}", file=self._stream)

    def exit_status(self) -> int:
        if self.count > self._shown:
            print(f"stepstone-analyzer: {self.count - self._shown} more problems not shown "
                  f"({self.count} in all)", file=self._stream)
        return EXIT_BAD_INPUT if self.count else 0


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
    return f"{ts_ns // 1_000_000_000}.{ts_ns % 1_000_000_000 // 1000:06d}"


class _PacketCounts:
    def __init__(self) -> None:
        self.packets = 0
        self.skipped: dict[str, int] = {"not-ip": 0, "not-tcp": 0, "fragment": 0}
        self.errors = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "packets": self.packets,
            "not_ip": self.skipped["not-ip"],
            "not_tcp": self.skipped["not-tcp"],
            "fragments": self.skipped["fragment"],
            "packet_errors": self.errors,
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

    def report(self, path: str, problems: _Problems, what: tuple[str, str]) -> None:
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
            always=True,
        )


def _packets(
    path: str,
    problems: _Problems,
    counts: _PacketCounts,
    snaplen: _Snaplen,
    handle: Callable[[int, int, bytes], None],
) -> None:
    """Feed every IP packet of the capture to `handle(number, ts_ns, ip)`; report what is wrong.

    `handle` may raise PacketError (malformed header): reported with the packet number. Packets
    the snapshot length cut short are remembered in `snaplen`.
    """
    skipped = counts.skipped
    try:
        for number, ts_ns, linktype, frame, original in read_capture(path, on_error=problems.report):
            counts.packets += 1
            try:
                ip = ip_from_frame(linktype, frame)
                if original > len(frame):
                    snaplen.saw(ip, number, len(frame), original)
                handle(number, ts_ns, ip)
            except NotTCPError as exc:
                skipped[exc.reason] += 1
            except PacketError as exc:
                counts.errors += 1
                problems.report(f"{path}: packet {number}: {exc}")
    except CaptureError as exc:
        problems.report(str(exc))


_SHAPE_BITS = SYN | ACK | FIN | RST


def run_fingerprint(args: argparse.Namespace) -> int:
    cache = _FingerprintCache(args.p0f_db)
    problems = _Problems()
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
        f'"fp":{fp_json},"fa":null}}'
    )


def run_replay(args: argparse.Namespace) -> int:
    cache = _FingerprintCache(args.p0f_db)
    problems = _Problems()
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
        if hs.syn is not None:
            try:
                label = cache.lookup(hs.syn)[1]
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
            out.line(_record_line(passive_record(hs, label), fp_json))

    def handle(_number: int, ts_ns: int, ip: bytes) -> None:
        for hs in tracker.packet(ts_ns, ip):
            emit(hs)

    try:
        _packets(path, problems, counts, snaplen, handle)
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


def _print_summary(out: _Output, table: dict[str, int], as_json: bool, headline: dict[str, str]) -> None:
    """JSON: one object. Text: the paper's rows first, then every other counter by its key."""
    if as_json:
        out.line(json.dumps(table))
        return
    rows = [(text, table[key]) for key, text in headline.items()]
    rows += [(key.replace("_", " "), value) for key, value in table.items() if key not in headline]
    width = max(len(text) for text, _ in rows)
    for text, value in rows:
        out.line(f"{text:<{width}}  {value:>8}")


def _read_records(path: str, problems: _Problems) -> list[Record]:
    records: list[Record] = []
    try:
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        for number, raw in enumerate(stream, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problems.report(f"{path}: line {number}: not UTF-8 (byte {exc.start + 1})")
                continue
            except json.JSONDecodeError as exc:
                problems.report(f"{path}: line {number}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                problems.report(f"{path}: line {number}: JSON nested too deeply")
                continue
            try:
                records.append(Record.from_json(obj))
            except RecordError as exc:
                problems.report(f"{path}: line {number}: {exc}")
    except OSError as exc:
        problems.report(f"{path}: read error: {exc.strerror}")
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return records


def run_judge(args: argparse.Namespace) -> int:
    problems = _Problems()
    out = _Output()
    path: str = args.records
    records = _read_records(path, problems)
    verdicts = judge_all(records, window=args.window, os_level=args.os_level, now=args.now)
    try:
        if args.summary:
            # The paper's rows, then the analyzer's own stronger verdict (analyzer/rules.py).
            table = {**summary(verdicts), "relays_confident": sum(v.relay_confident for v in verdicts)}
            _print_summary(out, table, args.json, _JUDGE_ROWS)
        else:
            for v in verdicts:
                out.line(json.dumps(v.to_dict()))
    finally:
        out.flush()
    return problems.exit_status()
