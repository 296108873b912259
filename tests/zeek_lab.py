"""What the end-to-end tests on Zeek share: their scenario set and their skip."""

from __future__ import annotations

import shutil

import pytest

from lab.netns import unavailable_reason

# A direct scanner, a NAT relay with another OS behind it (both conditions), a NAT relay with the
# same OS (timing only).
HOSTS = """
[[host]]
name = "direct"
kind = "direct"
persona = "linux"
rtt_ms = 20

[[host]]
name = "nat +50ms other OS"
kind = "nat"
persona = "linux"
attacker_persona = "windows"
rtt_ms = 20
extra_delay_ms = 50

[[host]]
name = "nat +20ms same OS"
kind = "nat"
persona = "linux"
rtt_ms = 10
extra_delay_ms = 20
"""


def scenarios(*, connections: int, traffic_s: int, settle_s: int = 30) -> str:
    """The three hosts, each opening `connections` connections over `traffic_s` seconds."""
    return (f"[lab]\nconnections = {connections}\ntraffic_s = {traffic_s}\nsettle_s = {settle_s}\n"
            + HOSTS)


def skip_without_zeek_or_netns() -> None:
    if shutil.which("zeek") is None:
        pytest.skip("no zeek binary on PATH")
    if reason := unavailable_reason():
        pytest.skip(reason)
