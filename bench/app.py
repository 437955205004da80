"""The app the benchmarks serve: a Starlette app, bare or wrapped with DurableMiddleware.

``BENCH_STORE`` picks the variant: ``bare`` (no middleware), ``memory://``,
``sqlite:///path.db`` or ``redis://…`` (any `store_from_url` URL).
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from durable_asgi import DurableMiddleware, store_from_url

CHUNKS = int(os.environ.get("BENCH_CHUNKS", "10000"))
CHUNK = b"x" * 31 + b"\n"


async def stream(request: Request) -> Response:
    async def body():  # type: ignore[no-untyped-def]
        for _ in range(CHUNKS):
            yield CHUNK

    return StreamingResponse(body(), media_type="text/plain")


async def small(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/stream", stream), Route("/small", small)])

_store = os.environ.get("BENCH_STORE", "bare")
if _store != "bare":
    app.add_middleware(DurableMiddleware, store=store_from_url(_store))
