"""The app the multi-process tests serve from several uvicorn processes that share one store.

Configured by environment variables, so every process of a test is the same app:

- ``MP_STORE`` — the store URL (`store_from_url`), e.g. ``sqlite:////tmp/x.db`` or ``redis://…``.
- ``MP_CALLS`` — a file the handler appends one line to per call (``<pid> <key>``), so calls are
  counted across processes (one small ``O_APPEND`` write is atomic).
- ``MP_LEASE`` / ``MP_POLL`` — the middleware's ``lease_seconds`` / ``poll_interval``.

``GET /stream?n=<chunks>&delay=<seconds>`` streams `body(n)` (deterministic), sleeping `delay`
before each chunk. Durable with a ``Durable-Key`` header; without one it is the bare app. Every
response carries ``X-Worker-Pid``, the process that answered it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from durable_asgi import DurableMiddleware, store_from_url
from durable_asgi._types import Message, Receive, Scope, Send

__all__ = ["app", "body", "calls", "chunk"]


def chunk(i: int) -> bytes:
    return b"chunk %05d %s\n" % (i, b"x" * (i % 13))


def body(n: int) -> bytes:
    """What `GET /stream?n=<n>` returns."""
    return b"".join(chunk(i) for i in range(n))


def calls(path: str | os.PathLike[str], key: str) -> list[int]:
    """The pids of the processes that ran the handler for `key`, in order."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [int(pid) for pid, _, k in (line.partition(" ") for line in lines) if k == key]


async def stream(request: Request) -> Response:
    n = int(request.query_params.get("n", "100"))
    delay = float(request.query_params.get("delay", "0"))
    key = request.headers.get("durable-key", "")
    record = os.environ.get("MP_CALLS")
    if record and key:
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {key}\n".encode())
        finally:
            os.close(fd)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(n):
            if delay:
                await anyio.sleep(delay)
            yield chunk(i)

    return StreamingResponse(chunks(), media_type="text/plain")


class WorkerPid:
    """Adds ``X-Worker-Pid`` to every response: which process served it."""

    def __init__(self, app: DurableMiddleware) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-worker-pid", self.pid)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_pid if scope["type"] == "http" else send)


app = WorkerPid(
    DurableMiddleware(
        Starlette(routes=[Route("/stream", stream)]),
        store=store_from_url(os.environ.get("MP_STORE", "memory://")),
        lease_seconds=float(os.environ.get("MP_LEASE", "5")),
        poll_interval=float(os.environ.get("MP_POLL", "1")),
    )
)
