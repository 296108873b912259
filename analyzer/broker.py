"""Broker's JSON v1 format (Zeek's WebSocket API): the whole data model, events and messages.

Python values for each Broker type (decode(encode(x)) == x for all of them):

| Broker       | Python                                   |
|--------------|------------------------------------------|
| none         | None                                     |
| boolean      | bool                                     |
| count        | Count (an int subclass: count vs integer)|
| integer      | int                                      |
| real         | float                                    |
| timestamp    | Timestamp (ns since the epoch, UTC)      |
| timespan     | Timespan (ns)                            |
| string       | str                                      |
| enum-value   | Enum (the name)                          |
| address      | ipaddress.IPv4Address / IPv6Address      |
| subnet       | ipaddress.IPv4Network / IPv6Network      |
| port         | Port (number, proto)                     |
| vector       | tuple (lists are accepted when encoding) |
| set          | frozenset (sets are accepted)            |
| table        | dict                                     |

Vectors decode to tuples so that they can be members of sets and keys of tables (Zeek records
travel as positional vectors, and tables keyed by records exist). Tables cannot be set members or
table keys here (not hashable); Zeek never produces that for our events.

Facts this module relies on (checked against zeek/broker `libbroker/broker/format/json.{hh,cc}`
and `internal/json.cc`, and against the recordings of a real Zeek 8.0.10 in `shared/zeek-ws/`):
- Zeek writes a timestamp as ISO 8601 UTC with milliseconds only ("2025-11-27T03:08:00.123");
  it reads more digits (microseconds were decoded exactly).
- A timespan is written as an integer with the coarsest exact unit among ns, us, ms, s ("0s" for 0);
  the reader also knows min, h and d.
- An event is `[1, 1, [name, [args...]]]` (format 1, type 1), plus a third element with metadata
  (`[[id, value], ...]`) when Zeek 8 is configured to add it; some versions send an empty one.
- Strings are written unescaped: a frame may be invalid UTF-8 or carry raw control characters.
  Invalid UTF-8 or invalid JSON is rejected here (`BrokerError`); raw control characters inside
  strings are accepted, since they are the string's real content.

Frames are hostile input: `parse_frame` and `decode` raise `BrokerError` and nothing else, for
anything. Before the JSON is parsed a frame's nesting is bounded (`MAX_NESTING`) and so is its
number of JSON values (`MAX_VALUES`, which bounds the memory a frame can take once parsed); number
literals longer than a 64-bit value or a double can be (`MAX_INT_CHARS`, `MAX_NUMBER_CHARS`) and
NaN/Infinity are refused while parsing, so Python's int-digits limit and recursion limit are never
reached. Error messages quote at most `QUOTE` characters of what was received.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network

_U64 = 2**64
_I64 = 2**63

# Bounds on one frame. A StepStone::handshake event is 11 JSON levels deep and about 60 values.
MAX_NESTING = 64  # JSON arrays/objects inside each other (a Broker value takes two levels)
MAX_VALUES = 100_000  # JSON containers plus separators: about 6 MB of Python objects at most
MAX_INT_CHARS = 21  # "-9223372036854775808", "18446744073709551615": 64-bit is all Broker has
MAX_NUMBER_CHARS = 400  # a double written in full ("%f" of 1.8e308) takes 317
QUOTE = 60  # characters of a received value quoted in an error message


class BrokerError(ValueError):
    """A value or message that is not valid Broker JSON v1; the message says what and where."""


def quote(value: Any, limit: int = QUOTE) -> str:
    """`repr(value)` cut to `limit` characters: received values go into one log line, whatever
    their size (repr also escapes newlines and control characters)."""
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[: limit + 1]  # repr of a 1 MiB string is not needed to cut it
    try:
        text = repr(value)
    except RecursionError:  # a structure built outside parse_frame (whose nesting is bounded)
        text = f"<{type(value).__name__} nested too deep>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Count(int):
    """A Broker `count` (unsigned 64-bit); plain `int` is a Broker `integer`."""

    def __new__(cls, value: int) -> Count:
        if isinstance(value, bool) or not 0 <= int(value) < _U64:
            raise BrokerError(f"count out of range: {quote(value)}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Count({int(self)})"


@dataclass(frozen=True, slots=True)
class Timestamp:
    """A Broker `timestamp`: nanoseconds since the epoch, UTC."""

    ns: int

    @classmethod
    def from_seconds(cls, seconds: float) -> Timestamp:
        # Round to microseconds: a float epoch carries no more than that.
        return cls(round(seconds * 1_000_000) * 1000)

    @property
    def seconds(self) -> float:
        return self.ns / 1e9


@dataclass(frozen=True, slots=True)
class Timespan:
    """A Broker `timespan` (a Zeek `interval`): nanoseconds, may be negative."""

    ns: int

    @classmethod
    def from_seconds(cls, seconds: float) -> Timespan:
        return cls(round(seconds * 1_000_000) * 1000)

    @classmethod
    def from_us(cls, us: int) -> Timespan:
        return cls(us * 1000)

    @property
    def seconds(self) -> float:
        return self.ns / 1e9

    @property
    def us(self) -> int:
        """Whole microseconds, rounded to nearest."""
        return round(self.ns / 1000)


_ENUM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_:]*")


@dataclass(frozen=True, slots=True)
class Enum:
    """A Broker `enum-value`: the Zeek enum's name, e.g. `tcp` or `LINK_ETHERNET` (a Zeek
    identifier, module-qualified with `::` or not)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _ENUM_NAME.fullmatch(self.name):
            raise BrokerError(f"enum-value must be a Zeek identifier, not {quote(self.name)}")


