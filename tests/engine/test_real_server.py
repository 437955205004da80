"""Through a real uvicorn on loopback, with clients that really disconnect.

Every scenario is checked against the bare app's own bytes, for a plain ASGI app, a Starlette
app and a FastAPI app (a StreamingResponse and an SSE endpoint).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse as FastAPIStreamingResponse
from fastapi.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from durable_asgi import DurableMiddleware, MemoryStore

from ..support.apps import StreamApp, wait_thread_event
from ..support.servers import IncompleteBody, fetch, open_stream, running_server

pytestmark = pytest.mark.anyio

TOKENS = [f"token-{i:02d} " for i in range(40)]


@dataclass
class Handler:
    """Counts calls of an endpoint and signals when one ran to its end."""

    calls: int = 0
    finished: int = 0
    ended: threading.Event = field(default_factory=threading.Event)
    fail_at: int | None = None

    async def tokens(self) -> AsyncIterator[str]:
        self.calls += 1
        try:
            for i, token in enumerate(TOKENS):
                if i == self.fail_at:
                    raise RuntimeError("model crashed")
                await anyio.sleep(0.003)
                yield token
            self.finished += 1
        finally:
            self.ended.set()


def starlette_app(handler: Handler) -> Starlette:
    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            async for token in handler.tokens():
                yield token.encode()

        return StreamingResponse(body(), media_type="text/plain")

    return Starlette(routes=[Route("/stream", endpoint, methods=["GET", "POST"])])


def fastapi_app(handler: Handler) -> FastAPI:
    app = FastAPI()

    @app.post("/stream")
    @app.get("/stream")
    async def stream() -> FastAPIStreamingResponse:
        return FastAPIStreamingResponse(handler.tokens(), media_type="text/plain")

    @app.get("/sse", response_class=EventSourceResponse)
    async def sse() -> AsyncIterator[dict[str, str]]:
        async for token in handler.tokens():
            yield {"token": token}

    return app


class PlainApp:
    """A raw ASGI app around `Handler.tokens`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for token in self.handler.tokens():
            await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


KINDS = {
    "plain-asgi": (PlainApp, "/stream"),
    "starlette": (starlette_app, "/stream"),
    "fastapi-streaming": (fastapi_app, "/stream"),
    "fastapi-sse": (fastapi_app, "/sse"),
}


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client side; the servers run their own loops


@dataclass
class Setup:
    url: str
    path: str
    handler: Handler
    bare: bytes
    middleware: DurableMiddleware


@contextlib.asynccontextmanager
async def durable_server(kind: str, **options: Any) -> AsyncIterator[Setup]:
    """The app of `kind` served bare (to record its bytes) and then wrapped, on uvicorn."""
    factory, path = KINDS[kind]
    with running_server(factory(Handler())) as bare_server:
        bare = await fetch(bare_server.url, path)
    assert bare.complete and bare.status == 200
    handler = Handler()
    middleware = DurableMiddleware(factory(handler), store=MemoryStore(), **options)
    with running_server(middleware) as server:
        yield Setup(server.url, path, handler, bare.body, middleware)


async def test_disconnect_resume_from_zero_and_from_the_offset_reached(kind: str) -> None:
    async with durable_server(kind) as s:
        key = {"Durable-Key": "chat-1"}
        async with open_stream(s.url, s.path, headers=key) as response:
            assert response.status == 200
            assert response.header("durable-state") == "running"
            received = await response.read_exactly(25)
        # The client is gone; the handler must still run to its end, once.
        await wait_thread_event(s.handler.ended)
        assert (s.handler.calls, s.handler.finished) == (1, 1)

        whole = await fetch(s.url, s.path, headers=key)
        assert whole.complete and whole.body == s.bare
        assert whole.header("durable-replay") == "true"

        rest = await fetch(s.url, s.path, headers={**key, "Durable-Offset": str(len(received))})
        assert rest.complete and received + rest.body == s.bare
        assert rest.header("durable-offset") == str(len(received))
        assert s.handler.calls == 1


async def test_resume_while_the_handler_is_still_running(kind: str) -> None:
    async with durable_server(kind) as s:
        key = {"Durable-Key": "chat-2"}
        async with open_stream(s.url, s.path, headers=key) as response:
            received = await response.read_exactly(10)
        rest = await fetch(s.url, s.path, headers={**key, "Range": f"bytes={len(received)}-"})
        assert rest.complete and received + rest.body == s.bare
        assert s.handler.calls == 1


async def test_twenty_concurrent_requests_with_one_key(kind: str) -> None:
    async with durable_server(kind) as s:
        bodies: list[bytes] = []

        async def client() -> None:
            result = await fetch(s.url, s.path, headers={"Durable-Key": "shared"})
            assert result.complete
            bodies.append(result.body)

        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(client)
        assert s.handler.calls == 1
        assert bodies == [s.bare] * 20


