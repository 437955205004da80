"""What one process knows of the streams in the file, so that most reads need no query.

Streams this process produces are kept in memory from the claim on: the snapshot committed
last and the newest bytes (`TAIL_CACHE`), so its readers' `read`, `info` and `wait` need no
query, and a `claim` of one known to match the file within `poll_interval` (read back in a
commit since, or no other process has committed since: the writer connection's
``PRAGMA data_version``, read in every batch) answers without a transaction. A change made
elsewhere (abort, delete) is met by the producer's next write or renewal, and drops the copy.
When the producer's `finish` commits, the copy keeps the final snapshot (no bytes) for
`poll_interval`, so the readers that followed the stream to its end learn how it ended
without a query each.
"""

from __future__ import annotations

import collections
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._base import Lease, LocalCopy, evolve
from ._schema import to_info
from ._writes import Advanced, Batch, Op

#: Recently appended bytes kept in memory per stream this process produces, to serve its
#: local readers without a query.
TAIL_CACHE = 64 << 10
#: The (generation, version) of a stream that is absent (or expired).
ABSENT = ("", -1)


@dataclass
class Copy(LocalCopy):
    """A `LocalCopy` of a stream this process produces, and how fresh it is."""

    headers: str | None = None
    """``streams.headers`` as stored, so the parsed ``info.headers`` is reused while equal."""
    confirmed: float = 0.0
    """When (monotonic) `info` was last read back from the database, in a commit."""


