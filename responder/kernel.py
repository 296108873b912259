"""The kernel side of the responder: a local route for the darknet and one nftables table that
steers every TCP port of it to our single listener. Installed on start, removed on every exit."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TABLE = "stepstone_responder"


class SteeringError(RuntimeError):
    """The route or the nftables table could not be installed; the message says why."""


def _run(
    args: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise SteeringError(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def missing_tools() -> list[str]:
    return [tool for tool in ("ip", "nft") if shutil.which(tool) is None]


def ruleset(table: str, darknets: Sequence[Network], port: int) -> str:
    """The nftables table: redirect TCP to any darknet address/port to `port` on this host.

    Prerouting catches clients on other hosts; output catches clients on this host (handy for a
    quick check with `nc` on the sensor itself)."""
    rules = []
    for net in darknets:
        family = "ip" if net.version == 4 else "ip6"
        rules.append(f"        {family} daddr {net} meta l4proto tcp redirect to :{port}")
    body = "\n".join(rules)
    chains = [("prerouting", "dstnat"), ("output", "-100")]
    text = [f"table inet {table} {{"]
    for hook, priority in chains:
        text += [f"    chain {hook} {{", f"        type nat hook {hook} priority {priority}; policy accept;",
                 body, "    }"]
    return "\n".join([*text, "}", ""])


@dataclass
class Steering:
    """Route + nftables table. Use as a context manager; `remove()` is idempotent."""

    darknets: Sequence[Network]
    port: int
    table: str = TABLE
    _routes: list[Network] = field(default_factory=list)
    _table_added: bool = False

    def install(self) -> None:
        missing = missing_tools()
        if missing:
            raise SteeringError(f"needs {' and '.join(missing)} (Debian: apt-get install iproute2 nftables)")
        try:
            # A table left by a run killed with -9 is ours: replace it instead of failing.
            _run(["nft", "delete", "table", "inet", self.table], check=False)
            _run(["nft", "-f", "-"], input=ruleset(self.table, self.darknets, self.port))
            self._table_added = True
            for net in self.darknets:
                family = "-4" if net.version == 4 else "-6"
                _run(["ip", family, "route", "replace", "local", str(net), "dev", "lo"])
                self._routes.append(net)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        errors = []
        while self._routes:
            net = self._routes.pop()
            family = "-4" if net.version == 4 else "-6"
            proc = _run(["ip", family, "route", "del", "local", str(net), "dev", "lo"], check=False)
            if proc.returncode != 0:
                errors.append(proc.stderr.strip())
        if self._table_added:
            self._table_added = False
            proc = _run(["nft", "delete", "table", "inet", self.table], check=False)
            if proc.returncode != 0:
                errors.append(proc.stderr.strip())
        if errors:
            raise SteeringError("cleanup: " + "; ".join(errors))

    def __enter__(self) -> Steering:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
