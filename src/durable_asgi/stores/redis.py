"""`RedisStore`: many workers on many machines share live streams through Redis.

Key layout — every key of one stream shares one hash tag, so a stream lives in one Redis Cluster
slot and every script touches a single slot::

    {prefix}:{<tag>}:meta   hash: id, state, gen (lease token), ver, off, chunks, head, times...
    {prefix}:{<tag>}:body   stream: an entry per append (split at 64 KiB), id ``<start offset>-1``
    {prefix}:{<tag>}:ev     stream (MAXLEN 1): one entry per change, entry id ``<version>-1``

``<tag>`` is the stream id when it is short printable ASCII without braces, else ``#`` + its
SHA-256 (a raw tag never starts with ``#``, so the two forms cannot collide).

- **Writes** are Lua scripts: each one checks the lease token (fencing), the state and the lease
  expiry against the *Redis server's* clock, applies the change and bumps the version by adding
  an entry to ``ev``. Unlike `MemoryStore`, a write after the lease ran out raises `LeaseLost`
  and makes the stream `failed` for good: readers were already told it failed. Appends and
  `finish` also check the body offset this process expects, so a write redis-py retries after a
  dropped connection is not applied twice, and a stream that lost bytes in a Redis restart
  fails instead of completing.
- **Batching**: every script goes through a queue; a single task per queue sends what is queued
  as one pipeline (one round trip and one pooled connection for many streams' commands, in
  queue order), so a thousand streams don't each wait for a connection of the bounded pool and
  a lease renewal never queues behind a thousand round trips. Two queues (*lanes*), each in
  order: producers' fenced writes, and everything else (claims, reads, control) — so a request
  joining a stream doesn't wait behind a pipeline of a thousand appends in flight. A script
  whose caller was cancelled before it was sent is dropped.
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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..exceptions import ConfigurationError
from ._base import (
    MAX_RAW_ID,
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    LocalCopy,
    Notifier,
    StoreError,
    StoreFull,
    StreamInfo,
    effective,
    join,
    new_token,
)

__all__ = ["RedisStore"]

_Client = Redis | RedisCluster

#: Most bytes one read script returns; longer reads take several round trips (keeps each
#: script short so it doesn't stall Redis).
MAX_READ = 4 << 20
#: Largest body entry: bigger appends are split, so a read from the middle of a huge append
#: copies at most this much more than it returns.
MAX_ENTRY = 64 << 10
#: How much longer ``ev`` lives than the stream's other keys (ms).
EV_MARGIN_MS = 60_000
#: Longest ttl we store (Redis and Lua doubles are happy with it).
MAX_TTL = 10 * 365 * 86400.0
#: Newest body bytes of each stream this process produces kept in memory for local readers.
LOCAL_BYTES = 64 << 10
#: Most scripts sent in one pipeline by the batcher.
MAX_PIPELINE = 256
#: The batcher's lanes: producers' fenced writes, and every other script.
_WRITES, _OTHERS = 0, 1
_Queued = tuple["_Script", Sequence[str], tuple[Any, ...], "asyncio.Future[Any]"]

# -- Lua ---------------------------------------------------------------------------------------

# Shared by every script. KEYS = meta, body, ev. Times are server milliseconds.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local meta, body, ev = KEYS[1], KEYS[2], KEYS[3]
local EV_MARGIN = EV_MARGIN_MS
local PIECE = MAX_ENTRY
local FIELDS = {'id', 'state', 'gen', 'ver', 'off', 'chunks', 'readers', 'status', 'headers',
                'created', 'updated', 'exp', 'lease', 'retain'}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function int(x) return string.format('%d', x) end

-- The stream's fields and the snapshot to return ({now, fields...}); nil when absent/expired.
local function load()
  local raw = redis.call('HMGET', meta, unpack(FIELDS))
  if not raw[1] then return nil end
  local m = {}
  for i, f in ipairs(FIELDS) do m[f] = raw[i] end
  if m.exp and tonumber(m.exp) <= now then
    redis.call('DEL', meta, body)
    return nil
  end
  local snap = {now}
  for i = 1, #FIELDS do snap[i + 1] = raw[i] end
  return m, snap
end

-- Record a change: the next version, as a (MAXLEN 1) entry of ev that wakes remote waiters.
local function bump(gen)
  local last = redis.call('XREVRANGE', ev, '+', '-', 'COUNT', 1)
  local v = 1
  if last[1] then v = tonumber(string.match(last[1][1], '^%d+')) + 1 end
  redis.call('XADD', ev, 'MAXLEN', '1', int(v) .. '-1', 'g', gen)
  return v
end

local function keep_until(ms)
  redis.call('PEXPIREAT', meta, int(ms))
  redis.call('PEXPIREAT', body, int(ms))
  redis.call('PEXPIREAT', ev, int(ms + EV_MARGIN))
end

-- End the stream in `state`, kept `keep` ms from now.
local function settle(m, state, keep, retain)
  local v = bump(m.gen)
  redis.call('HSET', meta, 'state', state, 'ver', v, 'updated', int(now),
             'exp', int(now + keep), 'retain', retain)
  redis.call('HDEL', meta, 'lease')
  keep_until(now + keep)
  return v
end

-- Fenced writes: ARGV[1] = lease token, ARGV[2] = expected body offset (-1: unknown),
-- ARGV[3] = orphan ttl (ms). Returns the stream's fields, or nil and why the lease is lost.
local function owned(check_offset, m)
  if m == nil then m = load() end
  if not m or m.gen ~= ARGV[1] or m.state ~= 'running' then
    return nil, 'the stream was aborted, deleted or taken over'
  end
  if tonumber(m.lease) < now then
    settle(m, 'failed', tonumber(ARGV[3]), '1')
    return nil, 'the lease ran out before it was renewed'
  end
  local want = tonumber(ARGV[2])
  if check_offset and want >= 0 and tonumber(m.off) ~= want then
    settle(m, 'failed', tonumber(ARGV[3]), '1')
    return nil, 'the stored body is not where this producer left it (Redis lost writes?)'
  end
  return m
end
"""


