"""The producer: runs a claimed stream's source once and tees its response into the store.

The source is any ASGI callable: the app under the middleware, or (for a proxy) a callable
that relays an upstream HTTP response — the producer neither knows nor cares which. It runs
under fake channels: `receive` replays the buffered request body and never reports a
disconnect before the response is done; `send` tees the response into the store and never
raises. It runs shielded, in a task of its own, so the client leaving (or the server cancelling
the request task) never cancels the handler; only `stop` does (abort, delete, max_duration,
shutdown, a response too large, a lost lease).

A producer's life is a few phases, in order (`Phase`), and at most one reason it was stopped
early (`Stop`); `FINAL_STATE` maps that reason to the state the stream ends in. Writes go
through a `WriteBehind` buffer: `send` appends to memory and returns; the engine's `Flusher`
stores every producer's pending bytes in one batched write per window (on trio, a writer task
per producer does). The first client is fed inline by `send` meanwhile (`LiveClient`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._options import StreamOptions
from ._protocol import stored_headers
from ._reader import (
    Followed,
    LiveClient,
    Tail,
    count_reader_in,
    send_body,
    serve_stream,
    until_disconnect,
)
from ._request import replay_body
from ._tasks import Beside, Flag, asyncio_loop
from ._types import ASGIApp, Message, Receive, Scope, Send
from ._write_behind import HIGH_WATER, WriteBehind
from .exceptions import LeaseLost, StoreError
from .stores._base import FinalState, Headers, Lease, Write, write_all

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["FINAL_STATE", "Phase", "Producer", "Stop"]

logger = logging.getLogger("durable_asgi")

#: ASGI extensions hidden from the app, so it sends plain body messages.
_HIDDEN_EXTENSIONS = (
    "http.response.pathsend",
    "http.response.zerocopysend",
    "http.response.trailers",
)


class Phase(enum.IntEnum):
    """Where a producer is in its life. It only ever moves forward."""

    STARTING = 0
    """The handler runs and hasn't sent its response head."""
    STREAMING = 1
    """The head is out; body messages flow into the buffer."""
    SENT = 2
    """The handler sent its last body message (it may still be running)."""
    CLOSING = 3
    """The handler has returned or been stopped: the writer stores the rest and finishes."""
    DONE = 4
    """The stream is final in the store, or will never be written again."""


class Stop(enum.Enum):
    """Why a producer ended other than by its handler completing the response."""

    ABORTED = "aborted"
    LEASE_LOST = "lease lost"  # aborted, deleted or taken over elsewhere
    DELETED = "deleted"
    SHUTDOWN = "server shutting down"
    MAX_DURATION = "max_duration exceeded"
    TOO_LARGE = "response larger than max_response_bytes"
    HANDLER_RAISED = "handler raised"
    INCOMPLETE = "handler returned without completing its response"
    STORE_ERROR = "store error"


FINAL_STATE: dict[Stop | None, FinalState] = {
    None: "complete",
    Stop.ABORTED: "aborted",
    Stop.LEASE_LOST: "aborted",
    Stop.DELETED: "aborted",
    Stop.SHUTDOWN: "failed",
    Stop.MAX_DURATION: "failed",
    Stop.TOO_LARGE: "failed",
    Stop.HANDLER_RAISED: "failed",
    Stop.INCOMPLETE: "failed",
    Stop.STORE_ERROR: "failed",
}
"""The state a stream ends in, by why its producer stopped (None: it wasn't)."""

#: Stops that mean this producer may no longer write: they win over any earlier reason.
_REVOKED = frozenset({Stop.LEASE_LOST, Stop.DELETED})


