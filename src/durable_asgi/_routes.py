"""Route resolution: the `@durable` options of the endpoint a request will reach.

A resume must never run the handler, so the middleware needs a request's route options
*before* it calls the app. `RouteResolver` walks from the app the middleware wraps down to its
router and matches the request the way the framework is about to:

- Starlette / FastAPI: through middleware layers (``.app``) and app objects (``.router``) to the
  `Router`; the first route whose ``matches(scope)`` is FULL wins, descending into `Mount` and
  `Host`, and into FastAPI's lazily included routers (FastAPI >= 0.137) through their
  ``effective_route_contexts()``.
- Django: ``get_resolver().resolve(path_info)``, with the script name removed as Django's ASGI
  handler does.

Nothing is cached per path: route tables may change at runtime, `Host` routes look at a header,
custom routes may look at anything in the scope, and path parameters make every chat URL
different. Matching is a handful of regex matches, and only runs for an app whose routes hold a
`@durable` endpoint (`RouteResolver.in_use`, found on the first request); an app without
decorators pays nothing.

The middleware also tells endpoints it is there: `current` is set for every HTTP request it
handles, which is how a decorated endpoint knows it isn't running bare (see `_decorator`).
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from ._options import RouteOverrides, StreamOptions
from ._types import Scope

__all__ = [
    "RequestMark",
    "RouteOptions",
    "RouteResolver",
    "current",
    "options_of",
]

logger = logging.getLogger("durable_asgi")


@dataclass(frozen=True, eq=False)
class RouteOptions:
    """What `@durable` records on an endpoint (``endpoint.__durable__``): the options that
    route sets for itself (`RouteOverrides`); every other one is the middleware's. `apply`
    merges them into a middleware's options, once per middleware."""

    endpoint: str
    """The endpoint's qualified name, for messages."""
    overrides: RouteOverrides
    _applied: weakref.WeakKeyDictionary[StreamOptions, StreamOptions] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False
    )

    def __post_init__(self) -> None:
        unknown = self.overrides.keys() - RouteOverrides.__annotations__.keys()
        if unknown:
            raise TypeError(f"@durable got unknown options {sorted(unknown)}")
        try:
            StreamOptions().replace(**self.overrides)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"@durable: {exc}") from None

    def apply(self, base: StreamOptions) -> StreamOptions:
        """This route's options under a middleware whose own options are `base`."""
        options = self._applied.get(base)
        if options is None:
            options = self._applied[base] = base.replace(**self.overrides)
        return options


# -- "this request went through DurableMiddleware" ---------------------------------------------


@dataclass
class RequestMark:
    """What the middleware tells the endpoints of one request (through `current`)."""

    resolver: RouteResolver
    """The resolver of the middleware the request went through (it keeps the warnings given)."""
    resolved: bool = False
    """Whether the middleware looked the request's route up (it does for its `methods`)."""
    route: RouteOptions | None = None
    """The `@durable` options it found, if any."""


current: ContextVar[RequestMark | None] = ContextVar("durable_asgi_request", default=None)
"""Set by `DurableMiddleware` for each HTTP request while the app handles it."""


# -- finding the endpoint ------------------------------------------------------------------------

UNDECORATED = "__durable_undecorated__"
"""Set by `@durable` on the function it wraps (pointing at its `RouteOptions`), to diagnose
routes that hold the unwrapped function (the decorators in the wrong order)."""


def options_of(endpoint: object, method: str) -> RouteOptions | None:
    """The `@durable` options of an endpoint: a function, or a class whose method for `method`
    (``get``, ``post``) is decorated (Starlette's `HTTPEndpoint`, Django's `View`)."""
    found = getattr(_function_of(endpoint, method), "__durable__", None)
    return found if isinstance(found, RouteOptions) else None


def _function_of(endpoint: object, method: str) -> object:
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    if isinstance(endpoint, type):
        return getattr(endpoint, method.lower(), None)
    return endpoint


_METHODS = ("get", "post", "put", "patch", "delete")