@dataclass(frozen=True)
class _Script:
    name: str
    source: str
    sha: str


def _script(name: str, body: str) -> _Script:
    prelude = _PRELUDE.replace("EV_MARGIN_MS", str(EV_MARGIN_MS))
    source = prelude.replace("MAX_ENTRY", str(MAX_ENTRY)) + body
    return _Script(name, source, hashlib.sha1(source.encode()).hexdigest())


# ARGV: token, -, orphan, id, lease ms, replace ("1": any stream that isn't running)
_CLAIM = _script(
    "claim",
    """
local m, snap = load()
if m then
  if m.gen == ARGV[1] and m.state == 'running' then return {'lease', m.ver} end  -- a retry
  local claimable = m.state == 'failed' or m.retain == '0'
    or (m.state == 'running' and tonumber(m.lease) < now)
    or (ARGV[6] == '1' and m.state ~= 'running')
  if not claimable then return {'info', unpack(snap)} end
end
local readers = m and m.readers or '0'
redis.call('DEL', meta, body)
local v = bump(ARGV[1])
local lease = now + tonumber(ARGV[5])
redis.call('HSET', meta, 'id', ARGV[4], 'state', 'running', 'gen', ARGV[1], 'ver', v,
           'off', 0, 'chunks', 0, 'readers', readers, 'created', int(now), 'updated', int(now),
           'lease', int(lease), 'retain', '1')
keep_until(lease + tonumber(ARGV[3]))
return {'lease', v}
""",
)

# ARGV: token, -, orphan, status, headers
_START = _script(
    "start",
    """
local m, why = owned(false)
if not m then return {'lost', why} end
local v = bump(ARGV[1])
redis.call('HSET', meta, 'status', ARGV[4], 'headers', ARGV[5], 'ver', v, 'updated', int(now))
return {'ok', v}
""",
)

