"""Broker JSON v1 codec: property round trips of every type, and the frames a real Zeek sent."""

from __future__ import annotations

import ipaddress
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzer import broker
from analyzer.broker import (
    Ack,
    BrokerError,
    Count,
    DataMessage,
    Enum,
    Error,
    Event,
    Port,
    Timespan,
    Timestamp,
)
from tests.conftest import DATA

# --- strategies ---------------------------------------------------------------------------------

I64 = 2**63
counts = st.integers(0, 2**64 - 1).map(Count)
integers = st.integers(-I64, I64 - 1)
reals = st.floats(allow_nan=False, allow_infinity=False)
# 1970 .. 9999, whole ns
timestamps = st.integers(0, 253402300799 * 10**9 + 999_999_999).map(Timestamp)
timespans = st.integers(-I64, I64 - 1).map(Timespan)
strings = st.text()
enums = st.from_regex(r"[A-Za-z_][A-Za-z0-9_:]*", fullmatch=True).map(Enum)
v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
addresses = v4 | v6
subnets = st.one_of(
    st.tuples(v4, st.integers(0, 32)).map(lambda p: ipaddress.ip_network(f"{p[0]}/{p[1]}", strict=False)),
    st.tuples(v6, st.integers(0, 128)).map(lambda p: ipaddress.ip_network(f"{p[0]}/{p[1]}", strict=False)),
)
ports = st.builds(Port, st.integers(0, 65535), st.sampled_from(Port.PROTOS))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    counts,
    integers,
    reals,
    timestamps,
    timespans,
    strings,
    enums,
    addresses,
    subnets,
    ports,
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    hashable = children.filter(_hashable)
    return st.one_of(
        st.lists(children, max_size=4).map(tuple),
        st.frozensets(hashable, max_size=4),
        st.dictionaries(hashable, children, max_size=4),
    )


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


values = st.recursive(scalars, _containers, max_leaves=12)


