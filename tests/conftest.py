"""Shared fixtures: every async test runs on asyncio and trio unless it opts out (the tests
against every store, in `tests/stores/`, follow their store instead); one Redis per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support.stores import redis_server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the session: ``$REDIS_URL``, else a private ``redis-server`` (skips
    without one; fails under CI, which must run every store)."""
    yield from redis_server()
