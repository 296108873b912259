"""Ranges of numeric command-line options, shared by every stepstone CLI (prober, analyzer,
responder): a value outside its range is one line naming the option and the range, never a
traceback later (an OverflowError from `int(1e308 * 1000)`, say)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from prober.job import short

DAY = 86400.0
YEAR = 365 * DAY


def _number(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"


def check_ranges(args: argparse.Namespace, ranges: Mapping[str, tuple[float, float]]) -> None:
    """ValueError for the first option (by `dest`) whose value is outside [lo, hi] (nan and inf
    too); options left unset (None) are skipped."""
    for dest, (lo, hi) in ranges.items():
        value = getattr(args, dest, None)
        if value is not None and not lo <= value <= hi:
            raise ValueError(f"--{dest.replace('_', '-')} must be from {_number(lo)} to {_number(hi)}, "
                             f"not {short(value)}")
