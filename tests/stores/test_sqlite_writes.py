"""SQLiteStore's batch writer and its schema: set-based runs of appends, each stream fenced on
its own, one stream's writes in order within a batch, and files of schema 1 brought up to 2."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from durable_asgi.exceptions import StoreError
from durable_asgi.stores import Lease, LeaseLost, StreamInfo
from durable_asgi.stores._base import Write
from durable_asgi.stores.sqlite import SQLiteStore, _writes
from durable_asgi.stores.sqlite._schema import SCHEMA, SCHEMA_VERSION

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

LONG = 60.0
_T = TypeVar("_T")

#: The statements of schema 1 (durable_asgi before the set-based writer), as they were.
SCHEMA_1 = (
    *SCHEMA,
    """CREATE TRIGGER IF NOT EXISTS segment_appended AFTER INSERT ON segments BEGIN
        UPDATE streams SET
            size = size + length(NEW.data),
            chunks = chunks + NEW.chunks,
            version = version + 1,
            updated_at = (julianday('now') - 2440587.5) * 86400.0
        WHERE id = NEW.stream_id;
    END""",
)
COLUMNS_1 = (
    "id, generation, state, version, size, chunks, readers, status_code, headers, created_at, "
    "updated_at, expires_at, lease_expires_at, retain"
)


def write_schema_1(path: Path, streams: dict[str, tuple[str, str, list[bytes]]]) -> None:
    """A file as schema 1 wrote it: `streams` maps an id to (token, state, appended pieces),
    each piece inserted as schema 1's writer did (one segment; the trigger advances)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in SCHEMA_1:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    for sid, (token, state, pieces) in streams.items():
        db.execute(
            f"INSERT INTO streams ({COLUMNS_1}) VALUES (?, ?, 'running', 1, 0, 0, 0, 200, "
            "'[]', 0, 0, NULL, 1e12, 1)",
            (sid, token),
        )
        for piece in pieces:
            db.execute(
                "INSERT INTO segments (stream_id, start, chunks, data) "
                "SELECT id, size, 1, ? FROM streams WHERE id = ?",
                (piece, sid),
            )
        if state != "running":
            db.execute(
                "UPDATE streams SET state = ?, expires_at = 1e12, lease_expires_at = NULL, "
                "version = version + 1 WHERE id = ?",
                (state, sid),
            )
    db.close()


async def body_of(store: SQLiteStore, sid: str) -> tuple[StreamInfo, bytes]:
    info, data = await store.read(sid, 0, 1 << 30)
    assert info is not None
    return info, data


def segments(path: Path, sid: str) -> list[tuple[int, int, int]]:
    """(start, length, chunks) of each of the stream's segments, in order."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT start, length(data), chunks FROM segments WHERE stream_id = ? ORDER BY start",
            (sid,),
        ).fetchall()
    finally:
        db.close()
    return [tuple(row) for row in rows]


async def claimed(store: SQLiteStore, sids: Iterable[str]) -> list[Lease]:
    """A fresh lease on each of `sids`, in order."""
    leases = []
    for sid in sids:
        lease = await store.claim(sid, lease_seconds=LONG)
        assert isinstance(lease, Lease)
        leases.append(lease)
    return leases


async def statements(store: SQLiteStore, work: Awaitable[_T]) -> tuple[_T, list[str]]:
    """What `work` answers, and the SQL statements the store's writer ran meanwhile."""
    writer, _ = await store._db.connections()
    traced: list[str] = []
    await writer.run(lambda conn: conn.set_trace_callback(traced.append))
    try:
        return await work, traced
    finally:
        await writer.run(lambda conn: conn.set_trace_callback(None))


def record_transactions(monkeypatch: pytest.MonkeyPatch, store: SQLiteStore) -> list[Any]:
    calls: list[Any] = []
    real = store._db.transaction

    async def recording(body: Any) -> Any:
        calls.append(body)
        return await real(body)

    monkeypatch.setattr(store._db, "transaction", recording)
    return calls


async def test_sqlite_file_of_schema_1_is_migrated_and_its_streams_read_byte_for_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "durable.db"
    pieces = [b"first ", b"\x00\xffbinary\n", b"last"]
    write_schema_1(
        path,
        {
            "/done#1": ("t-done", "complete", pieces),
            "/live#1": ("t-live", "running", [b"so far "]),
        },
    )
    store, second = SQLiteStore(path), SQLiteStore(path)
    try:
        # Two processes of this version open the old file together: one migrates, under the
        # same lock as the schema's creation, the other finds it done.
        await asyncio.gather(store.open(), second.open())
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
        db.close()
        for reader in (store, second):
            done, data = await body_of(reader, "/done#1")
            assert (done.state, done.offset, done.chunks, data) == (
                "complete",
                len(b"".join(pieces)),
                3,
                b"".join(pieces),
            )
            assert (await reader.read("/done#1", 7, 5))[1] == b"\xffbina"
        # A stream left running: its producer's lease goes on appending, advanced once.
        lease = Lease("/live#1", "t-live")
        await store.append(lease, b"and more", chunks=2)
        await store.finish(lease, "complete", ttl=LONG, retain=True)
        live, data = await body_of(second, "/live#1")
        assert (live.state, live.offset, live.chunks, data) == (
            "complete",
            15,
            3,
            b"so far and more",
        )
        assert segments(path, "/live#1") == [(0, 7, 1), (7, 8, 2)]
    finally:
        await store.close()
        await second.close()


