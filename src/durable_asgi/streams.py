"""`durable_asgi.streams`: the Durable Streams read protocol, once, for any stream in the store.

``PROTOCOL.md`` sections 5.5-5.8 of `durable-streams/durable-streams`: catch-up reads,
``live=long-poll`` and ``live=sse``, ``HEAD``, over a stream the engine produced — a proxied
upstream (mode 2 of the proxy) or a handler under the middleware (`StreamsApp`).

Offsets are opaque to clients and sort lexicographically: ``{0:016d}_{byte offset:016d}``
(the reference's ``{read-seq}_{byte-offset}`` shape, the read sequence always 0). ``-1`` is the
start, ``now`` the tail. A stream is *closed* (``Stream-Closed: true``, ``streamClosed``) once it
is finished, whatever the way: ``Durable-State`` (and ``durableState`` in SSE control events)
says whether it ``complete``-d or was ``aborted`` or ``failed`` (an upstream error, a limit, a
dead worker whose lease ran out), so no reader waits forever and none takes a cut answer for
a whole one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

import anyio

from ._reader import READ_SIZE, Tail, until_disconnect, wait_for_head
from ._types import Message, Receive, Scope, Send
from .exceptions import StoreError
from .stores._base import Store, StreamInfo, effective, stream_id

if TYPE_CHECKING:
    from ._engine import Engine
    from ._middleware import DurableMiddleware

__all__ = [
    "CURSOR_INTERVAL",
    "ReadError",
    "StreamReader",
    "StreamsApp",
    "decode_offset",
    "encode_offset",
    "error_body",
]

CURSOR_INTERVAL = 20.0
"""Seconds per cursor interval (``Stream-Cursor``, base protocol section 10.1)."""

CURSOR_EPOCH = 1728432000.0
"""2024-10-09T00:00:00Z, the cursor intervals' epoch (base protocol 10.1)."""

_OFFSET_WIDTH = 16


