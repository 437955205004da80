"""`StreamOptions`: declared once, validated once, shared by the middleware, `@durable` and the
AI SDK recipe; route state belongs to each middleware, not to the process."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from starlette.responses import StreamingResponse
from starlette.routing import Route, Router

from durable_asgi import DurableMiddleware, MemoryStore, StreamOptions, ai_sdk, durable, keys
from durable_asgi._options import OptionFields, RouteOverrides
from durable_asgi._types import Scope

from ..support.asgi import call

pytestmark = pytest.mark.anyio


def test_keyword_arguments_are_exactly_the_fields() -> None:
    fields = {f.name for f in dataclasses.fields(StreamOptions)}
    assert set(OptionFields.__annotations__) | set(RouteOverrides.__annotations__) == fields
    assert set(RouteOverrides.__annotations__) < fields


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"ttl": -1}, ValueError, "ttl must not be negative"),
        ({"max_duration": -0.5}, ValueError, "max_duration"),
        ({"on_finished": "later"}, ValueError, "on_finished"),
        ({"on_absent": "maybe"}, ValueError, "on_absent"),
        ({"key": "Durable-Key"}, TypeError, "key extractor"),
        ({"tll": 5}, TypeError, "unknown .*options"),
    ],
)
def test_bad_options_are_refused_wherever_they_are_given(
    changes: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        StreamOptions().replace(**changes)
    with pytest.raises(error, match=match):
        DurableMiddleware(Router([]), store=MemoryStore(), **changes)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        durable(**changes)  # type: ignore[arg-type]


def test_an_options_object_and_keywords_mean_the_same() -> None:
    key = keys.query("chatId")
    given = StreamOptions(key=key, ttl=60)
    by_object = DurableMiddleware(Router([]), store=MemoryStore(), options=given)
    by_keywords = DurableMiddleware(Router([]), store=MemoryStore(), key=key, ttl=60)
    assert by_object.options is given
    assert repr(by_object.options) == repr(by_keywords.options)
    layered = DurableMiddleware(Router([]), store=MemoryStore(), options=given, ttl=5)
    assert (layered.options.ttl, layered.options.key, given.ttl) == (5, key, 60)


def test_the_ai_sdk_recipe_is_one_middleware_with_two_policies() -> None:
    chat = ai_sdk.ChatMiddleware(Router([]), api="/api/chat", ttl=99)
    turns = chat.request_options(_scope("POST", "/api/chat"))
    resume = chat.request_options(_scope("GET", "/api/chat/42/stream"))
    assert turns is chat.options and resume is chat.resume_options
    assert (turns.on_finished, turns.on_absent) == ("rerun", "run")
    assert (resume.on_finished, resume.on_absent) == ("no_content", "no_content")
    assert turns.ttl == resume.ttl == 99 and turns.namespace == resume.namespace == "/api/chat"
    assert chat.request_options(_scope("GET", "/other")) is None


async def _tokens() -> object:
    yield b"a"
    yield b"b"


def _stream(_request: object) -> StreamingResponse:
    return StreamingResponse(_tokens())  # type: ignore[arg-type]


async def test_a_durable_route_elsewhere_does_not_route_this_middleware() -> None:
    """Route state is per middleware: a `@durable` endpoint in another app leaves an app
    without any on the fast path (before, one decorator anywhere routed every middleware)."""
    decorated = DurableMiddleware(Router([Route("/d", durable(ttl=5)(_stream_copy()))]))
    plain = DurableMiddleware(Router([Route("/p", _stream)]))
    for mw, path in ((decorated, "/d"), (plain, "/p")):
        response = await call(mw, path, headers={"Durable-Key": "k"})
        assert response.body == b"ab"
    assert decorated._routes.in_use and not plain._routes.in_use


async def test_wrong_decorator_order_warns_once_per_middleware(
    caplog: pytest.LogCaptureFixture,
) -> None:
    undecorated = _stream_copy()
    durable(ttl=5)(undecorated)  # the wrapper is dropped: the route holds the bare function
    apps = [DurableMiddleware(Router([Route("/x", undecorated)])) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="durable_asgi"):
        for mw in apps * 2:
            await call(mw, "/x", headers={"Durable-Key": "k"})
    warnings = [r for r in caplog.records if "without its @durable wrapper" in r.message]
    assert len(warnings) == 2


def _stream_copy() -> object:
    def endpoint(_request: object) -> StreamingResponse:
        return StreamingResponse(_tokens())  # type: ignore[arg-type]

    return endpoint


def _scope(method: str, path: str) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": []}
