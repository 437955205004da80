"""Internals: `Beside`, the tasks a stream runs beside its request, and `Notifier`, the stores'
in-process wake-ups (asyncio and trio)."""

from __future__ import annotations

import sys

import anyio
import pytest

from durable_asgi import MemoryStore, StreamOptions
from durable_asgi._engine import Engine
from durable_asgi._producer import FINAL_STATE, Phase, Producer, Stop
from durable_asgi._tasks import Beside
from durable_asgi.stores import Lease
from durable_asgi.stores._base import Notifier

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


async def test_notifier_wakes_every_waiter_of_a_stream_and_only_those() -> None:
    notifier = Notifier()
    woken: list[str] = []

    async def waiter(stream_id: str, name: str) -> None:
        await notifier.wait(stream_id, notifier.event(stream_id), 60.0)
        woken.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            for name in ("a1", "a2"):
                tasks.start_soon(waiter, "a", name)
            tasks.start_soon(waiter, "b", "b1")
            await anyio.wait_all_tasks_blocked()
            notifier.notify("a")
            await anyio.wait_all_tasks_blocked()
            assert sorted(woken) == ["a1", "a2"]
            notifier.notify("b")
    assert sorted(woken) == ["a1", "a2", "b1"]


async def test_notifier_wait_ends_at_its_timeout_even_beside_a_longer_one() -> None:
    """On asyncio a stream's waiters share one timer: a short timeout is not held up by a
    longer one taken before it (the long waiter may wake early too: callers re-check)."""
    notifier = Notifier()
    event = notifier.event("s")

    async def long_waiter() -> None:
        await notifier.wait("s", event, 60.0)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(long_waiter)
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(5):
            await notifier.wait("s", notifier.event("s"), 0.05)
        tasks.cancel_scope.cancel()


# -- the producer's states ------------------------------------------------------------------------


def _producer() -> Producer:
    return Producer(Engine(MemoryStore()), Lease("/s#k", "token"), StreamOptions())


def test_every_stop_reason_has_a_final_state() -> None:
    assert set(FINAL_STATE) == {None, *Stop}
    assert FINAL_STATE[None] == "complete"
    assert {FINAL_STATE[stop] for stop in (Stop.ABORTED, Stop.DELETED, Stop.LEASE_LOST)} == {
        "aborted"
    }


async def test_the_first_stop_reason_stands_but_a_revoked_lease_wins() -> None:
    producer = _producer()
    producer.stop(Stop.SHUTDOWN)
    producer.stop(Stop.ABORTED)
    assert producer.stop_reason is Stop.SHUTDOWN
    producer.stop(Stop.DELETED)
    producer.stop(Stop.LEASE_LOST)
    assert producer.stop_reason is Stop.DELETED and producer.reason == "deleted"


async def test_phases_only_move_forward_and_set_the_flags_they_pass() -> None:
    producer = _producer()
    producer.engine.producers[producer.lease.stream_id] = producer
    producer._advance(Phase.SENT)
    producer._advance(Phase.STREAMING)
    assert producer.phase is Phase.SENT
    with anyio.fail_after(1):
        await producer._flags[Phase.STREAMING].wait()  # passed on the way: set
    assert not producer._flags[Phase.DONE].is_set()
    producer._advance(Phase.DONE)
    assert producer.engine.producers == {}
