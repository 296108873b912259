"""The paper's decision rules (section 4.3), per source address.

Window: a source's records with `now - window <= t <= now` take part (both edges inclusive);
`now` is the source's latest record time unless given. Records after `now` are ignored.

Condition (1), OS mismatch: some record in the window has `fp` and `fa` both known and different at
the chosen level — `class` (first field), `name` (`class:name`, the default) or `flavor` (the whole
label). An unknown label (null) never counts as a mismatch, and neither does a userland tool's
label (p0f class `!`, e.g. `!:NMap:SYN scan`: not an OS; see `names_an_os`).

Condition (2), timing: only records with ping data (`ping_max_us` and `ping_avg_us`) and a T^p take
part. (i) some such record has `tp_us > ping_max_us` (strict); (ii) over all such records in the
window, mean(tp_us) and mean(ping_max_us); (iii) relay if mean(T^p) > mean(max T^a) (strict).
Condition (2) holds when (i) and (iii) hold.

relay = (1) or (2).

Beyond the paper (extra evidence; the fields above keep exactly the paper's meaning)
-----------------------------------------------------------------------------------
The paper's condition (2) compares two means with no allowance for noise: on a fixed-delay path a
direct scanner's mean T^p and mean max ping differ by a few hundred µs either way, so one T^p
delayed ~2 ms by machine load flips it. And it needs ping, so a relay that drops ICMP is never
found by timing. `judge` therefore also reports a stronger timing test:

- Samples: the records in the window with a T^p and an active reference T^a: the probe's maximum
  ping RTT (as the paper) or, for a record without ping data, `syn_rtt_us` (our SYN probe -> the
  SYN+ACK of the same address: it also ends at the relay itself, and a port answers even when
  ICMP is dropped). `timing_ref` says which: "ping", "syn" or "ping+syn".
- `timing_margin_us` = the median over the samples of d = T^p - T^a, paired per record (the ping
  or SYN probe ran moments after that handshake, so path-RTT drift cancels). The median, not the
  mean: one T^p delayed by load, however much, cannot move it once there are 3 samples.
- `timing_noise_us` = s / sqrt(n), the standard error of the margin, with s the per-sample spread:
  s² = (1.4826 · MAD(d))² + 2 · mean(ping_var_us2). The MAD is the robust standard deviation of
  the differences (0 with one sample); the ping variance within each probe measures the path's
  jitter, which both T^p and T^a carry (hence twice), and is the only spread estimate at n = 1.
- `cond_timing_strong`: margin > `timing_threshold_us` = max(TIMING_FLOOR_US, TIMING_K · noise).
  TIMING_FLOOR_US = 5 ms: a relay adds twice its attacker leg to T^p, so the smallest relay the
  lab plays (+5 ms one way) shows ~10 ms and a direct scanner ~0 ± jitter; 5 ms splits that gap
  evenly and is well above the few-ms load spikes of a busy 2-core box. TIMING_K = 3: three
  standard errors, a ~0.1 % one-sided false alarm under Gaussian noise, so a jittery path needs a
  proportionally larger margin (a direct host on a 30 ms-jitter path cannot pass on one sample).
  The price: relays adding < 2.5 ms one way are not claimed, and neither is a sample at a jittery
  path until enough samples shrink the standard error.

`relay_confident` = (1) or the strong timing test. Condition (1) is kept as it is: an OS mismatch
between the SYN and the probe's SYN+ACK means several machines share the address and the
connection came from one the probe did not reach, which is what a NAT relay is (a home NAT is one
too: the method cannot tell intent, see README `limits`). p0f labels do not jitter the way times
do, and an unknown label already never counts; `os_mismatches` reports how many records showed a
mismatch so a single one can be told from a consistent one.
"""

from __future__ import annotations

import ipaddress
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeGuard

from analyzer.record import Record

