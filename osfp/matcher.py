"""p0f 3.09b's TCP signature matching (`tcp_find_match`, `detect_win_multi`, `guess_dist`,
`dump_sig` in fp_tcp.c), reimplemented over pyp0f's parsed database.

Where pyp0f 0.3.0 decides differently, this follows p0f:
- the SYN+ACK window multiplier also tries the MSS of the flow's SYN (pyp0f: only if told);
- `mss-12` is tried only when the timestamp value is non-zero, not whenever the option is there;
- a wildcard-version signature drops only `df,id+,id-` for IPv6 packets (pyp0f also drops `0+`);
- a fuzzy match keeps p0f's distance rule (guess from the TTL only when the signature's TTL is
  out of range), and a fuzzy match on a userland tool ("!" class) yields no label and distance 0,
  which is what p0f prints.
"""

from __future__ import annotations

from typing import NamedTuple

from pyp0f.net.quirks import QUIRK_STRINGS

from osfp.database import ANY, WIN_ANY, WIN_MOD, WIN_MSS, WIN_MTU, WIN_NORMAL, TcpSig
from osfp.packet import (
    MIN_TCP4,
    MIN_TCP6,
    Q_DF,
    Q_ECN,
    Q_FLOW,
    Q_NZ_ID,
    Q_ZERO_ID,
    TcpFeatures,
)
from osfp.result import MatchType

MAX_DIST = 35  # p0f config.h: TTL distance still counted as an exact match
SPECIAL_MSS = 1331  # p0f-sendsyn's MSS: echoed back, so p0f prints "*" for it on SYN+ACKs

_FUZZY_DELETABLE = Q_DF | Q_NZ_ID  # quirks that may vanish (stripped by middleboxes)
_FUZZY_ADDABLE = Q_ZERO_ID | Q_ECN  # quirks that may appear
_NOT_FOR_IPV4 = ~Q_FLOW
_NOT_FOR_IPV6 = ~(Q_DF | Q_NZ_ID | Q_ZERO_ID)

# p0f's dump order for quirks (pyp0f's QUIRK_STRINGS has the same names in another order).
_QUIRK_BITS = {name: quirk.value for quirk, name in QUIRK_STRINGS.items()}
_QUIRK_NAMES: tuple[tuple[int, str], ...] = tuple(
    (_QUIRK_BITS[name], name)
    for name in (
        *("df", "id+", "id-", "ecn", "0+", "flow", "seq-", "ack+", "ack-"),
        *("uptr+", "urgf+", "pushf+", "ts1-", "ts2+", "opt+", "exws", "bad"),
    )
)
_OPTION_NAMES = {1: "nop", 2: "mss", 3: "ws", 4: "sok", 5: "sack", 8: "ts"}


class Match(NamedTuple):
    sig: TcpSig | None
    match: MatchType | None
    distance: int


def guess_dist(ttl: int) -> int:
    if ttl <= 32:
        return 32 - ttl
    if ttl <= 64:
        return 64 - ttl
    if ttl <= 128:
        return 128 - ttl
    return 255 - ttl


def win_multiplier(f: TcpFeatures, syn_mss: int) -> tuple[int, bool]:
    """(multiplier, counts MTU rather than MSS); multiplier -1 when the window is no such multiple."""
    win, mss = f.win, f.mss
    if not win or mss < 100:
        return -1, False
    divisors: list[tuple[int, bool]] = [(mss, False)]
    if f.ts1_set:
        divisors.append((mss - 12, False))  # some stacks subtract the timestamp option
    divisors += [(1500 - MIN_TCP4, False), (1500 - MIN_TCP4 - 12, False)]
    if f.ip_ver == 6:
        divisors += [(1500 - MIN_TCP6, False), (1500 - MIN_TCP6 - 12, False)]
    divisors += [(mss + MIN_TCP4, True), (mss + f.tot_hdr, True)]
    if f.ip_ver == 6:
        divisors.append((mss + MIN_TCP6, True))
    divisors.append((1500, True))
    if syn_mss:
        divisors += [(syn_mss, False), (syn_mss - 12, False)]  # the peer's MSS, on SYN+ACKs
    for div, use_mtu in divisors:
        if div and win % abs(div) == 0:
            # C: `win / div` stored in an s16 (negative for a negative divisor or a huge quotient).
            multi = win // abs(div) * (1 if div > 0 else -1)
            if multi > 32767:
                multi -= 65536
            return multi, use_mtu
    return -1, False


