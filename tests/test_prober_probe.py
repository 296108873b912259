"""Real probes in network namespaces: `stepstone-prober probe` run inside a prober namespace
against targets in others (open and closed ports, a host that drops ICMP, a silent host, IPv6, and
an echo responder that answers after a known delay)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.netns import Namespace, Network, unavailable_reason

pytestmark = pytest.mark.netns

DELAY_MS = 20
OPEN_PORT = 8080

# Answers ICMP echo requests DELAY ms late from a raw socket; the namespace's kernel itself
# ignores echoes (net.ipv4.icmp_echo_ignore_all=1), so this is the only answer.
DELAYED_ECHO = r"""
import asyncio, socket, struct, sys
delay = float(sys.argv[1]) / 1000
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.setblocking(False)

def csum(data):
    if len(data) % 2: data += b"\0"
    s = sum(struct.unpack(f"!{len(data)//2}H", data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def reply(icmp, addr):
    body = b"\0\0\0\0" + icmp[4:]
    sock.sendto(body[:2] + struct.pack("!H", csum(body)) + body[4:], (addr, 0))

def readable():
    while True:
        try:
            data, (addr, _) = sock.recvfrom(2048)
        except BlockingIOError:
            return
        icmp = data[(data[0] & 15) * 4:]
        if icmp and icmp[0] == 8:
            loop.call_later(delay, reply, icmp, addr)

loop = asyncio.new_event_loop()
loop.add_reader(sock.fileno(), readable)
print("ready", flush=True)
loop.run_forever()
"""


@dataclass
class Lab:
    prober: Namespace
    audit: Path
    procs: list[subprocess.Popen[bytes]]

    def probe(self, address: str, *extra: str, check: bool = True) -> dict[str, object]:
        out = self.prober.run(
            sys.executable, "-m", "prober.cli", "probe", address, "--allow", "10.61.0.0/16",
            "--allow", "fd61::/64", "--audit-log", str(self.audit), "--ports", f"22,{OPEN_PORT},443",
            "--interval", "0.02", "--reply-wait", "0.5", *extra, check=check)
        return json.loads(out)


def wait_until(check: object, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Network() as net:
        p, t, d = net.add("p"), net.add("t"), net.add("d")
        _, t_if = net.link(p, "10.61.1.1/24", t, "10.61.1.2/24")
        for host in (3, 4):
            t.run("ip", "addr", "add", f"10.61.1.{host}/24", "dev", t_if)
        t.run("ip", "-6", "addr", "add", "fd61::2/64", "dev", t_if, "nodad")
        p.run("ip", "-6", "addr", "add", "fd61::1/64", "dev", _, "nodad")
        net.link(p, "10.61.2.1/24", d, "10.61.2.2/24")
        # .3 drops ICMP echo; .4 answers nothing at all.
        t.run("nft", "-f", "-", input="""
            table inet probe_test {
              chain input {
                type filter hook input priority 0;
                ip daddr 10.61.1.3 icmp type echo-request drop
                ip daddr 10.61.1.4 drop
              }
            }""")
        d.sysctl("net.ipv4.icmp_echo_ignore_all", 1)
        procs = [
            t.popen("socat", f"TCP6-LISTEN:{OPEN_PORT},ipv6only=0,reuseaddr,fork", "SYSTEM:true",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            d.python("-c", DELAYED_ECHO, str(DELAY_MS), stdout=subprocess.PIPE),
        ]
        try:
            assert procs[1].stdout is not None and procs[1].stdout.readline().strip() == b"ready"
            wait_until(lambda: f":{OPEN_PORT}" in t.run("ss", "-Hltn"))
            for addr in ("10.61.1.2", "fd61::2"):  # links up, neighbours resolved
                wait_until(lambda a=addr: " 0% packet loss" in p.run("ping", "-c1", "-W1", a, check=False))
            yield Lab(prober=p, audit=tmp_path_factory.mktemp("audit") / "audit.jsonl", procs=procs)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


def test_open_port_fingerprinted_closed_ports_rst(lab: Lab) -> None:
    r = lab.probe("10.61.1.2")
    assert r["src"] == "10.61.1.2" and r["job"] == "cli"
    assert r["ping_loss"] == 0.0 and r["ping_sent"] == 5 and len(r["ping_rtts_us"]) == 5  # type: ignore[arg-type]
    assert 0 < r["ping_min_us"] <= r["ping_avg_us"] <= r["ping_max_us"] < 100_000  # type: ignore[operator]
    assert r["ports_open"] == [OPEN_PORT] and sorted(r["ports_closed"]) == [22, 443]  # type: ignore[arg-type]
    assert r["fa_port"] == OPEN_PORT
    assert 0 < r["syn_rtt_us"] < 100_000  # type: ignore[operator]
    fp = r["fa_fingerprint"]
    assert isinstance(fp, dict)
    # This kernel answered a Linux-shaped SYN with its own options, so p0f has something to read...
    assert fp["sig"].startswith("4:64+0:0:1460:") and ":mss,sok,ts,nop,ws:df" in fp["sig"]
    # ...and the project's database names it Linux.
    assert r["fa"] is not None and r["fa"].startswith("unix:Linux:"), fp  # type: ignore[union-attr]


def test_host_dropping_icmp_still_answers_syn(lab: Lab) -> None:
    r = lab.probe("10.61.1.3")
    assert r["ping_loss"] == 1.0
    assert r["ping_min_us"] is None and r["ping_avg_us"] is None and r["ping_var_us2"] is None
    # The listener is bound to every address of the host: TCP still gets through.
    assert r["ports_open"] == [OPEN_PORT] and r["fa_port"] == OPEN_PORT
    assert r["syn_rtt_us"] is not None and r["fa"] is not None


def test_silent_host_gives_nothing(lab: Lab) -> None:
    start = time.monotonic()
    r = lab.probe("10.61.1.4")
    assert r["ping_loss"] == 1.0 and r["ping_rtts_us"] == []
    assert r["ports_open"] == [] and r["ports_closed"] == []
    assert r["syn_rtt_us"] is None and r["fa"] is None
    assert time.monotonic() - start < 10  # gave up after the reply wait, did not hang


def test_statistics_against_known_delay(lab: Lab) -> None:
    r = lab.probe("10.61.2.2", "--count", "8", "--ports", "22")
    rtts = r["ping_rtts_us"]
    assert isinstance(rtts, list) and len(rtts) == 8 and r["ping_loss"] == 0.0
    floor = DELAY_MS * 1000
    # Every sample carries the responder's delay; its userspace timer on a loaded 2-core machine
    # may add some ms, never remove any.
    assert all(floor <= x < floor + 40_000 for x in rtts), rtts
    assert r["ping_min_us"] == min(rtts) and r["ping_max_us"] == max(rtts)
    assert abs(r["ping_avg_us"] - sum(rtts) / 8) <= 1  # type: ignore[operator]
    mean = sum(rtts) / 8
    var = sum((x - mean) ** 2 for x in rtts) / 8
    assert r["ping_var_us2"] == pytest.approx(var, rel=0.01, abs=50)
    assert r["ping_var_us2"] < 20_000 ** 2  # type: ignore[operator]


def test_ipv6_target(lab: Lab) -> None:
    r = lab.probe("fd61::2")
    assert r["ping_loss"] == 0.0 and r["ports_open"] == [OPEN_PORT]
    assert r["syn_rtt_us"] is not None and r["fa_fingerprint"]["sig"].startswith("6:")  # type: ignore[index]


def test_refusals_are_audited_and_probes_logged(lab: Lab) -> None:
    proc = lab.prober.run(sys.executable, "-m", "prober.cli", "probe", "10.61.1.2", "--audit-log",
                          str(lab.audit), check=False)
    assert proc == ""  # refused: nothing on stdout (the reason is on stderr, exit 2)
    excluded = subprocess.run(
        ["ip", "netns", "exec", lab.prober.name, sys.executable, "-m", "prober.cli", "probe", "10.61.1.2",
         "--allow", "10.61.0.0/16", "--exclude", "10.61.1.0/24", "--audit-log", str(lab.audit)],
        capture_output=True, text=True, check=False)
    assert excluded.returncode == 2 and "excluded by --exclude 10.61.1.0/24" in excluded.stderr
    assert excluded.stdout == "" and "Traceback" not in excluded.stderr
    events = [json.loads(line) for line in lab.audit.read_text().splitlines()]
    refused = [e for e in events if e["event"] == "refused"]
    assert [e["target"] for e in refused[-2:]] == ["10.61.1.2", "10.61.1.2"]
    assert "private-use" in refused[-2]["reason"] and "excluded" in refused[-1]["reason"]
    probes = [e for e in events if e["event"] == "probe"]
    assert probes and all({"ts", "worker", "host", "target", "ports", "echo_count", "job"} <= set(e)
                          for e in probes)


# Opens the prober's filtered capture socket, then makes one full connection (SYN+ACK, then the
# peer's data-less FIN) and one refused connection (RST), and prints the TCP flags that got through.
FILTER_CHECK = r"""
import socket, sys
from prober.syn import ETH_P_ALL, _TCP_IN, attach_filter
cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
attach_filter(cap, _TCP_IN)
cap.setblocking(False)
host, open_port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, open_port), timeout=5) as c:
    while c.recv(100):
        pass
try:
    socket.create_connection((host, 1), timeout=5)
except ConnectionRefusedError:
    pass
flags = []
while True:
    try:
        data = cap.recv(2048)
    except BlockingIOError:
        break
    off = (data[0] & 15) * 4 if data[0] >> 4 == 4 else 40
    flags.append(data[off + 13])
print(flags)
"""


def test_capture_filter_passes_only_synack_and_rst(lab: Lab) -> None:
    out = lab.prober.run(sys.executable, "-c", FILTER_CHECK, "10.61.1.2", str(OPEN_PORT))
    # SYN+ACK (0x12) and RST+ACK (0x14) only: no FIN, no data, no pure ACK, none of our own packets.
    assert json.loads(out) == [0x12, 0x14]
