"""Views that count their calls: a durable async streaming view, a sync one, a class-based
one, and a plain view the middleware must leave alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views import View

from durable_asgi import durable, keys

TOKENS = [f"django-{i:02d} " for i in range(40)]
BODY = "".join(TOKENS).encode()


class Counter:
    """Calls of the views, and an event set when a stream ran to its end."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = {}
        self.finished = 0
        self.ended = threading.Event()

    def hit(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1


counter = Counter()


async def tokens(prefix: str = "") -> AsyncIterator[bytes]:
    for token in TOKENS:
        await asyncio.sleep(0.003)
        yield f"{prefix}{token}".encode()
    counter.finished += 1
    counter.ended.set()


@durable(key=keys.path("/chat/{chat_id}/"))
async def chat(request: HttpRequest, chat_id: str) -> StreamingHttpResponse:
    counter.hit("chat")
    return StreamingHttpResponse(tokens(), content_type="text/plain")


@durable(key=keys.query("id"), ttl=60)
def chat_sync(request: HttpRequest) -> HttpResponse:
    counter.hit("chat_sync")
    return HttpResponse(BODY, content_type="text/plain")


class ChatView(View):
    @durable(key=keys.query("id"))
    async def get(self, request: HttpRequest) -> StreamingHttpResponse:
        counter.hit("class")
        return StreamingHttpResponse(tokens(), content_type="text/plain")


async def plain(request: HttpRequest) -> StreamingHttpResponse:
    counter.hit("plain")
    return StreamingHttpResponse(tokens(), content_type="text/plain")
