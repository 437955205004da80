"""`SQLiteStore`: one file that survives restarts, shared by the workers of one machine.

Design, in brief:

- Two tables: ``streams`` (one row of metadata per stream) and ``segments`` (the body as rows of
  ``(stream_id, start, data)``, keyed by both), so a read from any offset is one indexed range
  query. A read is a *single* SELECT of the stream's row and its segments, which is what makes
  its snapshot atomic.
- Two aiosqlite connections (one thread each): a writer, used by one task at a time under an
  `anyio.Lock`, and a reader, so reads never wait behind writes (WAL mode).
- Every producer write is fenced in SQL: ``WHERE generation = :token AND state = 'running'`` in
  the statement that makes the change, so a lost lease can never write. Claims run in
  ``BEGIN IMMEDIATE`` transactions: atomic across processes.
- An append is one fenced INSERT of a segment; a trigger advances the stream's size, chunk
  count and version in the same statement (WAL + ``synchronous=NORMAL``: no fsync per commit).
- Producer writes (start, append, renew, finish) and `attach` go through a *batch writer*: one
  task commits everything queued, from every stream, in one transaction and one thread hop,
  then answers each caller (`LeaseLost` for a write whose fence matched no row). Writes of one
  stream commit in the order they were queued; none is acknowledged before its commit. Claims,
  aborts, deletes and purges take the same writer connection, in their own transactions.
- Streams this process produces are also kept in memory, from the claim on: the snapshot
  committed last and the newest bytes (`TAIL_CACHE`), so its readers' `read`, `info` and `wait`
  need no query, and a `claim` of one known to match the file within `poll_interval` (read
  back in a commit since, or no other process has committed since: the writer connection's
  ``PRAGMA data_version``, read in every batch) answers without a transaction; a change made
  elsewhere (abort, delete) is met by the producer's next write or renewal, and drops the copy.
  When the producer's `finish` commits, the copy keeps the final snapshot (no bytes) for
  `poll_interval`, so the readers that followed the stream to its end learn how it ended
  without a query each.
- Readers in this process are woken by a `Notifier` after every write; readers in other
  processes can't be, so one poller task per store queries the version of every stream its
  readers wait on, in one query every `poll_interval`. Not those this process produces: their
  changes come through it (another process's abort or delete of one reaches its producer at
  the next write or lease renewal, and its readers here with it).

aiosqlite is asyncio-only: under trio, `open` raises `ConfigurationError` (use `MemoryStore`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aiosqlite
import anyio

from ..exceptions import ConfigurationError
from ._base import (
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    LocalCopy,
    Notifier,
    StoreError,
    StreamInfo,
    effective,
    is_claimable,
    join,
    new_token,
)

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

#: Page cache per connection, in KiB (SQLite's default is 2,000).
PAGE_CACHE_KIB = 256
#: Bumped when the schema changes incompatibly (kept in ``PRAGMA user_version``).
SCHEMA_VERSION = 1
#: Appends larger than this are stored as several segments, so a read never loads more than
#: about this much of a segment it only needs part of.
MAX_SEGMENT = 1 << 20
#: Streams listed per query by `scan` (no read transaction stays open between pages).
SCAN_PAGE = 256
#: Most queued writes committed in one transaction by the batch writer.
MAX_BATCH = 512
#: Stream ids per ``IN (...)`` list (well under SQLite's bound-parameter limit).
IDS_PER_QUERY = 500
#: Recently appended bytes kept in memory per stream this process produces, to serve its
#: local readers without a query.
TAIL_CACHE = 64 << 10
#: `_Known` of a stream that is absent (or expired).
_ABSENT = ("", -1)


@dataclass
class _Op:
    """One fenced write waiting for the batch writer: `sql` run with each of `params` (several
    for an append split into segments: all or none of them land)."""

    stream_id: str
    sql: str
    params: list[dict[str, Any]]
    kind: str  # "append", "start", "renew", "finish", "update", "attach"
    data: bytes = b""
    ok: bool = False
    future: asyncio.Future[bool] | None = None


@dataclass
class _Cached(LocalCopy):
    headers: str | None = None
    """``streams.headers`` as stored, so the parsed ``info.headers`` is reused while equal."""
    confirmed: float = 0.0
    """When (monotonic) `info` was last read back from the database, in a commit."""


def _apply_batch(conn: sqlite3.Connection, ops: list[_Op]) -> tuple[list[sqlite3.Row], int, float]:
    """In the writer's thread, in a transaction: every op, then the rows they touched; with
    the connection's ``data_version`` (it changes when another connection — another process —
    commits) and when it was read (no other process commits until this transaction does)."""
    ((data_version,),) = conn.execute("PRAGMA data_version").fetchall()
    checked = time.monotonic()
    for op in ops:
        if len(op.params) == 1:
            op.ok = conn.execute(op.sql, op.params[0]).rowcount == 1
        else:
            conn.execute("SAVEPOINT op")
            op.ok = conn.executemany(op.sql, op.params).rowcount == len(op.params)
            if not op.ok:
                conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
    ids = list(dict.fromkeys(op.stream_id for op in ops))
    rows: list[sqlite3.Row] = []
    for at in range(0, len(ids), IDS_PER_QUERY):
        chunk = ids[at : at + IDS_PER_QUERY]
        rows += conn.execute(
            f"SELECT {_COLUMNS} FROM streams WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
    return rows, data_version, checked


def _in_transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]) -> _T:
    """In the writer's thread: `body` as one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return result


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS streams (
        id TEXT PRIMARY KEY,
        generation TEXT NOT NULL,
        state TEXT NOT NULL,
        version INTEGER NOT NULL,
        size INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        readers INTEGER NOT NULL,
        status_code INTEGER,
        headers TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL,
        lease_expires_at REAL,
        retain INTEGER NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS streams_by_expiry ON streams (expires_at)
        WHERE expires_at IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS segments (
        stream_id TEXT NOT NULL,
        start INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (stream_id, start)
    )""",
    # Appending a segment advances its stream in the same statement, so an append is one
    # statement: atomic without an explicit transaction, and one thread hop instead of four.
    """CREATE TRIGGER IF NOT EXISTS segment_appended AFTER INSERT ON segments BEGIN
        UPDATE streams SET
            size = size + length(NEW.data),
            chunks = chunks + NEW.chunks,
            version = version + 1,
            updated_at = (julianday('now') - 2440587.5) * 86400.0
        WHERE id = NEW.stream_id;
    END""",
)

_INFO_COLUMNS = (
    "id",
    "generation",
    "state",
    "version",
    "size",
    "chunks",
    "readers",
    "status_code",
    "headers",
    "created_at",
    "updated_at",
    "expires_at",
    "lease_expires_at",
    "retain",
)
_COLUMNS = ", ".join(_INFO_COLUMNS)
_LIVE = "(expires_at IS NULL OR expires_at > :now)"
_OWNED = "id = :id AND generation = :token AND state = 'running'"

# Fenced: inserts nothing unless the lease is the stream's current one. Starts at the end.
_APPEND = (
    "INSERT INTO segments (stream_id, start, chunks, data) "
    f"SELECT id, size, :chunks, :data FROM streams WHERE {_OWNED}"
)

# One statement, so one snapshot: the stream's row (start = -1), then the part of each segment
# that overlaps [:off, :end). The segment holding :off is found through the primary key;
# substr() on a BLOB counts bytes.
_READ = f"""
SELECT -1 AS start, {_COLUMNS}, NULL AS part FROM streams WHERE id = :id AND {_LIVE}
UNION ALL
SELECT start, {", ".join(["NULL"] * len(_INFO_COLUMNS))},
       substr(data, max(:off - start, 0) + 1, :end - max(start, :off))
FROM segments
WHERE stream_id = :id AND start < :end AND start >= coalesce(
    (SELECT max(start) FROM segments WHERE stream_id = :id AND start <= :off), 0)
ORDER BY start
"""


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

    Needs ``pip install "durable-asgi[sqlite]"`` and an asyncio event loop (aiosqlite is
    asyncio-only). Call `close` at shutdown (the middleware does it from lifespan): an open
    connection's thread keeps the interpreter from exiting.
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
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._open_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._notifier = Notifier()
        self._next_purge = 0.0
        # The batch writer: queued fenced writes of every stream, committed together.
        self._queue: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        # What this process knows of streams: (generation, version) per stream (monotonic per
        # generation), the tails of the streams it produces, and one poller for all waiters.
        self._known: dict[str, tuple[str, int]] = {}
        self._cache: dict[str, _Cached] = {}
        self._settled: collections.deque[tuple[float, str]] = collections.deque()
        # The writer's `data_version` at the last batch; since when it has been that (no other
        # process has committed from `_quiet_since` to `_quiet_until`, monotonic times).
        self._data_version: int | None = None
        self._quiet_since = self._quiet_until = 0.0
        self._watchers: dict[str, int] = {}
        self._poller: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, poll_interval={self.poll_interval})"

    # -- connections -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "SQLiteStore needs an asyncio event loop (aiosqlite is asyncio-only), but this "
                "is running on another one (trio?): run the server on asyncio, or use "
                "MemoryStore()"
            ) from None
        async with self._open_lock:
            if self._writer is not None:
                return
            with anyio.CancelScope(shield=True):
                writer = reader = None
                try:
                    writer = await self._connect()
                    # WAL lets readers (this store's reader connection, other processes) read
                    # while one writer writes; NORMAL skips the fsync per commit.
                    await writer.execute("PRAGMA journal_mode = WAL")
                    await writer.execute("PRAGMA synchronous = NORMAL")
                    await self._create_schema(writer)
                    reader = await self._connect()
                    await reader.execute("PRAGMA query_only = ON")
                except BaseException as exc:
                    for conn in (reader, writer):
                        if conn is not None:
                            await conn.close()
                    if isinstance(exc, sqlite3.Error):
                        raise StoreError(f"can't open SQLite store {self.path!r}: {exc}") from exc
                    raise
                self._writer, self._reader = writer, reader

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            poller, self._poller = self._poller, None
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(BaseException):
                    await poller
            flusher = self._flusher
            if flusher is not None:  # commit what is queued
                with contextlib.suppress(BaseException):
                    await flusher
            self._cache.clear()
            self._known.clear()
            async with self._open_lock:
                async with self._write_lock:  # let a transaction in flight finish
                    writer, self._writer = self._writer, None
                reader, self._reader = self._reader, None
                for conn in (reader, writer):
                    if conn is not None:
                        # Closing anyway: the file is consistent (WAL).
                        with contextlib.suppress(sqlite3.Error):
                            await conn.close()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        # A small page cache: the writer appends at the end of the table and readers read what
        # was just written (the OS caches the file anyway). SQLite's default, 2 MB per
        # connection, filled up with written pages and stayed allocated in each connection's
        # thread (about 1.5 MiB of the worker's RSS per connection after a large stream).
        await conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        return conn

    async def _create_schema(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")  # one process creates, the others wait and see it
        try:
            (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path!r} was written by a newer durable_asgi (schema {version}): "
                    "upgrade durable_asgi or use another file"
                )
            for statement in _SCHEMA:
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")

    async def _connections(self) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
        if self._writer is None or self._reader is None:
            await self.open()
        if self._writer is None or self._reader is None:
            raise StoreError(f"SQLite store {self.path!r} was closed while in use")
        return self._writer, self._reader

    async def _query(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        """One SELECT on the reader connection: a consistent snapshot, concurrent with writes."""
        _, reader = await self._connections()
        try:
            return list(await reader.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc

    async def _write(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `body` in the writer's thread as one ``BEGIN IMMEDIATE`` transaction — one
        thread hop, however many statements —, alone on the writer connection and shielded so
        cancellation can't leave it half-done."""
        await self._connections()
        return await self._run(body)

    async def _run(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """`_write` on the connection as it is (never reopening a closed store)."""
        async with self._write_lock:
            writer = self._writer
            if writer is None:
                raise StoreError(f"SQLite store {self.path!r} was closed while in use")
            with anyio.CancelScope(shield=True):
                try:
                    result: _T = await cast(Any, writer)._execute(
                        _in_transaction, cast(Any, writer)._conn, body
                    )
                except (sqlite3.Error, ValueError) as exc:
                    raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc
        return result

    async def _batched(self, op: _Op) -> bool:
        """Queue `op` for the batch writer and wait (shielded) until it is committed: True if
        it applied (its fence held). Writes of one stream commit in the order they were queued."""
        await self._connections()
        op.future = asyncio.get_running_loop().create_future()
        self._queue.append(op)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        with anyio.CancelScope(shield=True):
            await asyncio.wait([op.future])
        return op.future.result()

    async def _flush(self) -> None:
        """The batch writer: commits everything queued in one transaction (one thread hop),
        while the next batch queues up behind it."""
        try:
            while self._queue:
                ops, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    batch = await self._run(functools.partial(_apply_batch, ops=ops))
                except BaseException as exc:
                    for op in ops:
                        assert op.future is not None
                        if not op.future.done():
                            op.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self._committed(ops, *batch)
        finally:
            self._flusher = None
            for op in self._queue if self._writer is None else ():
                assert op.future is not None
                if not op.future.done():
                    op.future.set_exception(StoreError(f"SQLite store {self.path!r} was closed"))

    def _committed(
        self, ops: list[_Op], rows: list[sqlite3.Row], data_version: int, checked: float
    ) -> None:
        """A batch committed: refresh what this process knows, answer the callers, wake."""
        if data_version != self._data_version:  # another process committed since the last one
            self._data_version, self._quiet_since = data_version, checked
        self._quiet_until = checked
        appended: dict[str, list[bytes]] = {}
        for op in ops:
            if op.kind in ("append", "start") and op.ok:
                appended.setdefault(op.stream_id, [])
                if op.data:
                    appended[op.stream_id].append(op.data)
        finished = {op.stream_id for op in ops if op.kind == "finish" and op.ok}
        for row in rows:
            stream_id, generation = row["id"], row["generation"]
            self._known[stream_id] = (generation, row["version"])  # exact: as committed
            cached = self._cache.get(stream_id)
            if row["state"] != "running":
                if cached is None:
                    continue
                if stream_id in finished and cached.info.generation == generation:
                    self._settle(cached, row, checked)
                else:
                    del self._cache[stream_id]
                continue
            parts = appended.get(stream_id)
            if cached is None or cached.info.generation != generation:
                if parts is None:  # not produced here (attach): nothing to cache
                    continue
                cached = self._cache[stream_id] = _Cached(_to_info(row), keep=TAIL_CACHE)
            info = _to_info(row, cached.info if cached.headers == row["headers"] else None)
            cached.headers, cached.confirmed = row["headers"], checked
            cached.update(info, parts or ())
        for op in ops:
            if not op.ok and op.kind != "attach":
                self._cache.pop(op.stream_id, None)
            assert op.future is not None
            if not op.future.done():
                op.future.set_result(op.ok)
        # Renewals change nothing readers see; a failed one drops the copy (the lease was lost).
        changed = {
            op.stream_id for op in ops if op.kind != "attach" and (op.kind != "renew" or not op.ok)
        }
        for stream_id in changed:
            self._notifier.notify(stream_id)

    def _current(self, cached: _Cached) -> bool:
        """Whether `cached` is known to match the file as of less than `poll_interval` ago:
        read back in a commit since, or no other process has committed since it was."""
        as_of = cached.confirmed
        if self._quiet_since <= as_of:
            as_of = max(as_of, self._quiet_until)
        return time.monotonic() - as_of < self.poll_interval

    def _settle(self, cached: _Cached, row: sqlite3.Row, now: float) -> None:
        """This process's `finish` of the stream committed as `row`: keep the final snapshot
        for `poll_interval`, then drop it (`_local`; or here, on a later finish)."""
        cached.settle(_to_info(row, cached.info if cached.headers == row["headers"] else None))
        cached.headers, cached.confirmed = row["headers"], now
        settled = self._settled
        settled.append((now, row["id"]))
        while settled and now - settled[0][0] >= self.poll_interval:
            _, stream_id = settled.popleft()
            self._local(stream_id)

    def _local(self, stream_id: str) -> _Cached | None:
        """This process's copy of the stream, if it has one that may be served: a running
        stream's (kept current by its writes here), or a finished one's younger than
        `poll_interval` (dropped after that: another process may delete or rerun it)."""
        cached = self._cache.get(stream_id)
        if (
            cached is not None
            and cached.info.finished
            and time.monotonic() - cached.confirmed >= self.poll_interval
        ):
            del self._cache[stream_id]
            return None
        return cached

    def _observe(self, stream_id: str, seen: tuple[str, int], *, exact: bool = False) -> bool:
        """Record the stream's (generation, version) as seen now; True if that's a change.
        A same-generation observation older than what we know (a query that raced a commit)
        is ignored."""
        known = self._known.get(stream_id)
        if known is not None and known[0] == seen[0] and known[1] >= seen[1] and not exact:
            return False
        self._known[stream_id] = seen
        cached = self._cache.get(stream_id)
        if cached is not None and (cached.info.generation, cached.info.version) != seen:
            del self._cache[stream_id]  # changed elsewhere (abort, delete, takeover)
        return known != seen

    def _forget(self, stream_id: str) -> None:
        self._cache.pop(stream_id, None)
        self._known.pop(stream_id, None)

    async def _update_owned(
        self, lease: Lease, assignments: str, kind: str = "update", **params: Any
    ) -> None:
        """One fenced UPDATE of the lease's stream; `LeaseLost` if the lease isn't current."""
        op = _Op(
            lease.stream_id,
            f"UPDATE streams SET {assignments} WHERE {_OWNED}",
            [{"id": lease.stream_id, "token": lease.token, **params}],
            kind,
        )
        if not await self._batched(op):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")

    # -- Store protocol ----------------------------------------------------------------------

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        cached = self._local(stream_id)
        if cached is not None and self._current(cached):
            # Produced here, and known to match the file within the last poll interval (the
            # staleness cross-process waits have anyway): running, so not claimable — no
            # transaction, so joining a busy worker's stream costs no trip to its writer.
            info = effective(cached.info)
            if info.state == "running":
                return info
        if time.time() >= self._next_purge:
            self._next_purge = time.time() + self.purge_interval
            await self.purge_expired()

        def body(db: sqlite3.Connection) -> tuple[Lease, sqlite3.Row] | StreamInfo:
            now = time.time()
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM streams WHERE id = :id", {"id": stream_id}
            ).fetchall()
            old = _to_info(rows[0]) if rows else None
            live = old if old is not None and not _expired(old, now) else None
            if live is not None and not is_claimable(live, now, replace):
                return effective(live, now)
            if old is not None:
                db.execute("DELETE FROM segments WHERE stream_id = ?", (stream_id,))
            token = new_token()
            db.execute(
                f"INSERT OR REPLACE INTO streams ({_COLUMNS}) VALUES "
                "(:id, :token, 'running', :version, 0, 0, :readers, NULL, NULL, :now, :now, "
                "NULL, :lease_expires_at, 1)",
                {
                    "id": stream_id,
                    "token": token,
                    # Versions keep growing across generations of one row (see `wait`).
                    "version": 1 if old is None else old.version + 1,
                    "readers": 0 if live is None else live.readers,
                    "now": now,
                    "lease_expires_at": now + lease_seconds,
                },
            )
            row = db.execute(f"SELECT {_COLUMNS} FROM streams WHERE id = :id", {"id": stream_id})
            return Lease(stream_id, token), row.fetchone()

        result = await self._write(body)
        if isinstance(result, StreamInfo):
            return result
        lease, row = result
        # Produced here from now on: its readers here read this copy, kept current by its writes.
        self._forget(stream_id)
        self._known[stream_id] = (lease.token, row["version"])
        self._cache[stream_id] = _Cached(
            _to_info(row), keep=TAIL_CACHE, headers=row["headers"], confirmed=time.monotonic()
        )
        self._notifier.notify(stream_id)
        return lease

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        await self._update_owned(
            lease,
            "status_code = :status, headers = :headers, version = version + 1, updated_at = :now",
            "start",
            status=status,
            headers=_dump_headers(headers),
            now=time.time(),
        )

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        owned = {"id": lease.stream_id, "token": lease.token}
        if not data:
            if chunks:
                await self._update_owned(
                    lease,
                    "chunks = chunks + :chunks, version = version + 1, updated_at = :now",
                    chunks=chunks,
                    now=time.time(),
                )
            elif not await self._query(f"SELECT 1 FROM streams WHERE {_OWNED}", owned):
                raise LeaseLost(f"lease on {lease.stream_id!r} was lost")
            return
        view = memoryview(data)
        pieces = [
            {**owned, "chunks": 0 if start else chunks, "data": view[start : start + MAX_SEGMENT]}
            for start in range(0, len(data), MAX_SEGMENT)
        ]
        if len(pieces) == 1:
            pieces[0]["data"] = data
        if not await self._batched(_Op(lease.stream_id, _APPEND, pieces, "append", data)):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        # Not a visible change: no version bump, no wake-up.
        await self._update_owned(
            lease, "lease_expires_at = :until", "renew", until=time.time() + lease_seconds
        )

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
                now=now,
            )
        finally:
            # Not committed (or the lease was lost): readers meet the outcome in the file.
            cached = self._cache.get(lease.stream_id)
            if (
                cached is not None
                and cached.info.generation == lease.token
                and not cached.info.finished
            ):
                del self._cache[lease.stream_id]
                self._notifier.notify(lease.stream_id)

    async def info(self, stream_id: str) -> StreamInfo | None:
        now = time.time()
        cached = self._local(stream_id)
        if cached is not None:
            return effective(cached.info, now)
        rows = await self._query(
            f"SELECT {_COLUMNS} FROM streams WHERE id = :id AND {_LIVE}",
            {"id": stream_id, "now": now},
        )
        return effective(_to_info(rows[0]), now) if rows else None

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        now = time.time()
        offset = max(offset, 0)
        cached = self._local(stream_id)
        data = None if cached is None else cached.read(offset, limit)
        if cached is not None and data is not None:
            # Written through this process: the newest bytes are in memory.
            return effective(cached.info, now), data
        rows = await self._query(
            _READ, {"id": stream_id, "off": offset, "end": offset + max(limit, 0), "now": now}
        )
        if not rows or rows[0]["start"] != -1:  # absent or expired
            return None, b""
        info = effective(_to_info(rows[0]), now)
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
        known = self._known.get(stream_id)
        if known is None or known[0] != info.generation or known[1] < info.version:
            # Nothing (current) known here: ask the database.
            rows = await self._query(
                f"SELECT generation, version FROM streams WHERE id = :id AND {_LIVE}",
                {"id": stream_id, "now": time.time()},
            )
            seen = (rows[0]["generation"], rows[0]["version"]) if rows else _ABSENT
            self._observe(stream_id, seen)
            known = seen
        # A deleted and re-claimed stream may be back at the same version: compare both.
        if known != (info.generation, info.version):
            return
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return
        # Changes made in this process set `event`; other processes' are seen by the poller
        # (but for streams produced here: see the module's docstring).
        polled = stream_id not in self._cache
        if polled:
            self._watchers[stream_id] = self._watchers.get(stream_id, 0) + 1
            if self._poller is None:
                self._poller = asyncio.create_task(self._poll())
        try:
            await self._notifier.wait(stream_id, event, remaining)
        finally:
            if polled:
                left = self._watchers.pop(stream_id) - 1
                if left:
                    self._watchers[stream_id] = left

    async def _poll(self) -> None:
        """One poller for every stream this process's readers wait on: every `poll_interval`,
        one query for all of them; wakes the waiters of those that changed."""
        idle = 0.0
        try:
            while idle < 10 * self.poll_interval + 1.0:
                await anyio.sleep(self.poll_interval)
                ids = list(self._watchers)
                if not ids:
                    idle += self.poll_interval
                    continue
                idle = 0.0
                seen: dict[str, tuple[str, int]] = {}
                for at in range(0, len(ids), IDS_PER_QUERY):
                    chunk = ids[at : at + IDS_PER_QUERY]
                    params = {f"i{n}": sid for n, sid in enumerate(chunk)}
                    rows = await self._query(
                        f"SELECT id, generation, version FROM streams WHERE id IN "
                        f"({', '.join(':' + name for name in params)}) AND {_LIVE}",
                        {**params, "now": time.time()},
                    )
                    seen.update((row["id"], (row["generation"], row["version"])) for row in rows)
                for stream_id in ids:
                    if self._observe(stream_id, seen.get(stream_id, _ABSENT)):
                        self._notifier.notify(stream_id)
                for stream_id in [s for s in self._known if s not in self._watchers]:
                    if stream_id not in self._cache:
                        del self._known[stream_id]
        except StoreError:
            for stream_id in list(self._watchers):
                self._notifier.notify(stream_id)  # let them meet the error themselves
        finally:
            if self._poller is asyncio.current_task():
                self._poller = None

    async def attach(self, stream_id: str, delta: int) -> None:
        sql = "UPDATE streams SET readers = max(0, readers + :delta) WHERE id = :id"
        await self._batched(_Op(stream_id, sql, [{"id": stream_id, "delta": delta}], "attach"))

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        def body(db: sqlite3.Connection) -> int:
            now = time.time()
            # Only a running stream whose lease holds: one that ran out has already `failed`.
            cursor = db.execute(
                "UPDATE streams SET state = 'aborted', lease_expires_at = NULL, "
                "expires_at = :expires, version = version + 1, updated_at = :now "
                "WHERE id = :id AND state = 'running' "
                "AND (lease_expires_at IS NULL OR lease_expires_at >= :now)",
                {"id": stream_id, "now": now, "expires": now + ttl},
            )
            return cursor.rowcount

        aborted = await self._write(body) == 1
        self._forget(stream_id)
        if aborted:
            self._notifier.notify(stream_id)
        return aborted

    async def delete(self, stream_id: str) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            params = {"id": stream_id, "now": time.time()}
            cursor = db.execute(f"DELETE FROM streams WHERE id = :id AND {_LIVE}", params)
            existed = cursor.rowcount == 1
            db.execute("DELETE FROM streams WHERE id = :id", params)  # expired leftovers
            db.execute("DELETE FROM segments WHERE stream_id = :id", params)
            return existed

        existed = await self._write(body)
        self._forget(stream_id)
        self._notifier.notify(stream_id)
        return existed

    async def purge_expired(self) -> int:
        def body(db: sqlite3.Connection) -> list[str]:
            params = {"now": time.time()}
            rows = db.execute("SELECT id FROM streams WHERE expires_at <= :now", params)
            expired = [str(row["id"]) for row in rows.fetchall()]
            if expired:
                db.execute(
                    "DELETE FROM segments WHERE stream_id IN "
                    "(SELECT id FROM streams WHERE expires_at <= :now)",
                    params,
                )
                db.execute("DELETE FROM streams WHERE expires_at <= :now", params)
            return expired

        expired = await self._write(body)
        for stream_id in expired:
            self._forget(stream_id)
            self._notifier.notify(stream_id)
        return len(expired)

    async def scan(self) -> AsyncIterator[StreamInfo]:
        after = ""
        while True:
            now = time.time()
            rows = await self._query(
                f"SELECT {_COLUMNS} FROM streams WHERE id > :after AND {_LIVE} "
                f"ORDER BY id LIMIT {SCAN_PAGE}",
                {"after": after, "now": now},
            )
            for row in rows:
                yield effective(_to_info(row), now)
            if len(rows) < SCAN_PAGE:
                return
            after = rows[-1]["id"]


def _to_info(row: sqlite3.Row, same_headers: StreamInfo | None = None) -> StreamInfo:
    """The row as a `StreamInfo`; `same_headers`: one whose headers are the row's (not parsed
    again)."""
    headers = row["headers"]
    return StreamInfo(
        id=row["id"],
        state=row["state"],
        generation=row["generation"],
        version=row["version"],
        offset=row["size"],
        chunks=row["chunks"],
        readers=row["readers"],
        status_code=row["status_code"],
        headers=(
            same_headers.headers
            if same_headers is not None
            else None
            if headers is None
            else _load_headers(headers)
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        lease_expires_at=row["lease_expires_at"],
        retain=bool(row["retain"]),
    )


def _expired(info: StreamInfo, now: float) -> bool:
    return info.expires_at is not None and info.expires_at <= now


# Header names and values are bytes; latin-1 maps each byte to one code point, losslessly.
def _dump_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    return json.dumps(
        [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]
    )


def _load_headers(text: str) -> Headers:
    pairs: Sequence[Sequence[str]] = json.loads(text)
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs)
