"""The engine: the process-wide side of durable streams.

One `Engine` per middleware (or proxy) holds the store and the producers running in this
process, so that an abort or a delete reaches a handler here at once (elsewhere, its producer
sees the revoked lease), and shutdown can give them a grace period, then stop them. The rest of
the engine is per stream: `_producer` runs a source into the store, `_reader` serves clients from
it, `_tasks` has the concurrency helpers both use.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import time
from typing import TYPE_CHECKING

import anyio

from ._producer import Producer, Stop
from ._telemetry import OFF, Telemetry, store_kind
from .stores._base import Store, write_all

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["FLUSH_WINDOW", "MIN_WINDOW", "PER_STREAM", "Engine", "Flusher", "Renewer"]

FLUSH_WINDOW = 0.05
"""The longest flush window, in seconds (the default of `DurableMiddleware`'s
``flush_window``): the most a byte waits to be written behind the first client of a busy
worker. A token stream (an event every 10-50 ms) puts one event in a 5 ms window and several
in a 50 ms one: at 300 token-paced streams on one worker, memory's CPU per event fell from
1.59 to 1.28 times the bare app's (`bench/run.py`)."""

MIN_WINDOW = 0.005
PER_STREAM = 0.0007
"""The window grows with the load: `MIN_WINDOW` plus `PER_STREAM` for each stream the last
flush wrote, up to the longest. A few streams are stored within a few milliseconds, so their
joiners and resumers follow closely; from about 30 streams on, a window spans two or more
token events (26 ms at 30, the longest from 65), so each write — and each wake-up of a reader
fed from the store — carries several of every stream's chunks where the CPU is the limit. At
0.1 ms per stream a window carried one event of a 10 ms token stream up to 50 streams; at
0.7 ms, mode 2 of the proxy at 30 sessions (every reader fed from the store) cost 17-25 % less
CPU per event on memory, up to 10 % less on SQLite and Redis (`bench/proxy.py --mode 2
--sessions 30`, docs/proxy.md)."""


