"""`stepstone-analyzer`: offline commands on captures and records, and the live service."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from analyzer import htmlreport, offline, service
from analyzer.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepstone-analyzer",
        description="Find stepping stones (relays) among the sources that hit a darknet: compare the "
        "passive handshake RTT and p0f fingerprint of each source's SYN with an active probe of the "
        "same address.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    offline.register(sub)
    service.register(sub)
    htmlreport.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"stepstone-analyzer: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `... | head` closed stdout: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
