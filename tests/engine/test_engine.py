"""Internals: `Beside`, the tasks a stream runs beside its request, and `Notifier`, the stores'
in-process wake-ups (asyncio and trio)."""

from __future__ import annotations

import collections
import functools
import sys
from typing import Any

import anyio
import pytest

from durable_asgi import DurableMiddleware, MemoryStore, StreamOptions
from durable_asgi._engine import Engine
from durable_asgi._producer import FINAL_STATE, Phase, Producer, Stop
from durable_asgi._tasks import Beside
from durable_asgi.stores import Lease
from durable_asgi.stores._base import Notifier

from ..support.apps import CHUNKS, StreamApp, wait_thread_event
from ..support.asgi import call

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


# -- lease renewal ---------------------------------------------------------------------------------


class RenewCountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.renewals: list[str] = []

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        self.renewals.append(lease.stream_id)
        await super().renew(lease, lease_seconds=lease_seconds)


async def test_a_stream_outlives_many_leases_while_its_producer_renews() -> None:
    """Lease 0.2 s, ten streams of about 1 s each: every lease is renewed every third of it
    (on asyncio by the engine's one renewer, on trio by each producer's keeper), so no stream
    fails, a reader mid-way sees it running, and renewals stop with the streams."""
    store = RenewCountingStore()
    mw = DurableMiddleware(StreamApp(delay=0.02), store=store, lease_seconds=0.2)
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await call(mw, "/s", headers={"Durable-Key": f"k{i}"})

    async with anyio.create_task_group() as tasks:
        for i in range(10):
            tasks.start_soon(one, i)
        await anyio.sleep(0.5)  # past two leases
        infos = [await store.info(f"/s#k{i}") for i in range(10)]
        assert [info.state if info else None for info in infos] == ["running"] * 10
    assert all(r.complete and r.body == b"".join(CHUNKS) for r in results.values())
    per_stream = collections.Counter(store.renewals)
    assert len(per_stream) == 10 and min(per_stream.values()) >= 8, per_stream
    done = len(store.renewals)
    await anyio.sleep(0.2)
    assert len(store.renewals) == done  # finished streams are no longer renewed


async def test_a_lost_lease_found_at_renewal_stops_the_handler() -> None:
    """The stream is deleted behind the engine's back (the store's own delete, as another
    worker's would be) while its handler waits without writing: the next renewal finds the
    lease gone and stops the handler, and the stream is not renewed again."""
    store = RenewCountingStore()
    app = StreamApp(pause_at=2)
    mw = DurableMiddleware(app, store=store, lease_seconds=0.3)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(functools.partial(call, mw, "/s", headers={"Durable-Key": "k"}))
        await wait_thread_event(app.paused)
        assert await store.delete("/s#k")
        with anyio.fail_after(5):
            await wait_thread_event(app.ended)
    assert (app.finished, app.cancelled) == (0, 1)
    renewed = store.renewals.count("/s#k")
    await anyio.sleep(0.3)
    assert store.renewals.count("/s#k") == renewed
