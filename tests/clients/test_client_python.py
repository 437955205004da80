"""The Python clients through a real uvicorn and a proxy that cuts connections at random bytes.

Every body read through cuts is compared byte for byte with the bare app's own body, and the
app's call count proves the handler ran once per key: reconnecting never starts it again.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from durable_asgi import DurableMiddleware, MemoryStore, keys
from durable_asgi.client import (
    DurableClient,
    DurableClientError,
    StreamFailed,
    SyncDurableClient,
)

from ..support.apps import StreamApp, wait_thread_event
from ..support.proxy import AFTER_HEAD, CuttingProxy, running_proxy
from ..support.servers import running_server

RUNS = 30


def model_output(seed: int = 7, chunks: int = 60) -> list[bytes]:
    """Chunks of varied sizes, like an LLM's tokens (some multi-byte UTF-8 among them)."""
    rng = random.Random(seed)
    words = ["token", "é", "durable", "→", "x", "stream", "😀", "resume", "\n"]
    return [
        f"{i:02d}:{''.join(rng.choice(words) for _ in range(rng.randint(1, 6)))} ".encode()
        for i in range(chunks)
    ]


CHUNKS = model_output()
FAST = {"backoff_initial": 0.005, "backoff_max": 0.05}


@dataclass
class Setup:
    app: StreamApp
    middleware: DurableMiddleware
    proxy: CuttingProxy
    server_url: str
    bare: bytes


@contextlib.contextmanager
def serving(app: StreamApp, *, seed: int = 0, **options: Any) -> Iterator[Setup]:
    """`app` bare (to record its body), then wrapped in DurableMiddleware (with `options`)
    behind a proxy."""
    with running_server(StreamApp(app.chunks, status=app.status)) as bare_server:
        bare = httpx.get(f"{bare_server.url}/chat")  # sync: usable in sync and async tests
    assert bare.status_code == app.status
    middleware = DurableMiddleware(app, store=MemoryStore(), **options)
    with running_server(middleware) as server, running_proxy(server.url, seed=seed) as proxy:
        yield Setup(app, middleware, proxy, server.url, bare.content)


@pytest.fixture
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    """The default app, or one with the `StreamApp` options given by indirect parametrization.

    Made here, outside the test's event loop: the middleware must not be created under trio
    and then served by uvicorn's asyncio loop.
    """
    options = {"delay": 0.001, **getattr(request, "param", {})}
    middleware = options.pop("middleware", {})
    with serving(StreamApp(CHUNKS, **options), **middleware) as s:
        yield s


async def read_into(chunks: AsyncIterator[bytes], received: bytearray) -> None:
    """Append every chunk to `received`, so what arrived before an error can be checked."""
    async for chunk in chunks:
        received += chunk


def random_cuts(rng: random.Random, size: int) -> list[int]:
    """2 to 5 cuts, each at a random byte of a connection's server-to-client traffic."""
    return [rng.randint(1, size) for _ in range(rng.randint(2, 5))]


@pytest.mark.anyio
async def test_every_byte_exactly_once_through_random_cuts(setup: Setup) -> None:
    rng = random.Random(2024)
    wire_size = len(setup.bare) + 200  # about a whole response: headers, framing and body
    reconnects = 0
    for run in range(RUNS):
        setup.proxy.plan(random_cuts(rng, wire_size))
        async with DurableClient(setup.proxy.url, **FAST) as client:
            stream = client.stream("POST", "/chat", key=f"run-{run}", json={"run": run})
            body = await stream.aread()
        assert body == setup.bare, f"run {run}: {len(body)} bytes, {stream.reconnects} reconnects"
        assert stream.offset == len(setup.bare)
        reconnects += stream.reconnects
    assert setup.app.calls == RUNS  # one handler run per key, however often it reconnected
    assert setup.app.bodies[0] == b'{"run":0}'
    assert setup.proxy.cuts >= RUNS  # every run was cut at least once...
    assert reconnects >= RUNS // 2  # ...and most cuts landed mid-response, not between requests


