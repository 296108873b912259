"""The Zeek btest suite (tests/btest): run where a zeek binary is on PATH, skipped elsewhere. The
trace its tests write is checked here in any case, against scapy's reading of it."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BTEST = Path(__file__).resolve().parent / "btest"


def _mkpcap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkpcap", BTEST / "Scripts" / "mkpcap.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["mkpcap"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.zeek
def test_btest_suite_passes_on_a_real_zeek() -> None:
    if shutil.which("zeek") is None:
        pytest.skip("no zeek binary on PATH")
    btest = shutil.which("btest") or str(Path(sys.executable).with_name("btest"))
    result = subprocess.run(
        [btest, "-d"], check=False, cwd=BTEST, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_trace_is_what_the_baselines_assume(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.utils import PcapReader

    path = tmp_path / "handshakes.pcap"
    subprocess.run([sys.executable, str(BTEST / "Scripts" / "mkpcap.py"), str(path)], check=True)
    with PcapReader(str(path)) as reader:
        assert reader.linktype == 1
        packets = list(reader)
    assert len(packets) == 35
    times = [float(p.time) for p in packets]
    assert times == sorted(times)
    for p in packets:
        assert Ether in p and TCP in p
        ip = p[IP] if IP in p else p[IPv6]
        # Zeek ignores TCP segments with bad checksums: recompute and compare.
        tcp = p[TCP]
        rebuilt = type(ip)(bytes(ip))
        del rebuilt[TCP].chksum
        if IP in p:
            del rebuilt.chksum
        rebuilt = type(ip)(bytes(rebuilt))
        assert tcp.chksum == rebuilt[TCP].chksum
        if IP in p:
            assert ip.chksum == rebuilt.chksum
    syns = [p for p in packets if p[TCP].flags == "S"]
    by_src = {(p[IP].src if IP in p else p[IPv6].src): p for p in syns}
    # Frame sizes the handshakes baseline prints (frame=...).
    assert len(bytes(by_src["203.0.113.10"])) == 74
    assert len(bytes(by_src["203.0.113.12"])) == 60  # option-less SYN, padded to Ethernet's minimum
    assert len(bytes(by_src["2001:db8::10"])) == 94
    assert len(bytes(by_src["203.0.113.14"])) == 78 and by_src["203.0.113.14"][Dot1Q].vlan == 42
    opts = [name for name, _ in by_src["203.0.113.10"][TCP].options]
    assert opts == ["MSS", "SAckOK", "Timestamp", "NOP", "WScale"]
    assert by_src["203.0.113.12"][TCP].options == []


def test_the_trace_cases_match_the_baseline_timings() -> None:
    mk = _mkpcap()
    cases = {(c.name, c.sport): c for c in mk.CASES}
    direct = cases[("direct", 40001)].segments
    assert round((direct[2].t - direct[1].t) * 1e6) == 20_000
    karn = cases[("karn", 40002)].segments
    assert [s.flags for s in karn] == ["S", "SA", "SA", "A"]
    rst = cases[("rst", 40003)].segments
    assert rst[-1].flags == "R" and round((rst[-1].t - rst[1].t) * 1e6) == 30_000


def _baseline_handshakes() -> dict[tuple[str, int], dict[str, str]]:
    lines = (BTEST / "Baseline" / "tests.handshakes" / "output").read_text().splitlines()[1:]
    out: dict[tuple[str, int], dict[str, str]] = {}
    for head, tail in zip(lines[::2], lines[1::2], strict=True):
        words = head.split()
        fields = dict(w.split("=", 1) for w in words[5:] + tail.split())
        out[(words[0], int(words[1]))] = fields | {"dst": words[3], "dport": words[4]}
    return out


def test_the_handshakes_baseline_agrees_with_the_capture_path(tmp_path: Path) -> None:
    """The Zeek scripts implement the capture path's rules (analyzer/tracker.py); the baseline,
    written by reasoning about the scripts, must say what the tracker says on the same trace."""
    import ipaddress

    from analyzer.packet import ip_from_frame
    from analyzer.tracker import HandshakeTracker

    mk = _mkpcap()
    darknets = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8:ffff::/48")]
    tracker = HandshakeTracker(darknets, idle_timeout=2.0)
    found = []
    for t, frame in mk.packets():
        found += tracker.packet_at(t, ip_from_frame(1, frame))
    found += tracker.flush()
    expected = _baseline_handshakes()
    assert {(h.src, h.sport) for h in found} == set(expected)
    for h in found:
        want = expected[(h.src, h.sport)]
        assert (h.dst, str(h.dport)) == (want["dst"], want["dport"])
        assert (h.reply or "none") == want["reply"]
        assert (f"{h.tp_us / 1e6:.6f}" if h.tp_us is not None else "-") == want["tp"]
        assert f"{len(h.synack_times)}/{len(h.synack_times)}" == want["synacks"]
        assert f"{h.t:.6f}" == want["syn"]
        assert (f"{h.reply_time:.6f}" if h.reply_time is not None else "-") == want["reply_at"]
        # The SYN Zeek sends is the frame of the timed SYN; the tracker keeps its IP packet.
        timed = [s for c in mk.CASES for s in c.segments if s.flags == "S" and abs(s.t - h.t) < 1e-9]
        assert len(timed) == 1 and h.syn == timed[0].ip()
        assert len(timed[0].frame()) == int(want["frame"])


@pytest.mark.parametrize(
    ("trace", "source"),
    [("handshakes.pcap", "zeek-ws/handshakes.pcap"), ("vnc-scanner.pcap", "captures/vnc-scanner.pcap")],
)
def test_the_btest_traces_are_the_repositorys_captures(trace: str, source: str) -> None:
    # zkg runs the btests from its clone with only tests/btest, hence copies; they must not drift.
    data = Path(__file__).resolve().parent / "data"
    assert (BTEST / "Traces" / trace).read_bytes() == (data / source).read_bytes()
    if trace == "vnc-scanner.pcap":
        licence = (BTEST / "Traces" / "COPYING.vnc-scanner").read_bytes()
        assert licence == (data / "captures" / "COPYING.vnc-scanner").read_bytes()
