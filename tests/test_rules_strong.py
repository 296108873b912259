"""The analyzer's own stronger evidence (noise-aware timing, SYN-RTT fallback, relay_confident),
and that the paper's fields do not move because of it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analyzer.record import Record
from analyzer.rules import TIMING_FLOOR_US, TIMING_K, Verdict, judge

LINUX = "unix:Linux:3.11 and newer"
WINDOWS = "win:Windows:7 or 8"
PAPER_FIELDS = ("src", "cond_os", "cond_timing", "relay", "tp_mean_us", "ta_max_mean_us", "samples",
                "records", "with_ping", "tp_exceeds_ta_max", "os_pair", "window_start", "window_end")


def rec(*, tp: int | None, ping_max: int | None = None, var: float | None = 0.0, syn: int | None = None,
        t: float = 1000.0, fp: str | None = None, fa: str | None = None) -> Record:
    ping = ping_max is not None
    return Record(t=t, src="192.0.2.7", dst="198.18.0.1", tp_us=tp,
                  ping_min_us=ping_max if ping else None, ping_avg_us=ping_max if ping else None,
                  ping_max_us=ping_max, ping_var_us2=var if ping else None, syn_rtt_us=syn, fp=fp, fa=fa)


def series(tps: list[int], ping_max: int, var: float = 0.0) -> list[Record]:
    return [rec(tp=tp, ping_max=ping_max, var=var, t=1000.0 + i) for i, tp in enumerate(tps)]


def test_the_paper_fields_come_first_and_keep_their_names() -> None:
    names = [f.name for f in dataclasses.fields(Verdict)]
    assert tuple(names[:len(PAPER_FIELDS)]) == PAPER_FIELDS


@pytest.mark.parametrize(("margin", "expected"),
                         [(int(TIMING_FLOOR_US), False), (int(TIMING_FLOOR_US) + 1, True)])
def test_margin_must_exceed_the_floor_strictly(margin: int, expected: bool) -> None:
    v = judge([rec(tp=40_000 + margin, ping_max=40_000)])
    assert v.timing_margin_us == margin and v.timing_noise_us == 0.0
    assert v.timing_threshold_us == TIMING_FLOOR_US
    assert v.cond_timing_strong is expected and v.relay_confident is expected
    assert v.cond_timing and v.relay  # the paper says relay at any positive margin


def test_a_jittery_path_needs_k_standard_errors() -> None:
    var = 4e6  # pings of the probe spread by 2 ms: the path's jitter
    noise = math.sqrt(2 * var)  # one sample: T^p and T^a both carry it
    threshold = TIMING_K * noise
    assert threshold > TIMING_FLOOR_US
    below = judge([rec(tp=40_000 + int(threshold) - 1, ping_max=40_000, var=var)])
    above = judge([rec(tp=40_000 + int(threshold) + 1, ping_max=40_000, var=var)])
    assert below.timing_threshold_us == pytest.approx(threshold)
    assert not below.cond_timing_strong and above.cond_timing_strong
    # More samples shrink the standard error: the same margin then suffices.
    four = judge(series([40_000 + int(threshold) - 1] * 4, 40_000, var=var))
    assert four.timing_noise_us == pytest.approx(noise / 2) and four.cond_timing_strong


def test_spread_of_the_differences_counts_as_noise() -> None:
    # Margins 6, 6, 14, 14 ms: median 10 ms, MAD 4 ms -> s ~ 5.9 ms, se ~ 3 ms, threshold ~ 8.9 ms.
    v = judge(series([46_000, 46_000, 54_000, 54_000], 40_000))
    assert v.timing_margin_us == 10_000
    assert v.timing_noise_us == pytest.approx(1.4826 * 4000 / 2)
    assert v.cond_timing_strong
    wide = judge(series([41_000, 41_000, 59_000, 59_000], 40_000))  # same median, MAD 9 ms
    assert wide.timing_margin_us == 10_000 and not wide.cond_timing_strong


@pytest.mark.parametrize(
    "tps",
    [
        [39_900, 39_900, 39_900, 39_900, 42_000],  # one T^p delayed 2 ms by load (the lab's false positive)
        [39_900, 39_900, 39_900, 39_900, 70_000],  # one delayed 30 ms: moves the mean, not the median
        [40_300],  # a single sample a few hundred µs late
        [40_100, 40_400, 39_950],  # a fixed path: T^p and max ping within a few hundred µs
    ],
)
def test_direct_noise_the_paper_flags_is_not_confident(tps: list[int]) -> None:
    v = judge(series(tps, 40_000, var=10_000.0))
    assert v.cond_timing and v.relay  # the paper's rule, unchanged
    assert not v.cond_timing_strong and not v.relay_confident
    assert v.timing_ref == "ping" and v.timing_samples == len(tps)


def test_a_relay_with_one_load_spike_stays_confident() -> None:
    v = judge(series([50_000, 50_000, 50_000, 80_000, 50_000], 40_000, var=10_000.0))
    assert v.timing_margin_us == 10_000 and v.cond_timing_strong and v.relay_confident


def test_syn_rtt_is_the_reference_when_icmp_is_dropped() -> None:
    relay = [rec(tp=130_000 + i, syn=30_000, t=1000.0 + i) for i in range(3)]  # +50 ms one way
    v = judge(relay)
    assert v.samples == 0 and v.with_ping == 0 and not v.cond_timing and not v.relay  # paper: nothing
    assert v.timing_ref == "syn" and v.timing_samples == 3
    assert v.timing_margin_us == 100_001 and v.cond_timing_strong and v.relay_confident
    direct = judge([rec(tp=30_200 + i, syn=30_000, t=1000.0 + i) for i in range(3)])
    assert direct.timing_ref == "syn" and not direct.cond_timing_strong


def test_ping_wins_where_both_exist_and_the_mix_is_named() -> None:
    both = judge([rec(tp=50_000, ping_max=49_000, syn=10_000)])  # ping data present: SYN RTT unused
    assert both.timing_ref == "ping" and both.timing_margin_us == 1000 and not both.cond_timing_strong
    mixed = judge([rec(tp=50_000, ping_max=38_000, t=1.0), rec(tp=50_000, syn=38_000, t=2.0),
                   rec(tp=50_000, syn=38_000, t=3.0)])
    assert mixed.timing_ref == "ping+syn" and mixed.timing_samples == 3 and mixed.cond_timing_strong


def test_no_reference_or_no_tp_gives_no_strong_timing() -> None:
    for records in ([rec(tp=90_000)], [rec(tp=None, ping_max=1000, syn=1000)]):
        v = judge(records)
        assert v.timing_ref is None and v.timing_samples == 0 and v.timing_margin_us is None
        assert v.timing_noise_us is None and v.timing_threshold_us is None and not v.cond_timing_strong


def test_os_mismatch_alone_is_shared_not_confident_and_counted() -> None:
    # Issue 10: an OS mismatch with no timing or hop evidence is `shared` (a home NAT or CGN looks
    # the same), reported but not a confident relay; the paper's rule still calls it a relay.
    records = [rec(tp=None, fp=LINUX, fa=WINDOWS, t=1.0), rec(tp=None, fp=LINUX, fa=LINUX, t=2.0),
               rec(tp=None, fp=LINUX, fa=WINDOWS, t=3.0)]
    v = judge(records)
    assert v.cond_os and v.relay and not v.relay_confident and not v.cond_timing_strong
    assert v.kind == "shared" and [e.test for e in v.evidence] == ["os"]
    assert v.os_mismatches == 2 and v.os_pair == (LINUX, WINDOWS)


def test_outside_the_window_does_not_count() -> None:
    v = judge([rec(tp=90_000, ping_max=40_000, t=0.0), rec(tp=40_000, ping_max=40_000, t=100.0)], window=10)
    assert v.timing_samples == 1 and v.timing_margin_us == 0 and not v.cond_timing_strong


def test_to_dict_is_strict_json() -> None:
    v = judge([rec(tp=90_000, syn=40_000)])
    d = v.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["timing_ref"] == "syn" and d["relay_confident"] is True


_micros = st.none() | st.integers(min_value=0, max_value=300_000)


@given(st.lists(st.tuples(_micros, _micros, st.none() | st.floats(0, 1e8), _micros,
                          st.sampled_from([None, LINUX, WINDOWS]), st.sampled_from([None, LINUX, WINDOWS])),
                min_size=1, max_size=8),
       st.integers(0, 300_000), st.floats(0, 1e8))
def test_the_extra_measurements_never_move_the_paper_fields(
    rows: list[tuple[int | None, int | None, float | None, int | None, str | None, str | None]],
    other_syn: int, other_var: float,
) -> None:
    """syn_rtt_us and ping_var_us2 feed only the extra evidence; the paper's fields ignore them."""
    records = [rec(tp=tp, ping_max=pm, var=var, syn=syn, fp=fp, fa=fa, t=float(i))
               for i, (tp, pm, var, syn, fp, fa) in enumerate(rows)]
    changed = [dataclasses.replace(r, syn_rtt_us=other_syn,
                                   ping_var_us2=None if r.ping_var_us2 is None else other_var)
               for r in records]
    a, b = judge(records).to_dict(), judge(changed).to_dict()
    assert {k: a[k] for k in PAPER_FIELDS} == {k: b[k] for k in PAPER_FIELDS}
    v = judge(records)
    # No hop distances here: the confident rule is the strong timing test alone (rules.py docstring).
    assert v.relay_confident == v.cond_timing_strong
    assert v.kind == ("forwarding" if v.cond_timing_strong else "shared" if v.cond_os else "none")
    assert v.relay == (v.cond_os or v.cond_timing)


def test_zeek_gets_the_confident_result_in_the_reasons_and_in_fields_at_the_end() -> None:
    from analyzer.broker import Count, Timespan
    from analyzer.zeek import verdict_event

    records = [rec(tp=130_000, syn=30_000)]  # drops ICMP: the paper sees nothing
    (v,) = verdict_event(judge(records).to_dict(), records[0].to_dict()).args
    assert len(v) == 32 and v[1:4] == (False, False, False)  # cond_os, cond_timing, relay: the paper's
    # relay_confident, cond_timing_strong, timing_margin, timing_threshold, timing_ref, samples, os
    assert v[16:23] == (True, True, Timespan(100_000_000), Timespan(5_000_000), "syn", Count(1), Count(0))
    assert "no condition holds" in v[15]
    confident = "confident: relay (timing margin 100.000 ms > threshold 5.000 ms, syn reference, 1 samples)"
    assert confident in v[15]
    direct = series([39_900, 39_900, 42_000], 40_000)
    (v,) = verdict_event(judge(direct).to_dict(), direct[-1].to_dict()).args
    assert v[3] is True and "confident: not a relay (timing margin -0.100 ms <= threshold" in v[15]