class ReadError(Exception):
    """A request the read protocol refuses: its status, code and message, and the reason
    telemetry counts it under (default: by status, `refusal_reason`)."""

    def __init__(self, status: int, code: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason or refusal_reason(status)


def refusal_reason(status: int) -> str:
    """The ``durable_asgi.requests.refused`` reason of a read refused with `status`."""
    return {401: "unauthorized", 404: "not_found", 413: "body_too_large"}.get(status, "bad_input")


def error_body(code: str, message: str) -> bytes:
    """The protocol's error body: ``{"error": {"code", "message"}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def encode_offset(offset: int) -> str:
    return f"{0:0{_OFFSET_WIDTH}d}_{offset:0{_OFFSET_WIDTH}d}"


def decode_offset(token: str, tail: int) -> int:
    """The byte offset of an offset token (``-1``: 0, ``now``: `tail`); `ReadError` 400."""
    if token == "-1":
        return 0
    if token == "now":
        return tail
    seq, sep, rest = token.partition("_")
    if (
        not sep
        or len(seq) != _OFFSET_WIDTH
        or len(rest) != _OFFSET_WIDTH
        or not (seq.isdigit() and rest.isdigit() and seq.isascii() and rest.isascii())
        or int(seq) != 0
    ):
        raise ReadError(400, "INVALID_OFFSET", f"malformed offset {token[:64]!r}")
    offset = int(rest)
    if offset > tail:
        raise ReadError(
            400,
            "INVALID_OFFSET",
            f"offset {token} is beyond the stream's tail",
            "offset_out_of_range",
        )
    return offset


def content_type(info: StreamInfo) -> bytes:
    """The stream's content type as reads declare it: the stored response's, except that
    ``text/event-stream`` is declared ``text/plain`` (parameters kept). The official clients
    take a ``text/event-stream`` response for the protocol's own SSE framing (``live=sse``), so
    they would parse a catch-up or long-poll body of SSE *bytes* as events and lose it. The
    bytes are unchanged; ``Upstream-Content-Type`` still names the original."""
    for name, value in info.headers or ():
        if name.lower() == b"content-type":
            media, sep, params = value.partition(b";")
            if media.strip().lower() == b"text/event-stream":
                return b"text/plain" + sep + params
            return value
    return b"application/octet-stream"


def is_text(ctype: bytes) -> bool:
    """Text (SSE data carried as UTF-8) per base protocol 5.8: ``text/*`` or JSON."""
    media = ctype.split(b";")[0].strip().lower()
    return media.startswith(b"text/") or media == b"application/json"


def next_cursor(client: str | None, now: float | None = None) -> str:
    """The cursor to answer (base protocol 10.1): the number of 20-second intervals since
    2024-10-09T00:00:00Z, or, when the client's cursor is at or past it, the client's plus
    1-3600 seconds' worth of intervals (random jitter): never the same twice, never back.
    The jitter only spreads clients' cache keys apart, so it needs no cryptographic source
    (`random`, where `secrets` made a system call for each SSE event)."""
    elapsed = (time.time() if now is None else now) - CURSOR_EPOCH
    current = math.floor(elapsed / CURSOR_INTERVAL)
    if client is not None and client.isdigit() and client.isascii():
        sent = int(client)
        if sent >= current:
            jitter = random.randrange(1, 3601)
            return str(sent + max(1, math.ceil(jitter / CURSOR_INTERVAL)))
    return str(current)


@dataclass(frozen=True)
class Query:
    offset: str | None
    live: str | None
    cursor: str | None

    @classmethod
    def of(cls, scope: Scope) -> Query:
        params = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        live = one("live")
        if live not in (None, "long-poll", "sse"):
            raise ReadError(
                400, "INVALID_LIVE_MODE", f"live must be long-poll or sse, not {live!r}"
            )
        offset = one("offset")
        if live is not None and offset is None:
            raise ReadError(400, "MISSING_OFFSET", f"live={live} needs an offset")
        return cls(offset, live, one("cursor"))


class StreamReader:
    """Serves the read protocol for stream ids of a store.

    Args:
        store: the store.
        poll: seconds between re-checks of a stream that may have gone stale (a dead
            producer's lease running out wakes nobody).
        long_poll_timeout: seconds a long-poll waits before ``204``.
        sse_reconnect: seconds after which an SSE response ends (clients reconnect from the
            last offset: base protocol 5.8, for CDN collapsing).
        max_chunk: bytes at most per catch-up response.
        upstream_content_type: also send the stream's content type as
            ``Upstream-Content-Type`` (the proxy protocol's header).
        engine: the engine whose telemetry reports each ``GET`` (readers live, resumes,
            time to first byte, bytes served, a ``durable_asgi resume`` span): kind
            ``join`` for a live read (long-poll, SSE) of a running stream, else ``offset``.
        namespace: telemetry's namespace attribute (None: none).
    """

    def __init__(
        self,
        store: Store,
        *,
        poll: float = 1.0,
        long_poll_timeout: float = 30.0,
        sse_reconnect: float = 60.0,
        max_chunk: int = READ_SIZE,
        upstream_content_type: bool = False,
        engine: Engine | None = None,
        namespace: str | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.namespace = namespace
        self.upstream_content_type = upstream_content_type
        self.poll = poll
        self.long_poll_timeout = long_poll_timeout
        self.sse_reconnect = sse_reconnect
        self.max_chunk = max_chunk

    async def info(self, stream_id: str) -> StreamInfo:
        """The stream's snapshot once its head is stored; `ReadError` 404 if absent."""
        info = await self.store.info(stream_id)
        if info is not None:
            info = await wait_for_head(self.store, info, self.poll)
        if info is None:
            raise ReadError(404, "STREAM_NOT_FOUND", "the stream does not exist")
        return effective(info)

    async def head(
        self, stream_id: str, send: Send, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        """``HEAD``: the tail offset, closure, state and content type."""
        info = await self.info(stream_id)
        headers = [
            *self._upstream(info),
            (b"content-type", content_type(info)),
            (b"stream-next-offset", encode_offset(info.offset).encode()),
            (b"durable-state", info.state.encode()),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        if info.finished:
            headers.append((b"stream-closed", b"true"))
        if info.expires_at is not None:
            ttl = max(0, int(info.expires_at - time.time()))
            headers.append((b"stream-ttl", str(ttl).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def get(
        self,
        stream_id: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """``GET``: catch-up, long-poll or SSE, as the query asks."""
        query = Query.of(scope)
        telemetry = None if self.engine is None else self.engine.telemetry
        reading = None if telemetry is None else telemetry.reading("offset")
        info = await self.info(stream_id)
        offset = decode_offset(query.offset or "-1", info.offset)
        extra = [*extra, *self._upstream(info)]
        if reading is None:
            await self._get(stream_id, info, offset, query, scope, receive, send, extra, None)
            return
        reading.headers = info.headers or ()
        if query.live is not None and not info.finished:
            reading.kind = "join"
        # The read's progress, for `Telemetry.read`: its offsets, first byte and end.
        tail = reading.tail = Tail(self.store, stream_id, info.generation, offset, self.poll)
        with reading.telemetry.reader():
            try:
                await self._get(stream_id, info, offset, query, scope, receive, send, extra, tail)
            except (ReadError, StoreError):
                reading.tail = None  # refused, not served: the caller counts the refusal
                raise
            finally:
                reading.telemetry.read(reading, stream_id, self.namespace)

    async def _get(
        self,
        stream_id: str,
        info: StreamInfo,
        offset: int,
        query: Query,
        scope: Scope,
        receive: Receive,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        tail: Tail | None,
    ) -> None:
        if query.live == "sse":
            await self._sse(stream_id, info, offset, query, receive, send, extra, tail)
            return
        info, data = await self._read(stream_id, offset)
        if not data and query.live == "long-poll":
            # A closed stream at its tail answers at once (base protocol 5.7).
            info, data = await self._long_poll(stream_id, info, offset)
            if not data:
                if tail is not None:
                    tail.end = info.state
                await self._respond(204, info, offset, offset, query, extra, b"", send)
                return
        end = offset + len(data)
        if tail is not None:
            tail.end = info.state
        etag = f'"{stream_id}:{encode_offset(offset)}:{encode_offset(end)}"'.encode()
        if info.finished and end >= info.offset:
            etag = etag[:-1] + b':c"'
        match = _header(scope, b"if-none-match")
        if match is not None and etag in [t.strip() for t in match.split(b",")]:
            await self._respond(304, info, offset, end, query, extra, b"", send, etag)
            return
        await self._respond(200, info, offset, end, query, extra, data, send, etag)
        if tail is not None and data:
            tail.offset, tail.first_at = end, time.perf_counter()

    def _upstream(self, info: StreamInfo) -> list[tuple[bytes, bytes]]:
        if not self.upstream_content_type:
            return []
        for name, value in info.headers or ():
            if name.lower() == b"content-type":
                return [(b"upstream-content-type", value)]
        return []

    async def _read(self, stream_id: str, offset: int) -> tuple[StreamInfo, bytes]:
        info, data = await self.store.read(stream_id, offset, self.max_chunk)
        if info is None:
            raise ReadError(404, "STREAM_NOT_FOUND", "the stream was deleted")
        return effective(info), data

    async def _long_poll(
        self, stream_id: str, info: StreamInfo, offset: int
    ) -> tuple[StreamInfo, bytes]:
        data = b""
        with anyio.move_on_after(self.long_poll_timeout):
            while not data and not info.finished:
                await self.store.wait(info, self.poll)
                info, data = await self._read(stream_id, offset)
        return info, data

    async def _respond(
        self,
        status: int,
        info: StreamInfo,
        offset: int,
        end: int,
        query: Query,
        extra: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        etag: bytes | None = None,
    ) -> None:
        closed = info.finished and end >= info.offset
        headers = [
            (b"stream-next-offset", encode_offset(end).encode()),
            (b"durable-state", info.state.encode()),
            *extra,
        ]
        if status in (200, 304):
            headers.append((b"content-type", content_type(info)))
        if end >= info.offset:
            headers.append((b"stream-up-to-date", b"true"))
        if closed:
            headers.append((b"stream-closed", b"true"))
        else:
            headers.append((b"stream-cursor", next_cursor(query.cursor).encode()))
        if etag is not None and query.offset != "now":  # no ETag for offset=now (10.1)
            headers.append((b"etag", etag))
        # A closed stream's ranges never change; an open one's tail does. Private: a proxied
        # answer is usually one user's.
        cache = (
            b"private, max-age=60, stale-while-revalidate=300"
            if closed or end < info.offset
            else b"no-cache"
        )
        headers.append((b"cache-control", cache if query.live is None else b"no-cache"))
        if status == 200:
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if status == 200 else b""})

    async def _sse(
        self,
        stream_id: str,
        info: StreamInfo,
        offset: int,
        query: Query,
        receive: Receive,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        tail: Tail | None,
    ) -> None:
        text = is_text(content_type(info))
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *extra,
        ]
        if not text:
            headers.append((b"stream-sse-data-encoding", b"base64"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await until_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                with anyio.move_on_after(self.sse_reconnect) as reconnect:
                    await self._sse_events(stream_id, info, offset, query, text, send, tail)
                if reconnect.cancelled_caught and tail is not None:
                    tail.end = "running"  # ended for the client to reconnect
            except StoreError:
                pass
            except ReadError as exc:
                await send(_more(_event("control", {"error": {"code": exc.code}})))
            group.cancel_scope.cancel()
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sse_events(
        self,
        stream_id: str,
        info: StreamInfo,
        offset: int,
        query: Query,
        text: bool,
        send: Send,
        tail: Tail | None,
    ) -> None:
        cursor = query.cursor
        up_to_date_sent = False
        first = tail  # telemetry's, until the first data event is out
        try:
            while True:
                info, data = await self._read(stream_id, offset)
                if text and data:
                    data = data[: _utf8_complete(data, final=info.finished)]
                end = offset + len(data)
                at_tail = end >= info.offset
                events = b""  # this read's data event and control event: one send
                if data:
                    payload = (
                        base64.b64encode(data).decode()
                        if not text
                        else data.decode("utf-8", "replace")
                    )
                    events = _data_event(payload)
                    offset = end
                closed = info.finished and at_tail
                if data or closed or (at_tail and not up_to_date_sent):
                    if not closed:
                        cursor = next_cursor(cursor)
                    events += _control_event(offset, closed, at_tail, cursor, info.state)
                    up_to_date_sent = at_tail
                if events:
                    await send(_more(events))
                if data and first is not None:
                    first.first_at, first = time.perf_counter(), None
                if closed:
                    if tail is not None:
                        tail.end = info.state
                    return
                if at_tail or not data:
                    await self.store.wait(info, self.poll)
        finally:
            if tail is not None:
                tail.offset = offset  # the bytes sent, however the response ended


def _utf8_complete(data: bytes, *, final: bool) -> int:
    """How many leading bytes of `data` end on a UTF-8 character boundary (all when `final`)."""
    if final:
        return len(data)
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


def _data_event(payload: str) -> bytes:
    lines = payload.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return ("event: data\n" + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


def _control_event(
    offset: int, closed: bool, up_to_date: bool, cursor: str | None, state: str
) -> bytes:
    """The control event after a read, as ``_event("control", ...)`` would write it: formatted
    by hand, as it goes out with every SSE read (every value is digits, ``_`` or a state name,
    so nothing needs escaping)."""
    fields = f'{{"streamNextOffset":"{encode_offset(offset)}"'
    if closed:
        fields += ',"streamClosed":true,"upToDate":true'
    else:
        fields += f',"streamCursor":"{cursor}"' + (',"upToDate":true' if up_to_date else "")
    return f'event: control\ndata: {fields},"durableState":"{state}"}}\n\n'.encode()


def _event(name: str, value: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


def _more(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if bytes(key).lower() == name:
            return bytes(value)
    return None


class StreamsApp:
    """The read protocol for the streams a `DurableMiddleware` produces: an ASGI app to mount
    beside it, so any Durable Streams client can read a stream a FastAPI, Starlette or Django
    handler produced.

    A stream is named by its namespace and key (and owner): the read URL is
    ``{mount}/{quote(namespace)}/{quote(key)}``, each one URL-encoded path segment (``/`` as
    ``%2F``). With ``namespace=`` (or the middleware's own ``namespace``) it is
    ``{mount}/{quote(key)}``. When the middleware binds streams to an owner, the owner is
    resolved from the *read* request by the same extractor (the same cookie or header the
    producing request carried): another owner's stream is a 404, as under the middleware.
    Only ``GET`` and ``HEAD`` are served; nothing here writes, aborts or deletes.

    Example::

        app = DurableMiddleware(api, namespace="chat", owner=lambda r: r.headers["x-user"])
        streams = StreamsApp(app)   # mount at /streams: GET /streams/{key}?offset=-1&live=sse

    Args:
        middleware: the middleware whose store and options (owner, poll interval) apply.
        namespace: the namespace read (default: the middleware's; None: it is in the URL).
        long_poll_timeout: seconds a long-poll waits before ``204``.
    """

    def __init__(
        self,
        middleware: DurableMiddleware,
        *,
        namespace: str | None = None,
        long_poll_timeout: float = 30.0,
    ) -> None:
        self.middleware = middleware
        self.namespace = namespace if namespace is not None else middleware.options.namespace
        self.long_poll_timeout = long_poll_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        from ._request import DurableRequest
        from .keys import resolve

        method = scope["method"]
        sid: str | None = None
        try:
            if method not in ("GET", "HEAD"):
                raise ReadError(405, "METHOD_NOT_ALLOWED", "the stream read API is GET and HEAD")
            options = self.middleware.options
            owner = None
            if options.owner is not None:
                owner = await resolve(
                    options.owner, DurableRequest(scope, receive, options.max_request_body)
                )
            sid = stream_id(*self._name(scope), owner)
            await self.middleware.engine.ensure_open()
            reader = StreamReader(
                self.middleware.store,
                poll=options.poll_interval,
                long_poll_timeout=self.long_poll_timeout,
                engine=self.middleware.engine,
                namespace=self.namespace,  # the app's; None: from the URL, never an attribute
            )
            if method == "HEAD":
                await reader.head(sid, send)
            else:
                await reader.get(sid, scope, receive, send)
        except ReadError as exc:
            self.middleware.engine.telemetry.refuse(exc.reason, exc.status, sid)
            body = error_body(exc.code, exc.message)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ]
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    def _name(self, scope: Scope) -> tuple[str, str]:
        """(namespace, key) of the request's path below the mount point."""
        raw = bytes(scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        raw = raw.split("?", 1)[0]
        root: str = scope.get("root_path", "") or ""
        if root:
            depth = root.rstrip("/").count("/")
            parts = raw.split("/", depth + 1)
            raw = "/" + parts[depth + 1] if len(parts) > depth + 1 else ""
        segments = [unquote(part) for part in raw.strip("/").split("/")] if raw.strip("/") else []
        if self.namespace is not None and len(segments) == 1:
            return self.namespace, segments[0]
        if self.namespace is None and len(segments) == 2:
            return segments[0], segments[1]
        shape = "/{key}" if self.namespace is not None else "/{namespace}/{key}"
        raise ReadError(404, "STREAM_NOT_FOUND", f"read streams at {shape} (URL-encoded)")
