"""Mode 2, the Durable Streams proxy protocol, over HTTP against real uvicorns (every store)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from .harness import Serve, Setup
from .upstream import sse_body

pytestmark = pytest.mark.anyio

SECRET = "test-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


async def create(s: Setup, target: str, method: str = "GET", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{s.url}/v1/proxy",
            headers={
                **AUTH,
                "Upstream-URL": s.upstream + target,
                "Upstream-Method": method,
                **headers,
            },
        )


async def get(url: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(httpx.URL(url).copy_merge_params(params))


async def read_all(location: str) -> tuple[bytes, httpx.Response]:
    """Catch-up reads from the start until Stream-Closed; the bytes and the last response."""
    body, offset = b"", "-1"
    with anyio.fail_after(20):
        while True:
            response = await get(location, offset=offset, live="long-poll")
            assert response.status_code in (200, 204), response.text
            body += response.content
            offset = response.headers["stream-next-offset"]
            if response.headers.get("stream-closed") == "true":
                return body, response


def error(response: httpx.Response) -> str:
    data: dict[str, Any] = json.loads(response.content)
    return str(data["error"]["code"])


async def test_create_then_catch_up_read(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        created = await create(s, "/sse?n=5")
        assert created.status_code == 201, created.text
        assert created.headers["upstream-content-type"].startswith("text/event-stream")
        location = created.headers["location"]
        assert location.startswith(f"{s.url}/v1/proxy/")
        body, last = await read_all(location)
        assert body == sse_body(5)
        assert last.headers["durable-state"] == "complete"
        assert s.origin.calls["/sse"] == 1


async def test_sse_read(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        created = await create(s, "/sse?n=5")
        location = created.headers["location"]
        async with httpx.AsyncClient(timeout=30) as client:
            url = httpx.URL(location).copy_merge_params({"offset": "-1", "live": "sse"})
            response = await client.get(url)
        assert response.headers["content-type"] == "text/event-stream"
        events = _events(response.text)
        data = "".join(v for k, v in events if k == "data")
        assert data.encode() == sse_body(5)
        controls = [json.loads(v) for k, v in events if k == "control"]
        assert controls[-1]["streamClosed"] is True
        assert controls[-1]["durableState"] == "complete"


def _events(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, lines = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                lines.append(line[6:] if line.startswith("data: ") else line[5:])
        out.append((name, "\n".join(lines)))
    return out
