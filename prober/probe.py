"""One active measurement of an address: ICMP echo statistics (T^a) and the p0f label of the
first SYN+ACK to our SYN probes (F^a), run concurrently."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from osfp import FingerprintError
from prober.job import Job, Result
from prober.ping import Pinger, PingStats
from prober.syn import SynOutcome, SynProber

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    count: int = 5  # echo requests per probe
    interval: float = 0.05  # seconds between them
    reply_wait: float = 1.0  # how long a reply (echo or SYN+ACK) may take

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 100:
            raise ValueError("echo count must be 1-100")
        if not 0.0 <= self.interval <= 10.0 or not 0.01 <= self.reply_wait <= 30.0:
            raise ValueError("interval must be 0-10 s and reply wait 0.01-30 s")


@dataclass(frozen=True, slots=True)
class Measurement:
    """A Result plus the details behind it (for `stepstone-prober probe`)."""

    result: Result
    ping: PingStats
    syn: SynOutcome
    fingerprint: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self.result, name) for name in Result.__dataclass_fields__}
        out["ping_sent"] = self.ping.sent
        out["ping_rtts_us"] = [round(r) for r in self.ping.rtts_us]
        out["ports_sent"] = self.syn.sent
        out["ports_open"] = self.syn.open
        out["ports_closed"] = self.syn.closed
        out["fa_fingerprint"] = self.fingerprint
        return out


class Prober:
    """Owns the raw sockets and the fingerprinter; `open()` inside the running event loop."""

    def __init__(self, settings: ProbeSettings | None = None, *, db_path: str | None = None) -> None:
        self.settings = settings or ProbeSettings()
        self.pinger = Pinger()
        self.syn = SynProber()
        self._db_path = db_path
        self._fingerprinter: Any = None

    def open(self) -> None:
        """Raises PermissionError (one-line message) without CAP_NET_RAW."""
        self.pinger.open()
        self.syn.open()
        from osfp.fingerprinter import Fingerprinter  # loads the p0f database once

        self._fingerprinter = Fingerprinter(db_path=self._db_path)

    def close(self) -> None:
        self.pinger.close()
        self.syn.close()

    async def measure(self, job: Job) -> Measurement:
        s = self.settings
        ping, syn = await asyncio.gather(
            self.pinger.ping(job.src, count=s.count, interval=s.interval, reply_wait=s.reply_wait),
            self.syn.probe(job.src, job.ports, reply_wait=s.reply_wait))
        fa, fa_dist, details = None, None, None
        if syn.synack is not None:
            try:
                fp = self._fingerprinter.fingerprint(syn.synack, syn_mss=syn.mss)
                fa, fa_dist, details = fp.label, fp.hops, fp.to_dict()
            except FingerprintError as exc:
                log.info("SYN+ACK from %s port %s not fingerprintable: %s", job.src, syn.synack_port, exc)
        result = Result(
            job=job.id, src=job.src, t=job.t,
            ping_min_us=ping.min_us, ping_avg_us=ping.avg_us, ping_max_us=ping.max_us,
            ping_var_us2=ping.var_us2, ping_loss=ping.loss,
            syn_rtt_us=syn.rtt_us, fa=fa, fa_port=syn.synack_port,
            probed_at=time.time(), fa_dist=fa_dist)
        return Measurement(result=result, ping=ping, syn=syn, fingerprint=details)

    async def __call__(self, job: Job) -> Result:
        return (await self.measure(job)).result