@dataclass(frozen=True, slots=True)
class Port:
    """A Broker `port`: number and protocol (tcp, udp, icmp or ? for unknown)."""

    number: int
    proto: str

    PROTOS: ClassVar[tuple[str, ...]] = ("tcp", "udp", "icmp", "?")

    def __post_init__(self) -> None:
        if isinstance(self.number, bool) or not 0 <= self.number < 65536:
            raise BrokerError(f"port number out of range: {quote(self.number)}")
        if self.proto not in self.PROTOS:
            raise BrokerError(f"unknown port protocol {quote(self.proto)}")

    def __str__(self) -> str:
        return f"{self.number}/{self.proto}"


# --- values -------------------------------------------------------------------------------------


def encode(value: Any) -> dict[str, Any]:
    """Python value -> Broker JSON object (`{"@data-type": ..., "data": ...}`)."""
    if value is None:
        return {"@data-type": "none", "data": {}}
    if isinstance(value, bool):
        return {"@data-type": "boolean", "data": value}
    if isinstance(value, Count):
        return {"@data-type": "count", "data": int(value)}
    if isinstance(value, int):
        if not -_I64 <= value < _I64:
            raise BrokerError(f"integer out of range: {value}")
        return {"@data-type": "integer", "data": value}
    if isinstance(value, float):
        if not math.isfinite(value):
            # JSON has no NaN/Infinity; Zeek would fail to parse them.
            raise BrokerError(f"real must be finite, not {value!r}")
        return {"@data-type": "real", "data": value}
    if isinstance(value, Timestamp):
        return {"@data-type": "timestamp", "data": _format_timestamp(value)}
    if isinstance(value, Timespan):
        return {"@data-type": "timespan", "data": _format_timespan(value)}
    if isinstance(value, str):
        return {"@data-type": "string", "data": value}
    if isinstance(value, Enum):
        return {"@data-type": "enum-value", "data": value.name}
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return {"@data-type": "address", "data": str(value)}
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return {"@data-type": "subnet", "data": str(value)}
    if isinstance(value, Port):
        return {"@data-type": "port", "data": str(value)}
    if isinstance(value, list | tuple):
        return {"@data-type": "vector", "data": [encode(x) for x in value]}
    if isinstance(value, set | frozenset):
        return {"@data-type": "set", "data": [encode(x) for x in value]}
    if isinstance(value, Mapping):
        return {
            "@data-type": "table",
            "data": [{"key": encode(k), "value": encode(v)} for k, v in value.items()],
        }
    raise BrokerError(f"no Broker type for {type(value).__name__}")


