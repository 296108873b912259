"""The lab's scenario file (TOML): the darknet, the traffic, and one table per host whose truth we
know. `lab/scenarios.toml` is the default set and the commented example of every field."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lab.personas import PERSONAS

Kind = Literal["direct", "nat", "proxy", "scanner", "homenat", "socat", "socks"]
Truth = Literal["direct", "relay", "proxy", "shared", "terminating"]
KINDS: tuple[str, ...] = ("direct", "nat", "proxy", "scanner", "homenat", "socat", "socks")
ROUTE_CHANGES = ("add", "remove")
# "proxy" (the default set's socat relay whose attacker only opens and closes connections) keeps
# its own truth; "socat" and "socks" are terminating relays with a server-first client behind them.
TRUTH: dict[str, Truth] = {"direct": "direct", "nat": "relay", "proxy": "proxy", "scanner": "direct",
                           "homenat": "shared", "socat": "terminating", "socks": "terminating"}
BEHIND = ("nat", "proxy", "homenat", "socat", "socks")  # kinds whose connections start behind the host
# A server-first client's protocol -> the darknet port it connects to (the responder's banners on
# these ports: lab/banners.toml).
CLIENT_PORTS: dict[str, int] = {"ssh": 22, "smtp": 25}
DEFAULT_FILE = Path(__file__).with_name("scenarios.toml")
MAX_HOSTS = 40  # one /24 per host link out of 198.19.0.0/16, leaving room for the fixed links


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    kind: Kind
    persona: str  # the host that talks to the darknet (for nat/proxy: the relay)
    rtt_ms: float  # path RTT between the sensor and this host (relay)
    jitter_ms: float = 0.0  # extra one-way delay, uniform [0, jitter], each direction
    attacker_persona: str | None = None  # nat/proxy: the attacker behind the relay
    extra_delay_ms: float = 0.0  # nat/proxy: attacker leg, one way
    drop_icmp: bool = False  # the host (relay) drops ICMP echo requests
    connections: int | None = None  # overrides [lab].connections
    # direct/scanner: a hop added to ("add") or removed from ("remove") the host's outbound path
    # right after its first SYN, i.e. between its first handshake and that handshake's probe.
    route_change: str | None = None
    second_persona: str | None = None  # homenat: the OS of the second machine behind the router
    # A server-first client (CLIENT_PORTS): every connection goes to that port, reads the banner,
    # waits client_think_ms, answers one line and closes. None: connect and close at once.
    client: str | None = None
    client_think_ms: float = 0.0

    @property
    def truth(self) -> Truth:
        return TRUTH[self.kind]

    @property
    def behind(self) -> bool:
        """Whether the connections start in namespaces behind this host (a relay or home NAT)."""
        return self.kind in BEHIND


@dataclass(frozen=True)
class Scenarios:
    darknet: ipaddress.IPv4Network
    connections: int  # connection requests per host over the traffic phase
    traffic_s: float  # the traffic phase lasts this long
    settle_s: float  # after traffic: wait at most this long for the last verdicts
    hosts: tuple[Host, ...]
    source: str


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    value = table.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise ScenarioError(f"{where}: {key} must be {getattr(kind, '__name__', kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ScenarioError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    return value


def parse(text: str, source: str = "<string>") -> Scenarios:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    lab = raw.get("lab", {})
    if not isinstance(lab, dict):
        raise ScenarioError(f"{source}: [lab] must be a table")
    unknown = set(raw) - {"lab", "host"}
    if unknown:
        raise ScenarioError(f"{source}: unknown top-level keys {sorted(unknown)}")
    try:
        darknet = ipaddress.IPv4Network(_get(lab, "darknet", str, "198.18.0.0/24", "[lab]"))
    except ValueError as exc:
        raise ScenarioError(f"{source}: [lab] darknet: {exc}") from None
    if not darknet.subnet_of(ipaddress.IPv4Network("198.18.0.0/16")):
        raise ScenarioError(f"{source}: [lab] darknet must lie in 198.18.0.0/16 (benchmarking space)")
    connections = _get(lab, "connections", int, 6, "[lab]")
    traffic_s = float(_get(lab, "traffic_s", (int, float), 40, "[lab]"))
    settle_s = float(_get(lab, "settle_s", (int, float), 30, "[lab]"))
    if connections < 1 or traffic_s <= 0 or settle_s < 0:
        raise ScenarioError(f"{source}: [lab] connections >= 1, traffic_s > 0, settle_s >= 0")
    raw_hosts = raw.get("host", [])
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ScenarioError(f"{source}: needs at least one [[host]]")
    if len(raw_hosts) > MAX_HOSTS:
        raise ScenarioError(f"{source}: at most {MAX_HOSTS} hosts")
    hosts = []
    names: set[str] = set()
    for i, entry in enumerate(raw_hosts, 1):
        if not isinstance(entry, dict):
            raise ScenarioError(f"{source}: [[host]] #{i} must be a table")
        where = f"{source}: [[host]] #{i}"
        known = {"name", "kind", "persona", "rtt_ms", "jitter_ms", "attacker_persona", "extra_delay_ms",
                 "drop_icmp", "connections", "route_change", "second_persona", "client",
                 "client_think_ms"}
        if set(entry) - known:
            raise ScenarioError(f"{where}: unknown keys {sorted(set(entry) - known)}")
        name = _get(entry, "name", str, f"host{i}", where)
        if name in names:
            raise ScenarioError(f"{where}: duplicate name {name!r}")
        names.add(name)
        kind = _get(entry, "kind", str, "direct", where)
        if kind not in KINDS:
            raise ScenarioError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        alone = kind in ("direct", "scanner")
        persona = _get(entry, "persona", str, "linux", where)
        attacker = _get(entry, "attacker_persona", str, None if alone else "linux", where)
        second = _get(entry, "second_persona", str, "windows" if kind == "homenat" else None, where)
        for p in (persona, attacker, second):
            if p is not None and p not in PERSONAS:
                raise ScenarioError(f"{where}: unknown persona {p!r} (known: {', '.join(PERSONAS)})")
        if alone and ("attacker_persona" in entry or "extra_delay_ms" in entry):
            raise ScenarioError(f"{where}: attacker_persona / extra_delay_ms only for nat, proxy and homenat "
                                "(and the socat and socks proxies)")
        if kind != "homenat" and "second_persona" in entry:
            raise ScenarioError(f"{where}: second_persona only for homenat")
        route_change = _get(entry, "route_change", str, None, where)
        if route_change is not None and (route_change not in ROUTE_CHANGES or not alone):
            raise ScenarioError(f"{where}: route_change must be add or remove, on a direct host or scanner")
        client = _get(entry, "client", str, None, where)
        if client is not None and (client not in CLIENT_PORTS or kind in ("scanner", "homenat")):
            raise ScenarioError(f"{where}: client must be one of {', '.join(CLIENT_PORTS)}, "
                                "and not on a scanner or home NAT")
        think = float(_get(entry, "client_think_ms", (int, float), 0, where))
        if "client_think_ms" in entry and client is None:
            raise ScenarioError(f"{where}: client_think_ms only with a client")
        if not 0 <= think <= 10_000:
            raise ScenarioError(f"{where}: client_think_ms must be within 0..10000")
        host = Host(
            name=name,
            kind=kind,
            persona=persona,
            rtt_ms=float(_get(entry, "rtt_ms", (int, float), 10, where)),
            jitter_ms=float(_get(entry, "jitter_ms", (int, float), 0, where)),
            attacker_persona=attacker,
            extra_delay_ms=float(_get(entry, "extra_delay_ms", (int, float), 0, where)),
            drop_icmp=_get(entry, "drop_icmp", bool, False, where),
            connections=_get(entry, "connections", int, None, where),
            route_change=route_change,
            second_persona=second,
            client=client,
            client_think_ms=think,
        )
        if min(host.rtt_ms, host.jitter_ms, host.extra_delay_ms) < 0 or host.rtt_ms > 2000:
            raise ScenarioError(f"{where}: delays must be >= 0 and rtt_ms <= 2000")
        if host.connections is not None and host.connections < 1:
            raise ScenarioError(f"{where}: connections must be >= 1")
        hosts.append(host)
    return Scenarios(darknet, connections, traffic_s, settle_s, tuple(hosts), source)


def load(path: Path | None = None) -> Scenarios:
    path = path or DEFAULT_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenarios: {exc}") from None
    return parse(text, str(path))