# ARGV: token, expected offset, orphan, data, chunks
_APPEND = _script(
    "append",
    """
local data = ARGV[4]
local want = tonumber(ARGV[2])
local m = load() or false
if m and m.gen == ARGV[1] and m.state == 'running' and want >= 0 and #data > 0
    and tonumber(m.off) == want + #data then
  local last = redis.call('XREVRANGE', body, '+', '-', 'COUNT', 1)
  local last_piece = want + math.floor((#data - 1) / PIECE) * PIECE
  if last[1] and last[1][1] == int(last_piece) .. '-1' then
    return {'ok', tonumber(m.ver), tonumber(m.off)}  -- redis-py retried an append that landed
  end
end
local m, why = owned(true, m)
if not m then return {'lost', why} end
local off = tonumber(m.off)
if #data > 0 then
  if #data <= PIECE then
    redis.call('XADD', body, int(off) .. '-1', 'd', data)
  else
    for at = 0, #data - 1, PIECE do
      redis.call('XADD', body, int(off + at) .. '-1', 'd', string.sub(data, at + 1, at + PIECE))
    end
  end
  if off == 0 then redis.call('PEXPIREAT', body, int(tonumber(m.lease) + tonumber(ARGV[3]))) end
end
local v = bump(ARGV[1])
redis.call('HSET', meta, 'off', int(off + #data), 'chunks', int(tonumber(m.chunks) + ARGV[5]),
           'ver', v, 'updated', int(now))
return {'ok', v, off + #data}
""",
)

# ARGV: token, -, orphan
_CHECK = _script(
    "check",
    """
local m, why = owned(false)
if not m then return {'lost', why} end
return {'ok', tonumber(m.ver)}
""",
)

# ARGV: token, -, orphan, lease ms
_RENEW = _script(
    "renew",
    """
local m, why = owned(false)
if not m then return {'lost', why} end
local lease = now + tonumber(ARGV[4])
redis.call('HSET', meta, 'lease', int(lease))
keep_until(lease + tonumber(ARGV[3]))
return {'ok', tonumber(m.ver)}
""",
)

# ARGV: token, expected offset, orphan, state, ttl ms, retain, call id
_FINISH = _script(
    "finish",
    """
local m = load() or false
if m and m.gen == ARGV[1] and redis.call('HGET', meta, 'fin') == ARGV[7] then
  return {'ok', tonumber(m.ver)}  -- redis-py retried this very call, which had landed
end
local m, why = owned(true, m)
if not m then return {'lost', why} end
redis.call('HSET', meta, 'fin', ARGV[7])
return {'ok', settle(m, ARGV[4], tonumber(ARGV[5]), ARGV[6])}
""",
)

_INFO = _script(
    "info",
    """
local m, snap = load()
if not m then return nil end
return snap
""",
)

# ARGV: offset, limit. Returns {now, fields..., data}.
_READ = _script(
    "read",
    """
local m, snap = load()
if not m then return nil end
local offset, limit, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(m.off)
local data = ''
if offset < size and limit > 0 then
  local first = redis.call('XREVRANGE', body, int(offset) .. '-1', '-', 'COUNT', 1)
  local want = math.min(limit, size - offset)
  if first[1] then
    local start = tonumber(string.match(first[1][1], '^%d+'))
    local parts = {}
    local last = math.min(offset + limit, size) - 1
    for i, e in ipairs(redis.call('XRANGE', body, first[1][1], int(last) .. '-1')) do
      parts[i] = e[2][2]
    end
    data = string.sub(table.concat(parts), offset - start + 1, offset - start + want)
  end
  if #data ~= want then
    return redis.error_reply('DURABLE the stored body is missing bytes (evicted by Redis?)')
  end
end
snap[#snap + 1] = data
return snap
""",
)

# ARGV: -, -, -, ttl ms. Returns {1, version, generation} if it was running, else {0}.
_ABORT = _script(
    "abort",
    """
local m = load()
if not m or m.state ~= 'running' or tonumber(m.lease) < now then return {0} end
return {1, settle(m, 'aborted', tonumber(ARGV[4]), '1'), m.gen}
""",
)

_DELETE = _script(
    "delete",
    """
local m = load()
redis.call('DEL', meta, body)
if not m then return {0} end
local v = bump('')
redis.call('PEXPIRE', ev, EV_MARGIN)
return {1, v}
""",
)

# ARGV: delta
_ATTACH = _script(
    "attach",
    """
if redis.call('EXISTS', meta) == 0 then return 0 end
if redis.call('HINCRBY', meta, 'readers', ARGV[1]) < 0 then
  redis.call('HSET', meta, 'readers', 0)
end
return 1
""",
)

