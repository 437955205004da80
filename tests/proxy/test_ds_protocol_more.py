"""Mode 2 across workers (two uvicorns on one SQLite file or Redis), a dead producer, and the
read protocol mounted beside the middleware for its own streams (`durable_asgi.streams`)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from durable_asgi import DurableMiddleware, MemoryStore, SQLiteStore, Store, keys
from durable_asgi.proxy import DurableProxy
from durable_asgi.proxy._ds import NAMESPACE
from durable_asgi.stores._base import Lease, stream_id
from durable_asgi.streams import StreamsApp

from ..support.servers import running_server
from ..support.stores import store_makers
from .test_ds_protocol import AUTH, SECRET, _wait, _with, read_all
from .upstream import Origin, sse_body

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Makes store handles that share one database (one per worker)."""
    yield from store_makers(request, tmp_path)


async def test_create_on_one_worker_read_and_abort_on_another(
    origin: tuple[Origin, str], shared: Any
) -> None:
    app, upstream = origin
    allow = [f"{upstream}/**"]
    a = DurableProxy(allow=allow, store=shared(), secret=SECRET)
    b = DurableProxy(allow=allow, store=shared(), secret=SECRET)
    with running_server(a) as wa, running_server(b) as wb:
        async with httpx.AsyncClient(timeout=30) as client:
            created = await client.post(
                f"{wa.url}/v1/proxy",
                headers={
                    **AUTH,
                    "Upstream-URL": f"{upstream}/sse?n=8&pause=3",
                    "Upstream-Method": "GET",
                },
            )
            assert created.status_code == 201
            on_b = created.headers["location"].replace(wa.url, wb.url)
            await _wait(app.paused)
            seen, offset = b"", "-1"
            with anyio.fail_after(10):
                while len(seen) < len(sse_body(3)):  # long-polls: woken by A's writes
                    first = await client.get(_with(on_b, offset=offset, live="long-poll"))
                    seen += first.content
                    offset = first.headers["stream-next-offset"]
            assert seen == sse_body(3)
            assert first.headers["durable-state"] == "running"
            aborted = await client.patch(_with(on_b, action="abort"))
            assert aborted.status_code == 204
            await _wait(app.stopped)  # worker A's upstream was stopped by B's abort
        body, (*_, last) = await read_all(on_b)
        assert body == sse_body(3)
        assert last.headers["durable-state"] == "aborted"
        assert app.calls["/sse"] == 1


async def test_a_dead_producer_ends_failed_for_readers(tmp_path: Path) -> None:
    """A worker that claimed a stream and died: its lease runs out, readers end `failed`."""
    path = tmp_path / "dead.db"
    proxy = DurableProxy(allow=["http://127.0.0.1/**"], store=SQLiteStore(path), secret=SECRET)
    with running_server(proxy) as server:
        dead: Store = SQLiteStore(path)
        await dead.open()
        try:
            stream = str(uuid.uuid4())
            lease = await dead.claim(stream_id(NAMESPACE, stream), lease_seconds=0.5)
            assert isinstance(lease, Lease)
            await dead.start(lease, 200, ((b"content-type", b"text/plain"),))
            await dead.append(lease, b"partial", chunks=1)
            headless = str(uuid.uuid4())  # died before its head was stored
            assert isinstance(
                await dead.claim(stream_id(NAMESPACE, headless), lease_seconds=0.5), Lease
            )
        finally:
            await dead.close()  # the "worker" is gone; nobody renews the lease
        url = f"{server.url}/v1/proxy/{stream}"
        async with httpx.AsyncClient(timeout=30) as client:
            with anyio.fail_after(15):
                response = await client.get(_with(url, offset="-1", live="sse"), headers=AUTH)
        controls = [
            json.loads(line[6:])
            for block in response.text.split("\n\n")
            if "event: control" in block
            for line in block.split("\n")
            if line.startswith("data: ")
        ]
        assert controls[-1]["streamClosed"] is True
        assert controls[-1]["durableState"] == "failed"
        async with httpx.AsyncClient() as client:
            head = await client.head(url, headers=AUTH)
        assert head.headers["durable-state"] == "failed"
        with anyio.fail_after(15):
            body, (*_, last) = await read_all(f"{server.url}/v1/proxy/{headless}?secret={SECRET}")
        assert body == b"" and last.headers["durable-state"] == "failed"


async def _chat(scope: Any, receive: Any, send: Any) -> None:
    """A handler streaming five text chunks."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(5):
        await send(
            {"type": "http.response.body", "body": f"part {i}\n".encode(), "more_body": True}
        )
    await send({"type": "http.response.body", "body": b""})


def _host(middleware: DurableMiddleware, streams: StreamsApp) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/streams/"):
            scope = {**scope, "root_path": "/streams"}
            await streams(scope, receive, send)
        else:
            await middleware(scope, receive, send)

    return app


async def test_streams_app_reads_middleware_streams_with_owner_binding() -> None:
    store = MemoryStore()
    middleware = DurableMiddleware(
        _chat, store=store, namespace="chat", owner=keys.header("X-User")
    )
    streams = StreamsApp(middleware)
    with running_server(_host(middleware, streams)) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            produced = await client.get(
                f"{server.url}/chat", headers={"Durable-Key": "a/b 1", "X-User": "ann"}
            )
            expected = b"".join(f"part {i}\n".encode() for i in range(5))
            assert produced.content == expected
            url = f"{server.url}/streams/{'a%2Fb%201'}"
            read = await client.get(url, params={"offset": "-1"}, headers={"X-User": "ann"})
            assert read.status_code == 200 and read.content == expected
            assert read.headers["stream-closed"] == "true"
            assert read.headers["durable-state"] == "complete"
            sse = await client.get(
                url, params={"offset": "-1", "live": "sse"}, headers={"X-User": "ann"}
            )
            assert "stream-sse-data-encoding" not in sse.headers  # text/plain is text
            assert '"streamClosed":true' in sse.text
            other = await client.get(url, params={"offset": "-1"}, headers={"X-User": "bob"})
            assert other.status_code == 404
            assert json.loads(other.content)["error"]["code"] == "STREAM_NOT_FOUND"
            head = await client.head(url, headers={"X-User": "ann"})
            assert head.status_code == 200 and head.headers["stream-closed"] == "true"
            assert (await client.post(url)).status_code == 405
