"""The upstream of the proxy tests: a real Starlette app that streams SSE and counts its calls.

    origin = Origin()
    with running_server(origin) as up:        # tests/support/servers.py
        ...                                    # GET /sse?n=20&pause=3&fail=5, /status/404, ...

- ``/sse``: `n` events (`sse_event(i)`), awaiting `delay` seconds before each (``wait``: seconds
  before the response head). ``pause=k``:
  after k events it sets `paused` and waits for `release`; ``fail=k``: raises instead of
  sending event k (the server resets the connection mid-body). It counts events `sent`, sets
  `finished` when it ran to its end and `stopped` when its client left (it was cancelled).
- ``/status/{code}``: that status, body ``status {code}``.
- ``/hang``: never answers; returns when its client leaves.
- ``/gzip``: the SSE body gzip-compressed, ``Content-Encoding: gzip``; ``/garbage``: claims
  gzip, sends something else.
- ``/echo``: the request as JSON (method, headers, body); ``/headers``: an answer with headers
  the proxy must replace.

Events are `threading.Event`s: the server runs in a thread of its own. `binary` is another
upstream: `BINARY` as ``application/octet-stream``, 300 bytes a chunk.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from durable_asgi._types import Receive, Scope, Send

__all__ = ["BINARY", "EVENTS", "Origin", "binary", "sse_body", "sse_event"]

EVENTS = 20


def sse_event(i: int) -> bytes:
    return b'id: %d\ndata: {"n": %d, "text": "token-%02d"}\n\n' % (i, i, i)


def sse_body(n: int = EVENTS) -> bytes:
    return b"".join(sse_event(i) for i in range(n))


BINARY = bytes(range(256)) * 16


async def binary(scope: Scope, receive: Receive, send: Send) -> None:
    """An upstream answering `BINARY` as application/octet-stream, 300 bytes a chunk."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/octet-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(0, len(BINARY), 300):
        chunk = BINARY[i : i + 300]
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class Origin:
    """The upstream app (an ASGI app) and what it saw."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        """Requests by path."""
        self.sent = 0
        """Events the /sse runs sent, in all."""
        self.finished = threading.Event()
        self.stopped = threading.Event()
        self.paused = threading.Event()
        self.release = threading.Event()
        self._app = Starlette(
            routes=[
                Route("/sse", self._sse, methods=["GET", "POST"]),
                Route("/status/{code:int}", self._status),
                Route("/hang", self._hang),
                Route("/gzip", self._gzip),
                Route("/garbage", self._garbage),
                Route("/echo", self._echo, methods=["GET", "POST"]),
                Route("/headers", self._headers),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls[scope["path"]] += 1
        await self._app(scope, receive, send)

    async def _sse(self, request: Request) -> Response:
        query = request.query_params
        n, delay = int(query.get("n", EVENTS)), float(query.get("delay", 0.005))
        pause, fail = int(query.get("pause", -1)), int(query.get("fail", -1))
        await anyio.sleep(float(query.get("wait", 0)))

        async def events() -> AsyncIterator[bytes]:
            try:
                for i in range(n):
                    if i == pause:
                        self.paused.set()
                        while not await anyio.to_thread.run_sync(
                            self.release.wait, 1.0, abandon_on_cancel=True
                        ):
                            pass
                    if i == fail:
                        raise RuntimeError("the upstream crashed mid-stream")
                    await anyio.sleep(delay)
                    self.sent += 1
                    yield sse_event(i)
                self.finished.set()
            except anyio.get_cancelled_exc_class():
                self.stopped.set()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _status(self, request: Request) -> Response:
        code = request.path_params["code"]
        return Response(f"status {code}", status_code=code)

    async def _hang(self, request: Request) -> Response:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        return Response(status_code=204)  # to no one: the client has gone

    async def _gzip(self, request: Request) -> Response:
        return Response(
            gzip.compress(sse_body()),
            media_type="text/event-stream",
            headers={"content-encoding": "gzip"},
        )

    async def _garbage(self, request: Request) -> Response:
        return Response(b"this is not gzip", headers={"content-encoding": "gzip"})

    async def _echo(self, request: Request) -> Response:
        seen = {
            "method": request.method,
            "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]],
            "body": (await request.body()).decode(),
        }
        return Response(json.dumps(seen), media_type="application/json")

    async def _headers(self, request: Request) -> Response:
        return Response(
            "ok",
            headers={
                "x-kept": "1",
                "cache-control": "max-age=3600",
                "access-control-allow-origin": "https://elsewhere.test",
                "set-cookie": "session=1",
            },
        )
