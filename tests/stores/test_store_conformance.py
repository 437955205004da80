"""The store conformance suite: what every `Store` backend must do, run against each of them.

A third-party store passes when it passes this module: add it to `tests.support.stores.BACKENDS`
and teach the `stores` fixture there to build it.
Waits are synchronised with events and deadlines, never sleeps; only lease and TTL expiry,
which are about wall-clock time, sleep past a short deadline.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from durable_asgi.exceptions import ConfigurationError
from durable_asgi.stores import Lease, LeaseLost, Store, StreamInfo, stream_id

from ..support.stores import SHARED_BACKENDS, Ids, StoreFactory

pytestmark = pytest.mark.anyio

HEAD = ((b"content-type", b"text/plain"), (b"x-binary", bytes(range(256))))
LONG = 60.0  # a lease or ttl that doesn't run out during a test
#: Deadline for anything that should happen promptly (generous: CI machines are slow).
PROMPT = 5.0
#: Deadline for a wait() that must return at once, without waiting for anything.
AT_ONCE = 2.0
SHORT = 0.3  # a lease or ttl that does run out; tests sleep `EXPIRED` to see it gone
EXPIRED = SHORT + 0.25


async def claim(store: Store, sid: str, lease_seconds: float = LONG) -> Lease:
    lease = await store.claim(sid, lease_seconds=lease_seconds)
    assert isinstance(lease, Lease), f"{sid!r} was not claimable: {lease}"
    return lease


async def produce(
    store: Store,
    sid: str,
    pieces: list[bytes],
    *,
    state: str | None = "complete",
    retain: bool = True,
    ttl: float = LONG,
) -> Lease:
    """Claim `sid`, store a response of `pieces` and finish it as `state` (None: keep running)."""
    lease = await claim(store, sid)
    await store.start(lease, 200, HEAD)
    for piece in pieces:
        await store.append(lease, piece, chunks=1)
    if state is not None:
        await store.finish(lease, state, ttl=ttl, retain=retain)  # type: ignore[arg-type]
    return lease


async def read_all(store: Store, sid: str, offset: int = 0, limit: int = 256 * 1024) -> bytes:
    """Everything stored from `offset`, read `limit` bytes at a time."""
    parts: list[bytes] = []
    while True:
        info, data = await store.read(sid, offset, limit)
        assert info is not None
        assert len(data) <= limit
        if not data:
            assert offset >= info.offset
            return b"".join(parts)
        parts.append(data)
        offset += len(data)


async def info_of(store: Store, sid: str) -> StreamInfo:
    info = await store.info(sid)
    assert info is not None
    return info


async def lease_is_lost(store: Store, lease: Lease) -> None:
    """Every producer write with `lease` is refused."""
    with pytest.raises(LeaseLost):
        await store.append(lease, b"x", chunks=1)
    with pytest.raises(LeaseLost):
        await store.start(lease, 200, HEAD)
    with pytest.raises(LeaseLost):
        await store.renew(lease, lease_seconds=LONG)
    with pytest.raises(LeaseLost):
        await store.finish(lease, "complete", ttl=LONG, retain=True)


# -- the protocol ----------------------------------------------------------------------------


async def test_store_implements_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


async def test_open_and_close_are_idempotent_and_open_is_lazy(
    stores: StoreFactory, ids: Ids
) -> None:
    lazy = await stores.new(opened=False)
    lease = await claim(lazy, ids())
    await lazy.delete(lease.stream_id)
    await lazy.open()
    await lazy.open()
    await lazy.close()
    await lazy.close()


# -- claim -------------------------------------------------------------------------------------


async def test_claim_creates_a_fresh_running_stream(store: Store, ids: Ids) -> None:
    sid = ids()
    before = time.time()
    lease = await claim(store, sid, lease_seconds=30)
    after = time.time()
    assert lease.stream_id == sid
    info = await info_of(store, sid)
    assert info.id == sid
    assert info.state == "running"
    assert info.in_progress
    assert not info.finished
    assert info.generation == lease.token
    assert (info.offset, info.chunks, info.readers) == (0, 0, 0)
    assert (info.status_code, info.headers, info.expires_at) == (None, None, None)
    assert before - 1 <= info.created_at <= info.updated_at <= after + 1
    assert info.lease_expires_at is not None
    assert before + 29 <= info.lease_expires_at <= after + 31
    assert info.retain


async def test_claim_of_a_running_stream_returns_its_info(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await claim(store, sid)
    await store.start(lease, 201, HEAD)
    other = await store.claim(sid, lease_seconds=LONG)
    assert isinstance(other, StreamInfo)
    assert other.generation == lease.token
    assert other.state == "running"
    assert other.status_code == 201


@pytest.mark.parametrize("end", ["complete", "aborted"])
async def test_claim_with_replace_takes_over_finished_but_not_running_streams(
    store: Store, ids: Ids, end: str
) -> None:
    sid = ids()
    old = await produce(store, sid, [b"first turn"], state=end)
    kept = await store.claim(sid, lease_seconds=LONG)
    assert isinstance(kept, StreamInfo)  # without replace a finished stream is kept
    new = await store.claim(sid, lease_seconds=LONG, replace=True)
    assert isinstance(new, Lease)
    assert new.token != old.token
    fresh = await info_of(store, sid)
    assert (fresh.state, fresh.offset) == ("running", 0)
    running = await store.claim(sid, lease_seconds=LONG, replace=True)
    assert isinstance(running, StreamInfo)
    assert running.generation == new.token


async def test_exactly_one_of_many_concurrent_claims_wins(store: Store, ids: Ids) -> None:
    sid = ids()
    go = anyio.Event()
    results: list[Lease | StreamInfo] = []

    async def contender() -> None:
        await go.wait()
        results.append(await store.claim(sid, lease_seconds=LONG))

    with anyio.fail_after(PROMPT * 4):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(contender)
            await anyio.wait_all_tasks_blocked()
            go.set()
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(results) == 50
    assert len(leases) == 1
    assert all(r.generation == leases[0].token for r in results if isinstance(r, StreamInfo))


@pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)
async def test_concurrent_claims_across_instances_of_a_shared_store(
    stores: StoreFactory, ids: Ids
) -> None:
    instances = [await stores.new() for _ in range(3)]
    sids = [ids() for _ in range(10)]
    winners: dict[str, int] = {}

    async def contender(instance: Store, sid: str) -> None:
        if isinstance(await instance.claim(sid, lease_seconds=LONG), Lease):
            winners[sid] = winners.get(sid, 0) + 1

    with anyio.fail_after(PROMPT * 4):
        async with anyio.create_task_group() as tg:
            for sid in sids:
                for instance in instances:
                    for _ in range(4):
                        tg.start_soon(contender, instance, sid)
    assert winners == dict.fromkeys(sids, 1)


# -- writing and reading -----------------------------------------------------------------------


async def test_start_records_the_head(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await claim(store, sid)
    before = await info_of(store, sid)
    await store.start(lease, 203, HEAD)
    info = await info_of(store, sid)
    assert info.status_code == 203
    assert info.headers == HEAD
    assert info.version != before.version


async def test_append_counts_bytes_chunks_and_versions(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await claim(store, sid)
    await store.start(lease, 200, HEAD)
    versions = [(await info_of(store, sid)).version]
    for data, chunks in [(b"abc", 1), (b"", 2), (b"defgh", 3), (b"i", 1)]:
        await store.append(lease, data, chunks=chunks)
        info = await info_of(store, sid)
        versions.append(info.version)
    assert (info.offset, info.chunks) == (9, 7)
    assert len(set(versions)) == len(versions), "every append must change the version"
    assert info.updated_at >= info.created_at
    await store.append(lease, b"", chunks=0)  # a no-op, but still fenced
    assert (await info_of(store, sid)).offset == 9


async def test_read_from_any_offset_with_any_limit(store: Store, ids: Ids) -> None:
    sid = ids()
    pieces = [b"a", b"bcdefghij", b"k", b"lmnopqrstuvwxy", b"z" * 37, b"0123456789"]
    body = b"".join(pieces)
    await produce(store, sid, pieces, state=None)
    for offset in range(len(body) + 2):  # every segment boundary and every mid-segment offset
        for limit in (1, 2, 3, 7, 16, 1000):
            info, data = await store.read(sid, offset, limit)
            assert info is not None
            assert info.offset == len(body)
            assert data == body[offset : offset + limit], (offset, limit)
    info, data = await store.read(sid, 5, 0)
    assert info is not None
    assert data == b""
    assert await store.read(ids(), 0, 10) == (None, b"")


async def test_read_returns_a_consistent_snapshot_while_appending(store: Store, ids: Ids) -> None:
    sid = ids()
    rng = random.Random(7)
    pieces = [bytes([i % 251]) * rng.randint(1, 300) for i in range(300)]
    body = b"".join(pieces)
    ends = [0]
    for piece in pieces:
        ends.append(ends[-1] + len(piece))
    lease = await claim(store, sid)
    await store.start(lease, 200, HEAD)
    done = anyio.Event()

    async def producer() -> None:
        for piece in pieces:
            await store.append(lease, piece, chunks=1)
            await anyio.lowlevel.checkpoint()
        await store.finish(lease, "complete", ttl=LONG, retain=True)
        done.set()

    async def reader(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            offset = rng.randint(0, len(body))
            info, data = await store.read(sid, offset, rng.choice([1, 50, 4096, 1 << 20]))
            assert info is not None
            # The snapshot's counters belong together and cover the bytes returned with them.
            assert info.offset == ends[info.chunks]
            assert offset + len(data) <= max(offset, info.offset)
            assert data == body[offset : offset + len(data)]
            if info.finished:
                assert info.offset == len(body)
                return
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(PROMPT * 6):
        async with anyio.create_task_group() as tg:
            for seed in range(3):
                tg.start_soon(reader, seed)
            tg.start_soon(producer)
    assert done.is_set()
    assert await read_all(store, sid) == body


async def test_binary_bodies_round_trip(store: Store, ids: Ids) -> None:
    every_byte = bytes(range(256))
    whole, bytewise = ids(), ids()
    await produce(store, whole, [every_byte, every_byte[::-1]])
    await produce(store, bytewise, [bytes([b]) for b in every_byte])
    assert await read_all(store, whole) == every_byte + every_byte[::-1]
    assert await read_all(store, bytewise) == every_byte
    assert await read_all(store, bytewise, offset=200, limit=3) == every_byte[200:]
    assert (await info_of(store, whole)).headers == HEAD


async def test_a_large_body_reads_back_byte_for_byte(store: Store, ids: Ids) -> None:
    sid = ids()
    rng = random.Random(10)
    pieces = [rng.randbytes(3 << 20)]  # one append larger than any sane segment size
    total = len(pieces[0])
    while total < (10 << 20) + 12345:
        pieces.append(rng.randbytes(rng.choice([1, 17, 1000, 8192, 65536, 200_000])))
        total += len(pieces[-1])
    body = b"".join(pieces)
    with anyio.fail_after(60):
        await produce(store, sid, pieces)
        info = await info_of(store, sid)
        assert (info.offset, info.chunks) == (len(body), len(pieces))
        for offset in (0, 1, 65_537, (3 << 20) - 1, 5_000_001, len(body) - 1, len(body)):
            assert await read_all(store, sid, offset) == body[offset:], offset
        _, data = await store.read(sid, 1_000_003, 7)
        assert data == body[1_000_003:1_000_010]


async def test_stream_ids_of_any_key_and_owner_are_kept_apart(store: Store, ids: Ids) -> None:
    ns = ids.namespace
    keyed = {
        "plain": ids("42"),
        "long": ids("k" * 1000),
        "nonprintable": ids("a\x00b\n\x7f\u2028"),
        "unicode": ids("ключ"),
        "alice": ids("shared", owner="alice"),
        "bob": ids("shared", owner="bob"),
        "empty-owner": ids("shared", owner=""),
        "hash-in-namespace": stream_id(ns + "#x", "k"),
    }
    ids.made.append(keyed["hash-in-namespace"])
    assert len(set(keyed.values())) == len(keyed)
    for name, sid in keyed.items():
        assert sid.isprintable()
        assert len(sid) <= 200
        assert sid == f"{ns}#42" or sid.startswith("sha256:"), name
        await produce(store, sid, [name.encode(), b"|", sid.encode()])
    for name, sid in keyed.items():
        assert await read_all(store, sid) == f"{name}|{sid}".encode()
        assert await store.delete(sid)
    for sid in keyed.values():
        assert await store.info(sid) is None


# -- wait --------------------------------------------------------------------------------------

CHANGES = ["start", "append", "chunk-only", "finish", "abort", "delete", "replace"]


async def make_change(store: Store, lease: Lease, change: str) -> None:
    sid = lease.stream_id
    if change == "start":
        await store.start(lease, 200, HEAD)
    elif change == "append":
        await store.append(lease, b"more", chunks=1)
    elif change == "chunk-only":
        await store.append(lease, b"", chunks=1)
    elif change == "finish":
        await store.finish(lease, "complete", ttl=LONG, retain=True)
    elif change == "abort":
        assert await store.abort(sid, ttl=LONG)
    elif change == "delete":
        assert await store.delete(sid)
    elif change == "replace":  # deleted and claimed again: a new generation
        assert await store.delete(sid)
        await claim(store, sid)
    else:
        raise AssertionError(change)


@pytest.mark.parametrize("change", CHANGES)
async def test_wait_returns_at_once_when_the_stream_changed_before_the_call(
    store: Store, ids: Ids, change: str
) -> None:
    lease = await claim(store, ids())
    info = await info_of(store, lease.stream_id)
    await make_change(store, lease, change)
    with anyio.fail_after(AT_ONCE):
        await store.wait(info, LONG)


@pytest.mark.parametrize("change", CHANGES)
async def test_wait_wakes_up_on_a_change(store: Store, ids: Ids, change: str) -> None:
    lease = await claim(store, ids())
    info = await info_of(store, lease.stream_id)
    woken = anyio.Event()

    async def waiter() -> None:
        await store.wait(info, LONG)
        woken.set()

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not woken.is_set()
            await make_change(store, lease, change)
            await woken.wait()


async def test_wait_wakes_every_waiter(store: Store, ids: Ids) -> None:
    lease = await claim(store, ids())
    info = await info_of(store, lease.stream_id)
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await store.wait(info, LONG)
        woken.append(n)

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
            await store.append(lease, b"x", chunks=1)
    assert sorted(woken) == list(range(10))


async def test_wait_times_out_without_a_change(store: Store, ids: Ids) -> None:
    lease = await claim(store, ids())
    info = await info_of(store, lease.stream_id)
    with anyio.fail_after(PROMPT):
        await store.wait(info, 0.05)
    await store.append(lease, b"x", chunks=1)  # the store is still fine afterwards


@pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)
async def test_wait_wakes_up_on_a_change_made_by_another_instance(
    stores: StoreFactory, ids: Ids
) -> None:
    producer, follower = await stores.new(), await stores.new()
    lease = await claim(producer, ids())
    info = await info_of(follower, lease.stream_id)
    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.wait, info, LONG)
            await anyio.wait_all_tasks_blocked()
            await producer.append(lease, b"hello", chunks=1)
    _, data = await follower.read(lease.stream_id, 0, 100)
    assert data == b"hello"


async def test_readers_follow_many_live_streams(store: Store, ids: Ids) -> None:
    """Many producers and tailing readers at once, as the engine uses a store."""
    streams = {ids(): [f"{n}:{i};".encode() for i in range(30)] for n in range(15)}
    got: dict[str, bytes] = {}

    async def producer(sid: str, lease: Lease) -> None:
        for piece in streams[sid]:
            await store.append(lease, piece, chunks=1)
            await anyio.lowlevel.checkpoint()
        await store.finish(lease, "complete", ttl=LONG, retain=True)

    async def tail(sid: str) -> None:
        offset, parts = 0, list[bytes]()
        while True:
            info, data = await store.read(sid, offset, 64)
            assert info is not None
            if data:
                parts.append(data)
                offset += len(data)
            elif info.finished:
                break
            else:
                await store.wait(info, LONG)
        got[sid] = b"".join(parts)

    with anyio.fail_after(PROMPT * 4):
        async with anyio.create_task_group() as tg:
            for sid in streams:
                lease = await claim(store, sid)
                await store.start(lease, 200, HEAD)
                tg.start_soon(tail, sid)
                tg.start_soon(tail, sid)
                tg.start_soon(producer, sid, lease)
    assert got == {sid: b"".join(pieces) for sid, pieces in streams.items()}


# -- finishing and expiry ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["complete", "failed", "aborted"])
@pytest.mark.parametrize("retain", [True, False], ids=["retained", "not-retained"])
async def test_finish(store: Store, ids: Ids, state: str, retain: bool) -> None:
    sid = ids()
    before = time.time()
    lease = await produce(store, sid, [b"body"], state=state, retain=retain, ttl=100)
    info = await info_of(store, sid)
    assert info.state == state
    assert info.finished
    assert not info.in_progress
    assert info.lease_expires_at is None
    assert info.expires_at is not None
    assert before + 99 <= info.expires_at <= time.time() + 101
    assert info.retain is retain
    assert await read_all(store, sid) == b"body"
    await lease_is_lost(store, lease)
    assert not await store.abort(sid, ttl=LONG)

    again = await store.claim(sid, lease_seconds=LONG)
    if state == "failed" or not retain:  # claimable: the next request runs the handler again
        assert isinstance(again, Lease)
        assert again.token != lease.token
        fresh = await info_of(store, sid)
        assert (fresh.state, fresh.offset, fresh.generation) == ("running", 0, again.token)
        read_info, data = await store.read(sid, 0, 10)
        assert read_info is not None
        assert (read_info.generation, read_info.offset, data) == (again.token, 0, b"")
    else:
        assert isinstance(again, StreamInfo)
        assert again.generation == lease.token


@pytest.mark.parametrize("end", ["finish", "abort"])
async def test_finished_streams_expire_after_their_ttl(store: Store, ids: Ids, end: str) -> None:
    sid, keeper = ids(), ids()
    lease = await produce(store, sid, [b"gone soon"], state=None)
    if end == "finish":
        await store.finish(lease, "complete", ttl=SHORT, retain=True)
    else:
        assert await store.abort(sid, ttl=SHORT)
    await produce(store, keeper, [b"kept"])
    assert (await info_of(store, sid)).finished
    await anyio.sleep(EXPIRED)
    assert await store.info(sid) is None
    assert await store.read(sid, 0, 100) == (None, b"")
    assert isinstance(await store.claim(sid, lease_seconds=LONG), Lease)
    assert await read_all(store, keeper) == b"kept"


async def test_scan_omits_expired_streams(store: Store, ids: Ids) -> None:
    sid, keeper = ids(), ids()
    await produce(store, sid, [b"x"], ttl=SHORT)
    await produce(store, keeper, [b"y"])
    await anyio.sleep(EXPIRED)
    assert [info.id async for info in store.scan() if info.id in (sid, keeper)] == [keeper]


async def test_purge_expired_removes_only_expired_streams(store: Store, ids: Ids) -> None:
    expiring = [ids(), ids()]
    kept = [ids(), ids()]
    for sid in expiring:
        await produce(store, sid, [b"x" * 100], ttl=SHORT)
    await produce(store, kept[0], [b"kept"])
    await produce(store, kept[1], [b"running"], state=None)
    await anyio.sleep(EXPIRED)
    removed = await store.purge_expired()
    # A store whose backend expires keys itself (Redis) may have nothing left to remove.
    assert 0 <= removed <= len(expiring)
    assert await store.purge_expired() == 0
    for sid in expiring:
        assert await store.info(sid) is None
    assert await read_all(store, kept[0]) == b"kept"
    assert (await info_of(store, kept[1])).state == "running"


# -- abort, delete, leases ---------------------------------------------------------------------


async def test_abort_stops_the_producer_and_keeps_the_bytes(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await produce(store, sid, [b"partial ", b"answer"], state=None)
    before = time.time()
    assert await store.abort(sid, ttl=100)
    info = await info_of(store, sid)
    assert info.state == "aborted"
    assert info.lease_expires_at is None
    assert info.expires_at is not None
    assert before + 99 <= info.expires_at <= time.time() + 101
    assert await read_all(store, sid) == b"partial answer"
    await lease_is_lost(store, lease)
    assert not await store.abort(sid, ttl=100)  # idempotent
    assert (await info_of(store, sid)).state == "aborted"
    assert isinstance(await store.claim(sid, lease_seconds=LONG), StreamInfo)  # kept
    assert not await store.abort(ids(), ttl=100)  # absent


async def test_delete_removes_the_stream_and_revokes_its_lease(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await produce(store, sid, [b"data"], state=None)
    assert await store.delete(sid)
    assert await store.info(sid) is None
    assert await store.read(sid, 0, 100) == (None, b"")
    await lease_is_lost(store, lease)
    assert not await store.delete(sid)  # idempotent
    assert not await store.abort(sid, ttl=LONG)
    fresh = await claim(store, sid)
    assert fresh.token != lease.token
    assert (await info_of(store, sid)).offset == 0
    await lease_is_lost(store, lease)  # still fenced off from the new generation
    await store.append(fresh, b"new", chunks=1)
    assert await read_all(store, sid) == b"new"
    finished = ids()
    await produce(store, finished, [b"done"])
    assert await store.delete(finished)
    assert not await store.delete(ids())


async def test_renew_extends_the_lease(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await claim(store, sid, lease_seconds=SHORT)
    first = (await info_of(store, sid)).lease_expires_at
    await store.renew(lease, lease_seconds=LONG)
    renewed = (await info_of(store, sid)).lease_expires_at
    assert first is not None
    assert renewed is not None
    assert renewed > first
    await anyio.sleep(EXPIRED)
    assert (await info_of(store, sid)).state == "running"
    assert isinstance(await store.claim(sid, lease_seconds=LONG), StreamInfo)


async def test_a_dead_producers_lease_expires_and_the_stream_is_taken_over(
    store: Store, ids: Ids
) -> None:
    sid = ids()
    dead = await claim(store, sid, lease_seconds=SHORT)
    await store.start(dead, 200, HEAD)
    await store.append(dead, b"half an ans", chunks=1)
    assert (await info_of(store, sid)).state == "running"
    await anyio.sleep(EXPIRED)  # the producer never renews: its process died

    info = await info_of(store, sid)
    assert info.state == "failed"
    assert info.finished
    assert info.lease_expires_at is None
    read_info, data = await store.read(sid, 0, 100)
    assert read_info is not None
    assert read_info.state == "failed"
    assert data == b"half an ans"
    assert [s.state async for s in store.scan() if s.id == sid] == ["failed"]
    assert not await store.abort(sid, ttl=LONG)  # it is not running any more

    successor = await claim(store, sid)
    assert successor.token != dead.token
    fresh = await info_of(store, sid)
    assert (fresh.state, fresh.generation, fresh.offset) == ("running", successor.token, 0)
    await lease_is_lost(store, dead)  # fencing: the old producer can't write into the new run
    await store.start(successor, 200, HEAD)
    await store.append(successor, b"a whole answer", chunks=1)
    await store.finish(successor, "complete", ttl=LONG, retain=True)
    assert await read_all(store, sid) == b"a whole answer"


async def test_a_lease_that_ran_out_is_lost_even_before_a_takeover(store: Store, ids: Ids) -> None:
    sid = ids()
    late = await claim(store, sid, lease_seconds=SHORT)
    await store.start(late, 200, HEAD)
    await store.append(late, b"half", chunks=1)
    await anyio.sleep(EXPIRED)  # the producer is alive but didn't renew in time
    # Its readers were told the stream failed: the producer can't go on writing behind that.
    await lease_is_lost(store, late)
    info = await info_of(store, sid)
    assert (info.state, info.offset, info.chunks) == ("failed", 4, 1)
    assert await read_all(store, sid) == b"half"


async def test_a_forged_or_misdirected_lease_is_refused(store: Store, ids: Ids) -> None:
    sid, other = ids(), ids()
    lease = await claim(store, sid)
    await claim(store, other)
    await lease_is_lost(store, Lease(sid, "not-the-token"))
    await lease_is_lost(store, Lease(other, lease.token))
    await lease_is_lost(store, Lease(ids(), lease.token))
    await store.append(lease, b"still mine", chunks=1)
    assert await read_all(store, sid) == b"still mine"


async def test_cancelled_appends_are_all_or_nothing(store: Store, ids: Ids) -> None:
    sid = ids()
    lease = await claim(store, sid)
    pieces = [b"<%d:%s>" % (i, b"x" * i) for i in range(30)]
    acknowledged: list[int] = []

    async def append(i: int) -> None:
        await store.append(lease, pieces[i], chunks=1)
        acknowledged.append(i)

    for i in range(len(pieces)):
        async with anyio.create_task_group() as tg:
            tg.start_soon(append, i)
            for _ in range(i % 6):  # cancel at different points of the write
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    await store.append(lease, b"<end>", chunks=1)
    body = await read_all(store, sid)
    # Whole pieces, in order, every acknowledged one among them, and nothing else.
    stored = [int(n) for n in re.findall(rb"<(\d+):x*>", body)]
    assert body == b"".join(pieces[i] for i in stored) + b"<end>"
    assert stored == sorted(set(stored))
    assert set(acknowledged) <= set(stored)
    assert (await info_of(store, sid)).chunks == len(stored) + 1


# -- readers, scan -----------------------------------------------------------------------------


async def test_attach_counts_readers(store: Store, ids: Ids) -> None:
    sid = ids()
    await claim(store, sid)
    for delta, expected in [(1, 1), (1, 2), (-1, 1), (-1, 0), (-1, 0), (1, 1)]:
        await store.attach(sid, delta)
        assert (await info_of(store, sid)).readers == expected
    await store.attach(ids(), 1)  # an absent stream: nothing to count, no error


async def test_scan_lists_every_stream(store: Store, ids: Ids) -> None:
    expected: dict[str, str] = {}
    for n in range(300):  # more than a page of any sane implementation
        sid = ids(f"s{n}")
        state = ["running", "complete", "aborted"][n % 3]
        lease = await claim(store, sid)
        if state == "complete":
            await store.finish(lease, "complete", ttl=LONG, retain=True)
        elif state == "aborted":
            await store.abort(sid, ttl=LONG)
        expected[sid] = state
    seen = {info.id: info.state async for info in store.scan() if info.id in expected}
    assert seen == expected


# -- backend-specific: SQLite ------------------------------------------------------------------


def record_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[Any]:
    """From now on, record the first argument of every call of the async method `name`."""
    calls: list[Any] = []
    real = getattr(obj, name)

    async def recording(first: Any, *args: Any) -> Any:
        calls.append(first)
        return await real(first, *args)

    monkeypatch.setattr(obj, name, recording)
    return calls


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_sqlite_store_refuses_trio_with_a_clear_error(tmp_path: Path) -> None:
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db")
    with pytest.raises(ConfigurationError, match="asyncio"):
        await store.open()
    with pytest.raises(ConfigurationError, match="MemoryStore"):
        await store.info("/x#1")
    await store.close()


def test_sqlite_store_refuses_an_in_memory_database() -> None:
    from durable_asgi.stores.sqlite import SQLiteStore

    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore(":memory:")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_store_wakes_readers_in_its_process_without_polling(
    tmp_path: Path,
) -> None:
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db", poll_interval=3600)
    try:
        lease = await claim(store, "/s#1")
        info = await info_of(store, "/s#1")
        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.wait, info, LONG)
                await anyio.wait_all_tasks_blocked()
                await store.append(lease, b"x", chunks=1)
    finally:
        await store.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_claim_of_a_live_stream_of_this_process_needs_no_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joining a stream this process is writing answers from memory while its snapshot is
    fresh (younger than poll_interval); a stale one asks the file, and sees what another
    process did to it."""
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db", poll_interval=0.2)
    other = SQLiteStore(tmp_path / "durable.db")
    try:
        lease = await claim(store, "/live#1")
        await store.start(lease, 200, ())
        await store.append(lease, b"hello", chunks=1)
        transactions = record_calls(monkeypatch, store._db, "transaction")
        joined = await store.claim("/live#1", lease_seconds=LONG)
        assert isinstance(joined, StreamInfo)
        assert (joined.state, joined.offset, joined.generation) == ("running", 5, lease.token)
        assert len(transactions) == 0
        assert await other.abort("/live#1", ttl=LONG)
        await anyio.sleep(0.25)  # older than poll_interval: the file decides
        replayed = await store.claim("/live#1", lease_seconds=LONG)
        assert isinstance(replayed, StreamInfo)
        assert replayed.state == "aborted"
        assert len(transactions) == 1
    finally:
        await store.close()
        await other.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_claim_trusts_an_old_copy_while_no_other_process_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy not written for longer than poll_interval still answers a claim while every
    batch since shows no other process committed (``PRAGMA data_version``); once one has, the
    file decides."""
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db", poll_interval=0.2)
    other = SQLiteStore(tmp_path / "durable.db")
    try:
        idle = await claim(store, "/idle#1")
        await store.start(idle, 200, ())
        busy = await claim(store, "/busy#1")
        await anyio.sleep(0.25)  # the idle stream's own snapshot is now older than that
        transactions = record_calls(monkeypatch, store._db, "transaction")
        await store.append(busy, b"x", chunks=1)  # a batch: nobody else has committed
        joined = await store.claim("/idle#1", lease_seconds=LONG)
        assert isinstance(joined, StreamInfo) and joined.state == "running"
        assert len(transactions) == 1  # the batch; the claim needed none
        assert await other.abort("/idle#1", ttl=LONG)
        await store.append(busy, b"y", chunks=1)  # this batch sees the other commit
        replayed = await store.claim("/idle#1", lease_seconds=LONG)
        assert isinstance(replayed, StreamInfo) and replayed.state == "aborted"
        assert len(transactions) == 3
    finally:
        await store.close()
        await other.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_claims_share_the_batch_transaction_with_every_streams_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of claims (and the writes queued with them) commits in a few transactions, not
    one per claim — so a worker taking many requests at once doesn't queue its renewals
    behind a transaction per request — and claims of one stream in one batch still elect one
    producer."""
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db")
    try:
        busy = await claim(store, "/busy#1")
        transactions = record_calls(monkeypatch, store._db, "transaction")
        sids = [f"/burst#{i}" for i in range(100)] + ["/same#1"] * 10
        results = await asyncio.gather(
            store.append(busy, b"x", chunks=1),
            store.renew(busy, lease_seconds=LONG),
            *(store.claim(sid, lease_seconds=LONG) for sid in sids),
        )
        claims = results[2:]
        assert all(isinstance(r, Lease) for r in claims[:100])
        same = claims[100:]
        assert sum(isinstance(r, Lease) for r in same) == 1
        winner = next(r for r in same if isinstance(r, Lease))
        assert all(r.generation == winner.token for r in same if isinstance(r, StreamInfo))
        assert len(transactions) <= 3, len(transactions)
        for sid in sids[:100]:
            assert (await info_of(store, sid)).state == "running"
        assert (await store.read("/busy#1", 0, 10))[1] == b"x"
    finally:
        await store.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_lease_runs_from_the_commit_not_from_the_request(tmp_path: Path) -> None:
    """A claim or renewal queued behind a slow writer gets its full lease from when it
    commits: a busy worker doesn't lose a stream it is renewing on time."""
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db")
    try:
        lease = await claim(store, "/slow#1")
        writer = store._db._write_lock
        await writer.acquire()  # the writer is busy for a while
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(store.renew, lease, lease_seconds=1.0))
            tg.start_soon(functools.partial(store.claim, "/late#1", lease_seconds=1.0))
            await anyio.sleep(0.5)
            released = time.time()
            writer.release()
        for sid in ("/slow#1", "/late#1"):
            rows = await store._db.query(
                "SELECT lease_expires_at FROM streams WHERE id = :id", {"id": sid}
            )
            assert rows[0]["lease_expires_at"] >= released + 1.0 - 0.01
    finally:
        await store.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_readers_of_a_stream_this_process_produces_query_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the claim to the end, the producer's process reads its stream from memory: no
    query, no poller; readers at the end learn the outcome from memory for poll_interval,
    readers behind it (and anyone after that) read the file."""
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db", poll_interval=0.2)
    other = SQLiteStore(tmp_path / "durable.db")
    queries = record_calls(monkeypatch, store._db, "query")
    try:
        lease = await claim(store, "/own#1")
        info, data = await store.read("/own#1", 0, 100)
        assert info is not None and (info.state, info.offset, data) == ("running", 0, b"")
        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.wait, info, LONG)
                await anyio.wait_all_tasks_blocked()
                assert store._poller.task is None  # its changes come through this process
                await store.start(lease, 200, ())
        await store.append(lease, b"hello", chunks=1)
        assert (await store.read("/own#1", 0, 100))[1] == b"hello"
        await store.finish(lease, "complete", ttl=LONG, retain=True)
        end, data = await store.read("/own#1", 5, 100)
        assert end is not None and (end.state, end.offset, data) == ("complete", 5, b"")
        assert queries == []
        assert (await store.read("/own#1", 0, 100))[1] == b"hello"  # behind the end: the file
        assert len(queries) == 1
        assert await other.delete("/own#1")
        await anyio.sleep(0.25)  # older than poll_interval: the file decides
        assert await store.info("/own#1") is None
    finally:
        await store.close()
        await other.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_lost_lease_wakes_readers_in_the_producers_process(tmp_path: Path) -> None:
    """Another process aborts an idle stream: the producer meets it at its renewal, and its
    readers here wake with it (they wait unpolled)."""
    from durable_asgi.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db", poll_interval=3600)
    other = SQLiteStore(tmp_path / "durable.db")
    try:
        lease = await claim(store, "/idle#1")
        info = await info_of(store, "/idle#1")
        assert await other.abort("/idle#1", ttl=LONG)
        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.wait, info, LONG)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(LeaseLost):
                    await store.renew(lease, lease_seconds=LONG)
        assert (await info_of(store, "/idle#1")).state == "aborted"
    finally:
        await store.close()
        await other.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_store_survives_a_restart_in_wal_mode(tmp_path: Path) -> None:
    import sqlite3

    from durable_asgi.stores.sqlite import SQLiteStore

    path = tmp_path / "durable.db"
    store = SQLiteStore(path)
    await produce(store, "/s#1", [b"kept ", b"across restarts"])
    await store.close()
    reopened = SQLiteStore(path)
    try:
        assert await read_all(reopened, "/s#1") == b"kept across restarts"
    finally:
        await reopened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_connections_keep_a_small_page_cache(tmp_path: Path) -> None:
    # SQLite's default cache (2 MB per connection) fills with written pages and stays
    # allocated in the connection's thread for the life of the process.
    from durable_asgi.stores.sqlite import PAGE_CACHE_KIB, SQLiteStore

    store = SQLiteStore(tmp_path / "durable.db")
    try:
        await produce(store, "/s#1", [b"x" * 100_000] * 20)
        for conn in (store._db.writer, store._db.reader):
            assert conn is not None
            rows = await conn.fetchall("PRAGMA cache_size")
            assert [tuple(row) for row in rows] == [(-PAGE_CACHE_KIB,)]
    finally:
        await store.close()


_CLAIMER = """
import asyncio, sys
from durable_asgi.stores import Lease
from durable_asgi.stores.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    sys.stdin.readline()  # start together
    won = []
    for n in range(40):
        if isinstance(await store.claim(f"/race#{n}", lease_seconds=60), Lease):
            won.append(n)
    await store.close()
    print(" ".join(map(str, won)))

asyncio.run(main())
"""


def test_sqlite_claims_are_atomic_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "durable.db")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_CLAIMER), path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate("go\n", timeout=60)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    won = sorted(int(n) for out in outputs for n in out.split())
    assert won == list(range(40))
