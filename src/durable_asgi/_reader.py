"""Readers: serve one client a stream from the store — head, body from an offset, then the end.

Every client is a reader, the one whose request started the handler included: it reads the
store from its offset and waits for more, so a slow client never slows the producer, and the
first client and a resumer see exactly the same bytes. What a reader follows is one small type,
`Followed`, whoever it is; `serve_info` makes it from a stored snapshot (joiners and resumers),
the producer from the head its handler sent (the first client).

A reader ends as the stream did: a complete stream with a clean end of body; a failed,
aborted or deleted one without it (the server closes the connection), so a truncated answer
never looks whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ._options import StreamOptions
from ._protocol import SSEIds, is_event_stream, replay_headers, send_json
from ._tasks import DONE, Beside, finish, step
from ._telemetry import log_fields
from ._types import Message, Receive, Send
from .exceptions import StoreError
from .stores._base import Headers, State, Store, StreamInfo, effective

if TYPE_CHECKING:
    from ._telemetry import Reading, Telemetry

__all__ = [
    "READ_SIZE",
    "Followed",
    "LiveClient",
    "Tail",
    "count_reader_in",
    "send_body",
    "serve_info",
    "serve_stream",
    "until_disconnect",
]

logger = logging.getLogger("durable_asgi")

#: Bytes per store read (and per write to the client) when replaying.
READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Followed:
    """The stream a reader follows, as of when its head goes out."""

    stream_id: str
    generation: str
    """The producer's lease token: a stream deleted and started again is another one."""
    status: int
    headers: Headers
    """As stored — or, for the client that started the handler, as the app sent them."""
    state: State
    replay: bool
    """Whether the answer is served from the store (``Durable-Replay``): all but the first
    client's."""
    total: int | None = None
    """The body's length, when the stream is finished."""


