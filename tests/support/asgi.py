"""An in-process ASGI client that streams: httpx's ASGITransport, minus the buffering.

`call(app, ...)` runs one request against an ASGI app and returns the response as it arrived,
including whether the body ended cleanly (``complete``). `disconnect_after=n` makes the client
leave after it has received `n` body bytes: from then on `receive()` reports
``http.disconnect`` and sends are dropped, as a real server does. Real-server tests live in
`servers.py`; this one is for the many cases that need no socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio

from durable_asgi._types import ASGIApp, Message


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    disconnected: bool = False

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    query: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The scope of an HTTP/1.1 request from a client on loopback, as servers send it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "extensions": {},
        **extra,
    }


async def call(
    app: ASGIApp,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    query: str = "",
    disconnect_after: int | None = None,
    disconnected: anyio.Event | None = None,
    timeout: float = 10.0,
    scope_extra: dict[str, Any] | None = None,
) -> Result:
    """Run one request. Raises TimeoutError rather than hang."""
    result = Result()
    gone = disconnected or anyio.Event()
    request_sent = False
    scope = {**http_scope(path, method=method, headers=headers, query=query), **(scope_extra or {})}

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            return
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.raw_headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            result.headers = {k.decode(): v.decode() for k, v in result.raw_headers}
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")
            if not message.get("more_body", False):
                result.complete = True
                gone.set()
            elif disconnect_after is not None and len(result.body) >= disconnect_after:
                result.disconnected = True
                gone.set()

    with anyio.fail_after(timeout):
        await app(scope, receive, send)
    return result
