"""`Fingerprinter`: p0f v3 labels for raw SYN and SYN+ACK packets, with a cache.

Per packet the hot path is one `struct` parse of the IP/TCP headers into `TcpFeatures` (every field
p0f's matching and `raw_sig` read, nothing else) and a dict lookup; only a new combination of
features runs the matcher. A flood of identical scanner SYNs therefore costs one match.

SYN+ACKs: p0f judges a SYN+ACK's window against the MSS of the SYN of the same flow too. The
fingerprinter remembers the MSS of recent SYNs it fingerprinted (bounded), so feeding it a capture's
SYNs and SYN+ACKs in order reproduces p0f; a caller that sent the SYN itself (the prober) passes
`syn_mss` instead.
"""

from __future__ import annotations

from pathlib import Path

from osfp import database
from osfp.database import TcpDatabase, default_database_path, stock_database_path
from osfp.matcher import find_match, raw_signature
from osfp.packet import Endpoints, TcpFeatures, parse
from osfp.result import Fingerprint, FingerprintError

__all__ = [
    "FingerprintError",
    "Fingerprinter",
    "default_database_path",
    "stock_database_path",
]

CACHE_LIMIT = 65536  # distinct feature sets kept; a flood of random ones just refills it
FLOW_LIMIT = 65536  # SYNs remembered for their SYN+ACK

_CacheKey = tuple[TcpFeatures, int]


class Fingerprinter:
    def __init__(self, db_path: str | Path | None = None) -> None:
        path = Path(db_path) if db_path is not None else default_database_path()
        self.db: TcpDatabase = database.load(path)
        self._cache: dict[_CacheKey, Fingerprint] = {}
        self._syn_mss: dict[tuple[bytes, int, bytes, int], int] = {}
        self.hits = 0
        self.misses = 0

    @property
    def db_path(self) -> Path:
        return self.db.path

    def fingerprint(self, ip_packet: bytes, *, syn_mss: int | None = None) -> Fingerprint:
        """Label a raw IPv4/IPv6 SYN or SYN+ACK (bytes from the IP header on).

        `syn_mss`: for a SYN+ACK, the MSS of the SYN it answers when the caller knows it (0 = the
        SYN had none); None looks it up among the SYNs this fingerprinter has seen (0 if unseen).
        Raises FingerprintError for anything p0f would not fingerprint (truncated headers,
        malformed options, flags other than SYN or SYN+ACK); its subclass NotFingerprinted for
        well-formed packets p0f skips silently (IPv6 extension headers, fragments, non-TCP).
        """
        features, ends = parse(ip_packet)
        if features.synack:
            if syn_mss is None:
                syn_mss = self._syn_mss.get((ends.dst, ends.dport, ends.src, ends.sport), 0)
        else:
            self._remember_syn(ends, features.mss)
            syn_mss = 0  # p0f: a SYN is matched before its flow has an MSS
        key = (features, syn_mss)
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        found = self._match(features, syn_mss)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _remember_syn(self, ends: Endpoints, mss: int) -> None:
        flows = self._syn_mss
        if len(flows) >= FLOW_LIMIT:
            # Drop the oldest half (dicts keep insertion order).
            for old in list(flows)[: FLOW_LIMIT // 2]:
                del flows[old]
        flows[(ends.src, ends.sport, ends.dst, ends.dport)] = mss

    def _match(self, features: TcpFeatures, syn_mss: int) -> Fingerprint:
        sigs = self.db.synack if features.synack else self.db.syn
        found = find_match(features, sigs, syn_mss)
        sig = found.sig
        return Fingerprint(
            label=sig.label if sig is not None else None,
            generic=sig.generic if sig is not None else False,
            match=found.match,
            distance=found.distance,
            sig=raw_signature(features, syn_mss),
        )

    def explain(self, ip_packet: bytes, *, syn_mss: int | None = None) -> str | None:
        """The database line that matched (`sig = ...` text and line number), for debugging."""
        features, ends = parse(ip_packet)
        if syn_mss is None:
            syn_mss = (
                self._syn_mss.get((ends.dst, ends.dport, ends.src, ends.sport), 0) if features.synack else 0
            )
        sigs = self.db.synack if features.synack else self.db.syn
        sig = find_match(features, sigs, syn_mss).sig
        return None if sig is None else f"{self.db.path}:{sig.line}: {sig.raw}"
