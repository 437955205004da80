"""The follower: wakes this process's readers when another process changes a stream.

Every change (start, append, finish, abort, delete) adds an entry to the stream's tiny ``ev``
stream, whose entry id is the new version. For each stream this process waits on (and does not
produce), one background task runs ``XREAD BLOCK`` on ``ev`` — not on the body, so a wake-up
costs a few bytes — and fans out through the store's `Notifier`. The task stops one block
interval after its last waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import anyio
from redis.exceptions import RedisError

from .._base import Notifier, StreamInfo
from ._connection import Connection

__all__ = ["Follower", "Tail"]


def _parse_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of redis-py's XREAD reply for one key (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    stream = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if stream and isinstance(stream[0], list):
        stream = stream[0]  # RESP3 wraps the entries once more
    return [(entry_id, fields) for entry_id, fields in stream]


@dataclass
class Tail:
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


class Follower:
    """The tails of the streams this process waits on, by stream id."""

    __slots__ = ("_connection", "_notifier", "tails")

    def __init__(self, connection: Connection, notifier: Notifier) -> None:
        self._connection = connection
        self._notifier = notifier
        self.tails: dict[str, Tail] = {}

    def saw(self, stream_id: str, version: int, generation: str) -> None:
        """This process changed the stream: its tail (if any) need not wake anyone for it."""
        tail = self.tails.get(stream_id)
        if tail is not None:
            tail.saw(version, generation)

    async def wait(self, info: StreamInfo, timeout: float, *, key: str) -> None:
        """Return once `key` (the stream's ``ev``) shows a change since `info`, the tail loses
        Redis or closes, or after `timeout`."""
        stream_id = info.id
        tail = self.tails.get(stream_id)
        if tail is None:
            self._connection.commands()  # fail here, not in the background task, off asyncio
            tail = self.tails[stream_id] = Tail()
            tail.task = asyncio.create_task(self._follow(stream_id, tail, key))
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

    async def _follow(self, stream_id: str, tail: Tail, key: str) -> None:
        """Tail `key` for this process until nobody has waited for a while."""
        client = self._connection.tails()
        block_seconds = self._connection.block_seconds
        last = b"0-0"
        try:
            while self.tails.get(stream_id) is tail:  # close() removes it
                try:
                    reply = await client.xread({key: last}, block=self._connection.block_ms)
                except (RedisError, OSError):
                    # Let every waiter re-read (and meet the error, or the data loss, itself).
                    tail.resets += 1
                    tail.version = None
                    last = b"0-0"
                    self._notifier.notify(stream_id)
                    await asyncio.sleep(min(block_seconds, 0.5))
                else:
                    for entry_id, fields in _parse_entries(reply):
                        last = entry_id
                        version = int(entry_id.split(b"-", 1)[0])
                        if tail.saw(version, fields.get(b"g", b"").decode()):
                            self._notifier.notify(stream_id)
                if (
                    tail.waiters == 0
                    and time.monotonic() - tail.idle_since >= block_seconds
                    and self.tails.get(stream_id) is tail
                ):
                    del self.tails[stream_id]
                    return
        finally:
            if self.tails.get(stream_id) is tail:
                del self.tails[stream_id]
            self._notifier.notify(stream_id)

    async def close(self) -> None:
        """Stop every tail; their waiters return."""
        tails = list(self.tails.items())
        self.tails.clear()
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
