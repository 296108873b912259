"""Offline commands: fingerprint, replay, judge. (Being written: issue 2.)"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the `fingerprint`, `replay` and `judge` subcommands to `sub` (argparse subparsers)."""
    del sub


def _unused(args: argparse.Namespace) -> int:
    raise NotImplementedError
