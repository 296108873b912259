"""Where the prober may send packets. Special-purpose address space (the IANA IPv4 and IPv6
special-purpose registries, RFC 6890 and successors) and `--exclude` networks are refused;
`--allow` is the only way into special-purpose space (the lab and the tests use it).

Order of the checks: exclude beats allow beats the special-purpose list.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SPECIAL_TEXT: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network' (RFC 791)"),
    ("10.0.0.0/8", "private-use (RFC 1918)"),
    ("100.64.0.0/10", "shared address space / CGN (RFC 6598)"),
    ("127.0.0.0/8", "loopback (RFC 1122)"),
    ("169.254.0.0/16", "link-local (RFC 3927)"),
    ("172.16.0.0/12", "private-use (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    ("192.0.2.0/24", "documentation TEST-NET-1 (RFC 5737)"),
    ("192.31.196.0/24", "AS112-v4 (RFC 7535)"),
    ("192.52.193.0/24", "AMT (RFC 7450)"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast (RFC 7526)"),
    ("192.168.0.0/16", "private-use (RFC 1918)"),
    ("192.175.48.0/24", "direct delegation AS112 (RFC 7534)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation TEST-NET-2 (RFC 5737)"),
    ("203.0.113.0/24", "documentation TEST-NET-3 (RFC 5737)"),
    ("224.0.0.0/4", "multicast (RFC 5771)"),
    ("240.0.0.0/4", "reserved (RFC 1112)"),
    ("255.255.255.255/32", "limited broadcast (RFC 919)"),
    ("::/128", "unspecified address (RFC 4291)"),
    ("::1/128", "loopback (RFC 4291)"),
    ("::ffff:0:0/96", "IPv4-mapped (RFC 4291)"),
    ("::/96", "deprecated IPv4-compatible (RFC 4291)"),
    ("64:ff9b::/96", "IPv4-IPv6 translation (RFC 6052)"),
    ("64:ff9b:1::/48", "local-use IPv4-IPv6 translation (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001::/23", "IETF protocol assignments (RFC 2928)"),
    ("2001:db8::/32", "documentation (RFC 3849)"),
    ("2002::/16", "6to4 (RFC 3056)"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "segment routing SIDs (RFC 9602)"),
    ("fc00::/7", "unique-local (RFC 4193)"),
    ("fe80::/10", "link-local unicast (RFC 4291)"),
    ("fec0::/10", "deprecated site-local (RFC 3879)"),
    ("ff00::/8", "multicast (RFC 4291)"),
)

SPECIAL_PURPOSE: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in _SPECIAL_TEXT)


def parse_networks(texts: Iterable[str], option: str) -> tuple[IPNetwork, ...]:
    """CIDR strings from the command line; ValueError names the option and the bad value."""
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{option} {text!r} is not an address or CIDR network") from None
    return tuple(out)


@dataclass(frozen=True)
class TargetPolicy:
    allow: tuple[IPNetwork, ...] = ()
    exclude: tuple[IPNetwork, ...] = ()
    special: tuple[tuple[IPNetwork, str], ...] = field(default=SPECIAL_PURPOSE)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why `address` must not be probed, or None when it may be."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"not an IP address: {address!r}"
        for net in self.exclude:
            if ip.version == net.version and ip in net:
                return f"excluded by --exclude {net}"
        for net in self.allow:
            if ip.version == net.version and ip in net:
                return None
        for net, why in self.special:
            if ip.version == net.version and ip in net:
                return f"special-purpose address space {net}: {why} (open it with --allow)"
        # Anything the registry marks non-global that the table above does not name yet.
        if not ip.is_global:
            return "special-purpose address space (not globally reachable per the IANA registry; " \
                "open it with --allow)"
        return None
