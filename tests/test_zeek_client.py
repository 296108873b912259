"""ZeekClient against a WebSocket server in the test that speaks Zeek's protocol (JSON v1): the
subscription and ack, data-messages, the errors a real Zeek 8.0.10 answered (shared/zeek-ws),
frames replayed byte for byte (invalid UTF-8 included), pings, and a server restart mid-stream."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import ipaddress
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from analyzer import broker
from analyzer.broker import Count, Enum, Event, Port, Timespan, Timestamp
from analyzer.handshake import Handshake, HandshakeError
from analyzer.record import Record
from analyzer.rules import Verdict, judge
from analyzer.zeek import (
    HANDSHAKE_EVENT,
    HANDSHAKE_FIELDS,
    HANDSHAKE_TOPIC,
    VERDICT_ACK_EVENT,
    VERDICT_ACK_TOPIC,
    VERDICT_EVENT,
    VERDICT_TOPIC,
    ZeekClient,
    handshake_from_event,
    verdict_event,
)
from tests.conftest import DATA

TIMEOUT = 10.0
ZEEK_WS = DATA / "zeek-ws"
RECEIVED = (ZEEK_WS / "received.bin").read_bytes().splitlines()
ACK, REC_EVENT, ERR_EVENT, ERR_JSON, _ = RECEIVED


def _mkpcap() -> ModuleType:
    path = Path(__file__).resolve().parent / "btest" / "Scripts" / "mkpcap.py"
    spec = importlib.util.spec_from_file_location("mkpcap", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["mkpcap"] = module
    spec.loader.exec_module(module)
    return module


MK = _mkpcap()


def with_metadata(frame: bytes) -> bytes:
    """The recorded event frame as Zeek sends it with EventMetadata::add_network_timestamp = T:
    the metadata element spliced in before the closing brackets, the raw bytes left as they are."""
    meta = (
        b',{"@data-type":"vector","data":[{"@data-type":"vector","data":[{"@data-type":"count","data":1},'
        b'{"@data-type":"timestamp","data":"2026-11-27T03:54:33.363"}]}]}'
    )
    assert frame.endswith(b"]}]}]}")
    return frame[: -len(b"]}]}")] + meta + b"]}]}"


# --- handshake events as the Zeek script sends them ----------------------------------------------


def handshake_info(
    segments: list[Any],
    *,
    uid: str = "CSX9Em2wk0FT25qJ8f",
    vlan: int | None = None,
    link_type: int = 1,
    encap: str = "LINK_ETHERNET",
    tp_override: Any = "auto",
    tapp: Any = None,
    app_data: Any = None,
) -> tuple[Any, ...]:
    """The HandshakeInfo record (positional) for one mkpcap case, computed like handshake.zeek;
    `tapp` and `app_data` as app.zeek sends them on a server-first port (unset elsewhere)."""
    syn = segments[0]
    synacks = [s for s in segments if s.flags == "SA"]
    replies = [s for s in segments[1:] if s.flags in ("A", "PA", "R")]
    reply = replies[0] if replies else None
    kind = "" if reply is None else ("rst" if reply.flags == "R" else "ack")
    tp = None
    if reply is not None and len(synacks) == 1:
        tp = Timespan(round((reply.t - synacks[0].t) * 1e6) * 1000)
    if tp_override != "auto":
        tp = tp_override
    v6 = ":" in syn.src
    return (
        uid,
        Timestamp(round(syn.t * 1000) * 1_000_000),  # a time crosses with milliseconds only
        Timespan.from_seconds(syn.t),
        ipaddress.ip_address(syn.src),
        Port(syn.sport, "tcp"),
        ipaddress.ip_address(syn.dst),
        Port(syn.dport, "tcp"),
        base64.b64encode(syn.frame()).decode(),
        link_type,
        Enum(encap),
        Enum("L3_IPV6" if v6 else "L3_IPV4"),
        None if vlan is None else Count(vlan),
        None,
        Count(0x86DD if v6 else 0x0800),
        Count(len(synacks)),
        tuple(Timespan.from_seconds(s.t) for s in synacks),
        kind,
        None if reply is None else Timespan.from_seconds(reply.t),
        tp,
        tapp,
        app_data,
    )


def case(name: str, sport: int | None = None) -> Any:
    return next(c for c in MK.CASES if c.name == name and (sport is None or c.sport == sport))


def hs_frame(info: tuple[Any, ...], *, metadata: bool = False) -> bytes:
    meta = ((Count(1), Timestamp(1764215673_363_000_000)),) if metadata else None
    return broker.event_frame(HANDSHAKE_TOPIC, Event(HANDSHAKE_EVENT, (info,), meta)).encode()


# --- a Zeek stand-in -----------------------------------------------------------------------------

VERDICT_TYPES = (
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    bool,
    bool,
    bool,
    Timespan | None,
    Timespan | None,
    Count,
    Timestamp | None,
    ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    Timespan | None,
    Timespan | None,
    Timespan | None,
    Timespan | None,
    str | None,
    str | None,
    str,
    bool | None,  # relay_confident
    bool | None,  # cond_timing_strong
    Timespan | None,  # timing_margin
    Timespan | None,  # timing_threshold
    str | None,  # timing_ref
    Count | None,  # timing_samples
    Count | None,  # os_mismatches
    str | None,  # id
    str | None,  # kind
    tuple | None,  # evidence (vector of string)
    bool | None,  # cond_hops
    float | None,  # hops_margin
    Count | None,  # hops_samples
    bool | None,  # cond_app
    float | None,  # app_margin (µs)
    Count | None,  # app_samples
)


VERDICT_ID = 23  # the Verdict's `id`; issue 10's fields follow it


def zeek_would_accept(event: Event) -> bool:
    """What Zeek checks when it turns a client's event into a StepStone::verdict: arity and types."""
    if event.name != VERDICT_EVENT or len(event.args) != 1 or not isinstance(event.args[0], tuple):
        return False
    fields = event.args[0]
    return len(fields) == len(VERDICT_TYPES) and all(
        isinstance(v, t) and (isinstance(v, bool) == (t in (bool, bool | None)))
        for v, t in zip(fields, VERDICT_TYPES, strict=True)
    )


