"""OS personas for lab hosts: per-namespace sysctls plus an nftables table that rewrites the
window (and, for Windows, the IP ID) of the host's own SYN and SYN+ACK, so p0f sees the OS we mean.

Each persona is consistent: its SYN and its SYN+ACK get labels of the same OS (`class:name`) or
the SYN+ACK gets none, so a direct host never trips condition (1) by construction. The labels
expected from the project's database (osfp/data/stepstone.fp, what the analyzer and the prober
use) are written next to each persona and checked by tests/test_lab_personas.py against the real
fingerprinter and the real prober.

Only locally generated packets are rewritten (output hook): a relay forwarding its attacker's SYN
leaves that SYN as the attacker made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lab.netns import Namespace

TABLE = "stepstone_persona"
MSS = 1460  # every lab link has MTU 1500


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    sysctls: dict[str, int] = field(default_factory=dict)
    syn_window: int | None = None  # rewrite the SYN's window to this
    synack_window: int | None = None
    synack_ip_id: int | None = None  # a non-zero IP ID on the SYN+ACK (p0f quirk id+)
    expect_syn: str | None = None  # p0f label (class:name:flavor) the SYN should get
    expect_synack: str | None = None  # ... and the SYN+ACK (None = unknown)

    def ruleset(self) -> str | None:
        rules = []
        if self.syn_window is not None:
            rules.append(f"tcp flags & (syn | ack) == syn tcp window set {self.syn_window}")
        synack = []
        if self.synack_window is not None:
            synack.append(f"tcp window set {self.synack_window}")
        if self.synack_ip_id is not None:
            synack.append(f"ip id set {self.synack_ip_id}")
        if synack:
            rules.append("tcp flags & (syn | ack) == syn | ack " + " ".join(synack))
        if not rules:
            return None
        body = "\n".join(f"        {rule}" for rule in rules)
        return (f"table inet {TABLE} {{\n    chain output {{\n"
                f"        type filter hook output priority mangle; policy accept;\n{body}\n    }}\n}}\n")

    def family(self) -> str | None:
        """`class:name` of the expected SYN label: what condition (1) compares."""
        return ":".join(self.expect_syn.split(":")[:2]) if self.expect_syn else None


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona(
            "linux",
            "current Linux; window rewritten to the values p0f's Linux 3.x signatures expect",
            syn_window=MSS * 20,
            synack_window=MSS * 10,
            expect_syn="unix:Linux:3.11 and newer",
            expect_synack="unix:Linux:3.x",
        ),
        Persona(
            "linux-stock",
            "this kernel untouched (stock p0f 3.09b knows neither its SYN nor its SYN+ACK; the "
            "project database does)",
            expect_syn="unix:Linux:4.19 and newer",
            expect_synack="unix:Linux:4.19 and newer",
        ),
        Persona(
            "linux-2.6",
            "an old Linux 2.6 (window 4*MSS)",
            syn_window=MSS * 4,
            synack_window=MSS * 4,
            expect_syn="unix:Linux:2.4.x-2.6.x",  # generic: this kernel's window scale is above 2.6's
            expect_synack="unix:Linux:2.6.x",
        ),
        Persona(
            "windows",
            "Windows 7/8: TTL 128, no timestamps, no window scaling, window 8192",
            sysctls={"net.ipv4.ip_default_ttl": 128, "net.ipv4.tcp_timestamps": 0,
                     "net.ipv4.tcp_window_scaling": 0},
            syn_window=8192,
            synack_window=8192,
            synack_ip_id=4242,
            expect_syn="win:Windows:7 or 8",
            expect_synack="win:Windows:7 or 8",
        ),
        Persona(
            "barebone",
            "a minimal stack: no SACK, timestamps or window scaling (MSS option only)",
            sysctls={"net.ipv4.tcp_timestamps": 0, "net.ipv4.tcp_sack": 0, "net.ipv4.tcp_window_scaling": 0},
            synack_window=MSS * 10,
            expect_syn="unix:Linux:4.19 and newer",
            expect_synack="unix:Linux:3.x",
        ),
    )
}


def apply(ns: Namespace, persona: Persona) -> None:
    """Give namespace `ns` this persona."""
    for key, value in persona.sysctls.items():
        ns.sysctl(key, value)
    rules = persona.ruleset()
    if rules:
        ns.run("nft", "-f", "-", input=rules)
