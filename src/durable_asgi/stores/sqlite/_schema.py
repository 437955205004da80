"""The SQLite file's schema, the SQL text the store runs, and rows turned into `StreamInfo`.

Two tables: ``streams`` (one row of metadata per stream) and ``segments`` (the body as rows of
``(stream_id, start, data)``, keyed by both), so a read from any offset is one indexed range
query, and a read is a *single* SELECT of the stream's row and its segments, which is what
makes its snapshot atomic.
"""

from __future__ import annotations

import sqlite3

from .._base import StoreError
from .._base import info_from_row as to_info

__all__ = ["to_info"]  # rows to `StreamInfo`: shared with PostgreSQL, named as here before

#: Bumped when the schema changes incompatibly (kept in ``PRAGMA user_version``).
SCHEMA_VERSION = 1

SCHEMA = (
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

INFO_COLUMNS = (
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
COLUMNS = ", ".join(INFO_COLUMNS)
#: Not expired (as of ``:now``).
LIVE = "(expires_at IS NULL OR expires_at > :now)"
#: The stream ``:id`` while ``:token`` is its current lease: the fence of every producer write.
OWNED = "id = :id AND generation = :token AND state = 'running'"

SELECT_STREAM = f"SELECT {COLUMNS} FROM streams WHERE id = :id"
SELECT_LIVE_STREAM = f"{SELECT_STREAM} AND {LIVE}"

# Fenced: inserts nothing unless the lease is the stream's current one. Starts at the end.
APPEND = (
    "INSERT INTO segments (stream_id, start, chunks, data) "
    f"SELECT id, size, :chunks, :data FROM streams WHERE {OWNED}"
)

ATTACH = "UPDATE streams SET readers = max(0, readers + :delta) WHERE id = :id"

# One statement, so one snapshot: the stream's row (start = -1), then the part of each segment
# that overlaps [:off, :end). The segment holding :off is found through the primary key;
# substr() on a BLOB counts bytes.
READ = f"""
SELECT -1 AS start, {COLUMNS}, NULL AS part FROM streams WHERE id = :id AND {LIVE}
UNION ALL
SELECT start, {", ".join(["NULL"] * len(INFO_COLUMNS))},
       substr(data, max(:off - start, 0) + 1, :end - max(start, :off))
FROM segments
WHERE stream_id = :id AND start < :end AND start >= coalesce(
    (SELECT max(start) FROM segments WHERE stream_id = :id AND start <= :off), 0)
ORDER BY start
"""


def update_owned(assignments: str) -> str:
    """A fenced UPDATE of the lease's stream setting `assignments`."""
    return f"UPDATE streams SET {assignments} WHERE {OWNED}"


def create_schema(conn: sqlite3.Connection, path: str) -> None:
    """In the writer's thread: create the tables, or check that the file's are ours."""
    conn.execute("BEGIN IMMEDIATE")  # one process creates, the others wait and see it
    try:
        ((version,),) = conn.execute("PRAGMA user_version").fetchall()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path!r} was written by a newer durable_asgi (schema {version}): "
                "upgrade durable_asgi or use another file"
            )
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
