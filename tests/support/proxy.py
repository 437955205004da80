"""A loopback TCP proxy that cuts connections, for clients that must survive them.

    with running_proxy(server.url) as proxy:
        proxy.plan([120, 900])          # cut the next new connection after 120 bytes from the
        ...                             # server, the one after that after 900; later ones: never
        proxy.plan([AFTER_HEAD])        # cut the next one right after the response's head
        proxy.cut_all()                 # or cut every open connection now, on cue

It forwards bytes both ways unchanged and cuts only the server-to-client direction's
connection, at a byte count, so a cut lands anywhere: in the status line, between headers,
inside a chunk-size line or in the middle of a body chunk. A cut closes both sides, half of the
time with a TCP reset (SO_LINGER 0) and half with a plain FIN, as real networks do.

It runs on anyio in a thread of its own (a blocking portal), so the same `with` serves sync
tests, asyncio and trio tests, and Playwright.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["AFTER_HEAD", "CuttingProxy", "running_proxy"]

AFTER_HEAD = -1
"""A budget that cuts right after the first response's head: headers in, not a body byte."""


@dataclass(eq=False)
class _Connection:
    client: anyio.abc.SocketStream
    upstream: anyio.abc.SocketStream
    scope: anyio.CancelScope
    budget: int | None  # server-to-client bytes before the cut; None: never cut
    reset: bool


@dataclass(eq=False)
class CuttingProxy:
    """Forwards connections to `upstream` (host, port), cutting them by plan or on cue."""

    upstream: tuple[str, int]
    seed: int = 0
    port: int = 0
    connections: int = 0
    """Connections accepted so far."""
    cuts: int = 0
    """Connections cut so far."""
    _budgets: deque[int] = field(default_factory=deque)
    _open: set[_Connection] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _portal: BlockingPortal | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, budgets: Iterable[int]) -> None:
        """Cut the next new connections after these many server-to-client bytes, in order.

        Replaces any plan left over. Connections opened after the plan runs out are not cut.
        """
        with self._lock:
            self._budgets = deque(budgets)

    def pending(self) -> int:
        """Cuts of the plan not yet used by a connection."""
        with self._lock:
            return len(self._budgets)

    def cut_all(self) -> int:
        """Cut every open connection now; returns how many were cut. From any thread but the
        proxy's own."""
        assert self._portal is not None, "the proxy is not running"
        return self._portal.call(self._cut_all)

    async def _cut_all(self) -> int:
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            connection.budget = 0
            connection.scope.cancel()
        return len(connections)

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        rng = random.Random(self.seed)

        async def accepted(client: anyio.abc.SocketStream) -> None:
            with self._lock:
                self.connections += 1
                budget = self._budgets.popleft() if self._budgets else None
                reset = rng.random() < 0.5
            await self._relay(client, budget, reset)

        await listener.serve(accepted)

    async def _relay(self, client: anyio.abc.SocketStream, budget: int | None, reset: bool) -> None:
        try:
            upstream = await anyio.connect_tcp(*self.upstream)
        except OSError:
            await client.aclose()
            return
        connection = _Connection(client, upstream, anyio.CancelScope(), budget, reset)
        try:
            with connection.scope:
                with self._lock:
                    self._open.add(connection)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._forward_requests, connection, connection.scope)
                    await self._forward_responses(connection)
                    connection.scope.cancel()
        finally:
            with self._lock:
                self._open.discard(connection)
                if connection.budget == 0:
                    self.cuts += 1
            if connection.budget == 0 and connection.reset:
                _reset_on_close(client)
                _reset_on_close(upstream)
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await upstream.aclose()

    async def _forward_requests(self, connection: _Connection, scope: anyio.CancelScope) -> None:
        try:
            async for data in connection.client:
                await connection.upstream.send(data)
            await connection.upstream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            scope.cancel()

    async def _forward_responses(self, connection: _Connection) -> None:
        head = b""
        try:
            async for data in connection.upstream:
                if connection.budget == AFTER_HEAD:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    connection.budget = end + 4
                    data, head = head, b""
                budget = connection.budget
                if budget is not None and len(data) >= budget:
                    if budget:
                        await connection.client.send(data[:budget])
                    connection.budget = 0
                    return
                if budget is not None:
                    connection.budget = budget - len(data)
                await connection.client.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


def _reset_on_close(stream: anyio.abc.SocketStream) -> None:
    """Make closing `stream` send a TCP reset instead of a FIN."""
    with contextlib.suppress(OSError):
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextlib.contextmanager
def running_proxy(upstream_url: str, *, seed: int = 0) -> Iterator[CuttingProxy]:
    """Run a `CuttingProxy` to `upstream_url` on a free loopback port until the block ends."""
    parts = urlsplit(upstream_url)
    proxy = CuttingProxy((parts.hostname or "127.0.0.1", parts.port or 80), seed=seed)
    with start_blocking_portal() as portal:
        proxy._portal = portal
        listener = portal.call(_listen)
        proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        future = portal.start_task_soon(proxy.serve, listener)
        try:
            yield proxy
        finally:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=5)
            portal.call(listener.aclose)


async def _listen() -> anyio.abc.Listener[anyio.abc.SocketStream]:
    return await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
