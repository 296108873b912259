"""Run the original p0f 3.09b (Debian's `p0f` binary) on a capture and read what it logged.

The reference our labels are tested against (tests/test_p0f_agreement.py) and timed against
(bench/fingerprint_bench.py). p0f logs one `mod=syn` / `mod=syn+ack` line per flow it fingerprints
(`sendsyn probe` / `sendsyn response` for p0f-sendsyn's own packets) with `os=` (or `app=` for
userland tools such as NMap), `???` when nothing matched.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_KINDS = {"syn": "syn", "sendsyn probe": "syn", "syn+ack": "synack", "sendsyn response": "synack"}


class P0fError(RuntimeError):
    """p0f is missing or failed (the message carries what it printed)."""


@dataclass(frozen=True, slots=True)
class P0fEntry:
    kind: str  # "syn" | "synack"
    src: str  # the fingerprinted packet's source (client for a SYN, server for a SYN+ACK)
    sport: int
    dst: str
    dport: int
    os: str | None  # "name flavor" as p0f prints it; None for "???"
    dist: str  # "N" or "<= N" (random-TTL signatures)
    params: str
    raw_sig: str

    @property
    def key(self) -> tuple[str, int, str, int, str]:
        return (self.src, self.sport, self.dst, self.dport, self.kind)


def p0f_binary() -> str | None:
    return shutil.which("p0f") or next(
        (p for p in ("/usr/sbin/p0f", "/usr/bin/p0f") if Path(p).exists()), None
    )


def run_p0f(capture: Path, *, db: Path | None = None, log: Path | None = None) -> list[P0fEntry]:
    """`p0f -r capture -o log [-f db]`; returns its SYN and SYN+ACK entries in log order."""
    binary = p0f_binary()
    if binary is None:
        raise P0fError("p0f is not installed (Debian package p0f)")
    with tempfile.TemporaryDirectory(prefix="osfp-p0f-") as tmp:
        log_path = log or Path(tmp) / "p0f.log"
        log_path.unlink(missing_ok=True)  # p0f appends
        args = [binary, "-r", str(capture), "-o", str(log_path)]
        if db is not None:
            text = db.read_bytes()
            if b"\r\n" in text:
                # pyp0f ships p0f.fp with CRLF line ends, which p0f's own parser rejects.
                db = Path(tmp) / "p0f.fp"
                db.write_bytes(text.replace(b"\r\n", b"\n"))
            args += ["-f", str(db)]
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not log_path.exists():
            raise P0fError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return parse_log(log_path.read_text())


def parse_log(text: str) -> list[P0fEntry]:
    entries = []
    for line in text.splitlines():
        _, _, body = line.partition("] ")
        fields = dict(item.split("=", 1) for item in body.split("|") if "=" in item)
        kind = _KINDS.get(fields.get("mod", ""))
        if kind is None:
            continue
        cli, cport = _endpoint(fields["cli"])
        srv, sport = _endpoint(fields["srv"])
        os_text = fields.get("os", fields.get("app"))
        if os_text == "???":
            os_text = None
        if kind == "syn":
            src, src_port, dst, dst_port = cli, cport, srv, sport
        else:
            src, src_port, dst, dst_port = srv, sport, cli, cport
        entries.append(
            P0fEntry(
                kind,
                src,
                src_port,
                dst,
                dst_port,
                os_text,
                fields.get("dist", ""),
                fields.get("params", ""),
                fields.get("raw_sig", ""),
            )
        )
    return entries


def _endpoint(text: str) -> tuple[str, int]:
    addr, _, port = text.rpartition("/")
    # p0f prints IPv6 without "::" compression; normalise so keys compare with ours.
    return str(ipaddress.ip_address(addr)), int(port)


def os_text(label: str | None) -> str | None:
    """Our `class:name:flavor` label as p0f prints it (`name flavor`, or `name` without a flavor)."""
    if label is None:
        return None
    _, name, flavor = label.split(":", 2)
    return f"{name} {flavor}" if flavor else name
