"""Security: owner binding, what is (never) stored, how keys become store ids.

Run against every store (memory, SQLite, Redis, PostgreSQL). Besides the API we look at what
the store really holds — the SQLite file's bytes, every Redis key and value, every PostgreSQL
row of the store's tables — for secrets that must never
get there: request headers, cookies, raw owner-bound or non-printable keys. The threat model
these pin is `docs/threat-model.md`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from durable_asgi import DurableMiddleware, keys
from durable_asgi._types import Receive, Scope, Send

from ..support.apps import StreamApp, wait_thread_event
from ..support.asgi import Result, call
from ..support.stores import StoreFactory

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-Zq8vX1"
CHUNKS = [b"part %02d|" % i for i in range(12)]
BODY = b"".join(CHUNKS)


async def middleware(stores: StoreFactory, app: Any, **options: Any) -> DurableMiddleware:
    mw = DurableMiddleware(app, store=await stores.new(opened=False), poll_interval=0.05, **options)
    await mw.engine.ensure_open()
    return mw


async def raw_store_bytes(mw: DurableMiddleware, stores: StoreFactory) -> bytes:
    """Everything the store holds, as bytes, to search for what must not be there."""
    store = mw.store_checked
    if stores.kind == "sqlite":
        path = store.path  # type: ignore[attr-defined]

        def read_files() -> bytes:
            files = [Path(path), Path(f"{path}-wal")]
            return b"".join(f.read_bytes() for f in files if f.exists())

        return await anyio.to_thread.run_sync(read_files)
    if stores.kind == "redis":
        client = store._connection.client  # type: ignore[attr-defined]
        out = []
        async for name in client.scan_iter(count=1000):
            out.append(name)
            kind = (await client.type(name)).decode()
            if kind == "hash":
                for k, v in (await client.hgetall(name)).items():
                    out += [k, v]
            elif kind == "stream":
                for _, fields in await client.xrange(name):
                    for k, v in fields.items():
                        out += [k, v]
            elif kind == "string":
                out.append(await client.get(name))
        return b"\n".join(o if isinstance(o, bytes) else str(o).encode() for o in out)
    if stores.kind == "postgres":
        import asyncpg

        connection = await asyncpg.connect(store.dsn)  # type: ignore[attr-defined]
        try:
            tables = f"{store.schema}.{store.prefix}"  # type: ignore[attr-defined]
            rows = [
                r[0].encode()
                for table in ("streams", "meta")
                for r in await connection.fetch(f"SELECT t::text FROM {tables}{table} t")
            ]
            rows += [r[0] for r in await connection.fetch(f"SELECT data FROM {tables}segments")]
        finally:
            await connection.close()
        return b"\n".join(rows)
    out = []
    async for info in store.scan():
        out.append(repr(info).encode())
        _, data = await store.read(info.id, 0, 1 << 30)
        out.append(data)
    return b"\n".join(out)


# -- owner binding -------------------------------------------------------------------------


async def test_other_owners_can_neither_see_resume_nor_control_a_running_stream(
    stores: StoreFactory,
) -> None:
    app = StreamApp(CHUNKS, pause_at=5)
    mw = await middleware(stores, app, owner=keys.header("X-User"))
    alice = {"Durable-Key": "chat-1", "X-User": "alice"}
    others = [
        {"Durable-Key": "chat-1", "X-User": "bob"},
        {"Durable-Key": "chat-1", "X-User": "Alice"},  # owners are compared exactly
        {"Durable-Key": "chat-1"},  # no owner: the anonymous space
    ]
    first: list[Result] = []

    async def run_alice() -> None:
        first.append(await call(mw, "/c", headers=alice))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_alice)
            await wait_thread_event(app.paused)
            await anyio.sleep(0.1)  # the first five chunks are stored
            for other in others:
                status = await call(mw, "/c", headers={**other, "Durable-Control": "status"})
                assert (status.status, status.json()) == (404, {"state": "absent"})
                resume = await call(mw, "/c", headers={**other, "Durable-Offset": "3"})
                assert resume.status == 416 and BODY[3:8] not in resume.body
                for op in ("abort", "delete"):
                    answer = await call(mw, "/c", headers={**other, "Durable-Control": op})
                    assert answer.status == 204  # the same answer as for an absent stream
            mine = await call(mw, "/c", headers={**alice, "Durable-Control": "status"})
            assert mine.json()["state"] == "running"  # nobody else's abort/delete touched it
            app.release.set()
    (result,) = first
    assert result.complete and result.body == BODY
    assert app.cancelled == 0 and app.calls == 1
    resumed = await call(mw, "/c", headers={**alice, "Durable-Offset": "4"})
    assert resumed.complete and resumed.body == BODY[4:]
    # Bob asking for "his" chat-1 runs his own handler call and never reads Alice's bytes.
    app.pause_at = None
    bob = await call(mw, "/c", headers=others[0])
    assert "durable-replay" not in bob.headers and app.calls == 2
    # Stored ids hold neither the owner nor the key.
    raw = await raw_store_bytes(mw, stores)
    for info in [i async for i in mw.store_checked.scan()]:
        assert info.id.startswith("sha256:")
    assert b"alice" not in raw and b"chat-1" not in raw


async def test_the_python_control_api_is_owner_bound_too(stores: StoreFactory) -> None:
    app = StreamApp(CHUNKS)
    mw = await middleware(stores, app, owner=keys.header("X-User"), namespace="chat")
    await call(mw, "/c", headers={"Durable-Key": "k", "X-User": "alice"})
    assert await mw.status("k") is None
    assert await mw.status("k", owner="bob") is None
    assert await mw.delete("k", owner="bob") is False
    status = await mw.status("k", owner="alice")
    assert status is not None and status["state"] == "complete"


# -- what is stored ----------------------------------------------------------------------------


async def test_set_cookie_and_request_secrets_are_never_stored_nor_replayed(
    stores: StoreFactory,
) -> None:
    app = StreamApp(
        CHUNKS,
        headers=[
            (b"content-type", b"text/plain"),
            (b"set-cookie", f"session={SECRET}; HttpOnly".encode()),
            (b"Set-Cookie", f"other={SECRET}".encode()),
            (b"connection", b"keep-alive"),
            (b"x-kept", b"yes"),
        ],
    )
    mw = await middleware(stores, app)
    request = {
        "Durable-Key": "k",
        "Authorization": f"Bearer {SECRET}",
        "Cookie": f"sid={SECRET}",
        "X-Api-Key": SECRET,
    }
    first = await call(mw, "/s", headers=request)
    assert [v for k, v in first.raw_headers if k.lower() == b"set-cookie"]  # the first client
    replay = await call(mw, "/s", headers={"Durable-Key": "k"})
    assert replay.headers["durable-replay"] == "true"
    assert not [k for k, _ in replay.raw_headers if k.lower() in (b"set-cookie", b"connection")]
    assert replay.headers["x-kept"] == "yes"
    (info,) = [i async for i in mw.store_checked.scan()]
    assert info.headers is not None
    assert {k for k, _ in info.headers} == {b"content-type", b"x-kept"}
    assert SECRET.encode() not in await raw_store_bytes(mw, stores)


# -- keys as store ids ----------------------------------------------------------------------

SPECIAL_KEYS = [
    "'; DROP TABLE streams; --",
    '" OR 1=1 --',
    "*",
    "a*",
    "?",
    "[a-z]",
    "%",
    "_",
    "\\",
    "{tag}",
    "}{",
    "a:b:c",
    "]]--[[",
    "redis.call('FLUSHALL')",
    "k\x00nul",
    "\u202etxt.exe",
    "ключ",
]


async def test_keys_with_sql_glob_and_lua_characters_are_isolated(stores: StoreFactory) -> None:
    """Each special key is its own stream; deleting one never touches another (no glob,
    LIKE or injection in any store)."""
    app = StreamApp([b"x"])
    mw = await middleware(stores, app, namespace="ns", key=indexed_key)
    victims = ["a", "ab", "tag", "streams"]
    for key in victims + SPECIAL_KEYS:
        await mw_call(mw, key)
    assert app.calls == len(victims) + len(SPECIAL_KEYS)
    for key in SPECIAL_KEYS:
        status = await mw.status(key)
        assert status is not None and status["state"] == "complete", key
        again = await mw_call(mw, key)
        assert again.headers.get("durable-replay") == "true", key
    for key in SPECIAL_KEYS:
        assert await mw.delete(key) is True
    for key in victims:
        status = await mw.status(key)
        assert status is not None and status["state"] == "complete", key
    ids = [i.id async for i in mw.store_checked.scan()]
    assert sorted(ids) == sorted(f"ns#{k}" for k in victims)


#: Keys by index: `indexed_key` lets a request use any str as its key (a header is latin-1).
KEYS: list[str] = []


def indexed_key(request: Any) -> str:
    return KEYS[int(request.headers["x-key-index"])]


async def mw_call(mw: DurableMiddleware, key: str) -> Result:
    """A request whose key is `key` exactly (`mw` must use `key=indexed_key`)."""
    if key not in KEYS:
        KEYS.append(key)
    return await call(mw, "/s", headers={"X-Key-Index": str(KEYS.index(key))})


async def test_non_printable_and_long_keys_are_hashed_in_the_store(stores: StoreFactory) -> None:
    app = StreamApp([b"x"])
    mw = await middleware(stores, app, key=indexed_key)
    raw_keys = ["line\nbreak", "tab\there", "é-accent", "x" * 500, "\x1b[31mred"]
    for key in raw_keys:
        await mw_call(mw, key)
    ids = [i.id async for i in mw.store_checked.scan()]
    assert len(ids) == len(raw_keys)
    assert all(i.startswith("sha256:") for i in ids)
    raw = await raw_store_bytes(mw, stores)
    for key in raw_keys:
        assert key.encode() not in raw


# -- caches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_durable_responses_are_not_stored_by_shared_caches() -> None:
    from durable_asgi import MemoryStore

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": BODY})

    mw = DurableMiddleware(app, store=MemoryStore())
    await call(mw, "/s", headers={"Durable-Key": "k"})
    resumed = await call(mw, "/s", headers={"Durable-Key": "k", "Durable-Offset": "5"})
    cache_control = resumed.headers.get("cache-control", "")
    vary = resumed.headers.get("vary", "").lower()
    assert (
        "no-store" in cache_control
        or "private" in cache_control
        or ("durable-offset" in vary and "durable-key" in vary)
    )