_PURGE = _script(
    "purge",
    """
local exp = redis.call('HGET', meta, 'exp')
if exp and tonumber(exp) <= now then
  redis.call('DEL', meta, body)
  return 1
end
return 0
""",
)


# -- helpers -----------------------------------------------------------------------------------


def _pack_headers(headers: Headers) -> bytes:
    out = bytearray()
    for name, value in headers:
        out += len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def _unpack_headers(raw: bytes) -> Headers:
    headers = []
    i = 0
    while i < len(raw):
        n = int.from_bytes(raw[i : i + 4], "big")
        name = raw[i + 4 : i + 4 + n]
        i += 4 + n
        n = int.from_bytes(raw[i : i + 4], "big")
        headers.append((name, raw[i + 4 : i + 4 + n]))
        i += 4 + n
    return tuple(headers)


def _ms(seconds: float) -> int:
    return math.ceil(min(max(seconds, 0.0), MAX_TTL) * 1000)


def _tag(stream_id: str) -> str:
    if (
        len(stream_id) <= MAX_RAW_ID
        and stream_id.isascii()
        and stream_id.isprintable()
        and not stream_id.startswith("#")
        and "{" not in stream_id
        and "}" not in stream_id
    ):
        return stream_id
    return "#" + hashlib.sha256(stream_id.encode("utf-8", "surrogatepass")).hexdigest()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _parse_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of redis-py's XREAD reply for one key (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    stream = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if stream and isinstance(stream[0], list):
        stream = stream[0]  # RESP3 wraps the entries once more
    return [(entry_id, fields) for entry_id, fields in stream]


@dataclass
class _Tail:
    """This process's view of one stream's ``ev`` stream, kept by one background task."""

    task: asyncio.Task[None] | None = None
    waiters: int = 0
    idle_since: float = 0.0
    version: int | None = None
    """The newest version seen (from ``ev`` or from this process's own writes)."""
    generation: str = ""
    resets: int = 0
    """Bumped when the tail loses Redis or the store closes: every waiter returns."""

    def saw(self, version: int, generation: str) -> bool:
        # Versions rise per stream key, across re-claims and deletes, so newer means larger.
        if self.version is None or version > self.version:
            self.version, self.generation = version, generation
            return True
        return False

    def newer_than(self, info: StreamInfo) -> bool:
        if self.version is None:
            return False
        return self.version > info.version or (
            self.version == info.version and self.generation != info.generation
        )


