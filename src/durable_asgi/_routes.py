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
different. Matching is a handful of regex matches, and only runs once some `@durable` exists in
the process (`in_use`); an app without decorators pays nothing.

The middleware also tells endpoints it is there: `current` is set for every HTTP request it
handles, which is how a decorated endpoint knows it isn't running bare (see `_decorator`).
"""

from __future__ import annotations

import enum
import functools
import logging
import sys
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from . import keys
from ._engine import StreamOptions
from ._types import Scope

__all__ = [
    "INHERIT",
    "RequestMark",
    "RouteConfig",
    "RouteOptions",
    "RouteResolver",
    "current",
    "options_of",
]

logger = logging.getLogger("durable_asgi")


class Inherit(enum.Enum):
    """The type of `INHERIT`."""

    INHERIT = "INHERIT"

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Final = Inherit.INHERIT
"""A `@durable` option left unset: the route uses the middleware's value."""

in_use = False
"""True once any `@durable` decorator has run in this process."""


@dataclass(frozen=True, eq=False)
class RouteConfig:
    """The options one request runs with: the middleware's, with its route's overrides."""

    key: keys.Extractor
    owner: keys.Extractor | None
    namespace: str | None
    stream: StreamOptions


_STREAM_OPTIONS = (
    "ttl",
    "sse_ids",
    "max_duration",
    "max_response_bytes",
    "on_finished",
    "on_absent",
)


@dataclass(frozen=True, eq=False)
class RouteOptions:
    """What `@durable` records on an endpoint (``endpoint.__durable__``): per-route overrides.

    Every option left `INHERIT` takes the middleware's value. `config` merges them with a
    middleware's defaults, once per middleware.
    """

    endpoint: str = ""
    key: keys.Extractor | Inherit = INHERIT
    ttl: float | Inherit = INHERIT
    namespace: str | Inherit | None = INHERIT
    sse_ids: bool | Inherit = INHERIT
    max_duration: float | Inherit | None = INHERIT
    max_response_bytes: int | Inherit = INHERIT
    owner: keys.Extractor | Inherit | None = INHERIT
    on_finished: Literal["replay", "rerun", "no_content"] | Inherit = INHERIT
    on_absent: Literal["run", "no_content"] | Inherit = INHERIT
    _configs: weakref.WeakKeyDictionary[RouteConfig, RouteConfig] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for name in ("ttl", "max_duration", "max_response_bytes"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"@durable({name}=...) must not be negative")
        if self.on_finished not in (INHERIT, "replay", "rerun", "no_content"):
            raise ValueError("@durable(on_finished=...) must be 'replay', 'rerun' or 'no_content'")
        if self.on_absent not in (INHERIT, "run", "no_content"):
            raise ValueError("@durable(on_absent=...) must be 'run' or 'no_content'")

    def config(self, defaults: RouteConfig) -> RouteConfig:
        """This route's options under a middleware whose own options are `defaults`."""
        config = self._configs.get(defaults)
        if config is None:
            config = self._configs[defaults] = self._merge(defaults)
        return config

    def _merge(self, defaults: RouteConfig) -> RouteConfig:
        stream = {
            name: value for name in _STREAM_OPTIONS if (value := getattr(self, name)) is not INHERIT
        }
        return RouteConfig(
            key=defaults.key if self.key is INHERIT else self.key,
            owner=defaults.owner if self.owner is INHERIT else self.owner,
            namespace=defaults.namespace if self.namespace is INHERIT else self.namespace,
            stream=replace(defaults.stream, **stream),
        )


# -- "this request went through DurableMiddleware" ---------------------------------------------


@dataclass
class RequestMark:
    """What the middleware tells the endpoints of one request (through `current`)."""

    resolved: bool = False
    """Whether the middleware looked the request's route up (it does for its `methods`)."""
    route: RouteOptions | None = None
    """The `@durable` options it found, if any."""


current: ContextVar[RequestMark | None] = ContextVar("durable_asgi_request", default=None)
"""Set by `DurableMiddleware` for each HTTP request while the app handles it."""


# -- finding the endpoint ------------------------------------------------------------------------


undecorated: weakref.WeakKeyDictionary[Callable[..., Any], RouteOptions] = (
    weakref.WeakKeyDictionary()
)
"""The functions `@durable` wrapped, to diagnose routes that hold the unwrapped one."""
_warned: weakref.WeakSet[RouteOptions] = weakref.WeakSet()


def options_of(endpoint: object, method: str) -> RouteOptions | None:
    """The `@durable` options of an endpoint: a function, or a class whose method for `method`
    (``get``, ``post``) is decorated (Starlette's `HTTPEndpoint`, Django's `View`)."""
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    if isinstance(endpoint, type):
        endpoint = getattr(endpoint, method.lower(), None)
    found = getattr(endpoint, "__durable__", None)
    if isinstance(found, RouteOptions):
        return found
    if undecorated:
        _warn_if_undecorated(endpoint)
    return None


