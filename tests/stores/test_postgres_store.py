"""What `PostgresStore` does beyond the conformance suite: its schema (creation, version,
migrations run elsewhere), a pool the caller owns, what a notification carries, the listening
connection killed under a waiting reader, batches cut into set-based statements, and URLs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from durable_asgi.exceptions import StoreError
from durable_asgi.stores import Lease, store_from_url

from ..support.stores import Ids, drop_postgres_schema

asyncpg = pytest.importorskip("asyncpg")
from durable_asgi.stores._batch import runs  # noqa: E402
from durable_asgi.stores.postgres import PostgresStore  # noqa: E402
from durable_asgi.stores.postgres._sql import change_tag  # noqa: E402
from durable_asgi.stores.postgres._store import Op  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LONG = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio-only


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    await drop_postgres_schema(postgres_url, name)


async def claim(store: PostgresStore, sid: str) -> Lease:
    lease = await store.claim(sid, lease_seconds=LONG)
    assert isinstance(lease, Lease)
    return lease


async def test_schema_is_created_once_with_its_version(postgres_url: str, schema: str) -> None:
    stores = [PostgresStore(postgres_url, schema=schema, prefix="app_") for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))  # concurrently: one creates
        connection = await asyncpg.connect(postgres_url)
        try:
            tables = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1", schema
            )
            version = await connection.fetchval(
                f"SELECT value FROM {schema}.app_meta WHERE name = 'schema_version'"
            )
        finally:
            await connection.close()
        assert [t["tablename"] for t in tables] == ["app_meta", "app_segments", "app_streams"]
        assert version == "1"
    finally:
        for store in stores:
            await store.close()


async def test_a_newer_schema_is_refused(postgres_url: str, schema: str) -> None:
    store = PostgresStore(postgres_url, schema=schema)
    await store.open()
    await store.close()
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(
            f"UPDATE {schema}.durable_meta SET value = '2' WHERE name = 'schema_version'"
        )
    finally:
        await connection.close()
    newer = PostgresStore(postgres_url, schema=schema)
    with pytest.raises(StoreError, match="newer durable_asgi"):
        await newer.open()
    await newer.close()


async def test_migrations_run_elsewhere_apply_schema_sql(postgres_url: str, schema: str) -> None:
    store = PostgresStore(postgres_url, schema=schema, create_schema=False)
    with pytest.raises(StoreError, match="schema_sql"):
        await store.open()
    await store.close()
    sql = store.schema_sql()
    assert "{schema}" not in sql and f"{schema}.durable_streams" in sql
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(sql)  # what a Django RunSQL or an Alembic op.execute does
    finally:
        await connection.close()
    try:
        lease = await claim(store, "/chat#1")
        await store.append(lease, b"hello", chunks=1)
        assert (await store.read("/chat#1", 0, 100))[1] == b"hello"
    finally:
        await store.close()


async def test_a_pool_the_caller_owns_is_not_closed(postgres_url: str, schema: str) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=3)
    try:
        store = PostgresStore(pool, schema=schema)
        lease = await claim(store, "/p#1")
        await store.append(lease, b"x", chunks=1)
        await store.close()
        assert not pool._closed
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_notifications_carry_tags_not_data(postgres_url: str, schema: str) -> None:
    store = PostgresStore(postgres_url, schema=schema)
    await store.open()
    payloads: list[str] = []
    got = anyio.Event()
    connection = await asyncpg.connect(postgres_url)

    def heard(_: object, __: int, ___: str, payload: str) -> None:
        payloads.append(payload)
        got.set()

    try:
        await connection.add_listener(f"{schema}.durable_changes", heard)
        sid = "/secret-key#user-42"
        lease = await claim(store, sid)
        await store.append(lease, b"the secret answer", chunks=1)
        with anyio.fail_after(5):
            while change_tag(sid) not in " ".join(payloads).split():
                got = anyio.Event()
                await got.wait()
    finally:
        await connection.close()
        await store.close()
    for payload in payloads:
        assert "secret" not in payload and "user-42" not in payload
        assert all(len(tag) == 12 and int(tag, 16) >= 0 for tag in payload.split())


async def test_a_killed_listener_wakes_its_reader_and_comes_back(
    postgres_url: str, schema: str
) -> None:
    producer = PostgresStore(postgres_url, schema=schema)
    follower = PostgresStore(postgres_url, schema=schema)
    try:
        lease = await claim(producer, "/k#1")
        info, _ = await follower.read("/k#1", 0, 100)
        assert info is not None
        with anyio.fail_after(10):
            pid = await follower.listening()
            # A reader waits; the listening connection is killed under it: it returns (for a
            # catch-up read), though nothing changed.
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower.wait, info, LONG)
                await anyio.wait_all_tasks_blocked()
                killer = await asyncpg.connect(postgres_url)
                try:
                    assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
                finally:
                    await killer.close()
            # The listener reconnects on a new backend, and the next change wakes the reader.
            assert await follower.listening() != pid
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower.wait, info, LONG)
                await anyio.wait_all_tasks_blocked()
                await producer.append(lease, b"after", chunks=1)
        assert (await follower.read("/k#1", 0, 100))[1] == b"after"
    finally:
        await follower.close()
        await producer.close()


def test_a_batch_is_cut_into_few_runs_keeping_each_streams_order() -> None:
    ops = [
        Op("append", "a", "t", (b"1", 1)),
        Op("append", "b", "t", (b"1", 1)),
        Op("append", "a", "t", (b"2", 1)),  # a's second append: a statement after the first
        Op("renew", "c", "t", (5.0,)),
        Op("renew", "d", "t", (5.0,)),
        Op("finish", "a", "t", ("complete", 60.0, True)),
    ]
    assert runs(ops) == [[0, 1], [2], [3, 4], [5]]
    # A flush of new streams: each one's head, then its first chunk: two statements.
    flush = [Op(kind, sid, "t", ()) for sid in "abcd" for kind in ("start", "append")]
    assert runs(flush) == [[0, 2, 4, 6], [1, 3, 5, 7]]


async def test_large_appends_are_split_into_segments(postgres_url: str, schema: str) -> None:
    store = PostgresStore(postgres_url, schema=schema)
    body = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit
    try:
        lease = await claim(store, "/big#1")
        await store.append(lease, body, chunks=1)
        await store.finish(lease, "complete", ttl=LONG, retain=True)
        connection = await asyncpg.connect(postgres_url)
        try:
            sizes = await connection.fetch(
                f"SELECT length(data) AS n FROM {schema}.durable_segments ORDER BY start"
            )
        finally:
            await connection.close()
        assert [row["n"] for row in sizes] == [1 << 20, 1 << 20, 1 << 20, len(body) - (3 << 20)]
        assert (await store.read("/big#1", (1 << 20) - 5, 10))[1] == body[(1 << 20) - 5 :][:10]
    finally:
        await store.close()


def test_store_from_url_reads_the_stores_options(tmp_path: Path) -> None:
    store = store_from_url(
        "postgres://app:s3cret@db.internal:5433/app?schema=chat&max_connections=20&sslmode=require"
    )
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.max_connections) == ("chat", 20)
    assert store.dsn == "postgres://app:s3cret@db.internal:5433/app?sslmode=require"
    assert "s3cret" not in repr(store)  # never in a log
    with pytest.raises(ValueError, match="not a valid int"):
        store_from_url("postgresql://db/app?max_connections=many")
    strict = store_from_url("postgresql://db/app?synchronous_commit=on")
    assert isinstance(strict, PostgresStore) and strict.synchronous_commit is True
    with pytest.raises(ValueError, match="not a valid boolean"):
        store_from_url("postgresql://db/app?synchronous_commit=maybe")
    with pytest.raises(ValueError, match="lower-case identifier"):
        PostgresStore("postgresql://db/app", schema="Robert'); DROP TABLE students;--")


async def test_an_unreachable_server_is_a_store_error(ids: Ids) -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:9/test", command_timeout=2)
    with pytest.raises(StoreError, match="connect"):
        await store.claim(ids(), lease_seconds=LONG)
    await store.close()


@pytest.mark.parametrize("synchronous", [False, True])
async def test_the_stores_own_connections_commit_as_asked(
    postgres_url: str, schema: str, synchronous: bool
) -> None:
    store = PostgresStore(postgres_url, schema=schema, synchronous_commit=synchronous)
    try:
        await store.open()
        async with store._connection("test") as connection:
            setting = await connection.fetchval("SHOW synchronous_commit")
    finally:
        await store.close()
    assert setting == ("on" if synchronous else "off")