def _mentions_durable(endpoint: object) -> bool:
    """Whether an endpoint (a function or a class's methods) is `@durable`, wrapped or not."""
    return any(
        hasattr(function, "__durable__") or hasattr(function, UNDECORATED)
        for function in {_function_of(endpoint, method) for method in _METHODS}
    )


_DJANGO: Final = "django"
_MAX_DEPTH = 32  # layers of middleware and mounts; deeper is surely a cycle


class RouteResolver:
    """Finds the `RouteOptions` of the endpoint a request will reach (None: not `@durable`).

    Each middleware has its own: whether its app has `@durable` routes at all (`in_use`), and
    which warnings it has given, are its own business, not the process's.

    Example::

        resolver = RouteResolver(app)
        options = resolver.resolve(scope)   # before calling app(scope, ...)
    """

    def __init__(self, app: object) -> None:
        self.app = app
        self.ready = False
        self.in_use = False
        """Whether the app's routes hold any `@durable` endpoint (known once `ready`)."""
        self.warned: weakref.WeakSet[RouteOptions] = weakref.WeakSet()
        """The routes warned about, so each warning is given once."""
        self._target: tuple[object, str | None] = (None, None)

    def prepare(self) -> None:
        """Find the router (on the first request: Starlette builds its middleware stack
        lazily), import what defines the routes (Django imports its URLconf, and so the views,
        only when it resolves its first request), and look for `@durable` among them
        (`in_use`): an app without any is never matched."""
        self.ready = True
        self._target = _router_of(self.app) or (None, None)
        router = self._target[0]
        try:
            if router is _DJANGO:
                self.in_use = _django_in_use()
            elif router is not None:
                self.in_use = _routes_in_use(router.routes, 0)  # type: ignore[attr-defined]
        except Exception:
            # The framework meets the same error when it routes the request, and reports it.
            logger.debug("durable_asgi: reading the routes failed", exc_info=True)
            self.in_use = True

    def resolve(self, scope: Scope) -> RouteOptions | None:
        if not self.ready:
            self.prepare()
        router, root_path = self._target
        if router is None or not self.in_use:
            return None
        try:
            if router is _DJANGO:
                return self._resolve_django(scope)
            probe = dict(scope)
            if root_path:
                probe["root_path"] = root_path
            return self._match_routes(router.routes, probe, 0)[1]  # type: ignore[attr-defined]
        except Exception:
            # The framework meets the same error when it routes the request, and reports it.
            logger.debug("durable_asgi: route resolution failed", exc_info=True)
            return None

    def _options_of(self, endpoint: object, method: str) -> RouteOptions | None:
        options = options_of(endpoint, method)
        if options is None:
            route = getattr(_function_of(endpoint, method), UNDECORATED, None)
            if isinstance(route, RouteOptions) and route not in self.warned:
                self.warned.add(route)
                logger.warning(
                    "durable_asgi: a route calls %s without its @durable wrapper, so it isn't "
                    "durable. If it should be, apply @durable under the route decorator "
                    "(@app.get(...) first, then @durable(...)) or register the function "
                    "@durable returned.",
                    route.endpoint,
                )
        return options

    def _match_routes(
        self, routes: Iterable[Any], scope: Scope, depth: int
    ) -> tuple[bool, RouteOptions | None]:
        """Like Starlette's router: the first FULL match wins. Returns (matched, its options)."""
        full = sys.modules["starlette.routing"].Match.FULL
        for route in routes:
            contexts = getattr(route, "effective_route_contexts", None)
            if contexts is not None:
                # A router FastAPI includes lazily: its routes, prefixed, in order.
                matched, options = self._match_routes(contexts(), scope, depth)
                if matched:
                    return matched, options
                continue
            match, child = route.matches(scope)
            if match == full:
                child_scope = {**scope, **child}
                inner = getattr(route, "starlette_route", None) or route
                mounted = _mounted_app(inner)
                if mounted is not None:
                    return True, self._match_app(mounted, child_scope, depth + 1)
                return True, self._options_of(child.get("endpoint"), scope["method"])
        return False, None

    def _match_app(self, app: object, scope: Scope, depth: int) -> RouteOptions | None:
        if depth > _MAX_DEPTH:
            return None
        target = _router_of(app)
        if target is None:
            return None
        router, root_path = target
        if router is _DJANGO:
            return self._resolve_django(scope)
        if root_path:
            scope["root_path"] = root_path
        return self._match_routes(router.routes, scope, depth)[1]  # type: ignore[attr-defined]

    def _resolve_django(self, scope: Scope) -> RouteOptions | None:
        from django.conf import settings  # type: ignore[import-untyped,unused-ignore]
        from django.urls import (  # type: ignore[import-untyped,unused-ignore]
            Resolver404,
            get_resolver,
        )

        path: str = scope["path"]
        script_name = settings.FORCE_SCRIPT_NAME or scope.get("root_path", "") or ""
        if script_name:
            path = path.removeprefix(script_name)
        try:
            match = get_resolver().resolve(path or "/")
        except Resolver404:
            return None
        options = self._options_of(match.func, scope["method"])
        if options is None:
            view_class = getattr(match.func, "view_class", None)  # a class-based view's as_view()
            if view_class is not None:
                options = self._options_of(view_class, scope["method"])
        return options


