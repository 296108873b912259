"""Probe jobs and results: the schema both ends of the Redis streams agree on (DESIGN.md).

Stream entries are flat string maps; an empty string is null. Every entry read from Redis is
validated here, so a malformed job is dead-lettered with a reason instead of crashing a worker.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

DEFAULT_PORTS: tuple[int, ...] = (22, 23, 80, 443, 445, 3389, 8080)


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
            src = str(ipaddress.ip_address(src))
        except ValueError:
            raise JobError(f"src is not an IP address: {src!r}") from None
        ports_text = fields.get("ports", "")
        ports = DEFAULT_PORTS
        if ports_text:
            try:
                ports = tuple(int(p) for p in ports_text.split(","))
            except ValueError:
                raise JobError(f"ports is not a comma-separated list of numbers: {ports_text!r}") from None
            if not ports or any(not 0 < p < 65536 for p in ports):
                raise JobError(f"ports out of range 1-65535: {ports_text!r}")
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

    def fields(self) -> dict[str, str]:
        return {k: "" if v is None else (repr(v) if isinstance(v, float) else str(v))
                for k, v in _items(self)}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Result:
        def opt(name: str, kind: type) -> int | float | None:
            text = fields.get(name, "")
            if text == "":
                return None
            try:
                value = float(text)
            except ValueError:
                raise JobError(f"{name} is not a number: {text!r}") from None
            # Checked before int(): int(inf) raises OverflowError, which no reader expects.
            if not math.isfinite(value):
                raise JobError(f"{name} is not finite: {text!r}")
            if value < 0 or (name == "ping_loss" and value > 1):
                raise JobError(f"{name} out of range: {text!r}")  # times and counts are never negative
            return int(value) if kind is int else value

        job = fields.get("job", "")
        if not job:
            raise JobError("result without a job id")
        src = fields.get("src", "")
        try:
            src = str(ipaddress.ip_address(src))
        except ValueError:
            raise JobError(f"src is not an IP address: {src!r}") from None
        fa = fields.get("fa") or None
        return cls(
            job=job,
            src=src,
            t=_epoch(fields, "t"),
            ping_min_us=opt("ping_min_us", int),  # type: ignore[arg-type]
            ping_avg_us=opt("ping_avg_us", int),  # type: ignore[arg-type]
            ping_max_us=opt("ping_max_us", int),  # type: ignore[arg-type]
            ping_var_us2=opt("ping_var_us2", float),
            ping_loss=opt("ping_loss", float),
            syn_rtt_us=opt("syn_rtt_us", int),  # type: ignore[arg-type]
            fa=fa,
            fa_port=opt("fa_port", int),  # type: ignore[arg-type]
            probed_at=_epoch(fields, "probed_at"),
        )


def _items(result: Result) -> list[tuple[str, object]]:
    return [(name, getattr(result, name)) for name in Result.__dataclass_fields__]


def epoch_seconds(text: str) -> float | None:
    """A stream field holding epoch seconds, or None when it is not a finite, non-negative number
    (every stream reader checks times this one way; each raises its own error)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _epoch(fields: dict[str, str], name: str) -> float:
    text = fields.get(name, "")
    value = epoch_seconds(text)
    if value is None:
        raise JobError(f"{name} is not epoch seconds: {text!r}")
    return value
