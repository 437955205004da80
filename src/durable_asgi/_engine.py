"""The engine: runs a producer into the store and serves readers from it.

A *producer* runs the whole downstream app under fake channels: `receive` replays the buffered
request body and never reports a disconnect before the response is done; `send` tees the
response into the store and never raises. It runs in a task of its own under a shielded cancel
scope, so the client leaving (or the server cancelling the request task) never cancels the
handler; only abort, delete, ``max_duration`` and shutdown do, through the producer's own
cancel scope.

Writes go through a small write-behind buffer with group commit: `send` appends to memory and
returns; a writer task stores everything pending in one `append`. Under load that batches many
chunks per store write; when idle it adds no delay. The buffer is bounded (the handler waits
when the store falls behind), so a slow store slows the handler, never memory.

Every client, including the one whose request started the handler, is served by a *reader*
(`serve_stream`) that reads the store from its offset and waits for more, so a slow client never
slows the producer, and the first client and a resumer see exactly the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ._options import StreamOptions
from ._protocol import SSEIds, is_event_stream, replay_headers, send_json, stored_headers
from ._types import Receive, Scope, Send
from .stores._base import (
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    Store,
    StoreError,
    StreamInfo,
    join,
)

__all__ = ["Engine", "Producer", "serve_stream"]

logger = logging.getLogger("durable_asgi")

#: Bytes per store read (and per write to the client) when replaying.
READ_SIZE = 256 * 1024
#: Pending (unstored) bytes at which the handler's `send` waits for the store.
HIGH_WATER = 64 * 1024
#: Server-sent-event extension names we hide from the app so it sends plain body bytes.
_HIDDEN_EXTENSIONS = (
    "http.response.pathsend",
    "http.response.zerocopysend",
    "http.response.trailers",
)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio event loop, or None on another backend (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Beside:
    """Tasks that run beside the block of an ``async with``, which waits for them at its end
    (shielded: a cancelled caller still waits). They end on their own or by `cancel()`, and
    must not raise: an error is raised from the end of the block (on trio it also cancels the
    block, as anyio's task groups do).

    On asyncio they are bare tasks, about 1.3 KB each, where an anyio task costs about 4 KB
    (its handle comes with a cancel scope and an event) and its task group 1.6 KB more; a
    server runs thousands of streams, each with a few. Nothing outside reaches them, so the
    caller's cancellation doesn't either. On other backends (trio) they run in an anyio task
    group, where the caller's cancellation does reach them: shield what must outlive it.
    """

    __slots__ = ("_group", "_tasks")

    def __init__(self) -> None:
        self._group: TaskGroup | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Beside:
        if _asyncio_loop() is None:
            self._group = anyio.create_task_group()
            await self._group.__aenter__()
        return self

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._group is not None:
            self._group.start_soon(func, *args)
        else:
            self._tasks.append(asyncio.ensure_future(func(*args)))

    def cancel(self) -> None:
        """Stop the tasks (on trio, the rest of the block too)."""
        if self._group is not None:
            self._group.cancel_scope.cancel()
        for task in self._tasks:
            task.cancel()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if self._group is not None:
            return await self._group.__aexit__(*exc_info)
        if self._tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(self._tasks)
            for task in self._tasks:
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error
        return None


class Flag:
    """A one-shot event whose `anyio.Event` is made only when someone waits before it is set:
    on asyncio an `anyio.Event` costs about 1 KB (with its waiters' deque), a producer has
    several, and most are never waited on."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


def _with_send_errors(asgi: dict[str, Any] | None) -> dict[str, Any]:
    """The handler's ``scope["asgi"]``, with a ``spec_version`` of at least 2.4.

    Since 2.4 a server's `send` raises `OSError` once the client is gone, and frameworks
    that see it skip the task they otherwise spawn per response to watch `receive` for a
    disconnect (Starlette's `StreamingResponse` does). The producer's `send` never fails,
    since no client can leave it, which 2.4 allows; its `receive` still reports
    ``http.disconnect`` once the response is complete, as before.
    """
    asgi = dict(asgi or {})
    try:
        version = tuple(int(part) for part in str(asgi.get("spec_version", "2.0")).split("."))
    except ValueError:
        version = ()
    if version < (2, 4):
        asgi["spec_version"] = "2.4"
    return asgi


class Producer:
    """Runs the app once for a claimed stream and tees its response into the store."""

    def __init__(self, engine: Engine, lease: Lease, options: StreamOptions) -> None:
        self.engine = engine
        self.store = engine.store
        self.lease = lease
        self.options = options
        #: The head as the app sent it (with cookies) — only for the client that started it.
        self.head: tuple[int, Headers] | None = None
        self.head_ready = Flag()
        self.done = Flag()
        self.error: BaseException | None = None
        self.state: FinalState = "failed"
        self.reason = ""
        self._scope = anyio.CancelScope()
        self._response_complete = Flag()
        self._pending: list[bytes] = []
        self._pending_chunks = 0
        self._pending_size = 0
        self._pending_head: tuple[int, Headers] | None = None
        self._total = 0
        self._wake = anyio.Event()
        self._drained: anyio.Event | None = None  # made when `_send` waits for the writer
        self._closing = False
        self._lost = False
        self._writer_done = False
        #: The keeper runs in it until the writer, when done, cancels it.
        self._keeping = anyio.CancelScope()
        #: Wraps `serve_client`, the reader of the client whose request started the handler.
        self._client = anyio.CancelScope()
        #: What that reader raised unexpectedly, for the caller to re-raise.
        self.client_error: Exception | None = None

    # -- control ---------------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Stop the handler (abort, shutdown, max_duration, too large)."""
        if not self.reason:
            self.reason = reason
        self._scope.cancel()

    def revoke(self, reason: str) -> None:
        """Stop the handler because this producer may no longer write (lease lost, deleted)."""
        self._lost = True
        self.cancel(reason)

    # -- the run -----------------------------------------------------------------------------

    async def run(
        self, app: Any, scope: Scope, body: bytes, receive: Receive | None = None
    ) -> None:
        """Run `app` to its end and record its response. Never raises the app's exception:
        it is kept in `self.error` for the caller to re-raise where that makes sense.

        `receive` is the channel of the client whose request started the handler, served
        meanwhile by `serve_client`: the producer watches it for that client leaving."""
        scope = dict(scope)
        extensions = dict(scope.get("extensions") or {})
        for name in _HIDDEN_EXTENSIONS:
            extensions.pop(name, None)
        scope["extensions"] = extensions
        scope["asgi"] = _with_send_errors(scope.get("asgi"))
        body_sent = False

        async def app_receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._response_complete.wait()
            return {"type": "http.disconnect"}

        stream_id = self.lease.stream_id
        self.engine.producers[stream_id] = self
        try:
            # The handler outlives its client's request: nothing but `cancel` stops it.
            with anyio.CancelScope(shield=True):
                async with Beside() as beside:
                    beside.start_soon(self._write_loop)
                    beside.start_soon(self._keep, receive)
                    try:
                        await self._run_app(app, scope, app_receive)
                    finally:
                        self.head_ready.set()  # the client's reader ends now if no head came
                        # The writer stores what is pending, finishes the stream, and stops
                        # the keeper.
                        self._closing = True
                        self._wake.set()
        finally:
            self.head_ready.set()
            self._ended()

    def _ended(self) -> None:
        """The stream is final (or never will be written again): `done`, and no longer this
        process's to abort or shut down — whether or not its first client has read it all."""
        if self.engine.producers.get(self.lease.stream_id) is self:
            del self.engine.producers[self.lease.stream_id]
        self.done.set()

    async def _run_app(self, app: Any, scope: Scope, receive: Any) -> None:
        deadline = self.options.max_duration
        if deadline is not None:
            self._scope.deadline = anyio.current_time() + deadline
        with self._scope:
            try:
                await app(scope, receive, self._send)
            except Exception as exc:
                self.error = exc
                self.reason = self.reason or f"handler raised {type(exc).__name__}"
        if self._scope.cancelled_caught and not self.reason:
            self.reason = "max_duration exceeded"
        if self._lost or self.reason == "aborted":
            self.state = "aborted"
        elif self.error is None and not self.reason and self._response_complete.is_set():
            self.state = "complete"
        else:
            self.state = "failed"
            if not self.reason:
                self.reason = "handler returned without completing its response"
        self._response_complete.set()

    async def _send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.head is not None:
                return
            status = int(message["status"])
            headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers") or ())
            self.head = (status, headers)
            self._pending_head = (status, stored_headers(headers))
            self.head_ready.set()
            self._wake.set()
        elif kind == "http.response.body":
            if self._response_complete.is_set() or self.head is None or self._writer_done:
                return
            data = message.get("body", b"")
            if data:
                self._total += len(data)
                if self._total > self.options.max_response_bytes:
                    self.cancel(f"response larger than {self.options.max_response_bytes} bytes")
                    await anyio.lowlevel.checkpoint()  # deliver the cancellation to the app now
                    return
                self._pending.append(bytes(data))
                self._pending_chunks += 1
                self._pending_size += len(data)
            if not message.get("more_body", False):
                self._response_complete.set()
            self._wake.set()
            if self._pending_size > HIGH_WATER:  # backpressure: the store is behind
                if self._drained is None:
                    self._drained = anyio.Event()
                await self._drained.wait()

    async def _write_loop(self) -> None:
        store, lease = self.store, self.lease
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._pending_head is not None or self._pending:
                    if self._pending_head is not None:
                        status, headers = self._pending_head
                        self._pending_head = None
                        await store.start(lease, status, headers)
                    if self._pending:
                        data, chunks = join(self._pending), self._pending_chunks
                        self._pending, self._pending_chunks, self._pending_size = [], 0, 0
                        await store.append(lease, data, chunks=chunks)
                    self._release_sender()
                if self._closing:
                    break
            status = self.head[0] if self.head else 500
            await store.finish(lease, self.state, ttl=self.options.ttl, retain=200 <= status < 300)
        except LeaseLost:
            self.revoke("aborted")
        except StoreError as exc:
            logger.error("durable_asgi: store failed for %r: %s", lease.stream_id, exc)
            self.cancel(f"store error: {exc}")
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.options.lease_seconds),
                contextlib.suppress(StoreError),
            ):
                await store.finish(lease, "failed", ttl=self.options.ttl, retain=False)
        finally:
            # From here on `_send` drops data, and nothing waits for the store any more.
            self._writer_done = True
            self._release_sender()
            self._keeping.cancel()
            if self._closing:  # the app has returned too: only the first client's reader is left
                self._ended()

    def _release_sender(self) -> None:
        """Wake `_send` if it waits for the writer to catch up."""
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    async def serve(
        self, app: Any, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        """Run `app` (see `run`) for the client whose request this is, and serve that client
        meanwhile. Returns when both are done; cancelling it stops the client's reader only.
        Never raises the app's exception (`self.error`) or the reader's (`self.client_error`)."""
        async with Beside() as beside:
            beside.start_soon(self.run, app, scope, body, receive)
            await self.serve_client(send)

    async def serve_client(self, send: Send) -> None:
        """Serve the client whose request started the handler, until the stream ends or the
        client leaves (`run` watches for that, and cancels `_client`)."""
        with self._client:
            try:
                await serve_stream(self.store, self, 0, self.options, None, send)
            except StoreError as exc:
                logger.error(
                    "durable_asgi: store failed while serving %r: %s", self.lease.stream_id, exc
                )
            except Exception as exc:
                self.client_error = exc

    async def _keep(self, receive: Receive | None) -> None:
        """Renew the lease every third of it, and stop the first client's reader when that
        client leaves (the handler goes on). One task for both. Never raises."""
        interval = self.options.lease_seconds / 3
        with self._keeping:
            while True:
                with anyio.move_on_after(interval):
                    if receive is not None:
                        await _until_disconnect(receive)
                        receive = None
                        self._client.cancel()
                    await anyio.sleep_forever()
                try:
                    await self.store.renew(self.lease, lease_seconds=self.options.lease_seconds)
                except LeaseLost:
                    self.revoke("aborted")
                    return
                except StoreError as exc:
                    logger.warning(
                        "durable_asgi: renewing %r failed: %s", self.lease.stream_id, exc
                    )
                except Exception:
                    logger.exception("durable_asgi: renewing %r failed", self.lease.stream_id)


class Engine:
    """Process-wide state shared by all requests of one middleware: the store and the
    producers running in this process (for immediate in-process abort and for shutdown)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.producers: dict[str, Producer] = {}
        self._opened = False
        # Made on first use: a lock made here would belong to whichever event loop happened
        # to be running when the middleware was built.
        self._open_lock: anyio.Lock | None = None

    async def ensure_open(self) -> None:
        if not self._opened:
            if self._open_lock is None:
                self._open_lock = anyio.Lock()
            async with self._open_lock:
                if not self._opened:
                    await self.store.open()
                    self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.store.close()

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        producer = self.producers.get(stream_id)
        if producer is None:
            # Running elsewhere (or not at all): its producer sees the revoked lease.
            return await self.store.abort(stream_id, ttl=ttl)
        # Running here: stop the handler, and let its writer store what it already sent before
        # it finishes the stream as `aborted`.
        producer.cancel("aborted")
        with anyio.move_on_after(producer.options.lease_seconds):
            await producer.done.wait()
        return True

    async def delete(self, stream_id: str) -> bool:
        deleted = await self.store.delete(stream_id)
        producer = self.producers.get(stream_id)
        if producer is not None:
            producer.revoke("deleted")
        return deleted

    async def shutdown(self, grace: float) -> None:
        """Give running producers `grace` seconds to finish, then stop them (they end
        `failed`, so no reader waits for bytes that will never come)."""
        with anyio.move_on_after(grace):
            for producer in list(self.producers.values()):
                await producer.done.wait()
        for producer in list(self.producers.values()):
            producer.cancel("server shutting down")
        with anyio.move_on_after(max(1.0, grace)):
            for producer in list(self.producers.values()):
                await producer.done.wait()


class Tail:
    """The body of one stream from `offset`: stored bytes first, then live ones.

    After iteration, `end` says how the stream ended: ``complete``, ``failed``, ``aborted``
    or ``gone`` (deleted, or replaced by a new run).
    """

    def __init__(
        self, store: Store, stream_id: str, generation: str, offset: int, poll: float
    ) -> None:
        self.store = store
        self.stream_id = stream_id
        self.generation = generation
        self.offset = offset
        self.poll = poll
        self.end = ""
        self.counted = False
        """Whether this reader was counted in `StreamInfo.readers` (and must be counted out)."""

    async def __aiter__(self) -> AsyncGenerator[bytes, None]:
        store, stream_id, generation = self.store, self.stream_id, self.generation
        while True:
            info, data = await store.read(stream_id, self.offset, READ_SIZE)
            if info is None or info.generation != generation:
                self.end = "gone"
                return
            if data:
                self.offset += len(data)
                yield data
            elif info.finished:
                self.end = info.state
                return
            else:
                await store.wait(info, self.poll)


async def wait_for_head(store: Store, info: StreamInfo, poll: float) -> StreamInfo | None:
    """Wait until the stream's response head is stored (or it ended without one)."""
    while info.status_code is None and not info.finished:
        await store.wait(info, poll)
        latest = await store.info(info.id)
        if latest is None or latest.generation != info.generation:
            return None
        info = latest
    return info


async def serve_stream(
    store: Store,
    stream: StreamInfo | Producer,
    offset: int,
    options: StreamOptions,
    receive: Receive | None,
    send: Send,
) -> None:
    """Serve one client from the store: head, body from `offset`, then end as the stream did.

    `stream` is the `Producer` for the client whose request started the handler: it gets the
    head as the app sent it (cookies included) and no ``Durable-Replay``, and its producer
    watches `receive` for it (pass None). Anyone else passes the stream's `StreamInfo`.
    """
    total: int | None = None
    if isinstance(stream, Producer):
        await stream.head_ready.wait()
        if stream.head is None:
            return  # the app failed before responding: the caller re-raises its error
        stream_id, generation = stream.lease.stream_id, stream.lease.token
        status, headers = stream.head
        state = "running"
    else:
        info = await wait_for_head(store, stream, options.poll_interval)
        if info is None or info.status_code is None:
            await send_json(
                send,
                502,
                {"error": "the stream ended before its handler responded", "state": "failed"},
                [(b"durable-state", b"failed")],
            )
            return
        stream_id, generation = info.id, info.generation
        status, headers, state = info.status_code, info.headers or (), info.state
        if info.finished:
            total = info.offset
            if offset > total:
                await send_json(
                    send,
                    416,
                    {"error": f"offset {offset} is past the end of the stream ({total} bytes)"},
                    [(b"durable-state", state.encode()), (b"content-range", b"bytes */%d" % total)],
                )
                return

    sse = options.sse_ids and is_event_stream(headers)
    out_headers = replay_headers(
        headers,
        offset=offset,
        state=state,
        replay=not isinstance(stream, Producer),
        # Only a complete stream's length is the body's: a truncated one must not look whole.
        total=total if state == "complete" else None,
        rewrite_body=sse,
    )
    tail = Tail(store, stream_id, generation, offset, options.poll_interval)
    ids = SSEIds(offset) if sse else None
    try:
        if receive is None:
            error = await _send_body(tail, status, out_headers, ids, send)
            if error is not None:
                raise error
        else:
            await _pump(tail, status, out_headers, ids, receive, send)
    finally:
        if tail.counted:
            with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await store.attach(stream_id, -1)


async def _count_in(tail: Tail) -> None:
    """Count the reader in (`StreamInfo.readers`)."""
    with anyio.CancelScope(shield=True):  # so that the count out knows whether to run
        try:
            await tail.store.attach(tail.stream_id, +1)
        except StoreError as exc:
            logger.warning("durable_asgi: counting a reader of %r failed: %s", tail.stream_id, exc)
        else:
            tail.counted = True


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client has left (or its response is complete: ASGI servers answer
    ``http.disconnect`` then too). A server whose `receive` fails counts as gone."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:
        logger.warning("durable_asgi: receive() failed, taking the client as gone: %r", exc)


async def _send_body(
    tail: Tail,
    status: int,
    headers: list[tuple[bytes, bytes]],
    ids: SSEIds | None,
    send: Send,
) -> Exception | None:
    """Send the head, then the body as `tail` yields it, then end as the stream did. Returns
    (not raises) an unexpected exception. The reader is counted in once its first chunk is
    out (so a shared store's round trip stays off the time to first byte)."""
    count_in = True
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        # Closed here, not by the garbage collector, when the reader is cancelled mid-stream.
        async with contextlib.aclosing(tail.__aiter__()) as chunks:
            async for data in chunks:
                if ids is not None:
                    data = ids.feed(data)
                    if not data:
                        continue
                await send({"type": "http.response.body", "body": data, "more_body": True})
                if count_in:  # once, whether or not the store takes it
                    count_in = False
                    await _count_in(tail)
        if tail.end == "complete":
            last = ids.flush() if ids is not None else b""
            await send({"type": "http.response.body", "body": last, "more_body": False})
        # Otherwise end without completing the body: the server closes the connection,
        # so the client sees a truncated response, never a clean end.
    except OSError:
        pass  # ASGI 2.4+ servers raise OSError on send after the client left.
    except StoreError as exc:
        # Headers are out: the only honest answer left is a truncated body.
        logger.error("durable_asgi: store failed while reading %r: %s", tail.stream_id, exc)
    except Exception as exc:
        return exc  # re-raised bare by the caller, not wrapped in an ExceptionGroup
    return None


async def _pump(
    tail: Tail,
    status: int,
    headers: list[tuple[bytes, bytes]],
    ids: SSEIds | None,
    receive: Receive,
    send: Send,
) -> None:
    """Send the body from this task while another watches `receive`, and stop the body when
    the client leaves."""
    error: Exception | None = None
    with anyio.CancelScope() as reading:
        async with Beside() as beside:
            beside.start_soon(_watch, receive, reading)
            try:
                error = await _send_body(tail, status, headers, ids, send)
            finally:
                beside.cancel()
    if error is not None:
        raise error


async def _watch(receive: Receive, reading: anyio.CancelScope) -> None:
    """Cancel `reading` once the client behind `receive` has left."""
    await _until_disconnect(receive)
    reading.cancel()
