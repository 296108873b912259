"""cond_app (analyzer/rules.py): the application-layer RTT test for terminating proxies, at its
edges, and the record/verdict fields that carry it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from analyzer.handshake import Handshake
from analyzer.measurement import passive_record
from analyzer.record import Record, RecordError
from analyzer.rules import (
    APP_ALLOWANCE_US,
    APP_MIN_SAMPLES,
    TIMING_FLOOR_US,
    TIMING_K,
    Verdict,
    judge,
)
from analyzer.verdicts import entry_fields, from_entry

PING = 40_000  # the probe's max ping RTT to the address, µs
LINUX = "unix:Linux:3.11 and newer"
WINDOWS = "win:Windows:7 or 8"


def rec(tapp: int | None, *, i: int = 0, tp: int = PING, ping: int | None = PING, var: float = 0.0,
        syn: int | None = None, fp: str | None = None, fa: str | None = None, syn_dist: int | None = None,
        fa_dist: int | None = None) -> Record:
    has = ping is not None
    return Record(t=1000.0 + i, src="192.0.2.7", dst="198.18.0.22", tp_us=tp,
                  ping_min_us=ping, ping_avg_us=ping, ping_max_us=ping, ping_var_us2=var if has else None,
                  syn_rtt_us=syn, fp=fp, fa=fa, syn_dist=syn_dist, fa_dist=fa_dist, tapp_us=tapp)


def answers(*extra_us: float, var: float = 0.0, **kw: object) -> list[Record]:
    """One record per answer, T^app = PING + extra."""
    return [rec(round(PING + e), i=i, var=var, **kw) for i, e in enumerate(extra_us)]  # type: ignore[arg-type]


def test_verdict_and_record_fields_are_at_the_end() -> None:
    names = [f.name for f in dataclasses.fields(Verdict)]
    assert names[-3:] == ["cond_app", "app_margin", "app_samples"]
    assert [f.name for f in dataclasses.fields(Record)][-1] == "tapp_us"
    assert [f.name for f in dataclasses.fields(Handshake)][-2:] == ["tapp_us", "app_data"]
    assert list(judge(answers(0, 0, 0)).to_dict())[-3:] == ["cond_app", "app_margin", "app_samples"]


@pytest.mark.parametrize(("over", "expected"), [(0, False), (1, True)])
def test_exactly_at_the_threshold_does_not_hold(over: int, expected: bool) -> None:
    """Noise 0 (identical answers, no ping spread): the threshold is allowance + floor, strictly."""
    edge = APP_ALLOWANCE_US + TIMING_FLOOR_US
    v = judge(answers(*[edge + over] * APP_MIN_SAMPLES))
    assert v.app_margin == edge + over and v.app_samples == APP_MIN_SAMPLES
    assert v.cond_app is expected
    assert v.kind == ("terminating" if expected else "none") and v.relay_confident is expected


def test_one_sample_is_never_enough() -> None:
    v = judge(answers(200_000))  # a 100 ms onward leg, but one answer
    assert v.app_samples == 1 and v.app_margin == 200_000 and not v.cond_app and v.kind == "none"


def test_below_the_minimum_samples_then_at_it() -> None:
    big = 60_000
    assert not judge(answers(*[big] * (APP_MIN_SAMPLES - 1))).cond_app
    assert judge(answers(*[big] * APP_MIN_SAMPLES)).cond_app


def test_a_missing_banner_reply_is_no_sample() -> None:
    """tapp None (silent, closed, spoke first, or not a banner port) does not count either way."""
    records = [*answers(60_000, 60_000), *(rec(None, i=10 + k) for k in range(5))]
    v = judge(records)
    assert v.app_samples == 2 and not v.cond_app and v.kind == "none"
    silent = judge([rec(None, i=k) for k in range(5)])
    assert (silent.app_samples, silent.app_margin, silent.cond_app) == (0, None, False)
    assert all(e.test != "app" for e in silent.evidence)


def test_no_reference_no_sample() -> None:
    """Neither ping nor a SYN RTT: T^app has nothing to be compared with."""
    v = judge([rec(200_000, i=k, ping=None) for k in range(5)])
    assert v.app_samples == 0 and not v.cond_app


def test_the_syn_rtt_stands_in_for_ping() -> None:
    v = judge([rec(PING + 50_000, i=k, ping=None, syn=PING) for k in range(4)])
    assert v.app_samples == 4 and v.cond_app and v.kind == "terminating"


def test_a_slow_direct_client_within_the_allowance_is_not_flagged() -> None:
    """A direct client that takes 2..9 ms to answer, on a path with 1 ms ping spread."""
    slow = [2_000, 9_000, 6_000, 8_500, 4_000]
    v = judge(answers(*slow, var=1e6))
    assert v.app_margin == 6_000 and not v.cond_app and v.kind == "none" and not v.relay_confident


def test_a_proxy_with_a_20ms_onward_leg_is_terminating() -> None:
    """The banner crosses the proxy's +20 ms leg twice; the client answers within 1 ms. The
    proxy's own handshake and ping agree (T^p = T^a), so nothing else sees it."""
    proxy = [40_300, 40_900, 41_200, 40_100, 40_600]
    v = judge(answers(*proxy, var=0.5e6))
    assert v.cond_app and v.kind == "terminating" and v.relay_confident
    assert not v.cond_timing_strong and not v.cond_hops and not v.cond_os
    assert not v.relay  # the paper's rule keeps its own meaning: it cannot see a proxy
    (app,) = [e for e in v.evidence if e.test == "app"]
    assert app.margin == 40_600 and app.samples == 5 and app.unit == "us"
    assert APP_ALLOWANCE_US + TIMING_FLOOR_US <= app.threshold < app.margin
    assert app.brief() == "app=+40.6ms/5"


