"""The `handshakes` stream entry (responder -> analyzer): every bad field is a HandshakeError, the
one error the service catches per entry; anything else would stop its loop."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from analyzer.handshake import MAX_APP_DATA, Handshake, HandshakeError
from prober.job import DURATION_MAX_US

GOOD = {"t": "1000.5", "src": "203.0.113.9", "sport": "40000", "dst": "198.18.0.1", "dport": "23",
        "syn": "", "synack_times": "1000.6", "reply": "ack", "reply_time": "1000.62", "tp_us": "20000",
        "feed": "responder"}


def test_good_entry_round_trips() -> None:
    h = Handshake.from_fields(GOOD)
    assert (h.sport, h.dport, h.tp_us, h.reply) == (40000, 23, 20000, "ack")
    assert Handshake.from_fields(h.to_fields()) == h


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("sport", "²"),  # str.isdigit() is true for it, int() refuses it: was a ValueError
        ("dport", "٣x"),
        ("sport", "65536"),
        ("sport", "-1"),
        ("tp_us", "²"),
        ("tp_us", "1.5"),
        ("t", "nan"),
        ("src", "not-an-address"),
        ("reply", "fin"),
        ("syn", "***"),
        ("synack_times", "1,x"),
        ("feed", "carrier-pigeon"),
    ],
)
def test_every_bad_field_is_a_handshake_error(field: str, text: str) -> None:
    with pytest.raises(HandshakeError):
        Handshake.from_fields({**GOOD, field: text})


def test_an_ipv6_address_with_a_zone_is_no_source_anywhere() -> None:
    """`fe80::1%eth0` parses as an address but names one machine's link: every contract refuses it
    (Zeek refused it in a verdict, and every verdict behind it waited)."""
    import pytest

    from analyzer.handshake import Handshake, HandshakeError
    from analyzer.record import Record, RecordError
    from prober.job import Job, JobError, Result, address

    with pytest.raises(ValueError, match="zone"):
        address("fe80::1%eth0")
    assert address("2001:DB8::1") == "2001:db8::1"
    with pytest.raises(HandshakeError):
        Handshake(t=1764212880.0, src="fe80::1%eth0", sport=1, dst="2001:db8::5", dport=2, syn=None,
                  synack_times=(1764212880.1,), reply=None, reply_time=None, tp_us=None).check()
    with pytest.raises(JobError):
        Job.from_fields("1-0", {"src": "fe80::1%eth0", "t": "1764212880.0", "deadline": "1764212890.0"})
    with pytest.raises(JobError):
        Result.from_fields({"job": "1-0", "src": "fe80::1%eth0", "t": "1764212880.0"})
    with pytest.raises(RecordError):
        Record.from_json({"t": 1764212880.0, "src": "fe80::1%eth0", "dst": "2001:db8::5"})


# --- application-layer timing (issue 10 item 2): tapp_us and app_data, at the end ---------------

APP = {**GOOD, "tapp_us": "41000", "app_data": "U1NILTIuMC1PcGVuU1NIXzkuMnAxDQo="}


def test_tapp_and_app_data_round_trip_and_come_last() -> None:
    h = Handshake.from_fields(APP)
    assert h.tapp_us == 41_000 and h.app_data == b"SSH-2.0-OpenSSH_9.2p1\r\n"
    assert Handshake.from_fields(h.to_fields()) == h
    assert list(h.to_fields())[-2:] == ["tapp_us", "app_data"]
    full = Handshake.from_fields({**APP, "app_data": base64.b64encode(bytes(range(MAX_APP_DATA))).decode()})
    assert full.app_data == bytes(range(MAX_APP_DATA))


def test_an_older_producer_without_the_fields_still_parses() -> None:
    h = Handshake.from_fields(GOOD)  # no tapp_us, no app_data keys at all
    assert h.tapp_us is None and h.app_data is None
    assert Handshake.from_fields({**GOOD, "tapp_us": "", "app_data": ""}) == h
    # A timing without data (a sensor that keeps none) is allowed; data without timing is not.
    assert Handshake.from_fields({**GOOD, "tapp_us": "0"}).tapp_us == 0


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("tapp_us", "²"),
        ("tapp_us", "-1"),
        ("tapp_us", "1.5"),
        ("tapp_us", "3600000001"),  # past DURATION_MAX_US
        ("tapp_us", "9" * 5000),  # int() of it would be slow or refused: length first
        ("app_data", "***"),
        ("app_data", "é"),
        ("app_data", base64.b64encode(b"x" * (MAX_APP_DATA + 1)).decode()),
        ("app_data", "A" * 1_000_000),
        ("app_data", "QQ"),  # no padding: not strict base64
    ],
)
def test_every_bad_app_field_is_a_handshake_error(field: str, text: str) -> None:
    with pytest.raises(HandshakeError, match=field):
        Handshake.from_fields({**APP, field: text})


def test_app_data_without_tapp_is_refused() -> None:
    with pytest.raises(HandshakeError, match="app_data without tapp_us"):
        Handshake.from_fields({**APP, "tapp_us": ""})


@pytest.mark.parametrize(("tapp", "data"), [
    (True, None), (-5, None), (1.5, None), (DURATION_MAX_US + 1, None),
    (10, b""), (10, "text"), (10, b"x" * (MAX_APP_DATA + 1)), (None, b"x"),
])
def test_check_refuses_hostile_values_built_in_process(tapp: object, data: object) -> None:
    """The Zeek feed builds Handshakes directly and runs check() before they reach the stream."""
    h = Handshake.from_fields(GOOD)
    with pytest.raises(HandshakeError):
        dataclasses.replace(h, tapp_us=tapp, app_data=data).check()  # type: ignore[arg-type]


def test_app_data_b64_is_what_the_logs_show() -> None:
    h = Handshake.from_fields({**APP, "app_data": base64.b64encode(b"\x1b[31m\xff\r\n").decode()})
    assert h.app_data_b64 == "G1szMW3/DQo=" and Handshake.from_fields(GOOD).app_data_b64 is None
