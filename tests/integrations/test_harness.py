"""The real-server harness (`servers.py`), against a tiny raw ASGI app on every server.

Each client test runs on uvicorn, hypercorn and granian, on asyncio and on trio: the harness is
only worth trusting if it sees what each server really puts on the wire.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import anyio
import pytest

from durable_asgi._types import Receive, Scope, Send

from ..support.servers import (
    IncompleteBody,
    RunningServer,
    ServerName,
    fetch,
    open_stream,
    running_server,
)

pytestmark = pytest.mark.anyio

CHUNKS = [b"chunk %02d|" % i for i in range(20)]
BODY = b"".join(CHUNKS)
HALF = b"".join(CHUNKS[:10])
SERVERS: list[ServerName] = ["uvicorn", "hypercorn", "granian"]


class ProbeApp:
    """Streams CHUNKS; the path says how the response goes.

    - ``/chunked``: every chunk, then a proper end; ``/length``: the same with Content-Length.
    - ``/hold``: every chunk, then waits for the client to leave and sets `disconnected`.
    - ``/broken``: half the chunks, then returns without ending the body.
    - ``/echo``: answers with the request's method, ``x-test`` header and body.
    `lifespan` lists the lifespan events the server sent.
    """

    def __init__(self) -> None:
        self.disconnected = threading.Event()
        self.lifespan: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.run_lifespan(receive, send)
            return
        path, request = scope["path"], b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(b"content-type", b"text/plain")]
        if path == "/length":
            headers.append((b"content-length", b"%d" % len(BODY)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if path == "/echo":
            test_header = dict(scope["headers"]).get(b"x-test", b"")
            echo = b"%s %s %s" % (scope["method"].encode(), test_header, request)
            await send({"type": "http.response.body", "body": echo})
            return
        for chunk in CHUNKS[:10] if path == "/broken" else CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if path == "/broken":
            return
        if path == "/hold":
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            return
        await send({"type": "http.response.body", "body": b""})

    async def run_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
            self.lifespan.append(event.removeprefix("lifespan."))
            await send({"type": f"{event}.complete"})
            if event == "lifespan.shutdown":
                return


SUBPROCESS_APP = ProbeApp()  # for running_server(SUBPROCESS)
SUBPROCESS = "tests.integrations.test_harness:SUBPROCESS_APP"


@pytest.fixture
def app() -> ProbeApp:
    return ProbeApp()


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, app: ProbeApp) -> Iterator[RunningServer]:
    with running_server(app, server=request.param) as running:
        yield running


async def test_chunked_body_arrives_byte_for_byte(server: RunningServer) -> None:
    async with open_stream(server.url, "/chunked") as resp:
        assert resp.status == 200
        assert resp.header("Transfer-Encoding") == "chunked"
        head = await resp.read_exactly(15)
        some = await resp.read_some()
        rest = await resp.read_all()
        assert resp.complete
        assert head + some + rest == BODY
        assert await resp.read_some() == b""


async def test_content_length_body(server: RunningServer) -> None:
    result = await fetch(server.url, "/length")
    assert (result.status, result.body, result.complete) == (200, BODY, True)
    assert result.header("content-length") == str(len(BODY))
    async with open_stream(server.url, "/length") as resp:
        assert await resp.read_exactly(len(BODY) - 1) == BODY[:-1]
        with pytest.raises(anyio.IncompleteRead):
            await resp.read_exactly(2)


async def test_request_method_headers_and_body_reach_the_app(server: RunningServer) -> None:
    result = await fetch(server.url, "/echo", method="POST", headers={"X-Test": "t"}, body=b"hi")
    assert (result.body, result.complete) == (b"POST t hi", True)


@pytest.mark.parametrize("how", ["leave the block", "disconnect()"])
async def test_client_disconnect_mid_stream_reaches_the_app(
    server: RunningServer, app: ProbeApp, how: str
) -> None:
    async with open_stream(server.url, "/hold") as resp:
        assert await resp.read_exactly(7) == BODY[:7]
        assert not app.disconnected.is_set()
        if how == "disconnect()":
            await resp.disconnect()
            assert await anyio.to_thread.run_sync(app.disconnected.wait, 10.0)
    assert await anyio.to_thread.run_sync(app.disconnected.wait, 10.0)


async def test_body_cut_short_raises_incomplete_body(server: RunningServer) -> None:
    async with open_stream(server.url, "/broken") as resp:
        with pytest.raises(IncompleteBody) as caught:
            await resp.read_all()
        assert caught.value.body == HALF
        assert not resp.complete
    result = await fetch(server.url, "/broken")
    assert (result.status, result.body, result.complete) == (200, HALF, False)


async def test_a_silent_server_times_out_instead_of_hanging(server: RunningServer) -> None:
    async with open_stream(server.url, "/hold", timeout=0.2) as resp:
        assert await resp.read_exactly(len(BODY)) == BODY
        with pytest.raises(TimeoutError):
            await resp.read_some()


@pytest.mark.parametrize("server_name", SERVERS)
def test_lifespan_runs_around_the_server(server_name: ServerName) -> None:
    app = ProbeApp()
    with running_server(app, server=server_name):
        assert app.lifespan == ["startup"]
    assert app.lifespan == ["startup", "shutdown"]


def test_uvicorn_with_httptools() -> None:
    pytest.importorskip("httptools")
    with running_server(ProbeApp(), http="httptools") as server:
        result = anyio.run(fetch, server.url, "/chunked")
    assert (result.body, result.complete) == (BODY, True)


@pytest.mark.parametrize("server_name", SERVERS)
async def test_import_string_runs_in_a_subprocess_that_stops_with_the_block(
    server_name: ServerName,
) -> None:
    with running_server(SUBPROCESS, server=server_name) as server:
        result = await fetch(server.url, "/chunked")
        assert (result.body, result.complete) == (BODY, True)
    assert server.process is not None
    assert server.process.poll() is not None


@pytest.mark.parametrize("server_name", SERVERS)
async def test_import_string_runs_in_a_subprocess_a_test_can_kill(
    server_name: ServerName,
) -> None:
    with running_server(SUBPROCESS, server=server_name) as server:
        assert server.process is not None
        async with open_stream(server.url, "/hold") as resp:
            assert await resp.read_exactly(len(BODY)) == BODY
            server.kill()
            with pytest.raises(IncompleteBody) as caught:
                await resp.read_all()
        assert caught.value.body == BODY
        assert server.process.wait(10.0) == -signal.SIGKILL