@dataclass
class FakeZeek:
    """Speaks the client side of Zeek's WebSocket API: ack, data-messages, errors, pings."""

    port: int = 0
    script: list[bytes] = field(default_factory=list)  # frames sent (as text frames) after the ack
    # Per connection, first to last: frames sent after the ack instead of `script` (when present).
    scripts: list[list[bytes]] = field(default_factory=list)
    refuse_first: int = 0  # answer this many subscriptions with an error
    ack: bool = True  # False: a Zeek that never acks the subscription
    # Confirm each verdict that carries an id, as the package does (False: a package before that).
    confirm: bool = True
    skip_confirms: int = 0  # leave this many verdicts unconfirmed (a confirmation lost on the way)
    refuse_tp_us: set[int] = field(default_factory=set)  # verdicts with this T^p: Zeek's error instead
    confirmed: list[str] = field(default_factory=list)
    # Events this Zeek knows, each with its check of arity and types.
    known: dict[str, Callable[[Event], bool]] = field(
        default_factory=lambda: {VERDICT_EVENT: zeek_would_accept}
    )
    subscriptions: list[Any] = field(default_factory=list)
    received: list[Event] = field(default_factory=list)
    connections: int = 0
    close_codes: list[int | None] = field(default_factory=list)
    server: Server | None = None
    live: set[ServerConnection] = field(default_factory=set)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> None:
        self.server = await serve(self._handler, "127.0.0.1", self.port)
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/messages/json"

    async def send(self, frame: bytes) -> None:
        for ws in list(self.live):
            await ws.send(frame, text=True)  # bytes as they are, in a text frame, like Zeek

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            async with self.changed:
                await self.changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        first = json.loads(await ws.recv())
        self.subscriptions.append(first)
        if self.refuse_first > 0:
            self.refuse_first -= 1
            await ws.send(
                b'{"type":"error","code":"invalid_subscription","context":"test refuses"}', text=True
            )
            await ws.close()
            await self._notify()
            return
        if not self.ack:
            await self._notify()
            await ws.wait_closed()
            return
        await ws.send(ACK, text=True)
        self.live.add(ws)
        await self._notify()
        script = self.scripts.pop(0) if self.scripts else self.script
        try:
            for frame in script:
                await ws.send(frame, text=True)
            async for text in ws:
                await self._client_message(ws, text)
        finally:
            self.live.discard(ws)
            self.close_codes.append(ws.close_code)
            await self._notify()

    async def _client_message(self, ws: ServerConnection, text: str | bytes) -> None:
        try:
            message = broker.parse_frame(text)
            event = message.event if isinstance(message, broker.DataMessage) else None
            if event is None:
                raise broker.BrokerError("not an event")
        except broker.BrokerError:
            await ws.send(ERR_JSON, text=True)  # recorded: "failed to decode JSON object"
            return
        accept = self.known.get(event.name)
        if accept is None or not accept(event):
            await ws.send(ERR_EVENT, text=True)  # recorded: "failed to create Zeek event"
            return
        if event.name == VERDICT_EVENT and event.args[0][9].us in self.refuse_tp_us:
            await ws.send(ERR_EVENT, text=True)  # as Zeek answers a verdict it cannot make
            return
        if event.name == VERDICT_EVENT and isinstance(ident := event.args[0][VERDICT_ID], str):
            # Kept without its id, which differs per send: the tests compare what Zeek logged.
            fields = event.args[0]
            event = Event(event.name, ((*fields[:VERDICT_ID], None, *fields[VERDICT_ID + 1:]),))
            if self.skip_confirms > 0:
                self.skip_confirms -= 1
            elif self.confirm:
                self.confirmed.append(ident)
                await ws.send(broker.event_frame(VERDICT_ACK_TOPIC, Event(VERDICT_ACK_EVENT, (ident,))),
                              text=True)
        self.received.append(event)
        await self._notify()


@pytest.fixture
async def zeek() -> AsyncIterator[FakeZeek]:
    server = FakeZeek()
    await server.start()
    try:
        yield server
    finally:
        if server.server is not None:
            await server.stop()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., ZeekClient]]:
    clients: list[ZeekClient] = []

    def make(url: str, **kwargs: Any) -> ZeekClient:
        kwargs.setdefault("backoff_initial", 0.02)
        kwargs.setdefault("backoff_max", 0.1)
        client = ZeekClient(url, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def take(stream: AsyncIterator[Handshake], n: int) -> list[Handshake]:
    async with asyncio.timeout(TIMEOUT):
        return [await anext(stream) for _ in range(n)]


async def test_the_stand_in_answers_what_the_real_zeek_answered(zeek: FakeZeek) -> None:
    """Replays the client messages of the recording (sent.jsonl) to the stand-in: it must answer
    them as Zeek 8.0.10 did (received.bin): nothing for the good ones, then "failed to create Zeek
    event" (wrong arity), "failed to decode JSON object" twice (a count of 1.5, no data)."""
    from websockets.asyncio.client import connect

    zeek.known = {"Rec::from_client": lambda e: len(e.args) == 17, "Rec::done": lambda e: not e.args}
    sent = (ZEEK_WS / "sent.jsonl").read_text().splitlines()
    async with connect(zeek.url) as ws:
        await ws.send(sent[0])
        assert await ws.recv(decode=False) == ACK
        for line in sent[1:]:
            await ws.send(line)
        answers = [await asyncio.wait_for(ws.recv(decode=False), TIMEOUT) for _ in range(3)]
        await zeek.wait_for(lambda: len(zeek.received) == 2)
    assert answers == RECEIVED[2:]
    assert [e.name for e in zeek.received] == ["Rec::from_client", "Rec::done"]


# --- handshake conversion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sport", "reply", "tp_us", "synacks"),
    [
        ("direct", 40001, "ack", 20_000, 1),
        ("relayed", 40010, "ack", 150_000, 1),
        ("karn", 40002, "ack", None, 2),
        ("rst", 40003, "rst", 30_000, 1),
        ("unanswered", 40004, None, None, 1),
        ("ipv6", 40005, "ack", 40_000, 1),
        ("vlan", 40006, "ack", 10_000, 1),
    ],
)
def test_handshake_events_become_the_same_handshake_as_the_pcap_path(
    name: str, sport: int, reply: str | None, tp_us: int | None, synacks: int
) -> None:
    c = case(name, sport)
    info = handshake_info(c.segments, vlan=42 if name == "vlan" else None)
    message = broker.parse_frame(hs_frame(info))
    assert isinstance(message, broker.DataMessage) and message.event is not None
    h = handshake_from_event(message.event)
    syn = c.segments[0]
    assert h.feed == "zeek"
    assert (h.src, h.sport, h.dst, h.dport) == (syn.src, syn.sport, syn.dst, syn.dport)
    assert round(h.t * 1e6) == round(syn.t * 1e6)  # microseconds kept (the ts field has ms only)
    assert h.reply == reply
    assert h.tp_us == tp_us
    assert len(h.synack_times) == synacks
    # The IP packet, without link layer, VLAN tag or Ethernet padding.
    assert h.syn == syn.ip()
    if reply is None:
        assert h.reply_time is None and not h.answered
    else:
        assert h.reply_time is not None and h.reply_time > h.synack_times[-1]
        assert h.ambiguous == (tp_us is None)


