"""The measurement record (paper Table 2 / Fig. 4): one passive handshake plus its active probe.

Field names are a fixed contract (docs/design.md). Records cross process boundaries as JSON lines
(`replay` writes them, `judge` reads them, the live analyzer logs them), so `from_json` validates
every field and says which one is wrong. The bounds and the label rule are the streams' own
(`prober.job`): a probe result that passed the `results` stream's check always makes a record that
reads back, and whatever reads records (the live analyzer's window in Redis, `judge`, the Zeek
verdict) can count on finite, bounded numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from prober.job import (
    DURATION_MAX_US,
    EPOCH_MAX,
    HOPS_MAX,
    VARIANCE_MAX_US2,
    address,
    bounded,
    p0f_label,
    short,
)


class RecordError(ValueError):
    """A record that does not follow the contract; the message names the field."""


@dataclass(frozen=True, slots=True)
class Record:
    t: float  # the SYN's arrival, epoch seconds
    src: str
    dst: str
    tp_us: int | None  # T^p: client's reply minus our SYN+ACK, µs; None when Karn's rule dropped it
    ping_min_us: int | None = None
    ping_avg_us: int | None = None
    ping_max_us: int | None = None
    ping_var_us2: float | None = None
    syn_rtt_us: int | None = None
    fp: str | None = None  # p0f label of the client's SYN
    fa: str | None = None  # p0f label of the SYN+ACK the source returned to our probe
    # Hop distances (p0f: initial TTL minus observed TTL), added at the end (analyzer/rules.py
    # cond_hops). syn_dist is null when the SYN was crafted (analyzer/hops.py): its TTL is a tool's.
    syn_dist: int | None = None  # of the client's SYN
    fa_dist: int | None = None  # of the SYN+ACK the source returned to our probe
    # Application-layer timing (analyzer/rules.py cond_app), added at the end: our banner -> the
    # client's first data, µs (Handshake.tapp_us); null off server-first ports or without a reply.
    tapp_us: int | None = None

    @property
    def has_ping(self) -> bool:
        return self.ping_max_us is not None and self.ping_avg_us is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Record:
        if not isinstance(obj, dict):
            raise RecordError("a record must be a JSON object")
        for name in ("t", "src", "dst"):
            if obj.get(name) is None:
                raise RecordError(f"field {name!r} is missing")
        return cls(
            t=_number(obj, "t", nullable=False, hi=EPOCH_MAX),
            src=_address(obj, "src"),
            dst=_address(obj, "dst"),
            tp_us=_micros(obj, "tp_us"),
            ping_min_us=_micros(obj, "ping_min_us"),
            ping_avg_us=_micros(obj, "ping_avg_us"),
            ping_max_us=_micros(obj, "ping_max_us"),
            ping_var_us2=_number(obj, "ping_var_us2", hi=VARIANCE_MAX_US2),
            syn_rtt_us=_micros(obj, "syn_rtt_us"),
            fp=_label(obj, "fp"),
            fa=_label(obj, "fa"),
            syn_dist=_hops(obj, "syn_dist"),
            fa_dist=_hops(obj, "fa_dist"),
            tapp_us=_micros(obj, "tapp_us"),
        )


def _number(obj: dict[str, Any], name: str, *, nullable: bool = True, hi: float = math.inf) -> Any:
    value = obj.get(name)
    if value is None and nullable:
        return None
    # Ints of any size are compared as they are: float() of a 400-digit one overflows.
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise RecordError(f"field {name!r} must be a finite number, not {short(value)}")
    if value < 0:
        raise RecordError(f"field {name!r} must not be negative, not {short(value)}")
    try:
        bounded(repr(name), value, 0, hi)
    except ValueError as exc:
        raise RecordError(f"field {exc}") from None
    return float(value)


def _micros(obj: dict[str, Any], name: str) -> int | None:
    value = _number(obj, name, hi=DURATION_MAX_US)
    return None if value is None else round(value)


def _hops(obj: dict[str, Any], name: str) -> int | None:
    """A hop distance: a whole number 0..HOPS_MAX (a TTL difference), or null/absent (records
    written before the field existed read back with it null)."""
    value = obj.get(name)
    if value is None:
        return None
    # A JSON 3.0 is a whole number too; 3.5, NaN, true and "3" are not.
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if not whole:
        raise RecordError(f"field {name!r} must be a whole number of hops, not {short(value)}")
    if not 0 <= value <= HOPS_MAX:
        raise RecordError(f"field {name!r} out of range 0..{HOPS_MAX}: {short(value)}")
    return int(value)


def _address(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    try:
        return address(value)
    except ValueError:
        raise RecordError(f"field {name!r} is not an IP address: {short(value)}") from None


def _label(obj: dict[str, Any], name: str) -> str | None:
    try:
        return p0f_label(f"field {name!r}", obj.get(name))
    except ValueError as exc:
        raise RecordError(str(exc)) from None
