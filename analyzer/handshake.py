"""The one handshake type every feed produces (capture file, Zeek, responder).

Everything after the feed (fingerprinting, the measurement record, probing, the rules) works on a
`Handshake` and never asks where it came from.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from prober.job import DURATION_MAX_US, EPOCH_MAX, epoch_seconds, short
from prober.job import address as canonical_address

Reply = Literal["ack", "rst"]
Feed = Literal["pcap", "zeek", "responder"]
FEEDS = ("pcap", "zeek", "responder")
MAX_SYN_BYTES = 65535  # an IP packet
MAX_SYNACKS = 64  # SYN+ACK times of one connection (a sensor keeps a handful)
MAX_APP_DATA = 64  # bytes of the client's first data kept (enough to tell SSH from SMTP from junk)


class HandshakeError(ValueError):
    """A handshake message from another process that does not follow the contract."""


@dataclass(frozen=True, slots=True)
class Handshake:
    """One TCP connection request towards the darknet, as seen by a sensor.

    Times are epoch seconds (float). `tp_us` is the paper's T^p in microseconds: the client's reply
    (ACK or RST) minus the SYN+ACK that reply answers. It is None when the SYN+ACK was never
    answered, and also when the SYN+ACK was retransmitted before the reply (Karn's rule: we cannot
    tell which copy the reply answers, so the connection counts but its timing does not).

    Application-layer timing (issue 10, fields at the end): on a port where the server speaks
    first, `tapp_us` is the time from our banner leaving to the client's first data byte arriving,
    and `app_data` the first MAX_APP_DATA bytes of that data. Both None when no banner was sent or
    the client sent nothing in time; `app_data` is only ever set together with `tapp_us`. The bytes
    are the client's, hostile: never decoded except for display (escaped, or base64 on streams).
    """

    t: float
    src: str
    sport: int
    dst: str
    dport: int
    syn: bytes | None  # the SYN's IP packet (IP header onward), for p0f; None if the sensor lost it
    synack_times: tuple[float, ...] = ()
    reply: Reply | None = None
    reply_time: float | None = None
    tp_us: int | None = None
    feed: Feed = "pcap"
    tapp_us: int | None = None
    app_data: bytes | None = None

    @property
    def answered(self) -> bool:
        return self.reply is not None

    @property
    def ambiguous(self) -> bool:
        """Answered, but the SYN+ACK had been retransmitted (Karn's rule drops the timing)."""
        return self.answered and self.tp_us is None

    @property
    def app_data_b64(self) -> str | None:
        """`app_data` for logs and streams: base64, never the client's raw bytes."""
        return None if self.app_data is None else base64.b64encode(self.app_data).decode()

    # The Redis stream `handshakes` (responder -> analyzer) carries flat string fields; empty = null.
    def to_fields(self) -> dict[str, str]:
        return {
            "t": repr(self.t),
            "src": self.src,
            "sport": str(self.sport),
            "dst": self.dst,
            "dport": str(self.dport),
            "syn": "" if self.syn is None else base64.b64encode(self.syn).decode(),
            "synack_times": ",".join(repr(x) for x in self.synack_times),
            "reply": self.reply or "",
            "reply_time": "" if self.reply_time is None else repr(self.reply_time),
            "tp_us": "" if self.tp_us is None else str(self.tp_us),
            "feed": self.feed,
            "tapp_us": "" if self.tapp_us is None else str(self.tapp_us),
            "app_data": self.app_data_b64 or "",
        }

    def check(self) -> Handshake:
        """This handshake if every value is within the contract, else HandshakeError naming the
        field. The one check of every handshake that crosses a process boundary: `from_fields`
        (the `handshakes` stream) ends with it, and the Zeek feed runs it before a handshake
        lands on the stream."""

        def epoch(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= EPOCH_MAX:
                raise HandshakeError(f"{name} is not epoch seconds within 0..{EPOCH_MAX:.0f}: {short(value)}")

        def port(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
                raise HandshakeError(f"{name} is not a port number: {short(value)}")

        for name in ("src", "dst"):
            value = getattr(self, name)
            try:
                canonical = canonical_address(value) == value
            except ValueError:
                canonical = False
            if not canonical:
                raise HandshakeError(f"{name} is not an IP address: {short(value)}")
        epoch("t", self.t)
        port("sport", self.sport)
        port("dport", self.dport)
        syn = self.syn
        if syn is not None and (not isinstance(syn, bytes) or not 0 < len(syn) <= MAX_SYN_BYTES):
            raise HandshakeError(f"syn is not an IP packet of 1..{MAX_SYN_BYTES} bytes")
        if not isinstance(self.synack_times, tuple) or len(self.synack_times) > MAX_SYNACKS:
            raise HandshakeError(f"synack_times: more than {MAX_SYNACKS} SYN+ACK times")
        for value in self.synack_times:
            epoch("synack_times", value)
        if self.reply not in (None, "ack", "rst"):
            raise HandshakeError(f"reply must be ack, rst or empty, not {short(self.reply)}")
        if (self.reply is None) != (self.reply_time is None):
            raise HandshakeError("reply_time must be set exactly when there is a reply")
        if self.reply_time is not None:
            epoch("reply_time", self.reply_time)
        if self.tp_us is not None:
            if (isinstance(self.tp_us, bool) or not isinstance(self.tp_us, int)
                    or not 0 <= self.tp_us <= DURATION_MAX_US):
                raise HandshakeError(f"tp_us is not microseconds within 0..{DURATION_MAX_US}: "
                                     f"{short(self.tp_us)}")
            if self.reply is None:
                raise HandshakeError("tp_us without a reply")
        if self.feed not in FEEDS:
            raise HandshakeError(f"unknown feed {short(self.feed)}")
        if self.tapp_us is not None and (isinstance(self.tapp_us, bool) or not isinstance(self.tapp_us, int)
                                         or not 0 <= self.tapp_us <= DURATION_MAX_US):
            raise HandshakeError(f"tapp_us is not microseconds within 0..{DURATION_MAX_US}: "
                                 f"{short(self.tapp_us)}")
        data = self.app_data
        if data is not None:
            # Empty is not data (the stream's empty field means None): 1..MAX_APP_DATA bytes.
            if not isinstance(data, bytes) or not 0 < len(data) <= MAX_APP_DATA:
                raise HandshakeError(f"app_data is not 1..{MAX_APP_DATA} bytes")
            if self.tapp_us is None:
                raise HandshakeError("app_data without tapp_us")
        return self

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Handshake:
        def epoch(name: str, text: str) -> float:
            value = epoch_seconds(text)
            if value is None:
                raise HandshakeError(f"{name} is not epoch seconds within 0..{EPOCH_MAX:.0f}: {short(text)}")
            return value

        def address(name: str) -> str:
            text = fields.get(name, "")
            try:
                return canonical_address(text)
            except ValueError:
                raise HandshakeError(f"{name} is not an IP address: {short(text)}") from None

        def count(name: str, text: str, digits: int) -> int:
            # Length first: int() of a 5000-digit string raises ValueError, not a HandshakeError.
            if not _decimal(text) or len(text) > digits:
                raise HandshakeError(f"{name} is not a number: {short(text)}")
            return int(text)

        def b64(name: str, limit: int) -> bytes | None:
            text = fields.get(name, "")
            if len(text) > 4 * (limit // 3 + 1):
                raise HandshakeError(f"{name} is longer than {limit} bytes ({len(text)} characters)")
            if not text.isascii():  # b64decode raises a plain ValueError for it, not binascii.Error
                raise HandshakeError(f"{name} is not base64")
            try:
                return base64.b64decode(text, validate=True) or None
            except binascii.Error:
                raise HandshakeError(f"{name} is not base64") from None

        syn = b64("syn", MAX_SYN_BYTES)
        reply = fields.get("reply", "")
        if reply not in ("", "ack", "rst"):
            raise HandshakeError(f"reply must be ack, rst or empty, not {short(reply)}")
        tp_text = fields.get("tp_us", "")
        tapp_text = fields.get("tapp_us", "")  # absent from older producers: None, as empty
        times = fields.get("synack_times", "")
        synacks = times.split(",") if times else []
        if len(synacks) > MAX_SYNACKS:
            raise HandshakeError(f"synack_times: more than {MAX_SYNACKS} SYN+ACK times")
        return cls(
            t=epoch("t", fields.get("t", "")),
            src=address("src"),
            sport=count("sport", fields.get("sport", ""), 5),
            dst=address("dst"),
            dport=count("dport", fields.get("dport", ""), 5),
            syn=syn,
            synack_times=tuple(epoch("synack_times", x) for x in synacks),
            reply=reply or None,  # type: ignore[arg-type]
            reply_time=epoch("reply_time", fields["reply_time"]) if fields.get("reply_time") else None,
            tp_us=count("tp_us", tp_text, 10) if tp_text else None,
            feed=fields.get("feed", "responder"),  # type: ignore[arg-type]
            tapp_us=count("tapp_us", tapp_text, 10) if tapp_text else None,
            app_data=b64("app_data", MAX_APP_DATA),
        ).check()


def _decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()
