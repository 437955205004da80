"""The listener: wakes this process's readers when another process changes a stream.

One connection per store holds ``LISTEN`` on the store's channel. Every committed write that
readers can see sends the `change_tag` of each stream it changed (`_sql`); the listener wakes
the readers waiting on those streams through the store's `Notifier`, and they re-read from
their offset. Notifications carry no data, so one lost (the connection dropped) loses nothing
but a wake-up: on every loss and every reconnect the listener wakes *all* its waiters, each
makes one catch-up read, and while it is down they re-check every `retry` seconds — never a
hang, never a lost byte.

`mark` / `unchanged` let a reader skip the query ``wait`` would otherwise make: a reader
takes a mark before it reads; if no notification for the stream arrived since (and the
connection stayed up), the stream hasn't changed since the read's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .._base import Notifier
from ._sql import change_tag

__all__ = ["Listener"]

#: Tags whose notifications are counted (for `unchanged`) before the counts are reset.
MAX_TRACKED = 50_000
#: The listener's health query (it names the connection in ``pg_stat_activity.query``).
PING = "SELECT 'durable_asgi listener'"


class Listener:
    """``LISTEN`` on `channel` for the store; connections come from `acquire` / `release`.

    Example::

        mark = listener.mark(stream_id)        # before reading
        info, data = ...                       # read
        with listener.waiting(stream_id):
            event = notifier.event(stream_id)
            if listener.unchanged(stream_id, mark):
                await notifier.wait(stream_id, event, timeout)
    """

    def __init__(
        self,
        acquire: Callable[[], Awaitable[Any]],
        release: Callable[[Any], Awaitable[None]],
        channel: str,
        notifier: Notifier,
        *,
        retry: float = 0.5,
        ping_interval: float = 5.0,
    ) -> None:
        self._acquire = acquire
        self._release = release
        self.channel = channel
        self._notifier = notifier
        self.retry = retry
        self.ping_interval = ping_interval
        self.connected = False
        #: Bumped at every connect and every loss: a mark from another epoch is stale.
        self.epoch = 0
        self.server_pid: int | None = None
        #: Set while the connection is up (listening).
        self.up = asyncio.Event()
        self._counts: dict[str, int] = {}
        self._waiting: dict[str, dict[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- readers ---------------------------------------------------------------------------------

    def mark(self, stream_id: str) -> tuple[int, int]:
        """Take before reading `stream_id`; pass to `unchanged` after."""
        tag = change_tag(stream_id)
        counts = self._counts
        if tag not in counts:
            if len(counts) >= MAX_TRACKED:
                counts.clear()  # stale marks now mismatch: their readers query once
                self.epoch += 1
            counts[tag] = 0
        return self.epoch, counts[tag]

    def unchanged(self, stream_id: str, mark: tuple[int, int]) -> bool:
        """Whether no notification for `stream_id` arrived since `mark` was taken, with the
        connection up all along (so none can have been missed)."""
        return (
            self.connected
            and mark[0] == self.epoch
            and self._counts.get(change_tag(stream_id)) == mark[1]
        )

    @contextlib.contextmanager
    def waiting(self, stream_id: str) -> Iterator[None]:
        """Wake `stream_id`'s waiters on its notifications while the block runs."""
        self.start()
        tag = change_tag(stream_id)
        ids = self._waiting.setdefault(tag, {})
        ids[stream_id] = ids.get(stream_id, 0) + 1
        try:
            yield
        finally:
            left = ids.pop(stream_id) - 1
            if left:
                ids[stream_id] = left
            elif not ids:
                del self._waiting[tag]

    # -- the connection --------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening (idempotent); it runs until `close`."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="durable_asgi postgres listener")

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._wake_all()

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        counts, waiting, notify = self._counts, self._waiting, self._notifier.notify
        for tag in payload.split():
            if tag in counts:
                counts[tag] += 1
            for stream_id in waiting.get(tag, ()):
                notify(stream_id)

    def _wake_all(self) -> None:
        for ids in list(self._waiting.values()):
            for stream_id in list(ids):
                self._notifier.notify(stream_id)

    async def _run(self) -> None:
        while not self._closed:
            connection = None
            lost = asyncio.Event()
            try:
                connection = await self._acquire()
                connection.add_termination_listener(functools.partial(_set, lost))
                await connection.add_listener(self.channel, self._on_notification)
                await connection.fetchval(PING)
                self.server_pid = connection.get_server_pid()
                self.connected = True
                self.up.set()
                self.epoch += 1
                self._wake_all()  # changes made before LISTEN took effect: re-check
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self.ping_interval)
                        break
                    # A connection that died without a word (no FIN): find out.
                    await connection.fetchval(PING, timeout=self.ping_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                pass
            finally:
                self.connected = False
                self.up.clear()
                self.epoch += 1
                self.server_pid = None
                self._wake_all()
                if connection is not None:
                    await asyncio.shield(self._let_go(connection))
            if not self._closed:
                await asyncio.sleep(self.retry)

    async def _let_go(self, connection: Any) -> None:
        """Stop listening on `connection` (if it is still alive) and give it back."""
        with contextlib.suppress(Exception):
            if not connection.is_closed():
                await asyncio.wait_for(
                    connection.remove_listener(self.channel, self._on_notification), 5
                )
        with contextlib.suppress(Exception):
            await self._release(connection)


def _set(event: asyncio.Event, connection: Any) -> None:
    event.set()
