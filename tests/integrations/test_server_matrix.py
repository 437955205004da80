"""The core disconnect/resume scenario on every server we support: uvicorn, hypercorn, granian.

`test_real_server.py` covers the protocol in depth on uvicorn; this module proves that what
matters most holds whatever server runs the app:

- a client that really disconnects mid-stream leaves the handler running to its end, once;
- resuming from offset 0 and from the offset the client reached gives exactly the bare app's
  bytes (recorded from the same app, unwrapped, on the same server);
- five concurrent requests with one key get identical bodies from one handler call.

The handler's calls are counted by the app itself and read over HTTP (``GET /stats``, a
pass-through request: it carries no key), and the handler is held mid-stream by a gate opened
over HTTP (``POST /release``). So nothing here relies on sharing memory with the server: the
same checks hold for a server run in a thread of this process or in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from durable_asgi import DurableMiddleware, MemoryStore
from durable_asgi._types import ASGIApp, Receive, Scope, Send

from ..support.servers import ServerName, fetch, open_stream, running_server

pytestmark = pytest.mark.anyio

SERVERS: list[ServerName] = ["uvicorn", "hypercorn", "granian"]
TOKENS = [f"token-{i:02d} " for i in range(40)]
GATE_AT = 20  # with ?gate=1 the handler waits before this token until POST /release
PATH = "/stream"


@dataclass
class Handler:
    """The endpoint's work: streams TOKENS, counting its calls and the calls that ran to the end.

    The gate is a `threading.Event`, so it works whatever loop (or thread) the server runs on.
    """

    calls: int = 0
    finished: int = 0
    gate: threading.Event = field(default_factory=threading.Event)

    async def tokens(self, gated: bool) -> AsyncIterator[bytes]:
        self.calls += 1
        for i, token in enumerate(TOKENS):
            # Bounded, so a broken test does not leave the handler behind.
            if gated and i == GATE_AT and not await anyio.to_thread.run_sync(self.gate.wait, 10):
                raise TimeoutError("the gate was never opened")
            await anyio.sleep(0.002)
            yield token.encode()
        self.finished += 1


def plain_app(handler: Handler) -> ASGIApp:
    """A raw ASGI streaming endpoint."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for token in handler.tokens(gated=b"gate=1" in scope["query_string"]):
            await send({"type": "http.response.body", "body": token, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def fastapi_app(handler: Handler) -> ASGIApp:
    """A FastAPI `StreamingResponse` (which cancels its body when it sees a disconnect)."""
    app = FastAPI()

    @app.get(PATH)
    async def stream(gate: int = 0) -> StreamingResponse:
        return StreamingResponse(handler.tokens(gated=bool(gate)), media_type="text/plain")

    return app


APPS = {"plain-asgi": plain_app, "fastapi": fastapi_app}


def with_control(app: ASGIApp, handler: Handler) -> ASGIApp:
    """`app`, plus ``GET /stats`` (the handler's counters) and ``POST /release`` (the gate)."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/stats", "/release"):
            if scope["path"] == "/release":
                handler.gate.set()
            body = json.dumps({"calls": handler.calls, "finished": handler.finished}).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return outer


# The same apps for the servers' own CLIs
# (``running_server("tests.integrations.test_server_matrix:...")``): each run is a fresh
# process, so these module-level counters start at zero every time.
_cli_handler = Handler()
cli_bare = with_control(plain_app(_cli_handler), _cli_handler)
cli_durable = with_control(
    DurableMiddleware(plain_app(_cli_handler), store=MemoryStore()), _cli_handler
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client side; each server runs its own loop


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> ServerName:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=list(APPS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Served:
    url: str
    bare: bytes


@contextlib.contextmanager
def serve(server: ServerName, kind: str, *, durable: bool) -> Iterator[str]:
    if kind == "cli":  # the server's own command line, in a subprocess
        target = f"tests.integrations.test_server_matrix:{'cli_durable' if durable else 'cli_bare'}"
        with running_server(target, server=server) as running:
            yield running.url
        return
    handler = Handler()
    app = APPS[kind](handler)
    if durable:
        app = DurableMiddleware(app, store=MemoryStore())
    with running_server(with_control(app, handler), server=server) as running:
        yield running.url


@contextlib.asynccontextmanager
async def durable_server(server: ServerName, kind: str) -> AsyncIterator[Served]:
    """The app served bare (to record its bytes), then wrapped, both on `server`."""
    with serve(server, kind, durable=False) as url:
        bare = await fetch(url, PATH)
    assert (bare.status, bare.complete) == (200, True)
    assert bare.body == "".join(TOKENS).encode()
    with serve(server, kind, durable=True) as url:
        yield Served(url, bare.body)


async def stats(url: str) -> dict[str, Any]:
    result = await fetch(url, "/stats")
    assert result.status == 200
    return json.loads(result.body)  # type: ignore[no-any-return]


async def wait_finished(url: str, count: int, timeout: float = 10.0) -> dict[str, Any]:
    for _ in range(int(timeout / 0.01)):
        counters = await stats(url)
        if counters["finished"] >= count:
            return counters
        await anyio.sleep(0.01)
    raise TimeoutError(f"the handler did not finish {count} time(s) within {timeout} s")


async def test_disconnect_then_resume_from_zero_and_from_the_offset_reached(
    server: ServerName, kind: str
) -> None:
    async with durable_server(server, kind) as s:
        key = {"Durable-Key": "chat-1"}
        async with open_stream(s.url, f"{PATH}?gate=1", headers=key) as response:
            assert response.status == 200
            assert response.header("durable-state") == "running"
            assert response.header("durable-offset") == "0"
            received = await response.read_exactly(25)
        # The TCP connection is closed while the handler is held mid-stream.
        status = await fetch(s.url, PATH, headers={**key, "Durable-Control": "status"})
        assert json.loads(status.body)["state"] == "running"
        assert await stats(s.url) == {"calls": 1, "finished": 0}

        await fetch(s.url, "/release", method="POST")
        assert await wait_finished(s.url, 1) == {"calls": 1, "finished": 1}
        status = await fetch(s.url, PATH, headers={**key, "Durable-Control": "status"})
        assert json.loads(status.body)["state"] == "complete"
        assert json.loads(status.body)["offset"] == len(s.bare)

        whole = await fetch(s.url, PATH, headers=key)
        assert (whole.status, whole.complete, whole.body) == (200, True, s.bare)
        assert whole.header("durable-replay") == "true"
        assert whole.header("durable-state") == "complete"

        rest = await fetch(s.url, PATH, headers={**key, "Durable-Offset": str(len(received))})
        assert (rest.status, rest.complete) == (200, True)
        assert received + rest.body == s.bare
        assert rest.header("durable-offset") == str(len(received))
        assert await stats(s.url) == {"calls": 1, "finished": 1}


async def test_disconnect_and_resume_under_the_server_command_line(server: ServerName) -> None:
    """The first scenario again, with the server started by its own CLI in a subprocess
    (granian and hypercorn then serve from a worker process)."""
    await test_disconnect_then_resume_from_zero_and_from_the_offset_reached(server, "cli")


async def test_resume_from_the_offset_reached_while_the_handler_is_held(
    server: ServerName, kind: str
) -> None:
    async with durable_server(server, kind) as s:
        key = {"Durable-Key": "chat-2"}
        async with open_stream(s.url, f"{PATH}?gate=1", headers=key) as response:
            received = await response.read_exactly(30)
        headers = {**key, "Durable-Offset": str(len(received))}
        async with open_stream(s.url, PATH, headers=headers) as resumed:
            assert resumed.header("durable-replay") == "true"
            assert resumed.header("durable-state") == "running"
            await fetch(s.url, "/release", method="POST")
            rest = await resumed.read_all()
        assert received + rest == s.bare
        assert await wait_finished(s.url, 1) == {"calls": 1, "finished": 1}


async def test_five_concurrent_requests_with_one_key_share_one_handler_call(
    server: ServerName, kind: str
) -> None:
    async with durable_server(server, kind) as s:
        bodies: list[bytes] = []

        async def client() -> None:
            result = await fetch(s.url, PATH, headers={"Durable-Key": "shared"})
            assert (result.status, result.complete) == (200, True)
            bodies.append(result.body)

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(client)
        assert bodies == [s.bare] * 5
        assert await wait_finished(s.url, 1) == {"calls": 1, "finished": 1}