OsLevel = Literal["class", "name", "flavor"]
OS_LEVELS: tuple[OsLevel, ...] = ("class", "name", "flavor")
DEFAULT_WINDOW = 86400.0
TIMING_FLOOR_US = 5000.0  # the strong timing test's absolute margin floor (module docstring)
TIMING_K = 3.0  # ... and its margin in standard errors of the noise
_MAD_TO_SD = 1.4826  # MAD -> standard deviation for Gaussian noise
TimingRef = Literal["ping", "syn", "ping+syn"]


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
    # Extra evidence beyond the paper (module docstring); defaults keep older callers working.
    cond_timing_strong: bool = False  # margin > threshold
    relay_confident: bool = False  # (1) or cond_timing_strong
    timing_ref: TimingRef | None = None  # the active reference T^a the strong test used
    timing_samples: int = 0  # records with T^p and that reference
    timing_margin_us: float | None = None  # median of T^p - T^a over those records
    timing_noise_us: float | None = None  # standard error of the margin
    timing_threshold_us: float | None = None  # max(TIMING_FLOOR_US, TIMING_K * noise)
    os_mismatches: int = 0  # records in the window whose fp and fa differ at the chosen level

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


def names_an_os(label: str | None) -> TypeGuard[str]:
    """Whether condition (1) can use `label`: not unknown (null) and not a userland tool.

    p0f's class `!` labels a tool, not an OS (`!:NMap:SYN scan`, `!:MSIE:8 or newer`); its
    database's `sys` line says the tool runs on several OSes (NMap: `@unix,@win`). Compared with
    the probe's OS it would always "differ": every nmap -sS scanner (its kernel RST answers our
    SYN+ACK, so the handshake counts) whose host has an open port would be called a relay. Such a
    label says no more about the OS than an unknown one, and is treated the same.
    """
    return label is not None and not label.startswith("!:")


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
    os_mismatches = 0
    for r in in_window:
        if (names_an_os(r.fp) and names_an_os(r.fa)
                and os_part(r.fp, os_level) != os_part(r.fa, os_level)):
            os_mismatches += 1
            if os_pair is None:
                os_pair = (r.fp, r.fa)

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
    strong = strong_timing(in_window)
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
        cond_timing_strong=strong.holds,
        relay_confident=cond_os or strong.holds,
        timing_ref=strong.ref,
        timing_samples=strong.samples,
        timing_margin_us=strong.margin_us,
        timing_noise_us=strong.noise_us,
        timing_threshold_us=strong.threshold_us,
        os_mismatches=os_mismatches,
    )


@dataclass(frozen=True, slots=True)
class StrongTiming:
    """The strong timing test's result (module docstring)."""

    holds: bool = False
    ref: TimingRef | None = None
    samples: int = 0
    margin_us: float | None = None
    noise_us: float | None = None
    threshold_us: float | None = None


def strong_timing(records: Iterable[Record]) -> StrongTiming:
    """The noise-aware timing test over `records` (already limited to the window)."""
    diffs: list[float] = []
    ping_vars: list[float] = []
    refs: set[str] = set()
    for r in records:
        if r.tp_us is None:
            continue
        if r.has_ping and r.ping_max_us is not None:
            diffs.append(float(r.tp_us - r.ping_max_us))
            ping_vars.append(r.ping_var_us2 or 0.0)
            refs.add("ping")
        elif r.syn_rtt_us is not None:
            diffs.append(float(r.tp_us - r.syn_rtt_us))
            refs.add("syn")
    if not diffs:
        return StrongTiming()
    n = len(diffs)
    margin = statistics.median(diffs)
    spread = _MAD_TO_SD * statistics.median(abs(d - margin) for d in diffs)
    path_var = 2 * statistics.fmean(ping_vars) if ping_vars else 0.0
    noise = math.sqrt((spread * spread + path_var) / n)
    threshold = max(TIMING_FLOOR_US, TIMING_K * noise)
    ref: TimingRef = "ping+syn" if len(refs) == 2 else ("ping" if "ping" in refs else "syn")
    return StrongTiming(
        holds=margin > threshold, ref=ref, samples=n,
        margin_us=margin, noise_us=noise, threshold_us=threshold,
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