@pytest.mark.anyio
async def test_cut_connections_resume_at_the_byte_delivered(setup: Setup) -> None:
    setup.proxy.plan([250, 250, 250])
    async with (
        DurableClient(setup.proxy.url, **FAST) as client,
        client.stream("GET", "/chat", key="k") as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers is not None
        assert stream.headers["durable-state"] == "running"
        assert not stream.resumed
        chunks = [chunk async for chunk in stream]
    assert b"".join(chunks) == setup.bare
    assert stream.reconnects == 3
    assert setup.app.calls == 1


@pytest.mark.anyio
@pytest.mark.parametrize("setup", [{"fail_at": 0}, {"fail_at": 20}], indirect=True)
async def test_a_failed_stream_raises_stream_failed_and_never_reruns(setup: Setup) -> None:
    s, fail_at = setup, setup.app.fail_at
    assert fail_at is not None
    received = bytearray()
    async with DurableClient(s.proxy.url, **FAST) as client:
        with pytest.raises(StreamFailed) as failed:
            await read_into(client.stream("POST", "/chat", key="boom"), received)
    assert failed.value.state == "failed"
    assert failed.value.key == "boom"
    assert bytes(received) == b"".join(CHUNKS[:fail_at])  # what the handler sent, once
    assert failed.value.offset == len(received)
    assert s.app.calls == 1  # reconnecting didn't start it again


@pytest.mark.anyio
@pytest.mark.parametrize("setup", [{"fail_at": 20}], indirect=True)
async def test_resuming_a_failed_stream_gets_its_stored_bytes_then_the_failure(
    setup: Setup,
) -> None:
    sent = b"".join(CHUNKS[:20])
    async with DurableClient(setup.server_url, **FAST) as client:
        with pytest.raises(StreamFailed):
            await client.stream("GET", "/chat", key="boom").aread()
        received = bytearray()
        with pytest.raises(StreamFailed) as failed:
            await read_into(client.stream("GET", "/chat", key="boom", offset=10), received)
    assert bytes(received) == sent[10:]
    assert (failed.value.state, failed.value.offset) == ("failed", len(sent))


@pytest.mark.anyio
async def test_status_abort_delete(setup: Setup) -> None:
    app = setup.app
    app.pause_at = 10
    async with DurableClient(setup.proxy.url, **FAST) as client:
        assert await client.status("/chat", key="k") == {"state": "absent"}
        received = bytearray()
        async with client.stream("POST", "/chat", key="k") as stream:
            chunks = aiter(stream)
            received += await anext(chunks)
            await wait_thread_event(app.paused)
            status = await client.status("/chat", key="k")
            assert (status["key"], status["state"], status["in_progress"]) == ("k", "running", True)
            await client.abort("/chat", key="k")
            with pytest.raises(StreamFailed) as aborted:
                await read_into(chunks, received)
        assert aborted.value.state == "aborted"
        assert bytes(received) == b"".join(CHUNKS[:10])  # the bytes sent before the abort
        assert (app.calls, app.cancelled, app.finished) == (1, 1, 0)
        status = await client.status("/chat", key="k")
        assert (status["state"], status["offset"]) == ("aborted", len(received))
        await client.abort("/chat", key="k")  # idempotent

        await client.delete("/chat", key="k")
        await client.delete("/chat", key="k")  # idempotent
        assert await client.status("/chat", key="k") == {"state": "absent"}
        app.pause_at = None
        assert await client.stream("POST", "/chat", key="k").aread() == setup.bare
        assert app.calls == 2  # deleted: the same key runs the handler anew


@pytest.mark.anyio
async def test_resume_from_an_offset_and_replay(setup: Setup) -> None:
    async with DurableClient(setup.proxy.url, **FAST) as client:
        first = client.stream("POST", "/chat", key="k")
        assert await first.aread() == setup.bare
        assert not first.resumed

        again = client.stream("POST", "/chat", key="k")
        assert await again.aread() == setup.bare
        assert again.resumed

        tail = client.stream("GET", "/chat", key="k", offset=100)
        assert await tail.aread() == setup.bare[100:]
        assert tail.offset == len(setup.bare)

        status = await client.status("/chat", key="k")
        assert (status["state"], status["offset"]) == ("complete", len(setup.bare))

        with pytest.raises(StreamFailed) as absent:
            await client.stream("GET", "/chat", key="nothing", offset=5).aread()
        assert absent.value.state == "absent"
    assert setup.app.calls == 1


@pytest.mark.anyio
async def test_a_generated_key_and_an_httpx_client_of_your_own(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.proxy.url) as http:
        client = DurableClient(http, **FAST)
        stream = client.stream("POST", "/chat", content="hello")
        assert len(stream.key) == 32
        assert await stream.aread() == setup.bare
        await client.aclose()  # not ours: stays open
        assert not http.is_closed
        assert (await client.status("/chat", key=stream.key))["state"] == "complete"
    assert setup.app.bodies == [b"hello"]


@pytest.mark.anyio
@pytest.mark.parametrize("setup", [{"middleware": {"key": keys.json_body("id")}}], indirect=True)
async def test_keys_read_from_the_json_body_survive_cuts(setup: Setup) -> None:
    """No key header: every attempt, and the status probe, resend the same body."""
    setup.proxy.plan([AFTER_HEAD, 250, 250])  # after the head, no byte: a probe at byte 0
    chat = {"id": "chat-7", "messages": ["hi"]}
    async with DurableClient(setup.proxy.url, key_header=None, **FAST) as client:
        stream = client.stream("POST", "/chat", key="chat-7", json=chat)
        assert await stream.aread() == setup.bare
        assert setup.proxy.cuts == 3
        status = await client.status("/chat", key="chat-7", method="POST", json=chat)
        assert (status["key"], status["state"]) == ("chat-7", "complete")
    assert setup.app.calls == 1
    assert setup.app.bodies == [b'{"id":"chat-7","messages":["hi"]}']


@pytest.mark.anyio
@pytest.mark.parametrize(
    "setup",
    [{"middleware": {"on_absent": "no_content", "on_finished": "no_content"}}],
    indirect=True,
)
async def test_nothing_to_join_is_an_empty_204(setup: Setup) -> None:
    async with DurableClient(setup.proxy.url, **FAST) as client:
        async with client.stream("GET", "/chat", key="nothing") as stream:
            assert stream.status_code == 204
            assert [chunk async for chunk in stream] == []
        assert stream.durable is False
    assert setup.app.calls == 0


@pytest.mark.anyio
async def test_a_response_that_is_not_durable_passes_through() -> None:
    app = StreamApp(CHUNKS)
    with running_server(app) as server:
        async with DurableClient(server.url, **FAST) as client:
            stream = client.stream("GET", "/chat", key="k")
            assert await stream.aread() == app.body
            assert stream.durable is False
            with pytest.raises(DurableClientError, match="is DurableMiddleware in front"):
                await client.status("/chat", key="k")


@pytest.mark.anyio
@pytest.mark.parametrize("setup", [{"status": 404}], indirect=True)
async def test_an_error_status_raises_httpx_error(setup: Setup) -> None:
    async with DurableClient(setup.proxy.url, **FAST) as client:
        with pytest.raises(httpx.HTTPStatusError) as error:
            await client.stream("GET", "/chat", key="k").aread()
    assert error.value.response.status_code == 404
    assert error.value.response.content == setup.bare


@pytest.mark.anyio
async def test_unreachable_server_gives_up_after_max_retries() -> None:
    with running_server(StreamApp(CHUNKS)) as server:
        url = server.url  # free again once the server is gone
    async with DurableClient(url, max_retries=3, **FAST) as client:
        with pytest.raises(StreamFailed) as failed:
            await client.stream("GET", "/chat", key="k").aread()
    assert failed.value.state == "unreachable"
    assert isinstance(failed.value.__cause__, httpx.ConnectError)


def test_sync_client_through_random_cuts(setup: Setup) -> None:
    rng = random.Random(99)
    wire_size = len(setup.bare) + 200
    for run in range(10):
        setup.proxy.plan(random_cuts(rng, wire_size))
        with SyncDurableClient(setup.proxy.url, **FAST) as client:
            with client.stream("POST", "/chat", key=f"sync-{run}", json={"run": run}) as stream:
                body = b"".join(stream)
            assert body == setup.bare, f"run {run}"
            status = client.status("/chat", key=f"sync-{run}")
            assert (status["state"], status["offset"]) == ("complete", len(setup.bare))
    assert setup.app.calls == 10
    assert setup.proxy.cuts >= 10

    with SyncDurableClient(setup.proxy.url, **FAST) as client:
        assert client.stream("GET", "/chat", key="sync-0", offset=10).read() == setup.bare[10:]
        client.abort("/chat", key="sync-0")  # finished already: nothing to stop
        client.delete("/chat", key="sync-0")
        assert client.status("/chat", key="sync-0") == {"state": "absent"}


@pytest.mark.parametrize("setup", [{"fail_at": 5}], indirect=True)
def test_sync_failed_stream_raises(setup: Setup) -> None:
    with SyncDurableClient(setup.proxy.url, **FAST) as client:
        stream = client.stream("GET", "/chat", key="boom")
        with pytest.raises(StreamFailed) as failed:
            stream.read()
    assert (failed.value.state, failed.value.offset) == ("failed", len(b"".join(CHUNKS[:5])))
    assert setup.app.calls == 1


def test_without_httpx_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(ImportError, match=r"pip install \"durable-asgi\[client\]\""):
        DurableClient("http://127.0.0.1:1")
    with pytest.raises(ImportError, match="durable-asgi"):
        SyncDurableClient("http://127.0.0.1:1")
