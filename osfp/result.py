"""What a fingerprint says about one SYN or SYN+ACK."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MatchType = Literal["exact", "fuzzy_ttl", "fuzzy_quirks"]


class FingerprintError(ValueError):
    """The packet is not a SYN or SYN+ACK that p0f can read (truncated, bad options, wrong flags)."""


class NotFingerprinted(FingerprintError):
    """A well-formed packet that p0f passes over without a word, so neither do we: IPv6 with an
    extension header (or anything else) before TCP, an IPv4 fragment or non-TCP payload.

    A FingerprintError (callers that only want a label treat both alike), but not bad input:
    offline commands count these instead of reporting them.
    """


@dataclass(frozen=True, slots=True)
class Fingerprint:
    label: str | None  # "class:name:flavor" as in p0f's database (e.g. "unix:Linux:3.11 and newer")
    generic: bool  # matched a generic ("g:") signature: only used when nothing specific matched
    match: MatchType | None  # None when no signature matched
    distance: int | None  # p0f's hop distance guess (initial TTL minus observed TTL)
    sig: str  # the packet's own p0f signature, "ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "generic": self.generic,
            "match": self.match,
            "distance": self.distance,
            "sig": self.sig,
        }
