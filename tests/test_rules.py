"""The paper's conditions (1) and (2), every rule at its edge."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analyzer.handshake import Handshake
from analyzer.measurement import passive_record, with_probe
from analyzer.record import Record
from analyzer.rules import Verdict, judge, judge_all, os_part, summary
from prober.job import Result

LINUX = "unix:Linux:3.11 and newer"
LINUX_OLD = "unix:Linux:2.2.x-3.x"
FREEBSD = "unix:FreeBSD:9.x or newer"
WINDOWS = "win:Windows:7 or 8"


def rec(*, t: float = 1000.0, tp: int | None = 5000, ping_max: int | None = 4000, fp: str | None = None,
        fa: str | None = None, src: str = "192.0.2.1", ping_avg: int | None = -1) -> Record:
    if ping_avg == -1:
        ping_avg = None if ping_max is None else ping_max // 2
    return Record(t=t, src=src, dst="198.18.0.1", tp_us=tp, ping_min_us=ping_avg, ping_avg_us=ping_avg,
                  ping_max_us=ping_max, ping_var_us2=None if ping_max is None else 1.0, fp=fp, fa=fa)


# Condition (1)
@pytest.mark.parametrize(
    ("fp", "fa", "level", "expected"),
    [
        (LINUX, WINDOWS, "class", True),
        (LINUX, FREEBSD, "class", False),  # same class "unix"
        (LINUX, FREEBSD, "name", True),
        (LINUX, LINUX_OLD, "name", False),  # same class:name, flavours differ
        (LINUX, LINUX_OLD, "flavor", True),
        (LINUX, LINUX, "flavor", False),
        (None, WINDOWS, "name", False),  # unknown never mismatches
        (LINUX, None, "flavor", False),
        (None, None, "class", False),
    ],
)
def test_condition_1_levels_and_unknown_labels(
    fp: str | None, fa: str | None, level: str, expected: bool
) -> None:
    v = judge([rec(fp=fp, fa=fa, tp=None, ping_max=None)], os_level=level)  # type: ignore[arg-type]
    assert v.cond_os is expected and v.relay is expected
    assert v.os_pair == ((fp, fa) if expected else None)


def test_os_part() -> None:
    assert os_part(LINUX, "class") == "unix"
    assert os_part(LINUX, "name") == "unix:Linux"
    assert os_part(LINUX, "flavor") == LINUX
    assert os_part("unix:Linux:odd:flavour", "name") == "unix:Linux"


def test_condition_1_needs_one_record_with_both_labels() -> None:
    # fp from one record, fa from another: no single measurement saw two OSes.
    records = [rec(t=1, fp=LINUX, fa=None), rec(t=2, fp=None, fa=WINDOWS)]
    assert not judge(records).cond_os
    assert judge([*records, rec(t=3, fp=LINUX, fa=WINDOWS)]).cond_os


# Condition (2)
def test_condition_2_strict_inequalities() -> None:
    # (i) tp > ping_max strictly: equal values are not enough.
    equal = judge([rec(tp=4000, ping_max=4000)])
    assert not equal.cond_timing and equal.tp_exceeds_ta_max == 0
    assert equal.tp_mean_us == 4000 and equal.ta_max_mean_us == 4000 and equal.samples == 1
    above = judge([rec(tp=4001, ping_max=4000)])
    assert above.cond_timing and above.relay and not above.cond_os


def test_condition_2_means_equal_is_not_a_relay() -> None:
    # (i) holds on the first record, but the means are equal: (iii) is strict.
    v = judge([rec(t=1, tp=6000, ping_max=4000), rec(t=2, tp=2000, ping_max=4000)])
    assert v.tp_exceeds_ta_max == 1 and v.tp_mean_us == v.ta_max_mean_us == 4000
    assert not v.cond_timing
    v = judge([rec(t=1, tp=6001, ping_max=4000), rec(t=2, tp=2000, ping_max=4000)])
    assert v.cond_timing


def test_condition_2_no_record_above_its_ping() -> None:
    # Over the same records, (iii) implies (i); with every T^p equal to its own ping maximum
    # neither holds, however different the records are.
    v = judge([rec(t=1, tp=5000, ping_max=5000), rec(t=2, tp=3000, ping_max=3000)])
    assert v.tp_exceeds_ta_max == 0 and not v.cond_timing


def test_records_without_ping_data_take_no_part_in_condition_2() -> None:
    no_ping = rec(t=1, tp=1_000_000, ping_max=None)
    half_ping = rec(t=2, tp=1_000_000, ping_max=100, ping_avg=None)  # has_ping needs avg and max
    v = judge([no_ping, half_ping])
    assert not v.cond_timing and v.samples == 0 and v.with_ping == 0 and v.tp_mean_us is None
    assert v.ta_max_mean_us is None and v.records == 2
    # A record with pings but no T^p (Karn) counts as "with ping" but not as a sample.
    v = judge([rec(t=1, tp=None, ping_max=100), rec(t=2, tp=300, ping_max=200)])
    assert v.with_ping == 2 and v.samples == 1 and v.tp_mean_us == 300 and v.ta_max_mean_us == 200
    assert v.cond_timing


# Window
def test_window_edges_are_inclusive() -> None:
    old = rec(t=1000.0, fp=LINUX, fa=WINDOWS)
    latest = rec(t=1000.0 + 86400.0, fp=LINUX, fa=LINUX)
    v = judge([old, latest])
    assert v.cond_os and v.records == 2  # exactly `window` seconds old: still inside
    assert (v.window_start, v.window_end) == (1000.0, 87400.0)
    v = judge([old, dataclasses.replace(latest, t=latest.t + 0.001)])
    assert not v.cond_os and v.records == 1  # a millisecond older than the window: out


def test_window_with_explicit_now() -> None:
    records = [rec(t=100, tp=9000, ping_max=10), rec(t=200, tp=10, ping_max=9000)]
    assert judge(records, window=50, now=120).cond_timing  # only t=100 in [70, 120]
    v = judge(records, window=50, now=199.999)
    assert v.records == 0 and not v.relay and v.samples == 0  # [149.999, 199.999] holds nothing
    v = judge(records, window=100, now=200)  # both: means 4505 vs 4505 -> not strict
    assert v.records == 2 and not v.cond_timing


def test_records_after_now_are_ignored() -> None:
    v = judge([rec(t=100, fp=None), rec(t=300, fp=LINUX, fa=WINDOWS)], now=200)
    assert not v.cond_os and v.records == 1


def test_judge_rejects_mixed_sources_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one source"):
        judge([rec(src="192.0.2.1"), rec(src="192.0.2.2")])
    with pytest.raises(ValueError):
        judge([])
    with pytest.raises(ValueError, match="os_level"):
        judge([rec()], os_level="kernel")  # type: ignore[arg-type]


def test_judge_all_one_verdict_per_source_sorted_and_summary() -> None:
    records = [
        rec(src="2001:db8::1", tp=10, ping_max=5),  # timing
        rec(src="10.0.0.2", fp=LINUX, fa=WINDOWS, tp=10, ping_max=5),  # both
        rec(src="9.0.0.1", fp=LINUX, fa=WINDOWS),  # os; tp 5000 > 4000 also timing
        rec(src="10.0.0.10", tp=1, ping_max=5),  # neither
    ]
    verdicts = judge_all(records)
    assert [v.src for v in verdicts] == ["9.0.0.1", "10.0.0.2", "10.0.0.10", "2001:db8::1"]
    assert [(v.cond_os, v.cond_timing) for v in verdicts] == [(True, True), (True, True), (False, False),
                                                              (False, True)]
    assert summary(verdicts) == {"sources": 4, "relays_by_os": 2, "relays_by_timing": 3, "relays": 3}


def test_verdict_to_dict_has_the_contract_fields() -> None:
    d = judge([rec(fp=LINUX, fa=WINDOWS)]).to_dict()
    for name in ("src", "cond_os", "cond_timing", "relay", "tp_mean_us", "ta_max_mean_us", "samples"):
        assert name in d
    assert d["os_pair"] == [LINUX, WINDOWS]
    assert set(d) == {f.name for f in dataclasses.fields(Verdict)}


@given(
    st.lists(
        st.tuples(st.integers(0, 10**7), st.one_of(st.none(), st.integers(0, 10**7))), min_size=1, max_size=20
    )
)
def test_condition_2_matches_its_definition(pairs: list[tuple[int, int | None]]) -> None:
    records = [rec(t=float(i), tp=tp, ping_max=pm) for i, (tp, pm) in enumerate(pairs)]
    timed = [(tp, pm) for tp, pm in pairs if pm is not None]
    expected = bool(timed) and any(tp > pm for tp, pm in timed) and (
        sum(tp for tp, _ in timed) / len(timed) > sum(pm for _, pm in timed) / len(timed)  # type: ignore[misc]
    )
    assert judge(records).cond_timing is expected


# Measurement records
def test_passive_record_then_probe() -> None:
    h = Handshake(t=12.5, src="192.0.2.9", sport=4, dst="198.18.0.3", dport=23, syn=b"x",
                  synack_times=(12.6,), reply="ack", reply_time=12.7, tp_us=100_000)
    r = passive_record(h, LINUX)
    assert (r.t, r.src, r.dst, r.tp_us, r.fp) == (12.5, "192.0.2.9", "198.18.0.3", 100_000, LINUX)
    assert r.fa is None and r.ping_max_us is None
    result = Result(job="1-0", src="192.0.2.9", t=12.5, ping_min_us=10, ping_avg_us=20, ping_max_us=30,
                    ping_var_us2=4.5, ping_loss=0.0, syn_rtt_us=25, fa=WINDOWS, fa_port=22, probed_at=13.0)
    full = with_probe(r, result)
    assert (full.ping_min_us, full.ping_avg_us, full.ping_max_us) == (10, 20, 30)
    assert (full.ping_var_us2, full.syn_rtt_us, full.fa) == (4.5, 25, WINDOWS)
    assert full.tp_us == 100_000 and full.fp == LINUX
    assert Record.from_json(full.to_dict()) == full
    with pytest.raises(ValueError, match="cannot complete"):
        with_probe(r, dataclasses.replace(result, src="192.0.2.10"))


@pytest.mark.parametrize("level", ["class", "name", "flavor"])
def test_a_userland_tool_label_is_not_an_os_and_never_mismatches(level: str) -> None:
    # p0f labels nmap -sS SYNs "!:NMap:SYN scan" (class "!": a tool running on @unix,@win); the
    # probe of the scanner's host then finds its real OS. Not two OSes behind one address.
    nmap = "!:NMap:SYN scan"
    v = judge([rec(fp=nmap, fa=LINUX, tp=None, ping_max=None)], os_level=level)  # type: ignore[arg-type]
    assert not v.cond_os and not v.relay and v.os_mismatches == 0 and v.os_pair is None
    v = judge([rec(fp=LINUX, fa=nmap, tp=None, ping_max=None)], os_level=level)  # type: ignore[arg-type]
    assert not v.cond_os
    # An OS label next to it still counts as before.
    v = judge([rec(t=1, fp=nmap, fa=LINUX), rec(t=2, fp=WINDOWS, fa=LINUX)], os_level=level)  # type: ignore[arg-type]
    assert v.cond_os and v.os_pair == (WINDOWS, LINUX) and v.os_mismatches == 1