def decode(obj: Any, where: str = "value", depth: int = 0) -> Any:
    """Broker JSON object -> Python value; `BrokerError` naming `where` on anything invalid."""
    if depth > MAX_NESTING // 2:
        # parse_frame bounds nesting already; this guards objects built by other callers.
        raise BrokerError(f"{where}: nested deeper than {MAX_NESTING // 2} Broker values")
    if not isinstance(obj, dict) or "@data-type" not in obj or "data" not in obj:
        raise BrokerError(f"{where}: not a Broker value object")
    kind, data = obj["@data-type"], obj["data"]
    if not isinstance(kind, str):
        raise BrokerError(f"{where}: unknown @data-type {quote(kind)}")
    container = _CONTAINERS.get(kind)
    decoder = _DECODERS.get(kind)
    if container is None and decoder is None:
        raise BrokerError(f"{where}: unknown @data-type {quote(kind)}")
    try:
        if container is not None:
            return container(data, where, depth + 1)
        return decoder(data, where)  # type: ignore[misc]
    except BrokerError:
        raise
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise BrokerError(f"{where}: bad {kind} {quote(data)}: {quote(str(exc), 200)}") from None


def _none(data: Any, where: str) -> None:
    if data != {}:
        raise BrokerError(f"{where}: none must carry {{}}")


def _boolean(data: Any, where: str) -> bool:
    if not isinstance(data, bool):
        raise BrokerError(f"{where}: boolean must be true or false")
    return data


def _count(data: Any, where: str) -> Count:
    if isinstance(data, bool) or not isinstance(data, int):
        raise BrokerError(f"{where}: count must be a JSON integer, not {quote(data)}")
    return Count(data)