def same(a: Any, b: Any) -> bool:
    """Equality that also tells count from integer from boolean, and 1.0 from 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, dict):
        return len(a) == len(b) and all(any(same(k, k2) and same(v, b[k2]) for k2 in b) for k, v in a.items())
    return bool(a == b)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # long reprs of big values
@settings(max_examples=400)
@given(values)
def test_every_value_round_trips_through_json_text(value: Any) -> None:
    text = json.dumps(broker.encode(value), allow_nan=False)
    assert same(broker.decode(json.loads(text)), value)


@given(st.text(min_size=1), st.lists(values, max_size=4), st.none() | st.lists(st.tuples(counts, values)))
def test_events_round_trip_through_frames(name: str, args: list[Any], meta: Any) -> None:
    metadata = None if meta is None else tuple(meta)
    event = Event(name, tuple(args), metadata)
    message = broker.parse_frame(broker.event_frame("stepstone/x", event).encode())
    assert isinstance(message, DataMessage)
    assert message.topic == "stepstone/x"
    assert message.event is not None
    assert message.event.name == name
    assert same(message.event.args, tuple(args))
    assert (message.event.metadata is None) == (metadata is None)
    if metadata is not None:
        assert same(message.event.metadata, metadata)


@given(timespans)
def test_timespans_use_brokers_own_rendering(span: Timespan) -> None:
    text = broker.encode(span)["data"]
    number, unit = text.rstrip("nsumh"), text[len(text.rstrip("nsumh")) :]
    assert unit in ("ns", "us", "ms", "s")
    scale = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9}[unit]
    assert int(number) * scale == span.ns
    if unit != "s" and span.ns:
        assert int(number) % 1000 != 0  # the coarsest exact unit, as Broker writes it


def test_timestamps_and_timespans_as_zeek_writes_and_reads_them() -> None:
    ts = broker.decode({"@data-type": "timestamp", "data": "2025-11-27T03:08:00.123"})
    assert ts == Timestamp(1764212880_123_000_000)
    assert broker.encode(Timestamp.from_seconds(1764212880.123456))["data"] == "2025-11-27T03:08:00.123456"
    with_zone = broker.decode({"@data-type": "timestamp", "data": "2025-11-27T04:08:00+01:00"})
    assert with_zone == Timestamp(1764212880 * 10**9)
    for text, ns in (("12345us", 12_345_000), ("17300128ns", 17_300_128), ("0s", 0), ("2min", 120 * 10**9)):
        assert broker.decode({"@data-type": "timespan", "data": text}) == Timespan(ns)
    assert broker.encode(Timespan(12_345_000))["data"] == "12345us"
    assert Timespan(12_345_678).us == 12346


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"@data-type": "count", "data": 1.5}, "count"),
        ({"@data-type": "count", "data": -1}, "count"),
        ({"@data-type": "count", "data": True}, "count"),
        ({"@data-type": "integer", "data": 2**63}, "integer"),
        ({"@data-type": "boolean", "data": 1}, "boolean"),
        ({"@data-type": "none", "data": None}, "none"),
        ({"@data-type": "timestamp", "data": "yesterday"}, "timestamp"),
        ({"@data-type": "timespan", "data": "12 parsecs"}, "timespan"),
        ({"@data-type": "address", "data": "300.1.1.1"}, "address"),
        ({"@data-type": "subnet", "data": "10.0.0.0"}, "subnet"),
        ({"@data-type": "port", "data": "99999/tcp"}, "port"),
        ({"@data-type": "port", "data": "22/sctp"}, "port"),
        ({"@data-type": "vector", "data": {}}, "vector"),
        ({"@data-type": "table", "data": [{"key": {"@data-type": "count", "data": 1}}]}, "table"),
        ({"@data-type": "set", "data": [{"@data-type": "table", "data": []}]}, "hashable"),
        ({"@data-type": "blob", "data": ""}, "unknown"),
        ({"data": 1}, "not a Broker value"),
    ],
)
def test_invalid_values_are_rejected_with_a_reason(obj: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BrokerError, match=fragment):
        broker.decode(obj)


def test_values_without_a_broker_type_are_refused() -> None:
    with pytest.raises(BrokerError):
        broker.encode(object())
    with pytest.raises(BrokerError):
        broker.encode(float("nan"))
    with pytest.raises(BrokerError):
        Count(-1)


# --- real frames from Zeek 8.0.10 ---------------------------------------------------------------


def recorded_frames() -> list[bytes]:
    return (DATA / "zeek-ws" / "received.bin").read_bytes().splitlines()


EXPECTED_ARGS = (
    True,
    Count(42),
    -7,
    3.25,
    Timestamp(1764212880_123_000_000),
    Timespan(12_345_000),
    ipaddress.ip_address("198.51.100.7"),
    ipaddress.ip_address("2001:db8::1"),
    ipaddress.ip_network("203.0.113.0/24"),
    Port(22, "tcp"),
    Enum("tcp"),
    (Count(1), Count(2), Count(3)),
    frozenset({ipaddress.ip_address("192.0.2.1")}),
    {"x": Count(1)},
    (Count(1), None),
    (Count(2), "y"),
)


def test_recorded_ack_and_errors_parse() -> None:
    frames = recorded_frames()
    ack = broker.parse_frame(frames[0])
    assert isinstance(ack, Ack)
    assert ack.version == "8.0.10"
    assert ack.endpoint.endswith("-websocket-0")
    errors = [broker.parse_frame(f) for f in frames[2:]]
    assert errors == [
        Error("deserialization_failed", "failed to create Zeek event"),
        Error("deserialization_failed", "failed to decode JSON object"),
        Error("deserialization_failed", "failed to decode JSON object"),
    ]


def test_recorded_event_with_a_raw_binary_string_is_rejected_as_invalid_utf8() -> None:
    frame = recorded_frames()[1]
    with pytest.raises(BrokerError, match="UTF-8"):
        broker.parse_frame(frame)


def _without_binary_string(frame: bytes) -> bytes:
    # The same frame as if the script had published text: replace the raw bytes, keep the rest.
    start = frame.index(b'"bin')
    end = frame.index(b'"', start + 1)
    return frame[:start] + b'"bin\x01\x1f\xc3\xa9"' + frame[end + 1 :]


def test_recorded_event_decodes_every_type_once_the_string_is_text() -> None:
    message = broker.parse_frame(_without_binary_string(recorded_frames()[1]))
    assert isinstance(message, DataMessage)
    assert message.topic == "/test/from-zeek"
    assert message.event is not None
    assert message.event.name == "Rec::from_zeek"
    assert message.event.metadata is None
    args = message.event.args
    assert args[6] == "bin\x01\x1f\u00e9"  # raw control characters are the string's content
    assert same(args[:6] + args[7:], EXPECTED_ARGS)


def test_recorded_event_with_metadata() -> None:
    lines = (DATA / "zeek-ws" / "received-with-metadata.jsonl").read_text().splitlines()
    obj = json.loads(lines[1])
    obj["data"][2]["data"][1]["data"][6]["data"] = "text"  # the surrogate-escaped binary string
    message = broker.parse_message(obj)
    assert isinstance(message, DataMessage) and message.event is not None
    stamp = Timestamp(int(datetime(2026, 11, 27, 3, 54, 33, tzinfo=UTC).timestamp()) * 10**9 + 363_000_000)
    assert message.event.metadata == ((Count(1), stamp),)
    assert broker.network_timestamp(message.event) == stamp
    assert same(message.event.args[:6] + message.event.args[7:], EXPECTED_ARGS)


def test_our_frame_for_the_recorded_client_event_matches_what_zeek_accepted() -> None:
    sent = (DATA / "zeek-ws" / "sent.jsonl").read_text().splitlines()
    accepted = json.loads(sent[1])
    message = broker.parse_message(accepted)
    assert isinstance(message, DataMessage) and message.event is not None
    again = broker.event_message(message.topic, message.event)
    # Same structure and values as the message Zeek decoded exactly (zeek-stdout.txt).
    assert broker.parse_message(again) == message
    assert again["data"][2]["data"][1]["data"][4] == {
        "@data-type": "timestamp",
        "data": "2025-11-27T03:08:00.123456",
    }


def test_frames_that_are_not_json_or_not_messages_are_rejected() -> None:
    for frame in (b"{", b"[]", b'{"type":"gossip"}', b'{"type":"data-message"}', b'{"type":"ack"}'):
        with pytest.raises(BrokerError):
            broker.parse_frame(frame)


def test_data_that_is_not_an_event_is_a_message_without_event() -> None:
    frame = json.dumps({"type": "data-message", "topic": "t", **broker.encode((Count(1), "x"))})
    message = broker.parse_frame(frame)
    assert isinstance(message, DataMessage)
    assert message.event is None


def test_subscription_frame() -> None:
    assert json.loads(broker.subscription_frame(["stepstone/handshake"])) == ["stepstone/handshake"]
    with pytest.raises(BrokerError):
        broker.subscription_frame([""])


# --- hostile frames: BrokerError and nothing else, in bounded time --------------------------------


def _message(value: str) -> str:
    return '{"type":"data-message","topic":"t",' + value + "}"


def _vectors(levels: int) -> str:
    return _message(('{"@data-type":"vector","data":[' * levels + "]}" * levels)[1:-1])


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (_vectors(400), "nested deeper than 64"),  # was RecursionError
        ("[" * 1_000_000, "JSON values"),  # was RecursionError inside json.loads
        ("[" * 60 + "]" * 59, "not valid JSON"),  # within the bound: json.loads says what is wrong
        (_message('"@data-type":"count","data":' + "9" * 5000), "5000 digits"),  # was ValueError
        (_message('"@data-type":"integer","data":-' + "9" * 30), "31 digits"),
        (_message('"@data-type":"real","data":' + "1" * 500 + ".0"), "502 characters"),
        (_message('"@data-type":"real","data":-Infinity'), "-Infinity is not a JSON number"),
        (_message('"@data-type":"timespan","data":"' + "9" * 5000 + 'ns"'), "timespan must be like"),
        (_message('"@data-type":"port","data":"' + "9" * 5000 + '/tcp"'), "port must be like"),
        (_message('"@data-type":"port","data":"\u00b2/tcp"'), "port must be like"),
        (_message('"@data-type":"port","data":"65536/tcp"'), "data-message: port number out of range"),
        (_message('"@data-type":"port","data":"1/tcp' + "0" * 5000 + '"'), "unknown port protocol"),
        (_message('"@data-type":"enum-value","data":"a b"'), "data-message: enum-value must be"),
        (_message('"@data-type":"address","data":"fe80::1%eth0"'), "zone"),
        (_message('"@data-type":"string","data":"\\udc80"'), "lone surrogate"),
        (_message('"@data-type":"timestamp","data":"2025-02-30T00:00:00"'), "bad timestamp"),
        (_message('"@data-type":"timestamp","data":"2025-01-01T00:00:00+99:00"'), "bad timestamp"),
        ('{"type":"data-message","topic":["t"],"@data-type":"none","data":{}}', "topic string"),
        ('{"type":"data-message","topic":"\\ud800","@data-type":"none","data":{}}', "lone surrogate"),
        ('{"type":"ack","endpoint":"\\udfff","version":"8"}', "lone surrogate"),
        ('{"type":' + '"x' * 10_000 + '"}', "not valid JSON"),
        ('"' + '\\"' * 1_000_000, "not valid JSON"),  # unterminated: one pass, not quadratic
    ],
)
def test_hostile_frames_raise_broker_error_naming_the_problem(frame: str, fragment: str) -> None:
    started = time.perf_counter()
    with pytest.raises(BrokerError) as caught:
        broker.parse_frame(frame)
    assert time.perf_counter() - started < 2.0
    assert fragment in str(caught.value)
    assert len(str(caught.value)) < 300  # received values are quoted, not copied


def test_the_bounds_admit_what_zeek_can_send() -> None:
    # 64-bit extremes, a full-length double, and nesting right at the bound.
    for value in (Count(2**64 - 1), -(2**63), 2**63 - 1, -1.7976931348623157e308, 5e-324):
        assert same(broker.parse_frame(broker.event_frame("t", Event("e", (value,)))).event.args[0], value)  # type: ignore[union-attr]
    assert broker.decode({"@data-type": "real", "data": float("1" * 309)}) == float("1" * 309)
    frame = _message('"@data-type":"real","data":' + "1" * 309 + "." + "0" * 6)
    assert isinstance(broker.parse_frame(frame), DataMessage)
    # 32 vectors, the outermost being the message object itself: 64 JSON levels.
    deepest = broker.parse_frame(_vectors(32))
    assert isinstance(deepest, DataMessage)
    with pytest.raises(BrokerError, match="nested deeper"):
        broker.parse_frame(_vectors(33))


def test_decode_bounds_nesting_of_objects_built_elsewhere() -> None:
    obj: dict[str, Any] = {"@data-type": "none", "data": {}}
    for _ in range(5000):
        obj = {"@data-type": "vector", "data": [obj]}
    with pytest.raises(BrokerError, match="nested deeper"):
        broker.decode(obj)


def test_enum_names_are_zeek_identifiers() -> None:
    assert broker.encode(Enum("StepStone::Relay_Detected"))["data"] == "StepStone::Relay_Detected"
    for name in ("", "a b", "1abc", "x\n"):
        with pytest.raises(BrokerError):
            Enum(name)


def test_quote_cuts_long_values_and_escapes_control_characters() -> None:
    assert broker.quote("x" * 10**6) == "'" + "x" * 56 + "..."
    assert broker.quote("a\nb") == "'a\\nb'"
    assert len(broker.quote(list(range(10**5)))) == broker.QUOTE


def test_timestamps_are_written_with_the_fewest_exact_digits_and_can_be_rounded_to_milliseconds() -> None:
    """Zeek 7.0's Broker reads a timestamp's fraction as a count of milliseconds (".500000" was
    read as 500 s, measured on 7.0.11): whole milliseconds go out with three digits, and
    `to_milliseconds` makes an event safe for such a peer."""
    from analyzer.broker import Event, Timestamp, encode, to_milliseconds

    assert encode(Timestamp(1_764_212_880_500_000_000))["data"] == "2025-11-27T03:08:00.500"
    assert encode(Timestamp(1_764_212_880_123_456_000))["data"] == "2025-11-27T03:08:00.123456"
    event = Event("E", ((Timestamp(1_764_212_880_123_456_000), "x"), Timestamp(1_764_212_880_999_600_000)))
    assert to_milliseconds(event) == Event(
        "E", ((Timestamp(1_764_212_880_123_000_000), "x"), Timestamp(1_764_212_881_000_000_000)))


@pytest.mark.parametrize(("version", "exact"), [("8.0.10", True), ("8.1.0-dev.12", True), ("9.0.0", True),
                                                ("2.8.0-dev", False), ("7.2.1", False), ("", False),
                                                ("weird", False)])
def test_only_a_zeek_known_to_read_microseconds_gets_them(version: str, exact: bool) -> None:
    from analyzer.zeek import _reads_exact_times

    assert _reads_exact_times(version) is exact
