"""The project database's Linux entry against THIS machine's kernel: a real connection between two
network namespaces, its SYN and SYN+ACK captured with a packet socket on the server's veth."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab.netns import Network
from osfp import Fingerprinter, stock_database_path
from osfp.craft import write_pcap
from osfp.reference import p0f_binary, run_p0f

LINUX = "unix:Linux:4.19 and newer"

# Runs inside the server namespace: opens the capture socket before listening, says "ready", and
# prints the first SYN and SYN+ACK of the port as hex (IP header on).
CAPTURE = r"""
import socket, struct, sys
ifname, port, family = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
cap.bind((ifname, 0))
cap.settimeout(20)
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
lst = socket.socket(fam)
lst.bind(("::" if family == "6" else "0.0.0.0", port))
lst.listen()
print("ready", flush=True)
got = {}
while len(got) < 2:
    frame = cap.recv(65535)
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if ethertype == 0x0800 and ip[9] == 6:
        off = (ip[0] & 15) * 4
    elif ethertype == 0x86DD and ip[6] == 6:
        off = 40
    else:
        continue
    sport, dport = struct.unpack_from("!HH", ip, off)
    flags = ip[off + 13] & 0x17
    if port in (sport, dport) and flags in (0x02, 0x12):
        got.setdefault(flags, ip)
print(got[0x02].hex())
print(got[0x12].hex(), flush=True)
"""


def _handshake(net: Network, family: int, client_sysctls: dict[str, int]) -> tuple[bytes, bytes]:
    client, server = net.add("kc"), net.add("ks")
    if family == 4:
        _, server_if = net.link(client, "10.77.0.1/24", server, "10.77.0.2/24")
        target = "10.77.0.2"
    else:
        _, server_if = net.link(client, "fd77::1/64", server, "fd77::2/64")
        target = "fd77::2"
    for key, value in client_sysctls.items():
        client.sysctl(key, value)
    proc = server.python("-c", CAPTURE, server_if, "8080", str(family), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        connect = f"import socket; socket.create_connection(({target!r}, 8080), timeout=10).close()"
        client.run("python3", "-c", connect)
        syn = bytes.fromhex(proc.stdout.readline().strip())
        synack = bytes.fromhex(proc.stdout.readline().strip())
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return syn, synack


CASES = {
    "ipv4": (4, {}),
    "ipv6": (6, {}),
    "ipv4-no-timestamps": (4, {"net.ipv4.tcp_timestamps": 0}),
    "ipv6-no-sack-no-wscale": (6, {"net.ipv4.tcp_sack": 0, "net.ipv4.tcp_window_scaling": 0}),
}


@pytest.mark.netns
@pytest.mark.parametrize("case", list(CASES))
def test_this_kernel_is_linux_4_19_and_newer(net: Network, case: str, tmp_path: Path) -> None:
    family, sysctls = CASES[case]
    syn, synack = _handshake(net, family, sysctls)
    fp = Fingerprinter()
    got_syn = fp.fingerprint(syn)
    got_synack = fp.fingerprint(synack)  # after its SYN, as p0f sees them
    for got in (got_syn, got_synack):
        assert (got.label, got.generic, got.match) == (LINUX, False, "exact"), got
        assert got.distance == 0
    # The stock database, in contrast, knows this kernel at best generically.
    stock = Fingerprinter(stock_database_path())
    old_syn, old_synack = stock.fingerprint(syn), stock.fingerprint(synack)
    assert old_syn.label is None or old_syn.generic or old_syn.match != "exact"
    assert old_synack.label is None or old_synack.match != "exact"
    # And the original p0f with our database says the same as we do.
    if p0f_binary() is not None:
        pcap = tmp_path / "kernel.pcap"
        write_pcap(pcap, [(1.0, syn), (1.001, synack)])
        entries = {e.kind: e for e in run_p0f(pcap, db=Fingerprinter().db_path)}
        assert entries["syn"].os == "Linux 4.19 and newer"
        assert entries["synack"].os == "Linux 4.19 and newer"
        assert entries["syn"].raw_sig == got_syn.sig
        assert entries["synack"].raw_sig == got_synack.sig
