"""Wake-ups for changes made by other processes, which can't notify this one.

One poller task per store queries the (generation, version) of every stream its readers wait
on, in one query every `poll_interval`, and wakes the waiters of those that changed. Not the
streams this process produces: their changes come through it (another process's abort or
delete of one reaches its producer at the next write or lease renewal, and its readers here
with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import anyio

from .._base import Notifier, StoreError
from ._connection import Database
from ._local import ABSENT, Known
from ._schema import LIVE
from ._writes import IDS_PER_QUERY


class Poller:
    """Polls the streams being `watched`, while any are; stops by itself when idle.

    Example::

        with poller.watching(stream_id):
            await notifier.wait(stream_id, event, timeout)
    """

    __slots__ = ("_db", "_known", "_notifier", "_watchers", "interval", "task")

    def __init__(self, db: Database, known: Known, notifier: Notifier, interval: float) -> None:
        self._db = db
        self._known = known
        self._notifier = notifier
        self.interval = interval
        self._watchers: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watching(self, stream_id: str) -> Iterator[None]:
        """Poll `stream_id` for as long as the block runs."""
        self._watchers[stream_id] = self._watchers.get(stream_id, 0) + 1
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            left = self._watchers.pop(stream_id) - 1
            if left:
                self._watchers[stream_id] = left

    async def stop(self) -> None:
        """Cancel the task, if running (the store is closing)."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _run(self) -> None:
        idle = 0.0
        try:
            while idle < 10 * self.interval + 1.0:
                await anyio.sleep(self.interval)
                ids = list(self._watchers)
                if not ids:
                    idle += self.interval
                    continue
                idle = 0.0
                seen = await self._versions(ids)
                for stream_id in ids:
                    if self._known.observe(stream_id, seen.get(stream_id, ABSENT)):
                        self._notifier.notify(stream_id)
                self._known.prune(self._watchers)
        except StoreError:
            for stream_id in list(self._watchers):
                self._notifier.notify(stream_id)  # let them meet the error themselves
        finally:
            if self.task is asyncio.current_task():
                self.task = None

    async def _versions(self, ids: list[str]) -> dict[str, tuple[str, int]]:
        """The (generation, version) of those of `ids` that exist, as of now."""
        seen: dict[str, tuple[str, int]] = {}
        for at in range(0, len(ids), IDS_PER_QUERY):
            chunk = ids[at : at + IDS_PER_QUERY]
            params = {f"i{n}": sid for n, sid in enumerate(chunk)}
            rows = await self._db.query(
                f"SELECT id, generation, version FROM streams WHERE id IN "
                f"({', '.join(':' + name for name in params)}) AND {LIVE}",
                {**params, "now": time.time()},
            )
            seen.update((row["id"], (row["generation"], row["version"])) for row in rows)
        return seen
