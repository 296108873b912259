"""The paper's decision rules (section 4.3), per source address.

Window: a source's records with `now - window <= t <= now` take part (both edges inclusive);
`now` is the source's latest record time unless given. Records after `now` are ignored.

Condition (1), OS mismatch: some record in the window has `fp` and `fa` both known and different at
the chosen level — `class` (first field), `name` (`class:name`, the default) or `flavor` (the whole
label). An unknown label (null) never counts as a mismatch.

Condition (2), timing: only records with ping data (`ping_max_us` and `ping_avg_us`) and a T^p take
part. (i) some such record has `tp_us > ping_max_us` (strict); (ii) over all such records in the
window, mean(tp_us) and mean(ping_max_us); (iii) relay if mean(T^p) > mean(max T^a) (strict).
Condition (2) holds when (i) and (iii) hold.

relay = (1) or (2).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from analyzer.record import Record

OsLevel = Literal["class", "name", "flavor"]
OS_LEVELS: tuple[OsLevel, ...] = ("class", "name", "flavor")
DEFAULT_WINDOW = 86400.0


@dataclass(frozen=True, slots=True)
class Verdict:
    src: str
    cond_os: bool  # condition (1)
    cond_timing: bool  # condition (2): (i) and (iii)
    relay: bool  # (1) or (2)
    tp_mean_us: float | None  # mean T^p over the timing samples; None without samples
    ta_max_mean_us: float | None  # mean of the per-probe maximum ping RTT over the same samples
    samples: int  # timing samples: records in the window with T^p and ping data
    records: int  # records of this source in the window
    with_ping: int  # of those, records with ping data (some may lack a T^p)
    tp_exceeds_ta_max: int  # samples with tp_us > ping_max_us (condition (2)(i) holds when > 0)
    os_pair: tuple[str, str] | None  # the first (fp, fa) pair that differed, as full labels
    window_start: float
    window_end: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["os_pair"] = list(self.os_pair) if self.os_pair else None
        return out


def os_part(label: str, level: OsLevel) -> str:
    """The part of a p0f label `class:name:flavor` that condition (1) compares."""
    if level == "flavor":
        return label
    parts = label.split(":", 2)
    return parts[0] if level == "class" else ":".join(parts[:2])


def judge(
    records: Sequence[Record],
    *,
    window: float = DEFAULT_WINDOW,
    os_level: OsLevel = "name",
    now: float | None = None,
) -> Verdict:
    """The verdict for ONE source from its records (all must share one `src`)."""
    if not records:
        raise ValueError("judge needs at least one record")
    if os_level not in OS_LEVELS:
        raise ValueError(f"os_level must be one of {', '.join(OS_LEVELS)}, not {os_level!r}")
    if not window >= 0:
        raise ValueError(f"window must be a non-negative number of seconds, not {window!r}")
    src = records[0].src
    if any(r.src != src for r in records):
        raise ValueError("judge takes the records of one source; use judge_all for several")
    end = max(r.t for r in records) if now is None else now
    start = end - window
    in_window = [r for r in records if start <= r.t <= end]

    os_pair: tuple[str, str] | None = None
    for r in in_window:
        if r.fp is not None and r.fa is not None and os_part(r.fp, os_level) != os_part(r.fa, os_level):
            os_pair = (r.fp, r.fa)
            break

    with_ping = [r for r in in_window if r.has_ping]
    pairs: list[tuple[int, int]] = []  # (T^p, max T^a) of each timing sample
    for r in with_ping:
        if r.tp_us is not None and r.ping_max_us is not None:
            pairs.append((r.tp_us, r.ping_max_us))
    exceeds = sum(1 for tp, ta_max in pairs if tp > ta_max)
    tp_mean: float | None = None
    ta_mean: float | None = None
    cond_timing = False
    if pairs:
        tp_mean = sum(tp for tp, _ in pairs) / len(pairs)
        ta_mean = sum(ta_max for _, ta_max in pairs) / len(pairs)
        cond_timing = exceeds > 0 and tp_mean > ta_mean
    cond_os = os_pair is not None
    return Verdict(
        src=src,
        cond_os=cond_os,
        cond_timing=cond_timing,
        relay=cond_os or cond_timing,
        tp_mean_us=tp_mean,
        ta_max_mean_us=ta_mean,
        samples=len(pairs),
        records=len(in_window),
        with_ping=len(with_ping),
        tp_exceeds_ta_max=exceeds,
        os_pair=os_pair,
        window_start=start,
        window_end=end,
    )


def judge_all(
    records: Iterable[Record],
    *,
    window: float = DEFAULT_WINDOW,
    os_level: OsLevel = "name",
    now: float | None = None,
) -> list[Verdict]:
    """One verdict per source address, sorted by address (IPv4 before IPv6, numerically)."""
    by_src: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_src[r.src].append(r)
    return [
        judge(by_src[src], window=window, os_level=os_level, now=now)
        for src in sorted(by_src, key=_address_order)
    ]


def _address_order(src: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(src)
    return addr.version, int(addr)


def summary(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Table 3's detection rows."""
    return {
        "sources": len(verdicts),
        "relays_by_os": sum(v.cond_os for v in verdicts),
        "relays_by_timing": sum(v.cond_timing for v in verdicts),
        "relays": sum(v.relay for v in verdicts),
    }