async def test_handler_failure_is_an_abnormal_end_and_the_next_request_reruns() -> None:
    async with durable_server("starlette") as s:
        s.handler.fail_at = 10
        key = {"Durable-Key": "boom"}
        first = await fetch(s.url, s.path, headers=key)
        assert not first.complete  # truncated on the wire, never a clean end
        assert first.body == "".join(TOKENS[:10]).encode()
        status = await fetch(s.url, s.path, headers={**key, "Durable-Control": "status"})
        assert json.loads(status.body)["state"] == "failed"

        s.handler.fail_at = None
        second = await fetch(s.url, s.path, headers=key)
        assert second.complete and second.body == s.bare
        assert s.handler.calls == 2


async def test_abort_over_http_stops_the_handler_and_ends_readers() -> None:
    async with durable_server("fastapi-streaming") as s:
        key = {"Durable-Key": "to-abort"}
        async with open_stream(s.url, s.path, headers=key) as response:
            head = await response.read_exactly(5)
            aborted = await fetch(s.url, s.path, headers={**key, "Durable-Control": "abort"})
            assert aborted.status == 204
            with pytest.raises(IncompleteBody) as info:
                await response.read_all()
        await wait_thread_event(s.handler.ended)
        assert s.handler.finished == 0
        kept = info.value.body  # every byte this client received, head included
        assert kept.startswith(head)
        replay = await fetch(s.url, s.path, headers=key)
        assert not replay.complete and replay.body == kept
        assert replay.header("durable-state") == "aborted"
        assert s.bare.startswith(kept)


async def test_delete_and_expiry_make_the_next_request_run_the_handler() -> None:
    async with durable_server("plain-asgi", ttl=0.3) as s:
        key = {"Durable-Key": "gone"}
        assert (await fetch(s.url, s.path, headers=key)).body == s.bare
        deleted = await fetch(s.url, s.path, headers={**key, "Durable-Control": "delete"})
        assert deleted.status == 204
        assert (await fetch(s.url, s.path, headers=key)).body == s.bare
        assert s.handler.calls == 2
        await anyio.sleep(0.4)  # the TTL itself is what is being tested
        status = await fetch(s.url, s.path, headers={**key, "Durable-Control": "status"})
        assert status.status == 404
        assert (await fetch(s.url, s.path, headers=key)).body == s.bare
        assert s.handler.calls == 3


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Durable-Offset": "nope"}, b"", 400),
        ({"Range": "bytes=1-2"}, b"", 400),
        ({"Durable-Control": "explode"}, b"", 400),
        ({}, b"x" * 2048, 413),
        ({"Durable-Offset": "10"}, b"", 416),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_stores_nothing(
    headers: dict[str, str], body: bytes, status: int
) -> None:
    async with durable_server("starlette", max_request_body=1024) as s:
        result = await fetch(
            s.url, s.path, method="POST", headers={"Durable-Key": "bad", **headers}, body=body
        )
        assert result.status == status
        assert "error" in json.loads(result.body)
        assert s.handler.calls == 0
        assert await s.middleware.status("bad", namespace=s.path) is None


async def test_past_the_end_of_a_finished_stream_is_416() -> None:
    async with durable_server("plain-asgi") as s:
        key = {"Durable-Key": "done"}
        await fetch(s.url, s.path, headers=key)
        past = await fetch(s.url, s.path, headers={**key, "Durable-Offset": str(len(s.bare) + 1)})
        assert past.status == 416
        end = await fetch(s.url, s.path, headers={**key, "Durable-Offset": str(len(s.bare))})
        assert (end.status, end.body, end.complete) == (200, b"", True)


async def test_pass_through_requests_are_untouched() -> None:
    async with durable_server("fastapi-streaming") as s:
        first = await fetch(s.url, s.path)
        second = await fetch(s.url, s.path)
        assert first.body == second.body == s.bare
        assert first.header("durable-offset") is None
        assert s.handler.calls == 2


async def test_a_stuck_stream_is_stored_in_order_under_a_slow_client() -> None:
    app = StreamApp(chunks=[bytes([i]) * 4096 for i in range(256)])
    middleware = DurableMiddleware(app, store=MemoryStore())
    with running_server(middleware) as server:
        async with open_stream(server.url, "/big", headers={"Durable-Key": "big"}) as response:
            await response.read_exactly(1)
            # This client now stops reading: the handler must finish regardless.
            await wait_thread_event(app.ended)
        whole = await fetch(server.url, "/big", headers={"Durable-Key": "big"})
        assert whole.complete and whole.body == app.body
        assert app.calls == 1
