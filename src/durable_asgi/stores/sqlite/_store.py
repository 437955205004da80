"""`SQLiteStore`: the `Store` protocol on one SQLite file (see the package's docstring).

Claims, fenced producer writes and reads, in this process's terms: producer writes and
`attach` go through the batch writer (`GroupCommit` of `_writes.Op`), claims, aborts, deletes
and purges are a transaction each, reads query the reader connection unless this process's
copy (`Known`) can answer, and waits are woken by this process's writes or by the `Poller`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio

from .._base import (
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    Notifier,
    StoreError,
    StoreStats,
    StreamInfo,
    Write,
    dump_headers,
    effective,
    join,
)
from .._batch import GroupCommit, Waiter
from . import _writes
from ._connection import Database
from ._local import ABSENT, Known
from ._poller import Poller
from ._schema import (
    ATTACH,
    COLUMNS,
    LIVE,
    OWNED,
    READ,
    SELECT_LIVE_STREAM,
    to_info,
    update_owned,
)
from ._writes import Claimed, Op

__all__ = ["SQLiteStore"]

#: Streams listed per query by `scan` (no read transaction stays open between pages).
SCAN_PAGE = 256
#: Most queued writes committed in one transaction by the batch writer.
MAX_BATCH = 512


class SQLiteStore:
    """Streams kept in one SQLite file (WAL mode), shared by every process that opens it.

    Args:
        path: the database file; created with its schema on first use.
        poll_interval: how often (seconds) a waiting reader checks for changes made by *other*
            processes. Changes made in this process wake readers at once.
        busy_timeout: how long (seconds) a write waits for another process's transaction.
        purge_interval: at most this often (seconds) a `claim` first removes expired streams.

    Example::

        app.add_middleware(DurableMiddleware, store=SQLiteStore("/var/lib/app/durable.db"))

    Needs an asyncio event loop (the connections' threads answer through it). Call `close` at
    shutdown (the middleware does it from lifespan): it commits what is queued and closes the
    connections and their threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.05,
        busy_timeout: float = 5.0,
        purge_interval: float = 60.0,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError(
                "SQLiteStore needs a file shared by its connections; for an in-memory store "
                "use MemoryStore()"
            )
        if not poll_interval > 0 or busy_timeout < 0:
            raise ValueError("poll_interval must be positive and busy_timeout not negative")
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self.purge_interval = purge_interval
        self._next_purge = 0.0
        self._db = Database(self.path, busy_timeout=busy_timeout)
        self._batch: GroupCommit[Op, bool | Claimed] = GroupCommit(
            self._commit, max_batch=MAX_BATCH
        )
        self._notifier = Notifier()
        self._known = Known(poll_interval)
        self._poller = Poller(self._db, self._known, self._notifier, poll_interval)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, poll_interval={self.poll_interval})"

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._poller.stop()
            await self._batch.drain()  # commit what is queued
            self._known.clear()
            await self._db.close()
            self._batch.fail_pending(StoreError(f"SQLite store {self.path!r} was closed"))

    # -- producer writes ---------------------------------------------------------------------

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        copy = self._known.local(stream_id)
        if copy is not None and self._known.current(copy):
            # Produced here, and known to match the file within the last poll interval (the
            # staleness cross-process waits have anyway): running, so not claimable — no
            # transaction, so joining a busy worker's stream costs no trip to its writer.
            info = effective(copy.info)
            if info.state == "running":
                return info
        if time.time() >= self._next_purge:
            self._next_purge = time.time() + self.purge_interval
            await self.purge_expired()
        # In the batch with every stream's writes: one transaction for many claims, not one
        # each, and the renewals queued behind them don't wait for a transaction per claim.
        op = Op("claim", stream_id, claim_args=(lease_seconds, replace))
        await self._db.connections()
        result = await self._batch.submit(op, shield=True)
        if isinstance(result, StreamInfo):
            return result
        assert not isinstance(result, bool)
        lease, row = result
        self._known.claimed(lease, row)
        self._notifier.notify(stream_id)
        return lease

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        if not await self._batched(_start_op(lease, status, headers)):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        owned = {"id": lease.stream_id, "token": lease.token}
        if not data:
            if chunks:
                await self._update_owned(
                    lease,
                    "chunks = chunks + :chunks, version = version + 1, updated_at = :now",
                    chunks=chunks,
                )
            elif not await self._db.query(
                f"SELECT 1 FROM streams WHERE {OWNED}", {**owned, "now": time.time()}
            ):
                raise LeaseLost(f"lease on {lease.stream_id!r} was lost")
            return
        if not await self._batched(_append_op(lease, data, chunks)):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")

    async def write_many(self, writes: Sequence[Write]) -> list[BaseException | None]:
        """`write_all` for SQLite: every write's statements in one batch (one transaction,
        one thread hop), each write fenced by its own lease."""
        await self._db.connections()
        queued: list[tuple[int, asyncio.Future[bool | Claimed]]] = []
        waiter = Waiter()
        for i, write in enumerate(writes):
            if write.head is not None:
                queued.append((i, self._batch.enqueue(_start_op(write.lease, *write.head), waiter)))
            if write.data:
                op = _append_op(write.lease, write.data, write.chunks)
                queued.append((i, self._batch.enqueue(op, waiter)))
        if queued:
            with anyio.CancelScope(shield=True):  # as `_batched`: know whether they landed
                await waiter.wait()
        outcomes: list[BaseException | None] = [None] * len(writes)
        for i, future in queued:
            if outcomes[i] is None:
                error = future.exception()
                if error is None and future.result() is not True:
                    error = LeaseLost(f"lease on {writes[i].lease.stream_id!r} was lost")
                outcomes[i] = error
        return outcomes

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        # Not a visible change: no version bump, no wake-up. The lease runs from its batch's
        # time (`apply_batch` binds ``:now``), not from when the renewal was queued.
        op = Op("renew", lease.stream_id, lease.token, params={"seconds": lease_seconds})
        if not await self._batched(op):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")

    async def finish(self, lease: Lease, state: FinalState, *, ttl: float, retain: bool) -> None:
        now = time.time()
        try:
            await self._update_owned(
                lease,
                "state = :state, expires_at = :expires, lease_expires_at = NULL, "
                "retain = :retain, version = version + 1, updated_at = :now",
                "finish",
                state=state,
                expires=now + ttl,
                retain=int(retain),
            )
        finally:
            # Not committed (or the lease was lost): readers meet the outcome in the file.
            if self._known.drop_unfinished(lease):
                self._notifier.notify(lease.stream_id)

    async def _update_owned(
        self, lease: Lease, assignments: str, kind: str = "update", **params: Any
    ) -> None:
        """One fenced UPDATE of the lease's stream; `LeaseLost` if the lease isn't current.
        ``:now`` in `assignments` is the batch's time (`apply_batch` binds it)."""
        op = Op(
            kind,
            lease.stream_id,
            sql=update_owned(assignments),
            params={"id": lease.stream_id, "token": lease.token, **params},
        )
        if not await self._batched(op):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")

    async def _batched(self, op: Op) -> bool:
        """Queue `op` for the batch writer and wait (shielded) until it is committed: True if
        it applied (its fence held). Writes of one stream commit in the order they were queued."""
        await self._db.connections()
        return await self._batch.submit(op, shield=True) is True

    async def _commit(self, ops: Sequence[Op]) -> list[bool | Claimed]:
        """The batch writer: `ops`, from every stream, in one transaction (one thread hop);
        then what this process knows is refreshed and the readers are woken. Answers per op
        whether it applied, or for a claim what it claimed."""
        batch = await self._db.transaction(lambda db: _writes.apply_batch(db, list(ops)))
        for stream_id in self._known.committed(ops, batch):
            self._notifier.notify(stream_id)
        return [batch.claims.get(i, ok) for i, ok in enumerate(batch.applied)]

    # -- reads -------------------------------------------------------------------------------

    async def info(self, stream_id: str) -> StreamInfo | None:
        now = time.time()
        copy = self._known.local(stream_id)
        if copy is not None:
            return effective(copy.info, now)
        rows = await self._db.query(SELECT_LIVE_STREAM, {"id": stream_id, "now": now})
        return effective(to_info(rows[0]), now) if rows else None

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        now = time.time()
        offset = max(offset, 0)
        copy = self._known.local(stream_id)
        data = None if copy is None else copy.read(offset, limit)
        if copy is not None and data is not None:
            # Written through this process: the newest bytes are in memory.
            return effective(copy.info, now), data
        rows = await self._db.query(
            READ, {"id": stream_id, "off": offset, "end": offset + max(limit, 0), "now": now}
        )
        if not rows or rows[0]["start"] != -1:  # absent or expired
            return None, b""
        info = effective(to_info(rows[0]), now)
        parts = [row["part"] for row in rows[1:] if row["part"]]
        return info, join(parts) if parts else b""

    async def wait(self, info: StreamInfo, timeout: float) -> None:
        stream_id = info.id
        event = self._notifier.event(stream_id)
        deadline = anyio.current_time() + timeout
        if info.state == "running" and info.lease_expires_at is not None:
            # The lease running out is a change (`effective` turns the stream `failed`) that
            # nobody writes: wake up for it (spuriously if the lease was renewed since).
            lease_left = info.lease_expires_at - time.time() + 0.001
            deadline = min(deadline, anyio.current_time() + max(lease_left, 0.0))
        known = self._known.seen(stream_id)
        if known is None or known[0] != info.generation or known[1] < info.version:
            # Nothing (current) known here: ask the database.
            rows = await self._db.query(
                f"SELECT generation, version FROM streams WHERE id = :id AND {LIVE}",
                {"id": stream_id, "now": time.time()},
            )
            known = (rows[0]["generation"], rows[0]["version"]) if rows else ABSENT
            self._known.observe(stream_id, known)
        # A deleted and re-claimed stream may be back at the same version: compare both.
        if known != (info.generation, info.version):
            return
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return
        # Changes made in this process set `event`; other processes' are seen by the poller
        # (but not for streams produced here: see `Poller`).
        if self._known.produces(stream_id):
            await self._notifier.wait(stream_id, event, remaining)
            return
        with self._poller.watching(stream_id):
            await self._notifier.wait(stream_id, event, remaining)

    async def stats(self) -> StoreStats:
        """Streams by state, bytes, the oldest running stream: one aggregate query."""
        rows = await self._db.query(
            "SELECT CASE WHEN state = 'running' AND lease_expires_at < :now THEN 'failed' "
            "ELSE state END AS effective, count(*) AS n, coalesce(sum(size), 0) AS size, "
            f"min(created_at) AS oldest FROM streams WHERE {LIVE} GROUP BY effective",
            {"now": time.time()},
        )
        return StoreStats(
            {row["effective"]: row["n"] for row in rows},
            sum(row["size"] for row in rows),
            next((row["oldest"] for row in rows if row["effective"] == "running"), None),
        )

    async def scan(self) -> AsyncIterator[StreamInfo]:
        after = ""
        while True:
            now = time.time()
            rows = await self._db.query(
                f"SELECT {COLUMNS} FROM streams WHERE id > :after AND {LIVE} "
                f"ORDER BY id LIMIT {SCAN_PAGE}",
                {"after": after, "now": now},
            )
            for row in rows:
                yield effective(to_info(row), now)
            if len(rows) < SCAN_PAGE:
                return
            after = rows[-1]["id"]

    # -- other writes ------------------------------------------------------------------------

    async def attach(self, stream_id: str, delta: int) -> None:
        await self._batched(
            Op("attach", stream_id, sql=ATTACH, params={"id": stream_id, "delta": delta})
        )

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        aborted = await self._db.write(lambda db: _writes.abort(db, stream_id, ttl))
        self._known.forget(stream_id)
        if aborted:
            self._notifier.notify(stream_id)
        return aborted

    async def delete(self, stream_id: str) -> bool:
        existed = await self._db.write(lambda db: _writes.delete(db, stream_id))
        self._known.forget(stream_id)
        self._notifier.notify(stream_id)
        return existed

    async def purge_expired(self) -> int:
        expired = await self._db.write(_writes.purge)
        for stream_id in expired:
            self._known.forget(stream_id)
            self._notifier.notify(stream_id)
        return len(expired)


def _start_op(lease: Lease, status: int, headers: Headers) -> Op:
    """The fenced statement that records a response head."""
    return Op(
        "start",
        lease.stream_id,
        sql=START,
        params={
            "id": lease.stream_id,
            "token": lease.token,
            "status": status,
            "headers": dump_headers(headers),
        },
    )


def _append_op(lease: Lease, data: bytes, chunks: int) -> Op:
    """An append of `data` (not empty), staged with the rest of its run by the batch writer."""
    return Op("append", lease.stream_id, lease.token, data, chunks)


#: `_start_op`'s statement.
START = update_owned(
    "status_code = :status, headers = :headers, version = version + 1, updated_at = :now"
)