class Producer:
    """Runs a source once for a claimed stream and tees its response into the store.

    Example (what the middleware does with a claimed lease)::

        producer = Producer(engine, lease, options)
        await producer.serve(app, scope, body, receive, send)   # runs it, serves this client
        if producer.error is not None:
            raise producer.error
    """

    def __init__(
        self, engine: Engine, lease: Lease, options: StreamOptions, namespace: str | None = None
    ) -> None:
        self.engine = engine
        self.lease = lease
        self.options = options
        self.namespace = namespace
        """The namespace the app named (telemetry's attribute; None: the request path)."""
        self.phase = Phase.STARTING
        self.state: FinalState = "failed"
        """The state the stream ends in: decided when the handler ends (a stop after that,
        racing the writer's finish, doesn't change it)."""
        self.stop_reason: Stop | None = None
        self.detail = ""
        """What goes with `stop_reason` in messages (the exception, the limit)."""
        self.error: BaseException | None = None
        """What the handler raised, for the caller to re-raise where that makes sense."""
        self.client_error: Exception | None = None
        """What the first client's reader raised unexpectedly, likewise."""
        #: The head as the app sent it (with cookies): only for the client that started it.
        self.head: tuple[int, Headers] | None = None
        self.client: LiveClient | None = None
        """The first client, fed inline while it keeps up (asyncio; see `serve`)."""
        self.stored: FinalState | None = None
        """The state the store recorded the stream's end in, once it did."""
        self.buffer = WriteBehind()
        on_asyncio = asyncio_loop() is not None
        # asyncio: the engine's flusher stores and its renewer renews; trio: the producer's
        # own writer and keeper do.
        self._flusher = engine.flusher() if on_asyncio else None
        self._renewer = engine.renewer() if on_asyncio else None
        self._in_flight = False  # the flusher holds a write of ours
        self._store_failed = False
        # A flag per phase something waits for: the head (or its absence), the response
        # sent, the end.
        self._flags = {Phase.STREAMING: Flag(), Phase.SENT: Flag(), Phase.DONE: Flag()}
        self._handler = anyio.CancelScope()  # `stop` cancels it
        self._keeping = anyio.CancelScope()  # the keeper runs in it until the writer is done
        self._client = anyio.CancelScope()  # the first client's reader; the keeper cancels it
        self.telemetry = telemetry = engine.telemetry
        self._span = telemetry.stream_started(lease.stream_id, namespace)
        self._traceparent = telemetry.traceparent(self._span)  # stored with the head

    # -- state -----------------------------------------------------------------------------

    def _advance(self, phase: Phase) -> None:
        """Move forward to `phase` (never back), setting the flags of every phase passed."""
        if phase <= self.phase:
            return
        self.phase = phase
        for at, flag in self._flags.items():
            if at <= phase:
                flag.set()
        if phase is Phase.DONE:
            self._finished()  # before anyone waiting for the end hears of it
            if self.engine.producers.get(self.lease.stream_id) is self:
                # No longer this process's to abort or shut down.
                del self.engine.producers[self.lease.stream_id]
            if self.client is not None:
                self.client.changed()

    @property
    def reason(self) -> str:
        """Why it stopped, for messages ("" when it completed)."""
        if self.stop_reason is None:
            return ""
        return f"{self.stop_reason.value}: {self.detail}" if self.detail else self.stop_reason.value

    async def wait_done(self) -> None:
        await self._flags[Phase.DONE].wait()

    def stop(self, why: Stop, detail: str = "") -> None:
        """Stop the handler. The first reason stands, except that a revoked lease (deleted,
        lost) wins over any: this producer may not write again, whatever it was doing."""
        if self.stop_reason is None or (why in _REVOKED and self.stop_reason not in _REVOKED):
            # Reported while the stream is this producer's: a renewal answered after the end
            # was stored (it raced the finish) is no lost lease.
            if self.phase < Phase.DONE and self.stored is None:
                if why is Stop.LEASE_LOST and self.stop_reason is not Stop.LEASE_LOST:
                    self.telemetry.lease_lost(self.lease.stream_id, self.namespace, self._span)
                if self._span is not None:
                    self._span.add_event("stopped", {"durable_asgi.reason": why.name.lower()})
            self.stop_reason, self.detail = why, detail
        self._handler.cancel()

    # -- the run -----------------------------------------------------------------------------

    async def run(
        self, app: ASGIApp, scope: Scope, body: bytes, receive: Receive | None = None
    ) -> None:
        """Run `app` to its end and record its response. Never raises the app's exception:
        it is kept in `error`.

        `receive` is the channel of the client whose request started the handler, served
        meanwhile by `serve_client`: the keeper watches it for that client leaving."""
        scope = dict(scope)
        extensions = dict(scope.get("extensions") or {})
        for name in _HIDDEN_EXTENSIONS:
            extensions.pop(name, None)
        scope["extensions"] = extensions
        scope["asgi"] = _with_send_errors(scope.get("asgi"))

        async def disconnect_when_sent() -> Message:
            await self._flags[Phase.SENT].wait()
            return {"type": "http.disconnect"}

        app_receive = replay_body(body, disconnect_when_sent)

        self.engine.producers[self.lease.stream_id] = self
        try:
            # The handler outlives its client's request: nothing but `stop` stops it.
            with anyio.CancelScope(shield=True):
                async with Beside() as beside:
                    if self._flusher is None:
                        beside.start_soon(self._write_loop)
                    if self._renewer is not None:
                        self._renewer.add(self)
                    if self._renewer is None or receive is not None:
                        beside.start_soon(self._keep, receive)
                    try:
                        with self.telemetry.current(self._span):
                            await self._run_app(app, scope, app_receive)
                    finally:
                        # The client's reader ends now if no head came; the writer stores
                        # what is pending; then the end is recorded.
                        self._advance(Phase.CLOSING)
                        self.buffer.wake()
                        await self._close()
        finally:
            self._advance(Phase.DONE)

    def _finished(self) -> None:
        """Report how the stream ended (telemetry; a failure is logged)."""
        state = "failed" if self._store_failed else self.state
        why = self.stop_reason
        reason = why.name.lower() if why is not None and state != "complete" else ""
        self.telemetry.stream_finished(
            self.lease.stream_id, self.namespace, self._span, state, reason, self.detail
        )

    async def _run_app(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        if self.options.max_duration is not None:
            self._handler.deadline = anyio.current_time() + self.options.max_duration
        with self._handler:
            try:
                await app(scope, receive, self._send)
            except Exception as exc:
                self.error = exc
                self.stop(Stop.HANDLER_RAISED, type(exc).__name__)
        if self._handler.cancelled_caught and self.stop_reason is None:
            self.stop_reason = Stop.MAX_DURATION
        if self.stop_reason is None and self.phase < Phase.SENT:
            self.stop_reason = Stop.INCOMPLETE
        self.state = FINAL_STATE[self.stop_reason]

    async def _send(self, message: Message) -> None:
        # Once per chunk, so the common case (a body chunk) comes first and does little.
        kind = message["type"]
        if kind == "http.response.body":
            buffer = self.buffer
            if self.phase is not Phase.STREAMING or buffer.closed:
                return
            data = message.get("body", b"")
            if data:
                limit = self.options.max_response_bytes
                if buffer.total + len(data) > limit:
                    self.stop(Stop.TOO_LARGE, f"{limit} bytes")
                    await anyio.lowlevel.checkpoint()  # deliver the cancellation to the app now
                    return
                if type(data) is not bytes:
                    data = bytes(data)
                buffer.put(data)
                if self.client is not None:
                    self.client.body(data)
                elif buffer.total == len(data) and self._flusher is not None:
                    # Nobody is fed inline (mode 2): readers wait for the stored first bytes
                    # (their time to first byte), so they don't wait for the flush window.
                    self._flusher.hurry()
            if not message.get("more_body", False):
                self._advance(Phase.SENT)
            if self._flusher is not None:
                self._flusher.add(self)
            else:
                buffer.wake()
            if buffer.size > HIGH_WATER:  # backpressure: the store is behind
                if self._flusher is not None:
                    self._flusher.hurry()
                await buffer.wait_drained()
        elif kind == "http.response.start":
            if self.phase is not Phase.STARTING:
                return
            status = int(message["status"])
            headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers") or ())
            self.head = (status, headers)
            self.buffer.head = (status, stored_headers(headers) + self._traceparent)
            if self._span is not None:
                self._span.add_event("head", {"http.response.status_code": status})
            self._advance(Phase.STREAMING)
            self._pending()
            if self.client is not None:
                self.client.start(self._followed(), self.options)
            elif self._flusher is not None:
                # Nobody is fed inline (the proxy's mode 2): every reader waits for the stored
                # head, so it is stored without waiting for the flush window.
                self._flusher.hurry()

    # -- storing -------------------------------------------------------------------------------

    def _pending(self) -> None:
        """Something new to store: tell the engine's flusher (asyncio) or this writer (trio)."""
        if self._flusher is not None:
            self._flusher.add(self)
        else:
            self.buffer.wake()

    def take_write(self) -> Write | None:
        """Everything pending, as one write (None: nothing, or nothing more may be stored)."""
        buffer = self.buffer
        if buffer.closed or not buffer.pending:
            return None
        head, data, chunks = buffer.take()
        self._in_flight = True
        return Write(self.lease, head, data, chunks)

    def written(self, error: BaseException | None) -> None:
        """What `take_write` gave is stored, or met `error`: then nothing more will be."""
        self._in_flight = False
        if error is not None:
            if isinstance(error, LeaseLost):
                self.stop(Stop.LEASE_LOST)
            else:
                logger.error(
                    "durable_asgi: store failed for %r: %s",
                    self.lease.stream_id,
                    error,
                    extra=self.telemetry.record(
                        "store_unreachable", self.lease.stream_id, operation="append_batch"
                    ),
                )
                self.stop(Stop.STORE_ERROR, str(error))
                self._store_failed = True
            self.buffer.close()  # from here on `_send` drops data, and nothing waits
            self._stop_keeping()
        self.buffer.release()

    async def _write_loop(self) -> None:
        """This producer's own writer, where there is no flusher (trio)."""
        store, buffer = self.engine.store, self.buffer
        while not buffer.closed:
            await buffer.wait_for_work()
            while (write := self.take_write()) is not None:
                start = anyio.current_time()
                try:
                    if write.head is not None:
                        await store.start(write.lease, *write.head)
                    if write.data:
                        await store.append(write.lease, write.data, chunks=write.chunks)
                except Exception as exc:
                    self.written(exc)
                else:
                    self.written(None)
                    self.telemetry.flushed(len(write.data), anyio.current_time() - start)
            if self.phase >= Phase.CLOSING:
                return

    async def _close(self) -> None:
        """After the handler: once everything it sent is stored, record how the stream ended
        (failed, if the store did) and stop the keeper. Then the stream is final."""
        store, lease, buffer = self.engine.store, self.lease, self.buffer
        try:
            while self._in_flight and not buffer.closed:  # the writer's, or the flusher's
                await buffer.wait_drained()
            write = self.take_write()
            if write is not None:  # the rest, now: the end isn't kept waiting for a window
                start = anyio.current_time()
                self.written((await write_all(store, [write]))[0])
                self.telemetry.flushed(len(write.data), anyio.current_time() - start)
            if not buffer.closed:
                status = self.head[0] if self.head else 500
                retain = 200 <= status < 300
                await self.telemetry.timed(
                    "finish",
                    lambda: store.finish(lease, self.state, ttl=self.options.ttl, retain=retain),
                )
                self.stored = self.state
        except Exception as exc:
            self.written(exc)
        finally:
            buffer.close()
            self._stop_keeping()
            if self._store_failed:
                await self._record_failure()
            self._advance(Phase.DONE)

    async def _record_failure(self) -> None:
        """The store failed mid-stream: record the stream `failed` as soon as the store answers
        again (a restarting database, say), so the next request runs the handler afresh
        instead of joining a dead stream. Tried until the lease would have run out: readers
        see the stream failed from then on anyway."""
        store, lease, delay = self.engine.store, self.lease, 0.05
        with anyio.move_on_after(self.options.lease_seconds):
            while True:
                try:
                    await store.finish(lease, "failed", ttl=self.options.ttl, retain=False)
                except LeaseLost:
                    return
                except StoreError:
                    await anyio.sleep(delay)
                    delay = min(2 * delay, 1.0)
                else:
                    return

    # -- the first client ----------------------------------------------------------------------

    async def serve(
        self, app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send
    ) -> None:
        """Run `app` (see `run`) for the client whose request this is, and serve that client
        meanwhile. Returns when both are done; cancelling it stops the client's reader only.
        Never raises the app's exception (`error`) or the reader's (`client_error`).

        On asyncio the client is fed inline by the handler's `send` while it keeps up
        (`LiveClient`), and from the store once it falls behind; elsewhere from the store."""
        if asyncio_loop() is not None:
            self.client = LiveClient(send)
        async with Beside() as beside:
            beside.start_soon(self.run, app, scope, body, receive)
            await self.serve_client(send)

    def _followed(self) -> Followed:
        assert self.head is not None
        status, headers = self.head
        return Followed(
            self.lease.stream_id, self.lease.token, status, headers, "running", replay=False
        )

    async def serve_client(self, send: Send) -> None:
        """Serve the client whose request started the handler, until the stream ends or the
        client leaves (the keeper watches for that, and cancels `_client`)."""
        await self._flags[Phase.STREAMING].wait()
        if self.head is None:
            return  # the app failed before responding: the caller re-raises its error
        store = self.engine.store
        with self._client, self.telemetry.reader():
            try:
                if self.client is None:
                    await serve_stream(
                        store, self._followed(), 0, self.options, None, send, fed=self.telemetry
                    )
                else:
                    await self._serve_live(self.client, send)
            except StoreError as exc:
                logger.error(
                    "durable_asgi: store failed while serving %r: %s",
                    self.lease.stream_id,
                    exc,
                    extra=self.telemetry.record(
                        "store_unreachable", self.lease.stream_id, operation="read"
                    ),
                )
            except Exception as exc:
                self.client_error = exc

    async def _serve_live(self, client: LiveClient, send: Send) -> None:
        """The request's side of a `LiveClient`: count it in after its first chunk, and end
        its response as the stream ended — or, once it fell behind, feed it from the store."""
        tail = Tail(
            self.engine.store, self.lease.stream_id, self.lease.token, 0, self.options.poll_interval
        )
        count_in = True
        fed: int | None = None  # the offset it fell behind at, once it is fed from the store
        try:
            while not client.gone:
                if client.first and count_in:  # once, whether or not the store takes it
                    count_in = False
                    await count_reader_in(tail)
                if client.behind is not None:
                    if await client.caught_up():
                        tail.offset = fed = client.offset
                        error = await send_body(tail, None, client.ids, send, count_in=count_in)
                        if error is not None:
                            raise error
                    break
                if self.phase is Phase.DONE:
                    if self.stored == "complete":
                        last = client.ids.flush() if client.ids is not None else b""
                        await send({"type": "http.response.body", "body": last, "more_body": False})
                    # Otherwise end without completing the body: the server closes the
                    # connection, so the client sees a truncated response, never a clean end.
                    break
                await client.wait()
        except OSError:
            pass  # ASGI 2.4+ servers raise OSError on send after the client left.
        finally:
            if fed is not None:
                self.telemetry.fed(tail.offset - fed)
            client.leave()
            if client.behind is not None and not client.behind.done():
                client.behind.cancel()  # the client is gone: its send has no one to wait for
            if tail.counted:
                with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                    await tail.store.attach(tail.stream_id, -1)
        if client.error is not None:
            raise client.error

    def _stop_keeping(self) -> None:
        """No more renewals, no more watching the first client (the stream is ending)."""
        self._keeping.cancel()
        if self._renewer is not None:
            self._renewer.remove(self)

    async def renew(self) -> None:
        """Renew the lease once. Never raises: a lost lease stops the handler (and renewing),
        a store error is logged and the next renewal tries again."""
        store, lease = self.engine.store, self.lease
        try:
            await self.telemetry.timed(
                "renew", lambda: store.renew(lease, lease_seconds=self.options.lease_seconds)
            )
        except LeaseLost:
            self.stop(Stop.LEASE_LOST)
            if self._renewer is not None:
                self._renewer.remove(self)
        except StoreError as exc:
            self.telemetry.renewal_failed(self.lease.stream_id, exc)
        except Exception:
            logger.exception("durable_asgi: renewing %r failed", self.lease.stream_id)

    async def _keep(self, receive: Receive | None) -> None:
        """Stop the first client's reader when that client leaves (the handler goes on); on
        trio, also renew the lease every third of it (one task for both). Never raises."""
        interval = self.options.lease_seconds / 3
        with self._keeping:
            if self._renewer is not None:  # asyncio: the engine's renewer renews
                if receive is not None:
                    await until_disconnect(receive)
                    self._client_left()
                return
            while True:
                with anyio.move_on_after(interval):
                    if receive is not None:
                        await until_disconnect(receive)
                        receive = None
                        self._client_left()
                    await anyio.sleep_forever()
                await self.renew()
                if self.stop_reason is Stop.LEASE_LOST:
                    return

    def _client_left(self) -> None:
        self._client.cancel()
        if self.client is not None:
            self.client.leave()


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
