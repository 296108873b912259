"""The userspace delay line: the RTT measured through it is the configured delay, per direction,
jitter spreads it without reordering, and its devices vanish with it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lab.delay import DelayError, Link
from lab.netns import Namespace, Network

pytestmark = pytest.mark.netns


@pytest.fixture
def pair(net: Network) -> Iterator[tuple[Namespace, Namespace]]:
    yield net.add("da"), net.add("db")


def _start(a: Namespace, b: Namespace, ab: float, ba: float, jitter: float = 0) -> subprocess.Popen[bytes]:
    link = Link(a.name, "ta", b.name, "tb", ab, ba, jitter)
    proc = subprocess.Popen([sys.executable, "-m", "lab.delay", link.to_json()], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for ns, ifname, addr in ((a, "ta", "10.9.0.1/24"), (b, "tb", "10.9.0.2/24")):
        ns.run("ip", "addr", "add", addr, "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")
    return proc


def _ping(ns: Namespace, count: int, interval: float = 0.05) -> tuple[float, float, float, list[int]]:
    out = ns.run("ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", "10.9.0.2")
    lo, avg, hi = (float(x) for x in re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out).groups())  # type: ignore[union-attr]
    seqs = [int(m) for m in re.findall(r"icmp_seq=(\d+)", out)]
    return lo, avg, hi, seqs


def test_rtt_through_the_line_is_the_configured_delay(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    proc = _start(a, b, 5, 25)  # asymmetric: only the sum shows in an RTT
    try:
        lo, avg, hi, _ = _ping(a, 8)
    finally:
        proc.terminate()
        proc.wait(10)
    assert lo >= 30.0 and avg < 31.5 and hi < 33.0, (lo, avg, hi)


def test_jitter_spreads_rtt_without_reordering(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    proc = _start(a, b, 10, 10, jitter=20)
    try:
        lo, _, hi, seqs = _ping(a, 20, interval=0.02)
    finally:
        proc.terminate()
        proc.wait(10)
    assert lo >= 20.0 and hi <= 80.0  # 60 ms at most, plus scheduling on a busy machine
    assert hi - lo > 5.0, "jitter of 20 ms each way should spread 20 pings by more than 5 ms"
    assert seqs == sorted(seqs), "the line must keep packet order"


def test_devices_vanish_with_the_process(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    proc = _start(a, b, 1, 1)
    assert "ta" in a.run("ip", "-br", "link")
    proc.terminate()
    assert proc.wait(10) == 0
    assert "ta" not in a.run("ip", "-br", "link") and "tb" not in b.run("ip", "-br", "link")


def test_link_spec_is_validated() -> None:
    assert Link.from_json(Link("x", "a", "y", "b", 1, 2, 3).to_json()) == Link("x", "a", "y", "b", 1, 2, 3)
    for bad in ('{"a": ["x"], "b": ["y", "b"]}', '{"a": ["x", "a"], "b": ["y", "b"], "ab_ms": -1}',
                '{"a": ["x", "waytoolonginterfacename"], "b": ["y", "b"]}', "not json"):
        with pytest.raises(DelayError):
            Link.from_json(bad)
