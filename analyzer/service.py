"""`stepstone-analyzer run`: the live service. (Being written: issue 5.)"""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the `run` subcommand to `sub` (argparse subparsers)."""
    del sub
