"""Lab OS personas, checked with the project's real fingerprinter: the SYN a persona sends and the
SYN+ACK it returns to the real prober's probe get the OS we meant, and never two different OSes
(a direct host with two known, different labels would be a false positive by condition (1))."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab import personas
from lab.netns import Network
from osfp.fingerprinter import Fingerprinter

pytestmark = pytest.mark.netns

OBSERVER = """
import socket, sys
from responder.listener import TCP_SAVED_SYN, open_listener
listener = open_listener(socket.AF_INET, 80)
listener.setblocking(True)
print("ready", flush=True)
conn, _ = listener.accept()
sys.stdout.write(conn.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 1024).hex() + "\\n")
"""

LISTEN = ("import socket, sys; s = socket.create_server(('0.0.0.0', 22)); print('ready', flush=True); "
          "sys.stdin.read()")


def _family(label: str | None) -> str | None:
    return ":".join(label.split(":")[:2]) if label else None


@pytest.mark.parametrize("name", sorted(personas.PERSONAS))
def test_persona_labels(net: Network, name: str) -> None:
    persona = personas.PERSONAS[name]
    host, observer = net.add("ph"), net.add("po")
    net.link(host, "198.18.9.2/24", observer, "198.18.9.1/24")
    personas.apply(host, persona)

    # The persona's SYN, as the observer's kernel saved it.
    obs = observer.python("-c", OBSERVER, stdout=subprocess.PIPE)
    assert obs.stdout is not None and obs.stdout.readline() == b"ready\n"
    host.run(sys.executable, "-c", "import socket; socket.create_connection(('198.18.9.1', 80), 5).close()")
    syn = bytes.fromhex(obs.stdout.readline().decode().strip())
    obs.wait(10)
    fp = Fingerprinter()
    syn_label = fp.fingerprint(syn).label

    # The persona's SYN+ACK, as the real prober sees it.
    srv = host.python("-c", LISTEN, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert srv.stdout is not None and srv.stdout.readline() == b"ready\n"
        out = observer.run(sys.executable, "-m", "prober.cli", "probe", "198.18.9.2", "--ports", "22",
                           "--allow", "198.18.0.0/15", "--audit-log", "/dev/null", "--count", "1")
    finally:
        srv.kill()
        srv.wait(10)
    fa = json.loads(out).get("fa")

    assert _family(syn_label) == persona.family(), (name, syn_label, fa)
    assert fa is None or _family(fa) == _family(syn_label), (name, syn_label, fa)
    assert (syn_label, fa) == (persona.expect_syn, persona.expect_synack), "update lab/personas.py"
