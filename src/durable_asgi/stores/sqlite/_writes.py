"""What runs in the writer's thread, inside one transaction (see `Database.transaction`).

Claims, producer writes (start, append, renew, finish) and `attach` are `Op`s, many of them,
from every stream, committed together by `apply_batch`: a worker that takes a thousand
requests a second pays one thread hop and one transaction per batch, not per request. The
batch is cut into runs of one kind (`runs`, as PostgreSQL's), and a run of appends — what a
flush at token pace is: one small append for each of hundreds of streams — is *set-based*: its
rows staged by a few multi-row INSERTs, then one UPDATE advancing every stream whose lease
holds, one INSERT of their segments and one SELECT answering what changed (`Advanced`, as one
JSON value), instead of a statement, a trigger and a re-read per stream — and a step of
sqlite3 per row, each a hand-over of the GIL that a busy event loop makes wait. Other kinds are
a fenced statement per op (answering the row), or for a claim the `claim` function: heads and
finishes are one per stream. Renewals, one per stream every third of its lease (hundreds a
second on a busy worker), are set-based too (`_renew_run`). Every fence of a batch is judged
at one time, the batch's (`Batch.now`). Aborts, deletes and purges are a transaction of their own
each: `abort`, `delete`, `purge`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, NamedTuple

from .._base import Lease, StreamInfo, effective, is_claimable, new_token
from .._batch import runs
from ._schema import (
    ADVANCE_STAGED,
    ADVANCED,
    APPEND_STAGED,
    COLUMNS,
    LIVE,
    RENEW_STAGED,
    RENEWED,
    SELECT_STREAM,
    STAGE_ROWS,
    stage,
    to_info,
)

#: Stream ids per ``IN (...)`` list (well under SQLite's bound-parameter limit).
IDS_PER_QUERY = 500
#: Appends larger than this are stored as several segments, so a read never loads more than
#: about this much of a segment it only needs part of.
MAX_SEGMENT = 1 << 20


class Op(NamedTuple):
    """One write waiting for the batch writer. An append carries its lease's `token`, its
    `data` (not empty) and `chunks`; a renewal its `token` and ``params={"seconds": ...}``; a
    claim its `claim_args` (lease seconds, replace); every other kind its fenced statement
    `sql`, answering the stream's row, and its `params`."""

    kind: str  # "claim", "append", "start", "renew", "finish", "update", "attach"
    stream_id: str
    token: str = ""
    data: bytes = b""
    chunks: int = 0
    sql: str = ""
    params: dict[str, Any] | None = None
    claim_args: tuple[float, bool] = (0.0, False)


#: What a claim answers: the new lease and its stream's row, or the stream that isn't claimable.
Claimed = tuple[Lease, sqlite3.Row] | StreamInfo


class Advanced(NamedTuple):
    """A stream's row after the appends of a batch applied, as far as an append changes it
    (and `readers`, which another process may have changed): the rest of the row is as it was,
    but ``updated_at``, which is the batch's `Batch.now`."""

    generation: str
    version: int
    size: int
    chunks: int
    readers: int


class Renewed(NamedTuple):
    """A stream's lease renewed in a batch: the rest of its row is as it was, but `readers`
    (which another process may have changed)."""

    token: str
    lease_expires_at: float
    readers: int


class Batch(NamedTuple):
    """What a committed batch of `Op`s tells the store."""

    applied: list[bool]
    """Per op: whether it applied (its fence held; a claim always applies)."""
    claims: dict[int, Claimed]
    """What each claim answered, by its index in the batch."""
    rows: list[sqlite3.Row]
    """The ``streams`` rows the ops touched, as committed (one per stream): for a stream in
    `advanced`, as of before its appends."""
    advanced: dict[str, Advanced]
    """What the appends changed, by stream, for the streams whose appends applied after the
    last of their ops that answered a row."""
    renewed: dict[str, Renewed]
    """What the renewals changed, by stream, for the streams renewed after the last of their
    ops that answered a row."""
    now: float
    """The batch's time (``time.time()`` when it began): when every fence of it is judged, and
    the ``updated_at`` of the streams it appended to."""
    data_version: int
    """The writer connection's ``PRAGMA data_version``: it changes when another connection —
    another process — commits."""
    checked: float
    """When (monotonic) `data_version` was read: no other process commits from then until
    this transaction does."""


