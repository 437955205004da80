"""Stores of every backend (memory, SQLite, Redis, PostgreSQL) for tests: what
`tests/stores/conftest.py` and the root `conftest.py` (`redis_url`, `postgres_url`) build their
fixtures from.

`BACKENDS` are (store kind, async library) pairs: each store only runs on the event loops its
client library supports (the SQLite and Redis stores are asyncio-only, memory runs on both).

Redis: ``$REDIS_URL`` when set, else a private ``redis-server`` started on a free loopback port
for the session. Each test gets its own database (private server) and key prefix, and everything
it wrote is deleted afterwards. With neither available the Redis cases skip, except under CI
(``CI=true``), where they fail: CI must run every store.

PostgreSQL: ``$POSTGRES_URL`` when set, else the machine's server at 127.0.0.1:5432 (user
``postgres``, database ``test``, trust auth; `scripts/test` starts one under CI when none
answers). Each test gets a schema of its own, dropped afterwards. Skips (fails under CI) when no
server answers.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from durable_asgi.stores import MemoryStore, Store, stream_id

__all__ = [
    "BACKENDS",
    "SHARED_BACKENDS",
    "Ids",
    "StoreFactory",
    "drop_postgres_schema",
    "in_ci",
    "open_stores",
    "postgres_schema_url",
    "postgres_server",
    "redis_factory",
    "redis_server",
    "store_makers",
]

#: (store kind, async library) pairs every conformance test runs on.
BACKENDS = [
    pytest.param(("memory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory", "trio"), id="memory-trio"),
    pytest.param(("sqlite", "asyncio"), id="sqlite-asyncio"),
    pytest.param(("redis", "asyncio"), id="redis-asyncio", marks=pytest.mark.redis),
    pytest.param(("postgres", "asyncio"), id="postgres-asyncio", marks=pytest.mark.postgres),
]

#: The backends whose instances share streams (several instances = several workers).
SHARED_BACKENDS = [p for p in BACKENDS if p.values[0][0] != "memory"]

#: Databases of the private redis-server: one per test, flushed after it.
_REDIS_DATABASES = 256
_redis_db = itertools.count(1)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class Ids:
    """Fresh stream ids for one test, remembered so the test's data can be deleted after it."""

    def __init__(self) -> None:
        self.namespace = f"/t{uuid.uuid4().hex[:12]}"
        self.made: list[str] = []

    def __call__(self, key: str = "", *, owner: str | None = None) -> str:
        sid = stream_id(self.namespace, key or uuid.uuid4().hex[:8], owner)
        self.made.append(sid)
        return sid


@dataclass
class StoreFactory:
    """Makes store instances of one backend that all see the same data (`shared`) — except
    memory stores, which each hold their own. Closes every store it made at teardown."""

    kind: str
    make: Any
    shared: bool
    made: list[Store] = field(default_factory=list)

    async def new(self, *, opened: bool = True, **options: Any) -> Store:
        store: Store = self.make(**options)
        self.made.append(store)
        if opened:
            await store.open()
        return store

    async def close_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for store in reversed(self.made):
                await store.close()


def redis_server() -> Iterator[str]:
    """A Redis server for the session: ``$REDIS_URL``, else a private ``redis-server``."""
    url = os.environ.get("REDIS_URL", "").strip()
    if url:
        yield url
        return
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        reason = "no Redis: set REDIS_URL or install redis-server"
        if in_ci():
            pytest.fail(f"{reason} (CI is set: every store must be tested)")
        pytest.skip(reason)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            str(_REDIS_DATABASES),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # wait for it to listen (time-based: a process starting up)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def redis_factory(request: pytest.FixtureRequest, ids: Ids) -> tuple[Any, Any]:
    """A maker of RedisStores on an isolated key space, and a function that empties it."""
    try:
        from durable_asgi.stores.redis import RedisStore
    except ImportError as exc:
        pytest.skip(f"RedisStore not importable ({exc})")
    import redis

    url = request.getfixturevalue("redis_url")
    private = not os.environ.get("REDIS_URL", "").strip()
    if private:  # our own server: a database of its own per test
        url = f"{url}/{next(_redis_db) % (_REDIS_DATABASES - 1) + 1}"
    prefix = f"durable-test:{ids.namespace[2:]}"
    options: dict[str, Any] = {}
    parameters = inspect.signature(RedisStore).parameters
    for name in ("prefix", "key_prefix", "namespace"):
        if name in parameters:
            options[name] = prefix
            break

    def make(**extra: Any) -> Any:
        return RedisStore(url, **options, **extra)

    def clean() -> None:
        client = redis.Redis.from_url(url)
        try:
            if private:
                client.flushdb()
            elif options:
                for key in client.scan_iter(match=f"*{prefix}*", count=1000):
                    client.delete(key)
        finally:
            client.close()

    return make, clean


POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_server() -> str:
    """The PostgreSQL server for the session: ``$POSTGRES_URL``, else the machine's."""
    url = os.environ.get("POSTGRES_URL", "").strip() or POSTGRES_DEFAULT
    try:
        import asyncpg  # noqa: F401
    except ImportError as exc:
        reason = f"asyncpg not importable ({exc}): pip install 'durable-asgi[postgres]'"
        if in_ci():
            pytest.fail(f"{reason} (CI is set: every store must be tested)")
        pytest.skip(reason)
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2).close()
    except OSError as exc:
        reason = f"no PostgreSQL at {parts.hostname}:{parts.port or 5432} ({exc}): set POSTGRES_URL"
        if in_ci():
            pytest.fail(f"{reason} (CI is set: every store must be tested)")
        pytest.skip(reason)
    return url


def postgres_schema_url(url: str, schema: str) -> str:
    """`url` naming `schema` (an option `store_from_url` reads)."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def drop_postgres_schema(url: str, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def open_stores(
    kind: str, tmp_path: Path, ids: Ids, request: pytest.FixtureRequest
) -> AsyncIterator[StoreFactory]:
    """A `StoreFactory` of `kind`; everything it made is closed, and its data removed, after."""
    clean = None
    drop_schema: str | None = None
    if kind == "memory":
        factory = StoreFactory(kind, MemoryStore, shared=False)
    elif kind == "sqlite":
        from durable_asgi.stores.sqlite import SQLiteStore

        path = tmp_path / "durable.db"
        factory = StoreFactory(kind, lambda **o: SQLiteStore(path, **o), shared=True)
    elif kind == "postgres":
        from durable_asgi.stores.postgres import PostgresStore

        url = str(request.getfixturevalue("postgres_url"))
        drop_schema = f"t_{ids.namespace[2:]}"

        def make_postgres(**options: Any) -> Store:
            options.setdefault("schema", drop_schema)
            return PostgresStore(url, **options)

        factory = StoreFactory(kind, make_postgres, shared=True)
    else:
        make, clean = redis_factory(request, ids)
        factory = StoreFactory(kind, make, shared=True)
    try:
        yield factory
    finally:
        with anyio.CancelScope(shield=True):
            if clean is not None and factory.made:
                # Through the API first (works on any server), then whatever keys are left.
                with contextlib.suppress(Exception):
                    for sid in ids.made:
                        await factory.made[0].delete(sid)
            await factory.close_all()
            if clean is not None:
                clean()
            if drop_schema is not None and factory.made:
                await drop_postgres_schema(url, drop_schema)


def store_makers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """For a fixture parametrized by store kind (``request.param``): a function making store
    handles that share one database, as the workers of one deployment do (memory: one store,
    made once). Redis keys and PostgreSQL schemas are the test's own, removed after it."""
    if request.param == "memory":
        memory = MemoryStore()
        yield lambda: memory
    elif request.param == "sqlite":
        from durable_asgi.stores.sqlite import SQLiteStore

        yield lambda: SQLiteStore(tmp_path / "durable.db")
    elif request.param == "postgres":
        from durable_asgi.stores import store_from_url

        url = str(request.getfixturevalue("postgres_store_url"))  # a schema of its own
        yield lambda: store_from_url(url)
    else:
        make, clean = redis_factory(request, Ids())
        try:
            yield make
        finally:
            clean()
