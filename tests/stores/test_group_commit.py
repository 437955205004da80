"""`GroupCommit` and its `Waiter`: batches in queue order, shielded callers, one wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio
import pytest

from durable_asgi.stores._batch import GroupCommit, Waiter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # GroupCommit is asyncio's, like the stores that use it


class Backend:
    """A flush that records its batches and waits for `gate` before answering."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.flushing = asyncio.Event()  # set once a batch is in flight

    async def flush(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.flushing.set()
        await self.gate.wait()
        return [ValueError(item) if item < 0 else item * 10 for item in items]


async def test_a_waiter_wakes_once_every_item_of_several_batches_is_answered() -> None:
    backend = Backend()
    commit: GroupCommit[int, int] = GroupCommit(backend.flush, max_batch=2)
    waiter = Waiter()
    futures = [commit.enqueue(item, waiter) for item in (1, 2, -3, 4, 5)]
    await waiter.wait()
    assert all(future.done() for future in futures)
    assert backend.batches == [[1, 2], [-3, 4], [5]]
    assert [f.result() for f in futures if f.exception() is None] == [10, 20, 40, 50]
    assert isinstance(futures[2].exception(), ValueError)


async def test_a_waiter_with_nothing_queued_returns_at_once() -> None:
    with anyio.fail_after(1):
        await Waiter().wait()


async def test_a_shielded_caller_cancelled_mid_batch_still_gets_its_result() -> None:
    backend = Backend()
    backend.gate.clear()
    commit: GroupCommit[int, int] = GroupCommit(backend.flush, max_batch=8)
    results: list[int] = []

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            results.append(await commit.submit(7, shield=True))
            await anyio.sleep_forever()  # where the cancellation lands

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as group:
        group.start_soon(caller, scope)
        await backend.flushing.wait()
        scope.cancel()  # while its write is in the batch in flight
        backend.gate.set()
    assert results == [70]


async def test_an_unshielded_caller_cancelled_before_its_batch_is_dropped() -> None:
    backend = Backend()
    backend.gate.clear()
    commit: GroupCommit[int, int] = GroupCommit(backend.flush, max_batch=1)
    first = commit.enqueue(1)  # in flight, holding the flusher
    await backend.flushing.wait()
    with anyio.move_on_after(0.01):
        await commit.submit(2)  # queued behind it, given up
    waiter = Waiter()
    third = commit.enqueue(3, waiter)
    backend.gate.set()
    await waiter.wait()
    assert (first.result(), third.result()) == (10, 30)
    assert backend.batches == [[1], [3]]  # 2 was never sent


async def test_failing_pending_items_wakes_their_waiter() -> None:
    backend = Backend()
    backend.gate.clear()
    commit: GroupCommit[int, int] = GroupCommit(backend.flush, max_batch=1)
    waiter = Waiter()
    commit.enqueue(1, waiter)
    queued = commit.enqueue(2, waiter)
    await backend.flushing.wait()
    commit.fail_pending(RuntimeError("closed"))
    backend.gate.set()
    with anyio.fail_after(1):
        await waiter.wait()
    assert isinstance(queued.exception(), RuntimeError)
