"""What runs in the writer's thread, inside one transaction (see `Database.transaction`).

Claims, producer writes (start, append, renew, finish) and `attach` are `Op`s — a fenced
statement each, or for a claim the `claim` function —, many of them, from every stream,
committed together by `apply_batch`: a worker that takes a thousand requests a second pays one
thread hop and one transaction per batch, not per request. Aborts, deletes and purges are a
transaction of their own each: `abort`, `delete`, `purge`.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._base import Lease, StreamInfo, effective, is_claimable, new_token
from ._schema import COLUMNS, LIVE, SELECT_STREAM, to_info

#: Stream ids per ``IN (...)`` list (well under SQLite's bound-parameter limit).
IDS_PER_QUERY = 500


@dataclass(frozen=True)
class Op:
    """One fenced write waiting for the batch writer: `sql` run with each of `params` (several
    for an append split into segments: all or none of them land) — or, for a ``claim``, the
    `claim` function with `claim_args` (lease seconds, replace)."""

    stream_id: str
    sql: str
    params: list[dict[str, Any]]
    kind: str  # "claim", "append", "start", "renew", "finish", "update", "attach"
    data: bytes = b""
    claim_args: tuple[float, bool] = (0.0, False)


#: What a claim answers: the new lease and its stream's row, or the stream that isn't claimable.
Claimed = tuple[Lease, sqlite3.Row] | StreamInfo


class Batch(NamedTuple):
    """What a committed batch of `Op`s tells the store."""

    applied: list[bool]
    """Per op: whether it applied (its fence held; a claim always applies)."""
    claims: dict[int, Claimed]
    """What each claim answered, by its index in the batch."""
    rows: list[sqlite3.Row]
    """The ``streams`` rows the ops touched, as committed."""
    data_version: int
    """The writer connection's ``PRAGMA data_version``: it changes when another connection —
    another process — commits."""
    checked: float
    """When (monotonic) `data_version` was read: no other process commits from then until
    this transaction does."""


def apply_batch(conn: sqlite3.Connection, ops: list[Op]) -> Batch:
    """Every op, then the rows they touched."""
    ((data_version,),) = conn.execute("PRAGMA data_version").fetchall()
    checked = time.monotonic()
    applied = []
    claims: dict[int, Claimed] = {}
    for i, op in enumerate(ops):
        if op.kind == "claim":
            claims[i] = claim(conn, op.stream_id, *op.claim_args)
            applied.append(True)
        elif len(op.params) == 1:
            applied.append(conn.execute(op.sql, op.params[0]).rowcount == 1)
        else:
            conn.execute("SAVEPOINT op")
            ok = conn.executemany(op.sql, op.params).rowcount == len(op.params)
            if not ok:
                conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            applied.append(ok)
    ids = list(dict.fromkeys(op.stream_id for op in ops))
    rows: list[sqlite3.Row] = []
    for at in range(0, len(ids), IDS_PER_QUERY):
        chunk = ids[at : at + IDS_PER_QUERY]
        rows += conn.execute(
            f"SELECT {COLUMNS} FROM streams WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
    return Batch(applied, claims, rows, data_version, checked)


def claim(db: sqlite3.Connection, stream_id: str, lease_seconds: float, replace: bool) -> Claimed:
    """A fresh running stream and its row if the stream is claimable, else the stream. The
    lease runs from now, when the claim commits, not from when it was asked for."""
    now = time.time()
    rows = db.execute(SELECT_STREAM, {"id": stream_id}).fetchall()
    old = to_info(rows[0]) if rows else None
    live = old if old is not None and not _expired(old, now) else None
    if live is not None and not is_claimable(live, now, replace):
        return effective(live, now)
    if old is not None:
        db.execute("DELETE FROM segments WHERE stream_id = ?", (stream_id,))
    token = new_token()
    db.execute(
        f"INSERT OR REPLACE INTO streams ({COLUMNS}) VALUES "
        "(:id, :token, 'running', :version, 0, 0, :readers, NULL, NULL, :now, :now, "
        "NULL, :lease_expires_at, 1)",
        {
            "id": stream_id,
            "token": token,
            # Versions keep growing across generations of one row (see `SQLiteStore.wait`).
            "version": 1 if old is None else old.version + 1,
            "readers": 0 if live is None else live.readers,
            "now": now,
            "lease_expires_at": now + lease_seconds,
        },
    )
    row = db.execute(SELECT_STREAM, {"id": stream_id})
    return Lease(stream_id, token), row.fetchone()


def abort(db: sqlite3.Connection, stream_id: str, ttl: float) -> bool:
    """Whether the stream was running and is now aborted."""
    now = time.time()
    # Only a running stream whose lease holds: one that ran out has already `failed`.
    cursor = db.execute(
        "UPDATE streams SET state = 'aborted', lease_expires_at = NULL, "
        "expires_at = :expires, version = version + 1, updated_at = :now "
        "WHERE id = :id AND state = 'running' "
        "AND (lease_expires_at IS NULL OR lease_expires_at >= :now)",
        {"id": stream_id, "now": now, "expires": now + ttl},
    )
    return cursor.rowcount == 1


def delete(db: sqlite3.Connection, stream_id: str) -> bool:
    """Whether the stream existed (and hadn't expired); removed either way."""
    params = {"id": stream_id, "now": time.time()}
    cursor = db.execute(f"DELETE FROM streams WHERE id = :id AND {LIVE}", params)
    existed = cursor.rowcount == 1
    db.execute("DELETE FROM streams WHERE id = :id", params)  # expired leftovers
    db.execute("DELETE FROM segments WHERE stream_id = :id", params)
    return existed


def purge(db: sqlite3.Connection) -> list[str]:
    """The ids of the expired streams, removed."""
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


def _expired(info: StreamInfo, now: float) -> bool:
    return info.expires_at is not None and info.expires_at <= now
