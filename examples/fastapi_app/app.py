"""A chat app whose answers survive reloads: FastAPI + DurableMiddleware.

Run it with ``bash scripts/demo`` (from the repository root) and open http://127.0.0.1:8000.
Type a message, reload while the answer streams: it continues where it was. Open a second tab:
it shows the same answer, live. The store is the SQLite file ``durable-demo.db`` unless
``DURABLE_ASGI_STORE`` names another (``memory://``, ``redis://…``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

from durable_asgi import DurableMiddleware, keys, store_from_url

from .model import tokens

HERE = Path(__file__).parent
STORE_URL = os.environ.get("DURABLE_ASGI_STORE", "sqlite:///durable-demo.db")

app = FastAPI(title="durable_asgi chat demo")
app.add_middleware(
    DurableMiddleware,
    store=store_from_url(STORE_URL),
    key=keys.header("Durable-Key"),
    namespace="chat",
)
#: How many times the model was called (the browser tests read it: reloads must not add any).
app.state.model_calls = 0


class Message(BaseModel):
    message: str


@app.post("/api/chat")
async def chat(body: Message) -> StreamingResponse:
    app.state.model_calls += 1

    async def stream():  # type: ignore[no-untyped-def]
        async for token in tokens(body.message):
            yield token

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


@app.get("/api/stats")
async def stats() -> dict[str, int]:
    return {"model_calls": app.state.model_calls}


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(HERE / "index.html")
