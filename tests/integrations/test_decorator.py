"""`@durable` routes: FastAPI, Starlette and Django, resolved before the app runs.

Every scenario counts handler calls: a resume (a reload, a second tab) must be served from the
store without calling the handler again, byte for byte what the first request got. Streaming and
disconnects go through a real uvicorn (`tests.support.servers`); the rest runs in-process on
asyncio and trio. Django is asyncio-only, as its ASGI handler is.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Host, Mount, Route, Router

from durable_asgi import ConfigurationError, DurableMiddleware, MemoryStore, durable, keys
from durable_asgi._routes import RouteResolver, options_of
from durable_asgi._types import ASGIApp, Receive, Scope, Send

from ..support.apps import wait_thread_event
from ..support.asgi import call
from ..support.servers import fetch, open_stream, running_server

pytestmark = pytest.mark.anyio

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
"""For Django (asyncio only) and real-server tests (the servers run their own loops)."""

TOKENS = [f"token-{i:02d} " for i in range(40)]
BODY = "".join(TOKENS).encode()


@dataclass
class Handler:
    """Counts an endpoint's calls; `ended` is set when a stream ran to its end."""

    calls: int = 0
    finished: int = 0
    ended: threading.Event = field(default_factory=threading.Event)
    delay: float = 0.0

    async def tokens(self, prefix: str = "") -> AsyncIterator[bytes]:
        for token in TOKENS:
            await anyio.sleep(self.delay)
            yield f"{prefix}{token}".encode()
        self.finished += 1
        self.ended.set()

    def stream(self, prefix: str = "") -> StreamingResponse:
        self.calls += 1
        return StreamingResponse(self.tokens(prefix), media_type="text/plain")


def wrap(app: ASGIApp, **options: Any) -> DurableMiddleware:
    return DurableMiddleware(app, store=MemoryStore(), **options)


def assert_replayed(first: Any, again: Any, body: bytes) -> None:
    """`first` ran the handler, `again` came from the store; both carry exactly `body`."""
    assert first.status == again.status == 200
    assert first.body == again.body == body
    assert first.headers.get("durable-replay") is None
    assert again.headers["durable-replay"] == "true"


# -- FastAPI ------------------------------------------------------------------------------------


class ChatIn(BaseModel):
    id: str
    prompt: str


def fastapi_app(handler: Handler, **options: Any) -> FastAPI:
    """An app with a prefixed router (path params, body model, a shared namespace) and an
    undecorated route; the middleware added as users do."""
    router = APIRouter(prefix="/v1")

    @router.get("/chat/{chat_id}")
    @durable(key=keys.path("/v1/chat/{chat_id}"))
    async def by_path(chat_id: str, shout: bool = False) -> StreamingResponse:
        return handler.stream(f"{chat_id.upper() if shout else chat_id}:")

    @router.post("/chat")
    @durable(key=keys.json_body("id"), namespace="chat")
    async def start(body: ChatIn) -> StreamingResponse:
        return handler.stream(f"{body.prompt}:")

    @router.get("/chat/{chat_id}/stream")
    @durable(key=keys.path("/v1/chat/{chat_id}/stream"), namespace="chat", on_absent="no_content")
    async def resume(chat_id: str) -> StreamingResponse:
        raise AssertionError("a resume endpoint is never called")

    app = FastAPI()
    app.include_router(router)

    @app.get("/plain")
    async def plain() -> StreamingResponse:
        return handler.stream()

    app.add_middleware(DurableMiddleware, store=MemoryStore(), **options)
    return app


@pytest.mark.parametrize("routes", ["decorated", "all"])
async def test_fastapi_included_router_with_path_params(routes: str) -> None:
    handler = Handler()
    app = fastapi_app(handler, routes=routes)
    first = await call(app, "/v1/chat/42", query="shout=true")
    again = await call(app, "/v1/chat/42", query="shout=true")
    assert_replayed(first, again, b"".join(b"42:" + t.encode() for t in TOKENS))
    other = await call(app, "/v1/chat/7")
    assert other.body.startswith(b"7:token-00")
    resumed = await call(app, "/v1/chat/42", headers={"Durable-Offset": "30"})
    assert resumed.body == first.body[30:]
    assert resumed.headers["durable-offset"] == "30"
    assert handler.calls == 2


