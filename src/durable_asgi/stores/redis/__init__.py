"""`RedisStore`: many workers on many machines share live streams through Redis.

Key layout — every key of one stream shares one hash tag, so a stream lives in one Redis Cluster
slot and every script touches a single slot::

    {prefix}:{<tag>}:meta   hash: id, state, gen (lease token), ver, off, chunks, head, times...
    {prefix}:{<tag>}:body   stream: an entry per append (split at 64 KiB), id ``<start offset>-1``
    {prefix}:{<tag>}:ev     stream (MAXLEN 1): one entry per change, entry id ``<version>-1``

``<tag>`` is the stream id when it is short printable ASCII without braces, else ``#`` + its
SHA-256 (a raw tag never starts with ``#``, so the two forms cannot collide).

- **Writes** are Lua scripts (``lua/``): each one checks the lease token (fencing), the state
  and the lease expiry against the *Redis server's* clock, applies the change and bumps the
  version by adding an entry to ``ev``. Unlike `MemoryStore`, a write after the lease ran out
  raises `LeaseLost` and makes the stream `failed` for good: readers were already told it
  failed. Appends and `finish` also check the body offset this process expects, so a write
  redis-py retries after a dropped connection is not applied twice, and a stream that lost
  bytes in a Redis restart fails instead of completing.
- **Batching**: every script goes through a queue; a single task per queue sends what is queued
  as one pipeline (one round trip and one pooled connection for many streams' commands, in
  queue order), so a thousand streams don't each wait for a connection of the bounded pool and
  a lease renewal never queues behind a thousand round trips. Two queues (*lanes*), each in
  order: producers' fenced writes, and everything else (claims, reads, control) — so a request
  joining a stream doesn't wait behind a pipeline of a thousand appends in flight. A script
  whose caller was cancelled before it was sent is dropped. A flush of many streams' writes
  (`write_many`) is one ``batch.lua`` call per `MAX_BATCH` streams, each stream in it one key
  prefix and one argument, and its reply one string: redis-py's work is per command, per
  argument and per reply element, so a call per stream cost the worker more than Redis spent
  running it (and six arguments per stream, 40 % more than one per append). Each stream's
  write is fenced and answered on its own, as by a script of its own (on a cluster, where the
  keys of one call must share a slot, each write still is one).
- **Reads** find the entry holding offset ``n`` with ``XREVRANGE body n-1 - COUNT 1`` and take
  the rest with ``XRANGE``, in one script together with the metadata snapshot. Streams this
  process produces are also kept in memory as of their last acknowledged write (`LocalCopy`:
  the snapshot and the newest `LOCAL_BYTES` of body), so the client that started a stream and
  the requests that join it on the same worker join and read without a round trip; only older
  bytes and other processes' streams are read from Redis.
- **wait()**: this process's own writes wake its readers through a `Notifier`, no round trip.
  For changes made elsewhere, one background task per stream this process waits on (and does
  not produce) runs ``XREAD BLOCK`` on the stream's tiny ``ev`` stream — not on the body, so a
  wake-up costs a few bytes — and fans out through the same `Notifier`. Every change (start,
  append, finish, abort, delete) adds to ``ev``, so none is waited out by polling. The task
  stops one block interval after its last waiter. (In the producer's process, another
  process's abort/delete is seen at the producer's next write, which raises `LeaseLost`.)
- **Expiry** is Redis's own: every key has a TTL. A running stream's keys live until its lease
  runs out plus `orphan_ttl`, so a dead producer's data goes away by itself; a finished one's
  until ``ttl`` after it ended. ``ev`` outlives the others by a minute so versions keep rising
  across delete and re-claim.
- If Redis loses the data (restart without persistence), `info` returns None and the producer's
  next write raises `LeaseLost`: readers end abnormally, never as a silent truncation. Redis
  errors raise `StoreError`; a Redis at ``maxmemory`` raises `StoreFull`.

redis-py is asyncio-only: under trio, using this store raises `ConfigurationError`.

Modules: `_store` (the `RedisStore` class: claims, writes, reads, waits, the local copy),
`_scripts` (the Lua scripts in ``lua/`` and the two lanes that send them), `_follower` (the
``XREAD BLOCK`` tails), `_connection` (clients from a URL, or yours), `_codec` (key names and
reply formats).
"""

from __future__ import annotations

from ._store import RedisStore

__all__ = ["RedisStore"]
