"""Shared fixtures: every async test runs on asyncio and trio unless it opts out (the tests
against every store, in `tests/stores/`, follow their store instead); one Redis and one
PostgreSQL per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support.stores import postgres_server, redis_server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the session: ``$REDIS_URL``, else a private ``redis-server`` (skips
    without one; fails under CI, which must run every store)."""
    yield from redis_server()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server for the session: ``$POSTGRES_URL``, else 127.0.0.1:5432 database
    ``test`` (skips without one; fails under CI, which must run every store)."""
    return postgres_server()