class Known:
    """The (generation, version) last seen of streams (monotonic per generation), and the
    copies of those this process produces.

    Example::

        known.claimed(lease, row)             # produced here from now on
        changed = known.committed(ops, batch)  # after each batch: wake readers of `changed`
        copy = known.local(stream_id)         # serve a read from memory if not None
    """

    __slots__ = (
        "_copies",
        "_data_version",
        "_quiet_since",
        "_quiet_until",
        "_seen",
        "_settled",
        "poll_interval",
    )

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self._seen: dict[str, tuple[str, int]] = {}
        self._copies: dict[str, Copy] = {}
        self._settled: collections.deque[tuple[float, str]] = collections.deque()
        # Since when the writer's `data_version` has been what the last batch read: no other
        # process has committed from `_quiet_since` to `_quiet_until` (monotonic times).
        self._quiet_since = self._quiet_until = 0.0
        self._data_version: int | None = None

    def seen(self, stream_id: str) -> tuple[str, int] | None:
        """The (generation, version) last seen of the stream, if any."""
        return self._seen.get(stream_id)

    def produces(self, stream_id: str) -> bool:
        """Whether this process holds a copy of the stream (its changes come through here)."""
        return stream_id in self._copies

    def local(self, stream_id: str) -> Copy | None:
        """This process's copy of the stream, if it has one that may be served: a running
        stream's (kept current by its writes here), or a finished one's younger than
        `poll_interval` (dropped after that: another process may delete or rerun it)."""
        copy = self._copies.get(stream_id)
        if (
            copy is not None
            and copy.info.finished
            and time.monotonic() - copy.confirmed >= self.poll_interval
        ):
            del self._copies[stream_id]
            return None
        return copy

    def current(self, copy: Copy) -> bool:
        """Whether `copy` is known to match the file as of less than `poll_interval` ago:
        read back in a commit since, or no other process has committed since it was."""
        as_of = copy.confirmed
        if self._quiet_since <= as_of:
            as_of = max(as_of, self._quiet_until)
        return time.monotonic() - as_of < self.poll_interval

    def claimed(self, lease: Lease, row: sqlite3.Row) -> None:
        """This process claimed the stream, now `row`: its readers here read this copy."""
        self.forget(lease.stream_id)
        self._seen[lease.stream_id] = (lease.token, row["version"])
        self._copies[lease.stream_id] = Copy(
            to_info(row), keep=TAIL_CACHE, headers=row["headers"], confirmed=time.monotonic()
        )

    def committed(self, ops: Sequence[Op], batch: Batch) -> set[str]:
        """A batch committed: refresh the copies; the ids of the streams whose readers to wake."""
        if batch.data_version != self._data_version:  # another process committed since
            self._data_version, self._quiet_since = batch.data_version, batch.checked
        self._quiet_until = batch.checked
        appended: dict[str, list[bytes]] = {}
        finished = set()
        for op, ok in zip(ops, batch.applied, strict=True):
            if op.kind in ("append", "start") and ok:
                appended.setdefault(op.stream_id, [])
                if op.data:
                    appended[op.stream_id].append(op.data)
            elif op.kind == "finish" and ok:
                finished.add(op.stream_id)
        for row in batch.rows:
            stream_id = row["id"]
            parts = appended.get(stream_id)
            if stream_id in batch.advanced and parts is not None:
                parts = []  # the row is from before the appends: they come next
            self._refresh(row, parts, stream_id in finished, batch.checked)
        for stream_id, change in batch.advanced.items():
            self._advance(stream_id, change, appended.get(stream_id, ()), batch)
        for stream_id, renewal in batch.renewed.items():
            copy = self._copies.get(stream_id)
            if copy is not None and copy.info.generation == renewal.token:
                copy.info = evolve(
                    copy.info, lease_expires_at=renewal.lease_expires_at, readers=renewal.readers
                )
                copy.confirmed = batch.checked  # the row, as committed
        for op, ok in zip(ops, batch.applied, strict=True):
            if not ok and op.kind != "attach":
                self._copies.pop(op.stream_id, None)
        # Renewals change nothing readers see; a failed one drops the copy (the lease was lost).
        return {
            op.stream_id
            for op, ok in zip(ops, batch.applied, strict=True)
            if op.kind != "attach" and (op.kind != "renew" or not ok)
        }

    def _refresh(
        self, row: sqlite3.Row, parts: list[bytes] | None, finished: bool, checked: float
    ) -> None:
        """The stream is `row` as committed, after `parts` were appended (None: not written by
        its producer here) and, if `finished`, this process's `finish` of it."""
        stream_id, generation = row["id"], row["generation"]
        self._seen[stream_id] = (generation, row["version"])  # exact: as committed
        copy = self._copies.get(stream_id)
        if row["state"] != "running":
            if copy is None:
                return
            if finished and copy.info.generation == generation:
                self._settle(copy, row, checked)
            else:
                del self._copies[stream_id]
            return
        if copy is None or copy.info.generation != generation:
            if parts is None:  # not produced here (attach): nothing to keep
                return
            copy = self._copies[stream_id] = Copy(to_info(row), keep=TAIL_CACHE)
        info = to_info(row, copy.info if copy.headers == row["headers"] else None)
        copy.headers, copy.confirmed = row["headers"], checked
        copy.update(info, parts or ())

    def _advance(
        self, stream_id: str, change: Advanced, parts: Sequence[bytes], batch: Batch
    ) -> None:
        """The stream's appends, `parts`, committed in `batch` as `change`: the copy moves on
        with them (an append changes nothing else in the row but ``updated_at``)."""
        self._seen[stream_id] = (change.generation, change.version)  # exact: as committed
        copy = self._copies.get(stream_id)
        if copy is None or copy.info.generation != change.generation:
            # No copy to move on (a read of the file saw this commit first and dropped it):
            # this process's readers read the file, as for a stream produced elsewhere.
            self._copies.pop(stream_id, None)
            return
        info = evolve(
            copy.info,
            version=change.version,
            offset=change.size,
            chunks=change.chunks,
            readers=change.readers,
            updated_at=batch.now,
        )
        copy.confirmed = batch.checked
        copy.update(info, parts)

    def _settle(self, copy: Copy, row: sqlite3.Row, now: float) -> None:
        """This process's `finish` of the stream committed as `row`: keep the final snapshot
        for `poll_interval`, then drop it (`local`; or here, on a later finish)."""
        copy.settle(to_info(row, copy.info if copy.headers == row["headers"] else None))
        copy.headers, copy.confirmed = row["headers"], now
        settled = self._settled
        settled.append((now, row["id"]))
        while settled and now - settled[0][0] >= self.poll_interval:
            _, stream_id = settled.popleft()
            self.local(stream_id)

    def drop_unfinished(self, lease: Lease) -> bool:
        """Drop the copy of the lease's stream unless it finished; True if one was dropped."""
        copy = self._copies.get(lease.stream_id)
        if copy is None or copy.info.generation != lease.token or copy.info.finished:
            return False
        del self._copies[lease.stream_id]
        return True

    def observe(self, stream_id: str, seen: tuple[str, int]) -> bool:
        """Record the stream's (generation, version) as seen now; True if that's a change.
        A same-generation observation older than what we know (a query that raced a commit)
        is ignored."""
        known = self._seen.get(stream_id)
        if known is not None and known[0] == seen[0] and known[1] >= seen[1]:
            return False
        self._seen[stream_id] = seen
        copy = self._copies.get(stream_id)
        if copy is not None and (copy.info.generation, copy.info.version) != seen:
            del self._copies[stream_id]  # changed elsewhere (abort, delete, takeover)
        return known != seen

    def forget(self, stream_id: str) -> None:
        """Know nothing of the stream (this process changed it outside a batch)."""
        self._copies.pop(stream_id, None)
        self._seen.pop(stream_id, None)

    def prune(self, keep: Iterable[str]) -> None:
        """Forget the versions of streams neither in `keep` nor produced here."""
        keep = set(keep)
        for stream_id in [s for s in self._seen if s not in keep and s not in self._copies]:
            del self._seen[stream_id]

    def clear(self) -> None:
        """Forget everything (the store is closing)."""
        self._copies.clear()
        self._seen.clear()
