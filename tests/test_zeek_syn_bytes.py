"""The SYN bytes the Zeek package publishes (HandshakeInfo.syn, base64 of the frame Zeek captured)
are the capture's SYN: run the real zeek with the package on real captures, rebuild each
StepStone::handshake event from what it printed, decode it the analyzer's way
(`analyzer.zeek.handshake_from_event`), fingerprint the SYN as the analyzer service does
(`osfp.Fingerprinter`) and compare with what `stepstone-analyzer fingerprint` says about the same
packet in the capture. Skipped without a zeek binary on PATH."""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analyzer.broker import Count, Enum, Event, Port, Timespan, Timestamp
from analyzer.capture import read_capture
from analyzer.packet import ip_from_frame
from analyzer.zeek import HANDSHAKE_EVENT, handshake_from_event
from osfp.fingerprinter import Fingerprinter

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
VLAN_TAG = ROOT / "tests" / "btest" / "Scripts" / "vlan-tag.py"

pytestmark = pytest.mark.zeek

# Prints one StepStone::handshake per line, every field in record order, space-separated; unset
# or empty fields are "-", the synacks vector is comma-separated, intervals and times in seconds.
PRINTER = r"""
redef StepStone::darknet_subnets = set();
redef StepStone::websocket_port = 0/tcp;

function s(i: interval): string
    {
    return fmt("%.6f", interval_to_double(i));
    }

function opt_count(h: StepStone::HandshakeInfo, name: string): string
    {
    local f = record_fields(h)[name];
    return f?$value ? cat(f$value) : "-";
    }

event StepStone::handshake(h: StepStone::HandshakeInfo)
    {
    local synacks = "";
    for ( i in h$synacks )
        synacks += ( i == 0 ? "" : "," ) + s(h$synacks[i]);
    print fmt("%s %.6f %s %s %d %s %d %s %d %s %s %s %s %s %d %s %s %s %s",
        h$uid, h$ts, s(h$syn_epoch), h$orig_h, port_to_count(h$orig_p), h$resp_h,
        port_to_count(h$resp_p), h$syn, h$link_type, h$encap, h$l3,
        opt_count(h, "vlan"), opt_count(h, "inner_vlan"), opt_count(h, "eth_type"),
        h$synack_count, synacks == "" ? "-" : synacks, h$reply == "" ? "-" : h$reply,
        h?$reply_epoch ? s(h$reply_epoch) : "-", h?$tp ? s(h$tp) : "-");
    }
"""


def _zeek() -> str:
    zeek = shutil.which("zeek")
    if zeek is None:
        pytest.skip("no zeek binary on PATH")
    return zeek


def _count(text: str) -> Count | None:
    return None if text == "-" else Count(int(text))


def _span(text: str) -> Timespan | None:
    return None if text == "-" else Timespan.from_seconds(float(text))


def _event(line: str) -> Event:
    """The StepStone::handshake event as it crosses the WebSocket, rebuilt from Zeek's printout."""
    (uid, ts, syn_epoch, orig_h, orig_p, resp_h, resp_p, syn, link_type, encap, l3, vlan, inner_vlan,
     eth_type, synack_count, synacks, reply, reply_epoch, tp) = line.split(" ")  # fmt: skip
    info: tuple[Any, ...] = (
        uid,
        Timestamp.from_seconds(float(ts)),
        _span(syn_epoch),
        ipaddress.ip_address(orig_h),
        Port(int(orig_p), "tcp"),
        ipaddress.ip_address(resp_h),
        Port(int(resp_p), "tcp"),
        syn,
        int(link_type),
        Enum(encap),
        Enum(l3),
        _count(vlan),
        _count(inner_vlan),
        _count(eth_type),
        Count(int(synack_count)),
        tuple(_span(t) for t in synacks.split(",") if t != "-"),
        "" if reply == "-" else reply,
        _span(reply_epoch),
        _span(tp),
    )
    return Event(HANDSHAKE_EVENT, (info,))