async def test_sqlite_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer durable_asgi"):
        await store.open()
    await store.close()


async def test_sqlite_batch_of_split_and_whole_appends_fences_each_stream_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch (one transaction) of several streams' appends, some split into segments:
    the stream whose lease was lost gets none of its segments; the others land byte for
    byte, each split append in order, as one change."""
    monkeypatch.setattr(_writes, "MAX_SEGMENT", 4)
    path = tmp_path / "durable.db"
    store, other = SQLiteStore(path), SQLiteStore(path)
    try:
        sids = ["/a#1", "/b#1", "/lost#1", "/c#1"]
        leases = dict(zip(sids, await claimed(store, sids), strict=True))
        for lease in leases.values():
            await store.append(lease, b"<", chunks=1)
        assert await other.abort("/lost#1", ttl=LONG)
        bodies = {
            "/a#1": b"0123456789",  # three segments
            "/b#1": b"ab",  # one
            "/lost#1": b"never stored",
            "/c#1": b"wxyz",  # exactly one
        }
        before = {sid: (await body_of(other, sid))[0].version for sid in sids}
        transactions = record_transactions(monkeypatch, store)
        outcomes = await store.write_many(
            [
                Write(leases[sid], (200, ()) if sid == "/c#1" else None, bodies[sid], 3)
                for sid in sids
            ]
        )
        assert len(transactions) == 1
        assert [type(outcome) for outcome in outcomes] == [
            type(None),
            type(None),
            LeaseLost,
            type(None),
        ]
        for sid in ("/a#1", "/b#1", "/c#1"):
            info, data = await body_of(other, sid)
            assert data == b"<" + bodies[sid]
            assert (info.offset, info.chunks, info.state) == (len(data), 4, "running")
            assert info.version == before[sid] + (2 if sid == "/c#1" else 1)
            assert (await body_of(store, sid))[1] == data  # this process's copy agrees
        assert segments(path, "/a#1") == [(0, 1, 1), (1, 4, 3), (5, 4, 0), (9, 2, 0)]
        assert segments(path, "/b#1") == [(0, 1, 1), (1, 2, 3)]
        assert (await body_of(other, "/c#1"))[0].status_code == 200
        lost, data = await body_of(other, "/lost#1")
        assert (lost.state, data) == ("aborted", b"<")
        assert segments(path, "/lost#1") == [(0, 1, 1)]
        assert (await body_of(store, "/lost#1"))[0].state == "aborted"
    finally:
        await store.close()
        await other.close()


async def test_sqlite_one_streams_writes_in_one_batch_apply_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heads, appends and finishes of several streams queued together commit in one
    transaction, each stream's in the order queued (its second append after its first, its
    finish last), whatever the runs they are grouped into."""
    path = tmp_path / "durable.db"
    store, other = SQLiteStore(path), SQLiteStore(path)
    try:
        leases = await claimed(store, (f"/s#{n}" for n in range(3)))
        transactions = record_transactions(monkeypatch, store)
        calls = []
        for n, lease in enumerate(leases):
            calls += [
                store.start(lease, 201, ((b"x-n", str(n).encode()),)),
                store.append(lease, f"one-{n} ".encode(), chunks=1),
                store.append(lease, f"two-{n}".encode(), chunks=1),
                store.finish(lease, "complete", ttl=LONG, retain=True),
            ]
        await asyncio.gather(*calls)
        assert len(transactions) == 1
        for n in range(3):
            info, data = await body_of(other, f"/s#{n}")
            assert data == f"one-{n} two-{n}".encode()
            assert (info.state, info.status_code, info.chunks) == ("complete", 201, 2)
            assert info.headers == ((b"x-n", str(n).encode()),)
        # The batch's second run of appends came after the first: two segments each.
        assert [len(segments(path, f"/s#{n}")) for n in range(3)] == [2, 2, 2]
        # A write queued after the finish, in the same batch, is refused.
        (lease,) = await claimed(store, ["/late#1"])
        results = await asyncio.gather(
            store.finish(lease, "complete", ttl=LONG, retain=True),
            store.append(lease, b"too late", chunks=1),
            return_exceptions=True,
        )
        assert results[0] is None and isinstance(results[1], LeaseLost)
        assert (await body_of(other, "/late#1"))[1] == b""
    finally:
        await store.close()
        await other.close()


