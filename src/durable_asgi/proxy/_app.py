"""`DurableProxy`: the proxy's ASGI app — its configuration, its lifespan and its core.

The core is small: a `DurableMiddleware` over the `Relay`, keyed by what the front door put in
the scope, plus the checks every upstream URL passes (strict parsing, the allowlist, never the
proxy itself). The front door — today durablefetch's URL scheme (`_durablefetch`) — turns a
request into an upstream URL and a key, and calls `DurableProxy.forward`. No second engine:
the relay is the handler, so claims, leases, fencing, limits, TTLs and every store work as
they do under the middleware.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .. import keys
from .._middleware import DurableMiddleware
from .._options import StreamOptions
from .._request import DurableRequest, header
from .._types import Receive, Scope, Send
from ..exceptions import BadRequest
from ..stores import Store
from . import _ds, _durablefetch
from ._allow import Allowlist
from ._upstream import DEFAULT_LIMITS, DEFAULT_TIMEOUT, UPSTREAM, Relay
from ._url import Upstream, parse_upstream, request_target, split_authority

if TYPE_CHECKING:
    import httpx
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from typing_extensions import Unpack

    from .._options import OptionFields

__all__ = ["DOCS_URL", "DurableProxy"]

DOCS_URL = "https://github.com/durable-asgi/durable-asgi/blob/main/docs/proxy.md"
"""Where ``GET /`` sends a browser by default."""

_KEY = "durable_asgi.proxy.key"  # scope[_KEY]: the stream key the front door chose
_WILDCARD = frozenset({"0.0.0.0", "[::]", ""})


def _key_of(request: DurableRequest) -> keys.Key:
    key: keys.Key = request.scope[_KEY]
    return key


class DurableProxy:
    """A durable HTTP proxy: a pure ASGI app, on the same engine and stores as the middleware.

    It speaks durablefetch's URL scheme: ``GET|POST /{host}/{path}?{query}`` fetches
    ``{scheme}://{host}/{path}?{query}`` (the scheme is the request's) once, tees the answer
    into the store, keeps fetching when the client leaves, and serves every later request for
    that URL from the store, then live. ``POST /in-progress`` and ``POST /delete`` with
    ``{"url": ...}`` query and remove a stream (``/delete`` stops a running upstream).

    Example (standalone: ``uvicorn app:proxy``, or ``durable-asgi proxy``)::

        proxy = DurableProxy(allow=["https://api.openai.com/v1/**"],
                             store=SQLiteStore("proxy.db"))

    Example (mounted in Starlette, which doesn't run a mounted app's lifespan: pass it)::

        app = Starlette(routes=[Mount("/df", app=proxy)], lifespan=proxy.lifespan)

    Args:
        allow: the upstream URLs it may fetch (an `Allowlist`, or its patterns). Required: an
            empty one allows nothing; ``["**"]`` allows every URL (an open proxy).
        store: where streams live (default: ``$DURABLE_ASGI_STORE``, else a `MemoryStore`).
        options: `StreamOptions` (ttl, limits, lease, ...); the key is the upstream URL, so
            ``key``, ``namespace`` and ``owner`` are the proxy's own.
        **overrides: any other `StreamOptions` field as a keyword (``ttl=``,
            ``max_response_bytes=``, ...).
        methods: the methods proxied (others get 405).
        timeout: upstream timeouts (`httpx.Timeout`, or seconds for each).
        verify: upstream TLS: `True`, `False`, a CA bundle file to trust instead of the
            default ones, or an `ssl.SSLContext`.
        limits: the upstream connection pool's `httpx.Limits`.
        docs_url: where ``GET /`` redirects (None: it is a 400, a request without a host).
        shutdown_grace: seconds running upstreams get at shutdown before they end ``failed``.
        secret: enables mode 2, the Durable Streams proxy protocol at ``/v1/proxy``, with this
            service secret (``Authorization: Bearer`` or ``?secret=``), which also signs the
            pre-signed stream URLs.
        signature_ttl: seconds a pre-signed URL is valid (mode 2).
        header_timeout: seconds for the upstream's head (mode 2: then ``504``).
        body_timeout: seconds without a body chunk before the stream ends ``failed`` (mode 2).
        long_poll_timeout: seconds a ``live=long-poll`` read waits before ``204`` (mode 2).
        meter_provider: OpenTelemetry metrics, as `DurableMiddleware`'s, plus the upstream's
            status and time to first byte (``docs/operations.md``).
        tracer_provider: OpenTelemetry traces, as `DurableMiddleware`'s.
    """

    def __init__(
        self,
        *,
        allow: Allowlist | Iterable[str],
        store: Store | None = None,
        options: StreamOptions | None = None,
        methods: Sequence[str] = ("GET", "POST"),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
        limits: httpx.Limits = DEFAULT_LIMITS,
        docs_url: str | None = DOCS_URL,
        shutdown_grace: float = 10.0,
        secret: str | None = None,
        signature_ttl: float = 24 * 3600,
        header_timeout: float = 60.0,
        body_timeout: float = 600.0,
        long_poll_timeout: float = 30.0,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        **overrides: Unpack[OptionFields],
    ) -> None:
        own = {"key", "namespace", "owner"} & overrides.keys()
        if own or (options and (options.namespace or options.owner)):
            raise TypeError(
                "key, namespace and owner are the proxy's own: a stream is named by its "
                "upstream URL alone, as durablefetch names it"
            )
        self.allowlist = allow if isinstance(allow, Allowlist) else Allowlist(allow)
        self.methods = tuple(m.upper() for m in methods)
        if {"HEAD", "OPTIONS"} & set(self.methods):
            raise ValueError("HEAD and OPTIONS are never proxied (OPTIONS answers CORS)")
        self.docs_url = docs_url
        self.relay = Relay(timeout=timeout, verify=verify, limits=limits)
        stream_options = (options or StreamOptions()).replace(**overrides, key=_key_of)
        self.middleware = DurableMiddleware(
            self.relay,
            store=store,
            options=stream_options,
            methods=self.methods,
            shutdown_grace=shutdown_grace,
            client_path=None,
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
        )
        self.relay.engine = self.middleware.engine
        self.streams: _ds.DurableStreams | None = None
        """Mode 2, the Durable Streams proxy protocol at ``/v1/proxy`` (with ``secret``)."""
        if secret is not None:
            self.streams = _ds.DurableStreams(
                self,
                secret=secret,
                signature_ttl=signature_ttl,
                header_timeout=header_timeout,
                body_timeout=body_timeout,
                long_poll_timeout=long_poll_timeout,
            )

    def __repr__(self) -> str:
        return f"DurableProxy(allow={self.allowlist!r}, store={self.store!r})"

    @property
    def store(self) -> Store:
        """The store streams live in."""
        return self.middleware.store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.streams is not None:
                route = request_target(scope)
                if _ds.is_route(route):
                    await self.streams.serve(scope, receive, send, route)
                    return
            await _durablefetch.serve(self, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    # -- the core ---------------------------------------------------------------------------

    def upstream(self, url: str, scope: Scope | None = None) -> Upstream:
        """`url` checked for fetching: `BadRequest` with 400 when it is malformed, 403 when
        the allowlist doesn't allow it or it is the proxy's own address (that of `scope`'s
        server, or its ``Host``).

        Example: ``proxy.upstream("https://api.openai.com/v1/chat/completions")``
        """
        upstream = parse_upstream(url)
        if not self.allowlist.allows(upstream):
            raise BadRequest(f"the proxy's allowlist does not allow {upstream.url[:200]}", 403)
        if scope is not None and _is_self(upstream, scope):
            raise BadRequest("the proxy does not proxy to itself", 403)
        return upstream

    async def forward(
        self, upstream: Upstream, key: keys.Key, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Serve the request durably as the stream `key` (a `keys.Key` with its namespace):
        the first request fetches `upstream`, the others read the store."""
        scope[UPSTREAM] = upstream
        scope[_KEY] = key
        await self.middleware(scope, receive, send)

    async def status(self, key: keys.Key) -> dict[str, Any] | None:
        """The stream's status (as ``Durable-Control: status`` answers it), or None."""
        return await self.middleware.status(key, namespace=key.namespace)

    async def delete(self, key: keys.Key) -> bool:
        """Stop the stream's upstream if it runs (in this process at once; elsewhere its
        lease is revoked) and remove its data. True if it existed."""
        return await self.middleware.delete(key, namespace=key.namespace)

    # -- lifespan ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Open the store; at the end stop running upstreams (after ``shutdown_grace``),
        close the store and the upstream client. ASGI lifespan runs it; so can a host app
        the proxy is mounted in: ``Starlette(..., lifespan=proxy.lifespan)``."""
        await self.middleware.engine.ensure_open()
        try:
            yield
        finally:
            try:
                await self.middleware._shutdown()
            finally:
                await self.relay.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with contextlib.AsyncExitStack() as running:
            try:
                await running.enter_async_context(self.lifespan())
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


def _is_self(upstream: Upstream, scope: Scope) -> bool:
    """Whether `upstream` is this proxy: the address its server listens on (any loopback
    address, for a server on a loopback or wildcard address), or the request's ``Host``."""
    target = (upstream.host, upstream.port)
    server = scope.get("server")
    if server and server[1] is not None:
        host, port = str(server[0]).lower(), int(server[1])
        if ":" in host:
            host = f"[{host}]"
        if target == (host, port):
            return True
        # A server on a loopback or wildcard address is at every loopback address.
        local = host in _WILDCARD or _loopback(host)
        if port == upstream.port and local and _loopback(upstream.host):
            return True
    value = header(scope["headers"], b"host")
    if value is not None:
        own = split_authority(value.decode("latin-1"), str(scope.get("scheme", "http")))
        if own == target:
            return True
    return False


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
