"""A store's connections to its SQLite file, each on a thread of its own.

`sqlite3` blocks, so each connection lives on a thread that runs its calls one at a time, in
order, and hands each result back to the event loop (``call_soon_threadsafe``): one hop per
call, and the connection is only ever used from the thread that opened it. `Database` pairs a
writer — one transaction at a time, under a lock, shielded from cancellation — with a reader,
so reads never wait behind writes (WAL mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio

from ...exceptions import ConfigurationError
from .._base import StoreError
from ._schema import CREATE_STAGED, create_schema

__all__ = ["PAGE_CACHE_KIB", "Connection", "Database"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: Page cache per connection, in KiB (SQLite's default is 2,000).
PAGE_CACHE_KIB = 256

#: A call for a connection's thread: the loop and future to answer through, and the call.
_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class Connection:
    """One `sqlite3` connection, used only from its own thread.

    Example::

        conn = await Connection.open("durable.db", busy_timeout=5.0)
        rows = await conn.fetchall("SELECT id FROM streams")
        await conn.close()
    """

    __slots__ = ("_calls", "_closed", "_conn")

    def __init__(self, calls: SimpleQueue[_Call | None], conn: sqlite3.Connection) -> None:
        self._calls = calls
        self._conn = conn
        self._closed = False

    @classmethod
    async def open(cls, path: str, *, busy_timeout: float, name: str = "sqlite") -> Connection:
        """Connect to `path` on a new thread (autocommit mode: transactions are explicit)."""
        calls: SimpleQueue[_Call | None] = SimpleQueue()
        # A daemon: a store that is never closed doesn't keep the interpreter from exiting
        # (SQLite rolls back a transaction cut short).
        threading.Thread(
            target=_serve, args=(calls,), name=f"durable-asgi-{name}", daemon=True
        ).start()
        try:
            conn = await _submit(calls, functools.partial(_connect, path, busy_timeout))
        except BaseException:
            calls.put(None)
            raise
        return cls(calls, conn)

    def __del__(self) -> None:
        # Dropped without `close`: let the thread end (the connection closes when collected).
        self._calls.put(None)

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """``fn(connection, *args, **kwargs)`` in the connection's thread."""
        if self._closed:  # `Database` maps this, like sqlite3's errors, to StoreError
            raise ValueError("connection closed")
        return await _submit(self._calls, functools.partial(fn, self._conn, *args, **kwargs))

    async def fetchall(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        """The rows of one statement."""
        return await self.run(_fetchall, sql, params)

    async def close(self) -> None:
        """Close the connection (after the calls already queued), then its thread."""
        if self._closed:
            return
        self._closed = True
        try:
            await _submit(self._calls, self._conn.close)
        finally:
            self._calls.put(None)


async def _submit(calls: SimpleQueue[_Call | None], call: Callable[[], _T]) -> _T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    calls.put((loop, future, call))
    return await future


def _serve(calls: SimpleQueue[_Call | None]) -> None:
    """A connection's thread: runs its calls until told to stop (None)."""
    while (item := calls.get()) is not None:
        loop, future, call = item
        try:
            result, error = call(), None
        except BaseException as exc:
            result, error = None, exc
        # The loop may be closed by now (asyncio.run ended without closing the store).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_answer, future, result, error)
        del item, future, call, result, error  # hold nothing while idle


def _answer(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class Database:
    """The writer and reader connections of one store to `path`, opened on first use.

    SQLite errors come out as `StoreError`. asyncio only: the threads hand results back to the
    event loop through it.
    """

    def __init__(self, path: str, *, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.writer: Connection | None = None
        self.reader: Connection | None = None
        self._open_lock = anyio.Lock()
        # asyncio's: taken without a turn of the event loop when free (anyio's always takes
        # one), and a transaction is taken per batch, on the path of every claim and write.
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        """Connect both, setting up WAL mode and the schema. Idempotent."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "SQLiteStore needs an asyncio event loop (its threads answer through it), but "
                "this is running on another one (trio?): run the server on asyncio, or use "
                "MemoryStore()"
            ) from None
        async with self._open_lock:
            if self.writer is not None:
                return
            with anyio.CancelScope(shield=True):
                writer = reader = None
                try:
                    writer = await Connection.open(
                        self.path, busy_timeout=self.busy_timeout, name="sqlite-writer"
                    )
                    await writer.run(_set_up_writer, self.path)
                    reader = await Connection.open(
                        self.path, busy_timeout=self.busy_timeout, name="sqlite-reader"
                    )
                    await reader.run(_execute, "PRAGMA query_only = ON")
                except BaseException as exc:
                    for conn in (reader, writer):
                        if conn is not None:
                            await conn.close()
                    if isinstance(exc, sqlite3.Error):
                        raise StoreError(f"can't open SQLite store {self.path!r}: {exc}") from exc
                    raise
                self.writer, self.reader = writer, reader

    async def close(self) -> None:
        """Close both, after the transaction in flight. Idempotent; a later use reopens."""
        with anyio.CancelScope(shield=True):
            async with self._open_lock:
                async with self._write_lock:  # let a transaction in flight finish
                    writer, self.writer = self.writer, None
                reader, self.reader = self.reader, None
                for conn in (reader, writer):
                    if conn is not None:
                        # Closing anyway: the file is consistent (WAL).
                        with contextlib.suppress(sqlite3.Error):
                            await conn.close()

    async def connections(self) -> tuple[Connection, Connection]:
        """(writer, reader), opening them first if needed."""
        if self.writer is None or self.reader is None:
            await self.open()
        if self.writer is None or self.reader is None:
            raise StoreError(f"SQLite store {self.path!r} was closed while in use")
        return self.writer, self.reader

    async def query(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        """One SELECT on the reader connection: a consistent snapshot, concurrent with writes."""
        _, reader = await self.connections()
        try:
            return await reader.fetchall(sql, params)
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc

    async def write(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """`transaction(body)`, opening the connections first if needed."""
        await self.connections()
        return await self.transaction(body)

    async def transaction(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `body` in the writer's thread as one ``BEGIN IMMEDIATE`` transaction — one
        thread hop, however many statements —, alone on the writer connection and shielded so
        cancellation can't leave it half-done. Never reopens a closed store."""
        async with self._write_lock:
            writer = self.writer
            if writer is None:
                raise StoreError(f"SQLite store {self.path!r} was closed while in use")
            with anyio.CancelScope(shield=True):
                try:
                    result = await writer.run(_in_transaction, body)
                except (sqlite3.Error, ValueError) as exc:
                    raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc
        return result


# -- in a connection's thread --------------------------------------------------------------------


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # A small page cache: the writer appends at the end of the table and readers read what
        # was just written (the OS caches the file anyway). SQLite's default, 2 MB per
        # connection, filled up with written pages and stayed allocated in each connection's
        # thread (about 1.5 MiB of the worker's RSS per connection after a large stream).
        conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    return conn


def _fetchall(conn: sqlite3.Connection, sql: str, params: Any) -> list[sqlite3.Row]:
    return conn.execute(sql, params).fetchall()


def _execute(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute(sql)


def _set_up_writer(conn: sqlite3.Connection, path: str) -> None:
    # WAL lets readers (this store's reader connection, other processes) read while one
    # writer writes; NORMAL skips the fsync per commit.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    create_schema(conn, path)
    # The batch writer's staging table (`_writes`): this connection's own, kept in memory.
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute(CREATE_STAGED)


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
