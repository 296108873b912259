"""The hop-distance fields of the measurement record and the probe result (added at the end):
bounded whole numbers 0..255 or null, checked at the boundary; and which SYNs get one
(analyzer/hops.py: a crafted SYN's TTL is a tool's, so its distance is recorded null)."""

from __future__ import annotations

import pytest

from analyzer.hops import crafted, syn_distance
from analyzer.record import Record, RecordError
from osfp.result import Fingerprint
from prober.job import JobError, Result

BASE = {"t": 1.0, "src": "192.0.2.1", "dst": "198.18.0.1", "tp_us": 1000}


def test_record_fields_are_at_the_end() -> None:
    assert list(Record.__dataclass_fields__)[-3:] == ["syn_dist", "fa_dist", "tapp_us"]  # tapp_us: issue 10
    assert list(Result.__dataclass_fields__)[-1] == "fa_dist"


@pytest.mark.parametrize("value", [0, 1, 255, 3.0])
def test_record_hops_accepted(value: float) -> None:
    r = Record.from_json({**BASE, "syn_dist": value, "fa_dist": value})
    assert r.syn_dist == r.fa_dist == int(value) and isinstance(r.syn_dist, int)


def test_record_without_hops_reads_back_null() -> None:
    r = Record.from_json(BASE)  # a record written before the fields existed
    assert r.syn_dist is None and r.fa_dist is None
    assert Record.from_json(r.to_dict()) == r


@pytest.mark.parametrize("value", [-1, 256, 2**70, 3.5, float("nan"), True, "3", [1]])
def test_record_hops_refused(value: object) -> None:
    for name in ("syn_dist", "fa_dist"):
        with pytest.raises(RecordError, match=name):
            Record.from_json({**BASE, name: value})


def _result_fields(**extra: str) -> dict[str, str]:
    r = Result(job="1-0", src="192.0.2.1", t=1.0, ping_min_us=1, ping_avg_us=2, ping_max_us=3,
               ping_var_us2=1.0, ping_loss=0.0, syn_rtt_us=4, fa=None, fa_port=22, probed_at=2.0)
    return {**r.fields(), **extra}


def test_result_fa_dist_round_trip() -> None:
    assert Result.from_fields(_result_fields()).fa_dist is None
    fields = _result_fields(fa_dist="7")
    assert Result.from_fields(fields).fa_dist == 7
    assert Result.from_fields(Result.from_fields(fields).fields()).fa_dist == 7
    assert Result.from_fields(_result_fields(fa_dist="")).fa_dist is None


@pytest.mark.parametrize("text", ["-1", "256", "2.5", "nan", "x", "1e400"])
def test_result_fa_dist_refused(text: str) -> None:
    with pytest.raises(JobError, match="fa_dist"):
        Result.from_fields(_result_fields(fa_dist=text))


def _fp(label: str | None, sig: str, distance: int | None = 3) -> Fingerprint:
    return Fingerprint(label=label, generic=False, match="exact" if label else None, distance=distance,
                       sig=sig)


STACK_SIG = "4:61+3:0:1460:mss*20,7:mss,sok,ts,nop,ws:df,id+:0"


def test_a_stack_syn_keeps_its_distance() -> None:
    assert syn_distance(_fp("unix:Linux:3.11 and newer", STACK_SIG), "ack") == 3
    # Unlabelled: p0f's own guess from the observed TTL (the raw signature's "+3").
    assert syn_distance(_fp(None, STACK_SIG, distance=0), "ack") == 3


def test_crafted_syns_get_no_distance() -> None:
    no_options = "4:250+5:0:0:1024,0:::0"  # masscan-like: TTL of its own, no options, fixed window
    assert crafted(_fp(None, no_options), "ack")
    assert syn_distance(_fp(None, no_options), "ack") is None
    assert syn_distance(_fp("!:NMap:SYN scan", STACK_SIG), "ack") is None  # a tool's label
    assert syn_distance(_fp("unix:Linux:3.11 and newer", STACK_SIG), "rst") is None  # no socket sent it
    assert syn_distance(None, "ack") is None


def test_distance_p0f_does_not_trust_is_unknown() -> None:
    # p0f prints "+?" beyond 35 hops (e.g. TTL 70 read as 128 - 58): no guess.
    assert syn_distance(_fp(None, "4:70+?:0:1460:mss*20,7:mss,sok,ts,nop,ws:df,id+:0", distance=58),
                        "ack") is None
