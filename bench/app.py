"""The app `bench/run.py` serves: a Starlette app, bare or wrapped with DurableMiddleware.

``BENCH_STORE`` picks the variant: ``bare`` (no middleware), ``memory://``,
``sqlite:///path.db`` or ``redis://…`` (any `store_from_url` URL). Routes:

- ``/sse?n=<events>&pace=<seconds>``: ``n`` 20-byte SSE events ``data: tok-00000001\\n\\n`` …,
  the generator awaiting ``asyncio.sleep(pace)`` after each one (``pace=0`` still awaits): a
  handler relaying tokens, as an LLM relay does;
- ``/stream``: ``BENCH_CHUNKS`` (10,000) x 32-byte chunks from a generator that never awaits
  (the store coalesces them into a few big writes);
- ``/small``: a tiny response (the pass-through cost);
- ``/ticks``: timestamped chunks for the fan-out latency measurement.

``BENCH_OTEL``: ``absent`` blocks the ``opentelemetry`` import (as if not installed);
``metrics`` passes an SDK `MeterProvider` with an in-memory reader; ``traces`` also a
`TracerProvider` exporting to memory; unset, the API is installed and nothing configured.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

_otel = os.environ.get("BENCH_OTEL", "")
if _otel == "absent":

    class _Blocked:
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name.partition(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, _Blocked())  # type: ignore[arg-type]

from durable_asgi import DurableMiddleware, store_from_url  # noqa: E402

CHUNKS = int(os.environ.get("BENCH_CHUNKS", "10000"))
CHUNK = b"x" * 31 + b"\n"


def event(i: int) -> bytes:
    """The `i`-th (1-based) SSE event of ``/sse``: exactly 20 bytes."""
    return b"data: tok-%08d\n\n" % i


async def sse(request: Request) -> Response:
    n = int(request.query_params.get("n", "200"))
    pace = float(request.query_params.get("pace", "0.01"))

    async def body():  # type: ignore[no-untyped-def]
        for i in range(1, n + 1):
            yield event(i)
            await asyncio.sleep(pace)

    return StreamingResponse(body(), media_type="text/event-stream")


async def stream(request: Request) -> Response:
    async def body():  # type: ignore[no-untyped-def]
        for _ in range(CHUNKS):
            yield CHUNK

    return StreamingResponse(body(), media_type="text/plain")


async def ticks(request: Request) -> Response:
    """`n` chunks ``T<time.time_ns()>\n``, one every `interval` seconds: a follower in another
    process measures how long each took to reach it from the producer's send."""
    n = int(request.query_params.get("n", "200"))
    interval = float(request.query_params.get("interval", "0.005"))

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(n):
            await anyio.sleep(interval)
            yield b"T%019d\n" % time.time_ns()

    return StreamingResponse(body(), media_type="text/plain")


async def small(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/sse", sse),
        Route("/stream", stream),
        Route("/small", small),
        Route("/ticks", ticks),
    ]
)

_providers: dict[str, Any] = {}
if _otel in ("metrics", "traces"):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    _providers["meter_provider"] = MeterProvider(metric_readers=[InMemoryMetricReader()])
if _otel == "traces":
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _tracer_provider = TracerProvider()
    _tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    _providers["tracer_provider"] = _tracer_provider

_store = os.environ.get("BENCH_STORE", "bare")
if _store != "bare":
    app.add_middleware(DurableMiddleware, store=store_from_url(_store), **_providers)
