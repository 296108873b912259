"""The `handshakes` stream entry (responder -> analyzer): every bad field is a HandshakeError, the
one error the service catches per entry; anything else would stop its loop."""

from __future__ import annotations

import pytest

from analyzer.handshake import Handshake, HandshakeError

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
