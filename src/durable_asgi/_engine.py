"""The engine: the process-wide side of durable streams.

One `Engine` per middleware (or proxy) holds the store and the producers running in this
process, so that an abort or a delete reaches a handler here at once (elsewhere, its producer
sees the revoked lease), and shutdown can give them a grace period, then stop them. The rest of
the engine is per stream: `_producer` runs a source into the store, `_reader` serves clients from
it, `_tasks` has the concurrency helpers both use.
"""

from __future__ import annotations

import anyio

from ._producer import Producer, Stop
from .stores._base import Store

__all__ = ["Engine"]


class Engine:
    """The store, opened once, and the producers running in this process."""

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
