"""The `Store` protocol every backend implements, and the few pieces they share.

A store keeps *streams*. A stream is one recorded HTTP response: a head (status and headers),
an append-only body addressed by byte offset, and a state. Exactly one *producer* writes a
stream; it proves it is still the producer with a `Lease` whose token fences every write, so a
producer that lost its lease (aborted, deleted, or presumed dead and taken over) can never write
again. Any number of readers read from any offset and `wait` for changes.

State machine::

    (absent) --claim--> running --finish--> complete | failed | aborted
                          |  \\--abort-----> aborted
                          \\--lease expires--> failed   (reported by `info`/`read`)

A stream is *claimable* (the next `claim` replaces it with a fresh one) when it is absent,
expired, `failed`, running with an expired lease, or finished but not retained (non-2xx).

Third-party stores implement `Store`; `tests/stores/test_store_conformance.py` is the suite
they must pass. All times are Unix seconds (wall clock) because several processes share a store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from ..exceptions import LeaseLost, StoreError, StoreFull

__all__ = [
    "FINAL_STATES",
    "Headers",
    "Lease",
    "LeaseLost",
    "LocalCopy",
    "Notifier",
    "State",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreStats",
    "StreamInfo",
    "Write",
    "count_streams",
    "dump_headers",
    "effective",
    "evolve",
    "info_from_row",
    "is_claimable",
    "load_headers",
    "new_token",
    "stream_id",
    "wait_own",
    "write_all",
    "write_each",
]

State = Literal["running", "complete", "failed", "aborted"]
FinalState = Literal["complete", "failed", "aborted"]
FINAL_STATES: frozenset[str] = frozenset({"complete", "failed", "aborted"})
Headers = tuple[tuple[bytes, bytes], ...]

#: Keys longer than this, or with characters outside printable ASCII, are hashed.
MAX_RAW_ID = 200


@dataclass(frozen=True)
class Lease:
    """Proof that the holder is the one producer of `stream_id` (the fencing token)."""

    stream_id: str
    token: str


@dataclass(frozen=True)
class StreamInfo:
    """A consistent snapshot of one stream's metadata.

    `version` changes on every change to the stream (head set, bytes appended, state changed),
    so a reader can wait for "anything new since this snapshot". `generation` is the producer's
    lease token: a reader that sees it change knows the stream was deleted and started again.
    """

    id: str
    state: State
    generation: str
    version: int
    offset: int
    """Bytes stored so far (the body's length once the stream is finished)."""
    chunks: int
    """Body messages the handler sent with data."""
    readers: int
    status_code: int | None
    """The response status, or None while the handler has not started its response."""
    headers: Headers | None
    created_at: float
    updated_at: float
    expires_at: float | None
    """When a finished stream is forgotten (None while running)."""
    lease_expires_at: float | None
    """When the producer's lease runs out unless renewed (None once finished)."""
    retain: bool = True
    """False for a finished non-2xx response: it was delivered, not kept."""

    @property
    def in_progress(self) -> bool:
        return self.state == "running"

    @property
    def finished(self) -> bool:
        return self.state != "running"


@runtime_checkable
class Store(Protocol):
    """Where durable streams live. Implemented by `MemoryStore`, `SQLiteStore`, `RedisStore`.

    Every method is safe to call concurrently from many tasks (and, for shared stores, many
    processes). Writes that take a `Lease` raise `LeaseLost` when the lease is no longer the
    stream's current one.

    Example, the life of a stream::

        lease = await store.claim("/chat#42", lease_seconds=5)
        assert isinstance(lease, Lease)           # we won: nobody else was producing it
        await store.start(lease, 200, ((b"content-type", b"text/plain"),))
        await store.append(lease, b"hello ", chunks=1)
        await store.finish(lease, "complete", ttl=3600)
        info, data = await store.read("/chat#42", 0, 1 << 16)   # -> (StreamInfo, b"hello ")
    """

    async def open(self) -> None:
        """Connect / create schema. Idempotent; called from ASGI lifespan or on first use."""

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        """Atomically become the producer of `stream_id`, or learn who is.

        Returns a `Lease` on a fresh, empty, `running` stream when the stream was claimable (see
        `is_claimable`; the old one's data is discarded), else the existing stream's `StreamInfo`.
        With `replace=True` a finished stream is claimable too: only a running one is kept.
        Of N concurrent claims exactly one gets a lease. Raises `StoreFull` when at capacity.
        """

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        """Record the response head. Called once, before any `append`."""

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        """Append `data` (which holds `chunks` handler messages) at the end of the body."""

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        """Extend the lease to now + `lease_seconds`. A lease that already ran out is lost for
        good (`LeaseLost`): readers were told the stream failed, so it must not come back."""

    async def finish(self, lease: Lease, state: FinalState, *, ttl: float, retain: bool) -> None:
        """End the stream. It is kept `ttl` seconds from now; `retain=False` makes it
        claimable at once (its readers still get the whole response)."""

    async def info(self, stream_id: str) -> StreamInfo | None:
        """The stream's metadata, None when absent or expired."""

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        """Up to `limit` bytes of body from `offset` (fewer, or none, when that's all there
        is), with a snapshot taken atomically with them: if the snapshot's state is final,
        `offset + len(data)` reaching `info.offset` means the reader has everything."""

    async def wait(self, info: StreamInfo, timeout: float) -> None:
        """Return when the stream may have changed since `info` was taken (data appended, head
        set, state changed, deleted or replaced: `generation` or `version` differ), or after
        `timeout` seconds. Spurious returns are allowed; missed changes are not: a change made
        before the call returns at once. A lease running out need not wake waiters (readers
        re-check on timeout)."""

    async def attach(self, stream_id: str, delta: int) -> None:
        """Count readers in (+1) and out (-1) for `StreamInfo.readers`."""

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        """Stop a running stream: state becomes `aborted` (kept `ttl` seconds), the producer's
        lease is revoked, bytes so far stay readable. True if it was running. Idempotent."""

    async def delete(self, stream_id: str) -> bool:
        """Revoke the producer's lease and remove the stream. True if it existed. Idempotent."""

    async def purge_expired(self) -> int:
        """Remove expired streams now; returns how many were removed (stores that also expire
        streams by themselves may count fewer)."""

    def scan(self) -> AsyncIterator[StreamInfo]:
        """Every stream in the store that hasn't expired (for the operator CLI)."""


@dataclass(frozen=True)
class StoreStats:
    """What a store holds, counted store-side (``durable-asgi stats``). A store that can
    count them has an optional ``async def stats() -> StoreStats`` (SQLite, Redis,
    PostgreSQL); a memory store is another process's, so the command line has nothing to ask.

    Example: ``StoreStats({"running": 2, "complete": 40}, bytes=81920, oldest_running=1.7e9)``
    """

    streams: dict[str, int]
    """Streams by state (a running one whose lease ran out counts as ``failed``)."""
    bytes: int
    """Body bytes stored, all streams together."""
    oldest_running: float | None
    """When the longest-running stream started (Unix seconds), None if none runs."""


async def count_streams(streams: AsyncIterator[StreamInfo]) -> StoreStats:
    """`StoreStats` of the streams a `Store.scan` yields."""
    counts: dict[str, int] = {}
    total = 0
    oldest: float | None = None
    async for info in streams:
        counts[info.state] = counts.get(info.state, 0) + 1
        total += info.offset
        if info.state == "running" and (oldest is None or info.created_at < oldest):
            oldest = info.created_at
    return StoreStats(counts, total, oldest)


class Write(NamedTuple):
    """One producer's share of a flush: its response head (the first time), then body bytes
    holding `chunks` handler messages. (A tuple: one is made per stream per flush.)"""

    lease: Lease
    head: tuple[int, Headers] | None
    data: bytes
    chunks: int


async def write_all(store: Store, writes: Sequence[Write]) -> list[BaseException | None]:
    """Store `writes` (of different streams) and answer each one's outcome: None, or the
    error it met (`LeaseLost`, `StoreError`). A store that batches has a ``write_many`` doing
    this in one round trip (SQLite: one transaction; Redis: one pipeline); any other store
    gets its `start` and `append` calls one after another."""
    many = getattr(store, "write_many", None)
    if many is not None:
        return list(await many(writes))
    return await write_each(store, writes)


async def write_each(store: Store, writes: Sequence[Write]) -> list[BaseException | None]:
    """`write_all` one write after another (`start`, `append`)."""
    outcomes: list[BaseException | None] = []
    for write in writes:
        try:
            if write.head is not None:
                await store.start(write.lease, *write.head)
            if write.data or write.chunks:
                await store.append(write.lease, write.data, chunks=write.chunks)
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    return outcomes


def evolve(info: StreamInfo, **changes: object) -> StreamInfo:
    """A copy of `info` with `changes`: `dataclasses.replace` for the per-chunk path, without
    its per-call introspection of the fields (several times faster). Internal: `changes` must
    name fields."""
    new = object.__new__(StreamInfo)
    new.__dict__.update(info.__dict__, **changes)  # frozen: no setattr, and no need of one
    return new


# Header names and values are bytes; latin-1 maps each byte to one code point, losslessly.
def dump_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Headers as stored in ``streams.headers`` (JSON)."""
    return json.dumps(
        [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]
    )


def load_headers(text: str) -> Headers:
    """``streams.headers`` back as headers."""
    pairs: Sequence[Sequence[str]] = json.loads(text)
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs)


def info_from_row(row: Any, same_headers: StreamInfo | None = None) -> StreamInfo:
    """A row of a SQL store's ``streams`` table (a ``sqlite3.Row`` or an asyncpg ``Record``:
    anything indexed by column name) as a `StreamInfo`; `same_headers`: one whose headers are
    the row's (not parsed again)."""
    headers = row["headers"]
    return StreamInfo(
        id=row["id"],
        state=row["state"],
        generation=row["generation"],
        version=row["version"],
        offset=row["size"],
        chunks=row["chunks"],
        readers=row["readers"],
        status_code=row["status_code"],
        headers=(
            same_headers.headers
            if same_headers is not None
            else None
            if headers is None
            else load_headers(headers)
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        lease_expires_at=row["lease_expires_at"],
        retain=bool(row["retain"]),
    )


def running_copy(copy: LocalCopy | None) -> StreamInfo | None:
    """The stream of this process's `copy`, if it is running: a claim of it needs no round trip
    (another process's abort or delete reaches this process at the producer's next write)."""
    if copy is None:
        return None
    info = effective(copy.info)
    return info if info.state == "running" else None


async def wait_own(
    notifier: Notifier, copy: LocalCopy | None, info: StreamInfo, timeout: float
) -> bool:
    """`Store.wait` for a stream this process produces (`copy` holds its lease): every change
    but another process's abort or delete is this process's own and notifies locally; those
    two make the producer's next write (or renewal) raise `LeaseLost`, which notifies too, and
    until then `timeout` bounds the wait. False, at once, when `info` is not of `copy`'s
    generation: the caller waits its own way."""
    if copy is None or copy.info.generation != info.generation:
        return False
    event = notifier.event(info.id)
    if copy.info.version == info.version:
        await notifier.wait(info.id, event, timeout)
    return True


def new_token() -> str:
    """A fresh lease token / stream generation."""
    return secrets.token_hex(12)


def effective(info: StreamInfo, now: float | None = None) -> StreamInfo:
    """`info` as readers must see it: a running stream whose lease ran out has `failed`."""
    expires = info.lease_expires_at
    now = time.time() if now is None else now
    if info.state == "running" and expires is not None and now > expires:
        return replace(info, state="failed", lease_expires_at=None)
    return info


def is_claimable(info: StreamInfo | None, now: float | None = None, replace: bool = False) -> bool:
    """Whether a `claim` may replace this stream (see the module docstring); with `replace`,
    any stream that isn't running is."""
    if info is None:
        return True
    now = time.time() if now is None else now
    info = effective(info, now)
    if info.state == "running":
        return False
    if replace or info.state == "failed" or not info.retain:
        return True
    return info.expires_at is not None and info.expires_at <= now


def stream_id(namespace: str, key: str, owner: str | None = None) -> str:
    """The store id for `key` in `namespace`, bound to `owner` when given.

    Readable (``"/chat#42"``) when short and printable; otherwise — and always when an owner is
    given — a SHA-256 hash, so raw user input never becomes a store key and owners' streams can
    never collide.
    """
    raw = f"{namespace}#{key}"
    if (
        owner is None
        and "#" not in namespace
        and len(raw) <= MAX_RAW_ID
        and raw.isprintable()
        and raw.isascii()
        and not raw.startswith("sha256:")
    ):
        return raw
    digest = hashlib.sha256()
    for part in (namespace, key, owner or ""):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    return "sha256:" + digest.hexdigest()


class Event(Protocol):
    """What `Notifier` hands out: `asyncio.Event` on asyncio (a tenth of the cost of making an
    `anyio.Event`, which finds its backend each time: one is made per wake-up of a stream's
    readers), `anyio.Event` elsewhere."""

    def is_set(self) -> bool: ...
    def set(self) -> object: ...
    async def wait(self) -> object: ...


def _new_event() -> Event:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another backend (trio)
        return anyio.Event()
    return asyncio.Event()


class Notifier:
    """In-process wake-ups per stream: one `Event` per waited-on stream.

    A store calls `notify(id)` after every change it makes; `wait(id, event, timeout)` returns
    on the next notify, or after `timeout` at the latest (sooner is allowed: callers re-check).
    Cheap when nobody waits (no event is created). On asyncio the waiters of a stream share one
    timer, where a timed wait each would cost every waiting reader a cancel scope (~600 B) and a
    timer, made and dropped for every chunk. Used by every bundled store so readers in the
    producer's process are woken without polling.
    """

    def __init__(self) -> None:
        self._events: dict[str, Event] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def notify(self, stream_id: str) -> None:
        event = self._events.pop(stream_id, None)
        if event is not None:
            event.set()
        timer = self._timers.pop(stream_id, None)
        if timer is not None:
            timer.cancel()

    def event(self, stream_id: str) -> Event:
        """The event the next `notify(stream_id)` sets. Take it *before* checking for changes."""
        event = self._events.get(stream_id)
        if event is None:
            event = self._events[stream_id] = _new_event()
        return event

    async def wait(self, stream_id: str, event: Event, timeout: float) -> None:
        """Wait for `event` (from `self.event(stream_id)`), `timeout` seconds at most."""
        if event.is_set():
            await anyio.lowlevel.checkpoint()  # a scheduling point, as any wait is
            return
        if not math.isfinite(timeout):
            await event.wait()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another backend (trio)
            with anyio.move_on_after(timeout):
                await event.wait()
            return
        when = loop.time() + timeout
        timer = self._timers.get(stream_id)
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timers[stream_id] = loop.call_at(when, self.notify, stream_id)
        await event.wait()


def join(parts: Sequence[bytes]) -> bytes:
    """`b"".join` without copying a single part."""
    return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass
class LocalCopy:
    """What a shared store knows of a stream *this process produces*, as of its last committed
    write: the snapshot, and the newest bytes of the body (contiguous, ending at
    ``info.offset``; about `keep` bytes), so that readers in the producer's process — the client
    that started the stream, and resumers that land on the same worker — need no round trip.
    The store drops the copy when the stream finishes or the lease is lost."""

    info: StreamInfo
    keep: int = 64 << 10
    base: int = 0
    """The body offset of ``parts[0]``."""
    parts: list[bytes] = field(default_factory=list)
    size: int = 0

    def __post_init__(self) -> None:
        self.base = self.info.offset

    def update(self, info: StreamInfo, data: Sequence[bytes] = ()) -> None:
        """The stream is now `info`, after `data` (ending at ``info.offset``) was stored."""
        added = sum(map(len, data))
        if added:
            start = info.offset - added
            if self.base + self.size != start:  # not contiguous: start afresh
                self.base, self.parts, self.size = start, [], 0
            self.parts += data
            self.size += added
            while self.size > self.keep and len(self.parts) > 1:
                dropped = self.parts.pop(0)
                self.base += len(dropped)
                self.size -= len(dropped)
        self.info = info

    def settle(self, info: StreamInfo) -> None:
        """The stream finished as `info`: keep its snapshot but none of its bytes, so readers
        that followed it to the end learn how it ended without a round trip (readers behind
        them read the rest from the store)."""
        self.info, self.base, self.parts, self.size = info, info.offset, [], 0

    def read(self, offset: int, limit: int) -> bytes | None:
        """Up to `limit` bytes from `offset`, or None when `offset` isn't held here."""
        if not self.base <= offset <= self.info.offset:
            return None
        # Readers read at or near the tail: find the part holding `offset` from the end, so a
        # read costs what it returns, not every part held (hundreds of small appends).
        held, i, at = self.parts, len(self.parts), self.base + self.size
        while i and at > offset:
            i -= 1
            at -= len(held[i])
        parts, end = [], offset + max(limit, 0)
        while i < len(held) and at < end:
            part = held[i]
            parts.append(part[max(offset - at, 0) : end - at])
            at += len(part)
            i += 1
        return join(parts) if parts else b""
