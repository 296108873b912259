"""`stepstone-analyzer fingerprint | replay | judge` end to end on captures and records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from capfiles import (
    Conn,
    ethernet,
    handshake_cases,
    pcapng_epb,
    pcapng_idb,
    pcapng_shb,
    sll2,
    write_pcap,
)
from conftest import DATA

from analyzer.cli import main
from analyzer.record import Record

FINGERPRINT_FIELDS = ["ts", "src", "sport", "dst", "dport", "kind",
                      "label", "generic", "match", "distance", "sig"]
RECORD_FIELDS = ["t", "src", "dst", "tp_us", "ping_min_us", "ping_avg_us", "ping_max_us", "ping_var_us2",
                 "syn_rtt_us", "fp", "fa", "syn_dist", "fa_dist"]
VERDICT_FIELDS = ["src", "cond_os", "cond_timing", "relay", "tp_mean_us", "ta_max_mean_us", "samples"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def jsonl(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


@pytest.fixture
def cases_pcap(tmp_path: Path) -> Path:
    frames = [(ts, ethernet(ip, vlans=[42])) for ts, ip in handshake_cases()]
    return write_pcap(tmp_path / "cases.pcap", frames)


def test_fingerprint_lines(capsys: pytest.CaptureFixture[str], cases_pcap: Path) -> None:
    from osfp.fingerprinter import Fingerprinter

    code, lines, err = run(capsys, "fingerprint", str(cases_pcap))
    assert code == 0 and err == ""
    rows = jsonl(lines)
    # 6 SYNs and 7 SYN+ACKs (one retransmitted); ACKs and the RST are not fingerprinted.
    assert [r["kind"] for r in rows].count("syn") == 6 and [r["kind"] for r in rows].count("synack") == 7
    assert all(list(r) == FINGERPRINT_FIELDS for r in rows)
    first = rows[0]
    assert (first["ts"], first["src"], first["sport"], first["dst"], first["dport"], first["kind"]) == (
        1000.0, "203.0.113.10", 40001, "198.18.0.5", 23, "syn")
    assert rows[1]["kind"] == "synack" and rows[1]["ts"] == 1000.0001 and rows[1]["src"] == "198.18.0.5"
    # Same answers as the fingerprinter itself, packet by packet, in file order (SYN+ACKs use the
    # MSS of their SYN).
    fp = Fingerprinter()
    syn_flag_at = {4: 20 + 13, 6: 40 + 13}
    handshake_syns = [ip for _, ip in handshake_cases() if ip[syn_flag_at[ip[0] >> 4]] & 2]
    expected = [fp.fingerprint(ip).to_dict() for ip in handshake_syns]
    assert [{k: r[k] for k in ("label", "generic", "match", "distance", "sig")} for r in rows] == expected
    assert any(r["src"] == "2001:db8::10" for r in rows)


def test_fingerprint_pcapng_sll2_and_stock_db(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from osfp.fingerprinter import stock_database_path

    c = Conn("203.0.113.77", "198.18.0.1", 5555, 80)
    path = tmp_path / "a.pcapng"
    path.write_bytes(pcapng_shb() + pcapng_idb(276, tsresol=9) + pcapng_epb(0, 42_000_000_123, sll2(c.syn())))
    code, lines, _ = run(capsys, "fingerprint", str(path), "--p0f-db", str(stock_database_path()))
    assert code == 0
    (row,) = jsonl(lines)
    assert row["ts"] == 42.0 and row["sport"] == 5555 and row["kind"] == "syn"  # µs in the output
    assert row["sig"].startswith("4:64+0:0:1460:")


def test_replay_records(capsys: pytest.CaptureFixture[str], cases_pcap: Path) -> None:
    code, lines, err = run(capsys, "replay", str(cases_pcap), "--darknet", "198.18.0.0/15",
                           "--darknet", "2001:db8:ffff::/48")
    assert code == 0 and err == ""
    rows = jsonl(lines)
    assert all(list(r) == RECORD_FIELDS for r in rows)
    records = {r["src"]: Record.from_json(r) for r in rows}  # every line passes the contract check
    assert {src: r.tp_us for src, r in records.items()} == {
        "203.0.113.10": 20_000, "203.0.113.11": None, "203.0.113.12": 30_000, "2001:db8::10": 40_000,
        "203.0.113.14": 10_000,
    }  # the unanswered connection gives no record
    for r in records.values():
        assert r.ping_min_us is r.ping_avg_us is r.ping_max_us is r.ping_var_us2 is None
        assert r.syn_rtt_us is r.fa is None
    assert records["203.0.113.10"].t == 1000.0 and records["203.0.113.10"].dst == "198.18.0.5"
    assert records["2001:db8::10"].dst == "2001:db8:ffff::5"
    # The RST case's SYN has no options; the others carry the fingerprint the fingerprinter gives.
    from osfp.fingerprinter import Fingerprinter

    assert records["203.0.113.10"].fp == Fingerprinter().fingerprint(handshake_cases()[0][1]).label
    # The SYN's hop distance (analyzer/hops.py): p0f's for a stack's SYN; null for the RST case's
    # option-less SYN (a crafted one); the SYN+ACK's is the probe's, so null offline.
    assert records["203.0.113.10"].syn_dist == Fingerprinter().fingerprint(handshake_cases()[0][1]).hops
    assert records["203.0.113.10"].syn_dist is not None
    assert records["203.0.113.12"].syn_dist is None
    assert all(r.fa_dist is None for r in records.values())


def test_replay_summary_text_and_json(capsys: pytest.CaptureFixture[str], cases_pcap: Path) -> None:
    args = ["replay", str(cases_pcap), "--darknet", "198.18.0.0/15", "--darknet", "2001:db8:ffff::/48",
            "--summary"]
    code, lines, _ = run(capsys, *args)
    assert code == 0
    assert lines[0].split() == ["darknet", "addresses", "2"]
    assert lines[1].split() == ["answered", "connection", "requests", "5"]
    assert lines[2].split() == ["unique", "sources", "5"]
    code, lines, _ = run(capsys, *args, "--json")
    (table,) = jsonl(lines)
    assert table["darknet_addresses"] == 2 and table["answered"] == 5 and table["unique_sources"] == 5
    assert (table["timed"], table["ambiguous"], table["unanswered"], table["packets"]) == (4, 1, 1, 18)


def test_replay_only_the_given_darknet(capsys: pytest.CaptureFixture[str], cases_pcap: Path) -> None:
    code, lines, _ = run(capsys, "replay", str(cases_pcap), "--darknet", "2001:db8:ffff::/48")
    assert code == 0 and [r["src"] for r in jsonl(lines)] == ["2001:db8::10"]


def test_replay_real_vnc_scanner_capture(capsys: pytest.CaptureFixture[str]) -> None:
    """Real traffic (VLAN-tagged, two taps merged: some SYN+ACKs precede their SYN)."""
    path = DATA / "captures" / "vnc-scanner.pcap"
    code, lines, err = run(capsys, "replay", str(path), "--darknet", "136.159.0.0/16")
    assert code == 0 and err == ""
    records = [Record.from_json(r) for r in jsonl(lines)]
    timed = [r for r in records if r.tp_us is not None]
    # 193 timed handshakes, plus one whose SYN+ACK was retransmitted (Karn: no T^p).
    assert len(timed) == 193 and len(records) == 194
    assert all(0 < r.tp_us < 1_000_000 for r in timed)  # type: ignore[operator]
    assert {r.fp for r in records} == {"win:Windows:7 or 8"}  # p0f 3.09b says so too (captures README)
    code, lines, _ = run(capsys, "replay", str(path), "--darknet", "136.159.0.0/16", "--summary", "--json")
    (table,) = jsonl(lines)
    assert (table["darknet_addresses"], table["answered"], table["unique_sources"]) == (20, 194, 4)
    assert table["packets"] == 3055 and table["stray"] == 3


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(src: str, t: float, tp: int | None, ping_max: int | None, *, fp: str | None = None,
           fa: str | None = None) -> dict[str, Any]:
    return {"t": t, "src": src, "dst": "198.18.0.1", "tp_us": tp, "ping_min_us": ping_max,
            "ping_avg_us": ping_max, "ping_max_us": ping_max,
            "ping_var_us2": 0.0 if ping_max is not None else None, "syn_rtt_us": None, "fp": fp, "fa": fa}


def test_judge_verdicts_and_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_records(tmp_path / "r.jsonl", [
        record("192.0.2.1", 100, 9000, 1000),  # timing
        record("192.0.2.2", 100, 10, 1000, fp="unix:Linux:3.11 and newer", fa="win:Windows:7 or 8"),  # OS
        record("192.0.2.3", 100, 500, 1000, fp="unix:Linux:3.11 and newer", fa="unix:Linux:2.2.x-3.x"),
        record("192.0.2.3", 100 + 86400, 500, 1000),
    ])
    code, lines, err = run(capsys, "judge", str(path))
    assert code == 0 and err == ""
    verdicts = jsonl(lines)
    assert [v["src"] for v in verdicts] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert all(list(v)[:7] == VERDICT_FIELDS for v in verdicts)
    assert [(v["cond_os"], v["cond_timing"], v["relay"]) for v in verdicts] == [
        (False, True, True), (True, False, True), (False, False, False)]
    assert verdicts[0]["tp_mean_us"] == 9000 and verdicts[0]["ta_max_mean_us"] == 1000
    assert verdicts[0]["samples"] == 1 and verdicts[2]["records"] == 2
    # The analyzer's own evidence rides along: 8 ms margin > 5 ms floor; the OS mismatch alone is
    # `shared` (issue 10), not a confident relay.
    assert [v["relay_confident"] for v in verdicts] == [True, False, False]
    assert [v["kind"] for v in verdicts] == ["forwarding", "shared", "none"]
    assert [[e["test"] for e in v["evidence"]] for v in verdicts] == [["timing"], ["os"], []]
    # flavour level: 192.0.2.3 now mismatches (both records in the inclusive window).
    code, lines, _ = run(capsys, "judge", str(path), "--os-level", "flavor")
    assert jsonl(lines)[2]["cond_os"] is True
    # A shorter window drops 192.0.2.3's old record.
    code, lines, _ = run(capsys, "judge", str(path), "--os-level", "flavor", "--window", "86399.5")
    assert jsonl(lines)[2]["cond_os"] is False and jsonl(lines)[2]["records"] == 1
    # --now moves every window.
    code, lines, _ = run(capsys, "judge", str(path), "--now", "50")
    assert not any(v["relay"] for v in jsonl(lines))
    code, lines, _ = run(capsys, "judge", str(path), "--summary")
    assert [line.split()[-1] for line in lines] == ["1", "1", "2", "3", "1", "1", "0", "1", "1"]
    assert lines[4].startswith("relays confident") and lines[5].startswith("kind forwarding")
    assert lines[0].startswith("relays by (1)") and lines[2].startswith("relays in total")
    code, lines, _ = run(capsys, "judge", str(path), "--summary", "--json")
    assert jsonl(lines) == [{"sources": 3, "relays_by_os": 1, "relays_by_timing": 1, "relays": 2,
                             "relays_confident": 1, "kind_forwarding": 1, "kind_terminating": 0,
                             "kind_shared": 1, "kind_none": 1}]


def test_replay_piped_into_judge(cases_pcap: Path) -> None:
    """The installed command, as a user runs it: replay's records are judge's input."""
    replay = subprocess.run(
        [sys.executable, "-m", "analyzer.cli", "replay", str(cases_pcap), "--darknet", "198.18.0.0/15"],
        capture_output=True, check=True,
    )
    judged = subprocess.run([sys.executable, "-m", "analyzer.cli", "judge", "-"], input=replay.stdout,
                            capture_output=True, check=True)
    verdicts = jsonl(judged.stdout.decode().splitlines())
    assert len(verdicts) == 4  # four IPv4 sources answered
    assert not any(v["relay"] for v in verdicts)  # no ping data, no fa: nothing to decide on
    assert all(v["samples"] == 0 and v["records"] == 1 for v in verdicts)


def test_replay_pcapng_mixed_link_types(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """One file, three interfaces (SLL2, raw IP, Ethernet+QinQ), packets interleaved."""
    from capfiles import sll2 as wrap_sll2

    wraps = [(0, wrap_sll2), (1, lambda ip: ip), (2, lambda ip: ethernet(ip, vlans=[10, 20], tpid=0x88A8))]
    blocks = pcapng_shb() + pcapng_idb(276) + pcapng_idb(101, tsresol=9) + pcapng_idb(1, tsresol=3)
    for n, (ts, ip) in enumerate(handshake_cases()):
        iface, wrap = wraps[n % 3]
        units = {0: ts // 1000, 1: ts, 2: ts // 1_000_000}[iface]
        blocks += pcapng_epb(iface, units, wrap(ip))
    path = tmp_path / "mixed.pcapng"
    path.write_bytes(blocks)
    code, lines, err = run(capsys, "replay", str(path), "--darknet", "198.18.0.0/15", "--darknet",
                           "2001:db8:ffff::/48")
    assert code == 0 and err == ""
    tp = {r["src"]: r["tp_us"] for r in jsonl(lines)}
    # Interface 2 keeps only milliseconds: SYN+ACKs stamped .0001 there read .000, and ACKs stamped
    # x.0201 read x.020, so each T^p shows exactly which interface's clock it came from.
    assert tp == {"203.0.113.10": 19_900, "203.0.113.11": None, "203.0.113.12": 30_100,
                  "2001:db8::10": 39_900, "203.0.113.14": 9_900}


def test_replay_real_scan_capture_without_replies(capsys: pytest.CaptureFixture[str]) -> None:
    """A border tap with SYNs only (shared/data/captures/scan-ng-23-tcp.pcap): no handshakes."""
    path = DATA / "captures" / "scan-ng-23-tcp.pcap"
    code, lines, err = run(capsys, "replay", str(path), "--darknet", "0.0.0.0/0", "--summary", "--json")
    assert code == 0 and err == ""
    (table,) = jsonl(lines)
    # 1,497 connection requests: the SYN flows Debian's p0f logs on the same file.
    assert table["connection_requests"] == 1497 and table["no_synack"] == 1497 and table["answered"] == 0
    assert table["packets"] == 1557 and table["repeated_syns"] == 59


def test_judge_app_allowance(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # A client answering banners 40 ms after the path RTT: a proxy's onward leg at the default
    # 10 ms allowance, a slow direct client when the operator allows 50 ms.
    slow = [{**record("192.0.2.9", 100 + i, 1000, 1000), "tapp_us": 41_000} for i in range(3)]
    path = write_records(tmp_path / "r.jsonl", slow)
    code, lines, _ = run(capsys, "judge", str(path))
    (verdict,) = jsonl(lines)
    assert code == 0 and verdict["cond_app"] and verdict["kind"] == "terminating"
    code, lines, _ = run(capsys, "judge", str(path), "--app-allowance", "50")
    (verdict,) = jsonl(lines)
    assert code == 0 and not verdict["cond_app"] and verdict["kind"] == "none"
    for bad in ("-1", "10001", "nan"):
        code, lines, err = run(capsys, "judge", str(path), "--app-allowance", bad)
        assert code == 2 and lines == [] and err.count("\n") == 1 and "--app-allowance" in err