async def test_fastapi_body_model_and_a_get_that_resumes_the_post() -> None:
    handler = Handler()
    app = fastapi_app(handler, routes="decorated")
    body = b'{"id": "c1", "prompt": "hi"}'
    absent = await call(app, "/v1/chat/c1/stream")
    assert (absent.status, absent.body) == (204, b"")  # per-route on_absent; nothing ran
    json = {"Content-Type": "application/json"}
    first = await call(app, "/v1/chat", method="POST", headers=json, body=body)
    again = await call(app, "/v1/chat", method="POST", headers=json, body=body)
    assert_replayed(first, again, b"".join(b"hi:" + t.encode() for t in TOKENS))
    # namespace="chat" on both routes: the GET joins the stream the POST started.
    joined = await call(app, "/v1/chat/c1/stream", headers={"Durable-Offset": "5"})
    assert joined.body == first.body[5:]
    assert joined.headers["durable-replay"] == "true"
    invalid = await call(app, "/v1/chat", method="POST", headers=json, body=b'{"id": "c2"}')
    assert invalid.status == 422  # validation still runs: the handler's signature is intact
    assert handler.calls == 1


async def test_routes_decorated_leaves_other_routes_untouched() -> None:
    handler = Handler()
    app = fastapi_app(handler, routes="decorated")
    for _ in range(2):
        result = await call(app, "/plain", headers={"Durable-Key": "k"})
        assert result.body == BODY
        assert not any(name.startswith("durable-") for name in result.headers)
    control = await call(app, "/plain", headers={"Durable-Key": "k", "Durable-Control": "abort"})
    assert control.body == BODY
    assert handler.calls == 3


async def test_routes_all_keeps_undecorated_routes_durable_and_route_keys_win() -> None:
    handler = Handler()
    app = fastapi_app(handler)  # routes="all", key: the Durable-Key header
    plain = [await call(app, "/plain", headers={"Durable-Key": "k"}) for _ in range(2)]
    assert_replayed(*plain, BODY)
    # The decorated route keys on its path, not on the middleware's header.
    await call(app, "/v1/chat/9", headers={"Durable-Key": "k"})
    replay = await call(app, "/v1/chat/9")
    assert replay.headers["durable-replay"] == "true"
    assert handler.calls == 2


async def test_per_route_ttl_and_namespace_override_the_middleware() -> None:
    handler = Handler()
    app = FastAPI()

    @app.get("/short")
    @durable(ttl=60, namespace="shared")
    async def short() -> StreamingResponse:
        return handler.stream()

    @app.get("/long")
    async def long() -> StreamingResponse:
        return handler.stream()

    mw = wrap(app, ttl=3600)
    key = {"Durable-Key": "k"}
    await call(mw, "/short", headers=key)
    await call(mw, "/long", headers=key)
    short_status = await mw.status("k", namespace="shared")
    long_status = await mw.status("k", namespace="/long")
    assert short_status is not None and long_status is not None
    assert short_status["expires_at"] - short_status["updated_at"] == pytest.approx(60, abs=2)
    assert long_status["expires_at"] - long_status["updated_at"] == pytest.approx(3600, abs=2)
    assert await mw.status("k", namespace="/short") is None
    assert handler.calls == 2


async def test_sync_endpoint_and_sse_generator_endpoint() -> None:
    handler = Handler()
    app = FastAPI()

    @app.get("/sync")
    @durable
    def sync() -> StreamingResponse:  # FastAPI runs it in a worker thread
        return handler.stream()

    @app.get("/sse", response_class=EventSourceResponse)
    @durable(sse_ids=True)
    async def sse() -> AsyncIterator[dict[str, str]]:
        handler.calls += 1
        for token in TOKENS[:5]:
            yield {"token": token}

    mw = wrap(app, routes="decorated")
    key = {"Durable-Key": "k"}
    sync_results = [await call(mw, "/sync", headers=key) for _ in "ab"]
    assert_replayed(*sync_results, BODY)
    first = await call(mw, "/sse", headers=key)
    again = await call(mw, "/sse", headers=key)
    assert first.body.count(b"data: ") == 5
    assert b"id: " in first.body  # the route's sse_ids
    assert_replayed(first, again, first.body)
    assert handler.calls == 2


async def test_decorator_above_the_route_decorator_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Handler()
    app = FastAPI()

    @durable  # wrong order: FastAPI registered the undecorated function
    @app.get("/s")
    async def s() -> StreamingResponse:
        return handler.stream()

    mw = wrap(app, routes="decorated")
    with caplog.at_level(logging.WARNING, logger="durable_asgi"):
        for _ in range(2):
            result = await call(mw, "/s", headers={"Durable-Key": "k"})
            assert result.body == BODY and "durable-offset" not in result.headers
    assert "apply @durable under the route decorator" in caplog.text
    assert caplog.text.count("without its @durable wrapper") == 1
    assert handler.calls == 2