def test_syn_bytes_on_other_link_layers_use_the_packet_sources_dlt() -> None:
    c = case("direct")
    syn = c.segments[0]
    sll = bytes.fromhex("0000000100060200000000010000") + b"\x08\x00" + syn.ip()  # DLT_LINUX_SLL
    info = list(handshake_info(c.segments, link_type=113, encap="LINK_UNKNOWN"))
    info[7] = base64.b64encode(sll).decode()
    h = handshake_from_event(Event(HANDSHAKE_EVENT, (tuple(info),)))
    assert h.syn == syn.ip()


def test_unusable_syn_bytes_keep_the_timing() -> None:
    c = case("direct")
    info = list(handshake_info(c.segments))
    info[7] = base64.b64encode(b"\x02\x00short").decode()
    h = handshake_from_event(Event(HANDSHAKE_EVENT, (tuple(info),)))
    assert h.syn is None and h.tp_us == 20_000


def _bad(index: int, value: Any) -> tuple[Any, ...]:
    info = list(handshake_info(case("direct").segments))
    info[index] = value
    return tuple(info)


@pytest.mark.parametrize(
    "info",
    [
        _bad(0, ""),  # uid
        _bad(1, Timestamp(0)),  # ts far from syn_epoch: fields out of order
        _bad(2, Timespan(-5)),  # negative epoch
        _bad(3, "203.0.113.10"),  # address as a string
        _bad(4, Port(40001, "udp")),
        _bad(7, "not base64!"),
        _bad(8, "1"),  # link_type must be an int
        _bad(14, 3),  # synack_count as integer, not count
        _bad(15, (Timespan(1), "x")),
        _bad(16, "fin"),
        _bad(17, None),  # reply without reply time
        _bad(18, Timespan(-1)),
        handshake_info(case("unanswered").segments, tp_override=Timespan(1000)),  # tp without reply
        handshake_info(case("karn").segments, tp_override=Timespan(1000)),  # tp against Karn's rule
        _bad(14, Count(0)),  # no SYN+ACK: the script never sends that
        handshake_info(case("direct").segments)[:10],  # too few fields
    ],
)
def test_invalid_handshake_events_are_refused(info: tuple[Any, ...]) -> None:
    with pytest.raises((HandshakeError, broker.BrokerError)):
        handshake_from_event(Event(HANDSHAKE_EVENT, (info,)))


def test_trailing_fields_of_a_newer_script_are_ignored() -> None:
    info = (*handshake_info(case("direct").segments), "future field")
    assert handshake_from_event(Event(HANDSHAKE_EVENT, (info,))).tp_us == 20_000


SSH_ANSWER = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"
TELNET_ANSWER = bytes.fromhex("fffc18fffc20fffc23fffc27")  # IAC WONT ...: not UTF-8


TAPP = Timespan(37_500_000)
SSH_ANSWER_B64 = base64.b64encode(SSH_ANSWER).decode()


def _app(tapp: Any = TAPP, data: Any = SSH_ANSWER_B64, name: str = "direct") -> tuple[Any, ...]:
    return handshake_info(case(name).segments, tapp=tapp, app_data=data)


@pytest.mark.parametrize(
    ("tapp", "data", "tapp_us"),
    [
        (Timespan(37_500_000), SSH_ANSWER, 37_500),
        (Timespan(12_250_400), TELNET_ANSWER, 12_250),  # ns rounded to the nearest microsecond
        (Timespan(0), b"x", 0),  # the answer in the banner's microsecond
        (Timespan(3600 * 10**9), b"\0" * 64, 3_600_000_000),  # the bounds: an hour, 64 bytes
    ],
)
def test_tapp_and_app_data_become_the_handshakes_fields(tapp: Timespan, data: bytes, tapp_us: int) -> None:
    h = handshake_from_event(Event(HANDSHAKE_EVENT, (_app(tapp, base64.b64encode(data).decode()),)))
    assert (h.tapp_us, h.app_data) == (tapp_us, data)
    assert h.tp_us == 20_000 and h.reply == "ack"
    assert Handshake.from_fields(h.to_fields()) == h  # and onto the handshakes stream unchanged


def test_a_script_from_before_tapp_sends_none_and_is_read() -> None:
    info = handshake_info(case("direct").segments)
    assert len(info) == len(HANDSHAKE_FIELDS) == 21 and info[-2:] == (None, None)
    h = handshake_from_event(Event(HANDSHAKE_EVENT, (info[:19],)))
    assert h.tp_us == 20_000 and h.tapp_us is None and h.app_data is None
    assert handshake_from_event(Event(HANDSHAKE_EVENT, (info,))) == h


HOSTILE_APP = {
    "negative": _app(Timespan(-1)),
    "over-an-hour": _app(Timespan(3600 * 10**9 + 1000)),
    "huge": _app(Timespan(2**63 - 1)),
    "tapp-alone": _app(data=None),
    "data-alone": _app(tapp=None),
    "empty-data": _app(data=""),
    "65-bytes": _app(data=base64.b64encode(b"a" * 65).decode()),
    "long-text": _app(data="A" * 10_000),  # refused by its length, never decoded
    "not-base64": _app(data="SSH-2.0-x\r\n"),
    "not-ascii": _app(data="AAAA\u00fc"),
    "raw-bytes-as-text": _app(data=SSH_ANSWER.decode()),  # a script that forgot encode_base64
    "tapp-a-count": _app(tapp=Count(37_500)),
    "data-a-count": _app(data=Count(1)),
    "after-a-rst": _app(name="rst"),
    "unanswered": _app(name="unanswered"),
}


@pytest.mark.parametrize("info", HOSTILE_APP.values(), ids=HOSTILE_APP.keys())
def test_hostile_app_fields_are_refused(info: tuple[Any, ...]) -> None:
    with pytest.raises((HandshakeError, broker.BrokerError)):
        handshake_from_event(Event(HANDSHAKE_EVENT, (info,)))


