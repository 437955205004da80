"""A chat app whose answers survive reloads: FastAPI + DurableMiddleware.

Run it with ``bash scripts/demo`` (from the repository root) and open http://127.0.0.1:8000.
Type a message, reload while the answer streams: it continues where it was. Open a second tab:
it shows the same answer, live. The store is the SQLite file ``durable-demo.db`` unless
``DURABLE_ASGI_STORE`` names another (``memory://``, ``redis://…``).

The page (``examples/common/index.html``, shared with the Django example) sends each turn as
``POST /api/chat`` with a ``Durable-Key`` header it made up for that turn; after a reload it
sends the same request again, which joins the stored answer instead of calling the model.

With ``DURABLE_ASGI_METRICS=prometheus`` (``DURABLE_ASGI_METRICS=prometheus bash scripts/demo``)
the app configures OpenTelemetry's SDK with its Prometheus exporter and serves ``/metrics``:
the setup ``docs/operations.md`` describes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel

from durable_asgi import DurableMiddleware, keys, store_from_url

from ..common import model

PAGE = Path(model.__file__).with_name("index.html")
STORE_URL = os.environ.get("DURABLE_ASGI_STORE", "sqlite:///durable-demo.db")

app = FastAPI(title="durable_asgi chat demo")

if os.environ.get("DURABLE_ASGI_METRICS") == "prometheus":
    # The application owns the SDK: a global MeterProvider read by Prometheus at /metrics.
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


app.add_middleware(
    DurableMiddleware,
    store=store_from_url(STORE_URL),
    key=keys.header("Durable-Key"),  # one key per turn, made up by the page
)


class Message(BaseModel):
    message: str


@app.post("/api/chat")
async def chat(body: Message) -> StreamingResponse:
    async def answer() -> AsyncIterator[bytes]:
        async for token in model.tokens(body.message):
            yield token.encode()

    return StreamingResponse(answer(), media_type="text/plain; charset=utf-8")


@app.get("/api/stats")
async def stats() -> dict[str, int]:
    """How many answers the model started: reloads and second tabs must not add any."""
    return {"model_calls": model.calls}


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(PAGE)