async def test_fastapi_without_the_middleware_says_how_to_add_it() -> None:
    app = FastAPI()

    @app.get("/s")
    @durable
    async def s() -> str:
        return "never"

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(ConfigurationError) as caught:
            await client.get("/s")
    message = str(caught.value)
    assert "without DurableMiddleware" in message
    assert "app.add_middleware(DurableMiddleware" in message
    assert "test_decorator" in message and ".s " in message  # names the endpoint
    assert await s.__wrapped__() == "never"  # the function itself, for unit tests


# -- FastAPI yield dependencies, through a real server ------------------------------------------


@asyncio_only
async def test_yield_dependency_stays_open_until_the_stream_ends_despite_a_disconnect() -> None:
    events: list[str] = []
    closed = threading.Event()
    handler = Handler(delay=0.005)

    async def session() -> AsyncIterator[dict[str, bool]]:
        state = {"open": True}
        events.append("open")
        try:
            yield state
        finally:
            state["open"] = False
            events.append("close")
            closed.set()

    app = FastAPI()

    @app.get("/chat/{chat_id}")
    @durable(key=keys.path("/chat/{chat_id}"))
    async def chat(
        chat_id: str,
        db: dict[str, bool] = Depends(session),  # noqa: B008 (a local: Annotated can't see it)
    ) -> Response:
        handler.calls += 1

        async def body() -> AsyncIterator[bytes]:
            async for chunk in handler.tokens():
                assert db["open"], "the dependency closed while the handler streamed"
                yield chunk
            events.append("stream end")

        return StreamingResponse(body(), media_type="text/plain")

    app.add_middleware(DurableMiddleware, store=MemoryStore(), routes="decorated")
    with running_server(app) as server:
        async with open_stream(server.url, "/chat/1") as response:
            assert response.header("durable-state") == "running"
            received = await response.read_exactly(30)
        # The client left; the handler and its dependency carry on to the end, in order.
        await wait_thread_event(closed)
        assert events == ["open", "stream end", "close"]
        assert handler.finished == 1
        rest = await fetch(server.url, "/chat/1", headers={"Durable-Offset": str(len(received))})
        whole = await fetch(server.url, "/chat/1")
    assert rest.complete and received + rest.body == BODY
    assert whole.complete and whole.body == BODY and whole.header("durable-replay") == "true"
    assert handler.calls == 1
    assert events == ["open", "stream end", "close"]


# -- Starlette ----------------------------------------------------------------------------------


class ChatEndpoint(HTTPEndpoint):
    handler = Handler()

    @durable(key=keys.query("chat"))
    async def get(self, request: Request) -> Response:
        return self.handler.stream()

    async def post(self, request: Request) -> Response:
        return self.handler.stream()


def starlette_app(handler: Handler) -> Starlette:
    async def chat(request: Request) -> Response:
        return handler.stream(request.path_params["chat_id"] + ":")

    async def plain(request: Request) -> Response:
        return handler.stream()

    sub = Starlette(routes=[Route("/chat/{chat_id}", durable(chat), methods=["GET", "POST"])])
    return Starlette(
        routes=[
            Route("/plain", plain),
            Mount("/api", routes=[Route("/chat/{chat_id}", durable(chat), methods=["POST"])]),
            Mount("/sub", app=sub),
            Route("/endpoint", ChatEndpoint),
        ]
    )


@pytest.mark.parametrize("path", ["/api/chat/5", "/sub/chat/5"])
async def test_starlette_route_in_a_mount(path: str) -> None:
    handler = Handler()
    app = wrap(starlette_app(handler), routes="decorated")
    key = {"Durable-Key": "k"}
    first = await call(app, path, method="POST", headers=key)
    again = await call(app, path, method="POST", headers=key)
    assert_replayed(first, again, b"".join(b"5:" + t.encode() for t in TOKENS))
    undecorated = await call(app, "/plain", headers=key)
    assert "durable-offset" not in undecorated.headers
    assert handler.calls == 2


async def test_starlette_http_endpoint_method() -> None:
    ChatEndpoint.handler = handler = Handler()
    app = wrap(starlette_app(handler), routes="decorated")
    first = await call(app, "/endpoint", query="chat=1")
    again = await call(app, "/endpoint", query="chat=1")
    assert_replayed(first, again, BODY)
    posted = await call(app, "/endpoint", method="POST", query="chat=1")
    assert "durable-offset" not in posted.headers  # only `get` is decorated
    assert handler.calls == 2


