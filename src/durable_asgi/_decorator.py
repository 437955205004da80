"""`@durable`: mark one FastAPI/Starlette endpoint or Django view durable, with its own options.

The decorator only *records* options (``endpoint.__durable__``); `DurableMiddleware` does the
work, finding the route before it calls the app (`_routes`). The wrapper it returns checks, on
every call, that the middleware is really in front: otherwise the route would silently not be
durable, so it raises `ConfigurationError` saying how to install it.

The wrapper keeps the endpoint's kind, signature and metadata (``functools.wraps``), so FastAPI
sees the same parameters, dependencies and body models, and Starlette/Django the same sync or
async callable. Generator endpoints get a plain function that checks, then returns the
generator: the check happens before any response starts, and FastAPI (which unwraps) still
streams it as the generator it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction

from . import _routes
from ._options import RouteOverrides
from ._routes import UNDECORATED, RouteOptions
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["durable"]

logger = logging.getLogger("durable_asgi")

F = TypeVar("F", bound=Callable[..., Any])


@overload
def durable(endpoint: F, /) -> F: ...


@overload
def durable(**overrides: Unpack[RouteOverrides]) -> Callable[[F], F]: ...


def durable(
    endpoint: F | None = None, /, **overrides: Unpack[RouteOverrides]
) -> F | Callable[[F], F]:
    """Make one route durable, with its own options.

    Put it *under* the route decorator. Every option you leave out takes the value
    `DurableMiddleware` was given; the middleware (one per app) holds the store. With
    ``DurableMiddleware(..., routes="decorated")`` only decorated routes are durable; with the
    default ``routes="all"`` decorated routes still get their own options.

    FastAPI / Starlette::

        app.add_middleware(DurableMiddleware, store=SQLiteStore("durable.db"),
                           routes="decorated")

        @app.post("/api/chat/{chat_id}")
        @durable(key=keys.path("/api/chat/{chat_id}"), ttl=3600)
        async def chat(chat_id: str, db: Session = Depends(get_db)) -> StreamingResponse:
            ...

    Django (``asgi.py`` wraps ``get_asgi_application()`` in `DurableMiddleware`)::

        @durable(key=keys.query("chatId"))
        async def chat(request):
            return StreamingHttpResponse(tokens(), content_type="text/plain")

    Sync and async functions (and generator endpoints) work, as do the ``get``/``post`` methods
    of a Starlette `HTTPEndpoint` or a Django class-based view. Called without the middleware
    in front of the app, the endpoint raises `ConfigurationError`; the undecorated function
    stays available as ``endpoint.__wrapped__`` (for unit tests).

    Args:
        **overrides: the `StreamOptions` this route sets for itself (`RouteOverrides`: ``key``,
            ``owner``, ``namespace``, ``ttl``, ``max_response_bytes``, ``max_duration``,
            ``sse_ids``, ``on_finished``, ``on_absent``), validated here.
    """
    RouteOptions("", overrides)  # validates them now, at import, not at the first request

    def decorate(func: F) -> F:
        if isinstance(func, type):
            raise TypeError(
                f"@durable can't decorate the class {func.__qualname__}: decorate its get/post "
                "methods instead"
            )
        if not callable(func):
            raise TypeError(f"@durable decorates an endpoint function, not {func!r}")
        route = RouteOptions(_name(func), overrides)
        wrapper = _wrap(func, route)
        wrapper.__durable__ = route  # type: ignore[attr-defined]
        # Marked, to tell a route registered with the undecorated function (the decorators in
        # the wrong order) what went wrong.
        with contextlib.suppress(AttributeError, TypeError):
            setattr(func, UNDECORATED, route)
        return wrapper

    return decorate if endpoint is None else decorate(endpoint)


def _wrap(func: F, route: RouteOptions) -> F:
    if iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_endpoint(*args: Any, **kwargs: Any) -> Any:
            _check(route, args)
            return await func(*args, **kwargs)

        return async_endpoint  # type: ignore[return-value]

    @functools.wraps(func)
    def endpoint(*args: Any, **kwargs: Any) -> Any:
        _check(route, args)
        return func(*args, **kwargs)

    return endpoint  # type: ignore[return-value]


def _check(route: RouteOptions, args: tuple[Any, ...]) -> None:
    mark = _routes.current.get()
    if mark is None:
        raise ConfigurationError(_missing_middleware(route, args))
    if mark.resolved and mark.route is None and route not in mark.resolver.warned:
        mark.resolver.warned.add(route)
        logger.warning(
            "durable_asgi: @durable endpoint %s ran, but DurableMiddleware didn't match the "
            "request to it, so it isn't durable. Is a layer between the middleware and the "
            "router hiding the routes (a middleware without an .app attribute, or one that "
            "rewrites the path)? Put DurableMiddleware closer to the router.",
            route.endpoint,
        )


def _missing_middleware(route: RouteOptions, args: tuple[Any, ...]) -> str:
    head = (
        f"@durable endpoint {route.endpoint} was called without DurableMiddleware in front of "
        "the app, so it can't be durable."
    )
    if _is_django(args):
        return (
            f"{head} Wrap the ASGI application in your asgi.py:\n"
            "    application = DurableMiddleware(get_asgi_application(), store=...)\n"
            "and serve it with an ASGI server (uvicorn, daphne): under WSGI (runserver without "
            "daphne, gunicorn sync workers) no ASGI middleware runs."
        )
    return (
        f"{head} Add it to the app:\n"
        "    app.add_middleware(DurableMiddleware, store=...)   # FastAPI / Starlette\n"
        "or, for Django, wrap get_asgi_application() in DurableMiddleware in asgi.py."
    )


def _is_django(args: tuple[Any, ...]) -> bool:
    http = sys.modules.get("django.http")
    return http is not None and any(isinstance(arg, http.HttpRequest) for arg in args[:2])


def _name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None)
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{module}.{name}" if module else name
