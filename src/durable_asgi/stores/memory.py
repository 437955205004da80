"""`MemoryStore`: one process, zero set-up, the default.

Bodies are kept as the list of appended segments plus their cumulative end offsets, so a read
from any offset is a bisect and readers share the producer's bytes (no per-reader copies).
Capacity is bounded by `max_streams` and `max_bytes`; to make room the oldest *finished* streams
are evicted first, and a claim that still cannot fit raises `StoreFull`.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ._base import (
    FinalState,
    Headers,
    Lease,
    LeaseLost,
    Notifier,
    StoreFull,
    StreamInfo,
    effective,
    evolve,
    is_claimable,
    join,
    new_token,
)

__all__ = ["MemoryStore"]


@dataclass
class _Stream:
    info: StreamInfo
    parts: list[bytes] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    """ends[i] is the offset just past parts[i]."""


class MemoryStore:
    """Streams kept in this process's memory.

    Args:
        max_streams: most streams kept at once (running + finished).
        max_bytes: most body bytes kept at once, all streams together.

    Example::

        app.add_middleware(DurableMiddleware, store=MemoryStore(max_bytes=256 << 20))

    Streams are lost when the process exits and are not shared between workers: use
    `SQLiteStore` or `RedisStore` for that.
    """

    def __init__(self, *, max_streams: int = 10_000, max_bytes: int = 1 << 30) -> None:
        if max_streams < 1 or max_bytes < 1:
            raise ValueError("max_streams and max_bytes must be positive")
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        # Insertion order doubles as eviction order: finished streams are moved to the end.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._bytes = 0
        self._notifier = Notifier()
        self._next_purge = 0.0

    def __repr__(self) -> str:
        return f"MemoryStore(max_streams={self.max_streams}, max_bytes={self.max_bytes})"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- internals -------------------------------------------------------------------------

    def _get(self, stream_id: str, now: float) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        expires = stream.info.expires_at
        if expires is not None and expires <= now:
            self._remove(stream_id)
            return None
        return stream

    def _remove(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._bytes -= stream.info.offset
            self._notifier.notify(stream_id)

    def _owned(self, lease: Lease) -> _Stream:
        stream = self._streams.get(lease.stream_id)
        # A lease that ran out is lost for good: readers were already told the stream failed.
        if stream is None or not _holds(stream.info, lease, time.time()):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")
        return stream

    def _update(self, stream: _Stream, **changes: Any) -> None:
        info = stream.info
        stream.info = evolve(info, version=info.version + 1, updated_at=time.time(), **changes)
        self._notifier.notify(info.id)

    def _make_room(self, extra_streams: int, extra_bytes: int) -> bool:
        """Evict finished streams, oldest first, until the new data fits."""
        if (
            len(self._streams) + extra_streams <= self.max_streams
            and self._bytes + extra_bytes <= self.max_bytes
        ):
            return True
        for stream_id in [sid for sid, s in self._streams.items() if s.info.finished]:
            self._remove(stream_id)
            if (
                len(self._streams) + extra_streams <= self.max_streams
                and self._bytes + extra_bytes <= self.max_bytes
            ):
                return True
        return False

    # -- Store protocol --------------------------------------------------------------------

    async def claim(
        self, stream_id: str, *, lease_seconds: float, replace: bool = False
    ) -> Lease | StreamInfo:
        now = time.time()
        if now >= self._next_purge:
            self._next_purge = now + 1.0
            await self.purge_expired()
        stream = self._get(stream_id, now)
        if stream is not None and not is_claimable(stream.info, now, replace):
            return effective(stream.info, now)
        if stream is not None:
            self._remove(stream_id)
        if not self._make_room(1, 0):
            raise StoreFull(f"MemoryStore holds {len(self._streams)} running streams (max_streams)")
        token = new_token()
        self._streams[stream_id] = _Stream(
            StreamInfo(
                id=stream_id,
                state="running",
                generation=token,
                version=1,
                offset=0,
                chunks=0,
                readers=0 if stream is None else stream.info.readers,
                status_code=None,
                headers=None,
                created_at=now,
                updated_at=now,
                expires_at=None,
                lease_expires_at=now + lease_seconds,
            )
        )
        return Lease(stream_id, token)

    async def start(self, lease: Lease, status: int, headers: Headers) -> None:
        self._write(lease, (status, headers), b"", 0)

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        self._write(lease, None, data, chunks)

    def _write(
        self, lease: Lease, head: tuple[int, Headers] | None, data: bytes, chunks: int
    ) -> None:
        """A head or body bytes, fenced by `lease` (one code path for both: the per-chunk one)."""
        stream = self._streams.get(lease.stream_id)
        now = time.time()
        # A lease that ran out is lost for good: readers were already told it failed.
        if stream is None or not _holds(stream.info, lease, now):
            raise LeaseLost(f"lease on {lease.stream_id!r} was lost")
        if data and not self._make_room(0, len(data)):
            raise StoreFull(f"MemoryStore holds {self._bytes} bytes (max_bytes={self.max_bytes})")
        info = stream.info
        changes: dict[str, Any] = {}
        if head is not None:
            changes["status_code"], changes["headers"] = head[0], tuple(head[1])
        if data:
            changes["offset"] = offset = info.offset + len(data)
            stream.parts.append(data)
            stream.ends.append(offset)
            self._bytes += len(data)
        if chunks:
            changes["chunks"] = info.chunks + chunks
        if changes:
            stream.info = evolve(info, version=info.version + 1, updated_at=now, **changes)
            self._notifier.notify(lease.stream_id)

    async def renew(self, lease: Lease, *, lease_seconds: float) -> None:
        stream = self._owned(lease)
        # Not a visible change: no version bump, no wake-up.
        stream.info = evolve(stream.info, lease_expires_at=time.time() + lease_seconds)

    async def finish(self, lease: Lease, state: FinalState, *, ttl: float, retain: bool) -> None:
        stream = self._owned(lease)
        self._update(
            stream,
            state=state,
            expires_at=time.time() + ttl,
            lease_expires_at=None,
            retain=retain,
        )
        self._streams.move_to_end(lease.stream_id)

    async def info(self, stream_id: str) -> StreamInfo | None:
        now = time.time()
        stream = self._get(stream_id, now)
        return None if stream is None else effective(stream.info, now)

    async def read(
        self, stream_id: str, offset: int, limit: int
    ) -> tuple[StreamInfo | None, bytes]:
        now = time.time()
        stream = self._get(stream_id, now)
        if stream is None:
            return None, b""
        info = effective(stream.info, now)
        if offset >= info.offset or limit <= 0:
            return info, b""
        ends = stream.ends
        first = bisect.bisect_right(ends, offset)
        start = ends[first - 1] if first else 0
        parts = [stream.parts[first][offset - start :]]
        size = len(parts[0])
        i = first + 1
        while size < limit and i < len(ends):
            parts.append(stream.parts[i])
            size += len(stream.parts[i])
            i += 1
        data = join(parts)
        return info, data[:limit] if size > limit else data

    async def wait(self, info: StreamInfo, timeout: float) -> None:
        event = self._notifier.event(info.id)
        current = self._streams.get(info.id)
        if current is None or (current.info.generation, current.info.version) != (
            info.generation,
            info.version,
        ):
            return
        await self._notifier.wait(info.id, event, timeout)

    async def attach(self, stream_id: str, delta: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.info = evolve(stream.info, readers=max(0, stream.info.readers + delta))

    async def abort(self, stream_id: str, *, ttl: float) -> bool:
        now = time.time()
        stream = self._get(stream_id, now)
        if stream is None or effective(stream.info, now).state != "running":
            return False
        self._update(stream, state="aborted", lease_expires_at=None, expires_at=now + ttl)
        self._streams.move_to_end(stream_id)
        return True

    async def delete(self, stream_id: str) -> bool:
        existed = self._get(stream_id, time.time()) is not None
        self._remove(stream_id)
        return existed

    async def purge_expired(self) -> int:
        now = time.time()
        expired = [
            sid
            for sid, s in self._streams.items()
            if s.info.expires_at is not None and s.info.expires_at <= now
        ]
        for stream_id in expired:
            self._remove(stream_id)
        return len(expired)

    async def scan(self) -> AsyncIterator[StreamInfo]:
        now = time.time()
        for stream in list(self._streams.values()):
            expires = stream.info.expires_at
            if expires is None or expires > now:
                yield effective(stream.info, now)


def _holds(info: StreamInfo, lease: Lease, now: float) -> bool:
    """Whether `lease` is still the running stream's (`effective`, without a copy)."""
    expires = info.lease_expires_at
    return (
        info.generation == lease.token
        and info.state == "running"
        and (expires is None or now <= expires)
    )