async def test_starlette_without_the_middleware_raises() -> None:
    handler = Handler()
    with pytest.raises(ConfigurationError, match=r"app\.add_middleware\(DurableMiddleware"):
        await call(starlette_app(handler), "/api/chat/1", method="POST")
    assert handler.calls == 0


async def test_a_layer_hiding_the_router_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    handler = Handler()
    inner = starlette_app(handler)

    async def opaque(scope: Scope, receive: Receive, send: Send) -> None:  # no `.app`
        await inner(scope, receive, send)

    app = wrap(opaque, routes="decorated")
    with caplog.at_level(logging.WARNING, logger="durable_asgi"):
        result = await call(app, "/api/chat/1", method="POST", headers={"Durable-Key": "k"})
    assert result.body.startswith(b"1:") and "durable-offset" not in result.headers
    assert "didn't match the request to it" in caplog.text


# -- resolution details -------------------------------------------------------------------------


def scope_for(path: str, method: str = "GET", host: str = "testserver", **extra: Any) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", host.encode())],
        **extra,
    }


async def endpoint(request: Request) -> Response:
    return Response()


def test_the_first_full_match_wins_and_a_method_mismatch_is_no_match() -> None:
    marked = durable(endpoint)
    resolver = RouteResolver(
        Router(
            [
                Route("/a", endpoint, methods=["POST"]),
                Route("/a", marked, methods=["GET"]),
                Route("/b", endpoint),
                Route("/b", marked),
            ]
        )
    )
    assert resolver.resolve(scope_for("/a")) is marked.__durable__  # type: ignore[attr-defined]
    assert resolver.resolve(scope_for("/a", "PUT")) is None
    assert resolver.resolve(scope_for("/b")) is None  # the undecorated route answers /b


@pytest.mark.filterwarnings("ignore:The `root_path` parameter is deprecated")
def test_host_routes_root_path_and_mounted_fastapi_apps() -> None:
    api = FastAPI(root_path="/api")
    router = APIRouter(prefix="/r")

    @router.get("/{item:int}")
    @durable
    async def item(item: int) -> str:
        return ""

    api.include_router(router)
    options = item.__durable__  # type: ignore[attr-defined]

    resolver = RouteResolver(api)
    assert resolver.resolve(scope_for("/api/r/1")) is options
    assert resolver.resolve(scope_for("/api/r/x")) is None  # the path convertor says no
    hosted = RouteResolver(Router([Host("api.example.com", app=Mount("", routes=api.routes))]))
    assert hosted.resolve(scope_for("/r/2", host="api.example.com")) is options
    assert hosted.resolve(scope_for("/r/2")) is None
    outer = FastAPI()
    outer.mount("/v2", FastAPI(routes=api.router.routes))
    assert RouteResolver(outer).resolve(scope_for("/v2/r/3")) is options


def test_options_are_found_through_partials_and_classes() -> None:
    marked = durable(key=keys.query("x"), ttl=5)(endpoint)
    options = options_of(partial(marked), "GET")
    assert options is not None and options.overrides["ttl"] == 5
    assert options_of(ChatEndpoint, "GET") is ChatEndpoint.get.__durable__  # type: ignore[attr-defined]
    assert options_of(ChatEndpoint, "POST") is None
    assert options_of(endpoint, "GET") is None


def test_route_options_merge_once_per_middleware() -> None:
    marked = durable(ttl=5, owner=None)(endpoint)
    route = marked.__durable__  # type: ignore[attr-defined]
    mw = wrap(Router([]), ttl=100, owner=keys.cookie("session"), sse_ids=True)
    config = route.apply(mw.options)
    assert config is route.apply(mw.options)
    assert (config.ttl, config.sse_ids, config.owner) == (5, True, None)
    assert config.key is mw.options.key


def test_bad_options_and_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="ttl"):
        durable(ttl=-1)
    with pytest.raises(ValueError, match="on_absent"):
        durable(on_absent="maybe")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decorate its get/post methods"):
        durable(ChatEndpoint)


# -- Django -------------------------------------------------------------------------------------


