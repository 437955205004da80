"""`SQLiteStore`: one file that survives restarts, shared by the workers of one machine.

Design, in brief (each module says more):

- `_schema`: two tables, ``streams`` (one row of metadata per stream) and ``segments`` (the
  body as rows keyed by ``(stream_id, start)``); a read is a *single* SELECT of the stream's
  row and its segments, which is what makes its snapshot atomic (WAL +
  ``synchronous=NORMAL``: no fsync per commit). The file's schema version is kept in
  ``PRAGMA user_version``; an older file is migrated on open.
- `_connection`: two `sqlite3` connections, each on a thread of its own: a writer, used by
  one transaction at a time, and a reader, so reads never wait behind writes (WAL mode).
- `_writes`: every producer write is fenced in SQL (``WHERE generation = :token AND state =
  'running'`` and the lease not run out), so a lost lease can never write. Producer writes
  and `attach` are committed by a batch writer (`GroupCommit`): everything queued, from every
  stream, in one transaction and one thread hop; writes of one stream commit in order, none
  is acknowledged before its commit. A batch is applied run by run, set-based: all of a run's
  appends by a few multi-row INSERTs into a staging table, one UPDATE, one INSERT and one
  SELECT answering what changed (a dozen statements for 300 streams).
  Claims (``BEGIN IMMEDIATE``: atomic across processes) join the batch; aborts, deletes and
  purges take the same writer connection, in their own transactions.
- `_local`: streams this process produces are also kept in memory, from the claim on, so
  their readers here need no query, and a claim joining one needs no transaction while the
  copy is known to match the file (``PRAGMA data_version``).
- `_poller`: readers in this process are woken by a `Notifier` after every write; readers in
  other processes can't be, so one poller task per store polls what its readers wait on.

asyncio only (the threads answer through the event loop): under trio, `open` raises
`ConfigurationError` (use `MemoryStore`).
"""

from ._connection import PAGE_CACHE_KIB
from ._store import SQLiteStore

__all__ = ["PAGE_CACHE_KIB", "SQLiteStore"]
