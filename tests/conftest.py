"""Shared fixtures: every async test runs on asyncio and trio unless it opts out (the tests
against every store, in `tests/stores/`, follow their store instead); one Redis and one
PostgreSQL per session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import anyio
import pytest

from .support.stores import (
    drop_postgres_schema,
    postgres_schema_url,
    postgres_server,
    redis_server,
)


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


@pytest.fixture
def postgres_store_url(postgres_url: str) -> Iterator[str]:
    """A ``postgresql://`` store URL naming a schema of this test's own, dropped after it."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield postgres_schema_url(postgres_url, schema)
    anyio.run(drop_postgres_schema, postgres_url, schema, backend="asyncio")
