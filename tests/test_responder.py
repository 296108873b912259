"""The responder in a network namespace: a client elsewhere connects to darknet addresses and
ports; each handshake appears on the Redis stream with the right destination, the client's real
SYN and the kernel's RTT sample; nothing is left behind when it stops."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP

from analyzer.handshake import Handshake
from lab.delay import Link
from lab.netns import Namespace, Network
from lab.process import wait_for
from lab.redis import RedisServer
from responder.listener import restore_destination

DARKNET = "198.18.0.0/24"
TARGETS = [("198.18.0.5", 80), ("198.18.0.77", 22), ("198.18.0.200", 4444), ("198.18.0.5", 65000)]

CLIENT = """
import json, socket, sys
out = []
for spec in sys.argv[1:]:
    addr, port = spec.rsplit(":", 1)
    s = socket.create_connection((addr, int(port)), 5)
    out.append([addr, int(port), s.getsockname()[1]])
    s.close()
print(json.dumps(out))
"""


def _table(ns: Namespace) -> str:
    return ns.run("nft", "list", "tables", check=False)


def _local_routes(ns: Namespace) -> str:
    return ns.run("ip", "route", "show", "table", "local", check=False)


@pytest.fixture
def pair(net: Network) -> Iterator[tuple[Namespace, Namespace]]:
    sensor, client = net.add("sn"), net.add("cl")
    net.link(sensor, "198.19.0.1/24", client, "198.19.0.2/24")
    client.run("ip", "route", "add", DARKNET, "via", "198.19.0.1")
    yield sensor, client


def _start(sensor: Namespace, url: str | None, stdout: Any = subprocess.PIPE, extra: tuple[str, ...] = ()
           ) -> subprocess.Popen[bytes]:
    args = ["-m", "responder.cli", "run", "--darknet", DARKNET, *extra]
    if url:
        args += ["--redis", url]
    proc = sensor.python(*args, stdout=stdout, stderr=subprocess.PIPE)
    wait_for(lambda: "stepstone_responder" in _table(sensor) and "198.18.0.0/24" in _local_routes(sensor),
             15, "the responder's table and route",
             alive=lambda: None if proc.poll() is None else f"responder exited {proc.returncode}")
    return proc


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=15)
    return proc.returncode, err.decode()


@pytest.mark.netns
def test_handshakes_reach_redis_with_destination_syn_and_rtt(
    pair: tuple[Namespace, Namespace], redis_server: RedisServer
) -> None:
    sensor, client = pair
    proc = _start(sensor, redis_server.url)
    try:
        made = json.loads(client.run(sys.executable, "-c", CLIENT, *(f"{a}:{p}" for a, p in TARGETS)))
        r = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
        wait_for(lambda: r.xlen("stepstone:handshakes") >= len(TARGETS), 10, "handshakes on the stream")
        entries: list[tuple[str, dict[str, str]]] = r.xrange("stepstone:handshakes")  # type: ignore[assignment]
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert len(entries) == len(TARGETS)
    got = {(h.dst, h.dport, h.sport): h for h in (Handshake.from_fields(f) for _, f in entries)}
    for addr, port, sport in made:
        h = got[(addr, port, sport)]
        assert h.src == "198.19.0.2" and h.feed == "responder" and h.reply == "ack"
        assert h.tp_us is not None and 0 < h.tp_us < 50_000
        assert h.syn is not None
        pkt = IP(h.syn)
        # The SYN as the client sent it: the redirect's rewrite is undone, checksums are valid.
        assert pkt.src == "198.19.0.2" and pkt.dst == addr
        assert pkt[TCP].dport == port and pkt[TCP].sport == sport and pkt[TCP].flags == "S"
        assert pkt[TCP].options and pkt[TCP].options[0][0] == "MSS"
        ip_sum, tcp_sum = pkt.chksum, pkt[TCP].chksum
        del pkt.chksum, pkt[TCP].chksum
        fresh = IP(bytes(pkt))
        assert (fresh.chksum, fresh[TCP].chksum) == (ip_sum, tcp_sum)
    assert "stepstone_responder" not in _table(sensor)
    assert "198.18.0.0/24" not in _local_routes(sensor)


SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""


@pytest.mark.netns
def test_metrics_endpoint_counts_the_handshakes(
    pair: tuple[Namespace, Namespace], redis_server: RedisServer
) -> None:
    """--metrics-port: Prometheus scrapes the sensor from elsewhere (here: the client's namespace)."""
    sensor, client = pair
    proc = _start(sensor, redis_server.url, extra=("--metrics-port", "9310", "--metrics-addr", "198.19.0.1"))
    try:
        client.run(sys.executable, "-c", CLIENT, *(f"{a}:{p}" for a, p in TARGETS[:2]))
        r = redis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
        wait_for(lambda: r.xlen("stepstone:handshakes") >= 2, 10, "handshakes on the stream")
        text = client.run(sys.executable, "-c", SCRAPE, "http://198.19.0.1:9310/metrics")
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert got["stepstone_responder_handshakes_total"] == 2
    assert got["stepstone_responder_reported_total"] == 2
    assert got["stepstone_responder_dropped_total"] == 0 and got["stepstone_responder_backlog"] == 0
    assert got["stepstone_responder_errors_total"] == 0


@pytest.mark.netns
def test_sigint_and_stale_table_are_handled(pair: tuple[Namespace, Namespace]) -> None:
    sensor, client = pair
    # What a run killed with -9 leaves: the responder must take it over, not fail.
    sensor.run("nft", "-f", "-", input="table inet stepstone_responder {\n chain stale { }\n}\n")
    proc = _start(sensor, None)  # no Redis: JSON lines on stdout
    try:
        client.run(sys.executable, "-c", CLIENT, "198.18.0.9:443")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert [(x["dst"], x["dport"]) for x in lines] == [("198.18.0.9", 443)]
    assert "stepstone_responder" not in _table(sensor)
    assert "198.18.0.0/24" not in _local_routes(sensor)


@contextlib.contextmanager
def delayed_pair(net: Network, one_way_ms: float) -> Iterator[tuple[Namespace, Namespace]]:
    """A sensor and a client joined through the lab's userspace delay line (`one_way_ms` each
    way), the client routing the darknet to the sensor."""
    sensor, client = net.add("sn"), net.add("cl")
    link = Link(sensor.name, "ts", client.name, "tc", one_way_ms, one_way_ms)
    delay = subprocess.Popen([sys.executable, "-m", "lab.delay", link.to_json()], stdout=subprocess.PIPE)
    try:
        assert delay.stdout is not None and delay.stdout.readline() == b"ready\n"
        for ns, ifname, addr in ((sensor, "ts", "198.19.0.1/24"), (client, "tc", "198.19.0.2/24")):
            ns.run("ip", "addr", "add", addr, "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")
        client.run("ip", "route", "add", DARKNET, "via", "198.19.0.1")
        yield sensor, client
    finally:
        delay.terminate()
        delay.wait(10)


@pytest.mark.netns
def test_tp_us_is_the_path_rtt(net: Network, tmp_path: Path) -> None:
    """T^p from TCP_INFO follows the path: 2 x 15 ms through a delay line."""
    with delayed_pair(net, 15) as (sensor, client):
        out = tmp_path / "handshakes.jsonl"
        with out.open("wb") as sink:
            proc = _start(sensor, None, stdout=sink)
        try:
            client.run(sys.executable, "-c", CLIENT, "198.18.0.1:80", "198.18.0.2:80", "198.18.0.3:80")
            # The client is done when its ACK leaves; the responder sees it 15 ms later.
            wait_for(lambda: len(out.read_text().splitlines()) >= 3, 10, "three handshakes")
        finally:
            _stop(proc)
    rtts = [json.loads(x)["tp_us"] for x in out.read_text().splitlines()]
    assert len(rtts) == 3
    assert all(30_000 <= rtt < 34_000 for rtt in rtts), rtts


def test_restore_destination_rewrites_address_port_and_checksums() -> None:
    sent = IP(src="192.0.2.1", dst="203.0.113.9") / TCP(sport=1234, dport=80, flags="S",
                                                        options=[("MSS", 1460)])
    redirected = IP(bytes(sent))
    redirected.dst, redirected[TCP].dport = "198.19.0.1", 4
    del redirected.chksum, redirected[TCP].chksum
    assert restore_destination(bytes(redirected), "203.0.113.9", 80) == bytes(sent)


@pytest.mark.netns
def test_ipv6_darknet(net: Network, tmp_path: Path) -> None:
    sensor, client = net.add("sn"), net.add("cl")
    net.link(sensor, "2001:db8:1::1/64", client, "2001:db8:1::2/64")
    client.run("ip", "-6", "route", "add", "2001:db8:ff::/64", "via", "2001:db8:1::1")
    out = tmp_path / "handshakes.jsonl"
    with out.open("wb") as sink:
        proc = sensor.python("-m", "responder.cli", "run", "--darknet", "2001:db8:ff::/64", stdout=sink,
                             stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "2001:db8:ff::/64" in sensor.run("ip", "-6", "route", "show", "table", "local"), 15,
                 "the IPv6 local route", alive=lambda: None if proc.poll() is None else "responder exited")
        made = json.loads(client.run(sys.executable, "-c", CLIENT.replace("create_connection((addr",
                                                                          "create_connection((addr.strip('[]')"),
                                     "[2001:db8:ff::7]:8080"))
        wait_for(lambda: out.read_text().strip(), 10, "the handshake")
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    expected = ("2001:db8:1::2", "2001:db8:ff::7", 8080, made[0][2])
    assert (line["src"], line["dst"], line["dport"], line["sport"]) == expected
    syn = base64.b64decode(line["syn"])
    assert syn[0] >> 4 == 6 and syn[24:40] == ipaddress.IPv6Address("2001:db8:ff::7").packed
    assert "2001:db8:ff::" not in sensor.run("ip", "-6", "route", "show", "table", "local")


@pytest.mark.parametrize(("args", "message"), [
    (["--darknet", "198.18.0.0/24", "--redis", "http://x"], "--redis"),
    (["--darknet", "nonsense"], "not an address prefix"),
    (["--darknet", "198.18.0.0/24", "--listen-port", "70000"], "not a TCP port"),
])
def test_bad_arguments_are_one_clear_line(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "responder.cli", "run", *args], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_run_help_says_what_it_changes_and_that_it_needs_root() -> None:
    out = subprocess.run([sys.executable, "-m", "responder.cli", "run", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("root", "route", "nftables", "stepstone_responder", "removed", "stepstone:handshakes"):
        assert word in out, word


DROP_FIRST_SYNACK = """table inet drop_first_synack {
    set seen { type ipv4_addr . inet_service . inet_service; flags dynamic; timeout 1m; }
    chain input {
        type filter hook input priority filter; policy accept;
        tcp flags & (syn | ack) == syn | ack ip saddr . tcp sport . tcp dport @seen accept
        tcp flags & (syn | ack) == syn | ack add @seen { ip saddr . tcp sport . tcp dport } drop
    }
}
"""


@pytest.mark.netns
def test_retransmitted_synack_drops_the_timing(pair: tuple[Namespace, Namespace], tmp_path: Path) -> None:
    """Karn's rule: when the first SYN+ACK is lost, the connection counts but its T^p is unknown."""
    sensor, client = pair
    client.run("nft", "-f", "-", input=DROP_FIRST_SYNACK)
    out = tmp_path / "handshakes.jsonl"
    with out.open("wb") as sink:
        proc = _start(sensor, None, stdout=sink)
    try:
        client.run(sys.executable, "-c", CLIENT, "198.18.0.3:80")
        wait_for(lambda: out.read_text().strip(), 10, "the handshake")
    finally:
        _stop(proc)
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["dst"] == "198.18.0.3" and line["reply"] == "ack"
    assert line["tp_us"] is None


@pytest.mark.netns
def test_handshakes_redis_never_took_are_counted_at_exit(
        pair: tuple[Namespace, Namespace], tmp_path: Path) -> None:
    """Redis unreachable the whole run (a socket nobody listens on): the handshakes held for it are
    not lost silently; the exit line says how many were never written."""
    sensor, client = pair
    proc = _start(sensor, f"unix://{tmp_path / 'nobody.sock'}")
    try:
        # Completed by the kernel before the stop: the responder reports them as it stops.
        client.run(sys.executable, "-c", CLIENT, *(f"{a}:{p}" for a, p in TARGETS[:2]))
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert "0 handshakes reported, 0 dropped, 2 not written (Redis did not take them in time)" in err, err
