"""The app `bench/load.py` and `bench/peers.py` serve: one live-streaming endpoint, six ways.

``LOAD_VARIANT`` picks how ``GET /live`` is made resumable:

- ``bare``: a plain Starlette `StreamingResponse` (not resumable);
- ``memory`` / ``sqlite`` / ``redis`` / ``postgres``: the same endpoint behind
  `DurableMiddleware` with that store (``LOAD_SQLITE`` path, ``LOAD_REDIS`` and
  ``LOAD_POSTGRES`` URLs), key from the ``Durable-Key`` header;
- ``frs``: the PyPI package ``fastapi-resumable-stream`` (Redis list + pub/sub), wired as its
  README does: ``start`` a missing stream, else ``resume(after=0)``;
- ``rs``: the PyPI package ``resumable-stream`` (a port of Vercel's: Redis pub/sub between the
  producer and resumers), ``resumable_stream(id, make_stream)``.

The stream: ``?n=<chunks>&rate=<chunks per second>&size=<bytes per chunk>``. Each chunk starts
with ``T<unix time it was produced> `` so clients measure end-to-end latency.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

VARIANT = os.environ.get("LOAD_VARIANT", "bare")
REDIS_URL = os.environ.get("LOAD_REDIS", "redis://127.0.0.1:6379/0")
# The peers make a Redis connection per reader (pub/sub); redis-py 8 caps a pool at 100.
PEER_REDIS_URL = REDIS_URL + ("&" if "?" in REDIS_URL else "?") + "max_connections=100000"


def chunk(i: int, size: int) -> str:
    head = f"T{time.time():.6f} {i:06d} "
    return head + "x" * max(0, size - len(head) - 1) + "\n"


def params(request: Request) -> tuple[int, float, int]:
    q = request.query_params
    return int(q.get("n", "100")), float(q.get("rate", "20")), int(q.get("size", "64"))


async def produce(n: int, rate: float, size: int) -> AsyncIterator[str]:
    """`n` chunks at `rate` per second on a fixed schedule, or (0) as fast as possible — still
    awaiting between chunks, as a handler relaying an upstream does (a checkpoint: a handler
    that never awaits would let the store coalesce its whole output into a few writes)."""
    start = time.monotonic()
    for i in range(n):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()  # sleep(0)
        yield chunk(i, size)


async def live(request: Request) -> Response:
    n, rate, size = params(request)

    async def body() -> AsyncIterator[bytes]:
        async for text in produce(n, rate, size):
            yield text.encode()

    return StreamingResponse(body(), media_type="text/plain")


# -- peers --------------------------------------------------------------------------------------

_peer: dict[str, Any] = {}


async def live_frs(request: Request) -> Response:
    from fastapi_resumable_stream import ResumableStream
    from redis.asyncio import Redis

    if "ctx" not in _peer:
        _peer["ctx"] = ResumableStream(Redis.from_url(PEER_REDIS_URL), prefix="bench-frs")
    ctx = _peer["ctx"]
    key = request.headers["durable-key"]
    n, rate, size = params(request)
    if await ctx.status(key) == "missing":
        stream = await ctx.start(key, lambda: produce(n, rate, size))
    else:
        stream = await ctx.resume(key, after=0)
    return StreamingResponse(stream, media_type="text/plain")


async def live_rs(request: Request) -> Response:
    from resumable_stream import (
        CreateResumableStreamContextOptions,
        RedisPublisher,
        RedisSubscriber,
        create_resumable_stream_context,
    )

    if "ctx" not in _peer:
        # Its README's `create_resumable_stream_context(redis_url=...)` raises TypeError in
        # 0.2.0 (the options dataclass has no redis_url): pass connected clients instead.
        publisher, subscriber = RedisPublisher(PEER_REDIS_URL), RedisSubscriber(PEER_REDIS_URL)
        await publisher.connect()
        await subscriber.connect()
        options = CreateResumableStreamContextOptions(
            key_prefix="bench-rs", publisher=publisher, subscriber=subscriber
        )
        _peer["ctx"] = create_resumable_stream_context(options)
    ctx = _peer["ctx"]
    key = request.headers["durable-key"]
    n, rate, size = params(request)
    stream = await ctx.resumable_stream(key, lambda: produce(n, rate, size))
    if stream is None:
        return Response(status_code=204)
    return StreamingResponse(stream, media_type="text/plain")


async def health(request: Request) -> Response:
    return Response("ok")


_endpoint = {"frs": live_frs, "rs": live_rs}.get(VARIANT, live)
app = Starlette(routes=[Route("/live", _endpoint), Route("/health", health)])

if VARIANT in ("memory", "sqlite", "redis", "postgres"):
    # Each variant imports only the store it uses, as an app would (SQLiteStore brings
    # sqlite3).
    from durable_asgi import DurableMiddleware

    if VARIANT == "memory":
        from durable_asgi import MemoryStore

        store: Any = MemoryStore()
    elif VARIANT == "sqlite":
        from durable_asgi import SQLiteStore

        store = SQLiteStore(os.environ.get("LOAD_SQLITE", "/tmp/durable-load.db"))
    else:
        from durable_asgi import store_from_url

        store = store_from_url(REDIS_URL if VARIANT == "redis" else os.environ["LOAD_POSTGRES"])
    app.add_middleware(DurableMiddleware, store=store)  # type: ignore[arg-type]
    if VARIANT == "postgres" and os.environ.get("LOAD_STATS"):
        # What the store cost the database, for bench/load.py's table: written when the
        # middleware closes the store at shutdown (uvicorn re-raises SIGTERM: no atexit).
        close = store.close

        async def close_and_report() -> None:
            await close()
            await anyio.Path(os.environ["LOAD_STATS"]).write_text(str(store.round_trips))

        store.close = close_and_report
