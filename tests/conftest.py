"""Shared fixtures: a real redis-server per test, and network namespaces when root allows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Network, unavailable_reason
from lab.redis import RedisServer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_dir() -> Path:
    """../shared beside the checkout (CI lays a copy there too)."""
    for candidate in (SHARED, Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    pytest.skip("../shared is not beside this checkout")
    raise AssertionError  # unreachable


_NETNS_REASON: list[str | None] = []


def netns_reason() -> str | None:
    if not _NETNS_REASON:
        _NETNS_REASON.append(unavailable_reason())
    return _NETNS_REASON[0]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    # Its own short temporary folder: a unix socket path must stay under 108 bytes.
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_aof() -> Iterator[RedisServer]:
    server = RedisServer(aof=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def net() -> Iterator[Network]:
    reason = netns_reason()
    if reason:
        pytest.skip(reason)
    with Network() as network:
        yield network