class Tail:
    """The body of one stream from `offset`: stored bytes first, then live ones.

    After iteration, `end` says how the stream ended: ``complete``, ``failed``, ``aborted``
    or ``gone`` (deleted, or replaced by a new run).
    """

    def __init__(
        self,
        store: Store,
        stream_id: str,
        generation: str,
        offset: int,
        poll: float,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.stream_id = stream_id
        self.generation = generation
        self.start = self.offset = offset
        self.poll = poll
        self.end = ""
        self.counted = False
        """Whether this reader was counted in `StreamInfo.readers` (and must be counted out)."""
        self.first_at: float | None = None
        """When (`time.perf_counter`) the first body chunk went to the client."""
        self.telemetry = telemetry
        """Where to record each read's duration (None: nowhere)."""

    async def __aiter__(self) -> AsyncGenerator[bytes, None]:
        store, stream_id, generation = self.store, self.stream_id, self.generation
        telemetry = self.telemetry
        if telemetry is not None and telemetry.store_duration is None:
            telemetry = None
        while True:
            if telemetry is None:
                info, data = await store.read(stream_id, self.offset, READ_SIZE)
            else:
                start = time.perf_counter()
                info, data = await store.read(stream_id, self.offset, READ_SIZE)
                telemetry.store_op("read", time.perf_counter() - start)
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


class LiveClient:
    """The client whose request started the handler, fed by the handler's own `send` while it
    keeps up (asyncio).

    The handler's chunk reaches this client the way it would without durable_asgi: its
    `send` runs in the handler's task (`step`), with no task switch and no store round trip;
    the store gets the same bytes beside it. The first send that would wait — the client reads
    slower than the handler writes — goes on in a task of its own (`finish`) and the client
    falls *behind*: from then on it is fed from the store, from the `offset` it reached, like
    any reader, so a slow client never slows the handler. The request's task sleeps meanwhile,
    and wakes only for what changes how it is served (`wait`): the first chunk out, falling
    behind, the client gone, the stream's end.
    """

    __slots__ = ("_changed", "behind", "error", "first", "gone", "ids", "offset", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.offset = 0
        """Body bytes of the stream handed to `send` (before `ids` rewrote them)."""
        self.ids: SSEIds | None = None
        self.first = False
        """Whether a body chunk went out (the reader is counted in then)."""
        self.behind: asyncio.Task[None] | None = None
        """The send that would have waited, going on by itself: the client is store-fed."""
        self.gone = False
        self.error: Exception | None = None
        """What `send` raised other than the client leaving, for the request to re-raise."""
        self._changed: anyio.Event | None = None

    @property
    def live(self) -> bool:
        return self.behind is None and not self.gone

    def start(self, stream: Followed, options: StreamOptions) -> None:
        """Send the response head (the handler's own, cookies included)."""
        sse = options.sse_ids and is_event_stream(stream.headers)
        headers = replay_headers(
            stream.headers, offset=0, state=stream.state, replay=False, total=None, rewrite_body=sse
        )
        self.ids = SSEIds(0) if sse else None
        self._deliver({"type": "http.response.start", "status": stream.status, "headers": headers})

    def body(self, data: bytes) -> None:
        """Send a chunk of the body, if the client is live."""
        if self.behind is not None or self.gone:
            return
        self.offset += len(data)
        if self.ids is not None:
            data = self.ids.feed(data)
            if not data:
                return
        self._deliver({"type": "http.response.body", "body": data, "more_body": True})
        if not self.first:
            self.first = True
            self.changed()

    def _deliver(self, message: Message) -> None:
        try:
            steps, yielded = step(self.send(message))
        except OSError:  # ASGI 2.4+ servers raise it on send once the client left
            self.leave()
            return
        except Exception as exc:
            self.error = exc
            self.leave()
            return
        if yielded is not DONE:
            self.behind = asyncio.ensure_future(finish(steps, yielded))
            self.changed()

    def leave(self) -> None:
        """The client is gone: nothing more is sent to it."""
        self.gone = True
        self.changed()

    def changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait(self) -> None:
        """Until `changed` (callers re-check what they wait for)."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def caught_up(self) -> bool:
        """Wait for the send that fell behind; False if the client left meanwhile."""
        assert self.behind is not None
        try:
            await asyncio.shield(self.behind)
        except OSError:
            self.gone = True
        except Exception as exc:
            self.error = exc
            self.gone = True
        return not self.gone


async def wait_for_head(store: Store, info: StreamInfo, poll: float) -> StreamInfo | None:
    """Wait until the stream's response head is stored (or it ended without one: a producer
    that died before it ends once its lease ran out, so this never waits forever)."""
    while info.status_code is None and not effective(info).finished:
        await store.wait(info, poll)
        latest = await store.info(info.id)
        if latest is None or latest.generation != info.generation:
            return None
        info = latest
    return info


async def serve_info(
    store: Store,
    info: StreamInfo,
    offset: int,
    options: StreamOptions,
    receive: Receive | None,
    send: Send,
    reading: Reading | None = None,
) -> None:
    """Serve a joiner or resumer the stream `info` is a snapshot of, from `offset`: once its
    head is stored, or with 502 if it ended without one, or 416 past the end of a finished one.
    `reading` (telemetry) is told what was served."""
    latest = await wait_for_head(store, info, options.poll_interval)
    if latest is None or latest.status_code is None:
        if reading is not None:
            reading.refused = 502
        await send_json(
            send,
            502,
            {"error": "the stream ended before its handler responded", "state": "failed"},
            [(b"durable-state", b"failed")],
        )
        return
    total = latest.offset if latest.finished else None
    if total is not None and offset > total:
        if reading is not None:
            reading.refused = 416
        await send_json(
            send,
            416,
            {"error": f"offset {offset} is past the end of the stream ({total} bytes)"},
            [(b"durable-state", latest.state.encode()), (b"content-range", b"bytes */%d" % total)],
        )
        return
    followed = Followed(
        latest.id,
        latest.generation,
        latest.status_code,
        latest.headers or (),
        latest.state,
        replay=True,
        total=total,
    )
    if reading is not None:
        reading.headers = followed.headers
    await serve_stream(store, followed, offset, options, receive, send, reading)


async def serve_stream(
    store: Store,
    stream: Followed,
    offset: int,
    options: StreamOptions,
    receive: Receive | None,
    send: Send,
    reading: Reading | None = None,
    fed: Telemetry | None = None,
) -> None:
    """Serve one client `stream` from `offset`, then end as the stream did.

    `receive` is watched for the client leaving; the first client's producer watches it
    instead (pass None). Raises what the reader met unexpectedly (not store errors, which can
    only truncate the body once its head is out). A joiner's or resumer's `reading` is told
    what was served; `fed` is told the bytes a first client was served (off asyncio).
    """
    sse = options.sse_ids and is_event_stream(stream.headers)
    out_headers = replay_headers(
        stream.headers,
        offset=offset,
        state=stream.state,
        replay=stream.replay,
        # Only a complete stream's length is the body's: a truncated one must not look whole.
        total=stream.total if stream.state == "complete" else None,
        rewrite_body=sse,
    )
    tail = Tail(store, stream.stream_id, stream.generation, offset, options.poll_interval)
    if reading is not None:
        reading.tail = tail
        tail.telemetry = reading.telemetry
    ids = SSEIds(offset) if sse else None
    head = {"type": "http.response.start", "status": stream.status, "headers": out_headers}
    try:
        if receive is None:
            error = await send_body(tail, head, ids, send)
            if error is not None:
                raise error
        else:
            await _pump(tail, head, ids, receive, send)
    finally:
        if fed is not None:
            fed.fed(tail.offset - tail.start)
        if tail.counted:
            with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await store.attach(stream.stream_id, -1)


async def count_reader_in(tail: Tail) -> None:
    """Count the reader in (`StreamInfo.readers`)."""
    with anyio.CancelScope(shield=True):  # so that the count out knows whether to run
        try:
            await tail.store.attach(tail.stream_id, +1)
        except StoreError as exc:
            logger.warning("durable_asgi: counting a reader of %r failed: %s", tail.stream_id, exc)
        else:
            tail.counted = True


async def until_disconnect(receive: Receive) -> None:
    """Return when the client has left (or its response is complete: ASGI servers answer
    ``http.disconnect`` then too). A server whose `receive` fails counts as gone."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:
        logger.warning("durable_asgi: receive() failed, taking the client as gone: %r", exc)


async def send_body(
    tail: Tail,
    head: Message | None,
    ids: SSEIds | None,
    send: Send,
    *,
    count_in: bool = True,
) -> Exception | None:
    """Send `head` (None: it is out already), then the body as `tail` yields it, then end as
    the stream did. Returns (not raises) an unexpected exception. The reader is counted in
    once its first chunk is out (so a shared store's round trip stays off the time to first
    byte), unless `count_in` is False (it was already)."""
    try:
        if head is not None:
            await send(head)
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
                    tail.first_at = time.perf_counter()
                    await count_reader_in(tail)
        if tail.end == "complete":
            last = ids.flush() if ids is not None else b""
            await send({"type": "http.response.body", "body": last, "more_body": False})
        # Otherwise end without completing the body: the server closes the connection,
        # so the client sees a truncated response, never a clean end.
    except OSError:
        pass  # ASGI 2.4+ servers raise OSError on send after the client left.
    except StoreError as exc:
        # Headers are out: the only honest answer left is a truncated body.
        logger.error(
            "durable_asgi: store failed while reading %r: %s",
            tail.stream_id,
            exc,
            extra=log_fields("store_unreachable", tail.stream_id, operation="read"),
        )
    except Exception as exc:
        return exc  # re-raised bare by the caller, not wrapped in an ExceptionGroup
    return None


async def _pump(
    tail: Tail, head: Message, ids: SSEIds | None, receive: Receive, send: Send
) -> None:
    """Send the body from this task while another watches `receive`, and stop the body when
    the client leaves."""
    error: Exception | None = None
    with anyio.CancelScope() as reading:
        async with Beside() as beside:
            beside.start_soon(_watch, receive, reading)
            try:
                error = await send_body(tail, head, ids, send)
            finally:
                beside.cancel()
    if error is not None:
        raise error


async def _watch(receive: Receive, reading: anyio.CancelScope) -> None:
    """Cancel `reading` once the client behind `receive` has left."""
    await until_disconnect(receive)
    reading.cancel()
