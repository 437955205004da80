"""The upstream of the proxy's browser test: a chat app whose page streams its answers through
the proxy the way durablefetch's AI SDK recipe does (``node/chat.html``, ``node/chat.mjs``).

    app = ChatApp(bundle)                       # bundle: node/chat.mjs built by esbuild
    with running_server(app, host="127.0.0.2", tls=certs.server) as upstream:
        app.proxy_host = "127.0.0.1:8443"       # the page's durablefetchHost
        ...                                     # GET /?chat=<id>, POST /api/chat?chatId=<id>

- ``GET /``: the page, told the proxy's host; ``GET /chat.js``: its script (the bundle).
- ``POST /api/chat``: an AI SDK 5 UI message stream (`ai_sdk.text_stream`) answering the last
  user message with the examples' fake model (`answer_for`), `delay` s a token. After
  `pause_at` tokens it sets `paused` and waits for `release`, so a test can reload the page
  mid-answer on cue. `model_calls` counts the answers started.

Events are `threading.Event`s: the server runs in a thread of its own.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from examples.common.model import fake_tokens
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from durable_asgi import ai_sdk
from durable_asgi._types import Receive, Scope, Send

from .npm_clients import NODE_DIR

__all__ = ["ChatApp", "last_user_text"]

PAGE = NODE_DIR / "chat.html"


def last_user_text(body: bytes) -> str:
    """The text of the last user message of an AI SDK 5 chat request body."""
    messages = json.loads(body)["messages"]
    user = [m for m in messages if m["role"] == "user"][-1]
    return "".join(p["text"] for p in user["parts"] if p["type"] == "text")


class ChatApp:
    """The chat upstream (an ASGI app) and what it saw."""

    def __init__(self, bundle: Path, *, delay: float = 0.02, pause_at: int = 12) -> None:
        self.bundle = bundle
        self.delay = delay
        self.pause_at = pause_at
        self.proxy_host = ""
        """The proxy's ``host:port``, for the page (set once the proxy listens)."""
        self.model_calls = 0
        self.paused = threading.Event()
        self.release = threading.Event()
        self._app = Starlette(
            routes=[
                Route("/", self._page),
                Route("/chat.js", self._script),
                Route("/api/chat", self._chat, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _page(self, request: Request) -> Response:
        html = PAGE.read_text().replace("{{DURABLEFETCH_HOST}}", self.proxy_host)
        return HTMLResponse(html)

    async def _script(self, request: Request) -> Response:
        return Response(self.bundle.read_bytes(), media_type="text/javascript")

    async def _chat(self, request: Request) -> Response:
        message = last_user_text(await request.body())
        self.model_calls += 1
        return StreamingResponse(
            ai_sdk.text_stream(self._tokens(message)), headers=ai_sdk.UI_MESSAGE_STREAM_HEADERS
        )

    async def _tokens(self, message: str) -> AsyncIterator[str]:
        i = 0
        async for token in fake_tokens(message, self.delay):
            if i == self.pause_at:
                self.paused.set()
                while not await anyio.to_thread.run_sync(
                    self.release.wait, 1.0, abandon_on_cancel=True
                ):
                    pass
            i += 1
            yield token