async def test_hostile_app_fields_drop_the_event_not_the_connection(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    client = client_for(zeek.url)
    got = await _survives(zeek, client, [hs_frame(info) for info in HOSTILE_APP.values()])
    assert [h.tp_us for h in got] == [20_000] * len(HOSTILE_APP)


# --- verdict events -------------------------------------------------------------------------------

RECORD = Record(
    t=1764212880.123456,
    src="203.0.113.20",
    dst="198.18.0.6",
    tp_us=150_000,
    ping_min_us=4_000,
    ping_avg_us=8_000,
    ping_max_us=12_500,
    ping_var_us2=4.0,
    syn_rtt_us=9_000,
    fp="unix:Linux:3.11 and newer",
    fa=None,
)
VERDICT = Verdict(
    src="203.0.113.20",
    cond_os=False,
    cond_timing=True,
    relay=True,
    tp_mean_us=155_000.0,
    ta_max_mean_us=12_250.25,
    samples=2,
    records=2,
    with_ping=2,
    tp_exceeds_ta_max=2,
    os_pair=None,
    window_start=1764200000.0,
    window_end=1764212880.2,
)


def _zeek_record(name: str) -> list[tuple[str, str, bool]]:
    """(field, Zeek type, optional) of a record type in zeek-scripts/main.zeek, in order."""
    text = (Path(__file__).resolve().parents[1] / "zeek-scripts" / "main.zeek").read_text()
    body = re.search(rf"type {name}: record {{(.*?)\n\t}};", text, re.S)
    assert body is not None, name
    fields = []
    for line in body.group(1).splitlines():
        if m := re.fullmatch(r"\s*(\w+): ([\w ]+?)( &optional)?;", line):
            fields.append((m.group(1), m.group(2), m.group(3) is not None))
    return fields


ADDR = ipaddress.IPv4Address | ipaddress.IPv6Address
ZEEK_TYPES: dict[str, Any] = {"addr": ADDR, "bool": bool, "count": Count, "int": int, "interval": Timespan,
                              "time": Timestamp, "string": str, "port": Port, "link_encap": Enum,
                              "layer3_proto": Enum, "vector of interval": tuple, "double": float,
                              "vector of string": tuple}


def test_the_records_match_the_zeek_scripts() -> None:
    """Both sides of the fixed record layouts: no Zeek runs here to catch a field moved on one side."""
    verdict = _zeek_record("Verdict")
    assert len(verdict) == len(VERDICT_TYPES) == 32
    for (name, zeek_type, optional), ours in zip(verdict, VERDICT_TYPES, strict=True):
        expected = ZEEK_TYPES[zeek_type] | None if optional else ZEEK_TYPES[zeek_type]
        assert ours == expected, name
    info = _zeek_record("HandshakeInfo")
    assert tuple(name for name, _, _ in info) == HANDSHAKE_FIELDS
    for c in MK.CASES:
        for (name, zeek_type, optional), value in zip(info, handshake_info(c.segments), strict=True):
            assert isinstance(value, ZEEK_TYPES[zeek_type]) or (optional and value is None), (c.name, name)
            assert not isinstance(value, bool) or zeek_type == "bool", (c.name, name)


def test_verdict_event_carries_verdict_and_measurement() -> None:
    event = verdict_event(VERDICT.to_dict(), RECORD.to_dict())
    assert zeek_would_accept(event)
    (v,) = event.args
    assert v[0] == ipaddress.ip_address("203.0.113.20")
    assert v[1:4] == (False, True, True)
    assert v[4] == Timespan(155_000_000) and v[5] == Timespan(12_250_250)
    assert v[6] == Count(2)
    # Sent to Zeek, a timestamp keeps microseconds (zeek-stdout.txt shows them decoded exactly).
    assert broker.encode(v[7])["data"] == "2025-11-27T03:08:00.123456"
    assert v[8] == ipaddress.ip_address("198.18.0.6")
    assert v[9:13] == (Timespan(150_000_000), Timespan(4_000_000), Timespan(8_000_000), Timespan(12_500_000))
    assert v[13:15] == ("unix:Linux:3.11 and newer", None)
    assert "timing: mean T^p 155.000 ms > mean max ping 12.250 ms over 2 samples" in v[15]
    # It survives the wire.
    again = broker.parse_frame(broker.event_frame(VERDICT_TOPIC, event))
    assert isinstance(again, broker.DataMessage) and again.event == event


def test_verdict_reasons_name_the_os_pair() -> None:
    verdict = VERDICT.to_dict() | {"cond_os": True, "os_pair": ["unix:Linux:3.x", "win:Windows:7 or 8"]}
    (v,) = verdict_event(verdict, RECORD.to_dict()).args
    assert "OS mismatch: SYN unix:Linux:3.x vs probe win:Windows:7 or 8" in v[15]


def test_the_readme_example_log_line_is_what_the_analyzer_sends() -> None:
    """docs/output.md section `zeek`: its stepstone.log line is the second of these two records."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "output.md").read_text()
    section = readme.split("<!-- section: zeek -->")[1].split("<!-- /section: zeek -->")[0]
    line = next(x for x in section.splitlines() if x.startswith("17642"))
    base = {"src": "203.0.113.20", "dst": "198.18.0.6", "ping_min_us": 4000, "ping_avg_us": 8000,
            "ping_var_us2": 1_000_000.0, "syn_rtt_us": 12000, "fp": "unix:Linux:3.11 and newer", "fa": None}
    first = Record.from_json(base | {"t": 1764212870.123456, "tp_us": 160_000, "ping_max_us": 12_000})
    last = Record.from_json(base | {"t": 1764212880.123456, "tp_us": 150_000, "ping_max_us": 12_500})
    (v,) = verdict_event(judge([first, last]).to_dict(), last.to_dict()).args
    # fa unset, then the reasons column, then the confident rule's evidence, then noticed_by, change
    head, _, tail = line.partition(" -                          " + v[15] + " ")
    # ... then what the verdict found (issue 10): kind, evidence, hops margin (unset), hop samples,
    # the application-layer margin (unset) and its samples.
    assert v[30] is None
    assert head and tail.split() == ["T", f"{v[18].ns / 1e9:.6f}", f"{v[19].ns / 1e9:.6f}", v[20],
                                     str(int(v[21])), str(int(v[22])), "confident", "flagged",
                                     v[24], ",".join(v[25]), "-", str(int(v[28])), "-", str(int(v[31]))]


@pytest.mark.parametrize(
    ("verdict", "record"),
    [
        (VERDICT.to_dict() | {"src": "203.0.113.99"}, RECORD.to_dict()),  # another source's record
        (VERDICT.to_dict() | {"relay": "yes"}, RECORD.to_dict()),
        (VERDICT.to_dict() | {"samples": -1}, RECORD.to_dict()),
        (VERDICT.to_dict() | {"tp_mean_us": float("nan")}, RECORD.to_dict()),
        (VERDICT.to_dict(), RECORD.to_dict() | {"dst": "nowhere"}),
    ],
)
def test_verdicts_that_do_not_fit_are_refused(verdict: dict[str, Any], record: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        verdict_event(verdict, record)


# --- the client against the stand-in --------------------------------------------------------------


async def test_recorded_frames_are_replayed_and_the_connection_survives_them(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    direct = hs_frame(handshake_info(case("direct").segments))
    # Zeek's real frames: an event with a raw binary string (invalid UTF-8), then the three errors
    # it answered; then a handshake. A client that closed on invalid UTF-8 would miss it.
    zeek.script = [REC_EVENT, *RECEIVED[2:], direct]
    client = client_for(zeek.url)
    stream = client.handshakes()
    (h,) = await take(stream, 1)
    assert h.src == "203.0.113.10" and h.tp_us == 20_000
    assert zeek.subscriptions == [[HANDSHAKE_TOPIC, VERDICT_ACK_TOPIC]]
    assert zeek.connections == 1 and client.stats.connects == 1
    assert client.stats.rejected == 1  # the invalid UTF-8 frame
    assert client.stats.zeek_errors == 3
    assert client.server_version == "8.0.10"


async def test_frames_with_the_metadata_element_are_understood(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    zeek.script = [
        with_metadata(REC_EVENT),  # the recorded frame with metadata: still invalid UTF-8
        hs_frame(handshake_info(case("relayed", 40010).segments), metadata=True),
        hs_frame(handshake_info(case("ipv6").segments), metadata=False),
    ]
    client = client_for(zeek.url)
    hs = await take(client.handshakes(), 2)
    assert [h.tp_us for h in hs] == [150_000, 40_000]
    assert client.stats.rejected == 1 and zeek.connections == 1


async def test_bad_frames_and_unknown_events_are_skipped(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    bad_record = _bad(16, "fin")
    zeek.script = [
        b"{not json",
        b'{"type":"gossip"}',
        broker.event_frame(HANDSHAKE_TOPIC, Event("Other::event", ())).encode(),
        hs_frame(bad_record),
        json.dumps({"type": "data-message", "topic": HANDSHAKE_TOPIC, **broker.encode("x")}).encode(),
        hs_frame(handshake_info(case("rst").segments)),
    ]
    client = client_for(zeek.url)
    (h,) = await take(client.handshakes(), 1)
    assert h.reply == "rst"
    assert client.stats.rejected == 5 and client.stats.handshakes == 1 and zeek.connections == 1


async def test_verdicts_reach_zeek_and_zeeks_errors_are_reported(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    client = client_for(zeek.url)
    await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    await zeek.wait_for(lambda: len(zeek.received) == 1)
    assert zeek.received[0] == verdict_event(VERDICT.to_dict(), RECORD.to_dict())
    # An event Zeek cannot use: it answers with the recorded error and keeps the connection.
    await client.publish(VERDICT_TOPIC, Event(VERDICT_EVENT, (True, Count(42), -7)))
    await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    await zeek.wait_for(lambda: len(zeek.received) == 2)
    # Frames arrive in order: once this handshake is out, the error before it has been handled.
    await zeek.send(hs_frame(handshake_info(case("direct").segments)))
    await take(client.handshakes(), 1)
    assert client.stats.zeek_errors == 1
    assert zeek.connections == 1 and client.pending == 0


async def test_a_refused_subscription_is_retried(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    zeek.refuse_first = 2
    zeek.script = [hs_frame(handshake_info(case("direct").segments))]
    client = client_for(zeek.url)
    (h,) = await take(client.handshakes(), 1)
    assert h.tp_us == 20_000
    assert zeek.connections == 3 and client.stats.zeek_errors == 2 and client.stats.connects == 1


async def test_the_client_answers_zeeks_pings(zeek: FakeZeek, client_for: Callable[..., ZeekClient]) -> None:
    client = client_for(zeek.url, ping_interval=None)
    client.start()
    await zeek.wait_for(lambda: len(zeek.live) == 1)
    (ws,) = zeek.live
    pong = await ws.ping(b"are you there")
    async with asyncio.timeout(TIMEOUT):
        await pong


async def test_full_exchange_with_a_zeek_restart_loses_nothing(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    first = [
        hs_frame(handshake_info(case("direct").segments)),
        hs_frame(handshake_info(case("karn").segments)),
    ]
    zeek.script = first
    client = client_for(zeek.url)
    stream = client.handshakes()
    got = await take(stream, 2)
    assert [h.src for h in got] == ["203.0.113.10", "203.0.113.11"]
    await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    await zeek.wait_for(lambda: len(zeek.received) == 1)

    # Zeek goes away; verdicts produced meanwhile wait in the client.
    await zeek.stop()
    async with asyncio.timeout(TIMEOUT):
        await client.disconnected.wait()
    during = []
    delivered = []
    for i in range(5):
        record = RECORD.to_dict() | {"tp_us": 100_000 + i}
        during.append(verdict_event(VERDICT.to_dict(), record))
        delivered.append(await client.publish_verdict(VERDICT.to_dict(), record))
    assert client.pending == 5

    # Zeek comes back on the same port, with more handshakes.
    zeek.script = [hs_frame(handshake_info(case("ipv6").segments))]
    await zeek.start()
    got += await take(stream, 1)
    await zeek.wait_for(lambda: len(zeek.received) == 6)
    assert zeek.received[1:] == during  # every queued verdict, in order, once
    assert [h.src for h in got] == ["203.0.113.10", "203.0.113.11", "2001:db8::10"]
    async with asyncio.timeout(TIMEOUT):  # each is confirmed by Zeek
        assert await asyncio.gather(*delivered) == [True] * 5
    assert client.stats.connects == 2 and client.pending == 0 and client.stats.dropped == 0
    await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    await zeek.wait_for(lambda: len(zeek.received) == 7)


async def test_the_resend_queue_is_bounded(zeek: FakeZeek, client_for: Callable[..., ZeekClient]) -> None:
    await zeek.stop()
    client = client_for(zeek.url, resend_limit=3)
    records = [RECORD.to_dict() | {"tp_us": 1000 * i} for i in range(5)]
    sent = [await client.publish_verdict(VERDICT.to_dict(), record) for record in records]
    assert client.pending == 3 and client.stats.dropped == 2
    # The futures say which frames left the queue unsent (the service keeps those in Redis).
    assert [f.result() for f in sent[:2]] == [False, False] and not any(f.done() for f in sent[2:])
    await zeek.start()
    await zeek.wait_for(lambda: len(zeek.received) == 3)
    assert zeek.received == [verdict_event(VERDICT.to_dict(), r) for r in records[2:]]  # the newest kept
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(*sent[2:]) == [True, True, True]
    # Closing with frames still queued resolves them as unsent.
    await zeek.stop()
    async with asyncio.timeout(TIMEOUT):
        await client.disconnected.wait()
    late = await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    await client.close()
    assert late.result() is False


async def test_close_ends_the_handshake_stream(zeek: FakeZeek, client_for: Callable[..., ZeekClient]) -> None:
    client = client_for(zeek.url)
    stream = client.handshakes()
    waiting = asyncio.create_task(anext(stream, None))
    await zeek.wait_for(lambda: len(zeek.live) == 1)
    await client.close()
    async with asyncio.timeout(TIMEOUT):
        assert await waiting is None
    await zeek.wait_for(lambda: len(zeek.close_codes) == 1)
    assert zeek.close_codes == [1000]  # a normal close, not 1011
    with pytest.raises(RuntimeError):
        await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())


def test_bad_urls_and_topics_are_refused() -> None:
    with pytest.raises(ValueError):
        ZeekClient("http://127.0.0.1:27759/v1/messages/json")
    with pytest.raises(ValueError):
        ZeekClient("ws://127.0.0.1:27759/v1/messages/json", topics=("",))


# --- hostile frames: rejected one by one, on the same connection ----------------------------------


def _nested(levels: int) -> bytes:
    """A data-message whose value is `levels` vectors inside each other."""
    inner = '{"@data-type":"vector","data":[' * levels + "]}" * levels
    return ('{"type":"data-message","topic":"stepstone/handshake",' + inner[1:-1] + "}").encode()


def _data_message(value: str) -> bytes:
    """A data-message around raw JSON text for its Broker value."""
    return ('{"type":"data-message","topic":"stepstone/handshake",' + value + "}").encode()


HUGE_INT = _data_message('"@data-type":"count","data":' + "9" * 5000)
NON_ASCII_SYN = hs_frame(_bad(7, "AAAA\u00fc"))  # not base64 (b64decode: ValueError, not binascii.Error)


async def _survives(zeek: FakeZeek, client: ZeekClient, bad: list[bytes]) -> list[Handshake]:
    """Sends each bad frame followed by a valid handshake; all valid ones arrive on one connection."""
    good = [hs_frame(handshake_info(case("direct").segments, uid=f"C{i}")) for i in range(len(bad))]
    zeek.script = [frame for pair in zip(bad, good, strict=True) for frame in pair]
    got = await take(client.handshakes(), len(bad))
    assert zeek.connections == 1 and client.stats.connects == 1
    assert client.stats.rejected == len(bad) and client.stats.handshakes == len(bad)
    return got


@pytest.mark.parametrize(
    "bad",
    [
        _nested(400),  # main: RecursionError, the connection and the frames behind it lost
        _nested(100_000),  # json.loads itself recursed past the limit
        HUGE_INT,  # main: ValueError (Python's 4300-digit limit)
        _data_message('"@data-type":"real","data":1' + "0" * 5000 + ".5"),
        _data_message('"@data-type":"real","data":NaN'),
        _data_message('"@data-type":"timespan","data":"' + "9" * 5000 + 's"'),
        _data_message('"@data-type":"vector","data":[' + "[]," * 200_000 + "[]]"),  # too many values
        b'"' + b'\\"' * 200_000,  # a string that never ends: linear, not quadratic
        NON_ASCII_SYN,  # main: ValueError out of handshake_from_event
    ],
    ids=["nested-400", "nested-100k", "int-5000-digits", "real-5000-digits", "NaN",
         "timespan-5000-digits", "200k-values", "unterminated-escapes", "syn-not-ascii"],
)
async def test_a_hostile_frame_is_rejected_and_the_connection_kept(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient], bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(zeek.url)
    (h,) = await _survives(zeek, client, [bad])
    assert h.tp_us == 20_000
    warnings = [r for r in caplog.records if r.name == "stepstone.zeek" and r.levelname != "INFO"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()  # one line
    assert len(warnings[0].getMessage()) < 400  # the frame is not quoted whole


def _bad_value(index: int, value: Any) -> bytes:
    return hs_frame(_bad(index, value))


async def test_wrong_types_and_values_at_every_position_are_rejected_one_by_one(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    """Every HandshakeInfo field with a value of each other Broker type, then the odd values that
    pass a type check: each frame is rejected and the valid handshake right behind it arrives."""
    samples: list[Any] = [None, True, Count(7), -7, 2.5, Timestamp(10**18), Timespan(10**9), "x",
                          Enum("x"), ipaddress.ip_address("192.0.2.1"),
                          ipaddress.ip_network("192.0.2.0/24"), Port(1, "udp"), (Count(1),),
                          frozenset({Count(1)}), {"k": Count(1)}]
    valid = handshake_info(case("direct").segments)
    bad: list[bytes] = []
    for index, right in enumerate(valid):
        for value in samples:
            optional = index in (11, 12, 13, 18) and (value is None or isinstance(value, Count))
            if type(value) is type(right) or optional or (index == 0 and isinstance(value, str)):
                continue
            if index == 7 and isinstance(value, str):  # "x" is an empty frame once base64-decoded
                continue
            bad.append(_bad_value(index, value))
    raw = hs_frame(valid)
    bad += [
        raw.replace(b'"stepstone/handshake"', b"42"),  # topic not a string
        raw.replace(b'"stepstone/handshake"', b'"\\ud800"'),  # a lone surrogate
        raw.replace(b'"LINK_ETHERNET"', b'"LINK ETHERNET;"'),  # not an enum name
        raw.replace(b'"LINK_ETHERNET"', b'""'),
        raw.replace(b'"203.0.113.10"', b'"fe80::1%eth0"'),  # an address with a zone
        raw.replace(b'"203.0.113.10"', b'"203.0.113.300"'),
        raw.replace(b'"40001/tcp"', b'"65536/tcp"'),  # port out of range
        raw.replace(b'"40001/tcp"', b'"\xc2\xb2/tcp"'),  # a digit int() refuses
        raw.replace(b'"40001/tcp"', b'"40001/sctp"'),
        raw.replace(b'{"@data-type":"count","data":1}', b'{"@data-type":"count","data":1.5}', 1),
        raw.replace(b'"StepStone::handshake"', b"[]"),
        raw.replace(b'"@data-type":"string"', b'"@data-type":["string"]', 1),
        NON_ASCII_SYN,
    ]
    client = client_for(zeek.url)
    got = await _survives(zeek, client, bad)
    assert [h.src for h in got] == ["203.0.113.10"] * len(bad)


def _shifted(seconds: int) -> tuple[Any, ...]:
    """The direct case, every time moved by `seconds` (consistent, so only the bounds can object)."""
    info = list(handshake_info(case("direct").segments))
    ns = seconds * 10**9
    info[1] = Timestamp(info[1].ns + ns)
    info[2] = Timespan(info[2].ns + ns)
    info[15] = tuple(Timespan(s.ns + ns) for s in info[15])
    info[17] = Timespan(info[17].ns + ns)
    return tuple(info)


def _with_synacks(n: int) -> tuple[Any, ...]:
    info = list(_bad(14, Count(2**64 - 1)))  # as many SYN+ACKs as a count holds
    info[15] = (info[15][0],) * n
    info[18] = None  # no T^p after retransmitted SYN+ACKs (Karn's rule)
    return tuple(info)


@pytest.mark.parametrize(
    "info",
    [
        handshake_info(case("direct").segments, tp_override=Timespan(7200 * 10**9)),  # T^p of 2 h
        handshake_info(case("direct").segments, tp_override=Timespan(2**63 - 1)),
        _bad(15, (Timespan.from_seconds(1e9),)),  # a SYN+ACK decades from the SYN
        _bad(17, Timespan(2**63 - 1)),  # a reply in 2262
        _with_synacks(300),
        _with_synacks(65),  # over the Handshake's own bound
        _shifted(5 * 10**9),  # the year 2128: past the 2^32 s Handshake.check allows
    ],
    ids=["tp-2h", "tp-max", "synack-far", "reply-2262", "300-synacks", "65-synacks", "t-2128"],
)
async def test_numbers_out_of_bounds_drop_the_event_not_the_connection(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient], info: tuple[Any, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(HandshakeError):
        handshake_from_event(Event(HANDSHAKE_EVENT, (info,)))
    client = client_for(zeek.url)
    (h,) = await _survives(zeek, client, [hs_frame(info)])
    assert h.tp_us == 20_000  # the valid one behind it, not the bad one
    assert any("rejected a handshake event" in r.getMessage() for r in caplog.records)


async def test_a_zeek_that_never_acks_is_named_in_the_log(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient], caplog: pytest.LogCaptureFixture
) -> None:
    zeek.ack = False
    said = asyncio.Event()

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "no ack" in record.getMessage():
                said.set()

    listener = Listener()
    logging.getLogger("stepstone.zeek").addHandler(listener)
    try:
        client = client_for(zeek.url, ack_timeout=0.3)
        client.start()
        async with asyncio.timeout(TIMEOUT):
            await said.wait()
    finally:
        logging.getLogger("stepstone.zeek").removeHandler(listener)
    line = next(r.getMessage() for r in caplog.records if "no ack" in r.getMessage())
    assert line == (f"Zeek at {zeek.url}: no ack from Zeek within 0.3 s after subscribing to "
                    "stepstone/handshake, stepstone/verdict-ack; reconnecting")
    assert client.stats.connects == 0


async def test_a_frame_of_a_few_mib_is_rejected_and_the_connection_kept(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    """2 MiB: past websockets' default (1 MiB, which closed the connection) but within our bound."""
    big = json.dumps({"type": "data-message", "topic": HANDSHAKE_TOPIC,
                      **broker.encode(("x" * 2**21,))}).encode()
    client = client_for(zeek.url)
    await _survives(zeek, client, [big])
    assert client.stats.oversized == 0


async def test_a_frame_over_the_limit_is_said_and_what_can_be_kept_is_kept(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient], caplog: pytest.LogCaptureFixture
) -> None:
    """Over MAX_FRAME_BYTES the connection is lost (websockets cannot skip a frame): the log says
    so, the handshake read before it is delivered, the verdicts queued are all sent (at least once)
    on the next connection, and the client carries on there."""
    from analyzer.zeek import MAX_FRAME_BYTES

    await zeek.stop()
    client = client_for(zeek.url)
    stream = client.handshakes()
    records = [RECORD.to_dict() | {"tp_us": 1000 * i} for i in range(3)]
    sent = [await client.publish_verdict(VERDICT.to_dict(), r) for r in records]
    assert client.pending == 3
    huge = _data_message('"@data-type":"string","data":"' + "x" * MAX_FRAME_BYTES + '"')
    before = hs_frame(handshake_info(case("direct").segments))
    behind = hs_frame(handshake_info(case("karn").segments))
    after = hs_frame(handshake_info(case("ipv6").segments))
    zeek.scripts = [[before, huge, behind], [after]]
    await zeek.start()
    got = await take(stream, 2)
    # `behind` went down with the first connection; `after` came on the second.
    assert [h.src for h in got] == ["203.0.113.10", "2001:db8::10"]
    assert zeek.connections == 2 and client.stats.oversized == 1 and client.stats.connects == 2
    expected = [verdict_event(VERDICT.to_dict(), r) for r in records]
    await zeek.wait_for(lambda: all(e in zeek.received for e in expected))
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(*sent) == [True, True, True]
    line = next(r.getMessage() for r in caplog.records if "over" in r.getMessage())
    assert f"sent a frame over {MAX_FRAME_BYTES} bytes" in line
    assert "events Zeek had queued behind it on that connection are lost" in line


