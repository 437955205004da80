"""The Vercel AI SDK contract: ``useChat({ resume: true })`` against a Python backend.

AI SDK 5's `useChat` talks to two endpoints (``api`` defaults to ``/api/chat``):

- ``POST {api}`` with the JSON body ``{"id": <chat id>, "messages": [...], "trigger":
  "submit-message" | "regenerate-message", "messageId": ...}`` starts a turn and reads its UI
  message stream (``text/event-stream``, ``x-vercel-ai-ui-message-stream: v1``);
- ``GET {api}/{chat id}/stream`` (sent on mount with ``resume: true``, e.g. after a reload)
  must answer **204 with no body** when nothing is running for that chat, and the running turn's
  stream otherwise.

`ChatMiddleware` wires both onto one store, so your app only implements the ``POST``:

    from fastapi import FastAPI
    from durable_asgi import ai_sdk

    app = FastAPI()
    app.add_middleware(ai_sdk.ChatMiddleware, api="/api/chat")

    @app.post("/api/chat")
    async def chat(request: ChatRequest) -> StreamingResponse:
        return StreamingResponse(ai_sdk.text_stream(my_model(request.messages)),
                                 headers=ai_sdk.UI_MESSAGE_STREAM_HEADERS)

Each ``POST`` is a new turn (a new stream: ``on_finished="rerun"``, the key is the chat id),
except that a ``POST`` arriving while the chat's turn is still running joins it instead of
starting the model twice. The ``GET`` joins the running turn from its first byte — the AI SDK
expects the whole message stream — and answers 204 without calling anything when the chat has
no running turn (``on_finished="no_content"``, ``on_absent="no_content"``). Both use one
namespace (``namespace``, default: `api`), so the control API takes the bare chat id::

    await chat_middleware.abort(chat_id)      # a "stop" button

The two endpoints need different policies for the same stream: `ChatMiddleware` is one
`DurableMiddleware` (one store, one engine, one set of running producers) whose
`request_options` picks the turn's options or the resume endpoint's, derived from them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any
from uuid import uuid4

from . import keys
from ._middleware import DurableMiddleware
from ._options import StreamOptions
from ._types import ASGIApp, Scope

__all__ = ["UI_MESSAGE_STREAM_HEADERS", "ChatMiddleware", "text_stream"]

UI_MESSAGE_STREAM_HEADERS: Mapping[str, str] = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}
"""The response headers of an AI SDK 5 UI message stream (as ``createUIMessageStreamResponse``
sets them, minus the hop-by-hop ``connection``)."""


class ChatMiddleware(DurableMiddleware):
    """Durable ``POST {api}`` turns and the ``GET {api}/{id}/stream`` resume endpoint.

    Example (FastAPI)::

        app.add_middleware(ai_sdk.ChatMiddleware, api="/api/chat", store=SQLiteStore("chat.db"))

    Example (any ASGI app, e.g. Django's ``asgi.py``)::

        application = ai_sdk.ChatMiddleware(get_asgi_application(), api="/api/chat")

    Your app implements ``POST {api}`` only; the resume ``GET`` is answered here (from the
    store, or 204) and never reaches it. Every other request passes straight through.

    Args:
        app: the ASGI app to wrap.
        api: the chat endpoint, as given to ``useChat``/``DefaultChatTransport`` (``api``).
        namespace: the namespace of the chat streams (default: `api`). Streams are keyed by
            chat id in it.
        **options: any other `DurableMiddleware` option (``store``, ``ttl``, ``owner``,
            ``max_duration``, ...). ``key``, ``on_finished``, ``on_absent`` and ``routes`` are
            set by this recipe.
    """

    def __init__(
        self, app: ASGIApp, *, api: str = "/api/chat", namespace: str | None = None, **options: Any
    ) -> None:
        fixed = {"key", "on_finished", "on_absent", "routes", "namespace"} & options.keys()
        if fixed:
            raise TypeError(f"ai_sdk.ChatMiddleware sets {sorted(fixed)} itself")
        api = "/" + api.strip("/")
        self.api = api
        self.namespace = namespace if namespace is not None else api
        options.setdefault("client_path", None)  # the recipe answers its two endpoints only
        super().__init__(
            app,
            key=keys.json_body("id"),
            namespace=self.namespace,
            on_finished="rerun",
            **options,
        )
        #: The turns' policy is `options`; the resume endpoint's is derived from it.
        self.resume_options = self.options.replace(
            key=keys.path(api + "/{chat_id}/stream"),
            on_finished="no_content",
            on_absent="no_content",
        )

    def request_options(self, scope: Scope) -> StreamOptions | None:
        path, method = scope["path"], scope["method"]
        if method == "POST" and path.rstrip("/") == self.api:
            return self.options
        if method == "GET" and path.startswith(self.api + "/") and path.endswith("/stream"):
            return self.resume_options
        return None


async def text_stream(
    deltas: AsyncIterable[str], *, message_id: str | None = None
) -> AsyncIterator[bytes]:
    """An AI SDK 5 UI message stream (server-sent events) carrying one text part.

    Turns text deltas (e.g. an LLM's tokens) into ``start``, ``text-start``, ``text-delta``…,
    ``text-end``, ``finish`` events and the closing ``data: [DONE]``; serve it with
    `UI_MESSAGE_STREAM_HEADERS`::

        return StreamingResponse(ai_sdk.text_stream(tokens()), headers=UI_MESSAGE_STREAM_HEADERS)
    """
    text_id = uuid4().hex
    start: dict[str, Any] = {"type": "start"}
    if message_id is not None:
        start["messageId"] = message_id
    yield _event(start)
    yield _event({"type": "start-step"})
    yield _event({"type": "text-start", "id": text_id})
    async for delta in deltas:
        if delta:
            yield _event({"type": "text-delta", "id": text_id, "delta": delta})
    yield _event({"type": "text-end", "id": text_id})
    yield _event({"type": "finish-step"})
    yield _event({"type": "finish"})
    yield b"data: [DONE]\n\n"


def _event(chunk: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
