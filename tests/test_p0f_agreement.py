"""Our labels against the original p0f 3.09b (Debian's binary) with the STOCK database.

For every SYN and SYN+ACK that p0f labels, `stepstone-analyzer fingerprint CAPTURE --p0f-db STOCK`
must print the same label (and, since the raw signature is what p0f matched on, the same `sig`).
Captures: (a) every signature of the stock database, (b) the same pushed off their exact values,
(c) the real captures in tests/data/captures (VLAN-tagged: p0f gets an untagged copy).
One p0f run and one analyzer run per capture.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

from osfp.craft import VARIANTS, Crafted, database_packets, write_pcap
from osfp.database import load, stock_database_path
from osfp.fingerprinter import Fingerprinter
from osfp.reference import P0fEntry, os_text, p0f_binary, run_p0f
from osfp.result import FingerprintError
from tests.conftest import DATA

pytestmark = pytest.mark.skipif(p0f_binary() is None, reason="needs Debian's p0f binary")

Key = tuple[str, int, str, int, str]


def _analyzer_command() -> list[str] | None:
    exe = Path(sys.executable).with_name("stepstone-analyzer")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("stepstone-analyzer")
    return [found] if found else None


def ours_by_command(capture: Path, db: Path) -> dict[Key, list[tuple[str | None, str]]]:
    """Our (label, sig) per flow key, every SYN / SYN+ACK in file order, from the real command."""
    cmd = _analyzer_command()
    assert cmd is not None, "stepstone-analyzer is not installed (pip install -e .)"
    proc = subprocess.run(
        [*cmd, "fingerprint", str(capture), "--p0f-db", str(db)],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    out: dict[Key, list[tuple[str | None, str]]] = defaultdict(list)
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        key = (rec["src"], rec["sport"], rec["dst"], rec["dport"], rec["kind"])
        out[key].append((rec["label"], rec["sig"]))
    return out


def compare(
    ours: dict[Key, list[tuple[str | None, str]]], theirs: Iterable[P0fEntry]
) -> tuple[int, list[str]]:
    """(entries p0f labelled, disagreements). An entry agrees when some packet of ours with that
    flow key has p0f's raw signature and p0f's label (every such packet of ours must)."""
    labelled = 0
    problems: list[str] = []
    for entry in theirs:
        if entry.os is None:
            continue
        labelled += 1
        same_sig = [label for label, sig in ours.get(entry.key, []) if sig == entry.raw_sig]
        if not same_sig:
            problems.append(f"{entry.key}: p0f {entry.os!r} {entry.raw_sig}; ours {ours.get(entry.key)}")
        elif any(os_text(label) != entry.os for label in same_sig):
            problems.append(f"{entry.key}: p0f {entry.os!r}; ours {same_sig} ({entry.raw_sig})")
    return labelled, problems


def _write(tmp: Path, name: str, packets: list[Crafted]) -> Path:
    path = tmp / name
    write_pcap(path, ((1_700_000_000 + i / 1000, c.ip) for i, c in enumerate(packets)))
    return path


def _direct(packets: list[Crafted], db: Path) -> dict[Key, list[tuple[str | None, str]]]:
    fp = Fingerprinter(db)
    out: dict[Key, list[tuple[str | None, str]]] = defaultdict(list)
    for c in packets:
        r = fp.fingerprint(c.ip)
        out[c.key].append((r.label, r.sig))
    return out


def _crafted(variants: tuple[str, ...]) -> list[Crafted]:
    db = load(stock_database_path())
    syn = database_packets(db.syn, synack=False, variants=variants)
    return syn + database_packets(db.synack, synack=True, variants=variants, first=len(syn) + 1)


def test_every_stock_signature(tmp_path: Path) -> None:
    packets = _crafted(("exact",))
    stock = stock_database_path()
    pcap = _write(tmp_path, "every.pcap", packets)
    theirs = run_p0f(pcap, db=stock)
    # p0f logs one entry per SYN and per SYN+ACK here (fresh flows, no userland-tool SYNs).
    assert len(theirs) == len(packets)
    labelled, problems = compare(ours_by_command(pcap, stock), theirs)
    assert not problems, "\n".join(problems[:20])
    # Every signature, crafted exactly, is labelled by p0f (so all of them were compared); the flow
    # SYNs before SYN+ACKs too (a Linux 4.19+ SYN: generic "Linux 2.2.x-3.x" in the stock file).
    assert labelled == len(packets)
    # And the labels are the signatures' own, except where the stock file itself shadows one.
    own = sum(
        os_text(c.sig.label) == e.os for c, e in zip(packets, theirs, strict=True) if c.variant != "flow-syn"
    )
    assert own >= 0.95 * sum(c.variant != "flow-syn" for c in packets)


def test_signatures_pushed_off(tmp_path: Path) -> None:
    packets = _crafted(tuple(v for v in VARIANTS if v != "exact"))
    assert len(packets) > 5000
    stock = stock_database_path()
    pcap = _write(tmp_path, "pushed.pcap", packets)
    theirs = run_p0f(pcap, db=stock)
    labelled, problems = compare(ours_by_command(pcap, stock), theirs)
    assert not problems, "\n".join(problems[:20])
    assert labelled > 3000  # fuzzy matches and the like: most pushed-off packets still get a label
    # Fuzzy matches happened (the point of this capture), and they agree too.
    assert sum("fuzzy" in e.params for e in theirs) > 500


def test_direct_api_agrees_too(tmp_path: Path) -> None:
    """The same comparison through `Fingerprinter` itself (pinpoints a failure to osfp or the CLI)."""
    packets = _crafted(VARIANTS)
    stock = stock_database_path()
    pcap = _write(tmp_path, "all.pcap", packets)
    theirs = run_p0f(pcap, db=stock)
    labelled, problems = compare(_direct(packets, stock), theirs)
    assert not problems, "\n".join(problems[:20])
    assert labelled > 4000
    # Distances agree as well (p0f prints "<= N" for random-TTL signatures).
    fp = Fingerprinter(stock)
    dist = {}
    for c in packets:
        r = fp.fingerprint(c.ip)
        dist.setdefault((c.key, r.sig), r.distance)
    for e in theirs:
        mine = dist.get((e.key, e.raw_sig))
        assert mine is not None
        assert e.dist in (str(mine), f"<= {mine}"), (e, mine)


def _strip_vlan(src: Path, dst: Path) -> None:
    """Copy a classic pcap, removing 802.1Q/802.1ad tags (p0f 3.09b cannot read them from files)."""
    data = src.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    assert struct.unpack_from(f"{endian}I", data, 20)[0] == 1, "expects Ethernet"
    out = bytearray(data[:24])
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, orig = struct.unpack_from(f"{endian}IIII", data, pos)
        frame = bytearray(data[pos + 16 : pos + 16 + incl])
        pos += 16 + incl
        while len(frame) >= 18 and frame[12:14] in (b"\x81\x00", b"\x88\xa8"):
            del frame[12:16]
            incl -= 4
            orig -= 4
        out += struct.pack(f"{endian}IIII", sec, frac, incl, orig) + frame
    dst.write_bytes(bytes(out))


@pytest.mark.parametrize("name", ["scan-ng-23-tcp.pcap", "vnc-scanner.pcap"])
def test_real_captures(tmp_path: Path, name: str) -> None:
    original = DATA / "captures" / name
    if not original.exists():
        pytest.skip(f"{original} is missing")
    untagged = tmp_path / name
    _strip_vlan(original, untagged)
    stock = stock_database_path()
    theirs = run_p0f(untagged, db=stock)
    assert theirs, "p0f logged nothing: VLAN tag not stripped?"
    labelled, problems = compare(ours_by_command(original, stock), theirs)
    assert not problems, "\n".join(problems[:20])
    # The README of the captures: 166 labelled SYN flows in scan-ng, 203 + 137 in vnc-scanner.
    assert labelled >= {"scan-ng-23-tcp.pcap": 160, "vnc-scanner.pcap": 330}[name]
    if name == "vnc-scanner.pcap":
        assert any(e.kind == "synack" and e.os for e in theirs)


def test_bad_packets_are_not_labelled_by_p0f_either(tmp_path: Path) -> None:
    """Packets we refuse (malformed options) are ones p0f cannot label: its `bad` quirk matches no
    signature. Checks the claim behind raising FingerprintError instead of reporting `bad`."""
    from osfp.craft import Shape, build

    good = build(Shape(), sport=5000)
    bad = bytearray(build(Shape(), sport=5001))
    bad[45] = 5  # SACKOK (after the 4-byte MSS) with length 5 instead of 2
    bad_wscale = bytearray(build(Shape(), sport=5002))
    bad_wscale[58] = 1  # window scale (after mss, sok, ts, nop) with length 1
    pcap = tmp_path / "bad.pcap"
    write_pcap(pcap, [(1.0, good), (2.0, bytes(bad)), (3.0, bytes(bad_wscale))])
    theirs = {e.sport: e for e in run_p0f(pcap, db=stock_database_path())}
    assert theirs[5000].os is not None
    for port, packet in ((5001, bytes(bad)), (5002, bytes(bad_wscale))):
        assert theirs[port].os is None
        assert "bad" in theirs[port].raw_sig.split(":")[6]
        with pytest.raises(FingerprintError):
            Fingerprinter(stock_database_path()).fingerprint(packet)


def test_header_oddities_match_p0f(tmp_path: Path) -> None:
    """The corners where p0f's C differs from a plain reading of the headers, checked on p0f itself:
    the `ack+` bit test, non-zero EOL padding (last byte or not), `mss-12` only with TSval != 0."""
    from dataclasses import replace

    from osfp.craft import Shape, build

    base = Shape()
    packets: list[bytes] = []

    def add(packet: bytes) -> None:
        packets.append(packet)

    for i, ack in enumerate((0x0000_0001, 0x0100_0000, 0xFE00_0000, 0xFFFF_FFFF)):
        p = build(base, sport=6000 + i)
        add(p[:28] + struct.pack("!I", ack) + p[32:])
    eol = replace(base, layout=(2, 4, 8, 1, 3, 0), eol_pad=3)  # 20 + 1 + 3 bytes of options
    for i, where in enumerate((1, 3)):
        p = bytearray(build(eol, sport=6100 + i))
        p[40 + 20 + where] = 9
        add(bytes(p))
    # MSS 1400, window 1388 * 47: a multiple of mss-12 only; with TSval 0 p0f must not use it.
    for i, quirks in enumerate((set(), {"ts1-"})):
        add(build(replace(base.with_quirks(add=quirks), mss=1400, win=1388 * 47), sport=6200 + i))
    pcap = tmp_path / "odd.pcap"
    write_pcap(pcap, ((1.0 + i, p) for i, p in enumerate(packets)))
    theirs = {e.sport: e.raw_sig for e in run_p0f(pcap, db=stock_database_path())}
    fp = Fingerprinter(stock_database_path())
    ours = {struct.unpack_from("!H", p, 20)[0]: fp.fingerprint(p).sig for p in packets}
    assert ours == theirs
    assert "ack+" not in theirs[6000] and "ack+" in theirs[6001]  # what the comparison covered
    assert "opt+" in theirs[6100] and "opt+" not in theirs[6101]
    assert ":mss*47," in theirs[6200] and ":65236," in theirs[6201]
