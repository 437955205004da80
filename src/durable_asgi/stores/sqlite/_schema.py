"""The SQLite file's schema, the SQL text the store runs, and rows turned into `StreamInfo`.

Two tables: ``streams`` (one row of metadata per stream) and ``segments`` (the body as rows of
``(stream_id, start, data)``, keyed by both), so a read from any offset is one indexed range
query, and a read is a *single* SELECT of the stream's row and its segments, which is what
makes its snapshot atomic.
"""

from __future__ import annotations

import functools
import sqlite3

from .._base import StoreError
from .._base import info_from_row as to_info

__all__ = ["to_info"]  # rows to `StreamInfo`: shared with PostgreSQL, named as here before

#: Bumped when the schema changes incompatibly (kept in ``PRAGMA user_version``). 2: no
#: ``segment_appended`` trigger (appends advance their streams themselves: `ADVANCE_STAGED`).
SCHEMA_VERSION = 2
#: The oldest SQLite the statements run on: ``UPDATE … FROM`` (3.33) and ``RETURNING`` (3.35).
MIN_SQLITE = (3, 35, 0)

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
#: The stream ``:id`` while ``:token`` is its current lease and the lease hasn't run out by
#: ``:now`` (the batch's time, one for all its statements: `apply_batch` binds it): the fence
#: of every producer write. A lease that ran out is lost for good, even before another
#: producer takes the stream over: its readers were already told the stream `failed`.
OWNED = (
    "id = :id AND generation = :token AND state = 'running' "
    "AND (lease_expires_at IS NULL OR lease_expires_at >= :now)"
)

SELECT_STREAM = f"SELECT {COLUMNS} FROM streams WHERE id = :id"
SELECT_LIVE_STREAM = f"{SELECT_STREAM} AND {LIVE}"

# A run of appends (one per stream) is staged in this table of the writer's connection (one
# row per segment: `rel` is its offset within its append, `size` the append's whole length,
# `chunks` the append's on its first segment and 0 on the others), then applied by three
# statements, however many streams: `ADVANCE_STAGED`, `APPEND_STAGED`, `ADVANCED`. Few
# statements, each one step, not a step per stream: sqlite3 hands the GIL over around every
# step, and on a busy event loop each hand-over waits for the loop's thread to let go of it.
CREATE_STAGED = """CREATE TEMP TABLE IF NOT EXISTS staged (
    id TEXT NOT NULL,
    token TEXT NOT NULL,
    rel INTEGER NOT NULL,
    size INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    data BLOB NOT NULL
)"""
#: Rows staged per INSERT statement (6 parameters each).
STAGE_ROWS = 64
#: `OWNED` for each staged row `s` and its stream `t`.
STAGED_OWNED = (
    "t.id = s.id AND t.generation = s.token AND t.state = 'running' "
    "AND (t.lease_expires_at IS NULL OR t.lease_expires_at >= :now)"
)
# Advances each stream whose lease holds by its staged append. First, so `APPEND_STAGED` sees
# the streams advanced: each segment starts at the stream's new size less its append, plus
# its offset in it.
ADVANCE_STAGED = (
    "UPDATE streams AS t SET size = t.size + s.size, chunks = t.chunks + s.chunks, "
    "version = t.version + 1, updated_at = :now "
    f"FROM staged AS s WHERE s.rel = 0 AND {STAGED_OWNED}"
)
# The segments of the streams just advanced (the same fence, at the same `:now`: all of an
# append's or none). In key order: the index pages each touches are visited once, in order.
APPEND_STAGED = (
    "INSERT INTO segments (stream_id, start, chunks, data) "
    "SELECT s.id, t.size - s.size + s.rel, s.chunks, s.data "
    f"FROM staged AS s JOIN streams AS t ON {STAGED_OWNED} ORDER BY s.id, s.rel"
)
# What the appends changed in the rows of the streams advanced (the fence holds for exactly
# those), as committed: one JSON array of ``[id, generation, version, size, chunks, readers]``,
# one row (so one step) however many streams. Integers and text only: JSON keeps them exact.
ADVANCED = (
    "SELECT json_group_array(json_array(t.id, t.generation, t.version, t.size, t.chunks, "
    f"t.readers)) FROM staged AS s JOIN streams AS t ON {STAGED_OWNED} WHERE s.rel = 0"
)


# A run of renewals (staged as appends are, with no data) is one UPDATE and one SELECT of
# what it renewed, however many streams: the new expiry is the batch's time plus
# ``:seconds``, which this process computes alike (one double addition), so only each id
# comes back, with ``readers`` (which another process's `ATTACH` changes without touching
# the lease: with it, the copy is the row).
RENEW_STAGED = (
    "UPDATE streams AS t SET lease_expires_at = :now + :seconds "
    f"FROM staged AS s WHERE {STAGED_OWNED}"
)
RENEWED = (
    "SELECT json_group_array(json_array(t.id, t.readers)) "
    f"FROM staged AS s JOIN streams AS t ON {STAGED_OWNED}"
)


@functools.lru_cache(maxsize=STAGE_ROWS)
def stage(rows: int) -> str:
    """The INSERT of `rows` staged rows."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO staged (id, token, rel, size, chunks, data) VALUES {values}"


ATTACH = f"UPDATE streams SET readers = max(0, readers + :delta) WHERE id = :id RETURNING {COLUMNS}"

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
    """A fenced UPDATE of the lease's stream setting `assignments`, answering its row."""
    return f"UPDATE streams SET {assignments} WHERE {OWNED} RETURNING {COLUMNS}"


def create_schema(conn: sqlite3.Connection, path: str) -> None:
    """In the writer's thread: create the tables, or check that the file's are ours and bring
    an older schema up to date (1: drop the trigger). Every process of this version does the
    same, in turn, under one lock: the first migrates, the others find it done."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StoreError(
            f"SQLiteStore needs SQLite >= {'.'.join(map(str, MIN_SQLITE))}, but Python's "
            f"sqlite3 uses {sqlite3.sqlite_version}"
        )
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
        # Version 1 advanced a stream from a trigger on each inserted segment: the appends of
        # this version advance it themselves (twice, with the trigger). Existing rows stand.
        conn.execute("DROP TRIGGER IF EXISTS segment_appended")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
