"""RedisStore against a real redis-server: the Redis-specific parts the conformance suite
doesn't reach (several processes' instances, restarts, key layout, retries)."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("redis")

from redis.asyncio import Redis

from durable_asgi.exceptions import ConfigurationError
from durable_asgi.stores import Lease, LeaseLost, StoreError, StoreFull, StreamInfo, Write
from durable_asgi.stores.redis import RedisStore

pytestmark = pytest.mark.redis

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randrange(20000, 50000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class Server:
    """A throw-away redis-server on a free loopback port (restartable, no persistence)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []
        self.cwd = tempfile.gettempdir()

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            cwd=self.cwd,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    if REDIS_SERVER is None:
        pytest.skip("needs redis-server")
    srv = Server()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(server: Server) -> AsyncIterator[RedisStore]:
    client = Redis.from_url(server.url)
    await client.flushdb()
    await client.aclose()
    s = RedisStore(server.url, block_seconds=0.5)
    await s.open()
    yield s
    await s.close()


async def claimed(store: RedisStore, sid: str = "/chat#1", lease_seconds: float = 5) -> Lease:
    lease = await store.claim(sid, lease_seconds=lease_seconds)
    assert isinstance(lease, Lease)
    return lease


async def lands_before_a_pipeline_of_appends(
    store: RedisStore, call: Callable[[], Awaitable[object]]
) -> bool:
    """Whether `call`, made while a big pipeline of 100 streams' appends is in flight,
    completes before the last of those appends does."""
    leases = [await claimed(store, f"/busy#{n}") for n in range(100)]
    piece = b"x" * (128 << 10)
    done: list[str] = []

    async def append(lease: Lease) -> None:
        await store.append(lease, piece, chunks=1)
        done.append("append")

    async def made() -> None:
        await call()
        done.append("call")

    async with anyio.create_task_group() as tg:
        for lease in leases:
            tg.start_soon(append, lease)
        await anyio.lowlevel.checkpoint()  # the appends are queued (and their pipeline sent)
        tg.start_soon(made)
    assert sorted(done) == ["append"] * 100 + ["call"]
    return done.index("call") < 100


@pytest.mark.anyio
async def test_a_join_does_not_queue_behind_a_pipeline_of_writes(store: RedisStore) -> None:
    """Producers' writes and everything else take separate lanes: a request joining a stream
    is answered while a big pipeline of other streams' appends is still in flight."""
    joined = await claimed(store, "/joined#1")

    async def join() -> None:
        info = await store.claim("/joined#1", lease_seconds=5)
        assert isinstance(info, StreamInfo) and info.generation == joined.token

    assert await lands_before_a_pipeline_of_appends(store, join)


@pytest.mark.anyio
async def test_a_renewal_does_not_queue_behind_a_pipeline_of_writes(store: RedisStore) -> None:
    """Renewals have a lane of their own: a busy worker's lease renewal lands while a big
    pipeline of its streams' appends is still in flight (one that waited behind it could
    find its lease run out, and lose the stream)."""
    kept = await claimed(store, "/kept#1", lease_seconds=5)
    assert await lands_before_a_pipeline_of_appends(
        store, functools.partial(store.renew, kept, lease_seconds=5)
    )


