"""The Lua scripts behind every store operation, and the two lanes that send them.

Each script is ``lua/prelude.lua`` followed by ``lua/<name>.lua`` (and before it the files it
uses: ``lua/writes.lua`` holds the writes `START`, `APPEND` and `BATCH` share), read once at
import and called by SHA (``EVALSHA``), sent in full (``EVAL``) only when Redis answers
``NOSCRIPT`` (it was restarted or flushed): redis-py's `Script` works the same way, but can't
be batched into our pipelines. `CONSTANTS` are appended to every call's ARGV, after the
script's own.

Calls go through two `GroupCommit` lanes, each sent in queue order, a pipeline at a time (one
round trip and one pooled connection for many streams' commands): producers' fenced writes,
and everything else (claims, reads, control), so a request joining a stream doesn't wait
behind a pipeline of a thousand appends in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ...exceptions import StoreError, StoreFull
from .._batch import GroupCommit, Waiter
from ._connection import Client, Connection

__all__ = [
    "BATCH_BYTES",
    "CONSTANTS",
    "LEASES",
    "MAX_BATCH",
    "MAX_ENTRY",
    "MAX_PIPELINE",
    "OTHERS",
    "SCRIPTS",
    "WRITES",
    "Lanes",
    "Script",
    "load_scripts",
]

#: Largest body entry: bigger appends are split, so a read from the middle of a huge append
#: copies at most this much more than it returns.
MAX_ENTRY = 64 << 10
#: How much longer ``ev`` lives than the stream's other keys (ms).
EV_MARGIN_MS = 60_000
#: The ARGV tail of every call, read by prelude.lua as ``EV_MARGIN, PIECE`` (bytes: sent as is).
CONSTANTS = (b"%d" % EV_MARGIN_MS, b"%d" % MAX_ENTRY)
#: Most scripts sent in one pipeline.
MAX_PIPELINE = 256
#: Most streams in one `BATCH` call, and the body bytes after which a call takes no more: a
#: call runs in Redis as one script, which nothing else interleaves with, so a few hundred
#: streams or a few big appends make several calls (of one pipeline).
MAX_BATCH, BATCH_BYTES = 64, 1 << 20
#: The lanes: producers' fenced writes, lease renewals, and every other script. Renewals have a
#: lane of their own so that a busy worker's renewals never queue behind its writes' pipeline
#: (a lease that runs out while its renewal waits is lost, and so is the stream).
WRITES, LEASES, OTHERS = 0, 1, 2

_LUA = Path(__file__).with_name("lua")
_PRELUDE = (_LUA / "prelude.lua").read_text(encoding="utf-8")

Call = tuple["Script", Sequence[str], Sequence[Any]]


@dataclass(frozen=True)
class Script:
    """One Lua script: its name (for errors), its full source and that source's SHA-1."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, *uses: str) -> Script:
        """``lua/<name>.lua`` after the prelude and the files it `uses` (``lua/<use>.lua``)."""
        files = (*uses, name)
        source = _PRELUDE + "".join((_LUA / f"{f}.lua").read_text(encoding="utf-8") for f in files)
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    def error(self, message: str) -> StoreError:
        """What an error of this script raises (`message`: Redis's error reply)."""
        if message.startswith("OOM"):
            return StoreFull(f"Redis is full (maxmemory): {message}")
        return StoreError(f"Redis {self.name} failed: {message}")

    async def run(self, client: Client, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run it alone (not pipelined): by SHA, in full if Redis doesn't have it."""
        argv = (*args, *CONSTANTS)
        try:
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *argv)
            except NoScriptError:
                return await client.eval(self.source, len(keys), *keys, *argv)
        except ResponseError as exc:
            raise self.error(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis {self.name} failed: {exc!r}") from exc


CLAIM = Script.load("claim")
START = Script.load("start", "writes")
APPEND = Script.load("append", "writes")
BATCH = Script.load("batch", "writes")
CHECK = Script.load("check")
RENEW = Script.load("renew")
FINISH = Script.load("finish")
INFO = Script.load("info")
READ = Script.load("read")
ABORT = Script.load("abort")
DELETE = Script.load("delete")
ATTACH = Script.load("attach")
PURGE = Script.load("purge")
#: Every script, loaded into Redis when the store opens.
SCRIPTS = (
    CLAIM,
    START,
    APPEND,
    BATCH,
    CHECK,
    RENEW,
    FINISH,
    INFO,
    READ,
    ABORT,
    DELETE,
    ATTACH,
    PURGE,
)


async def load_scripts(client: Client) -> None:
    """Load every script into Redis (one pipeline), so that the first calls of a busy worker
    don't all meet ``NOSCRIPT`` at once."""
    if isinstance(client, RedisCluster):
        return  # each node learns a script on its first NOSCRIPT (`Script.run`)
    pipe = client.pipeline(transaction=False)
    for script in SCRIPTS:
        pipe.script_load(script.source)
    await pipe.execute()


class Lanes:
    """Runs scripts through the lanes (`WRITES`, `LEASES`, `OTHERS`), each batched into
    pipelines of its own."""

    __slots__ = ("_alone", "_alone_done", "_connection", "_lanes")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._alone = False  # an `OTHERS` call is running outside the lane (see `run`)
        self._alone_done: asyncio.Future[None] | None = None  # for `drain` to wait on it
        self._lanes = tuple(
            GroupCommit[Call, Any](self._flush, max_batch=MAX_PIPELINE)
            for _ in (WRITES, LEASES, OTHERS)
        )

    async def run(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], lane: int = OTHERS
    ) -> Any:
        """Run `script` on `keys` with `args`, in `lane`'s order; its reply.

        An `OTHERS` call (a claim, a read: each caller's own, ordered only by its awaits) that
        finds that lane idle runs at once in the caller's task, without the flusher task and
        the future between them (two turns of a busy loop on a new stream's first byte); the
        calls that come while it runs queue up as one pipeline."""
        client = self._connection.commands()
        if isinstance(client, RedisCluster):  # keys of one call share a slot, a batch doesn't
            return await script.run(client, keys, args)
        queue = self._lanes[lane]
        if lane == OTHERS and not self._alone and queue.idle:
            self._alone = True
            try:
                return await script.run(client, keys, args)
            finally:
                self._alone = False
                done, self._alone_done = self._alone_done, None
                if done is not None and not done.done():
                    done.set_result(None)
        return await queue.submit((script, keys, args))

    @property
    def batched(self) -> bool:
        """False on a cluster: keys of one call share a slot, a pipeline's don't."""
        return not isinstance(self._connection.commands(), RedisCluster)

    def enqueue(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        lane: int = OTHERS,
        waiter: Waiter | None = None,
    ) -> asyncio.Future[Any]:
        """Queue `script` in `lane` and return the future of its reply, so that many calls
        go in one pipeline (only where `batched`); `waiter` wakes once they are answered."""
        return self._lanes[lane].enqueue((script, keys, args), waiter)

    async def drain(self) -> None:
        """Wait until the scripts queued so far are sent and answered, and the call running
        outside its lane, if any (the store is closing: its connection must outlive them)."""
        while True:
            for lane in self._lanes:
                await lane.drain()
            if not self._alone:
                return
            if self._alone_done is None:
                self._alone_done = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._alone_done)  # then what queued behind it

    async def _flush(self, calls: Sequence[Call]) -> list[Any]:
        client = self._connection.commands()
        assert isinstance(client, Redis)  # a cluster's calls bypass the lanes
        if len(calls) == 1:  # no pipeline to build for one
            script, keys, args = calls[0]
            try:
                return [await script.run(client, keys, args)]
            except Exception as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args, *CONSTANTS)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            return [StoreError(f"Redis {script.name} failed: {exc!r}") for script, _, _ in calls]
        unloaded = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unloaded:  # Redis lost them (restart, SCRIPT FLUSH): load them, resend those calls
            replies = list(replies)
            again = await _load_and_run(client, [calls[i] for i in unloaded])
            for i, reply in zip(unloaded, again, strict=True):
                replies[i] = reply
        results: list[Any] = []
        for (script, _, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, ResponseError):
                reply = script.error(str(reply))
            results.append(reply)
        return results


async def _load_and_run(client: Redis, calls: Sequence[Call]) -> list[Any]:
    """`calls` again after loading their scripts: one pipeline, where resending each call in
    full one by one would cost a busy worker a round trip (and a turn of its loop) per call."""
    scripts = {script.sha: script for script, _, _ in calls}
    pipe = client.pipeline(transaction=False)
    for script in scripts.values():
        pipe.script_load(script.source)
    for script, keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args, *CONSTANTS)
    try:
        replies = await pipe.execute(raise_on_error=False)
    except (RedisError, OSError) as exc:
        return [StoreError(f"Redis {script.name} failed: {exc!r}") for script, _, _ in calls]
    return list(replies[len(scripts) :])
