"""Tasks beside a block, one-shot flags, and a coroutine run inline: the engine's concurrency
helpers.

Both exist for memory: a server runs thousands of streams, each with a few tasks and events.
On asyncio an anyio task costs about 4 KB (its handle comes with a cancel scope and an event) and
its task group 1.6 KB more, where a bare task costs about 1.3 KB; an `anyio.Event` costs about
1 KB, and most of a producer's are never waited on. On trio they are the anyio primitives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

__all__ = ["DONE", "Beside", "Flag", "asyncio_loop", "finish", "step"]


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
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
        if asyncio_loop() is None:
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


#: What `step` returns for an awaitable that ran to its end.
DONE: Any = object()

Steps = Iterator[Any]
"""An awaitable's ``__await__()`` iterator: what a task drives (with `next`: some servers'
awaitables, granian's, are plain iterators, not generators)."""


def step(awaitable: Awaitable[Any]) -> tuple[Steps, Any]:
    """Run `awaitable` in the caller's task until it first suspends (asyncio only).

    Returns its iterator and `DONE` if it ran to its end — the common case for a server's
    ``send`` while the client keeps up: no task, no loop iteration. Otherwise, with what it
    suspended on, for `finish` to continue in a task of its own (so the caller never waits for
    it). Its errors are raised here. Python 3.12's eager tasks do the same, at the cost of a
    task each.
    """
    steps = awaitable.__await__()
    try:
        return steps, next(steps)
    except StopIteration:
        return steps, DONE


async def finish(steps: Steps, yielded: Any) -> None:
    """Continue an awaitable `step` left suspended on `yielded`, as its task would have: wait
    for the future it yielded, resume it, until it returns. Its errors are raised here; if this
    is cancelled, so is the awaitable."""
    try:
        while True:
            if yielded is None:  # a bare yield (asyncio.sleep(0)): one loop iteration
                await asyncio.sleep(0)
            else:
                yielded._asyncio_future_blocking = False
                await asyncio.wait([yielded])
            try:
                yielded = next(steps)
            except StopIteration:
                return
    except BaseException:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
        raise