def _zeek_handshakes(capture: Path, tmp_path: Path) -> list[Event]:
    script = tmp_path / "print-handshakes.zeek"
    script.write_text(PRINTER)
    out = subprocess.run(
        [_zeek(), "-b", "-C", "-r", str(capture), str(ROOT / "zeek-scripts"), str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0 and not out.stderr, out.stderr
    return [_event(line) for line in out.stdout.splitlines()]


def _fingerprint_cli(capture: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """`stepstone-analyzer fingerprint` on the capture: its SYN lines by (src, sport, time in µs)."""
    out = subprocess.run(
        [sys.executable, "-m", "analyzer.cli", "fingerprint", str(capture)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return {(d["src"], d["sport"], round(d["ts"] * 1e6)): d for d in lines if d["kind"] == "syn"}


def _capture_ips(capture: Path) -> dict[int, list[bytes]]:
    """The IP packet of every frame of the capture, by its time in µs."""
    out: dict[int, list[bytes]] = {}
    for _number, ts_ns, linktype, frame, _length in read_capture(capture):
        out.setdefault(ts_ns // 1000, []).append(ip_from_frame(linktype, frame))
    return out


def _tagged(tmp_path: Path) -> Path:
    tagged = tmp_path / "vnc-scanner-vlan.pcap"
    subprocess.run(
        [sys.executable, str(VLAN_TAG), str(DATA / "captures" / "vnc-scanner.pcap"), str(tagged)],
        check=True,
        capture_output=True,
    )
    return tagged


@pytest.mark.parametrize(
    ("name", "handshakes"),
    [("handshakes.pcap", 6), ("vnc-scanner.pcap", 191), ("vnc-scanner.pcap tagged", 191)],
)
def test_the_syn_zeek_publishes_is_the_capture_syn_with_the_same_p0f_label(
    tmp_path: Path, name: str, handshakes: int
) -> None:
    capture = {
        "handshakes.pcap": DATA / "zeek-ws" / "handshakes.pcap",
        "vnc-scanner.pcap": DATA / "captures" / "vnc-scanner.pcap",
    }.get(name) or _tagged(tmp_path)
    events = _zeek_handshakes(capture, tmp_path)
    cli = _fingerprint_cli(capture)
    ips = _capture_ips(capture)
    fingerprinter = Fingerprinter()
    labels = set()
    assert len(events) == handshakes
    for event in events:
        h = handshake_from_event(event)
        uid = event.args[0][0]
        assert h.syn is not None, uid
        t_us = round(h.t * 1e6)
        # Byte for byte the capture's SYN, without link layer, VLAN tags or Ethernet padding.
        assert h.syn in ips[t_us], uid
        fp = fingerprinter.fingerprint(h.syn)
        expected = cli[(h.src, h.sport, t_us)]
        assert (fp.label, fp.sig) == (expected["label"], expected["sig"]), uid
        labels.add(fp.label)
    # The captures hold SYNs p0f names and SYNs it does not; both must agree.
    if name == "handshakes.pcap":
        assert labels == {"unix:Linux:2.2.x-3.x", None}
    else:
        assert labels == {"win:Windows:7 or 8"}


def test_the_frames_zeek_saw_carry_the_vlan_tags(tmp_path: Path) -> None:
    events = _zeek_handshakes(_tagged(tmp_path), tmp_path)
    tags = set()
    for event in events:
        info = event.args[0]
        frame = base64.b64decode(info[7])
        ethertype = frame[12:14].hex()
        tags.add((ethertype, info[11], info[12]))
    # One 802.1Q tag (VLAN 1411) or QinQ (802.1ad VLAN 100 around 802.1Q VLAN 1411): the frame is
    # the tagged one, and Zeek's $l2 names the tags.
    assert tags == {("8100", 1411, None), ("88a8", 100, 1411)}
