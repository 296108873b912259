"""The hop distance of a client's SYN, as the measurement record keeps it (`Record.syn_dist`).

p0f's distance is the initial TTL minus the observed TTL: the signature's TTL when one matched
(Linux 64, Windows 128, ...), otherwise the observed TTL rounded up to 32, 64, 128 or 255. It counts
routers only when the SYN left its sender with the stack's own initial TTL. A crafted SYN does not:
masscan, ZMap and nmap set their own TTL (255, random, 37..59), Mirai-like bots too. Such a SYN's
distance is recorded null, like an unknown label, so no hop test (analyzer/rules.py `cond_hops`)
ever reads a tool's TTL as hops. A SYN counts as crafted when:

- its p0f label is a userland tool (class `!`, e.g. `!:NMap:SYN scan`), or
- it carries no TCP options: every OS stack sends at least an MSS; raw-socket scanners often send
  none (masscan's and Mirai's default SYN), or
- its sender answered our SYN+ACK with a RST: its kernel never sent that SYN (no socket knows the
  connection), so a program wrote it on a raw socket with a TTL of its choosing.
"""

from __future__ import annotations

from analyzer.handshake import Reply
from osfp.result import Fingerprint


def crafted(fp: Fingerprint, reply: Reply | None) -> bool:
    """Whether the SYN behind `fp` (answered with `reply`) was written by a tool, not a stack."""
    if fp.label is not None and fp.label.startswith("!:"):
        return True
    if reply == "rst":
        return True
    # p0f's raw signature "ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass": olayout empty.
    fields = fp.sig.split(":")
    return len(fields) < 8 or fields[5] == ""


def syn_distance(fp: Fingerprint | None, reply: Reply | None) -> int | None:
    """The SYN's hop distance for the record: p0f's, or None for a crafted SYN (module docstring),
    one not fingerprinted, or one whose distance p0f does not give (`Fingerprint.hops`)."""
    if fp is None or crafted(fp, reply):
        return None
    hops = fp.hops
    return hops if hops is not None and 0 <= hops <= 255 else None
