"""The first client's hot path: fed inline by the handler's `send` while it keeps up, from the
store once it falls behind; and the flusher, one batched store write for every stream.

Each test checks bytes, not mechanics: every byte exactly once and in order across the switch,
the same bytes for the first client and any resumer, no clean end the store didn't record.
The inline path is asyncio's (trio serves the first client from the store): both run.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from durable_asgi import DurableMiddleware, Lease, MemoryStore
from durable_asgi._engine import Flusher
from durable_asgi._tasks import DONE, finish, step
from durable_asgi._types import Message, Receive
from durable_asgi.stores._base import Write

from ..support.apps import CHUNKS, StreamApp, wait_thread_event
from ..support.asgi import call, http_scope

pytestmark = pytest.mark.anyio

KEY = {"Durable-Key": "k"}
BODY = b"".join(CHUNKS)


async def test_a_client_that_falls_behind_is_fed_from_the_store_byte_for_byte() -> None:
    """Backpressure: the client's connection stops taking bytes at chunk 5 (its `send` waits);
    the handler runs to its end regardless, and the client, released, gets the rest from the
    store, where it left off: the whole body exactly once, in order, cleanly ended."""
    app = StreamApp(delay=0.001)
    mw = DurableMiddleware(app, store=MemoryStore())
    stuck, release = anyio.Event(), anyio.Event()
    received: list[bytes] = []
    complete = False

    async def send(message: Message) -> None:
        nonlocal complete
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))
            if len(received) == 5:
                stuck.set()
                await release.wait()
            complete = not message.get("more_body", False)

    async def client() -> None:
        await mw(http_scope("/s", headers=KEY), _receive_forever(), send)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client)
        with anyio.fail_after(10):
            await stuck.wait()
        await wait_thread_event(app.ended)  # the handler doesn't wait for this client
        assert app.finished == 1
        release.set()
    assert b"".join(received) == BODY
    assert complete
    assert app.calls == 1


async def test_a_resumer_sees_the_bytes_the_first_client_saw_when_the_handler_crashes() -> None:
    app = StreamApp(fail_at=20, delay=0.001)
    mw = DurableMiddleware(app, store=MemoryStore())
    with pytest.raises(RuntimeError, match="boom"):
        await call(mw, "/s", headers=KEY)
    # The first client's bytes went out inline; the store holds the same ones, then `failed`.
    resumed = await call(mw, "/s", headers={**KEY, "Durable-Offset": "0"})
    assert resumed.headers["durable-state"] == "failed"
    assert not resumed.complete
    assert resumed.body == b"".join(CHUNKS[:20])


async def test_abort_mid_stream_ends_the_first_client_and_a_resumer_alike() -> None:
    app = StreamApp(pause_at=10)
    mw = DurableMiddleware(app, store=MemoryStore(), namespace="/n")
    results: dict[str, Any] = {}

    async def first() -> None:
        results["first"] = await call(mw, "/s", headers=KEY)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await wait_thread_event(app.paused)
        assert await mw.abort("k")
        app.release.set()
    resumed = await call(mw, "/s", headers={**KEY, "Durable-Offset": "0"})
    assert results["first"].body == resumed.body == b"".join(CHUNKS[:10])
    assert not results["first"].complete and not resumed.complete
    assert resumed.headers["durable-state"] == "aborted"


async def test_a_second_reader_joining_mid_stream_gets_the_same_bytes() -> None:
    app = StreamApp(pause_at=25)
    mw = DurableMiddleware(app, store=MemoryStore())
    results: dict[str, Any] = {}

    async def request(name: str) -> None:
        results[name] = await call(mw, "/s", headers=KEY)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(request, "first")
        await wait_thread_event(app.paused)
        tasks.start_soon(request, "joiner")
        await anyio.wait_all_tasks_blocked()
        app.release.set()
    assert results["first"].body == results["joiner"].body == BODY
    assert results["first"].complete and results["joiner"].complete
    assert results["joiner"].headers["durable-replay"] == "true"
    assert app.calls == 1


class CountingStore(MemoryStore):
    """Counts the store writes the engine makes."""

    def __init__(self) -> None:
        super().__init__()
        self.appends = 0

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        self.appends += 1
        await super().append(lease, data, chunks=chunks)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_flusher_batches_every_streams_chunks_into_fewer_writes() -> None:
    """Group commit: 20 streams x 50 chunks, each handler awaiting between chunks; the flusher
    writes each stream's chunks of a window at once, so there are fewer appends than chunks
    — and every body is whole."""
    store = CountingStore()
    app = StreamApp(delay=0.001)
    mw = DurableMiddleware(app, store=store)
    results = []

    async def one(i: int) -> None:
        results.append(await call(mw, "/s", headers={"Durable-Key": f"k{i}"}))

    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(one, i)
    assert [r.body for r in results] == [BODY] * 20
    assert all(r.complete for r in results)
    assert store.appends < 20 * len(CHUNKS) / 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_flush_window_zero_stores_each_chunk_as_it_comes() -> None:
    store = CountingStore()
    mw = DurableMiddleware(StreamApp(delay=0.001), store=store, flush_window=0)
    result = await call(mw, "/s", headers=KEY)
    assert (result.body, result.complete) == (BODY, True)
    assert store.appends >= len(CHUNKS) / 2, store.appends


class PendingWrite:
    """A stand-in producer for the flusher: one write pending, once."""

    def __init__(self, i: int) -> None:
        self.write: Write | None = Write(Lease(f"/s#{i}", "t"), None, b"", 0)

    def take_write(self) -> Write | None:
        write, self.write = self.write, None
        return write

    def written(self, error: BaseException | None) -> None:
        pass


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_flush_window_grows_with_the_streams_a_flush_writes() -> None:
    """5.7 ms after a flush of one stream, 5 ms + 0.7 ms per stream after a bigger one, never more
    than `flush_window`."""

    class Idle(MemoryStore):
        async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
            pass

    for streams, window, expected in (
        (1, 0.05, 0.0057),
        (30, 0.05, 0.026),
        (300, 0.05, 0.05),
        (30, 0.01, 0.01),
    ):
        flusher = Flusher(Idle(), asyncio.get_running_loop(), window)
        for i in range(streams):
            flusher.add(PendingWrite(i))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the flush
        assert flusher._next == pytest.approx(expected)


def test_flush_window_is_validated() -> None:
    with pytest.raises(ValueError, match="flush_window"):
        DurableMiddleware(StreamApp(), flush_window=-1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_backpressure_waits_for_the_store_not_for_the_flush_window() -> None:
    """A handler that outruns its high-water mark waits for its bytes to be stored — and the
    flusher stores them at once instead of at the window's end: 2 MiB through a 1 s window
    takes a fraction of a second, where waiting out the window per 64 KiB would take 30 s."""
    chunks = [bytes([65 + i % 26]) * 16384 for i in range(128)]
    store = CountingStore()
    mw = DurableMiddleware(StreamApp(chunks), store=store, flush_window=1.0)
    with anyio.fail_after(5):
        result = await call(mw, "/s", headers=KEY)
    assert (result.body, result.complete) == (b"".join(chunks), True)
    assert store.appends > 2  # stored as it went, not in one write at the end


# -- stepping a server's send in place --------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_step_runs_a_send_in_place_and_finish_continues_one_that_waits() -> None:
    sent: list[str] = []
    gate = asyncio.get_running_loop().create_future()

    async def quick() -> None:
        sent.append("quick")

    async def slow() -> None:
        await gate
        sent.append("slow")

    _, yielded = step(quick())
    assert yielded is DONE and sent == ["quick"]
    steps, yielded = step(slow())
    assert yielded is gate and sent == ["quick"]
    task = asyncio.ensure_future(finish(steps, yielded))
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result(None)
    await task
    assert sent == ["quick", "slow"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_step_takes_awaitables_that_are_plain_iterators() -> None:
    """Some servers' `send` (granian's) returns an awaitable whose ``__await__`` is a plain
    iterator, not a generator."""

    class Ready:
        def __await__(self) -> Any:
            return iter(())

    _, yielded = step(Ready())
    assert yielded is DONE


def _receive_forever() -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    return receive
