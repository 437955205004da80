"""`PostgresStore` itself: group-committed, fenced writes; reads; waits woken by the
`Listener`; and the local copy of the streams this process produces (see the package docstring
for the design)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, NamedTuple

import anyio
import asyncpg

from ...exceptions import ConfigurationError
from .._base import (
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    LocalCopy,
    Notifier,
    StoreError,
    StoreFull,
    StoreStats,
    StreamInfo,
    Write,
    dump_headers,
    effective,
    evolve,
    new_token,
    running_copy,
    wait_own,
)
from .._batch import GroupCommit, Waiter, runs
from ._listener import Listener
from ._sql import MAX_SEGMENT, SCHEMA_VERSION, Sql, schema_sql, to_info

__all__ = ["LOCAL_BYTES", "PostgresStore"]

#: Newest body bytes of each stream this process produces kept in memory for local readers.
LOCAL_BYTES = 64 << 10
#: Most queued writes committed in one transaction by the batch writer (set-based statements
#: take thousands of rows in one round trip).
MAX_BATCH = 2048
#: How often a batch rolled back by a deadlock or serialization failure is tried again.
DEADLOCK_RETRIES = 5
#: Streams listed per query by `scan`.
SCAN_PAGE = 256
#: Streams whose last-seen snapshot is remembered (for `wait`) before the memory is reset.
MAX_SEEN = 50_000
#: (generation, version) of a stream that is absent (or expired).
ABSENT = ("", -1)


class Op(NamedTuple):
    """One producer write (or claim, or attach) waiting for the batch writer."""

    kind: str  # "claim", "start", "append", "renew", "finish", "attach"
    stream_id: str
    token: str
    args: tuple[Any, ...]


#: What a claim answers: the new lease and its stream, or the stream that isn't claimable.
Claimed = tuple[Lease, StreamInfo] | StreamInfo


class PostgresStore:
    """Streams kept in PostgreSQL, shared by every worker on every machine that uses the same
    database.

    Args:
        dsn_or_pool: a ``postgresql://`` / ``postgres://`` DSN (the store opens its own asyncpg
            pool and closes it in `close`), or an ``asyncpg.Pool`` you own (not closed by the
            store). The store holds one connection of it for ``LISTEN`` while readers in this
            process follow streams produced elsewhere, and borrows one per batch, read or
            control call.
        schema: the PostgreSQL schema of the tables (created if missing).
        prefix: the first part of the table names (``{prefix}streams``, ``{prefix}segments``,
            ``{prefix}meta``), so several apps can share one schema.
        create_schema: create the tables on first use (idempotent). False when your own
            migrations apply `schema_sql` (the store then only checks the version).
        min_connections: the fewest connections of the store's own pool (DSN form).
        max_connections: the most connections of the store's own pool (DSN form).
        command_timeout: seconds any one statement may take before it fails with `StoreError`
            (DSN form; a pool you pass keeps its own setting).
        purge_interval: at most this often (seconds) a `claim` first removes expired streams.
        orphan_ttl: seconds a running stream is kept after its lease ran out (its producer
            died), so its readers see it ``failed`` rather than gone; `purge_expired` removes
            it after that.
        synchronous_commit: whether the store's own connections wait for each commit to reach
            the disk (DSN form; a pool you pass keeps its own setting). Off by default: a
            commit costs no WAL flush (about half a resume's time to first byte), and a
            database *crash* — not a restart — can lose the last fraction of a second of
            stream writes, whose streams then end ``failed`` for their readers (as when a
            producer dies), never with a hole. Your application's own tables are not affected.

    Example::

        app.add_middleware(DurableMiddleware, store=PostgresStore("postgresql://app@db/app"))

    Needs ``pip install "durable-asgi[postgres]"`` (asyncpg) and PostgreSQL ≥ 12. asyncio only.
    """

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        schema: str = "public",
        prefix: str = "durable_",
        create_schema: bool = True,
        min_connections: int = 1,
        max_connections: int = 10,
        command_timeout: float = 30.0,
        purge_interval: float = 60.0,
        orphan_ttl: float = 300.0,
        synchronous_commit: bool = False,
    ) -> None:
        self._sql = Sql(schema, prefix)
        if not 1 <= min_connections <= max_connections:
            raise ValueError("need 1 <= min_connections <= max_connections")
        if isinstance(dsn_or_pool, str):
            self.dsn: str | None = dsn_or_pool
            self._pool: asyncpg.Pool | None = None
            self._own_pool = True
        else:
            self.dsn, self._pool, self._own_pool = None, dsn_or_pool, False
        self.schema, self.prefix, self.create_schema = schema, prefix, create_schema
        self.min_connections, self.max_connections = min_connections, max_connections
        self.command_timeout = command_timeout
        self.purge_interval = purge_interval
        self.orphan_ttl = orphan_ttl
        self.synchronous_commit = synchronous_commit
        self._next_purge = 0.0
        self._opened = False
        self._open_lock = anyio.Lock()
        self._notifier = Notifier()
        self._listener = Listener(
            self._acquire_listener, self._release, self._sql.channel, self._notifier
        )
        self._batch: GroupCommit[Op, bool | Claimed] = GroupCommit(
            self._commit, max_batch=MAX_BATCH
        )
        # Renewals have a batch writer (and a connection) of their own: under load a lease
        # must not run out while its renewal waits behind a thousand streams' appends.
        self._renewals: GroupCommit[Op, bool | Claimed] = GroupCommit(
            self._commit, max_batch=MAX_BATCH
        )
        #: Streams this process produces, as of their last committed write (see `LocalCopy`).
        self._producing: dict[str, LocalCopy] = {}
        #: Round trips to the database so far (statements, and a transaction's BEGIN and
        #: COMMIT): what the store costs the database, for operators and benchmarks.
        self.round_trips = 0
        #: What a read or wait here last saw of a stream: (generation, version, listener mark).
        self._seen: dict[str, tuple[str, int, tuple[int, int]]] = {}

    def __repr__(self) -> str:
        where = _redacted(self.dsn) if self.dsn is not None else repr(self._pool)
        return f"PostgresStore({where!r}, schema={self.schema!r}, prefix={self.prefix!r})"

    def schema_sql(self) -> str:
        """The SQL that creates this store's tables (``schema.sql`` with its names), for
        migrations run by your own tool."""
        return schema_sql(self.schema, self.prefix)

    @property
    def listener_pid(self) -> int | None:
        """The server process of the ``LISTEN`` connection, while it is up (for operators)."""
        return self._listener.server_pid

    async def listening(self) -> int:
        """Start listening if not yet, wait until the connection is up; its server process."""
        self._listener.start()
        while True:
            await self._listener.up.wait()
            pid = self._listener.server_pid
            if pid is not None:
                return pid

    # -- connections -----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "PostgresStore needs an asyncio event loop (asyncpg is asyncio-only), but this "
                "is running on another one (trio?): run the server on asyncio, or use "
                "SQLiteStore or MemoryStore"
            ) from None
        async with self._open_lock:
            if self._opened:
                return
            with anyio.CancelScope(shield=True), self._errors("connect"):
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=self.min_connections,
                        max_size=self.max_connections,
                        command_timeout=self.command_timeout,
                        server_settings={
                            "application_name": "durable_asgi",
                            "synchronous_commit": "on" if self.synchronous_commit else "off",
                        },
                    )
                async with self._pool.acquire() as connection, connection.transaction():
                    await self._check_schema(connection)
            self._opened = True

    async def _check_schema(self, connection: Any) -> None:
        """Create the tables (under an advisory lock: one process creates, the others wait and
        see them), or check that those there are ours."""
        sql = self._sql
        await connection.execute(sql.lock, f"durable_asgi {sql.meta}")
        exists = await connection.fetchval("SELECT to_regclass($1)", sql.meta)
        version = int(await connection.fetchval(sql.schema_version)) if exists else None
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"{sql.meta} was written by a newer durable_asgi (schema {version}): upgrade "
                "durable_asgi or use another schema or prefix"
            )
        if version is None:
            if not self.create_schema:
                raise StoreError(
                    f"{sql.meta} does not exist: apply PostgresStore.schema_sql() or pass "
                    "create_schema=True"
                )
            await connection.execute(self.schema_sql())

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._listener.close()
            for batch in (self._batch, self._renewals):
                await batch.drain()  # commit what is queued
                batch.fail_pending(StoreError(f"{self!r} was closed"))
            self._producing.clear()
            self._seen.clear()
            pool = self._pool
            if self._own_pool and pool is not None:
                self._pool = None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 10)
            self._opened = False

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """asyncpg's and the network's errors as `StoreError` (`StoreFull` for a full disk)."""
        try:
            yield
        except (StoreError, LeaseLost):
            raise
        except asyncpg.exceptions.DiskFullError as exc:
            raise StoreFull(f"PostgreSQL is out of disk space ({doing}): {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreError(f"PostgreSQL {doing} failed ({self!r}): {exc!r}") from exc

    @contextlib.asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[Any]:
        if not self._opened:
            await self.open()
        assert self._pool is not None
        with self._errors(doing):
            async with self._pool.acquire(timeout=self.command_timeout) as connection:
                yield connection

    async def _acquire_listener(self) -> Any:
        if not self._opened:
            await self.open()
        assert self._pool is not None
        return await self._pool.acquire(timeout=self.command_timeout)

    async def _release(self, connection: Any) -> None:
        if self._pool is not None:
            await self._pool.release(connection, timeout=5)

    async def _fetch(self, doing: str, sql: str, *args: Any) -> list[Any]:
        self.round_trips += 1
        async with self._connection(doing) as connection:
            return list(await connection.fetch(sql, *args))

    # -- producer writes ---------------------------------------------------------------------

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        info = running_copy(self._producing.get(stream_id))
        if info is not None:  # produced here: joining it costs no round trip
            return info
        if time.time() >= self._next_purge:
            self._next_purge = time.time() + self.purge_interval
            await self.purge_expired()
        result = await self._submit(Op("claim", stream_id, "", (lease_seconds, replace)))
        assert not isinstance(result, bool)
        if isinstance(result, StreamInfo):
            return result
        return result[0]

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        await self._fenced(Op("start", lease.stream_id, lease.token, (status, headers)))

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        if not data and not chunks:  # nothing to add; still fail a lost lease
            rows = await self._fetch("check", self._sql.check, lease.stream_id, lease.token)
            if not rows:
                raise self._lost(lease)
            return
        await self._fenced(Op("append", lease.stream_id, lease.token, (data, chunks)))

    async def write_many(self, writes: Sequence[Write]) -> list[BaseException | None]:
        """`write_all` for PostgreSQL: every write's statements in one batch (one transaction;
        one statement per kind of write), each write fenced by its own lease."""
        queued: list[tuple[int, Lease, asyncio.Future[bool | Claimed]]] = []
        waiter = Waiter()
        for i, write in enumerate(writes):
            lease = write.lease
            if write.head is not None:
                op = Op("start", lease.stream_id, lease.token, write.head)
                queued.append((i, lease, self._batch.enqueue(op, waiter)))
            if write.data or write.chunks:
                op = Op("append", lease.stream_id, lease.token, (write.data, write.chunks))
                queued.append((i, lease, self._batch.enqueue(op, waiter)))
        if queued:
            with anyio.CancelScope(shield=True):  # as `_submit`: know whether they landed
                await waiter.wait()
        outcomes: list[BaseException | None] = [None] * len(writes)
        for i, lease, future in queued:
            if outcomes[i] is None:
                error = future.exception()
                if error is None and future.result() is not True:
                    error = self._lost(lease)
                outcomes[i] = error
        return outcomes

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        op = Op("renew", lease.stream_id, lease.token, (lease_seconds,))
        if not self._opened:
            await self.open()
        if await self._renewals.submit(op, shield=True) is not True:
            raise self._lost(lease)

    async def finish(self, lease: Lease, state: FinalState, *, ttl: float, retain: bool) -> None:
        await self._fenced(Op("finish", lease.stream_id, lease.token, (state, ttl, retain)))

    async def _fenced(self, op: Op) -> None:
        if await self._submit(op) is not True:
            raise self._lost(Lease(op.stream_id, op.token))

    def _lost(self, lease: Lease) -> LeaseLost:
        return LeaseLost(f"lease on {lease.stream_id!r} was lost")

    async def _submit(self, op: Op) -> bool | Claimed:
        """Queue `op` for the batch writer and wait (shielded) until it is committed. Writes
        of one stream commit in the order they were queued."""
        if not self._opened:
            await self.open()
        return await self._batch.submit(op, shield=True)

    async def _commit(self, ops: Sequence[Op]) -> list[bool | Claimed]:
        """The batch writer: `ops`, from every stream, in one transaction — one statement per
        run of one kind of write (`runs`), one round trip in all when there's one run. Then
        the local copies are brought up to date and this process's readers woken."""
        grouped = runs(ops)
        for attempt in range(DEADLOCK_RETRIES + 1):
            results: list[bool | Claimed] = [False] * len(ops)
            rows: dict[int, Any] = {}
            try:
                async with self._connection("write") as connection:
                    if len(grouped) == 1:
                        await self._apply(connection, ops, grouped[0], results, rows)
                    else:
                        self.round_trips += 2  # BEGIN, COMMIT
                        async with connection.transaction():
                            for run in grouped:
                                await self._apply(connection, ops, run, results, rows)
            except StoreError as exc:
                # Rolled back as a whole: a deadlock with another worker's transaction (rows
                # locked in another order across its statements) is retried.
                retry = isinstance(exc.__cause__, asyncpg.exceptions.TransactionRollbackError)
                if not retry or attempt == DEADLOCK_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0.001, 0.01) * (attempt + 1))
            else:
                break
        for i, op in enumerate(ops):
            self._committed(op, results[i], rows.get(i))
        return results

    async def _apply(
        self,
        connection: Any,
        ops: Sequence[Op],
        run: list[int],
        results: list[bool | Claimed],
        rows: dict[int, Any],
    ) -> None:
        """One statement for the ops at `run` (one kind, distinct streams): `results[i]` is
        whether op i applied (or what a claim answered), `rows[i]` the row it returned."""
        sql, kind = self._sql, ops[run[0]].kind
        self.round_trips += 1
        group = [ops[i] for i in run]
        ids = [op.stream_id for op in group]
        tokens = [op.token for op in group]
        if kind == "claim":
            await self._claim(connection, run, group, results)
            return
        if kind == "start":
            statuses = [int(op.args[0]) for op in group]
            heads = [dump_headers(op.args[1]) for op in group]
            got = await connection.fetch(sql.start, ids, tokens, statuses, heads)
        elif kind == "append":
            sizes, chunks, piece_ids, rels, pieces = [], [], [], [], []
            for op in group:
                data, count = op.args
                sizes.append(len(data))
                chunks.append(count)
                for at in range(0, len(data), MAX_SEGMENT):
                    piece_ids.append(op.stream_id)
                    rels.append(at)
                    pieces.append(data if len(data) <= MAX_SEGMENT else data[at : at + MAX_SEGMENT])
            got = await connection.fetch(
                sql.append, ids, tokens, sizes, chunks, piece_ids, rels, pieces
            )
        elif kind == "renew":
            got = await connection.fetch(sql.renew, ids, tokens, [op.args[0] for op in group])
        elif kind == "finish":
            states = [op.args[0] for op in group]
            ttls = [float(op.args[1]) for op in group]
            retains = [bool(op.args[2]) for op in group]
            got = await connection.fetch(sql.finish, ids, tokens, states, ttls, retains)
        else:  # attach: not fenced, always "applied"
            got = await connection.fetch(sql.attach, ids, [op.args[0] for op in group])
        applied = {row["id"]: row for row in got}
        for i, sid in zip(run, ids, strict=True):
            row = applied.get(sid)
            results[i] = row is not None or kind == "attach"
            if row is not None:
                rows[i] = row

    async def _claim(
        self, connection: Any, run: list[int], group: list[Op], results: list[bool | Claimed]
    ) -> None:
        """The claims of `group` (distinct streams): a lease for each claimable one, else the
        stream as it is."""
        sql = self._sql
        pending = {op.stream_id: (i, op) for i, op in zip(run, group, strict=True)}
        for _ in range(3):  # a stream deleted between the two statements is claimed again
            ids = list(pending)
            tokens = [new_token() for _ in ids]
            seconds = [float(pending[sid][1].args[0]) for sid in ids]
            replace = [bool(pending[sid][1].args[1]) for sid in ids]
            got = await connection.fetch(sql.claim, ids, tokens, seconds, replace)
            claimed = {row["id"]: row for row in got}
            for sid, token in zip(ids, tokens, strict=True):
                if sid in claimed:
                    results[pending.pop(sid)[0]] = (Lease(sid, token), to_info(claimed[sid]))
            if not pending:
                return
            self.round_trips += 1
            for row in await connection.fetch(sql.select, list(pending)):
                results[pending.pop(row["id"])[0]] = effective(to_info(row))
            if not pending:
                return
            self.round_trips += 1
        raise StoreError(f"claims of {sorted(pending)!r} kept racing their deletion")

    def _committed(self, op: Op, result: bool | Claimed, row: Any) -> None:
        """Bring the local copy of `op`'s stream up to date after its commit; wake readers."""
        sid, kind = op.stream_id, op.kind
        if kind == "attach":
            mine = self._producing.get(sid)
            if mine is not None and row is not None:
                mine.update(evolve(mine.info, readers=row["readers"]))
            return
        if kind == "claim":
            if isinstance(result, tuple):
                info = result[1]
                self._producing[sid] = LocalCopy(info, keep=LOCAL_BYTES)
                self._notifier.notify(sid)
            return
        mine = self._producing.get(sid)
        ours = mine is not None and mine.info.generation == op.token
        if result is not True or kind == "finish":
            if ours:
                del self._producing[sid]  # readers now read from the database
            if kind != "renew" or result is not True:
                self._notifier.notify(sid)
            return
        if not ours:
            return
        assert mine is not None
        info = mine.info
        if kind == "start":
            status, headers = op.args
            new = evolve(info, status_code=status, headers=tuple(headers),
                         version=row["version"], updated_at=row["updated_at"])  # fmt: skip
            mine.update(new)
        elif kind == "append":
            new = evolve(info, version=row["version"], offset=row["size"],
                         chunks=row["chunks"], updated_at=row["updated_at"])  # fmt: skip
            mine.update(new, (op.args[0],))
        else:  # renew: nothing readers see
            mine.update(evolve(info, lease_expires_at=row["lease_expires_at"]))
            return
        self._notifier.notify(sid)

    # -- reads -------------------------------------------------------------------------------

    async def info(self, stream_id: str) -> StreamInfo | None:
        mine = self._producing.get(stream_id)
        if mine is not None:
            return effective(mine.info)
        rows = await self._fetch("info", self._sql.info, stream_id)
        return effective(to_info(rows[0])) if rows else None

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        offset, limit = max(offset, 0), max(limit, 0)
        mine = self._producing.get(stream_id)
        if mine is not None:
            data = mine.read(offset, limit)
            if data is not None:  # ours, and recent enough: no round trip
                return effective(mine.info), data
        mark = self._listener.mark(stream_id)
        rows = await self._fetch("read", self._sql.read, stream_id, offset, offset + limit)
        if not rows:
            self._saw(stream_id, ABSENT, mark)
            return None, b""
        info = to_info(rows[0])
        self._saw(stream_id, (info.generation, info.version), mark)
        return effective(info), bytes(rows[0]["part"])

    def _saw(self, stream_id: str, seen: tuple[str, int], mark: tuple[int, int]) -> None:
        if len(self._seen) >= MAX_SEEN and stream_id not in self._seen:
            self._seen.clear()  # bounded: a stream forgotten here costs its next wait a query
        self._seen[stream_id] = (*seen, mark)

    async def wait(self, info: StreamInfo, timeout: float) -> None:
        stream_id = info.id
        if await wait_own(self._notifier, self._producing.get(stream_id), info, timeout):
            return  # produced here: woken by this process's own writes
        deadline = anyio.current_time() + timeout
        if info.state == "running" and info.lease_expires_at is not None:
            # The lease running out is a change (`effective` turns the stream `failed`) that
            # nobody writes: wake up for it (spuriously if the lease was renewed since).
            lease_left = info.lease_expires_at - time.time() + 0.001
            deadline = min(deadline, anyio.current_time() + max(lease_left, 0.0))
        listener = self._listener
        with listener.waiting(stream_id):
            event = self._notifier.event(stream_id)
            wanted = (info.generation, info.version)
            seen = self._seen.get(stream_id)
            if seen is None or seen[:2] != wanted or not listener.unchanged(stream_id, seen[2]):
                # Not known to be unchanged since that snapshot: ask the database.
                mark = listener.mark(stream_id)
                rows = await self._fetch("wait", self._sql.seen, stream_id)
                current = (rows[0]["generation"], rows[0]["version"]) if rows else ABSENT
                self._saw(stream_id, current, mark)
                if current != wanted:
                    return
            remaining = deadline - anyio.current_time()
            if not listener.connected:  # no wake-ups from other processes: re-check soon
                remaining = min(remaining, listener.retry)
            if remaining > 0:
                await self._notifier.wait(stream_id, event, remaining)

    async def stats(self) -> StoreStats:
        """Streams by state, bytes, the oldest running stream: one aggregate query."""
        rows = await self._fetch("stats", self._sql.stats)
        return StoreStats(
            {row["effective"]: row["n"] for row in rows},
            sum(int(row["size"]) for row in rows),
            next((row["oldest"] for row in rows if row["effective"] == "running"), None),
        )

    async def scan(self) -> AsyncIterator[StreamInfo]:
        after = ""
        while True:
            rows = await self._fetch("scan", self._sql.scan, after, SCAN_PAGE)
            for row in rows:
                yield effective(to_info(row))
            if len(rows) < SCAN_PAGE:
                return
            after = rows[-1]["id"]

    # -- other writes ------------------------------------------------------------------------

    async def attach(self, stream_id: str, delta: int) -> None:
        await self._submit(Op("attach", stream_id, "", (delta,)))

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        rows = await self._fetch("abort", self._sql.abort, stream_id, float(ttl))
        self._producing.pop(stream_id, None)  # if it was ours: the lease is gone
        self._notifier.notify(stream_id)
        return bool(rows)

    async def delete(self, stream_id: str) -> bool:
        rows = await self._fetch("delete", self._sql.delete, stream_id)
        self._producing.pop(stream_id, None)
        self._notifier.notify(stream_id)
        return bool(rows) and bool(rows[0]["live"])

    async def purge_expired(self) -> int:
        rows = await self._fetch("purge", self._sql.purge, float(self.orphan_ttl))
        for row in rows:
            self._producing.pop(row["id"], None)
            self._notifier.notify(row["id"])
        return len(rows)


def _redacted(dsn: str) -> str:
    """`dsn` without its password (it must never reach a log)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
