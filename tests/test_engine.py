"""Engine internals: `Beside`, the tasks a stream runs beside its request (asyncio and trio)."""

from __future__ import annotations

import sys

import anyio
import pytest

from durable_asgi._engine import Beside

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio


async def test_beside_waits_for_its_tasks_even_when_the_caller_is_cancelled() -> None:
    release = anyio.Event()
    events: list[str] = []

    async def child() -> None:
        with anyio.CancelScope(shield=True):  # on trio the caller's cancellation reaches it
            await release.wait()
        events.append("child done")

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            async with Beside() as beside:
                beside.start_soon(child)
                await anyio.sleep_forever()
        events.append("caller done")

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(caller, scope)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert events == []  # cancelled, the caller still waits for its task
        release.set()
    assert events == ["child done", "caller done"]


async def test_beside_cancel_stops_its_tasks() -> None:
    started = anyio.Event()
    cancelled: list[bool] = []

    async def child() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    with anyio.fail_after(5):
        async with Beside() as beside:
            beside.start_soon(child)
            await started.wait()
            beside.cancel()
    assert cancelled == [True]


async def test_beside_raises_a_task_error_when_the_block_ends() -> None:
    async def child() -> None:
        raise ValueError("boom")

    with pytest.raises(BaseException) as caught:  # noqa: PT011 - bare, or in a group on trio
        async with Beside() as beside:
            beside.start_soon(child)
    error = caught.value
    while isinstance(error, BaseExceptionGroup):
        (error,) = error.exceptions
    assert isinstance(error, ValueError) and str(error) == "boom"
