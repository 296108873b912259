"""The one handshake type every feed produces (capture file, Zeek, responder).

Everything after the feed (fingerprinting, the measurement record, probing, the rules) works on a
`Handshake` and never asks where it came from.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from typing import Literal

from prober.job import epoch_seconds

Reply = Literal["ack", "rst"]
Feed = Literal["pcap", "zeek", "responder"]


class HandshakeError(ValueError):
    """A handshake message from another process that does not follow the contract."""


@dataclass(frozen=True, slots=True)
class Handshake:
    """One TCP connection request towards the darknet, as seen by a sensor.

    Times are epoch seconds (float). `tp_us` is the paper's T^p in microseconds: the client's reply
    (ACK or RST) minus the SYN+ACK that reply answers. It is None when the SYN+ACK was never
    answered, and also when the SYN+ACK was retransmitted before the reply (Karn's rule: we cannot
    tell which copy the reply answers, so the connection counts but its timing does not).
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

    @property
    def answered(self) -> bool:
        return self.reply is not None

    @property
    def ambiguous(self) -> bool:
        """Answered, but the SYN+ACK had been retransmitted (Karn's rule drops the timing)."""
        return self.answered and self.tp_us is None

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
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Handshake:
        def epoch(name: str, text: str) -> float:
            value = epoch_seconds(text)
            if value is None:
                raise HandshakeError(f"{name} is not epoch seconds: {text!r}")
            return value

        def address(name: str) -> str:
            try:
                return str(ipaddress.ip_address(fields.get(name, "")))
            except ValueError:
                raise HandshakeError(f"{name} is not an IP address: {fields.get(name)!r}") from None

        def port(name: str) -> int:
            text = fields.get(name, "")
            if not _decimal(text) or not 0 <= int(text) < 65536:
                raise HandshakeError(f"{name} is not a port number: {text!r}")
            return int(text)

        try:
            syn = base64.b64decode(fields.get("syn", ""), validate=True) or None
        except binascii.Error:
            raise HandshakeError("syn is not base64") from None
        reply = fields.get("reply", "")
        if reply not in ("", "ack", "rst"):
            raise HandshakeError(f"reply must be ack, rst or empty, not {reply!r}")
        tp_text = fields.get("tp_us", "")
        if tp_text and not _decimal(tp_text):
            raise HandshakeError(f"tp_us is not a count of microseconds: {tp_text!r}")
        feed = fields.get("feed", "responder")
        if feed not in ("pcap", "zeek", "responder"):
            raise HandshakeError(f"unknown feed {feed!r}")
        times = fields.get("synack_times", "")
        return cls(
            t=epoch("t", fields.get("t", "")),
            src=address("src"),
            sport=port("sport"),
            dst=address("dst"),
            dport=port("dport"),
            syn=syn,
            synack_times=tuple(epoch("synack_times", x) for x in times.split(",")) if times else (),
            reply=reply or None,  # type: ignore[arg-type]
            reply_time=epoch("reply_time", fields["reply_time"]) if fields.get("reply_time") else None,
            tp_us=int(tp_text) if tp_text else None,
            feed=feed,  # type: ignore[arg-type]
        )


def _decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()
