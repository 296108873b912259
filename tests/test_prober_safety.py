"""Target policy: special-purpose space refused unless allowed, exclude always wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from prober.cli import main
from prober.safety import TargetPolicy, parse_networks

SPECIAL = [
    "0.1.2.3", "10.0.0.1", "100.64.0.1", "127.0.0.1", "169.254.1.1", "172.16.5.5", "192.0.0.8",
    "192.0.2.1", "192.168.1.1", "198.18.0.1", "198.19.255.254", "198.51.100.7", "203.0.113.9",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::", "::1", "::ffff:8.8.8.8", "64:ff9b::808:808", "100::1", "2001:db8::1", "fc00::1",
    "fd12:3456::1", "fe80::1", "ff02::1", "2002:c000:204::1",
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "198.17.255.255", "198.20.0.0", "100.128.0.1", "2606:4700::1111",
          "2a00:1450::1"]


@pytest.mark.parametrize("address", SPECIAL)
def test_special_purpose_refused_by_default(address: str) -> None:
    reason = TargetPolicy().refusal(address)
    assert reason is not None and "special-purpose" in reason and "--allow" in reason


@pytest.mark.parametrize("address", GLOBAL)
def test_global_addresses_allowed(address: str) -> None:
    assert TargetPolicy().refusal(address) is None


def test_allow_opens_only_the_named_network() -> None:
    policy = TargetPolicy(allow=parse_networks(["198.18.0.0/15", "fd61::/64"], "--allow"))
    assert policy.refusal("198.18.3.4") is None
    assert policy.refusal("fd61::2") is None
    assert policy.refusal("fd62::2") is not None
    assert policy.refusal("10.0.0.1") is not None


def test_exclude_beats_allow_and_global() -> None:
    policy = TargetPolicy(allow=parse_networks(["198.18.0.0/15"], "--allow"),
                          exclude=parse_networks(["198.18.7.0/24", "8.8.8.0/24", "2606:4700::/32"], "-x"))
    assert policy.refusal("198.18.7.1") == "excluded by --exclude 198.18.7.0/24"
    assert policy.refusal("198.18.8.1") is None
    assert "excluded" in (policy.refusal("8.8.8.8") or "")
    assert "excluded" in (policy.refusal("2606:4700::1111") or "")
    assert policy.refusal("8.8.4.4") is None


def test_bad_cidr_and_bad_address() -> None:
    with pytest.raises(ValueError, match="--allow 'nonsense'"):
        parse_networks(["nonsense"], "--allow")
    assert "not an IP address" in (TargetPolicy().refusal("example.com") or "")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--rate", "nan", "--rate and --target-interval must be finite"),
        ("--rate", "inf", "--rate and --target-interval must be finite"),
        ("--target-interval", "nan", "--rate and --target-interval must be finite"),
        ("--target-interval", "inf", "--rate and --target-interval must be finite"),
        ("--claim-idle", "nan", "claim idle time and heartbeat must be positive"),
        ("--claim-idle", "inf", "claim idle time and heartbeat must be positive"),
    ],
)
def test_run_refuses_limits_that_are_not_numbers(
    option: str, value: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before any connection: the Redis URL below would fail later with another message.
    argv = ["run", "--redis", "unix:///nonexistent/redis.sock", "--audit-log", str(tmp_path / "a"),
            option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("option", ["--p0f-db", "--db"])
def test_p0f_db_option_named_as_in_the_analyzer(option: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A missing database stops `probe` at start-up, before anything is sent: the option reached the
    # prober under either name. (Loopback, so that even a regression here sends nothing outside.)
    argv = ["probe", "127.0.0.1", "--allow", "127.0.0.0/8", "--ports", "9", "--count", "1",
            "--audit-log", str(tmp_path / "a"), option, str(tmp_path / "none.fp")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none.fp" in err and err.count("\n") == 1, err
