"""Group commit: many callers' writes sent to a backend as one batch.

A store that pays a round trip (Redis) or a thread hop and a transaction (SQLite) per write
would cap a worker at a few thousand chunks a second. `GroupCommit` queues each caller's item
and runs one *flusher* task that sends everything queued as one batch, while the next batch
queues up behind it. Idle, a write is sent at once (no timer, no added delay); under load, the
cost per write falls as the batches grow.

Items of one `GroupCommit` are flushed in the order they were submitted, so a producer's writes
land in order. asyncio only, like the stores that use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

__all__ = ["GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")

#: What a flush answers for each item of its batch: the item's result, or the error it raised.
Flush = Callable[[Sequence[Item]], Awaitable[Sequence["Result | BaseException"]]]


class GroupCommit(Generic[Item, Result]):
    """Batches submitted items through `flush`, up to `max_batch` at a time.

    `flush(items)` sends one batch and answers one result (or exception) per item, in order;
    if it raises, every item of the batch gets that exception.

    Example::

        appends = GroupCommit(self._append_batch, max_batch=512)
        ok = await appends.submit(op)          # one of many ops in one transaction
    """

    __slots__ = ("_flush", "_flusher", "_max_batch", "_queue")

    def __init__(self, flush: Flush[Item, Result], *, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._flush = flush
        self._max_batch = max_batch
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Items queued and not yet taken into a batch."""
        return len(self._queue)

    async def submit(self, item: Item, *, shield: bool = False) -> Result:
        """Queue `item`, wait for its batch, return its result (or raise its error).

        A caller cancelled before its batch was taken is dropped from the queue (its write must
        not land after the caller's next one); with `shield`, the caller waits for the commit
        even when cancelled, so it always knows whether the write landed.
        """
        future = self.enqueue(item)
        if shield:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([future])
            return future.result()
        return await future

    def enqueue(self, item: Item) -> asyncio.Future[Result]:
        """Queue `item` and return the future of its result: a caller with many items queues
        them all, then waits for all (one batch, where `submit` each would be one a batch)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run())
        return future

    async def _run(self) -> None:
        """The flusher: sends batches in queue order until nothing is queued."""
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                batch = [(item, future) for item, future in batch if not future.done()]
                if not batch:
                    continue
                try:
                    results = await self._flush([item for item, _ in batch])
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait for the running flusher, if any, to send what is queued (the store is closing
        and its connection must outlive those writes). Items submitted meanwhile are sent by
        the same flusher."""
        flusher = self._flusher
        if flusher is not None:
            await asyncio.wait([flusher])

    def fail_pending(self, error: BaseException) -> None:
        """Fail every item still queued (the store is closing)."""
        queue, self._queue = self._queue, []
        for _, future in queue:
            if not future.done():
                future.set_exception(error)
