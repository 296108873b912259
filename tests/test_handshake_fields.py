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
