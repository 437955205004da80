"""`WriteBehind`: what a handler sent that the store doesn't have yet.

The handler's `send` appends here and returns; the flusher (or, on trio, the producer's writer)
takes everything pending as one write. The buffer is bounded: past `HIGH_WATER` pending bytes
the handler waits for the store, so a slow store slows the handler, never memory.
"""

from __future__ import annotations

import anyio

from .stores._base import Headers, join

__all__ = ["HIGH_WATER", "WriteBehind"]

#: Pending (unstored) bytes at which the handler's `send` waits for the store.
HIGH_WATER = 64 * 1024


class WriteBehind:
    """What the handler sent that the store doesn't have yet: the head, then body bytes.

    `put` never waits; `over_high_water` tells the handler's `send` to wait for `drained`.
    After `close` (the writer ended) further data is dropped.
    """

    __slots__ = (
        "_drained",
        "_wake",
        "_woken",
        "chunks",
        "closed",
        "head",
        "parts",
        "size",
        "total",
    )

    def __init__(self) -> None:
        self.head: tuple[int, Headers] | None = None
        self.parts: list[bytes] = []
        self.chunks = 0
        self.size = 0
        self.total = 0
        """Body bytes put so far, stored or not."""
        self.closed = False
        # The writer's wake-up (trio only: on asyncio the flusher stores): made when it waits.
        self._woken = False
        self._wake: anyio.Event | None = None
        self._drained: anyio.Event | None = None  # made when `send` waits for the writer

    def put(self, data: bytes) -> None:
        self.parts.append(data)
        self.chunks += 1
        self.size += len(data)
        self.total += len(data)

    def take(self) -> tuple[tuple[int, Headers] | None, bytes, int]:
        """Everything pending: (the head if not yet taken, body bytes, body messages)."""
        head, data, chunks = self.head, join(self.parts) if self.parts else b"", self.chunks
        self.head, self.parts, self.chunks, self.size = None, [], 0, 0
        return head, data, chunks

    @property
    def pending(self) -> bool:
        return self.head is not None or bool(self.parts)

    @property
    def over_high_water(self) -> bool:
        return self.size > HIGH_WATER

    def wake(self) -> None:
        """Tell the writer there is something to do."""
        self._woken = True
        if self._wake is not None:
            self._wake.set()

    async def wait_for_work(self) -> None:
        if not self._woken:
            self._wake = anyio.Event()
            await self._wake.wait()
            self._wake = None
        self._woken = False

    async def wait_drained(self) -> None:
        if self._drained is None:
            self._drained = anyio.Event()
        await self._drained.wait()

    def release(self) -> None:
        """Wake a `send` waiting for the writer to catch up."""
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def close(self) -> None:
        self.closed = True
        self.release()
