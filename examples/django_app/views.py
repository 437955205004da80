"""The chat views: the same API as the FastAPI example, so the same page drives both."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    JsonResponse,
    StreamingHttpResponse,
)
from django.views.decorators.http import require_GET, require_POST

from durable_asgi import durable, keys

from ..common import model

PAGE = Path(model.__file__).with_name("index.html")


@require_POST
@durable(key=keys.header("Durable-Key"), ttl=3600)
async def chat(request: HttpRequest) -> HttpResponse:
    """Stream the model's answer to ``{"message": ...}`` as plain text.

    The only durable view (``asgi.py`` uses ``routes="decorated"``): the page's ``Durable-Key``
    names the turn, so a reload that sends the same request again is served from the store and
    this view runs once per key.
    """
    try:
        message = json.loads(request.body)["message"]
    except (ValueError, KeyError, TypeError):
        return HttpResponseBadRequest('expected JSON {"message": "..."}')

    async def answer() -> AsyncIterator[bytes]:
        async for token in model.tokens(str(message)):
            yield token.encode()

    return StreamingHttpResponse(answer(), content_type="text/plain; charset=utf-8")


@require_GET
async def stats(request: HttpRequest) -> JsonResponse:
    """How many answers the model started: reloads and second tabs must not add any."""
    return JsonResponse({"model_calls": model.calls})


@require_GET
async def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(PAGE.read_bytes(), content_type="text/html; charset=utf-8")