def _routes_in_use(routes: Iterable[Any], depth: int) -> bool:
    """Whether any of these Starlette routes leads to a `@durable` endpoint. A route of a kind
    it doesn't know counts as yes: the resolver then matches requests, as it must to be sure."""
    routing = sys.modules["starlette.routing"]
    if depth > _MAX_DEPTH:
        return True
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            if _routes_in_use(contexts(), depth + 1):
                return True
            continue
        inner = getattr(route, "starlette_route", None) or route
        mounted = _mounted_app(inner)
        if mounted is not None:
            target = _router_of(mounted)
            if target is not None and (
                _django_in_use()
                if target[0] is _DJANGO
                else _routes_in_use(target[0].routes, depth + 1)  # type: ignore[attr-defined]
            ):
                return True
        elif isinstance(inner, (routing.Route, routing.WebSocketRoute)):
            if _mentions_durable(inner.endpoint):
                return True
        else:
            return True
    return False


def _django_in_use() -> bool:
    """Imports the URLconf (and so the views) and looks for `@durable` views in it."""
    from django.urls import get_resolver  # type: ignore[import-untyped,unused-ignore]

    def walk(patterns: Iterable[Any], depth: int) -> bool:
        for pattern in patterns:
            nested = getattr(pattern, "url_patterns", None)
            if nested is not None:
                if depth > _MAX_DEPTH or walk(nested, depth + 1):
                    return True
                continue
            callback = getattr(pattern, "callback", None)
            if _mentions_durable(callback) or _mentions_durable(
                getattr(callback, "view_class", None)
            ):
                return True
        return False

    return walk(get_resolver().url_patterns, 0)


def _router_of(app: object) -> tuple[object, str | None] | None:
    """Walk middleware layers down to the router: (a Starlette `Router` or `_DJANGO`, the
    ``root_path`` a FastAPI app on the way sets)."""
    routing = sys.modules.get("starlette.routing")
    applications = sys.modules.get("starlette.applications")
    django_asgi = sys.modules.get("django.core.handlers.asgi")
    root_path: str | None = None
    for _ in range(_MAX_DEPTH):
        if routing is not None and isinstance(app, routing.Router):
            return app, root_path
        if applications is not None and isinstance(app, applications.Starlette):
            root_path = getattr(app, "root_path", None) or root_path  # FastAPI(root_path=...)
            app = app.router
            continue
        if django_asgi is not None and isinstance(app, django_asgi.ASGIHandler):
            return _DJANGO, None
        mapping = getattr(app, "application_mapping", None)  # Channels' ProtocolTypeRouter
        inner = mapping.get("http") if isinstance(mapping, dict) else getattr(app, "app", None)
        if inner is None or inner is app:
            return None
        app = inner
    return None


def _mounted_app(route: object) -> object | None:
    routing = sys.modules["starlette.routing"]
    if isinstance(route, (routing.Mount, routing.Host)):
        app: object = route.app
        return app
    return None
