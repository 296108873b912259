"""`stepstone-lab demo|clean`: the virtual darknet demo, and removing what a killed run left."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from lab.netns import PREFIX, NetnsError, remove_stale
from lab.process import LabError
from lab.scenarios import DEFAULT_FILE, ScenarioError, load

# nftables tables lab components create; `clean` removes them from the current namespace too
# (a responder run by hand outside a namespace leaves its table here if killed with -9).
TABLES = ("stepstone_responder", "stepstone_persona", "stepstone_lab", "stepstone_check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepstone-lab",
        description="A virtual darknet in network namespaces (scanners, NAT relays, a proxy, whose truth "
        "is known), run live through the responder, the analyzer, Redis and a prober.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the lab scenarios; report Table 3, detection vs truth")
    demo.add_argument("--scenarios", type=Path, default=DEFAULT_FILE, metavar="FILE",
                      help=f"scenario file (default: {DEFAULT_FILE})")
    demo.add_argument("--json", action="store_true", help="print the report as one JSON object")
    demo.add_argument("--sensor", choices=("zeek", "zeek-cluster", "responder"), default=None,
                      help="who reports the handshakes: a real Zeek with the project's package on the "
                      "sensor's interface, a Zeek cluster there (a manager and two workers sharing the "
                      "interface by AF_PACKET fanout), or the built-in responder (default: zeek if a zeek "
                      "binary is on PATH, else responder); the responder answers the SYNs either way")
    demo.add_argument("--zeek-backend", choices=("broker", "zeromq"), default="broker",
                      help="with --sensor zeek-cluster: Zeek's cluster backend (default %(default)s; zeromq "
                      "needs Zeek 8, and adds a logger node)")
    demo.add_argument("--keep", type=Path, metavar="DIR",
                      help="keep the run's logs (stepstone.log, probes, every process's output) in DIR")
    demo.add_argument("--html", type=Path, metavar="FILE",
                      help="also write the run's report as one HTML page (plots, the truth marked)")
    clean = sub.add_parser("clean", help="remove namespaces, nftables tables and processes a killed run left")
    clean.add_argument("--prefix", default=PREFIX,
                       help="remove namespaces whose name starts with this (default %(default)s: every "
                       "lab's and test's; a run's own prefix is in its progress output)")
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    del frame
    # Unwind through every `finally` (the lab tears down there), as Ctrl-C does.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _strays(prefix: str) -> list[tuple[int, str]]:
    """Processes of killed lab runs outside the namespaces: Redis, the delay line (its arguments
    name the namespaces), anything working in a run's folder."""
    folder = f"{tempfile.gettempdir()}/{prefix}"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("-lab-" in cmdline and folder in cmdline) or ("lab.delay" in cmdline and f'"{prefix}' in cmdline):
            found.append((int(entry), cmdline.strip()))
    return found


def clean(prefix: str) -> int:
    removed = remove_stale(prefix)
    for name in removed:
        print(f"removed namespace {name}")
    for pid, cmdline in _strays(prefix):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            print(f"killed {pid}: {cmdline[:100]}")
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*-lab-*"):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {folder}")
    for table in TABLES:
        proc = subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
        if proc.returncode == 0:
            print(f"removed nftables table inet {table}")
    if not removed:
        print("no stray lab namespaces")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        if args.command == "clean":
            return clean(args.prefix)
        from lab.demo import run_demo
        from lab.report import render

        if os.geteuid() != 0:
            # First: a root's clone sits in a 0700 home, where anyone else cannot even read the scenarios.
            raise LabError("needs root: network namespaces, TUN devices and nftables "
                           "(run scripts/demo as root, or through sudo)")
        scenarios = load(args.scenarios)
        if args.keep is not None:
            # Before anything is built: a bad DIR is the user's typo, not a traceback mid-teardown.
            socket_path = args.keep.resolve() / "redis" / "redis.sock"  # where the lab's Redis listens
            if len(os.fsencode(socket_path)) >= 108:  # sun_path: redis-server refuses longer paths
                raise LabError(f"--keep {args.keep}: too long a path for the lab's Redis socket "
                               f"({socket_path} must be under 108 bytes); use a shorter DIR")
            try:
                args.keep.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LabError(f"--keep {args.keep}: cannot create it: {exc.strerror}") from None
        if args.html is not None and not os.access(args.html.resolve().parent, os.W_OK):
            raise LabError(f"--html {args.html}: cannot write in {args.html.resolve().parent}")
        result = run_demo(scenarios, progress=sys.stderr, keep=args.keep, sensor=args.sensor, html=args.html,
                          zeek_backend=args.zeek_backend)
        if args.json:
            print(json.dumps(result, indent=None, sort_keys=False))
        else:
            print(render(result))
        return 0
    except (ScenarioError, LabError, NetnsError) as exc:
        print(f"stepstone-lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepstone-lab: interrupted; the lab was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