@pytest.mark.anyio
async def test_a_call_on_an_idle_lane_goes_at_once_and_a_burst_shares_pipelines(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim finding its lane idle is sent from its own task (no flusher, no pipeline);
    the claims that come while it is in flight go out together, in pipelines."""
    from redis.asyncio.client import Pipeline

    from durable_asgi.stores._batch import GroupCommit

    await store.open()
    pipelines: list[int] = []
    flushes: list[int] = []
    execute, run = Pipeline.execute, GroupCommit._run

    async def counted(self: Pipeline, raise_on_error: bool = True) -> Any:
        pipelines.append(len(self.command_stack))
        return await execute(self, raise_on_error)

    async def flusher(self: GroupCommit[Any, Any]) -> None:
        flushes.append(len(self))
        await run(self)

    monkeypatch.setattr(Pipeline, "execute", counted)
    monkeypatch.setattr(GroupCommit, "_run", flusher)
    assert isinstance(await store.claim("/alone#1", lease_seconds=5), Lease)
    assert (flushes, pipelines) == ([], [])  # neither the lane's flusher nor a pipeline
    results: list[Lease | StreamInfo] = []

    async def one(i: int) -> None:
        results.append(await store.claim(f"/burst#{i}", lease_seconds=5))

    async with anyio.create_task_group() as tasks:
        for i in range(50):
            tasks.start_soon(one, i)
    assert len([r for r in results if isinstance(r, Lease)]) == 50
    assert sum(pipelines) >= 40 and len(pipelines) <= 5  # a few pipelines, not 50 round trips


@pytest.mark.anyio
async def test_scripts_are_loaded_at_open_and_again_in_one_pipeline_after_a_flush(
    server: Server, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open loads every script, so a busy worker's first calls don't all meet NOSCRIPT; a
    pipeline that meets it later (Redis restarted, SCRIPT FLUSH) loads the scripts and resends
    those calls in one more pipeline — not one by one, each in full."""
    from durable_asgi.stores.redis import _scripts

    client = Redis.from_url(server.url)
    try:
        exists = await client.script_exists(*(script.sha for script in _scripts.SCRIPTS))
        assert all(exists)
        leases = [await claimed(store, f"/flushed#{n}") for n in range(20)]
        await client.script_flush()
        alone: list[str] = []
        real_run = _scripts.Script.run

        async def run(self: _scripts.Script, *args: Any) -> Any:
            alone.append(self.name)
            return await real_run(self, *args)

        monkeypatch.setattr(_scripts.Script, "run", run)
        async with anyio.create_task_group() as tg:
            for lease in leases:
                tg.start_soon(functools.partial(store.append, lease, b"x", chunks=1))
        assert alone == []
        # write_many's batch calls too: more streams than one call holds, so a pipeline of two
        more = [await claimed(store, f"/flushed#{n}") for n in range(20, 21 + _scripts.MAX_BATCH)]
        await client.script_flush()
        alone.clear()  # (claims one after another: each alone)
        outcomes = await store.write_many([Write(lease, None, b"y", 1) for lease in more])
        assert outcomes == [None] * len(more)
        assert alone == []
        other = RedisStore(server.url)  # reads Redis, not this process's copy
        try:
            for n in range(20):
                assert (await other.read(f"/flushed#{n}", 0, 10))[1] == b"x"
            for lease in more:
                assert (await other.read(lease.stream_id, 0, 10))[1] == b"y"
        finally:
            await other.close()
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_life_of_a_stream(store: RedisStore) -> None:
    lease = await claimed(store)
    await store.start(lease, 200, ((b"content-type", b"text/plain"), (b"x", b"\x00\xff")))
    await store.append(lease, b"hello ", chunks=1)
    await store.append(lease, b"world", chunks=2)
    info, data = await store.read("/chat#1", 0, 1 << 16)
    assert data == b"hello world"
    assert info is not None
    assert info.state == "running"
    assert (info.offset, info.chunks, info.status_code) == (11, 3, 200)
    assert info.headers == ((b"content-type", b"text/plain"), (b"x", b"\x00\xff"))
    assert info.lease_expires_at is not None
    assert abs(info.lease_expires_at - time.time() - 5) < 1
    await store.finish(lease, "complete", ttl=60, retain=True)
    info = await store.info("/chat#1")
    assert info is not None
    assert info.state == "complete"
    assert info.expires_at is not None
    assert info.lease_expires_at is None
    assert abs(info.expires_at - time.time() - 60) < 1
    assert isinstance(await store.claim("/chat#1", lease_seconds=5), StreamInfo)
    _, data = await store.read("/chat#1", 6, 3)
    assert data == b"wor"
    assert (await store.read("/chat#1", 11, 10))[1] == b""
    assert (await store.read("/chat#1", 50, 10))[1] == b""
    assert (await store.read("/chat#1", 0, 0))[1] == b""
    assert await store.read("/nope#1", 0, 10) == (None, b"")


@pytest.mark.anyio
async def test_fifty_concurrent_claims_one_lease(server: Server, store: RedisStore) -> None:
    others = [RedisStore(server.url) for _ in range(4)]
    stores = [store, *others]
    results: list[Lease | StreamInfo] = []

    async def one(i: int) -> None:
        results.append(await stores[i % 5].claim("/race#1", lease_seconds=5))

    async with anyio.create_task_group() as tasks:
        for i in range(50):
            tasks.start_soon(one, i)
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(leases) == 1
    assert all(r.generation == leases[0].token for r in results if isinstance(r, StreamInfo))
    for s in others:
        await s.close()


@pytest.mark.anyio
async def test_ten_megabytes_byte_for_byte(store: RedisStore) -> None:
    body = os.urandom(10 << 20)
    lease = await claimed(store, "/big#1")
    await store.start(lease, 200, ())
    sizes = [1, 7, 100, 4096, 65536, 1 << 20, 3 << 20]
    i = n = 0
    while i < len(body):
        piece = body[i : i + sizes[n % len(sizes)]]
        await store.append(lease, piece, chunks=1)
        i += len(piece)
        n += 1
    await store.finish(lease, "complete", ttl=60, retain=True)
    for offset in (0, 1, 8, 4200, 12345, (5 << 20) + 3, len(body) - 1, len(body)):
        info, data = await store.read("/big#1", offset, 1 << 30)
        assert info is not None
        assert info.offset == len(body)
        assert data == body[offset:], offset
    for offset, limit in ((3, 5), (100, 70000), ((1 << 20) + 5, 5 << 20), (0, 256 << 10)):
        _, data = await store.read("/big#1", offset, limit)
        assert data == body[offset : offset + limit]


@pytest.mark.anyio
async def test_other_process_wakes_promptly(server: Server, store: RedisStore) -> None:
    other = RedisStore(server.url, block_seconds=0.5)  # "another process": its own client
    lease = await claimed(store, "/wake#1")
    info = await other.info("/wake#1")
    assert info is not None

    async def timed_wait(info: StreamInfo) -> float:
        t0 = time.perf_counter()
        await other.wait(info, 5)
        return time.perf_counter() - t0

    for change in ("start", "append", "finish"):
        async with anyio.create_task_group() as tasks:
            took: list[float] = []

            async def waiter(info: StreamInfo = info, took: list[float] = took) -> None:
                took.append(await timed_wait(info))

            tasks.start_soon(waiter)
            await anyio.sleep(0.2)  # the waiter is blocked (its tail has synced)
            if change == "start":
                await store.start(lease, 200, ())
            elif change == "append":
                await store.append(lease, b"x", chunks=1)
            else:
                await store.finish(lease, "complete", ttl=60, retain=True)
        assert took[0] < 0.45, (change, took)
        latest = await other.info("/wake#1")
        assert latest is not None
        assert latest.version != info.version
        info = latest
    # already changed -> returns at once even on a fresh instance
    third = RedisStore(server.url)
    t0 = time.perf_counter()
    stale = StreamInfo(**{**info.__dict__, "version": info.version - 1})
    await third.wait(stale, 5)
    assert time.perf_counter() - t0 < 0.2
    # nothing changed -> waits the timeout
    t0 = time.perf_counter()
    await other.wait(info, 0.3)
    assert 0.25 < time.perf_counter() - t0 < 1
    await other.close()
    await third.close()


@pytest.mark.anyio
async def test_abort_and_delete_wake_other_process(server: Server, store: RedisStore) -> None:
    other = RedisStore(server.url, block_seconds=0.5)
    reader = RedisStore(server.url, block_seconds=0.5)
    for op in ("abort", "delete"):
        sid = f"/{op}#1"
        lease = await claimed(store, sid)
        info = await store.info(sid)
        assert info is not None
        async with anyio.create_task_group() as tasks:
            took: dict[str, float] = {}

            async def waiter(
                name: str, s: RedisStore, info: StreamInfo, took: dict[str, float] = took
            ) -> None:
                t0 = time.perf_counter()
                await s.wait(info, 5)
                took[name] = time.perf_counter() - t0

            tasks.start_soon(waiter, "reader", reader, info)
            tasks.start_soon(waiter, "producer", store, info)
            await anyio.sleep(0.2)
            if op == "abort":
                assert await other.abort(sid, ttl=60) is True
                assert await other.abort(sid, ttl=60) is False
            else:
                assert await other.delete(sid) is True
                assert await other.delete(sid) is False
            await anyio.sleep(0.45)
            assert "reader" in took  # its tail saw the change
            assert "producer" not in took  # the producer's process learns at its next write
            with pytest.raises(LeaseLost):
                await store.append(lease, b"x", chunks=1)
        assert took["reader"] < 0.45
        assert took["producer"] < 0.7
        with pytest.raises(LeaseLost):
            await store.renew(lease, lease_seconds=5)
        with pytest.raises(LeaseLost):
            await store.finish(lease, "complete", ttl=5, retain=True)
        latest = await store.info(sid)
        if op == "abort":
            assert latest is not None
            assert latest.state == "aborted"
        else:
            assert latest is None
    await other.close()
    await reader.close()


@pytest.mark.anyio
async def test_same_process_wake_needs_no_round_trip(store: RedisStore) -> None:
    lease = await claimed(store, "/local#1")
    info = await store.info("/local#1")
    assert info is not None
    await store.wait(info, 0.01)
    assert not store._follower.tails  # the producer's own process needs no tail
    woke = anyio.Event()

    async def waiter() -> None:
        await store.wait(info, 5)
        woke.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(waiter)
        await anyio.sleep(0.05)
        await store.append(lease, b"x", chunks=1)
        # set synchronously by the writer, before any XREAD reply could arrive
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert woke.is_set()


@pytest.mark.anyio
async def test_own_streams_are_read_from_memory_older_bytes_from_redis(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers in the producer's process read its newest bytes with no round trip; bytes older
    than the local copy come from Redis; either way the body is byte-for-byte the same."""
    from durable_asgi.stores.redis import _store as mod

    lease = await claimed(store, "/copy#1")
    await store.start(lease, 201, ((b"content-type", b"text/plain"),))
    body = os.urandom(mod.LOCAL_BYTES * 3 + 17)
    for at in range(0, len(body), 4096):
        await store.append(lease, body[at : at + 4096], chunks=1)
    sent: list[str] = []
    real_eval = store._eval

    async def counting_eval(script: object, *args: object, **kwargs: object) -> object:
        sent.append(getattr(script, "name", "?"))
        return await real_eval(script, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_eval", counting_eval)
    recent = len(body) - 1000
    info, data = await store.read("/copy#1", recent, 1 << 20)
    assert data == body[recent:]
    assert info is not None
    assert (info.state, info.offset, info.status_code, info.chunks) == (
        "running",
        len(body),
        201,
        (len(body) + 4095) // 4096,
    )
    assert sent == []  # from memory
    joined = await store.claim("/copy#1", lease_seconds=5)  # a request joining it
    assert joined == info
    assert sent == []  # not claimable, and known here: no round trip either
    info, data = await store.read("/copy#1", 0, 1 << 20)
    assert data == body
    assert sent == ["read"]  # the start is older than the copy: from Redis
    monkeypatch.undo()
    other = RedisStore(store._connection.url or "", block_seconds=0.5)  # another process's view
    info2, data2 = await other.read("/copy#1", 0, 1 << 20)
    assert data2 == body
    assert info2 is not None
    assert (info2.version, info2.offset, info2.chunks) == (info.version, info.offset, info.chunks)
    await other.close()


@pytest.mark.anyio
async def test_local_copy_goes_when_the_stream_ends_or_the_lease_is_lost(
    server: Server, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = await claimed(store, "/gone#1")
    await store.append(lease, b"abc", chunks=1)
    await store.finish(lease, "complete", ttl=60, retain=True)
    assert not store._producing
    info, data = await store.read("/gone#1", 0, 10)
    assert info is not None
    assert (info.state, data) == ("complete", b"abc")

    # aborted by another process: the producer's next write loses the lease and the copy
    lease = await claimed(store, "/gone#2")
    await store.append(lease, b"abc", chunks=1)
    other = RedisStore(server.url)
    assert await other.abort("/gone#2", ttl=60)
    await other.close()
    with pytest.raises(LeaseLost):
        await store.append(lease, b"d", chunks=1)
    assert not store._producing
    info, data = await store.read("/gone#2", 0, 10)
    assert info is not None
    assert (info.state, data) == ("aborted", b"abc")

    # Redis failing at `finish`: the copy goes anyway (readers meet the error in Redis)
    lease = await claimed(store, "/gone#3")

    async def failing_eval(*args: object, **kwargs: object) -> object:
        raise StoreError("Redis is down")

    monkeypatch.setattr(store, "_eval", failing_eval)
    with pytest.raises(StoreError):
        await store.finish(lease, "complete", ttl=60, retain=True)
    assert not store._producing


@pytest.mark.anyio
async def test_lease_expiry_fails_the_stream(store: RedisStore) -> None:
    lease = await claimed(store, "/dead#1", lease_seconds=0.2)
    await store.start(lease, 200, ())
    await store.append(lease, b"partial", chunks=1)
    await anyio.sleep(0.3)
    info = await store.info("/dead#1")
    assert info is not None
    assert info.state == "failed"
    info, data = await store.read("/dead#1", 0, 100)
    assert info is not None
    assert info.state == "failed"
    assert data == b"partial"
    with pytest.raises(LeaseLost):
        await store.append(lease, b"more", chunks=1)  # too late: it was reported failed
    again = await store.claim("/dead#1", lease_seconds=5)
    assert isinstance(again, Lease)
    info = await store.info("/dead#1")
    assert info is not None
    assert (info.state, info.offset, info.generation) == ("running", 0, again.token)


@pytest.mark.anyio
async def test_keys_share_a_hash_tag_and_all_expire(server: Server, store: RedisStore) -> None:
    weird = "/x#}{ünï\n" + "k" * 300
    lease = await claimed(store, weird, lease_seconds=2)
    await store.start(lease, 200, ())
    await store.append(lease, b"abc", chunks=1)
    client = Redis.from_url(server.url)
    keys = sorted(await client.keys("*"))
    assert len(keys) == 3
    tags = {k.split(b"{", 1)[1].split(b"}", 1)[0] for k in keys}
    assert len(tags) == 1
    ttls = [await client.pttl(k) for k in keys]
    assert all(0 < t <= 2000 + 300_000 + 60_000 for t in ttls), ttls
    await store.finish(lease, "complete", ttl=0.3, retain=True)
    ttls = [await client.pttl(k) for k in keys]
    assert all(0 < t <= 60_300 for t in ttls), ttls
    info, data = await store.read(weird, 0, 10)
    assert info is not None
    assert info.id == weird
    assert data == b"abc"
    assert [i.id async for i in store.scan()] == [weird]
    await anyio.sleep(0.4)
    assert await store.info(weird) is None
    assert isinstance(await store.claim(weird, lease_seconds=1), Lease)
    await client.aclose()


@pytest.mark.anyio
async def test_purge_expired_and_scan(server: Server) -> None:
    s = RedisStore(server.url, prefix="purge*test")
    for i in range(3):
        lease = await claimed(s, f"/p#{i}")
        await s.finish(lease, "complete", ttl=60 if i else 0.001, retain=True)
    assert sorted([i.id async for i in s.scan()]) == ["/p#1", "/p#2"]
    assert await s.purge_expired() == 0
    for i in (1, 2):
        assert await s.delete(f"/p#{i}")
    assert [i async for i in s.scan()] == []
    await s.close()


@pytest.mark.anyio
async def test_retried_writes_apply_once(store: RedisStore) -> None:
    """redis-py retries a script whose reply was lost: the second run must be a no-op."""
    from durable_asgi.stores.redis import _codec as codec
    from durable_asgi.stores.redis import _scripts as scripts

    lease = await claimed(store, "/retry#1")
    keys = store._keys("/retry#1")
    orphan = codec.ms(store.orphan_ttl)
    big = os.urandom(3 * scripts.MAX_ENTRY + 5)  # stored as 4 entries
    for want, piece in ((0, b"abc"), (3, big)):
        for _ in range(2):
            reply = await store._eval(scripts.APPEND, keys, lease.token, want, orphan, piece, 1)
            assert reply[0] == b"ok"
    store._producing.clear()  # read what Redis holds, not this process's copy of its writes
    info, data = await store.read("/retry#1", 0, 1 << 20)
    assert data == b"abc" + big
    assert info is not None
    assert info.chunks == 2
    orphan = codec.ms(store.orphan_ttl)
    # the same token claiming again (a retried claim) gets its lease back
    reply = await store._eval(scripts.CLAIM, keys, lease.token, -1, orphan, "/retry#1", 5000)
    assert reply[0] == b"lease"
    # an append at an offset the store doesn't have means lost writes: fail, don't complete
    for want in (1, 2, 3 + len(big) - 2):  # (1: a retry's end, but not the last append)
        reply = await store._eval(scripts.APPEND, keys, lease.token, want, orphan, b"zz", 1)
        assert reply[0] == b"lost"
    info = await store.info("/retry#1")
    assert info is not None
    assert info.state == "failed"


async def redis_view(store: RedisStore, sid: str) -> tuple[StreamInfo | None, bytes]:
    """What Redis holds for `sid` (read by another instance: not this process's copy)."""
    other = RedisStore(store._connection.url or "")
    try:
        return await other.read(sid, 0, 1 << 30)
    finally:
        await other.close()


def batch_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The streams of each `BATCH` call the store queues from now on."""
    from durable_asgi.stores.redis import _scripts

    calls: list[int] = []
    real = _scripts.Lanes.enqueue

    def enqueue(self: _scripts.Lanes, script: _scripts.Script, keys: Any, *args: Any) -> Any:
        if script is _scripts.BATCH:
            calls.append(len(keys))  # one per stream
        return real(self, script, keys, *args)

    monkeypatch.setattr(_scripts.Lanes, "enqueue", enqueue)
    return calls


@pytest.mark.anyio
async def test_a_batch_refuses_only_the_write_whose_lease_was_lost(
    server: Server, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One `write_many` is one script call for many streams, yet each write stands alone: a
    stream aborted by another process gets `LeaseLost` (and its local copy goes), the others
    land byte for byte."""
    leases = [await claimed(store, f"/many#{n}") for n in range(20)]
    other = RedisStore(server.url)
    assert await other.abort("/many#7", ttl=60)
    await other.close()
    calls = batch_calls(monkeypatch)
    head = (200, ((b"content-type", b"text/event-stream"),))
    writes = [Write(lease, head if n % 2 else None, b"data: %d\n\n" % n, 1)
              for n, lease in enumerate(leases)]  # fmt: skip
    outcomes = await store.write_many(writes)
    assert calls == [20]
    assert [type(o) for o in outcomes] == [type(None)] * 7 + [LeaseLost] + [type(None)] * 12
    assert "/many#7" not in store._producing
    for n in range(20):
        info, data = await redis_view(store, f"/many#{n}")
        assert info is not None
        if n == 7:
            assert (info.state, data) == ("aborted", b"")
            continue
        assert (info.state, data, info.chunks) == ("running", b"data: %d\n\n" % n, 1)
        assert info.status_code == (200 if n % 2 else None)
        mine = store._producing[f"/many#{n}"].info  # the local copy agrees with Redis
        assert (mine.version, mine.offset, mine.status_code) == (
            info.version,
            info.offset,
            info.status_code,
        )
    forged = Lease("/many#8", "a forged token")
    again = await store.write_many(
        [Write(lease, None, b"more", 1) for lease in (*leases[6:9], forged)]
    )
    assert [type(o) for o in again] == [type(None), LeaseLost, type(None), LeaseLost]
    assert (await redis_view(store, "/many#8"))[1] == b"data: 8\n\nmore"


@pytest.mark.anyio
async def test_a_batch_mixes_heads_split_and_unsplit_appends_in_several_calls(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heads alone, heads with bytes, small appends and appends split at MAX_ENTRY, from more
    streams than one call holds and more bytes than one takes: several calls (of one
    pipeline), every stream's body byte for byte, each stream's offsets checked as with
    `append` (a second flush continues where the first left off)."""
    from durable_asgi.stores.redis import _scripts as scripts

    leases = [await claimed(store, f"/mixed#{n}") for n in range(scripts.MAX_BATCH + 40)]
    big = os.urandom(3 * scripts.MAX_ENTRY + 5)  # stored as 4 entries
    bodies: dict[int, bytes] = dict.fromkeys(range(len(leases)), b"")

    def write(n: int, lease: Lease, round: int) -> Write:
        head = (200 + n % 3, ((b"x-n", b"%d \n" % n),)) if round == 0 and n % 4 else None
        data = big if n % 10 == 3 else b"" if n % 4 == 1 else b"tok %d.%d " % (n, round)
        if round == 0 and head is None and not data:
            data = b"!"
        bodies[n] += data
        return Write(lease, head, data, 1 if data else 0)

    calls = batch_calls(monkeypatch)
    for round in range(2):
        writes = [write(n, lease, round) for n, lease in enumerate(leases)]
        assert await store.write_many(writes) == [None] * len(writes)
    sent = sum(len(w.data) for w in writes)
    assert sent > scripts.BATCH_BYTES  # so the byte budget cut calls too
    assert len(calls) > 2 * 2 and sum(calls) < 2 * len(leases)  # streams with nothing: none
    assert max(calls) <= scripts.MAX_BATCH
    for n in range(len(leases)):
        info, data = await redis_view(store, f"/mixed#{n}")
        assert info is not None
        assert data == bodies[n], n
        assert info.offset == len(bodies[n])
        if n % 4:
            assert (info.status_code, info.headers) == (200 + n % 3, ((b"x-n", b"%d \n" % n),))
        else:
            assert info.status_code is None


@pytest.mark.anyio
async def test_a_batch_sent_twice_appends_once(store: RedisStore) -> None:
    """redis-py resends a pipeline whose replies were lost: a `BATCH` that ran already must
    not append its streams' bytes again (as append.lua, whose check it shares)."""
    from durable_asgi.stores.redis import _codec as codec
    from durable_asgi.stores.redis import _scripts as scripts

    leases = [await claimed(store, f"/twice#{n}") for n in range(3)]
    big = os.urandom(2 * scripts.MAX_ENTRY + 1)
    keys: list[str] = []
    args: list[Any] = [codec.ms(store.orphan_ttl)]
    for lease, data in zip(leases, (b"abc", big, b"z"), strict=True):
        keys.append(codec.key_base(store.prefix, lease.stream_id))
        args.append(codec.batch_entry(0, 1, None, lease.token, b"", data))
    for _ in range(2):
        replies = codec.batch_replies(await store._eval(scripts.BATCH, keys, *args))
        assert [r[0] for r in replies] == [b"ok"] * 3
        assert [int(r[2]) for r in replies] == [3, len(big), 1]
    for lease, data in zip(leases, (b"abc", big, b"z"), strict=True):
        info, got = await redis_view(store, lease.stream_id)
        assert info is not None
        assert (got, info.chunks) == (data, 1)


@pytest.mark.anyio
async def test_a_write_that_fails_in_a_batch_fails_alone(server: Server, store: RedisStore) -> None:
    """A Redis error in one stream's write (here its body key holds a string) fails that write
    with `StoreError`, not the others of its call; a Redis at maxmemory refuses every write
    with `StoreFull`, and none lands."""
    leases = [await claimed(store, f"/fails#{n}") for n in range(5)]
    client = Redis.from_url(server.url)
    try:
        await client.set(store._keys("/fails#2")[1], b"not a stream")
        outcomes = await store.write_many([Write(lease, None, b"abc", 1) for lease in leases])
        assert [type(o) for o in outcomes] == [type(None)] * 2 + [StoreError] + [type(None)] * 2
        assert "WRONGTYPE" in str(outcomes[2])
        for n in (0, 1, 3, 4):
            assert (await redis_view(store, f"/fails#{n}"))[1] == b"abc"
        await client.config_set("maxmemory", 1)
        try:
            ok = [lease for n, lease in enumerate(leases) if n != 2]
            outcomes = await store.write_many([Write(lease, None, b"def", 1) for lease in ok])
        finally:
            await client.config_set("maxmemory", 0)
        assert all(isinstance(o, StoreFull) for o in outcomes), outcomes
        for n in (0, 1, 3, 4):
            assert (await redis_view(store, f"/fails#{n}"))[1] == b"abc"
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_redis_restart_mid_stream_fails_readers() -> None:
    if REDIS_SERVER is None:
        pytest.skip("needs redis-server")
    srv = Server()
    srv.start()
    try:
        producer = RedisStore(srv.url, block_seconds=0.3)
        reader = RedisStore(srv.url, block_seconds=0.3)
        lease = await claimed(producer, "/restart#1")
        await producer.start(lease, 200, ())
        await producer.append(lease, b"before", chunks=1)
        info, data = await reader.read("/restart#1", 0, 100)
        assert info is not None
        assert data == b"before"
        woke = anyio.Event()

        async def wait() -> None:
            await reader.wait(info, 10)
            woke.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait)
            await anyio.sleep(0.1)
            srv.stop()
            with anyio.fail_after(3):
                await woke.wait()  # the tail lost its connection: readers re-read
        t0 = time.perf_counter()
        with pytest.raises(StoreError):
            await reader.read("/restart#1", 6, 100)
        assert time.perf_counter() - t0 < 5
        srv.start()
        assert await reader.read("/restart#1", 6, 100) == (None, b"")
        with pytest.raises(LeaseLost):
            await producer.append(lease, b"after", chunks=1)
        await producer.close()
        await reader.close()
    finally:
        srv.stop()


@pytest.mark.anyio
async def test_unreachable_redis_raises_store_error() -> None:
    s = RedisStore(f"redis://127.0.0.1:{_free_port()}/0")
    t0 = time.perf_counter()
    with pytest.raises(StoreError):
        await s.open()
    with pytest.raises(StoreError):
        await s.claim("/x#1", lease_seconds=1)
    assert time.perf_counter() - t0 < 5
    await s.close()


@pytest.mark.anyio
async def test_passed_client_is_checked_and_not_closed(server: Server) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(Redis.from_url(server.url, decode_responses=True))
    client = Redis.from_url(server.url, protocol=3)
    s = RedisStore(client, block_seconds=0.2)
    lease = await claimed(s, "/resp3#1")
    info = await s.info("/resp3#1")
    assert info is not None

    async def later() -> None:
        await anyio.sleep(0.1)
        await s.append(lease, b"x", chunks=1)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(later)
        await s.wait(info, 2)
    await s.close()
    assert await client.ping()
    await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_trio_is_refused_clearly() -> None:
    s = RedisStore()
    with pytest.raises(ConfigurationError, match="asyncio"):
        await s.info("/x#1")


@pytest.mark.anyio
async def test_close_stops_tails(server: Server, store: RedisStore) -> None:
    s = RedisStore(server.url, block_seconds=0.5)
    lease = await claimed(store, "/close#1")
    info = await s.info("/close#1")
    assert info is not None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(s.wait, info, 10)
        await anyio.sleep(0.1)
        assert s._follower.tails
        await s.close()
    assert not s._follower.tails
    await s.delete(lease.stream_id)  # reopens lazily
    await s.close()


@pytest.mark.anyio
async def test_close_lets_a_call_running_outside_its_lane_finish(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that found its lane idle runs in its caller's task, not the lane's: `close`
    waits for it too before it closes the connection."""
    from durable_asgi.stores.redis._scripts import Script

    s = RedisStore(server.url, block_seconds=0.5)
    await s.open()
    sent, release, closed = anyio.Event(), anyio.Event(), anyio.Event()
    run = Script.run

    async def held(self: Script, *args: Any) -> Any:
        sent.set()
        await release.wait()  # the reply is on its way
        return await run(self, *args)

    monkeypatch.setattr(Script, "run", held)
    results: list[Lease | StreamInfo] = []

    async def claim() -> None:
        results.append(await s.claim(f"/closing#{uuid.uuid4().hex}", lease_seconds=5))

    async def close() -> None:
        await s.close()
        closed.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(claim)
        await sent.wait()
        assert s._lanes._alone
        tasks.start_soon(close)
        await anyio.wait_all_tasks_blocked()
        assert not closed.is_set()  # waiting for the claim
        release.set()
    assert closed.is_set()
    assert len(results) == 1 and isinstance(results[0], Lease)


@pytest.mark.anyio
async def test_tail_stops_after_its_last_waiter(server: Server, store: RedisStore) -> None:
    await claimed(store, "/linger#1")
    s = RedisStore(server.url, block_seconds=0.5)
    info = await s.info("/linger#1")
    assert info is not None
    await s.wait(info, 0.05)
    assert "/linger#1" in s._follower.tails
    await anyio.sleep(2 * s.block_seconds + 0.3)
    assert "/linger#1" not in s._follower.tails
    await s.close()


@pytest.mark.anyio
async def test_two_workers_share_a_live_stream_through_the_middleware(server: Server) -> None:
    from durable_asgi import DurableMiddleware

    from ..support.apps import StreamApp, wait_thread_event
    from ..support.asgi import call

    app = StreamApp(pause_at=10, delay=0.001)
    worker_a = DurableMiddleware(app, store=RedisStore(server.url), poll_interval=5)
    worker_b = DurableMiddleware(app, store=RedisStore(server.url), poll_interval=5)
    key = {"Durable-Key": "e2e-1"}
    results = {}

    async def first() -> None:
        results["a"] = await call(worker_a, "/chat", headers=key, disconnect_after=30)

    async def follower() -> None:
        results["b"] = await call(worker_b, "/chat", headers=key)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await wait_thread_event(app.paused)
        tasks.start_soon(follower)
        await anyio.sleep(0.2)
        t0 = time.perf_counter()
        app.release.set()
    # the follower (other worker, poll_interval 5 s) got the live bytes by wake-ups, not polls
    assert time.perf_counter() - t0 < 3
    assert app.calls == 1
    assert results["a"].disconnected
    b = results["b"]
    assert (b.status, b.complete, b.body) == (200, True, app.body)
    assert b.headers["durable-replay"] == "true"
    resumed = await call(worker_b, "/chat", headers={**key, "Durable-Offset": "25"})
    assert resumed.complete
    assert resumed.body == app.body[25:]
    assert app.calls == 1
    for worker in (worker_a, worker_b):
        assert worker.store is not None
        await worker.store.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Server]]:
    """Three redis-servers joined into a Redis Cluster (no replicas)."""
    cli = shutil.which("redis-cli")
    if REDIS_SERVER is None or cli is None:
        pytest.skip("needs redis-server and redis-cli")
    nodes = [Server() for _ in range(3)]
    workdir = tempfile.TemporaryDirectory()
    for node in nodes:
        node.port = _free_cluster_port()
        node.cwd = workdir.name
        node.extra = ["--cluster-enabled", "yes", "--cluster-config-file", f"n{node.port}.conf"]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while (
            b"cluster_state:ok"
            not in subprocess.run(
                [cli, "-p", str(nodes[0].port), "cluster", "info"], capture_output=True
            ).stdout
        ):
            assert time.monotonic() < deadline, "cluster did not form"
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        workdir.cleanup()


@pytest.mark.anyio
async def test_redis_cluster(cluster: list[Server]) -> None:
    from redis.asyncio import RedisCluster

    clients = [RedisCluster(host="127.0.0.1", port=n.port) for n in cluster[:2]]
    a, b = (RedisStore(c, block_seconds=0.5) for c in clients)
    sids = [f"/cluster#{i}" for i in range(12)] + ["/x#}{", "/ü#1"]
    for sid in sids:
        lease = await claimed(a, sid)
        await a.start(lease, 200, ())
        info = await b.info(sid)
        assert info is not None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(b.wait, info, 5)
            await anyio.sleep(0.02)
            t0 = time.perf_counter()
            await a.append(lease, sid.encode(), chunks=1)
        assert time.perf_counter() - t0 < 0.4
        assert (await b.read(sid, 0, 100))[1] == sid.encode()
        await a.finish(lease, "complete", ttl=60, retain=True)
    nodes = {clients[0].get_node_from_key(a._keys(sid)[0]).name for sid in sids}
    assert len(nodes) > 1  # the streams really are spread over the cluster
    # A flush of streams on several nodes: a write after another (one call's keys share a
    # slot), each write's outcome its own.
    leases = [await claimed(a, f"/flush#{n}") for n in range(8)]
    assert await b.abort("/flush#3", ttl=10)
    outcomes = await a.write_many([Write(lease, (200, ()), b"%d" % n, 1)
                                   for n, lease in enumerate(leases)])  # fmt: skip
    assert [type(o) for o in outcomes] == [type(None)] * 3 + [LeaseLost] + [type(None)] * 4
    for n, lease in enumerate(leases):
        assert (await b.read(lease.stream_id, 0, 10))[1] == (b"" if n == 3 else b"%d" % n)
        assert await b.delete(lease.stream_id)
    results = [await b.claim("/race#1", lease_seconds=5) for _ in range(3)]
    assert sum(isinstance(r, Lease) for r in results) == 1
    assert sorted([i.id async for i in a.scan()]) == sorted([*sids, "/race#1"])
    assert await a.abort("/race#1", ttl=10)
    for sid in sids:
        assert await b.delete(sid)
    for store in (a, b):
        await store.close()
    for client in clients:
        await client.aclose()
