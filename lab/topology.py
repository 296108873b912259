"""The virtual Internet: a router, the darknet sensor, the prober host, and one namespace per
scenario host (plus the attacker behind each relay), joined by delay lines.

Addresses (all in benchmarking space 198.18.0.0/15, so the prober runs with --allow 198.18.0.0/15):
  darknet           198.18.0.0/24 (configurable), routed to the sensor
  sensor link       198.19.250.0/24   router .1, sensor .2   (veth, no delay)
  prober link       198.19.251.0/24   router .1, prober .2   (veth, no delay)
  host i link       198.19.i.0/24     router .1, host .2     (delay line: rtt/2 each way + jitter)
  attacker leg i    10.i.0.0/24       relay .1, attacker .2  (delay line: extra_delay_ms each way)
  home NAT i        10.i.1.0/24       router .1, second machine .2 (veth, no delay)
  route change i    100.64.i.0/24     host .2, extra router .1; 100.65.i.0/24 extra router .2,
                                      router .1 (veths): the detour, one more router hop
The sensor and the prober sit side by side, so a probe crosses the same path a handshake did.

Hops: every router namespace forwards with the kernel, which decrements the TTL. A host's packets
cross one router (rt) to the sensor or the prober; an attacker's (or a home NAT machine's) cross
its relay too, one hop more; a host with a route change crosses the extra router (x<i>) on the
detour. The detour is chosen per packet by a firewall mark (policy route, table ROUTE_TABLE) that
an nftables set flips at the host's first SYN to the darknet: "add" sends everything after that
SYN (the first handshake's probe answers included) through the extra router, "remove" everything
before it. So exactly one handshake/probe pair straddles the change, without any timing race.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from lab import personas
from lab.delay import Link
from lab.netns import Namespace, Network
from lab.process import Children, wait_for
from lab.scenarios import Host, Scenarios

SENSOR_ADDR = "198.19.250.2"
PROBER_ADDR = "198.19.251.2"
LAB_TABLE = "stepstone_lab"
PROXY_BASE_PORT = 20000  # the proxy relay's socat listeners: one port per target
SOCKS_PORT = 1080  # the SOCKS relay's microsocks, on its attacker-side address
LISTEN_PORTS = (22, 80)  # every host/relay accepts here so SYN probes get a SYN+ACK
ROUTE_TABLE = 100  # a route-change host's detour through its extra router
ROUTE_MARK = 1


@dataclass
class LabHost:
    host: Host
    index: int
    ns: Namespace  # the host itself, or the relay
    addr: str  # the address the darknet sees
    attacker: Namespace | None = None
    attacker_addr: str | None = None
    relay_inside: str | None = None  # the relay's address on the attacker leg
    second: Namespace | None = None  # homenat: the second machine behind the router
    detour: Namespace | None = None  # route change: the extra router

    @property
    def client_ns(self) -> Namespace:
        """Where the connections to the darknet start."""
        return self.attacker or self.ns


@dataclass
class Topology:
    scenarios: Scenarios
    net: Network
    children: Children
    router: Namespace | None = None
    sensor: Namespace | None = None
    prober: Namespace | None = None
    hosts: list[LabHost] = field(default_factory=list)
    sensor_if: str = ""  # the sensor's interface towards the router (Zeek listens on it)

    def build(self) -> None:
        net = self.net
        self.router, self.sensor, self.prober = net.add("rt"), net.add("sn"), net.add("pr")
        self.router.sysctl("net.ipv4.ip_forward", 1)
        _, self.sensor_if = net.link(self.router, "198.19.250.1/24", self.sensor, f"{SENSOR_ADDR}/24")
        net.link(self.router, "198.19.251.1/24", self.prober, f"{PROBER_ADDR}/24")
        self.sensor.run("ip", "route", "add", "default", "via", "198.19.250.1")
        self.prober.run("ip", "route", "add", "default", "via", "198.19.251.1")
        self.router.run("ip", "route", "add", str(self.scenarios.darknet), "via", SENSOR_ADDR)
        # Resolve the neighbours now, so no measured packet waits for an ARP exchange.
        self.sensor.run("ping", "-c", "1", "-W", "2", "198.19.250.1", check=False)
        self.prober.run("ping", "-c", "1", "-W", "2", "198.19.251.1", check=False)

        links: list[Link] = []
        for i, host in enumerate(self.scenarios.hosts, 1):
            ns = net.add(f"h{i}")
            lab_host = LabHost(host, i, ns, f"198.19.{i}.2")
            half = host.rtt_ms / 2
            links.append(Link(self.router.name, f"r{i}", ns.name, f"u{i}", half, half, host.jitter_ms))
            if host.behind:
                lab_host.attacker = net.add(f"a{i}")
                lab_host.attacker_addr, lab_host.relay_inside = f"10.{i}.0.2", f"10.{i}.0.1"
                extra = host.extra_delay_ms
                links.append(Link(ns.name, f"b{i}", lab_host.attacker.name, f"c{i}", extra, extra))
            self.hosts.append(lab_host)

        delay = self.children.start("delay", ["-m", "lab.delay", *(link.to_json() for link in links)],
                                    python=True)
        wait_for(lambda: "ready" in delay.out.read_text(), 20, "the delay line's TUN devices",
                 alive=delay.exited)

        for h in self.hosts:
            i = h.index
            _addr(self.router, f"r{i}", f"198.19.{i}.1/24")
            _addr(h.ns, f"u{i}", f"{h.addr}/24")
            h.ns.run("ip", "route", "add", "default", "via", f"198.19.{i}.1")
            personas.apply(h.ns, personas.PERSONAS[h.host.persona])
            rules = []
            if h.attacker is not None:
                assert h.attacker_addr and h.relay_inside and h.host.attacker_persona
                _addr(h.ns, f"b{i}", f"{h.relay_inside}/24")
                _addr(h.attacker, f"c{i}", f"{h.attacker_addr}/24")
                h.attacker.run("ip", "route", "add", "default", "via", h.relay_inside)
                personas.apply(h.attacker, personas.PERSONAS[h.host.attacker_persona])
                if h.host.kind in ("nat", "homenat"):
                    h.ns.sysctl("net.ipv4.ip_forward", 1)
                    rules.append("chain post { type nat hook postrouting priority srcnat; policy accept; "
                                 f'ip saddr 10.{i}.0.0/16 oifname "u{i}" masquerade; }}')
                if h.host.kind == "homenat":
                    assert h.host.second_persona
                    h.second = self.net.add(f"m{i}")
                    self.net.link(h.ns, f"10.{i}.1.1/24", h.second, f"10.{i}.1.2/24")
                    h.second.run("ip", "route", "add", "default", "via", f"10.{i}.1.1")
                    personas.apply(h.second, personas.PERSONAS[h.host.second_persona])
            if h.host.route_change:
                self._detour(h)
            if h.host.drop_icmp:
                rules.append("chain in { type filter hook input priority filter; policy accept; "
                             "icmp type echo-request drop; }")
            if rules:
                h.ns.run("nft", "-f", "-", input=f"table inet {LAB_TABLE} {{\n" + "\n".join(rules) + "\n}\n")

    def _detour(self, h: LabHost) -> None:
        """The route change (module docstring): an extra router x<i> beside the direct path, and
        the mark that sends the host's packets through it after (add) or before (remove) its
        first SYN to the darknet."""
        assert self.router is not None
        i = h.index
        x = h.detour = self.net.add(f"x{i}")
        # The detour is one-way (replies come back the direct way): no reverse-path filtering.
        for ns in (x, self.router):
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
        x.sysctl("net.ipv4.ip_forward", 1)
        self.net.link(h.ns, f"100.64.{i}.2/24", x, f"100.64.{i}.1/24")
        _, rt_if = self.net.link(x, f"100.65.{i}.2/24", self.router, f"100.65.{i}.1/24")
        self.router.sysctl(f"net.ipv4.conf.{rt_if}.rp_filter", 0)
        x.run("ip", "route", "add", "default", "via", f"100.65.{i}.1")
        h.ns.run("ip", "route", "add", "default", "via", f"100.64.{i}.1", "table", str(ROUTE_TABLE))
        h.ns.run("ip", "rule", "add", "fwmark", str(ROUTE_MARK), "table", str(ROUTE_TABLE))
        darknet = self.scenarios.darknet
        # "changed" holds the host's address once its first SYN to the darknet has left.
        when = "" if h.host.route_change == "add" else "!= "
        h.ns.run("nft", "-f", "-", input=(
            "table ip stepstone_route {\n"
            "    set changed { type ipv4_addr; flags dynamic; }\n"
            "    chain out {\n"
            "        type route hook output priority mangle; policy accept;\n"
            f"        ip saddr {when}@changed meta mark set {ROUTE_MARK}\n"
            f"        ip daddr {darknet} tcp flags & (syn | ack) == syn add @changed {{ ip saddr }}\n"
            "    }\n}\n"))

    def by_addr(self) -> dict[str, LabHost]:
        return {h.addr: h for h in self.hosts}

    def darknet_targets(self, count: int, seed: int, port: int | None = None) -> list[tuple[str, int]]:
        """`count` distinct-ish (address, port) pairs in the darknet, reproducible from `seed`; all
        on `port` when given (a server-first client's)."""
        rng = random.Random(seed)
        hosts = list(self.scenarios.darknet.hosts()) or [self.scenarios.darknet.network_address]
        ports = (22, 23, 80, 443, 445, 3389, 8080, 5555, 6379, 37215)
        return [(str(rng.choice(hosts)), port or rng.choice(ports)) for _ in range(count)]


def _addr(ns: Namespace, ifname: str, cidr: str) -> None:
    ipaddress.ip_interface(cidr)  # a wrong literal here is a bug: fail loudly before `ip` does
    ns.run("ip", "addr", "add", cidr, "dev", ifname)
    ns.run("ip", "link", "set", ifname, "up")