def test_a_jittery_path_needs_k_standard_errors_too() -> None:
    """The strong timing test's noise model: 3 answers 40 ms late on a path whose pings spread by
    20 ms is not enough; the threshold follows TIMING_K standard errors."""
    var = (20_000.0) ** 2
    v = judge(answers(40_000, 40_000, 40_000, var=var))
    noise = math.sqrt(2 * var / 3)
    assert v.app_margin == 40_000 and not v.cond_app
    assert judge(answers(*[APP_ALLOWANCE_US + TIMING_K * noise + 1_000] * 3, var=var)).cond_app


def test_forwarding_evidence_wins_over_app() -> None:
    """A NAT relay shows its attacker leg in T^app too: with the strong timing test (T^p late) or
    the hops of one client behind, the kind stays forwarding; the app evidence is listed after."""
    late = [rec(PING + 40_000, i=k, tp=PING + 40_000) for k in range(4)]
    v = judge(late)
    assert v.cond_timing_strong and v.cond_app and v.kind == "forwarding"
    assert [e.test for e in v.evidence] == ["timing", "app"]
    hops = [rec(PING + 40_000, i=k, fp=LINUX, syn_dist=3, fa_dist=2) for k in range(4)]
    h = judge(hops)
    assert h.cond_hops and h.cond_app and h.kind == "forwarding"
    assert [e.test for e in h.evidence] == ["hops", "app"]


def test_app_over_an_os_mismatch_is_terminating_not_shared() -> None:
    """An OS mismatch alone would be `shared`; with the answer late by an onward leg, the timing
    evidence decides (as it does for forwarding): terminating, with the mismatch listed after."""
    v = judge([rec(PING + 40_000, i=k, fp=WINDOWS, fa=LINUX) for k in range(4)])
    assert v.cond_os and v.cond_app and v.kind == "terminating"
    assert [e.test for e in v.evidence] == ["app", "os"]


def test_the_allowance_is_a_parameter() -> None:
    slow = answers(*[150_000] * 5)  # a client that waits 150 ms on purpose: a 75 ms leg's worth
    assert judge(slow).kind == "terminating"
    assert judge(slow, app_allowance_us=200_000).kind == "none"


def test_records_outside_the_window_do_not_count() -> None:
    old = [dataclasses.replace(r, t=r.t - 100_000) for r in answers(60_000, 60_000)]
    v = judge([*old, *answers(60_000)], window=3600)
    assert v.app_samples == 1 and not v.cond_app


def test_the_verdict_crosses_the_verdicts_stream() -> None:
    records = answers(*[41_000] * 4)
    v = judge(records)
    _hid, verdict, record = from_entry(entry_fields("1-0", v.to_dict(), records[-1].to_dict()))
    assert verdict["cond_app"] is True and verdict["app_margin"] == 41_000 and verdict["app_samples"] == 4
    assert record["tapp_us"] == PING + 41_000
    assert json.loads(json.dumps(v.to_dict()))["kind"] == "terminating"


def test_record_tapp_round_trips_and_old_records_read_null() -> None:
    r = answers(41_000)[0]
    assert Record.from_json(json.loads(json.dumps(r.to_dict()))) == r
    old = {k: v for k, v in r.to_dict().items() if k != "tapp_us"}
    assert Record.from_json(old).tapp_us is None


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "5", True, 10**400, 3_600_000_001])
def test_record_tapp_hostile_values(value: object) -> None:
    with pytest.raises(RecordError, match="tapp_us"):
        Record.from_json({**answers(0)[0].to_dict(), "tapp_us": value})


def test_passive_record_carries_tapp() -> None:
    h = Handshake(t=1000.0, src="192.0.2.7", sport=40000, dst="198.18.0.22", dport=22, syn=None,
                  synack_times=(1000.0,), reply="ack", reply_time=1000.04, tp_us=40_000, feed="responder",
                  tapp_us=81_000, app_data=b"SSH-2.0-x\r\n")
    assert passive_record(h, None).tapp_us == 81_000


def test_the_zeek_reasons_say_what_found_a_proxy() -> None:
    from analyzer.zeek import verdict_reasons

    text = verdict_reasons(judge(answers(*[40_300] * 3)).to_dict())
    assert "confident: relay (application RTT margin 40.300 ms over 3 answers;" in text


def test_the_zeek_verdict_ends_with_the_app_fields() -> None:
    from analyzer.broker import Count
    from analyzer.zeek import verdict_event

    records = answers(*[40_300] * 3)
    (v,) = verdict_event(judge(records).to_dict(), records[-1].to_dict()).args
    assert v[-3:] == (True, 40_300.0, Count(3))
    assert v[-8] == "terminating" and v[-7] == ("app=+40.3ms/3",)  # kind, evidence
    new = ("cond_app", "app_margin", "app_samples")
    old = {k: x for k, x in judge(records).to_dict().items() if k not in new}
    (v,) = verdict_event(old, records[-1].to_dict()).args  # an analyzer from before: unset
    assert v[-3:] == (None, None, None)
    with pytest.raises(ValueError, match="app_margin"):
        verdict_event({**judge(records).to_dict(), "app_margin": math.inf}, records[-1].to_dict())
