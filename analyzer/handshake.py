"""The one handshake type every feed produces (capture file, Zeek, responder).

Everything after the feed (fingerprinting, the measurement record, probing, the rules) works on a
`Handshake` and never asks where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reply = Literal["ack", "rst"]
Feed = Literal["pcap", "zeek", "responder"]


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
