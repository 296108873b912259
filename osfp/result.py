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

    @property
    def hops(self) -> int | None:
        """The hop distance the measurement record keeps (analyzer/rules.py `cond_hops`): p0f's
        `distance` when a signature matched (initial TTL = the signature's), else the guess p0f prints
        in `sig` (the observed TTL rounded up to 32/64/128/255); None where p0f prints `+?` (over 35
        hops: p0f does not trust the guess) or, for a userland tool it matched fuzzily, gives 0
        without computing one."""
        if self.label is not None and self.distance is not None:
            return self.distance
        ttl = self.sig.split(":", 2)[1] if self.sig.count(":") >= 2 else ""
        guess = ttl.partition("+")[2]
        return int(guess) if guess.isascii() and guess.isdigit() else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "generic": self.generic,
            "match": self.match,
            "distance": self.distance,
            "sig": self.sig,
        }