def apply_batch(conn: sqlite3.Connection, ops: list[Op]) -> Batch:
    """Every op, run by run; then the rows of the streams they touched, as committed: each
    changed row as its last statement answered it (or, for appends, what they changed), the
    others (fence lost, not claimable) read again."""
    ((data_version,),) = conn.execute("PRAGMA data_version").fetchall()
    checked, now = time.monotonic(), time.time()
    applied = [False] * len(ops)
    claims: dict[int, Claimed] = {}
    rows: dict[str, sqlite3.Row] = {}  # stream id -> its row after its latest change ...
    advanced: dict[str, Advanced] = {}  # ... and its appends' changes, if they came later
    renewed: dict[str, Renewed] = {}  # ... and its renewal, if it came later
    for run in runs(ops):
        kind = ops[run[0]].kind
        if kind in ("append", "renew"):
            batch = [ops[i] for i in run]
            if kind == "append":
                changed: dict[str, Any] = _append_run(conn, batch, now)
                into: dict[str, Any] = advanced
            else:
                changed, into = _renew_run(conn, batch, now), renewed
            for i in run:
                stream_id = ops[i].stream_id
                if stream_id in changed:
                    applied[i] = True
                    into[stream_id] = changed[stream_id]
            continue
        for i in run:
            op = ops[i]
            if kind == "claim":
                claims[i] = result = claim(conn, op.stream_id, *op.claim_args)
                applied[i] = True
                if isinstance(result, tuple):
                    _answered(op.stream_id, result[1], rows, advanced, renewed)
            else:
                got = conn.execute(op.sql, {**(op.params or {}), "now": now}).fetchall()
                if got:
                    applied[i] = True
                    _answered(op.stream_id, got[0], rows, advanced, renewed)
    unchanged = [
        sid
        for sid in dict.fromkeys(op.stream_id for op in ops)
        if sid not in rows and sid not in advanced and sid not in renewed
    ]
    for at in range(0, len(unchanged), IDS_PER_QUERY):
        chunk = unchanged[at : at + IDS_PER_QUERY]
        for row in conn.execute(
            f"SELECT {COLUMNS} FROM streams WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall():
            rows[row["id"]] = row
    return Batch(
        applied, claims, list(rows.values()), advanced, renewed, now, data_version, checked
    )


def _answered(
    stream_id: str,
    row: sqlite3.Row,
    rows: dict[str, sqlite3.Row],
    advanced: dict[str, Advanced],
    renewed: dict[str, Renewed],
) -> None:
    """An op answered the stream's `row`: it holds what the stream's earlier ops changed."""
    rows[stream_id] = row
    advanced.pop(stream_id, None)
    renewed.pop(stream_id, None)


def _stage(conn: sqlite3.Connection, staged: list[tuple[Any, ...]]) -> None:
    """Rows of ``(id, token, rel, size, chunks, data)`` into the (empty) staging table."""
    for at in range(0, len(staged), STAGE_ROWS):
        rows = staged[at : at + STAGE_ROWS]
        conn.execute(stage(len(rows)), [value for row in rows for value in row])


def _renew_run(conn: sqlite3.Connection, ops: list[Op], now: float) -> dict[str, Renewed]:
    """The renewals `ops`, fenced at `now`: what changed for each stream whose lease held (its
    new expiry, `now` plus the op's seconds: a statement per distinct number of seconds, which
    is one, the middleware's ``lease_seconds``, but for tests and custom callers)."""
    renewed: dict[str, Renewed] = {}
    by_seconds: dict[float, list[Op]] = {}
    for op in ops:
        by_seconds.setdefault(float((op.params or {})["seconds"]), []).append(op)
    for seconds, group in by_seconds.items():
        _stage(conn, [(op.stream_id, op.token, 0, 0, 0, b"") for op in group])
        fence = {"now": now, "seconds": seconds}
        conn.execute(RENEW_STAGED, fence)
        ((answer,),) = conn.execute(RENEWED, fence).fetchall()
        conn.execute("DELETE FROM staged")
        until = now + seconds  # as SQLite added them: ``:now + :seconds``
        tokens = {op.stream_id: op.token for op in group}
        for sid, readers in json.loads(answer):
            renewed[sid] = Renewed(tokens[sid], until, readers)
    return renewed


def _append_run(conn: sqlite3.Connection, ops: list[Op], now: float) -> dict[str, Advanced]:
    """The appends `ops` (one per stream), in segments of at most MAX_SEGMENT bytes, fenced at
    `now`: what they changed in the streams whose lease held. An append lands whole or not at
    all (the statements fence each stream alike, at one time; a statement that fails rolls the
    batch back)."""
    staged: list[tuple[str, str, int, int, int, bytes | memoryview]] = []
    for op in ops:
        data, size = op.data, len(op.data)
        if size <= MAX_SEGMENT:
            staged.append((op.stream_id, op.token, 0, size, op.chunks, data))
            continue
        view = memoryview(data)
        staged += [
            (op.stream_id, op.token, at, size, 0 if at else op.chunks, view[at : at + MAX_SEGMENT])
            for at in range(0, size, MAX_SEGMENT)
        ]
    _stage(conn, staged)
    fence = {"now": now}
    conn.execute(ADVANCE_STAGED, fence)
    conn.execute(APPEND_STAGED, fence)
    ((answer,),) = conn.execute(ADVANCED, fence).fetchall()
    conn.execute("DELETE FROM staged")  # (rolled back with the batch if a statement failed)
    return {row[0]: Advanced(*row[1:]) for row in json.loads(answer)}


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
