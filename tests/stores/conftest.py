"""Fixtures of the tests that run against every store: `backend` is parametrized over
(store kind, async library) pairs (`tests.support.stores.BACKENDS`), and `anyio_backend`
follows it, so each store runs only on the event loops it supports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from durable_asgi.stores import Store

from ..support.stores import BACKENDS, Ids, StoreFactory, open_stores


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind, library = request.param
    return str(kind), str(library)


@pytest.fixture
def anyio_backend(backend: tuple[str, str]) -> str:
    return backend[1]


@pytest.fixture
def ids() -> Ids:
    """Fresh stream ids for one test (its data is deleted after it)."""
    return Ids()


@pytest.fixture
async def stores(
    backend: tuple[str, str], tmp_path: Path, ids: Ids, request: pytest.FixtureRequest
) -> AsyncIterator[StoreFactory]:
    """Makes stores of the test's backend that share their data (memory: each its own)."""
    async with open_stores(backend[0], tmp_path, ids, request) as factory:
        yield factory


@pytest.fixture
async def store(stores: StoreFactory) -> Store:
    """An open store of the test's backend (closed by `stores` at teardown)."""
    return await stores.new()
