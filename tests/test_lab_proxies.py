"""Issue 10's terminating proxies in the lab (lab/scenarios-proxies.toml): the file parses with the
truth each host should get, the server-first client and its SOCKS5 handshake work against a real
microsocks on loopback, and one reduced lab run (responder with banners, analyzer, prober, real
socat and microsocks in namespaces) finds the socat proxy at +50 ms as `terminating` and leaves the
direct SSH client alone. The full set and its numbers: bench/lab_bench.py and docs/lab.md."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import report
from lab.demo import Lab, install_missing, preflight
from lab.netns import unavailable_reason
from lab.process import LabError, wait_for
from lab.report import RELAY_KINDS, Source
from lab.scenarios import CLIENT_PORTS, Host, ScenarioError, load, parse
from lab.traffic import CLIENT_LINES, _connect, socks5_request

PROXIES = Path(__file__).resolve().parents[1] / "lab" / "scenarios-proxies.toml"
RELAYS = PROXIES.with_name("scenarios-relays.toml")


def test_proxy_scenarios_parse_with_their_truth() -> None:
    sc = load(PROXIES)
    proxies = [h for h in sc.hosts if h.kind in ("socat", "socks")]
    assert {h.kind for h in proxies} == {"socat", "socks"}
    assert all(h.truth == "terminating" and h.behind and h.client in CLIENT_PORTS for h in proxies)
    for kind in ("socat", "socks"):  # each proxy at +5, +20 and +50 ms
        assert {5, 20, 50} <= {h.extra_delay_ms for h in proxies if h.kind == kind}
    assert {h.client for h in proxies} == {"ssh", "smtp"}
    direct = [h for h in sc.hosts if h.kind == "direct"]
    assert all(h.truth == "direct" and h.client for h in direct)
    assert any(h.client_think_ms >= 100 for h in direct) and any(h.client_think_ms == 0 for h in direct)
    # The bench plays the three files together in one lab.
    assert len(sc.hosts) + len(load().hosts) + len(load(RELAYS).hosts) <= 40


@pytest.mark.parametrize(("text", "message"), [
    ("[[host]]\nclient = 'telnet'\n", "client must be one of ssh, smtp"),
    ("[[host]]\nkind = 'scanner'\nclient = 'ssh'\n", "not on a scanner or home NAT"),
    ("[[host]]\nclient_think_ms = 20\n", "client_think_ms only with a client"),
    ("[[host]]\nclient = 'ssh'\nclient_think_ms = -1\n", "within 0..10000"),
    ("[[host]]\nkind = 'socks5'\n", "kind must be one of"),
])
def test_bad_client_fields_are_refused(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse(text, "x.toml")


def test_socks5_request_is_rfc1928_connect() -> None:
    assert socks5_request("198.18.0.7", 25) == bytes([5, 1, 0, 1, 198, 18, 0, 7, 0, 25])


def _verdict(src: str, kind: str, app_ms: float, tapp_ms: float) -> dict[str, object]:
    return {"src": src, "t": 1.0, "verdict_at": 1.5, "tapp_us": int(tapp_ms * 1000), "ping_max_us": 20_000,
            "verdict": {"relay": False, "relay_confident": kind == "terminating", "kind": kind,
                        "cond_os": False, "cond_timing": False, "cond_app": kind == "terminating",
                        "app_margin": app_ms * 1000, "app_samples": 5,
                        "evidence": [{"test": "app"}] if kind == "terminating" else []}}


def test_report_scores_terminating_relays_per_class_and_rule() -> None:
    hosts = [
        Source("198.19.1.2", Host("socat 50", "socat", "linux", 20, attacker_persona="linux",
                                  extra_delay_ms=50, client="ssh")),
        Source("198.19.2.2", Host("socks 5", "socks", "linux", 20, attacker_persona="linux",
                                  extra_delay_ms=5, client="smtp")),
        Source("198.19.3.2", Host("slow", "direct", "linux", 20, client="ssh", client_think_ms=150)),
        Source("198.19.4.2", Host("fast", "direct", "linux", 20, client="ssh")),
    ]
    records = [_verdict("198.19.1.2", "terminating", 100, 120), _verdict("198.19.2.2", "none", 9, 29),
               _verdict("198.19.3.2", "terminating", 150, 170), _verdict("198.19.4.2", "none", 0.1, 20.1)]
    notices = [{"note": "StepStone::Relay_Detected", "src": "198.19.1.2"},
               {"note": "StepStone::Relay_Detected", "src": "198.19.3.2"}]
    out = report.build(256, hosts, [{"src": s.addr, "answered": True} for s in hosts], records,
                       notices=notices)
    by_class = out["truth_by_class"]
    assert list(by_class) == ["terminating", "direct"]
    assert set(by_class["direct"]) == {"paper", "confident", "kind", "notice"}
    assert by_class["terminating"]["kind"] == {"tp": 1, "fp": 0, "tn": 0, "fn": 1, "precision": 1.0,
                                               "recall": 0.5}
    assert by_class["terminating"]["paper"]["fn"] == 2  # the paper's rule cannot see them
    assert by_class["direct"]["notice"] == {"tp": 0, "fp": 1, "tn": 1, "fn": 0, "precision": 0.0,
                                            "recall": None}
    assert out["class_right"] == {"terminating": {"right": 1, "of": 2}, "direct": {"right": 1, "of": 2}}
    by = {h["scenario"]: h for h in out["hosts"]}
    assert by["socat 50"]["truth"] == "terminating" and by["socat 50"]["class"] == "terminating"
    assert by["slow"]["client_think_ms"] == 150 and by["fast"]["extra_delay_ms"] is None
    notes = "\n".join(out["notes"])
    assert "socks 5: terminating relay not found, below the goal (extra delay < 20 ms)" in notes
    assert "app margin 9.0 ms over 5 samples, tapp [29.0] ms, ping max [20.0] ms" in notes
    assert "slow: FALSE POSITIVE by kind terminating (evidence ['app']" in notes
    assert "app margin 150.0 ms over 5, tapp [170.0] ms" in notes
    text = report.render(out)
    assert "1/2 terminating" in text and "terminating  100.0 ms" in text
    assert "socat 50: the paper's rule says not a relay, the confident rule relay (application RTT margin " \
           "100.0 ms over 5 samples)" in notes


# -- the client against real servers on loopback ---------------------------------------------------

BANNER = b"220 mail.example.net ESMTP Postfix (Debian/GNU)\r\n"


class BannerServer:
    """A server-first server on loopback: sends BANNER, reads one line, records it and when it came."""

    def __init__(self) -> None:
        self.lines: list[tuple[bytes, float]] = []  # (line, seconds from banner sent to line read)
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await writer.drain()
        sent = time.monotonic()
        line = await reader.readline()
        self.lines.append((line, time.monotonic() - sent))
        writer.close()


@pytest.fixture
def microsocks() -> Iterator[int]:
    """A real microsocks on a free loopback port (installed as the lab does; skips if it cannot be)."""
    try:
        install_missing([("microsocks", "microsocks")])
    except LabError as exc:
        pytest.skip(str(exc))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["microsocks", "-i", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(0.2)
                s.connect(("127.0.0.1", port))
                return True
            return False

        wait_for(listening, 10, "microsocks listening", alive=lambda: None if proc.poll() is None
                 else f"microsocks exited {proc.returncode}")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_client_answers_the_banner_through_socks_after_its_think_time(microsocks: int) -> None:
    async def main() -> tuple[dict[str, object], BannerServer]:
        server = BannerServer()
        port = await server.start()
        try:
            line = await _connect("127.0.0.1", port, 5.0, client="smtp", think_s=0.1,
                                  socks=("127.0.0.1", microsocks))
        finally:
            assert server.server is not None
            server.server.close()
        return line, server

    line, server = asyncio.run(main())
    assert line["ok"] and line["banner"] and line["answered"], line
    assert "error" not in line, line
    assert len(server.lines) == 1
    got, after = server.lines[0]
    assert got == CLIENT_LINES["smtp"]
    assert 0.1 <= after < 1.0  # the think time, and not much more on loopback


def test_client_without_a_banner_sends_nothing() -> None:
    async def main() -> tuple[dict[str, object], list[bytes]]:
        received: list[bytes] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()  # closes at once, as the responder without --banners does
            received.append(await reader.read(100))

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            line = await _connect("127.0.0.1", port, 5.0, client="ssh")
        finally:
            server.close()
        return line, received

    line, received = asyncio.run(main())
    assert line["ok"] and line["banner"] is False and line["answered"] is False, line
    assert received == [b""]


# -- one reduced lab run -------------------------------------------------------------------------

# Five connections 2.4 s apart and a 1 s dedup window (as tests/test_e2e.py): each handshake gets
# its own probe, so the proxy has five tapp - T^a samples.
SMALL = """
[lab]
connections = 5
traffic_s = 12
settle_s = 30

