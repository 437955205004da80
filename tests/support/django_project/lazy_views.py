"""A `@durable` view only `lazy_urls` imports."""

from __future__ import annotations

from django.http import HttpRequest, StreamingHttpResponse

from durable_asgi import durable

from .views import counter, tokens


@durable
async def lazy(request: HttpRequest) -> StreamingHttpResponse:
    counter.hit("lazy")
    return StreamingHttpResponse(tokens(), content_type="text/plain")