class Engine:
    """The store, opened once, the producers running in this process, and their telemetry
    (made when the store opens, from the providers given, else the global ones: an app that
    configures OpenTelemetry at startup, after building the middleware, is reported)."""

    def __init__(
        self,
        store: Store,
        *,
        flush_window: float = FLUSH_WINDOW,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        if not 0 <= flush_window <= 1:
            raise ValueError(f"flush_window must be between 0 and 1 second, not {flush_window!r}")
        self.store = store
        self.flush_window = flush_window
        self.telemetry = OFF
        self._providers = (meter_provider, tracer_provider)
        self.producers: dict[str, Producer] = {}
        self._opened = False
        # Made on first use: a lock or task made here would belong to whichever event loop
        # happened to be running when the middleware was built.
        self._open_lock: anyio.Lock | None = None
        self._flusher: Flusher | None = None
        self._renewer: Renewer | None = None

    def flusher(self) -> Flusher:
        """The flusher of the running (asyncio) event loop."""
        loop = asyncio.get_running_loop()
        if self._flusher is None or self._flusher.loop is not loop:
            self._flusher = Flusher(self.store, loop, self.flush_window, self.telemetry)
        return self._flusher

    def renewer(self) -> Renewer:
        """The lease renewer of the running (asyncio) event loop."""
        loop = asyncio.get_running_loop()
        if self._renewer is None or self._renewer.loop is not loop:
            self._renewer = Renewer(loop)
        return self._renewer

    async def ensure_open(self) -> None:
        if not self._opened:
            if self._open_lock is None:
                self._open_lock = anyio.Lock()
            async with self._open_lock:
                if not self._opened:
                    if self.telemetry is OFF:
                        meter, tracer = self._providers
                        self.telemetry = Telemetry(
                            store_kind(self.store), meter_provider=meter, tracer_provider=tracer
                        )
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
        producer.stop(Stop.ABORTED)
        with anyio.move_on_after(producer.options.lease_seconds):
            await producer.wait_done()
        return True

    async def delete(self, stream_id: str) -> bool:
        deleted = await self.store.delete(stream_id)
        producer = self.producers.get(stream_id)
        if producer is not None:
            producer.stop(Stop.DELETED)
        return deleted

    async def shutdown(self, grace: float) -> None:
        """Give running producers `grace` seconds to finish, then stop them (they end
        `failed`, so no reader waits for bytes that will never come)."""
        with anyio.move_on_after(grace):
            for producer in list(self.producers.values()):
                await producer.wait_done()
        for producer in list(self.producers.values()):
            producer.stop(Stop.SHUTDOWN)
        with anyio.move_on_after(max(1.0, grace)):
            for producer in list(self.producers.values()):
                await producer.wait_done()


class Flusher:
    """Stores what every producer of an engine has pending: one task, one batched write
    (`write_all`: one transaction, one pipeline) for all of them, at most one per window —
    where a writer task per producer would wake for every chunk. Idle, a write goes out at
    once; busy, the window (from `MIN_WINDOW` to `window`, by how many streams the last flush
    wrote) fills with every stream's chunks, so the cost per chunk falls as load rises (group
    commit). A producer over its high-water mark (its handler waits) cuts the window short:
    backpressure waits for the store, never the clock. asyncio only (trio: a writer per
    producer).
    """

    __slots__ = (
        "_dirty",
        "_last",
        "_next",
        "_task",
        "_urgent",
        "_window_ends",
        "loop",
        "store",
        "telemetry",
        "window",
    )

    def __init__(
        self,
        store: Store,
        loop: asyncio.AbstractEventLoop,
        window: float = FLUSH_WINDOW,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.loop = loop
        self.window = window
        self._dirty: dict[Producer, None] = {}  # in the order they had something to store
        self._task: asyncio.Task[None] | None = None
        self._last = -window
        self._next = min(window, MIN_WINDOW)  # the window before the next flush
        self._window_ends: asyncio.Future[None] | None = None  # while the flusher waits
        self._urgent = False  # a handler waits for the store: no window before the next flush

    def add(self, producer: Producer) -> None:
        """`producer` has something to store."""
        self._dirty[producer] = None
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    def hurry(self) -> None:
        """Flush without waiting for the window: a handler is waiting for its bytes to be
        stored (`WriteBehind.over_high_water`), or readers for a head."""
        self._urgent = True
        self._wake()

    def _wake(self) -> None:
        if self._window_ends is not None and not self._window_ends.done():
            self._window_ends.set_result(None)

    async def _run(self) -> None:
        try:
            while self._dirty:
                wait = self._last + self._next - self.loop.time()
                if wait > 0 and not self._urgent:
                    self._window_ends = self.loop.create_future()
                    timer = self.loop.call_later(wait, self._wake)
                    try:
                        await self._window_ends
                    finally:
                        timer.cancel()
                        self._window_ends = None
                self._urgent = False
                self._last = self.loop.time()
                producers, self._dirty = self._dirty, {}
                writes, owners = [], []
                for producer in producers:
                    write = producer.take_write()
                    if write is not None:
                        writes.append(write)
                        owners.append(producer)
                if not writes:
                    continue
                self._next = min(self.window, MIN_WINDOW + PER_STREAM * len(writes))
                start = time.perf_counter()
                try:
                    outcomes = await write_all(self.store, writes)
                except Exception as exc:  # the store failed as a whole
                    outcomes = [exc] * len(writes)
                if self.telemetry.appended is not None:
                    self.telemetry.flushed(
                        sum(len(write.data) for write in writes), time.perf_counter() - start
                    )
                for producer, outcome in zip(owners, outcomes, strict=True):
                    producer.written(outcome)
        finally:
            self._task = None


class Renewer:
    """Renews the leases of an engine's running producers, each every third of its lease: one
    timer for all of them, and the renewals due together run at once (one batch in a store
    that groups its commits). A producer renewing its own lease would wake — and cancel the
    wait it was in — every third of a lease; at a thousand streams that cost more than their
    renewals. A renewal still running when the next is due is not doubled. asyncio only
    (trio: each producer's keeper renews).
    """

    __slots__ = ("_due", "_heap", "_order", "_renewing", "_timer", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: dict[Producer, float] = {}  # when each producer's next renewal is due
        self._heap: list[tuple[float, int, Producer]] = []  # the same, soonest first (lazily)
        self._order = itertools.count()  # breaks ties: producers don't compare
        self._timer: asyncio.TimerHandle | None = None
        self._renewing: dict[Producer, asyncio.Task[None]] = {}

    def add(self, producer: Producer) -> None:
        """Renew `producer`'s lease from now on, until `remove`."""
        self._schedule(producer)
        self._arm()

    def remove(self, producer: Producer) -> None:
        """No more renewals for `producer` (its heap entry is dropped when it comes up)."""
        self._due.pop(producer, None)

    def _schedule(self, producer: Producer) -> None:
        due = self.loop.time() + producer.options.lease_seconds / 3
        self._due[producer] = due
        heapq.heappush(self._heap, (due, next(self._order), producer))

    def _arm(self) -> None:
        """Set the timer for the soonest renewal."""
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # removed since
        if not heap:
            return
        when = heap[0][0]
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now, heap = self.loop.time(), self._heap
        while heap and heap[0][0] <= now:
            at, _, producer = heapq.heappop(heap)
            if self._due.get(producer) != at:
                continue  # removed since
            self._schedule(producer)
            if producer not in self._renewing:
                task = self.loop.create_task(producer.renew())
                self._renewing[producer] = task
                task.add_done_callback(functools.partial(self._renewed, producer))
        self._arm()

    def _renewed(self, producer: Producer, task: asyncio.Task[None]) -> None:
        self._renewing.pop(producer, None)