class RedisStore:
    """Streams kept in Redis, shared by every worker on every machine that uses the same server.

    Args:
        url_or_client: a ``redis://`` / ``rediss://`` / ``unix://`` URL (the store opens its own
            client and closes it in `close`), or a ``redis.asyncio.Redis`` or
            ``redis.asyncio.RedisCluster`` client you own (not closed by the store; it must have
            ``decode_responses=False``).
        prefix: the first part of every key, so several apps can share one database.
        block_seconds: how long one ``XREAD BLOCK`` waits for changes made by other processes;
            kept below the client's ``socket_timeout``.
        orphan_ttl: seconds a running stream's data is kept after its lease ran out (its
            producer died), so its readers see it ``failed`` rather than gone.
        max_connections: most connections the store's own client opens for commands (URL
            form); more concurrent calls wait for a free one (up to 10 s, then `StoreError`).

    Example::

        app.add_middleware(DurableMiddleware, store=RedisStore("redis://redis:6379/0"))

    Needs ``pip install "durable-asgi[redis]"`` and Redis ≥ 5 (or Valkey). Runs on asyncio only,
    because redis-py does: under trio use `SQLiteStore` or `MemoryStore`. On Redis Cluster pass
    a ``RedisCluster`` client: every key of a stream shares one hash tag, so each script runs
    on one node.

    Each stream that readers in this process are waiting on holds one connection for its
    ``XREAD BLOCK`` while they wait. With a URL these come from a pool of their own; with your
    own client they come from its pool, so size its ``max_connections`` for them too.
    """

    def __init__(
        self,
        url_or_client: str | Redis | RedisCluster = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "durable",
        block_seconds: float = 1.0,
        orphan_ttl: float = 300.0,
        max_connections: int = 64,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r} must not contain braces (Redis hash tags)")
        if not block_seconds > 0:
            raise ValueError("block_seconds must be positive")
        self.prefix = prefix
        self.block_seconds = block_seconds
        self.orphan_ttl = orphan_ttl
        self.max_connections = max_connections
        self._url: str | None = None
        self._client: _Client | None = None
        self._tail_client: _Client | None = None
        if isinstance(url_or_client, str):
            self._url = url_or_client
        else:
            self._client = self._tail_client = self._checked(url_or_client)
        self._notifier = Notifier()
        self._tails: dict[str, _Tail] = {}
        #: Body offset each of this process's leases expects next (by token); see `_APPEND`.
        self._ends: dict[str, int] = {}
        #: Streams this process produces, as of their last write (see `LocalCopy`).
        self._producing: dict[str, LocalCopy] = {}
        #: Per lane (`_WRITES`, `_OTHERS`): scripts waiting for its batcher, which sends them as
        #: pipelines (one round trip and one pooled connection for many streams' commands).
        self._queues: tuple[list[_Queued], list[_Queued]] = ([], [])
        self._flushers: list[asyncio.Task[None] | None] = [None, None]

    def __repr__(self) -> str:
        where = self._url if self._url is not None else repr(self._client)
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    # -- connection ----------------------------------------------------------------------------

    @staticmethod
    def _connection_kwargs(client: _Client) -> Mapping[str, Any]:
        if isinstance(client, RedisCluster):
            return client.get_connection_kwargs()
        return client.connection_pool.connection_kwargs

    @classmethod
    def _checked(cls, client: _Client) -> _Client:
        if cls._connection_kwargs(client).get("decode_responses"):
            raise ValueError(
                "RedisStore needs a client with decode_responses=False: stream bodies are bytes"
            )
        return client

    def _redis(self) -> _Client:
        """The client for commands (connecting lazily, on asyncio only)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "RedisStore runs on asyncio only (redis-py is asyncio-only); under trio use "
                "SQLiteStore or MemoryStore"
            ) from None
        if self._client is None:
            assert self._url is not None
            options: dict[str, Any] = {
                "socket_timeout": max(5.0, 2 * self.block_seconds + 1),
                "socket_connect_timeout": 5.0,
                # Few, quick retries: an outage should surface as StoreError, not a hang.
                "retry": Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            }
            # Commands share a bounded pool and queue for it (redis-py's default pool raises
            # once 100 connections are busy); tails get their own, so they never starve it.
            commands = BlockingConnectionPool.from_url(
                self._url, max_connections=self.max_connections, timeout=10.0, **options
            )
            tails = ConnectionPool.from_url(self._url, max_connections=1 << 20, **options)
            self._client = self._checked(Redis.from_pool(commands))
            self._tail_client = Redis.from_pool(tails)
        return self._client

    @property
    def _block_ms(self) -> int:
        timeout = self._connection_kwargs(self._redis()).get("socket_timeout")
        seconds = self.block_seconds
        if timeout:
            seconds = min(seconds, float(timeout) / 2)
        return max(1, int(seconds * 1000))

    def _keys(self, stream_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:{{{_tag(stream_id)}}}:"
        return base + "meta", base + "body", base + "ev"

    async def _eval(
        self, script: _Script, keys: Sequence[str], *args: bytes | str | int, lane: int = _OTHERS
    ) -> Any:
        client = self._redis()
        if isinstance(client, RedisCluster):  # keys of one call share a slot, a batch doesn't
            return await self._eval_one(client, script, keys, args)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queues[lane].append((script, keys, args, future))
        if self._flushers[lane] is None:  # one per lane: its scripts run in queue order
            self._flushers[lane] = asyncio.create_task(self._flush(client, lane))
        return await future

    async def _flush(self, client: Redis, lane: int) -> None:
        """Send what is queued in `lane` as pipelines (in queue order) until nothing is."""
        try:
            await self._flush_queue(client, self._queues[lane])
        finally:
            self._flushers[lane] = None

    async def _flush_queue(self, client: Redis, queue: list[_Queued]) -> None:
        while queue:
            batch = queue[:MAX_PIPELINE]
            del queue[:MAX_PIPELINE]
            # A caller cancelled before its script was sent: don't send it (it would land
            # after the caller's next write).
            batch = [item for item in batch if not item[3].done()]
            if not batch:
                continue
            if len(batch) == 1:
                script, keys, args, future = batch[0]
                try:
                    result = await self._eval_one(client, script, keys, args)
                except Exception as exc:
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
                continue
            pipe = client.pipeline(transaction=False)
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                for script, _, _, future in batch:
                    if not future.done():
                        future.set_exception(StoreError(f"Redis {script.name} failed: {exc!r}"))
                continue
            for (script, keys, args, future), reply in zip(batch, replies, strict=True):
                if isinstance(reply, NoScriptError):  # not loaded yet (or flushed): send it
                    try:
                        reply = await self._eval_one(client, script, keys, args)
                    except Exception as exc:
                        reply = exc
                elif isinstance(reply, ResponseError):
                    reply = self._error(script, reply)
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    @staticmethod
    def _error(script: _Script, exc: ResponseError) -> StoreError:
        message = str(exc)
        if message.startswith("OOM"):
            return StoreFull(f"Redis is full (maxmemory): {message}")
        return StoreError(f"Redis {script.name} failed: {message}")

    async def _eval_one(
        self, client: _Client, script: _Script, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await client.eval(script.source, len(keys), *keys, *args)
        except ResponseError as exc:
            raise self._error(script, exc) from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis {script.name} failed: {exc!r}") from exc

    # -- snapshots and wake-ups ----------------------------------------------------------------

    @staticmethod
    def _info(reply: Sequence[Any]) -> StreamInfo:
        (
            now,
            sid,
            state,
            gen,
            ver,
            off,
            chunks,
            readers,
            status,
            headers,
            created,
            updated,
            exp,
            lease,
            retain,
        ) = reply[:15]
        info = StreamInfo(
            id=sid.decode("utf-8", "surrogatepass"),
            state=state.decode(),
            generation=gen.decode(),
            version=int(ver),
            offset=int(off),
            chunks=int(chunks),
            readers=int(readers or 0),
            status_code=None if status is None else int(status),
            headers=None if headers is None else _unpack_headers(headers),
            created_at=int(created) / 1000,
            updated_at=int(updated) / 1000,
            expires_at=None if exp is None else int(exp) / 1000,
            lease_expires_at=None if lease is None else int(lease) / 1000,
            retain=retain != b"0",
        )
        # Judge the lease by the server's clock, like the scripts do.
        return effective(info, int(now) / 1000)

    def _changed(self, stream_id: str, version: int, generation: str) -> None:
        """This process changed the stream: wake its local readers at once."""
        tail = self._tails.get(stream_id)
        if tail is not None:
            tail.saw(version, generation)
        self._notifier.notify(stream_id)

    async def _follow(self, stream_id: str, tail: _Tail) -> None:
        """Tail the stream's ``ev`` for this process until nobody has waited for a while."""
        key = self._keys(stream_id)[2]
        self._redis()
        client = self._tail_client
        assert client is not None
        last = b"0-0"
        try:
            while self._tails.get(stream_id) is tail:  # close() removes it
                try:
                    reply = await client.xread({key: last}, block=self._block_ms)
                except (RedisError, OSError):
                    # Let every waiter re-read (and meet the error, or the data loss, itself).
                    tail.resets += 1
                    tail.version = None
                    last = b"0-0"
                    self._notifier.notify(stream_id)
                    await asyncio.sleep(min(self.block_seconds, 0.5))
                else:
                    for entry_id, fields in _parse_entries(reply):
                        last = entry_id
                        version = int(entry_id.split(b"-", 1)[0])
                        if tail.saw(version, fields.get(b"g", b"").decode()):
                            self._notifier.notify(stream_id)
                if (
                    tail.waiters == 0
                    and time.monotonic() - tail.idle_since >= self.block_seconds
                    and self._tails.get(stream_id) is tail
                ):
                    del self._tails[stream_id]
                    return
        finally:
            if self._tails.get(stream_id) is tail:
                del self._tails[stream_id]
            self._notifier.notify(stream_id)

    # -- Store protocol ------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._redis().ping()
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot reach Redis at {self!r}: {exc}") from exc

    async def close(self) -> None:
        tails = list(self._tails.items())
        self._tails.clear()
        for stream_id, tail in tails:
            task = tail.task
            # Cancel until it sticks: on Python 3.11, redis-py's `asyncio.wait_for` around a
            # socket write can swallow a cancellation; the loop also stops once removed above.
            while task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.05)
            if task is not None and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()
            tail.resets += 1
            self._notifier.notify(stream_id)
        flushers = [task for task in self._flushers if task is not None]
        if flushers:  # let queued commands finish
            await asyncio.wait(flushers)
        if self._url is not None and self._client is not None:
            clients = (self._client, self._tail_client)
            self._client = self._tail_client = None
            for client in clients:
                if client is not None:
                    await client.aclose()

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        mine = self._producing.get(stream_id)
        if mine is not None:
            # Produced here: running (as of its last acknowledged write), so not claimable —
            # a request joining it costs no round trip. (Another process's abort or delete
            # reaches this process at the producer's next write, as for its reads.)
            info = effective(mine.info)
            if info.state == "running":
                return info
        token = new_token()
        lease_ms = max(1, _ms(lease_seconds))
        args = (token, -1, _ms(self.orphan_ttl), stream_id, lease_ms, int(replace))
        sent = time.time()
        reply = await self._eval(_CLAIM, self._keys(stream_id), *args)
        if reply[0] == b"info":
            return self._info(reply[1:])
        self._ends[token] = 0
        version = int(reply[1])
        # Judged by this clock from before the claim was sent: never later than Redis's.
        info = StreamInfo(stream_id, "running", token, version, 0, 0, 0, None, None,
                          sent, sent, None, sent + lease_seconds)  # fmt: skip
        self._producing[stream_id] = LocalCopy(info, keep=LOCAL_BYTES)
        self._changed(stream_id, version, token)
        return Lease(stream_id, token)

    def _released(self, lease: Lease) -> None:
        self._ends.pop(lease.token, None)
        mine = self._producing.get(lease.stream_id)
        if mine is not None and mine.info.generation == lease.token:
            del self._producing[lease.stream_id]

    def _produced(self, lease: Lease, data: bytes = b"", chunks: int = 0, **changes: Any) -> None:
        """Record a write of ours (`data`, holding `chunks` messages) in the local copy, before
        waking readers."""
        mine = self._producing.get(lease.stream_id)
        if mine is not None and mine.info.generation == lease.token:
            changes["chunks"] = mine.info.chunks + chunks
            mine.update(replace(mine.info, **changes), (data,))

    async def _write(
        self, script: _Script, lease: Lease, *args: bytes | str | int, want: int = -1
    ) -> list[Any]:
        """Run a fenced write; its reply is ``[b"ok", version, ...]``."""
        reply = await self._eval(
            script,
            self._keys(lease.stream_id),
            lease.token,
            want,
            _ms(self.orphan_ttl),
            *args,
            lane=_WRITES,
        )
        if reply[0] == b"lost":
            self._released(lease)
            self._notifier.notify(lease.stream_id)  # local readers: re-read, see why
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost: {reply[1].decode()}")
        return list(reply)

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        reply = await self._write(_START, lease, status, _pack_headers(headers))
        version, now = int(reply[1]), time.time()
        self._produced(
            lease, status_code=status, headers=tuple(headers), version=version, updated_at=now
        )
        self._changed(lease.stream_id, version, lease.token)

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        if not data and not chunks:
            await self._write(_CHECK, lease)  # nothing to add; still fail a lost lease
            return
        # Popped while the call runs: if it is cancelled we can't know whether it landed, and
        # the next append goes unchecked (and learns the offset again from its reply).
        want = self._ends.pop(lease.token, -1)
        reply = await self._write(_APPEND, lease, data, chunks, want=want)
        self._ends[lease.token] = offset = int(reply[2])
        version, now = int(reply[1]), time.time()
        self._produced(lease, data, chunks, version=version, offset=offset, updated_at=now)
        self._changed(lease.stream_id, version, lease.token)

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        sent = time.time()
        await self._write(_RENEW, lease, max(1, _ms(lease_seconds)))
        self._produced(lease, lease_expires_at=sent + lease_seconds)

    async def finish(self, lease: Lease, state: FinalState, *, ttl: float, retain: bool) -> None:
        want = self._ends.pop(lease.token, -1)
        args = (state, _ms(ttl), "1" if retain else "0", new_token())
        try:
            reply = await self._write(_FINISH, lease, *args, want=want)
        finally:
            self._released(lease)  # readers now read the final state (or the error) from Redis
            self._notifier.notify(lease.stream_id)
        self._changed(lease.stream_id, int(reply[1]), lease.token)

    async def info(self, stream_id: str) -> StreamInfo | None:
        reply = await self._eval(_INFO, self._keys(stream_id))
        return None if reply is None else self._info(reply)

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        mine = self._producing.get(stream_id)
        if mine is not None:
            data = mine.read(offset, limit)
            if data is not None:  # ours, and recent enough: no round trip
                return effective(mine.info), data
        keys = self._keys(stream_id)
        reply = await self._eval(_READ, keys, offset, max(0, min(limit, MAX_READ)))
        if reply is None:
            return None, b""
        info, parts = self._info(reply), [reply[15]]
        got = len(parts[0])
        while got < limit and offset + got < info.offset:
            # Bigger than one script returns: continue from where it stopped, same generation.
            reply = await self._eval(_READ, keys, offset + got, min(limit - got, MAX_READ))
            if reply is None:
                return None, b""
            latest = self._info(reply)
            if latest.generation != info.generation:
                return latest, b""
            info = latest
            parts.append(reply[15])
            got += len(reply[15])
        return info, join(parts)

    async def wait(self, info: StreamInfo, timeout: float) -> None:
        stream_id = info.id
        mine = self._producing.get(stream_id)
        if mine is not None and mine.info.generation == info.generation:
            # This process holds the lease: every change but another process's abort/delete
            # is its own and notifies locally, so no tail. Those two make its next write (or
            # renewal) raise LeaseLost, which notifies too; until then `timeout` bounds it.
            event = self._notifier.event(stream_id)
            if mine.info.version == info.version:
                await self._notifier.wait(stream_id, event, timeout)
            return
        tail = self._tails.get(stream_id)
        if tail is None:
            self._redis()  # fail here, not in the background task, when not on asyncio
            tail = self._tails[stream_id] = _Tail()
            tail.task = asyncio.create_task(self._follow(stream_id, tail))
        resets = tail.resets
        tail.waiters += 1
        deadline = anyio.current_time() + timeout
        try:
            while not tail.newer_than(info) and tail.resets == resets:
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                await self._notifier.wait(stream_id, self._notifier.event(stream_id), left)
        finally:
            tail.waiters -= 1
            tail.idle_since = time.monotonic()

    async def attach(self, stream_id: str, delta: int) -> None:
        await self._eval(_ATTACH, self._keys(stream_id), delta)

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        reply = await self._eval(_ABORT, self._keys(stream_id), "", -1, 0, _ms(ttl))
        if not reply[0]:
            return False
        self._producing.pop(stream_id, None)  # if it was ours: the lease is gone
        self._changed(stream_id, int(reply[1]), reply[2].decode())
        return True

    async def delete(self, stream_id: str) -> bool:
        reply = await self._eval(_DELETE, self._keys(stream_id))
        if not reply[0]:
            return False
        self._producing.pop(stream_id, None)
        self._changed(stream_id, int(reply[1]), "")
        return True

    async def _meta_keys(self) -> AsyncIterator[tuple[str, str, str]]:
        pattern = _glob_escape(f"{self.prefix}:{{") + "*}:meta"
        try:
            async for key in self._redis().scan_iter(match=pattern, count=500):
                base = key[: -len(b"meta")].decode("utf-8", "surrogatepass")
                yield base + "meta", base + "body", base + "ev"
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis SCAN failed: {exc!r}") from exc

    async def purge_expired(self) -> int:
        removed = 0
        async for keys in self._meta_keys():
            removed += int(await self._eval(_PURGE, keys))
        return removed

    async def scan(self) -> AsyncIterator[StreamInfo]:
        async for keys in self._meta_keys():
            reply = await self._eval(_INFO, keys)
            if reply is not None:
                yield self._info(reply)
