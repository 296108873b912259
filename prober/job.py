"""Probe jobs and results: the schema both ends of the Redis streams agree on (docs/design.md).

Stream entries are flat string maps; an empty string is null. Every entry read from Redis is
validated here, so a malformed job is dead-lettered with a reason instead of crashing a worker.

Every number on a stream is bounded here, and the analyzer's measurement record
(`analyzer.record`) checks its fields with these same functions: a value that passes a stream's
check can never fail later (in the rules' sums, in a Zeek time, in `int()`).
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass

DEFAULT_PORTS: tuple[int, ...] = (22, 23, 80, 443, 445, 3389, 8080)

# Bounds of the values on the streams (and in records). Outside them a value is malformed, never
# clamped: no real measurement comes near them, and a forged one must not reach a sum or a clock.
EPOCH_MAX = float(2**32)  # epoch seconds before 2106-02-07 (a 32-bit unsigned time)
DURATION_MAX_US = 3_600_000_000  # one hour in microseconds: an RTT or T^p beyond is not one
VARIANCE_MAX_US2 = float(DURATION_MAX_US) ** 2  # the variance of samples within an hour
HOPS_MAX = 255  # a hop distance is an IP TTL difference: 0..255
NUMBER_MAX_CHARS = 40  # a longer number field is refused unread (a 5000-digit literal breaks int())


class JobError(ValueError):
    """An entry that does not follow the contract; the message is the dead-letter reason."""


@dataclass(frozen=True, slots=True)
class Job:
    id: str  # the stream entry id
    src: str  # address to probe
    t: float  # the passive SYN time this probe belongs to (epoch seconds)
    deadline: float  # epoch seconds; past it the job is dropped, not probed
    ports: tuple[int, ...] = DEFAULT_PORTS
    enqueued: float | None = None

    def fields(self) -> dict[str, str]:
        out = {
            "src": self.src,
            "t": repr(self.t),
            "deadline": repr(self.deadline),
            "ports": ",".join(map(str, self.ports)),
        }
        out["enqueued"] = "" if self.enqueued is None else repr(self.enqueued)
        return out

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[str, str]) -> Job:
        src = fields.get("src", "")
        try:
            src = address(src)
        except ValueError:
            raise JobError(f"src is not an IP address: {short(src)}") from None
        ports_text = fields.get("ports", "")
        ports = DEFAULT_PORTS
        if ports_text:
            items = ports_text.split(",")
            if len(items) > 65535 or not all(_decimal(p) and len(p) <= 5 for p in items):
                raise JobError(f"ports is not a comma-separated list of numbers: {short(ports_text)}")
            ports = tuple(int(p) for p in items)
            if any(not 0 < p < 65536 for p in ports):
                raise JobError(f"ports out of range 1-65535: {short(ports_text)}")
        return cls(
            id=entry_id,
            src=src,
            t=_epoch(fields, "t"),
            deadline=_epoch(fields, "deadline"),
            ports=ports,
            enqueued=_epoch(fields, "enqueued") if fields.get("enqueued") else None,
        )


@dataclass(frozen=True, slots=True)
class Result:
    job: str
    src: str
    t: float
    ping_min_us: int | None
    ping_avg_us: int | None
    ping_max_us: int | None
    ping_var_us2: float | None
    ping_loss: float | None  # fraction 0..1 of echo requests left unanswered
    syn_rtt_us: int | None
    fa: str | None  # p0f label of the first SYN+ACK, None when unknown or no port answered
    fa_port: int | None
    probed_at: float
    # p0f's hop distance of that SYN+ACK (its initial TTL minus the observed TTL; analyzer/rules.py
    # cond_hops). At the end, with a default: older writers and readers keep working.
    fa_dist: int | None = None

    def fields(self) -> dict[str, str]:
        return {k: "" if v is None else (repr(v) if isinstance(v, float) else str(v))
                for k, v in _items(self)}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Result:
        def opt(name: str, hi: float) -> float | None:
            text = fields.get(name, "")
            if text == "":
                return None
            try:
                return bounded(name, parse_number(name, text), 0, hi)
            except ValueError as exc:
                raise JobError(str(exc)) from None

        def micros(name: str) -> int | None:
            value = opt(name, DURATION_MAX_US)
            return None if value is None else round(value)

        job = fields.get("job", "")
        if not job or len(job) > 64:
            raise JobError(f"result without a job id: {short(job)}")
        src = fields.get("src", "")
        try:
            src = address(src)
        except ValueError:
            raise JobError(f"src is not an IP address: {short(src)}") from None
        fa_port = opt("fa_port", 65535)
        fa_dist = opt("fa_dist", HOPS_MAX)
        if fa_dist is not None and fa_dist != int(fa_dist):
            raise JobError(f"fa_dist is not a whole number of hops: {short(fields.get('fa_dist'))}")
        try:
            # The record's own rules (analyzer.record), so that a result that passes here always
            # makes a record that the analyzer can read back and judge.
            fa = p0f_label("fa", fields.get("fa") or None)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        return cls(
            job=job,
            src=src,
            t=_epoch(fields, "t"),
            ping_min_us=micros("ping_min_us"),
            ping_avg_us=micros("ping_avg_us"),
            ping_max_us=micros("ping_max_us"),
            ping_var_us2=opt("ping_var_us2", VARIANCE_MAX_US2),
            ping_loss=opt("ping_loss", 1.0),
            syn_rtt_us=micros("syn_rtt_us"),
            fa=fa,
            fa_port=None if fa_port is None else int(fa_port),
            probed_at=_epoch(fields, "probed_at"),
            fa_dist=None if fa_dist is None else int(fa_dist),
        )


def _items(result: Result) -> list[tuple[str, object]]:
    return [(name, getattr(result, name)) for name in Result.__dataclass_fields__]


def address(value: object) -> str:
    """The canonical text of an IP address; ValueError for anything else. Refused too: an IPv6
    address with a zone (`fe80::1%eth0`): it names a link of one machine, not a source on the
    Internet, and Zeek refuses it in a verdict (every verdict behind it would wait)."""
    if not isinstance(value, str):  # ip_address() also takes ints (and True): not a contract
        raise ValueError(f"not an IP address: {short(value)}")
    return _canonical(value)


# Every stream entry names its source and darknet address, and a darknet's sources repeat: the
# `ipaddress` parse (~3 µs) is done once per address text, not per entry (failures are not kept).
@functools.lru_cache(maxsize=1 << 18)
def _canonical(value: str) -> str:
    ip = ipaddress.ip_address(value)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(f"an address with a zone is not a source: {short(value)}")
    return str(ip)


def short(value: object, limit: int = 60) -> str:
    """`value` for a one-line message: repr, cut to `limit` characters; never fails (a huge int's
    repr raises ValueError past Python's digit limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_number(name: str, text: str) -> float:
    """A stream field holding a finite decimal number; ValueError naming `name` otherwise."""
    if len(text) > NUMBER_MAX_CHARS or not text.isascii():
        raise ValueError(f"{name} is not a number: {short(text)}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} is not a number: {short(text)}") from None
    # Checked before any int(): int(inf) raises OverflowError, which no reader expects.
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite: {short(text)}")
    return value


def bounded(name: str, value: float, lo: float, hi: float) -> float:
    """`value` if lo <= value <= hi; ValueError naming `name` otherwise (nan too). Compares ints of
    any size exactly, without converting them to float (which overflows)."""
    if not lo <= value <= hi:
        raise ValueError(f"{name} out of range {lo:g}..{hi:g}: {short(value)}")
    return value


def epoch(name: str, value: float) -> float:
    """Epoch seconds within 0..EPOCH_MAX; ValueError otherwise."""
    return bounded(name, value, 0, EPOCH_MAX)


def p0f_label(name: str, value: object) -> str | None:
    """A p0f label 'class:name:flavor' (at most 256 characters, printable) or None."""
    if value is None:
        return None
    if (not isinstance(value, str) or value.count(":") < 2 or len(value) > 256
            or not value.isprintable()):
        raise ValueError(f"{name} must be a p0f label 'class:name:flavor' or null, not {short(value)}")
    return value


def epoch_seconds(text: str) -> float | None:
    """A stream field holding epoch seconds (within 0..EPOCH_MAX), or None when it is not one
    (every stream reader checks times this one way; each raises its own error)."""
    try:
        return epoch("time", parse_number("time", text))
    except ValueError:
        return None


def _decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


def _epoch(fields: dict[str, str], name: str) -> float:
    text = fields.get(name, "")
    value = epoch_seconds(text)
    if value is None:
        raise JobError(f"{name} is not epoch seconds within 0..{EPOCH_MAX:.0f}: {short(text)}")
    return value
