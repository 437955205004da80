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
from typing import Any, Generic, Protocol, TypeVar

import anyio

__all__ = ["GroupCommit", "Keyed", "Waiter", "runs"]

Item = TypeVar("Item")
Result = TypeVar("Result")

#: What a flush answers for each item of its batch: the item's result, or the error it raised.
Flush = Callable[[Sequence[Item]], Awaitable[Sequence["Result | BaseException"]]]


class Waiter:
    """Wakes one caller once every item it queued (`GroupCommit.enqueue` with it) is answered,
    without cancelling any of them if the caller is cancelled meanwhile (a write in a batch
    can't be taken back), in one turn of the event loop, where ``asyncio.wait`` takes two (its
    futures' callbacks run a turn before it wakes): on the path of every claim and flush."""

    __slots__ = ("_future", "_pending")

    def __init__(self) -> None:
        self._pending = 0
        self._future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        """Until every item queued with this waiter is answered."""
        if self._pending:
            self._future = asyncio.get_running_loop().create_future()
            await self._future

    def _queued(self) -> None:
        self._pending += 1

    def _answered(self) -> None:
        self._pending -= 1
        if not self._pending and self._future is not None and not self._future.done():
            self._future.set_result(None)


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
        self._queue: list[tuple[Item, asyncio.Future[Result], Waiter | None]] = []
        self._flusher: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Items queued and not yet taken into a batch."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch in flight."""
        return self._flusher is None and not self._queue

    async def submit(self, item: Item, *, shield: bool = False) -> Result:
        """Queue `item`, wait for its batch, return its result (or raise its error).

        A caller cancelled before its batch was taken is dropped from the queue (its write must
        not land after the caller's next one); with `shield`, the caller waits for the commit
        even when cancelled, so it always knows whether the write landed.
        """
        if not shield:
            return await self.enqueue(item)
        waiter = Waiter()
        future = self.enqueue(item, waiter)
        with anyio.CancelScope(shield=True):
            await waiter.wait()
        return future.result()

    def enqueue(self, item: Item, waiter: Waiter | None = None) -> asyncio.Future[Result]:
        """Queue `item` and return the future of its result: a caller with many items queues
        them all, then waits for all (one batch, where `submit` each would be one a batch) —
        with a `Waiter`, which the answer to each wakes."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if waiter is not None:
            waiter._queued()
        self._queue.append((item, future, waiter))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run())
        return future

    async def _run(self) -> None:
        """The flusher: sends batches in queue order until nothing is queued."""
        try:
            while self._queue:
                taken = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                batch = []
                for entry in taken:
                    if entry[1].done():  # its caller was cancelled
                        _answer(entry, None)
                    else:
                        batch.append(entry)
                if not batch:
                    continue
                try:
                    results = await self._flush([item for item, _, _ in batch])
                except BaseException as exc:
                    for entry in batch:
                        _answer(entry, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for entry, result in zip(batch, results, strict=True):
                    _answer(entry, result)
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
        for entry in queue:
            _answer(entry, error)


def _answer(entry: tuple[Any, asyncio.Future[Any], Waiter | None], result: Any) -> None:
    """Resolve a queued item's future with `result` (an exception: raised), unless its caller
    gave up on it; then wake its waiter."""
    _, future, waiter = entry
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    if waiter is not None:
        waiter._answered()


class Keyed(Protocol):
    """What `runs` groups by: an op's kind of write and its stream."""

    @property
    def kind(self) -> str: ...

    @property
    def stream_id(self) -> str: ...


def runs(ops: Sequence[Keyed]) -> list[list[int]]:
    """`ops` (by index) grouped into runs of one kind, each applied by one set-based statement
    (or a few), run in order. Writes of different streams commute, so an op joins the first
    run of its kind after the run of its stream's previous op: a flush of a thousand new
    streams' heads and first chunks is two runs, not two thousand, each stream's writes still
    apply in order, and a run holds at most one op of each stream."""
    grouped: list[list[int]] = []
    kinds: list[str] = []
    last: dict[str, int] = {}  # stream id -> the run of its latest op
    for i, op in enumerate(ops):
        at = last.get(op.stream_id, -1) + 1
        while at < len(grouped) and kinds[at] != op.kind:
            at += 1
        if at == len(grouped):
            grouped.append([])
            kinds.append(op.kind)
        grouped[at].append(i)
        last[op.stream_id] = at
    return grouped
