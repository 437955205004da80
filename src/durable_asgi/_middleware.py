"""`DurableMiddleware`: the pure-ASGI middleware.

The middleware object holds configuration and the process-wide `Engine` only; each request is
handled by `_Exchange`, which owns all per-request state (Starlette's GZip "responder" pattern).
Requests that aren't durable — other scope types, methods not listed, no key — go straight to the
app with nothing added but a dictionary lookup or two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
from asgiref.compatibility import guarantee_single_callable

from . import _routes, keys
from ._engine import FLUSH_WINDOW, Engine
from ._options import OptionFields, StreamOptions
from ._producer import Producer
from ._protocol import Control, parse_control, parse_offset, send_json
from ._reader import serve_info
from ._request import DurableRequest, header, replay_body
from ._routes import RequestMark, RouteResolver
from ._telemetry import Reading
from ._types import ASGIApp, Message, Receive, Scope, Send
from .exceptions import BadRequest, ClientDisconnected, StoreError, StoreFull
from .stores import Store, default_store
from .stores._base import Lease, StreamInfo, is_claimable, stream_id

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from typing_extensions import Unpack

__all__ = ["DurableMiddleware"]

logger = logging.getLogger("durable_asgi")

SCOPE_KEY = "durable_asgi"
"""``scope["durable_asgi"]`` is the middleware, for endpoints that want its control API."""


class DurableMiddleware:
    """Make streaming responses durable and resumable.

    The first request for a key runs the app; its response is teed into `store` while it
    streams, and the app keeps running if the client leaves. Later requests with the same key are
    served from the store — from ``Durable-Offset`` if given, then live — without calling the
    app again.

    Example (FastAPI / Starlette)::

        app.add_middleware(DurableMiddleware, store=SQLiteStore("durable.db"),
                           key=keys.query("chatId"))

    Example (Django ``asgi.py``)::

        application = DurableMiddleware(get_asgi_application(), key=keys.header("Durable-Key"))

    Args:
        app: the ASGI app to wrap.
        store: where streams live. Default: the URL in ``$DURABLE_ASGI_STORE``, else a
            `MemoryStore`.
        options: the `StreamOptions` of every durable request (key extractor, ttl, limits,
            owner binding, policies, ...); `@durable` routes override some of them.
        **overrides: any `StreamOptions` field as a keyword (``key=``, ``ttl=``, ...), applied
            over `options`: ``DurableMiddleware(app, key=keys.query("chatId"), ttl=3600)``.
        methods: HTTP methods that may be durable. ``HEAD``/``OPTIONS`` never are.
        routes: ``"all"`` (every request with a key) or ``"decorated"`` (only routes marked with
            `@durable`).
        shutdown_grace: on server shutdown, seconds running handlers get to finish before they
            are stopped (their streams end ``failed``).
        client_path: where the middleware serves the browser client
            (``<client_path>durable-fetch.js`` and its ``.d.ts``), so
            ``<script type="module">`` works with no build step. None turns it off.
        flush_window: the longest the worker waits between two stores of every stream's
            pending chunks (seconds). Idle, a chunk is stored at once; busy, the window is
            5 ms plus 0.7 ms per stream written, up to this. Longer: fewer, bigger store writes
            (less CPU per chunk) under load; shorter: joiners, resumers and other workers see
            live chunks sooner. The first client is fed inline either way
            (`docs/protocol.md`). asyncio only (on trio each stream stores as it goes).
        meter_provider: the OpenTelemetry `MeterProvider` to report metrics to (default: the
            global one, as of when the store opens; none configured: no metrics, at no cost).
            Needs ``opentelemetry-api`` (the ``otel`` extra); see ``docs/operations.md``.
        tracer_provider: the `TracerProvider` for the spans of productions and resumes
            (default: the global one, likewise).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        options: StreamOptions | None = None,
        methods: Sequence[str] = ("GET", "POST"),
        routes: Literal["all", "decorated"] = "all",
        shutdown_grace: float = 10.0,
        client_path: str | None = "/_durable/",
        flush_window: float = FLUSH_WINDOW,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        **overrides: Unpack[OptionFields],
    ) -> None:
        if routes not in ("all", "decorated"):
            raise ValueError(f"routes must be 'all' or 'decorated', not {routes!r}")
        if shutdown_grace < 0:
            raise ValueError("shutdown_grace must not be negative")
        self.app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
        self.options = (options or StreamOptions()).replace(**overrides)
        self.store: Store = default_store() if store is None else store
        self.methods = tuple(methods)
        self.routes = routes
        self.shutdown_grace = shutdown_grace
        self.client_path = client_path
        self.engine = Engine(
            self.store,
            flush_window=flush_window,
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
        )
        self._methods = frozenset(m.upper() for m in methods) - {"HEAD", "OPTIONS"}
        self._routes = RouteResolver(self.app)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.app!r}, store={self.store!r}, routes={self.routes!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            scope[SCOPE_KEY] = self
            path = scope["path"]
            client = self.client_path
            if (
                client
                and path.startswith(client)
                and await serve_asset(path[len(client) :], scope, send)
            ):
                return
            if not self._routes.ready:
                self._routes.prepare()  # e.g. imports Django's URLconf: its views may be @durable
            if self._routes.in_use or self.routes == "decorated":
                await self._call_routed(scope, receive, send)
                return
            if scope["method"] in self._methods:
                options = self.request_options(scope)
                if options is not None:
                    await _Exchange(self, options, scope, receive, send).run()
                    return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def request_options(self, scope: Scope) -> StreamOptions | None:
        """The options of a request no `@durable` route claims (None: it passes through).

        Subclasses choose between policies here: `ai_sdk.ChatMiddleware` gives its turn and
        resume endpoints two (derived with `StreamOptions.replace`) over one store and engine.
        """
        return self.options if self.routes == "all" else None

    async def _call_routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Find the request's `@durable` route before the app runs (a resume must never run
        it), and tell decorated endpoints the middleware is in front (they check)."""
        mark = RequestMark(self._routes)
        token = _routes.current.set(mark)
        try:
            if scope["method"] in self._methods:
                mark.resolved = True
                mark.route = route = self._routes.resolve(scope)
                options = self.request_options(scope)
                if route is not None:
                    options = route.apply(options or self.options)
                if options is not None:
                    await _Exchange(self, options, scope, receive, send).run()
                    return
            await self.app(scope, receive, send)
        finally:
            _routes.current.reset(token)

    # -- Python control API --------------------------------------------------------------------

    def _stream_id(self, key: str, namespace: str | None, owner: str | None) -> str:
        namespace = namespace if namespace is not None else self.options.namespace
        if namespace is None:
            raise TypeError(
                "pass namespace= (the request path by default, e.g. '/api/chat'), or configure "
                "DurableMiddleware(namespace=...) so bare keys name streams"
            )
        return stream_id(namespace, key, owner)

    async def status(
        self, key: str, *, namespace: str | None = None, owner: str | None = None
    ) -> dict[str, Any] | None:
        """The stream's status as the ``Durable-Control: status`` request returns it, or None.

        Example: ``await durable.status("chat-42", namespace="/api/chat")``
        """
        await self.engine.ensure_open()
        info = await self.store.info(self._stream_id(key, namespace, owner))
        return None if info is None else status_payload(key, info)

    async def abort(
        self, key: str, *, namespace: str | None = None, owner: str | None = None
    ) -> bool:
        """Stop the stream's handler; bytes so far stay readable. True if it was running."""
        await self.engine.ensure_open()
        stream = self._stream_id(key, namespace, owner)
        return await self.engine.abort(stream, ttl=self.options.ttl)

    async def delete(
        self, key: str, *, namespace: str | None = None, owner: str | None = None
    ) -> bool:
        """Abort the stream if running and remove its data. True if it existed."""
        await self.engine.ensure_open()
        return await self.engine.delete(self._stream_id(key, namespace, owner))

    @property
    def store_checked(self) -> Store:
        """`store` (kept for code written when it could be None)."""
        return self.store

    # -- lifespan ------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the store at startup; at shutdown stop producers (after `shutdown_grace`) and
        close it. Apps without lifespan support (Django raises on it) are not forwarded to."""
        app_received = False

        async def app_receive() -> Message:
            nonlocal app_received
            app_received = True
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.engine.ensure_open()
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
            return message

        try:
            await self.app(scope, app_receive, send)
        except Exception:
            if app_received:
                raise
        else:
            if app_received:
                return
        # The app doesn't speak lifespan (it raised, or returned, before reading a message):
        # speak it ourselves, for the store.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.engine.ensure_open()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _shutdown(self) -> None:
        await self.engine.shutdown(self.shutdown_grace)
        await self.engine.close()


_STATIC = Path(__file__).parent / "static"
_ASSETS = {
    "durable-fetch.js": "text/javascript; charset=utf-8",
    "durable-fetch.d.ts": "application/typescript; charset=utf-8",
}


async def serve_asset(name: str, scope: Scope, send: Send) -> bool:
    """Serve one of the bundled browser-client files; False when `name` is not one."""
    content_type = _ASSETS.get(name)
    if content_type is None or scope["method"] not in ("GET", "HEAD"):
        return False
    body = await anyio.Path(_STATIC / name).read_bytes()
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"public, max-age=3600"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
    return True


def status_payload(key: str, info: StreamInfo) -> dict[str, Any]:
    """The JSON body of a status answer."""
    return {
        "key": key,
        "state": info.state,
        "in_progress": info.in_progress,
        "offset": info.offset,
        "chunks": info.chunks,
        "readers": info.readers,
        "status_code": info.status_code,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "expires_at": info.expires_at,
    }


class _Exchange:
    """One durable-candidate request: extract its key, then produce, follow or control."""

    def __init__(
        self,
        middleware: DurableMiddleware,
        options: StreamOptions,
        scope: Scope,
        receive: Receive,
        send: Send,
    ):
        self.middleware = middleware
        self.options = options
        self.scope = scope
        self.receive = receive
        self.send = send

    async def run(self) -> None:
        options = self.options
        request = DurableRequest(self.scope, self.receive, options.max_request_body)
        try:
            key = await keys.resolve(options.key, request)
            if key is None:
                await self._pass_through(request)
                return
            if not key:
                raise BadRequest("the durable key is empty")
            control = parse_control(self.scope["headers"])
            offset = parse_offset(self.scope["headers"], sse_ids=options.sse_ids)
            body = await request.body()
            owner = None if options.owner is None else await keys.resolve(options.owner, request)
        except BadRequest as exc:
            self._refuse("body_too_large" if exc.status_code == 413 else "bad_input", exc)
            await send_json(self.send, exc.status_code, {"error": exc.detail})
            return
        except ClientDisconnected:
            return

        namespace = key.namespace if isinstance(key, keys.Key) else None
        if namespace is None:
            namespace = options.namespace
        # Telemetry's namespace attribute: one the app named, never the path (ids in it).
        self.label = namespace
        if namespace is None:
            namespace = self.scope["path"]
        self.key = str(key)
        self.stream_id = stream_id(namespace, self.key, owner)
        engine = self.middleware.engine
        try:
            await engine.ensure_open()
            if control is not None:
                await self._control(control)
            else:
                await self._stream(offset, body)
        except StoreFull as exc:
            engine.telemetry.refuse("store_full", 503, self.stream_id)
            await send_json(self.send, 503, {"error": str(exc)}, [(b"retry-after", b"5")])
        except StoreError as exc:
            engine.telemetry.refuse("store_unavailable", 503, self.stream_id)
            logger.error(
                "durable_asgi: store unavailable: %s",
                exc,
                extra=engine.telemetry.record("store_unreachable", self.stream_id),
            )
            await send_json(self.send, 503, {"error": "durable store unavailable"})

    def _refuse(self, reason: str, exc: BadRequest) -> None:
        """Count a request refused before its stream is known (the store may not be open:
        then telemetry is off, as nothing durable has happened yet)."""
        self.middleware.engine.telemetry.refuse(reason, exc.status_code)

    async def _pass_through(self, request: DurableRequest) -> None:
        receive = self.receive
        if request.body_consumed:
            # The extractor read the body: hand it to the app again, then the real channel.
            receive = replay_body(await request.body(), self.receive)
        await self.middleware.app(self.scope, receive, self.send)

    async def _stream(self, offset: int | None, body: bytes) -> None:
        mw = self.middleware
        store, options, telemetry = mw.engine.store, self.options, mw.engine.telemetry
        if offset is not None:
            # A resume never starts a handler: there must be a stream to resume. A failed one
            # still serves its stored bytes (then ends abnormally), like an aborted one.
            reading = telemetry.reading(_resume_kind(self.scope["headers"]))
            info = await store.info(self.stream_id)
            if info is None or (is_claimable(info) and info.state != "failed"):
                state = "absent" if info is None else info.state
                telemetry.refuse("not_found", 416, self.stream_id)
                await send_json(
                    self.send,
                    416,
                    {"error": f"no stream to resume from offset {offset}", "state": state},
                    [(b"durable-state", state.encode())],
                )
                return
            await self._serve(info, offset, reading)
            return

        if "no_content" in (options.on_finished, options.on_absent):
            info = await store.info(self.stream_id)
            absent = info is None or is_claimable(info)
            if (absent and options.on_absent == "no_content") or (
                info is not None and info.finished and options.on_finished == "no_content"
            ):
                state = "absent" if info is None or absent else info.state
                await send_json(self.send, 204, None, [(b"durable-state", state.encode())])
                return
        reading = telemetry.reading("join")
        claimed = await telemetry.timed(
            "claim",
            lambda: store.claim(
                self.stream_id,
                lease_seconds=options.lease_seconds,
                replace=options.on_finished == "rerun",
            ),
        )
        if not isinstance(claimed, Lease):
            await self._serve(claimed, 0, reading)
            return

        producer = Producer(mw.engine, claimed, options, self.label)
        await producer.serve(mw.app, self.scope, body, self.receive, self.send)
        if producer.error is not None:
            # Surface the handler's exception as the app alone would have (error pages, logs).
            raise producer.error
        if producer.client_error is not None:
            raise producer.client_error

    async def _serve(self, info: StreamInfo, offset: int, reading: Reading | None) -> None:
        """Serve a joiner or resumer from the store (and report it, with `reading`)."""
        engine = self.middleware.engine
        if reading is None:
            await serve_info(engine.store, info, offset, self.options, self.receive, self.send)
            return
        try:
            with engine.telemetry.reader():
                await serve_info(
                    engine.store, info, offset, self.options, self.receive, self.send, reading
                )
        finally:
            engine.telemetry.read(reading, self.stream_id, self.label)

    async def _control(self, control: Control) -> None:
        mw = self.middleware
        if control == "status":
            info = await mw.engine.store.info(self.stream_id)
            if info is None:
                mw.engine.telemetry.refuse("not_found", 404, self.stream_id)
                await send_json(
                    self.send, 404, {"state": "absent"}, [(b"durable-state", b"absent")]
                )
            else:
                await send_json(
                    self.send,
                    200,
                    status_payload(self.key, info),
                    [(b"durable-state", info.state.encode())],
                )
        elif control == "abort":
            await mw.engine.abort(self.stream_id, ttl=self.options.ttl)
            await send_json(self.send, 204, None)
        else:
            await mw.engine.delete(self.stream_id)
            await send_json(self.send, 204, None)


def _resume_kind(raw: list[tuple[bytes, bytes]]) -> str:
    """How a resume named its offset: ``offset`` (``Durable-Offset`` or ``Range``) or
    ``last_event_id`` (an `EventSource` reconnecting, with ``sse_ids``)."""
    if header(raw, b"durable-offset") is None and header(raw, b"range") is None:
        return "last_event_id"
    return "offset"