def _warn_if_undecorated(endpoint: object) -> None:
    if not callable(endpoint):
        return
    try:
        route = undecorated.get(endpoint)
    except TypeError:  # not weakly referenceable: not a function @durable wrapped
        return
    if route is not None and route not in _warned:
        _warned.add(route)
        logger.warning(
            "durable_asgi: a route calls %s without its @durable wrapper, so it isn't durable. "
            "If it should be, apply @durable under the route decorator (@app.get(...) first, "
            "then @durable(...)) or register the function @durable returned.",
            route.endpoint,
        )


_DJANGO: Final = "django"
_MAX_DEPTH = 32  # layers of middleware and mounts; deeper is surely a cycle


class RouteResolver:
    """Finds the `RouteOptions` of the endpoint a request will reach (None: not `@durable`).

    Example::

        resolver = RouteResolver(app)
        options = resolver.resolve(scope)   # before calling app(scope, ...)
    """

    def __init__(self, app: object) -> None:
        self.app = app
        self.ready = False
        self._target: tuple[object, str | None] = (None, None)

    def prepare(self) -> None:
        """Find the router (on the first request: Starlette builds its middleware stack
        lazily), and import what defines the routes, so their `@durable` decorators have run
        before the middleware asks whether there are any (`in_use`). Django imports its URLconf
        (and so the views) only when it resolves its first request."""
        self.ready = True
        self._target = _router_of(self.app) or (None, None)
        if self._target[0] is _DJANGO:
            try:
                from django.urls import get_resolver  # type: ignore[import-untyped,unused-ignore]

                get_resolver().url_patterns  # noqa: B018 (imports the URLconf)
            except Exception:
                # Django meets the same error when it resolves the request, and reports it.
                logger.debug("durable_asgi: importing the URLconf failed", exc_info=True)

    def resolve(self, scope: Scope) -> RouteOptions | None:
        if not self.ready:
            self.prepare()
        router, root_path = self._target
        if router is None or not in_use:
            return None
        try:
            if router is _DJANGO:
                return _resolve_django(scope)
            probe = dict(scope)
            if root_path:
                probe["root_path"] = root_path
            return _match_router(router, probe, 0)[1]
        except Exception:
            # The framework meets the same error when it routes the request, and reports it.
            logger.debug("durable_asgi: route resolution failed", exc_info=True)
            return None


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


def _match_router(router: Any, scope: Scope, depth: int) -> tuple[bool, RouteOptions | None]:
    return _match_routes(router.routes, scope, depth)


def _match_routes(
    routes: Iterable[Any], scope: Scope, depth: int
) -> tuple[bool, RouteOptions | None]:
    """Like Starlette's router: the first FULL match wins. Returns (matched, its options)."""
    full = sys.modules["starlette.routing"].Match.FULL
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            # A router FastAPI includes lazily: its routes, prefixed, in order.
            matched, options = _match_routes(contexts(), scope, depth)
            if matched:
                return matched, options
            continue
        match, child = route.matches(scope)
        if match == full:
            child_scope = {**scope, **child}
            inner = getattr(route, "starlette_route", None) or route
            mounted = _mounted_app(inner)
            if mounted is not None:
                return True, _match_app(mounted, child_scope, depth + 1)
            return True, options_of(child.get("endpoint"), scope["method"])
    return False, None


def _mounted_app(route: object) -> object | None:
    routing = sys.modules["starlette.routing"]
    if isinstance(route, (routing.Mount, routing.Host)):
        app: object = route.app
        return app
    return None


def _match_app(app: object, scope: Scope, depth: int) -> RouteOptions | None:
    if depth > _MAX_DEPTH:
        return None
    target = _router_of(app)
    if target is None:
        return None
    router, root_path = target
    if router is _DJANGO:
        return _resolve_django(scope)
    if root_path:
        scope["root_path"] = root_path
    return _match_router(router, scope, depth)[1]


def _resolve_django(scope: Scope) -> RouteOptions | None:
    from django.conf import settings  # type: ignore[import-untyped,unused-ignore]
    from django.urls import Resolver404, get_resolver  # type: ignore[import-untyped,unused-ignore]

    path: str = scope["path"]
    script_name = settings.FORCE_SCRIPT_NAME or scope.get("root_path", "") or ""
    if script_name:
        path = path.removeprefix(script_name)
    try:
        match = get_resolver().resolve(path or "/")
    except Resolver404:
        return None
    options = options_of(match.func, scope["method"])
    if options is None:
        view_class = getattr(match.func, "view_class", None)  # a class-based view's as_view()
        if view_class is not None:
            options = options_of(view_class, scope["method"])
    return options
