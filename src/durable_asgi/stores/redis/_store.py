"""`RedisStore` itself: claims, fenced writes, reads and waits, and the local copy of the
streams this process produces (see the package docstring for the design)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from .._base import (
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    LocalCopy,
    Notifier,
    StoreError,
    StoreStats,
    StreamInfo,
    Write,
    count_streams,
    effective,
    evolve,
    join,
    new_token,
    running_copy,
    wait_own,
    write_each,
)
from .._batch import Waiter
from . import _scripts as scripts
from ._codec import (
    DATA,
    batch_entry,
    batch_replies,
    glob_escape,
    key_base,
    key_names,
    ms,
    pack_headers,
    snapshot,
)
from ._connection import Connection
from ._follower import Follower
from ._scripts import BATCH_BYTES, LEASES, MAX_BATCH, OTHERS, WRITES, Lanes, Script

__all__ = ["LOCAL_BYTES", "MAX_READ", "RedisStore"]

#: Most bytes one read script returns; longer reads take several round trips (keeps each
#: script short so it doesn't stall Redis).
MAX_READ = 4 << 20
#: Newest body bytes of each stream this process produces kept in memory for local readers.
LOCAL_BYTES = 64 << 10

#: What `write_many` does with a write's reply (records it in the local copy).
Done = Callable[[list[Any]], None]


class RedisStore:
    """Streams kept in Redis, shared by every worker on every machine that uses the same server.

    Args:
        url_or_client: a ``redis://`` / ``rediss://`` / ``unix://`` URL (the store opens its own
            client and closes it in `close`), or a ``redis.asyncio.Redis`` or
            ``redis.asyncio.RedisCluster`` client you own (not closed by the store; it must have
            ``decode_responses=False``).
        prefix: the first part of every key, so several apps can share one database.
        block_seconds: how long one ``XREAD BLOCK`` waits for changes made by other processes;
            kept below the client's ``socket_timeout``.
        orphan_ttl: seconds a running stream's data is kept after its lease ran out (its
            producer died), so its readers see it ``failed`` rather than gone.
        max_connections: most connections the store's own client opens for commands (URL
            form); more concurrent calls wait for a free one (up to 10 s, then `StoreError`).

    Example::

        app.add_middleware(DurableMiddleware, store=RedisStore("redis://redis:6379/0"))

    Needs ``pip install "durable-asgi[redis]"`` and Redis ≥ 5 (or Valkey). Runs on asyncio only,
    because redis-py does: under trio use `SQLiteStore` or `MemoryStore`. On Redis Cluster pass
    a ``RedisCluster`` client: every key of a stream shares one hash tag, so each script runs
    on one node.

    Each stream that readers in this process are waiting on holds one connection for its
    ``XREAD BLOCK`` while they wait. With a URL these come from a pool of their own; with your
    own client they come from its pool, so size its ``max_connections`` for them too.
    """

    def __init__(
        self,
        url_or_client: str | Redis | RedisCluster = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "durable",
        block_seconds: float = 1.0,
        orphan_ttl: float = 300.0,
        max_connections: int = 64,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r} must not contain braces (Redis hash tags)")
        if not block_seconds > 0:
            raise ValueError("block_seconds must be positive")
        self.prefix = prefix
        self.orphan_ttl = orphan_ttl
        self._connection = Connection(
            url_or_client, block_seconds=block_seconds, max_connections=max_connections
        )
        self._lanes = Lanes(self._connection)
        self._notifier = Notifier()
        self._follower = Follower(self._connection, self._notifier)
        #: Body offset each of this process's leases expects next (by token); see append.lua.
        self._ends: dict[str, int] = {}
        #: Streams this process produces, as of their last write (see `LocalCopy`).
        self._producing: dict[str, LocalCopy] = {}

    @property
    def block_seconds(self) -> float:
        """How long one ``XREAD BLOCK`` waits for other processes' changes."""
        return self._connection.block_seconds

    @property
    def max_connections(self) -> int:
        """Most connections the store's own client opens for commands."""
        return self._connection.max_connections

    def __repr__(self) -> str:
        connection = self._connection
        where = connection.url if connection.url is not None else repr(connection.client)
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    def _keys(self, stream_id: str) -> tuple[str, str, str]:
        return key_names(self.prefix, stream_id)

    async def _eval(
        self, script: Script, keys: Sequence[str], *args: bytes | str | int, lane: int = OTHERS
    ) -> Any:
        """Run `script` (every script this store runs goes through here)."""
        return await self._lanes.run(script, keys, args, lane)

    def _changed(self, stream_id: str, version: int, generation: str) -> None:
        """This process changed the stream: wake its local readers at once."""
        self._follower.saw(stream_id, version, generation)
        self._notifier.notify(stream_id)

    # -- Store protocol ------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            client = self._connection.commands()
            await client.ping()
            await scripts.load_scripts(client)
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot reach Redis at {self!r}: {exc}") from exc

    async def close(self) -> None:
        await self._follower.close()
        await self._lanes.drain()  # let queued commands finish
        await self._connection.aclose()

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        info = running_copy(self._producing.get(stream_id))
        if info is not None:  # produced here: joining it costs no round trip
            return info
        token = new_token()
        lease_ms = max(1, ms(lease_seconds))
        args = (token, -1, ms(self.orphan_ttl), stream_id, lease_ms, int(replace))
        sent = time.time()
        reply = await self._eval(scripts.CLAIM, self._keys(stream_id), *args)
        if reply[0] == b"info":
            return snapshot(reply[1:])
        self._ends[token] = 0
        version = int(reply[1])
        # Judged by this clock from before the claim was sent: never later than Redis's.
        info = StreamInfo(stream_id, "running", token, version, 0, 0, 0, None, None,
                          sent, sent, None, sent + lease_seconds)  # fmt: skip
        self._producing[stream_id] = LocalCopy(info, keep=LOCAL_BYTES)
        self._changed(stream_id, version, token)
        return Lease(stream_id, token)

    def _released(self, lease: Lease) -> None:
        self._ends.pop(lease.token, None)
        mine = self._producing.get(lease.stream_id)
        if mine is not None and mine.info.generation == lease.token:
            del self._producing[lease.stream_id]

    def _produced(self, lease: Lease, data: bytes = b"", chunks: int = 0, **changes: Any) -> None:
        """Record a write of ours (`data`, holding `chunks` messages) in the local copy, before
        waking readers."""
        mine = self._producing.get(lease.stream_id)
        if mine is not None and mine.info.generation == lease.token:
            changes["chunks"] = mine.info.chunks + chunks
            mine.update(evolve(mine.info, **changes), (data,))

    def _fenced(
        self, lease: Lease, args: Sequence[bytes | str | int], want: int
    ) -> tuple[tuple[str, str, str], tuple[bytes | str | int, ...]]:
        """The keys and arguments of a fenced write."""
        return self._keys(lease.stream_id), (lease.token, want, ms(self.orphan_ttl), *args)

    def _held(self, lease: Lease, reply: Any) -> list[Any]:
        """A fenced write's reply, ``[b"ok", version, ...]``; `LeaseLost` if it was refused,
        what Redis's error raises if it failed in a `BATCH` (``[b"err", message]``)."""
        if reply[0] == b"lost":
            self._released(lease)
            self._notifier.notify(lease.stream_id)  # local readers: re-read, see why
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost: {reply[1].decode()}")
        if reply[0] == b"err":
            raise scripts.BATCH.error(reply[1].decode(errors="replace"))
        return list(reply)

    async def _write(
        self,
        script: Script,
        lease: Lease,
        *args: bytes | str | int,
        want: int = -1,
        lane: int = WRITES,
    ) -> list[Any]:
        """Run a fenced write; its reply is ``[b"ok", version, ...]``."""
        keys, fenced = self._fenced(lease, args, want)
        return self._held(lease, await self._eval(script, keys, *fenced, lane=lane))

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        reply = await self._write(scripts.START, lease, status, pack_headers(headers))
        self._started(lease, status, headers, reply)

    def _started(self, lease: Lease, status: int, headers: Headers, reply: list[Any]) -> None:
        version, now = int(reply[1]), time.time()
        self._produced(
            lease, status_code=status, headers=tuple(headers), version=version, updated_at=now
        )
        self._changed(lease.stream_id, version, lease.token)

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        if not data and not chunks:
            await self._write(scripts.CHECK, lease)  # nothing to add; still fail a lost lease
            return
        # Popped while the call runs: if it is cancelled we can't know whether it landed, and
        # the next append goes unchecked (and learns the offset again from its reply).
        want = self._ends.pop(lease.token, -1)
        reply = await self._write(scripts.APPEND, lease, data, chunks, want=want)
        self._appended(lease, data, chunks, reply)

    def _appended(self, lease: Lease, data: bytes, chunks: int, reply: list[Any]) -> None:
        self._ends[lease.token] = offset = int(reply[2])
        version, now = int(reply[1]), time.time()
        self._produced(lease, data, chunks, version=version, offset=offset, updated_at=now)
        self._changed(lease.stream_id, version, lease.token)

    async def write_many(self, writes: Sequence[Write]) -> list[BaseException | None]:
        """`write_all` for Redis: every write's start and append in `BATCH` calls of up to
        `MAX_BATCH` streams each, sent as one pipeline — a flush of many streams costs redis-py
        a few commands to encode and parse, not one per stream (on a cluster, where the keys of
        one call must share a slot, one write after another)."""
        if not self._lanes.batched:
            return await write_each(self, writes)
        # Per call: for each reply it will hold, the write's index and what to do with it.
        calls: list[tuple[list[tuple[int, Done]], asyncio.Future[Any]]] = []
        lanes, waiter, prefix = self._lanes, Waiter(), self.prefix
        dones: list[tuple[int, Done]] = []
        keys: list[str] = []
        args: list[bytes | str | int] = [ms(self.orphan_ttl)]
        size = 0
        for i, (lease, head, data, chunks) in enumerate(writes):
            if head is None and not data:
                continue
            if dones and (len(keys) == MAX_BATCH or size + len(data) > BATCH_BYTES):
                calls.append((dones, lanes.enqueue(scripts.BATCH, keys, args, WRITES, waiter)))
                dones, keys, args, size = [], [], [ms(self.orphan_ttl)], 0
            status, packed, want = None, b"", -1
            if head is not None:
                status, headers = head
                packed = pack_headers(headers)
                dones.append((i, functools.partial(self._started, lease, status, headers)))
            if data:
                want = self._ends.pop(lease.token, -1)  # as in `append`
                dones.append((i, functools.partial(self._appended, lease, data, chunks)))
            keys.append(key_base(prefix, lease.stream_id))
            args.append(batch_entry(want, chunks, status, lease.token, packed, data))
            size += len(data)
        if dones:
            calls.append((dones, lanes.enqueue(scripts.BATCH, keys, args, WRITES, waiter)))
        if calls:
            await waiter.wait()
        outcomes: list[BaseException | None] = [None] * len(writes)
        for dones, future in calls:
            try:
                replies = batch_replies(future.result())
            except Exception as exc:  # the call failed as a whole: so did each of its writes
                for i, _ in dones:
                    outcomes[i] = exc
                continue
            for (i, done), reply in zip(dones, replies, strict=True):
                if outcomes[i] is None:  # after a failed start, its append isn't recorded
                    try:
                        done(self._held(writes[i].lease, reply))
                    except Exception as exc:
                        outcomes[i] = exc
        return outcomes

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        sent = time.time()
        await self._write(scripts.RENEW, lease, max(1, ms(lease_seconds)), lane=LEASES)
        self._produced(lease, lease_expires_at=sent + lease_seconds)

    async def finish(self, lease: Lease, state: FinalState, *, ttl: float, retain: bool) -> None:
        want = self._ends.pop(lease.token, -1)
        args = (state, ms(ttl), "1" if retain else "0", new_token())
        try:
            reply = await self._write(scripts.FINISH, lease, *args, want=want)
        finally:
            self._released(lease)  # readers now read the final state (or the error) from Redis
            self._notifier.notify(lease.stream_id)
        self._changed(lease.stream_id, int(reply[1]), lease.token)

    async def info(self, stream_id: str) -> StreamInfo | None:
        reply = await self._eval(scripts.INFO, self._keys(stream_id))
        return None if reply is None else snapshot(reply)

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        mine = self._producing.get(stream_id)
        if mine is not None:
            data = mine.read(offset, limit)
            if data is not None:  # ours, and recent enough: no round trip
                return effective(mine.info), data
        keys = self._keys(stream_id)
        reply = await self._eval(scripts.READ, keys, offset, max(0, min(limit, MAX_READ)))
        if reply is None:
            return None, b""
        info, parts = snapshot(reply), [reply[DATA]]
        got = len(parts[0])
        while got < limit and offset + got < info.offset:
            # Bigger than one script returns: continue from where it stopped, same generation.
            reply = await self._eval(scripts.READ, keys, offset + got, min(limit - got, MAX_READ))
            if reply is None:
                return None, b""
            latest = snapshot(reply)
            if latest.generation != info.generation:
                return latest, b""
            info = latest
            parts.append(reply[DATA])
            got += len(reply[DATA])
        return info, join(parts)

    async def wait(self, info: StreamInfo, timeout: float) -> None:
        stream_id = info.id
        if await wait_own(self._notifier, self._producing.get(stream_id), info, timeout):
            return  # produced here: woken by this process's own writes
        await self._follower.wait(info, timeout, key=self._keys(stream_id)[2])

    async def attach(self, stream_id: str, delta: int) -> None:
        await self._eval(scripts.ATTACH, self._keys(stream_id), delta)

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        reply = await self._eval(scripts.ABORT, self._keys(stream_id), "", -1, 0, ms(ttl))
        if not reply[0]:
            return False
        self._producing.pop(stream_id, None)  # if it was ours: the lease is gone
        self._changed(stream_id, int(reply[1]), reply[2].decode())
        return True

    async def delete(self, stream_id: str) -> bool:
        reply = await self._eval(scripts.DELETE, self._keys(stream_id))
        if not reply[0]:
            return False
        self._producing.pop(stream_id, None)
        self._changed(stream_id, int(reply[1]), "")
        return True

    async def _meta_keys(self) -> AsyncIterator[tuple[str, str, str]]:
        pattern = glob_escape(f"{self.prefix}:{{") + "*}:meta"
        try:
            async for key in self._connection.commands().scan_iter(match=pattern, count=500):
                base = key[: -len(b"meta")].decode("utf-8", "surrogatepass")
                yield base + "meta", base + "body", base + "ev"
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis SCAN failed: {exc!r}") from exc

    async def purge_expired(self) -> int:
        removed = 0
        async for keys in self._meta_keys():
            removed += int(await self._eval(scripts.PURGE, keys))
        return removed

    async def stats(self) -> StoreStats:
        """Streams by state, bytes, the oldest running stream: from every stream's metadata
        (one script call each, as `scan`)."""
        return await count_streams(self.scan())

    async def scan(self) -> AsyncIterator[StreamInfo]:
        async for keys in self._meta_keys():
            reply = await self._eval(scripts.INFO, keys)
            if reply is not None:
                yield snapshot(reply)
