"""`PostgresStore`: many workers on many machines share live streams through the PostgreSQL
database the application already runs.

Tables (``schema.sql``; in the store's `schema`, names starting with its `prefix`)::

    {prefix}streams    one row per stream: state, lease token (generation), version, size, head
    {prefix}segments   the body: a row per append (split at 1 MiB), keyed by (stream, offset)
    {prefix}meta       the schema version, for later migrations

- **Writes** go through one batch writer per store (`GroupCommit`): every queued claim, head,
  append, renewal and finish, from every stream, is committed in one transaction, with one
  *set-based* statement per run of one kind (``unnest`` of arrays): under load a worker pays one
  round trip for hundreds of streams' chunks. Each row is fenced by its lease token, its state
  and its lease expiry (the database's clock), so a producer that lost its lease — aborted,
  deleted, run out, taken over — can never write again. Claims are ``INSERT … ON CONFLICT DO
  UPDATE … WHERE claimable``: of concurrent claims, on any number of machines, one wins.
- **Reads** are one statement: the stream's row and the bytes of ``[offset, offset + limit)``
  from the segments that hold them, so the snapshot is atomic. Streams this process produces are
  also kept in memory as of their last committed write (`LocalCopy`: the snapshot and the newest
  64 KiB), so the client that started a stream and requests joining it on the same worker read
  and join without a round trip.
- **Live tail across processes by LISTEN/NOTIFY**, not polling: every statement that changes what
  readers see notifies, in the same transaction, the channel ``{schema}.{prefix}changes`` with a
  12-hex-digit tag of each changed stream's id — never data. One connection per process listens
  (`Listener`) and wakes the readers of those streams, which re-read from their offset. A lost
  listening connection wakes every waiter for one catch-up read, and until it is back they
  re-check twice a second: never a hang, never a lost byte.
- **Expiry**: finished streams are kept `ttl` seconds (``expires_at``), a dead producer's running
  stream `orphan_ttl` seconds past its lease; reads never return an expired stream and
  `purge_expired` (run by `claim` every `purge_interval`) deletes them.
- Errors of the database or the network raise `StoreError`; a full disk raises `StoreFull`. A
  restarted server loses nothing committed: a producer whose writes failed meanwhile ends its
  stream `failed` (its lease runs out), never silently truncated.

Modules: `_store` (the class), `_sql` (the statements, rows to `StreamInfo`), `_listener`
(LISTEN), ``schema.sql`` (the tables).
"""

from __future__ import annotations

from ._store import PostgresStore

__all__ = ["PostgresStore"]