# --- confirmed delivery of verdicts ------------------------------------------------------------


async def test_a_verdict_zeek_received_but_never_confirmed_is_sent_again_after_a_restart(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    """Zeek stops between reading a verdict and confirming it: the next Zeek gets it again."""
    client = client_for(zeek.url)
    client.start()
    await zeek.wait_for(lambda: len(zeek.live) == 1)
    zeek.confirm = False
    delivered = await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    await zeek.wait_for(lambda: len(zeek.received) == 1)
    assert not delivered.done() and client.pending == 1  # written, not yet confirmed
    await zeek.stop()
    async with asyncio.timeout(TIMEOUT):
        await client.disconnected.wait()
    zeek.confirm = True
    await zeek.start()
    async with asyncio.timeout(TIMEOUT):
        assert await delivered is True
    assert zeek.received == [verdict_event(VERDICT.to_dict(), RECORD.to_dict())] * 2
    assert client.stats.resent == 1 and client.stats.confirmed == 1 and client.pending == 0


async def test_a_lost_confirmation_among_others_has_its_verdict_sent_again(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    client = client_for(zeek.url, confirm_timeout=0.4)
    zeek.skip_confirms = 1
    records = [RECORD.to_dict() | {"tp_us": 100_000 + i} for i in range(3)]
    delivered = [await client.publish_verdict(VERDICT.to_dict(), r) for r in records]
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(*delivered) == [True, True, True]
    # The first (unconfirmed) one went out twice, on the same connection.
    sent = [*records, records[0]]
    assert [e.args[0][9] for e in zeek.received] == [Timespan(r["tp_us"] * 1000) for r in sent]
    assert client.stats.resent == 1 and zeek.connections == 1


async def test_a_zeek_whose_package_never_confirms_gets_written_verdicts_counted_as_delivered(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient], caplog: pytest.LogCaptureFixture
) -> None:
    """An older stepstone package on the sensor: one warning, and no verdict held forever."""
    zeek.confirm = False
    client = client_for(zeek.url, confirm_timeout=0.3)
    first = await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    async with asyncio.timeout(TIMEOUT):
        assert await first is True
    later = await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    async with asyncio.timeout(TIMEOUT):
        assert await later is True  # at once on writing, now
    await zeek.wait_for(lambda: len(zeek.received) == 2)
    warnings = [r.getMessage() for r in caplog.records if "predates verdict_ack" in r.getMessage()]
    assert len(warnings) == 1 and client.stats.resent == 0 and zeek.connections == 1


def test_verdict_event_says_what_kind_at_the_end() -> None:
    """Issue 10: kind, evidence ("test=margin/samples"), cond_hops, hops_margin, hops_samples come
    after `id`; a malformed one is refused before it becomes an event."""
    from analyzer.rules import judge

    records = [Record(t=float(i), src="203.0.113.20", dst="198.18.0.6", tp_us=20_000, ping_max_us=20_000,
                      ping_avg_us=20_000, fp="unix:Linux:3.11 and newer", syn_dist=2, fa_dist=1)
               for i in range(3)]
    verdict = judge(records).to_dict()
    event = verdict_event(verdict, records[-1].to_dict(), "v-1")
    assert zeek_would_accept(event)
    (v,) = event.args
    assert v[23] == "v-1"
    assert v[24:] == ("forwarding", ("hops=+1/3",), True, 1.0, Count(3), False, None, Count(0))
    assert "confident: relay (hops +1 over 3 pairs; timing margin 0.000 ms <= threshold" in v[15]
    # A terminating proxy's verdict: the application-layer test at the very end (µs).
    app = {**verdict, "kind": "terminating", "cond_app": True, "app_margin": 40_300.0, "app_samples": 3}
    event = verdict_event(app, records[-1].to_dict())
    assert zeek_would_accept(event)
    assert event.args[0][24] == "terminating" and event.args[0][29:] == (True, 40_300.0, Count(3))
    # A verdict from before issue 10 leaves them unset.
    old = {k: x for k, x in verdict.items()
           if k not in ("kind", "evidence", "cond_hops", "hops_margin", "hops_samples", "cond_app",
                        "app_margin", "app_samples")}
    (v,) = verdict_event(old, records[-1].to_dict()).args
    assert v[24:] == (None,) * 8
    for bad in ({"kind": "relay"}, {"evidence": "hops"}, {"evidence": [{"test": "hops"}]},
                {"evidence": [{"test": "x y", "margin": 1, "threshold": 1, "samples": 1, "unit": "hops"}]},
                {"evidence": [{"test": "hops", "margin": float("inf"), "threshold": 1, "samples": 1,
                               "unit": "hops"}]},
                {"hops_margin": 1e9}, {"hops_samples": -1}, {"cond_hops": "yes"}, {"cond_app": 1},
                {"app_margin": 3.7e9}, {"app_margin": float("nan")}, {"app_margin": True},
                {"app_samples": -3}, {"app_samples": 2.5}):
        with pytest.raises(ValueError):
            verdict_event({**verdict, **bad}, records[-1].to_dict())



async def test_a_verdict_zeek_keeps_refusing_is_given_up_and_holds_up_nothing(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    """Zeek answers an error (which names no message) to one verdict and confirms the others: that
    one is sent MAX_UNCONFIRMED times, then its future raises VerdictRefused (the service
    acknowledges it as rejected); the verdicts around it are delivered."""
    from analyzer.zeek import MAX_UNCONFIRMED, VerdictRefused

    client = client_for(zeek.url, confirm_timeout=0.3)
    zeek.refuse_tp_us = {100_001}
    records = [RECORD.to_dict() | {"tp_us": 100_000 + i} for i in range(3)]
    sent = [await client.publish_verdict(VERDICT.to_dict(), r) for r in records]
    async with asyncio.timeout(TIMEOUT):
        assert await sent[0] is True and await sent[2] is True
        with pytest.raises(VerdictRefused):
            await sent[1]
    assert client.stats.refused == 1 and client.stats.resent == MAX_UNCONFIRMED - 1
    assert client.pending == 0 and client.stats.zeek_errors == MAX_UNCONFIRMED


async def test_a_zeek_that_refuses_every_verdict_is_not_taken_for_an_old_package(
    zeek: FakeZeek, client_for: Callable[..., ZeekClient]
) -> None:
    """No confirmation at all, but errors: the verdicts were refused, not silently handled by a
    package without confirmations, so none counts as delivered."""
    from analyzer.zeek import VerdictRefused

    client = client_for(zeek.url, confirm_timeout=0.3)
    zeek.refuse_tp_us = {RECORD.tp_us}
    sent = await client.publish_verdict(VERDICT.to_dict(), RECORD.to_dict())
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(VerdictRefused):
            await sent


def test_a_verdict_whose_text_is_not_utf8_is_refused_before_it_is_sent() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        verdict_event(VERDICT.to_dict() | {"reasons": "bad \ud800 text"}, RECORD.to_dict())