[[host]]
name = "socat ssh +50ms"
kind = "socat"
persona = "linux"
client = "ssh"
rtt_ms = 20
extra_delay_ms = 50

[[host]]
name = "socks smtp +50ms"
kind = "socks"
persona = "windows"
client = "smtp"
rtt_ms = 30
extra_delay_ms = 50

[[host]]
name = "direct ssh client"
kind = "direct"
persona = "linux"
client = "ssh"
rtt_ms = 20
"""


@pytest.mark.netns
def test_socat_proxy_is_terminating_and_the_direct_client_is_not() -> None:
    if reason := unavailable_reason():
        pytest.skip(reason)
    sc = parse(SMALL, "small proxies")
    try:
        preflight(sc)
    except LabError as exc:
        if "proxy scenarios need" in str(exc):  # socat/microsocks missing and apt could not install them
            pytest.skip(str(exc))
        raise
    lab = Lab(sc, dedup_window=1.0)
    try:
        lab.build()
        lab.start_services()
        lab.start_traffic()
        assert lab.wait_verdicts(sc.traffic_s + sc.settle_s), f"without verdict: {lab.pending_verdicts()}"
        handshakes = lab.handshakes()
        report = lab.report()
    finally:
        lab.close()
    hosts = {h["scenario"]: h for h in report["hosts"]}
    by_src: dict[str, list[dict[str, Any]]] = {}
    for entry in handshakes:
        by_src.setdefault(entry["src"], []).append(entry)
    for name, h in hosts.items():
        assert h["evidence"]["connections_ok"] == 5 and h["evidence"]["records"] == 5, h
        # The responder's banner reached every client (through the proxies too), and the client's
        # answer came back to the responder: its first bytes are the client's line.
        client = h["client"]
        for entry in by_src[h["src"]]:
            assert entry.get("tapp_us") is not None, (name, entry)
            assert base64.b64decode(entry["app_data"]) == CLIENT_LINES[client], (name, entry)
    socat, direct = hosts["socat ssh +50ms"], hosts["direct ssh client"]
    # tapp - T^a: the proxy's attacker leg twice (100 ms), the direct client's own processing only.
    assert 80 < _app_minus_ping_ms(socat) < 140, socat["evidence"]
    assert abs(_app_minus_ping_ms(direct)) < 20, direct["evidence"]
    assert socat["verdict_kind"] == "terminating", socat["evidence"]["verdict"]
    assert socat["evidence"]["verdict"]["cond_app"] is True
    assert hosts["socks smtp +50ms"]["verdict_kind"] == "terminating", hosts["socks smtp +50ms"]["evidence"]
    assert direct["verdict_kind"] not in RELAY_KINDS, direct["evidence"]["verdict"]
    assert direct["evidence"]["verdict"]["cond_app"] is False
    assert report["truth_by_class"]["terminating"]["kind"]["tp"] == 2
    assert report["truth_by_class"]["direct"]["kind"]["fp"] == 0


def _app_minus_ping_ms(host: dict[str, Any]) -> float:
    ev = host["evidence"]
    return statistics.median((t - p) / 1000 for t, p in zip(ev["tapp_us"], ev["ping_max_us"], strict=True)
                             if t is not None and p is not None)
