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

Hop counts (`cond_hops`)
------------------------
A direct host's SYN and the SYN+ACK it returns to our probe cross the same routers to us, so their
p0f hop distances (initial TTL minus observed TTL: `Record.syn_dist`, `Record.fa_dist`) agree. A
forwarding relay's SYN comes from the attacker behind it, one router (the relay) or more further
away, while the SYN+ACK comes from the relay itself. Per record, h = syn_dist - fa_dist - the
prober's hop offset (`hops_offset`, 0 by default: the prober sits where the sensor is, as in the
lab). `cond_hops` holds when, over the window's usable pairs:

- there are at least HOPS_MIN_SAMPLES = 3 of them: a median of 3 ignores any one bad pair, so one
  route change between a handshake and its probe (that pair is off by the hops added or removed;
  the next handshake and probe both take the new route) or one misread TTL cannot decide alone,
  while the lab's relays give 5 pairs per run;
- `hops_margin` = the median of h is >= 1 (a whole router further away), and
- `hops_spread` = the MAD of h is <= HOPS_SPREAD_MAX = 1 hop: one attacker behind one relay gives
  the same h every time; a TTL that changes per SYN (a tool that randomises it) does not.

What would break the assumption, and how each is handled:
- Crafted SYNs (masscan, ZMap, Mirai, nmap -sS): their TTL is the tool's, not a stack's initial
  TTL. Such a SYN gets no distance at all (`analyzer/hops.py`: a userland tool's p0f label, no TCP
  options, or a RST to our SYN+ACK, which no socket of the sender's kernel expected); a record with
  a tool's label (`!:`) is set aside here too, whoever wrote it.
- An initial TTL near a rounding edge: p0f reads the initial TTL from the signature that matched
  (Windows 128, Linux 64), else rounds the observed TTL up to 32/64/128/255. A host more than 32
  hops away with initial TTL 64 shows a TTL <= 31, which rounds to 32: its distance is misread by
  exactly 32 (by 64 or 127 at the higher edges). Both packets of a direct host share one stack
  and one TTL, so they are misread together and h stays 0; a misread of one of them (the SYN read
  from its signature, the SYN+ACK from a bare guess, or a Windows attacker (128) behind a Linux NAT
  (64)) shifts h by about 32. Hence a distance p0f does not trust (over HOPS_DIST_MAX = 35, p0f's
  own `+?`) and a pair with |h| > HOPS_DIFF_MAX = 16 (half the smallest rounding gap, 32) are set
  aside (`hops_set_aside`), never counted as hops. The price: an attacker more than 16 routers
  behind its relay is left to the timing test (which such a leg rarely escapes).
- A route change between a handshake and its probe: one pair off by +-1 (or a few); the median
  over >= 3 pairs does not move. A route that flaps back and forth at every probe cannot be told
  from a relay by hops alone: that is the limit.
- The prober's place: the test assumes the prober's SYN+ACKs cross as many routers as the
  sensor's traffic from the same source. A prober elsewhere has a constant offset; `judge` takes
  it (`hops_offset`) and `estimate_hop_offset` learns it as the median h of the sources judged
  direct (no timing and no OS evidence), which `judge` reports (`stepstone-analyzer judge`).

Application-layer timing (`cond_app`)
-------------------------------------
A proxy that terminates TCP (socat, SOCKS, `ssh -D`) completes the handshake itself: T^p, the SYN,
ping and hops are all its own, and none of the tests above can see the attacker behind it. On a
port where the server speaks first (SSH, FTP, SMTP, Telnet), the sensor sends a banner and times
the client's first data: `Record.tapp_us` (the responder's `--banners`, or Zeek's
`StepStone::server_first_ports`). A direct client answers one path RTT after the banner, plus its
own processing; through a proxy the banner crosses the onward leg to the real client and the answer
comes back the same way, so T^app grows by twice that leg. Per record, a = tapp_us - T^a, with T^a
the same active reference as the strong timing test (the probe's maximum ping RTT, else
`syn_rtt_us`), paired per record. `cond_app` is the strong timing test (`timing_test`: the median,
the same noise model, TIMING_FLOOR_US and TIMING_K) run on a - `app_allowance_us`:

