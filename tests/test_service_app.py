"""Application-layer timing through the live analyzer: handshakes with tapp_us on the stream
(as the responder's --banners writes them) give records carrying it and a `terminating` verdict."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from service_harness import Harness, handshake, result, running_service

service = running_service


async def test_a_proxy_seen_by_banner_timing_is_terminating(harness: Harness) -> None:
    """Three SSH handshakes whose answers to the banner come 40 ms after the ping RTT (a proxy's
    +20 ms onward leg); T^p equals the ping (the proxy's own handshake). A direct client next to
    it answers within a millisecond."""
    t = time.time()
    ping = 30_000

    def hs(src: str, i: int, extra_us: int) -> Any:
        base = handshake(src, "198.19.0.22", t=t + i * 0.01, tp_us=ping, sport=41000 + i)
        return dataclasses.replace(base, tapp_us=ping + extra_us, app_data=b"SSH-2.0-OpenSSH_9.2p1\r\n")

    proxy = [hs("198.18.70.1", i, 40_000 + 300 * i) for i in range(3)]
    direct = [hs("198.18.70.2", 3 + i, 400 + 100 * i) for i in range(3)]
    async with service(harness):
        for h in [*proxy, *direct]:
            await harness.send(h)
        jobs = await harness.jobs(2)
        for job, fields in jobs:
            await harness.answer(result(job, fields["src"], t, ping_max=ping, fa=None, ping_min=ping))
        out = await harness.verdicts(6)
    # Each source's fullest verdict (lines of one source may be written in any order).
    last = {src: max((x for x in out if x["src"] == src), key=lambda x: x["verdict"]["app_samples"])
            for src in ("198.18.70.1", "198.18.70.2")}
    assert sorted(x["tapp_us"] for x in out if x["src"] == "198.18.70.1") == [70_000, 70_300, 70_600]
    v = last["198.18.70.1"]["verdict"]
    assert v["kind"] == "terminating" and v["cond_app"] and v["app_samples"] == 3
    assert v["app_margin"] == 40_300 and v["relay_confident"] and not v["relay"]
    assert [e["test"] for e in v["evidence"]] == ["app"]
    d = last["198.18.70.2"]["verdict"]
    assert d["kind"] == "none" and not d["cond_app"] and d["app_samples"] == 3


async def test_the_operator_allowance_clears_a_slow_client(harness: Harness) -> None:
    """`run --app-allowance 60` (a site where clients think up to 50 ms): the same 40 ms answers
    are a slow client's, not a proxy's onward leg."""
    t = time.time()
    ping = 30_000
    slow = [dataclasses.replace(handshake("198.18.71.1", "198.19.0.22", t=t + i * 0.01, tp_us=ping,
                                          sport=42000 + i), tapp_us=ping + 40_000, app_data=b"EHLO x\r\n")
            for i in range(3)]
    async with service(harness, app_allowance_us=60_000.0):
        for h in slow:
            await harness.send(h)
        ((job, fields),) = await harness.jobs(1)
        await harness.answer(result(job, fields["src"], t, ping_max=ping, fa=None, ping_min=ping))
        out = await harness.verdicts(3)
    v = max(out, key=lambda x: x["verdict"]["app_samples"])["verdict"]
    assert v["app_samples"] == 3 and not v["cond_app"] and v["kind"] == "none"


async def test_a_stray_probe_mark_is_not_waited_on(harness: Harness) -> None:
    """Redis's keys are editable by hand: a dedup mark that names no job (an older version's
    time) and a `probe:<src>` that is no job id leave the handshake nothing to wait for; it is
    judged on its passive half at once, instead of waiting for a job that never ends."""
    src = "198.18.72.1"
    await harness.r.set("stepstone:seen:" + src, "1700000000.0", ex=600)
    await harness.r.set("stepstone:probe:" + src, "not a job", ex=600)
    async with service(harness):
        await harness.send(handshake(src, "198.19.0.80", t=time.time(), tp_us=20_000))
        (line,) = await harness.verdicts(1)
    assert line["job"] is None and line["reason"].startswith("deduped: no earlier probe")