async def test_sqlite_a_run_of_appends_is_a_few_statements_however_many_streams(
    tmp_path: Path,
) -> None:
    """300 streams' appends in one batch: a handful of statements (each a step of sqlite3,
    around which the GIL is handed over), not one per stream; every stream lands."""
    store = SQLiteStore(tmp_path / "durable.db")
    try:
        leases = await claimed(store, (f"/many#{n}" for n in range(300)))
        outcomes, traced = await statements(
            store,
            store.write_many(
                [Write(lease, None, f"token {n}".encode(), 1) for n, lease in enumerate(leases)]
            ),
        )
        assert outcomes == [None] * 300
        # BEGIN, data_version, 5 INSERTs of 64 staged rows at most, UPDATE, INSERT, SELECT,
        # DELETE, COMMIT.
        assert len(traced) == 12, traced
        for n in (0, 150, 299):
            assert (await body_of(store, f"/many#{n}"))[1] == f"token {n}".encode()
    finally:
        await store.close()


async def test_sqlite_renewals_are_a_few_statements_and_each_fenced(tmp_path: Path) -> None:
    """100 streams' renewals in one batch: a handful of statements, not one per stream; the
    stream aborted by another process is refused alone, every other lease runs from the
    batch's time, in the file exactly as in this process's copy (a reader another process
    counted in included)."""
    path = tmp_path / "durable.db"
    store, other = SQLiteStore(path), SQLiteStore(path)
    try:
        leases = await claimed(store, (f"/renew#{n}" for n in range(100)))
        assert await other.abort("/renew#7", ttl=LONG)
        await other.attach("/renew#3", 1)  # unseen here until a commit reads it back
        before = await other.info("/renew#3")
        assert before is not None and before.lease_expires_at is not None
        renewals = (store.renew(lease, lease_seconds=2 * LONG) for lease in leases)
        results, traced = await statements(store, asyncio.gather(*renewals, return_exceptions=True))
        assert [n for n, r in enumerate(results) if r is not None] == [7]
        assert isinstance(results[7], LeaseLost)
        # BEGIN, data_version, 2 INSERTs of staged rows, UPDATE, SELECT, DELETE, the refused
        # stream read again, COMMIT.
        assert len(traced) == 9, traced
        for n in (0, 3, 99):
            mine, theirs = await store.info(f"/renew#{n}"), await other.info(f"/renew#{n}")
            assert mine == theirs and theirs is not None
            assert theirs.lease_expires_at is not None
            assert theirs.lease_expires_at > before.lease_expires_at + LONG / 2
            assert theirs.readers == (1 if n == 3 else 0)
            assert store._known.local(f"/renew#{n}") is not None  # served from memory
        aborted = await store.info("/renew#7")
        assert aborted is not None and aborted.state == "aborted"
    finally:
        await store.close()
        await other.close()


async def test_sqlite_this_processs_copy_matches_the_file_field_by_field(tmp_path: Path) -> None:
    """After every kind of batch (a head with its first bytes, appends, a renewal between
    appends, a finish), the stream as this process knows it — from memory, moved on by what
    the appends changed — is the stream as the file has it, to the last bit of every time."""
    path = tmp_path / "durable.db"
    store, other = SQLiteStore(path), SQLiteStore(path)

    async def same() -> None:
        mine, theirs = await store.info("/copy#1"), await other.info("/copy#1")
        assert mine == theirs
        assert store._known.local("/copy#1") is not None  # served from memory

    try:
        lease = await store.claim("/copy#1", lease_seconds=LONG)
        assert isinstance(lease, Lease)
        await store.write_many([Write(lease, (200, ((b"x-a", b"1"),)), b"first ", 1)])
        await same()
        await store.append(lease, b"second ", chunks=1)
        await same()
        await other.attach("/copy#1", 1)  # another process's reader: not this one's change
        await asyncio.gather(
            store.append(lease, b"third ", chunks=1),
            store.renew(lease, lease_seconds=LONG),
            store.append(lease, b"fourth", chunks=1),
        )
        await same()
        info = await store.info("/copy#1")
        assert info is not None
        assert (info.offset, info.chunks, info.readers) == (25, 4, 1)
        await store.finish(lease, "complete", ttl=LONG, retain=True)
        await same()
        assert (await body_of(other, "/copy#1"))[1] == b"first second third fourth"
    finally:
        await store.close()
        await other.close()


async def test_sqlite_older_than_the_statements_need_is_refused_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    store = SQLiteStore(tmp_path / "durable.db")
    with pytest.raises(StoreError, match=r"SQLite >= 3\.35\.0"):
        await store.open()
    await store.close()