def _integer(data: Any, where: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or not -_I64 <= data < _I64:
        raise BrokerError(f"{where}: integer must be a 64-bit JSON integer, not {quote(data)}")
    return data


def _real(data: Any, where: str) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
        raise BrokerError(f"{where}: real must be a finite number, not {quote(data)}")
    return float(data)


_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?"
)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _timestamp(data: Any, where: str) -> Timestamp:
    match = _TIMESTAMP.fullmatch(data) if isinstance(data, str) else None
    if match is None:
        raise BrokerError(f"{where}: timestamp must be ISO 8601, not {quote(data)}")
    year, month, day, hour, minute, second = (int(x) for x in match.groups()[:6])
    zone = match.group(8)
    tz = _dt.UTC  # Broker reads a time without zone as UTC
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = _dt.timezone(sign * _dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    moment = _dt.datetime(year, month, day, hour, minute, second, tzinfo=tz)
    whole = (moment - _EPOCH) // _dt.timedelta(seconds=1)
    fraction = int((match.group(7) or "0").ljust(9, "0"))
    return Timestamp(whole * 1_000_000_000 + fraction)


def _format_timestamp(value: Timestamp) -> str:
    whole, fraction = divmod(value.ns, 1_000_000_000)
    moment = _EPOCH + _dt.timedelta(seconds=whole)
    if not 1970 <= moment.year <= 9999:
        raise BrokerError(f"timestamp out of range: {value!r}")
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    # The fewest digits that are exact: milliseconds are what every Zeek sends and reads (Zeek
    # 7.0's Broker reads any fraction as a count of milliseconds: ".500000" became 500 s, see
    # `to_milliseconds`); microseconds Zeek 8 reads exactly; nanoseconds only when there are any.
    if fraction % 1_000_000 == 0:
        return f"{text}.{fraction // 1_000_000:03d}"
    if fraction % 1000 == 0:
        return f"{text}.{fraction // 1000:06d}"
    return f"{text}.{fraction:09d}"


def to_milliseconds(value: Any) -> Any:
    """`value` with every Timestamp in it rounded to the millisecond, for a peer that reads no
    finer (Zeek 7.0's Broker: a six-digit fraction is read as milliseconds, hundreds of seconds
    off). Vectors (tuples) are walked; other values are returned as they are."""
    if isinstance(value, Timestamp):
        return Timestamp(round(value.ns / 1_000_000) * 1_000_000)
    if isinstance(value, tuple):
        return tuple(to_milliseconds(v) for v in value)
    if isinstance(value, Event):
        return Event(value.name, to_milliseconds(value.args), value.metadata)
    return value


_TIMESPAN = re.compile(r"(-?[0-9]{1,20})(ns|us|ms|s|min|h|d)")  # 20 digits: past any 64-bit value
_UNIT_NS = {
    "ns": 1,
    "us": 1000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "min": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}


def _timespan(data: Any, where: str) -> Timespan:
    match = _TIMESPAN.fullmatch(data) if isinstance(data, str) else None
    if match is None:
        raise BrokerError(f"{where}: timespan must be like '12345us', not {quote(data)}")
    ns = int(match.group(1)) * _UNIT_NS[match.group(2)]
    if not -_I64 <= ns < _I64:
        raise BrokerError(f"{where}: timespan out of range: {quote(data)}")
    return Timespan(ns)


def _format_timespan(value: Timespan) -> str:
    # Broker's own rendering: the coarsest of ns/us/ms/s that is exact.
    if not -_I64 <= value.ns < _I64:
        raise BrokerError(f"timespan out of range: {value!r}")
    n = value.ns
    if n == 0:
        return "0s"
    for unit, scale in (("ns", 1000), ("us", 1000), ("ms", 1000)):
        if n % scale:
            return f"{n}{unit}"
        n //= scale
    return f"{n}s"


def _string(data: Any, where: str) -> str:
    if not isinstance(data, str):
        raise BrokerError(f"{where}: string must be a JSON string")
    return check_text(data, where)


def check_text(data: str, where: str) -> str:
    """`data` if it can be written out again: JSON escapes can spell a lone surrogate ("\\ud800"),
    which no log file, Redis entry or frame of ours could encode later."""
    if not data.isascii():
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BrokerError(f"{where}: string holds a lone surrogate at {exc.start}") from None
    return data


def _enum(data: Any, where: str) -> Enum:
    if not isinstance(data, str):
        raise BrokerError(f"{where}: enum-value must be a name")
    try:
        return Enum(data)
    except BrokerError as exc:
        raise BrokerError(f"{where}: {exc}") from None


def _address(data: Any, where: str) -> Address:
    if not isinstance(data, str):
        raise BrokerError(f"{where}: address must be a string")
    address = ipaddress.ip_address(data)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # Python accepts "fe80::1%eth0"; Zeek never writes a zone, and it is not an address to probe.
        raise BrokerError(f"{where}: address with a zone: {quote(data)}")
    return address


def _subnet(data: Any, where: str) -> Subnet:
    if not isinstance(data, str) or "/" not in data:
        raise BrokerError(f"{where}: subnet must be 'prefix/length'")
    # Zeek masks host bits itself; so do we.
    return ipaddress.ip_network(data, strict=False)


def _port(data: Any, where: str) -> Port:
    number, sep, proto = data.partition("/") if isinstance(data, str) else ("", "", "")
    # ASCII digits only: isdigit() alone accepts "²", which int() refuses.
    if not sep or not (number.isascii() and number.isdigit()) or len(number) > 5:
        raise BrokerError(f"{where}: port must be like '22/tcp', not {quote(data)}")
    try:
        return Port(int(number), proto)
    except BrokerError as exc:
        raise BrokerError(f"{where}: {exc}") from None


def _vector(data: Any, where: str, depth: int) -> tuple[Any, ...]:
    if not isinstance(data, list):
        raise BrokerError(f"{where}: vector must be a JSON array")
    return tuple(decode(x, f"{where}[{i}]", depth) for i, x in enumerate(data))


def _set(data: Any, where: str, depth: int) -> frozenset[Any]:
    if not isinstance(data, list):
        raise BrokerError(f"{where}: set must be a JSON array")
    try:
        return frozenset(decode(x, f"{where}{{{i}}}", depth) for i, x in enumerate(data))
    except TypeError:
        raise BrokerError(f"{where}: set member is not hashable (a table?)") from None


def _table(data: Any, where: str, depth: int) -> dict[Any, Any]:
    if not isinstance(data, list):
        raise BrokerError(f"{where}: table must be a JSON array of {{key, value}}")
    table: dict[Any, Any] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or set(item) != {"key", "value"}:
            raise BrokerError(f"{where}[{i}]: table entry must be {{key, value}}")
        key = decode(item["key"], f"{where}[{i}].key", depth)
        try:
            table[key] = decode(item["value"], f"{where}[{i}].value", depth)
        except TypeError:
            raise BrokerError(f"{where}[{i}].key is not hashable (a table?)") from None
    return table


_DECODERS: dict[str, Any] = {
    "none": _none,
    "boolean": _boolean,
    "count": _count,
    "integer": _integer,
    "real": _real,
    "timestamp": _timestamp,
    "timespan": _timespan,
    "string": _string,
    "enum-value": _enum,
    "address": _address,
    "subnet": _subnet,
    "port": _port,
}
_CONTAINERS: dict[str, Any] = {"vector": _vector, "set": _set, "table": _table}


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """A Zeek event: name, positional arguments, and Zeek 8's optional metadata pairs."""

    name: str
    args: tuple[Any, ...]
    metadata: tuple[tuple[Count, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """Zeek's answer to the subscription: the endpoint id it gave us and its version."""

    endpoint: str
    version: str


@dataclass(frozen=True, slots=True)
class Error:
    """An error Zeek reports, e.g. code `deserialization_failed` for a message it could not use."""

    code: str
    context: str


@dataclass(frozen=True, slots=True)
class DataMessage:
    """A `data-message`: its topic, and the event it carries (None when it is not an event)."""

    topic: str
    event: Event | None
    data: Any


Message = Ack | Error | DataMessage


def parse_frame(frame: bytes | str) -> Message:
    """One WebSocket frame from Zeek -> a message; `BrokerError` (and nothing else) says why it is
    unusable."""
    if isinstance(frame, bytes | bytearray | memoryview):
        try:
            text = bytes(frame).decode("utf-8")
        except UnicodeDecodeError as exc:
            # Zeek writes binary strings unescaped; such a frame cannot be trusted as JSON.
            raise BrokerError(f"frame is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    elif isinstance(frame, str):
        text = frame
    else:
        raise BrokerError(f"frame must be bytes or text, not {type(frame).__name__}")
    _check_structure(text)
    try:
        obj = json.loads(
            text,
            strict=False,  # raw control characters in strings
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except json.JSONDecodeError as exc:
        raise BrokerError(f"frame is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:  # _check_structure keeps nesting far below the limit; in case it is low
        raise BrokerError("frame is nested too deep for this process's recursion limit") from None
    return parse_message(obj)


# A JSON string (unescaped control characters included, as Zeek writes them), or one that never
# ends: it runs to the end of the text (json.loads reports it). Every quote therefore starts a match
# and the text is scanned once, whatever its quotes and backslashes (no quadratic retries).
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\(?:.|\Z))*+(?:"|\Z)', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def _check_structure(text: str) -> None:
    """Refuse a frame nested deeper than MAX_NESTING or holding more than MAX_VALUES values before
    `json.loads` sees it: Python's parser recurses per level (a RecursionError, not a JSONDecodeError)
    and would build every value of a frame, however many. Linear in the frame's length."""
    if len(text) <= MAX_VALUES and text.count("[") + text.count("{") <= MAX_NESTING:
        return  # too few characters for too many values, too few brackets to nest too deep
    skeleton, strings = _JSON_STRING.subn("", text)
    values = strings + skeleton.count(",") + skeleton.count("[") + skeleton.count("{")
    if values > MAX_VALUES:
        raise BrokerError(f"frame holds more than the {MAX_VALUES} JSON values allowed")
    depth = 0
    for bracket in _BRACKETS.findall(skeleton):
        if bracket in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise BrokerError(f"frame is nested deeper than {MAX_NESTING} levels")
        else:
            depth -= 1


def _json_int(literal: str) -> int:
    if len(literal) > MAX_INT_CHARS:
        # Also keeps int() away from Python's 4300-digit limit (a ValueError of its own).
        raise BrokerError(f"frame holds an integer of {len(literal)} digits; Broker numbers are 64-bit")
    return int(literal)


def _json_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise BrokerError(f"frame holds a number of {len(literal)} characters")
    return float(literal)


def _json_constant(name: str) -> Any:
    raise BrokerError(f"frame is not valid JSON: {name} is not a JSON number")


def parse_message(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise BrokerError("message must be a JSON object")
    kind = obj.get("type")
    if kind == "ack":
        endpoint, version = obj.get("endpoint"), obj.get("version")
        if not isinstance(endpoint, str) or not isinstance(version, str):
            raise BrokerError("ack must carry endpoint and version strings")
        return Ack(check_text(endpoint, "ack endpoint"), check_text(version, "ack version"))
    if kind == "error":
        code, context = obj.get("code"), obj.get("context", "")
        if not isinstance(code, str) or not isinstance(context, str):
            raise BrokerError("error must carry code and context strings")
        return Error(check_text(code, "error code"), check_text(context, "error context"))
    if kind == "data-message":
        topic = obj.get("topic")
        if not isinstance(topic, str) or not topic:
            raise BrokerError(f"data-message without a topic string (topic {quote(topic)})")
        check_text(topic, "data-message topic")
        data = decode({k: obj[k] for k in ("@data-type", "data") if k in obj}, "data-message")
        return DataMessage(topic, _event_of(data), data)
    raise BrokerError(f"unknown message type {quote(kind)}")


def _event_of(data: Any) -> Event | None:
    """The event inside a data-message's value, or None when the value is not an event."""
    if not (isinstance(data, tuple) and len(data) == 3):
        return None
    fmt, kind, body = data
    if not (isinstance(fmt, Count) and isinstance(kind, Count) and fmt == 1 and kind == 1):
        return None
    if not isinstance(body, tuple) or len(body) not in (2, 3):
        raise BrokerError("event must be [name, args] or [name, args, metadata]")
    name, args = body[0], body[1]
    if not isinstance(name, str) or not name:
        raise BrokerError(f"event name must be a non-empty string, not {quote(name)}")
    if not isinstance(args, tuple):
        raise BrokerError(f"event {name}: arguments must be a vector")
    metadata = None
    if len(body) == 3:
        pairs = body[2]
        if not isinstance(pairs, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], Count) for p in pairs
        ):
            raise BrokerError(f"event {name}: metadata must be a vector of [count, value] pairs")
        metadata = tuple((p[0], p[1]) for p in pairs)
    return Event(name, args, metadata)


def event_message(topic: str, event: Event) -> dict[str, Any]:
    """An event as the JSON object of a `data-message` for `topic`."""
    body: list[Any] = [event.name, tuple(event.args)]
    if event.metadata is not None:
        body.append(tuple(tuple(pair) for pair in event.metadata))
    value = encode((Count(1), Count(1), tuple(body)))
    return {"type": "data-message", "topic": topic, **value}


def event_frame(topic: str, event: Event) -> str:
    """The text frame that publishes `event` on `topic`."""
    return json.dumps(event_message(topic, event), separators=(",", ":"), allow_nan=False)


def subscription_frame(topics: Iterable[str]) -> str:
    """The client's first frame: the topic prefixes it subscribes to."""
    topics = list(topics)
    if not all(isinstance(t, str) and t for t in topics):
        raise BrokerError("topics must be non-empty strings")
    return json.dumps(topics)


def network_timestamp(event: Event) -> Timestamp | None:
    """Zeek 8's metadata id 1 (the network timestamp), if the event carries it."""
    for key, value in event.metadata or ():
        if key == 1 and isinstance(value, Timestamp):
            return value
    return None
