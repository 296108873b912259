"""Shared fixtures: a real redis-server per test, network namespaces when root allows, the test data."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from service_harness import Harness, open_harness

from lab.netns import Network, unavailable_reason
from lab.redis import RedisServer

# Everything the tests read lives in the repository (a user's clone has nothing beside it):
# data/captures (real captures, with their licences) and data/zeek-ws (recorded from a real Zeek).
DATA = Path(__file__).resolve().parent / "data"


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


@pytest.fixture
async def harness(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Harness]:
    """The analyzer tests' Redis client, stream helpers and log dir (tests/service_harness.py)."""
    async with open_harness(redis_server, tmp_path / "logs") as h:
        yield h
