"""Network namespaces and veth links for the lab and the tests, torn down on every exit path.

Every namespace this module makes carries a per-run prefix, so concurrent runs never collide and a
crashed run's leftovers can be found and removed (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

PREFIX = "sst"  # every namespace name starts with it; `stepstone-lab clean` removes the strays


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the command and what it printed."""


def _run(args: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None if they can): the tests skip with this reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, raw sockets, nftables)"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    name = f"{PREFIX}probe{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", name])
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    _run(["ip", "netns", "del", name], check=False)
    return None


@dataclass
class Namespace:
    name: str

    def run(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return _run(["ip", "netns", "exec", self.name, *args], check=check, input=input)

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)  # type: ignore[call-overload,no-any-return]

    def python(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start this interpreter inside the namespace (scapy and raw sockets then see its routes)."""
        return self.popen(sys.executable, *args, **kwargs)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def up_loopback(self) -> None:
        self.run("ip", "link", "set", "lo", "up")


@dataclass
class Network:
    """Owns namespaces and links; `close()` (or leaving the `with`) removes all of them."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[Namespace] = field(default_factory=list)
    _links: int = 0

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, role: str) -> Namespace:
        # Names stay short: interface and namespace names share a 15-character kernel limit.
        ns = Namespace(f"{PREFIX}{self.tag}{role}"[:31])
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.up_loopback()
        return ns

    def link(self, a: Namespace, a_addr: str, b: Namespace, b_addr: str) -> tuple[str, str]:
        """A veth pair between two namespaces with the given addresses ("10.0.0.1/24"); returns the
        interface names (a side, b side)."""
        self._links += 1
        a_if, b_if = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"
        _run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
              "netns", b.name])
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            family = "-6" if ":" in addr else "-4"
            extra = ["nodad"] if family == "-6" else []
            ns.run("ip", family, "addr", "add", addr, "dev", ifname, *extra)
            ns.run("ip", "link", "set", ifname, "up")
        return a_if, b_if

    def close(self) -> None:
        # Deleting a namespace kills its interfaces (and the veth peers); processes still inside
        # it are the caller's to stop first, or the namespace lingers as long as they live.
        for ns in reversed(self.namespaces):
            _kill_inside(ns.name)
            _run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()


def _kill_inside(name: str) -> None:
    pids = _run(["ip", "netns", "pids", name], check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace that carries our prefix (left by a run that was killed with -9)."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            _kill_inside(name)
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()