- `app_margin_us` = median(a); `cond_app`: app_margin_us - allowance > max(TIMING_FLOOR_US,
  TIMING_K * noise), i.e. the evidence's threshold is allowance + max(floor, K * noise).
- APP_ALLOWANCE_US = 10 ms: the client's own time to answer a banner, which a direct client adds
  and a network leg cannot be told from. Automated clients (bots, scanners, scripted ssh/smtp
  clients) answer a banner in well under a millisecond of processing; 10 ms covers that on a busy
  host (scheduler and interpreter delays) with room to spare, and with the 5 ms floor keeps the
  smallest claimed onward leg at ~7.5 ms one way; the +20 ms proxies (a ~ 40 ms) pass as long as
  3 standard errors of the noise stay under 30 ms. Lab (docs/lab.md): fast direct clients at
  1-150 ms RTT, median a between -0.1 and +0.34 ms.
  A client that waits on purpose before answering (a human typing, a bot's fixed sleep, the
  lab's 150 ms "slow" client) is indistinguishable from a proxy leg of half that time: timing of
  one answer cannot separate the two. `app_allowance_us` (`--app-allowance`) raises it where
  such clients are common, at the price of the proxies with shorter legs.
- APP_MIN_SAMPLES = 3 records with a T^app and a reference, unlike the strong timing test (1): an
  application answer carries the client's scheduling, which the kernel's T^p does not, and a
  median of 3 ignores one answer delayed by a busy client.
- A missing answer (the client sent nothing before the timeout, closed, or spoke before our
  banner: tapp_us null) is no sample. A client that sends its own banner at once (OpenSSH sends
  its identification without waiting) gives T^app ~ 0 or none: never terminating.

The verdict's kind
------------------
Every verdict says what it found (`kind`) and which evidence held (`evidence`: test, margin,
threshold, samples, unit, in the order forwarding evidence first):

- `forwarding`: the strong timing test holds (an attacker leg beyond the address), or cond_hops
  holds with at most one client OS among the window's SYNs (one machine behind a forwarding box),
  with or without condition (1).
- `terminating`: `cond_app` holds (the answer to our banner is late by more than the path and
  the client's processing) and no forwarding evidence does: a proxy that completes the handshake
  itself. Forwarding evidence wins: a NAT relay shows the attacker leg in T^app too.
- `shared`: condition (1) alone, or hops with two or more client OSes among the SYNs
  (`os_clients`), and no timing evidence: several machines behind one address, a home NAT or
  CGN. Reported, not called a relay by default.
- `none`: nothing held.

`relay_confident` = kind in (`forwarding`, `terminating`). It used to be (1) or the strong timing
test; an OS mismatch alone is now `shared`: a relay and a home NAT both show one, and only an
attacker leg (timing) or one machine a hop behind (hops) tells the relay apart. p0f labels do not
jitter the way times do, and an unknown label already never counts; `os_mismatches` reports how
many records showed a mismatch so a single one can be told from a consistent one. The paper's
`relay` keeps exactly the paper's meaning.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, TypeGuard

from analyzer.record import Record

OsLevel = Literal["class", "name", "flavor"]
OS_LEVELS: tuple[OsLevel, ...] = ("class", "name", "flavor")
DEFAULT_WINDOW = 86400.0
TIMING_FLOOR_US = 5000.0  # the strong timing test's absolute margin floor (module docstring)
TIMING_K = 3.0  # ... and its margin in standard errors of the noise
_MAD_TO_SD = 1.4826  # MAD -> standard deviation for Gaussian noise
TimingRef = Literal["ping", "syn", "ping+syn"]
HOPS_MIN_SAMPLES = 3  # usable (syn_dist, fa_dist) pairs before cond_hops may hold (docstring)
HOPS_SPREAD_MAX = 1.0  # MAD of the per-record hop differences, hops
HOPS_DIST_MAX = 35  # p0f's MAX_DIST: a larger distance is p0f's "+?", not trusted
HOPS_DIFF_MAX = 16  # |syn_dist - fa_dist| beyond: a rounding-edge misread, set aside
APP_ALLOWANCE_US = 10_000.0  # a direct client's own time to answer a banner (docstring, cond_app)
MAX_APP_ALLOWANCE_MS = 10_000.0  # an operator's allowance, bounded: beyond it no proxy is ever found
APP_MIN_SAMPLES = 3  # records with T^app and a reference before cond_app may hold
# What a verdict says it found; new kinds are added at the end, never renamed.
Kind = Literal["forwarding", "terminating", "shared", "none"]
KINDS: tuple[Kind, ...] = ("forwarding", "terminating", "shared", "none")
RELAY_KINDS: frozenset[str] = frozenset({"forwarding", "terminating"})  # what relay_confident means


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
    # Hop counts and the kind (module docstring), added at the end.
    cond_hops: bool = False
    hops_samples: int = 0  # usable (syn_dist, fa_dist) pairs
    hops_margin: float | None = None  # median of syn_dist - fa_dist - hops_offset
    hops_spread: float | None = None  # MAD of the same
    hops_set_aside: int = 0  # pairs set aside: a distance p0f does not trust, |h| > HOPS_DIFF_MAX
    os_clients: int = 0  # distinct client OSes (chosen level) among the window's SYN labels
    kind: Kind = "none"
    evidence: tuple[Evidence, ...] = ()
    # Application-layer timing (module docstring, cond_app), added at the end.
    cond_app: bool = False
    app_margin: float | None = None  # median of tapp_us - T^a over the samples, µs
    app_samples: int = 0  # records with a T^app and an active reference

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["os_pair"] = list(self.os_pair) if self.os_pair else None
        out["evidence"] = [e.to_dict() for e in self.evidence]
        return out


@dataclass(frozen=True, slots=True)
class Evidence:
    """One test that held: how far past its threshold, on how many samples. New tests (e.g. an
    application-layer timing test for `terminating`) add entries; the fields stay."""

    test: str  # "timing", "hops", "app", "os", "clients"
    margin: float  # the test's statistic (timing, app: µs; hops: hops; os, clients: counts)
    threshold: float  # what it had to pass (timing, hops: strictly above / at least; see `test`)
    samples: int  # the samples the statistic is over
    unit: str  # "us", "hops", "records", "oses"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def brief(self) -> str:
        """One token for logs and Zeek: `hops=+1/5` (margin / samples)."""
        margin = f"{self.margin / 1000:+.1f}ms" if self.unit == "us" else f"{self.margin:+g}"
        return f"{self.test}={margin}/{self.samples}"


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
    hops_offset: float = 0.0,
    app_allowance_us: float = APP_ALLOWANCE_US,
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
    hops = hop_test(in_window, offset=hops_offset)
    app = app_timing(in_window, allowance_us=app_allowance_us)
    clients = {os_part(r.fp, os_level) for r in in_window if names_an_os(r.fp)}
    known = sum(1 for r in in_window if names_an_os(r.fp) and names_an_os(r.fa))
    labelled = sum(1 for r in in_window if names_an_os(r.fp))
    evidence, kind = findings(strong, hops, os_mismatches=os_mismatches, os_known=known,
                              clients=len(clients), labelled=labelled, app=app)
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
        relay_confident=kind in RELAY_KINDS,
        timing_ref=strong.ref,
        timing_samples=strong.samples,
        timing_margin_us=strong.margin_us,
        timing_noise_us=strong.noise_us,
        timing_threshold_us=strong.threshold_us,
        os_mismatches=os_mismatches,
        cond_hops=hops.holds,
        hops_samples=hops.samples,
        hops_margin=hops.margin,
        hops_spread=hops.spread,
        hops_set_aside=hops.set_aside,
        os_clients=len(clients),
        kind=kind,
        evidence=tuple(evidence),
        cond_app=app.holds,
        app_margin=app.margin_us,
        app_samples=app.samples,
    )


def findings(strong: StrongTiming, hops: HopTest, *, os_mismatches: int, os_known: int, clients: int,
             labelled: int, app: StrongTiming | None = None) -> tuple[list[Evidence], Kind]:
    """The evidence that held and the kind it makes, from the tests' results: `os_mismatches` of
    `os_known` records with both labels known, `clients` distinct client OSes over `labelled`
    SYN labels, `app` the application-layer test (`app_timing`; None: not measured). One place
    for `judge` and for reports that aggregate as they stream."""
    evidence: list[Evidence] = []
    if strong.holds:
        assert strong.margin_us is not None and strong.threshold_us is not None
        evidence.append(Evidence("timing", strong.margin_us, strong.threshold_us, strong.samples, "us"))
    if hops.holds:
        assert hops.margin is not None
        evidence.append(Evidence("hops", hops.margin, 1.0, hops.samples, "hops"))
    app_holds = app is not None and app.holds
    if app is not None and app_holds:
        assert app.margin_us is not None and app.threshold_us is not None
        evidence.append(Evidence("app", app.margin_us, app.threshold_us, app.samples, "us"))
    if os_mismatches:
        evidence.append(Evidence("os", float(os_mismatches), 1.0, os_known, "records"))
    if clients > 1:
        evidence.append(Evidence("clients", float(clients), 2.0, labelled, "oses"))
    kind = verdict_kind(timing=strong.holds, hops=hops.holds, os=os_mismatches > 0, clients=clients,
                        app=app_holds)
    return evidence, kind


def verdict_kind(*, timing: bool, hops: bool, os: bool, clients: int, app: bool = False) -> Kind:
    """What the evidence says (module docstring, "The verdict's kind"). `app`: cond_app, the
    application-layer timing test, which makes `terminating` when nothing forwarding holds."""
    if timing or (hops and clients <= 1):
        return "forwarding"
    if app:
        return "terminating"
    if hops or os:
        return "shared"
    return "none"


@dataclass(frozen=True, slots=True)
class HopTest:
    """The hop-count test's result (module docstring)."""

    holds: bool = False
    samples: int = 0
    margin: float | None = None
    spread: float | None = None
    set_aside: int = 0


class HopPair(Protocol):
    """What the hop test reads of a record (a report keeps only this of each)."""

    @property
    def syn_dist(self) -> int | None: ...
    @property
    def fa_dist(self) -> int | None: ...
    @property
    def fp(self) -> str | None: ...


def hop_differences(records: Iterable[HopPair], *, offset: float = 0.0) -> tuple[list[float], int]:
    """The usable per-record h = syn_dist - fa_dist - offset, and how many pairs were set aside."""
    diffs: list[float] = []
    set_aside = 0
    for r in records:
        if r.syn_dist is None or r.fa_dist is None:
            continue
        if r.fp is not None and r.fp.startswith("!:"):
            set_aside += 1  # a userland tool's SYN: its TTL is the tool's
            continue
        h = r.syn_dist - r.fa_dist - offset
        if max(r.syn_dist, r.fa_dist) > HOPS_DIST_MAX or abs(h) > HOPS_DIFF_MAX:
            set_aside += 1
            continue
        diffs.append(h)
    return diffs, set_aside


def hop_test(records: Iterable[HopPair], *, offset: float = 0.0) -> HopTest:
    """`cond_hops` over `records` (already limited to the window)."""
    diffs, set_aside = hop_differences(records, offset=offset)
    if not diffs:
        return HopTest(set_aside=set_aside)
    margin = statistics.median(diffs)
    spread = statistics.median(abs(d - margin) for d in diffs)
    holds = len(diffs) >= HOPS_MIN_SAMPLES and margin >= 1 and spread <= HOPS_SPREAD_MAX
    return HopTest(holds=holds, samples=len(diffs), margin=margin, spread=spread, set_aside=set_aside)


def estimate_hop_offset(records: Iterable[Record], verdicts: Iterable[Verdict]) -> tuple[float, int] | None:
    """The prober's hop offset from the sensor, learnt from the sources judged direct: neither the
    strong timing test nor condition (1) holds (hops are left out: they are what is being
    calibrated). The median over those sources of their median h (with no offset); a few relays
    that only hops would find cannot move it while direct sources are the majority, as in a
    darknet. (offset, sources used), or None without any source of HOPS_MIN_SAMPLES pairs."""
    direct = {v.src for v in verdicts if not v.cond_timing_strong and not v.cond_os}
    by_src: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.src in direct:
            by_src[r.src].append(r)
    medians = []
    for recs in by_src.values():
        diffs, _ = hop_differences(recs)
        if len(diffs) >= HOPS_MIN_SAMPLES:
            medians.append(statistics.median(diffs))
    if not medians:
        return None
    return statistics.median(medians), len(medians)


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
    diffs, mean_var, ref = against_reference(records, lambda r: r.tp_us)
    if ref is None:
        return StrongTiming()
    return timing_test(diffs, samples=len(diffs), mean_ping_var=mean_var, ref=ref)


def against_reference(records: Iterable[Record], measured: Callable[[Record], int | None]
                      ) -> tuple[list[float], float, TimingRef | None]:
    """Per record with a `measured` time and an active reference T^a (the probe's maximum ping
    RTT, else syn_rtt_us): measured - T^a; with the mean ping variance and which reference."""
    diffs: list[float] = []
    ping_vars: list[float] = []
    refs: set[str] = set()
    for r in records:
        value = measured(r)
        if value is None:
            continue
        if r.has_ping and r.ping_max_us is not None:
            diffs.append(float(value - r.ping_max_us))
            ping_vars.append(r.ping_var_us2 or 0.0)
            refs.add("ping")
        elif r.syn_rtt_us is not None:
            diffs.append(float(value - r.syn_rtt_us))
            refs.add("syn")
    if not diffs:
        return diffs, 0.0, None
    ref: TimingRef = "ping+syn" if len(refs) == 2 else ("ping" if "ping" in refs else "syn")
    return diffs, statistics.fmean(ping_vars) if ping_vars else 0.0, ref


def app_timing(records: Iterable[Record], *, allowance_us: float = APP_ALLOWANCE_US) -> StrongTiming:
    """`cond_app` over `records` (already limited to the window): the margin is the median of
    tapp_us - T^a, the threshold allowance + the strong timing test's (module docstring)."""
    diffs, mean_var, ref = against_reference(records, lambda r: r.tapp_us)
    if ref is None:
        return StrongTiming()
    return app_test(diffs, samples=len(diffs), mean_ping_var=mean_var, ref=ref, allowance_us=allowance_us)


def app_test(diffs: Sequence[float], *, samples: int, mean_ping_var: float, ref: TimingRef,
             allowance_us: float = APP_ALLOWANCE_US) -> StrongTiming:
    """cond_app from the differences tapp_us - T^a (as `timing_test` takes its own): the strong
    timing test on the differences less the client's allowance, reported back in T^app terms."""
    shifted = timing_test([d - allowance_us for d in diffs], samples=samples, mean_ping_var=mean_ping_var,
                          ref=ref)
    assert shifted.margin_us is not None and shifted.threshold_us is not None
    return dataclasses.replace(
        shifted, holds=shifted.holds and samples >= APP_MIN_SAMPLES,
        margin_us=shifted.margin_us + allowance_us, threshold_us=shifted.threshold_us + allowance_us)


def timing_test(diffs: Sequence[float], *, samples: int, mean_ping_var: float, ref: TimingRef
                ) -> StrongTiming:
    """The strong timing test from the differences T^p - T^a (all of them, or a uniform sample of
    `samples` for a report that streams), the mean ping variance and the reference."""
    margin = statistics.median(diffs)
    spread = _MAD_TO_SD * statistics.median(abs(d - margin) for d in diffs)
    noise = math.sqrt((spread * spread + 2 * mean_ping_var) / samples)
    threshold = max(TIMING_FLOOR_US, TIMING_K * noise)
    return StrongTiming(
        holds=margin > threshold, ref=ref, samples=samples,
        margin_us=margin, noise_us=noise, threshold_us=threshold,
    )


def judge_all(
    records: Iterable[Record],
    *,
    window: float = DEFAULT_WINDOW,
    os_level: OsLevel = "name",
    now: float | None = None,
    hops_offset: float = 0.0,
    app_allowance_us: float = APP_ALLOWANCE_US,
) -> list[Verdict]:
    """One verdict per source address, sorted by address (IPv4 before IPv6, numerically)."""
    by_src: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_src[r.src].append(r)
    return [
        judge(by_src[src], window=window, os_level=os_level, now=now, hops_offset=hops_offset,
              app_allowance_us=app_allowance_us)
        for src in sorted(by_src, key=address_order)
    ]


def address_order(src: str) -> tuple[int, int]:
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


def kind_counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Beyond Table 3: how many verdicts of each kind (module docstring)."""
    return {k: sum(v.kind == k for v in verdicts) for k in KINDS}