@pytest.fixture
def django_app() -> Iterator[ASGIApp]:
    """Django's ASGI application for `tests.support.django_project`, with its settings in force."""
    import django
    from django.conf import settings
    from django.core.asgi import get_asgi_application
    from django.test.utils import override_settings

    from ..support.django_project import settings as project

    if not settings.configured:
        settings.configure(**{k: v for k, v in vars(project).items() if k.isupper()})
        django.setup()
    from ..support.django_project.views import counter

    counter.reset()
    overrides = {k: getattr(project, k) for k in ("ROOT_URLCONF", "ALLOWED_HOSTS", "MIDDLEWARE")}
    with override_settings(**overrides, FORCE_SCRIPT_NAME=None):
        yield get_asgi_application()


@asyncio_only
async def test_django_async_view_streams_once_through_a_real_server(django_app: ASGIApp) -> None:
    from ..support.django_project.views import BODY as DJANGO_BODY
    from ..support.django_project.views import counter

    app = wrap(django_app, routes="decorated")
    with running_server(app) as server:
        async with open_stream(server.url, "/chat/7/") as response:
            assert response.status == 200
            assert response.header("durable-state") == "running"
            received = await response.read_exactly(25)
        await wait_thread_event(counter.ended)
        rest = await fetch(server.url, "/chat/7/", headers={"Range": f"bytes={len(received)}-"})
        whole = await fetch(server.url, "/chat/7/")
        plain = [await fetch(server.url, "/plain/", headers={"Durable-Key": "k"}) for _ in "ab"]
    assert rest.complete and received + rest.body == DJANGO_BODY
    assert whole.complete and whole.body == DJANGO_BODY
    assert whole.header("durable-replay") == "true"
    assert [p.body for p in plain] == [DJANGO_BODY] * 2
    assert all(p.header("durable-offset") is None for p in plain)
    assert counter.calls == {"chat": 1, "plain": 2}
    assert counter.finished == 3


@asyncio_only
async def test_django_sync_view_class_view_and_script_name(django_app: ASGIApp) -> None:
    from ..support.django_project.views import BODY as DJANGO_BODY
    from ..support.django_project.views import counter

    app = wrap(django_app, routes="decorated")
    sync = [await call(app, "/sync/", query="id=1") for _ in "ab"]
    assert_replayed(*sync, DJANGO_BODY)
    status = await app.status("1", namespace="/sync/")
    assert status is not None
    assert status["expires_at"] - status["updated_at"] == pytest.approx(60, abs=2)
    by_class = [await call(app, "/class/", query="id=1") for _ in "ab"]
    assert_replayed(*by_class, DJANGO_BODY)
    # Behind a path prefix (root_path): Django strips it before resolving, and so do we.
    prefixed = [
        await call(app, "/prefix/sync/", query="id=2", scope_extra={"root_path": "/prefix"})
        for _ in "ab"
    ]
    assert_replayed(*prefixed, DJANGO_BODY)
    assert counter.calls == {"chat_sync": 2, "class": 1}


@asyncio_only
async def test_django_without_the_middleware_says_how_to_add_it(django_app: ASGIApp) -> None:
    from django.test import AsyncClient, Client

    from ..support.django_project.views import counter

    with pytest.raises(ConfigurationError) as caught:
        await AsyncClient().get("/chat/1/")
    message = str(caught.value)
    assert "DurableMiddleware(get_asgi_application()" in message
    assert "asgi.py" in message
    # Under WSGI no ASGI middleware can run: the same error, and it says so.
    with pytest.raises(ConfigurationError, match="under WSGI"):
        await anyio.to_thread.run_sync(partial(Client().get, "/sync/", {"id": "1"}))
    assert counter.calls == {}


@asyncio_only
@pytest.mark.parametrize("routes", ["all", "decorated"])
async def test_django_first_request_imports_the_urlconf_before_routing(
    django_app: ASGIApp, routes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.test.utils import override_settings

    from ..support import django_project
    from ..support.django_project.views import BODY as DJANGO_BODY
    from ..support.django_project.views import counter

    for module in ("lazy_urls", "lazy_views"):  # so importing them runs them again
        monkeypatch.delitem(sys.modules, f"{django_project.__name__}.{module}", raising=False)
        monkeypatch.delattr(django_project, module, raising=False)
    with override_settings(ROOT_URLCONF="tests.support.django_project.lazy_urls"):
        app = wrap(django_app, routes=routes)
        first = await call(app, "/lazy/", headers={"Durable-Key": "k"})
        again = await call(app, "/lazy/", headers={"Durable-Key": "k"})
    assert_replayed(first, again, DJANGO_BODY)
    assert counter.calls == {"lazy": 1}
