"""Mode 2 read by the official Python client (``durable-streams`` from PyPI): catch-up,
long-poll, SSE, resume from an offset, binary content, a stream aborted mid-way.

The released client (0.1.0) predates ``Stream-Closed``: its live reads poll on after the stream
closed. So live reads here stop once the bytes they expect came, and how the stream ended is
read from the protocol's own headers (`ending`), as any reader can."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from durable_streams import astream

from ..support.servers import running_server
from .harness import Serve, Setup
from .upstream import BINARY, binary, sse_body

pytestmark = pytest.mark.anyio

SECRET = "client-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


async def create(s: Setup, target: str, upstream: str | None = None) -> str:
    """``POST /v1/proxy`` for `target` on the origin: the pre-signed read URL (Location)."""
    async with httpx.AsyncClient() as client:
        created = await client.post(
            f"{s.url}/v1/proxy",
            headers={
                **AUTH,
                "Upstream-URL": (upstream or s.upstream) + target,
                "Upstream-Method": "GET",
            },
        )
    assert created.status_code == 201, created.text
    return created.headers["location"]


async def wait(event: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await anyio.to_thread.run_sync(event.wait, 0.2):
            pass


async def read(url: str, until: int | None = None, **options: Any) -> tuple[bytes, Any]:
    """The chunks the client yields, joined — all of them, or (live reads) the first `until`
    bytes — and its response (for its metadata)."""
    data = b""
    with anyio.fail_after(20):
        async with astream(url, **{"offset": "-1", **options}) as res:
            async for chunk in chunks(res):
                data += chunk
                if until is not None and len(data) >= until:
                    break
    return data, res


def chunks(res: Any) -> Any:
    """The response's body chunks as bytes (in SSE mode the client yields text only)."""
    if res.live != "sse":
        return aiter(res)

    async def encoded() -> Any:
        async for text in res.iter_text():
            yield text.encode()

    return encoded()


async def ending(url: str) -> str:
    """How the stream at `url` ended, from a catch-up read's headers: it must be closed."""
    async with httpx.AsyncClient() as client:
        got = await client.get(httpx.URL(url).copy_merge_params({"offset": "-1"}))
    assert got.status_code == 200, got.text
    assert got.headers["stream-closed"] == "true"
    return got.headers["durable-state"]


async def test_catch_up(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = await create(s, "/sse?n=8")
        await wait(s.origin.finished)
        data, res = await read(location, live=False)
        assert data == sse_body(8)
        assert res.up_to_date
        assert s.origin.calls["/sse"] == 1


async def test_long_poll_follows_a_live_stream_to_its_close(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = await create(s, "/sse?n=10&pause=4")
        await wait(s.origin.paused)

        async def release_later() -> None:
            s.origin.release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later)
            data, _ = await read(location, until=len(sse_body(10)), live="long-poll")
        assert data == sse_body(10)
        assert await ending(location) == "complete"
        assert s.origin.calls["/sse"] == 1


async def test_sse_follows_a_live_stream_to_its_close(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = await create(s, "/sse?n=10&pause=4")
        await wait(s.origin.paused)
        got = b""
        with anyio.fail_after(20):
            async with astream(location, offset="-1", live="sse") as res:
                async for chunk in chunks(res):
                    got += chunk
                    if got == sse_body(4):
                        s.origin.release.set()  # the rest arrives live, on the same read
                    if len(got) >= len(sse_body(10)):
                        break
        assert got == sse_body(10)
        assert await ending(location) == "complete"
        assert s.origin.calls["/sse"] == 1


async def test_resume_from_an_offset(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = await create(s, "/sse?n=12&pause=5")
        await wait(s.origin.paused)
        first, res = await read(location, live=False)
        assert first == sse_body(5)
        offset = res.offset
        s.origin.release.set()
        await wait(s.origin.finished)
        rest, _ = await read(location, len(sse_body(12)) - len(first), offset=offset, live="sse")
        assert first + rest == sse_body(12)
        assert await ending(location) == "complete"
        assert s.origin.calls["/sse"] == 1


# Not over SSE: the released client reads SSE as text and knows no base64 data encoding
# (tests/proxy/test_ds_protocol.py reads base64 SSE of binary content over HTTP).
@pytest.mark.parametrize("live", [False, "long-poll"])
async def test_binary_content(serve: Serve, live: Any) -> None:
    with running_server(binary) as up, serve(secret=SECRET, allow=[f"{up.url}/**"]) as s:
        location = await create(s, "/bin", upstream=up.url)
        data, res = await read(location, None if live is False else len(BINARY), live=live)
        if live is False and len(data) < len(BINARY):  # caught up before the end: read on
            rest, _ = await read(
                location, len(BINARY) - len(data), offset=res.offset, live="long-poll"
            )
            data += rest
        assert data == BINARY
        assert await ending(location) == "complete"


async def test_aborted_mid_way(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = await create(s, "/sse?n=10&pause=3")
        await wait(s.origin.paused)
        async with httpx.AsyncClient() as client:
            aborted = await client.patch(httpx.URL(location).copy_merge_params({"action": "abort"}))
        assert aborted.status_code == 204
        await wait(s.origin.stopped)
        for live in ("long-poll", "sse"):
            data, _ = await read(location, len(sse_body(3)), live=live)
            assert data == sse_body(3)  # what came before the abort stays readable
        data, res = await read(location, live=False)
        assert data == sse_body(3)
        assert res.headers["durable-state"] == "aborted"  # told how it ended, not left waiting
        assert await ending(location) == "aborted"
        assert s.origin.calls["/sse"] == 1