def find_match(f: TcpFeatures, sigs: tuple[TcpSig, ...], syn_mss: int) -> Match:
    """p0f's tcp_find_match: the first exact specific signature in file order; else the first exact
    generic one; else the first fuzzy one (TTL out of range, or quirks differing only by df/id+ gone
    or id-/ecn added)."""
    win_multi, use_mtu = win_multiplier(f, syn_mss)
    generic: TcpSig | None = None
    fuzzy: TcpSig | None = None
    fuzzy_kind: MatchType | None = None
    ttl = f.ttl
    for ref in sigs:
        if ref.layout != f.layout:
            continue
        ref_quirks = ref.quirks
        if ref.ip_ver == ANY:
            ref_quirks &= _NOT_FOR_IPV4 if f.ip_ver == 4 else _NOT_FOR_IPV6
        quirks_differ = ref_quirks != f.quirks
        if quirks_differ:
            if fuzzy is not None:
                continue
            deleted = (ref_quirks ^ f.quirks) & ref_quirks
            added = (ref_quirks ^ f.quirks) & f.quirks
            if deleted & ~_FUZZY_DELETABLE or added & ~_FUZZY_ADDABLE:
                continue
        if ref.eol_pad != f.eol_pad or ref.ip_opt_len != f.ip_opt_len:
            continue
        ttl_out = False
        if ref.bad_ttl:
            if ref.ttl < ttl:
                continue
        elif ref.ttl < ttl or ref.ttl - ttl > MAX_DIST:
            ttl_out = True
        if ref.mss not in (ANY, f.mss):
            continue
        if ref.wscale not in (ANY, f.wscale):
            continue
        if ref.pay_class not in (ANY, f.has_payload):
            continue
        win_type = ref.win_type
        if win_type == WIN_NORMAL:
            if ref.win != f.win:
                continue
        elif win_type == WIN_MOD:
            if f.win % ref.win:
                continue
        elif win_type == WIN_MSS:
            if use_mtu or ref.win != win_multi:
                continue
        elif win_type == WIN_MTU:
            if not use_mtu or ref.win != win_multi:
                continue
        else:
            assert win_type == WIN_ANY
        if not quirks_differ and not ttl_out:
            if not ref.generic:
                return Match(ref, "exact", ref.ttl - ttl)
            if generic is None:
                generic = ref
        elif fuzzy is None:
            fuzzy = ref
            fuzzy_kind = "fuzzy_ttl" if ttl_out else "fuzzy_quirks"
    if generic is not None:
        return Match(generic, "exact", generic.ttl - ttl)
    if fuzzy is not None and fuzzy.user_app:
        return Match(None, None, 0)  # p0f returns before computing a distance
    if fuzzy is None or fuzzy.ttl < ttl or (not fuzzy.bad_ttl and fuzzy.ttl - ttl > MAX_DIST):
        return Match(fuzzy, fuzzy_kind, guess_dist(ttl))
    return Match(fuzzy, fuzzy_kind, fuzzy.ttl - ttl)


def raw_signature(f: TcpFeatures, syn_mss: int) -> str:
    """The packet's signature exactly as p0f prints `raw_sig`."""
    dist = guess_dist(f.ttl)
    ttl = f"{f.ttl}+?" if dist > MAX_DIST else f"{f.ttl}+{dist}"
    mss = "*" if f.synack and f.mss == SPECIAL_MSS else str(f.mss)
    multi, use_mtu = win_multiplier(f, syn_mss)
    win = f"{'mtu' if use_mtu else 'mss'}*{multi}" if multi > 0 else str(f.win)
    options = ",".join(
        f"eol+{f.eol_pad}" if kind == 0 else _OPTION_NAMES.get(kind, f"?{kind}") for kind in f.layout
    )
    quirks = ",".join(name for bit, name in _QUIRK_NAMES if f.quirks & bit)
    payload = "+" if f.has_payload else "0"
    return f"{f.ip_ver}:{ttl}:{f.ip_opt_len}:{mss}:{win},{f.wscale}:{options}:{quirks}:{payload}"
