"""Apps the fault suite serves from a subprocess
(``running_server("tests.support.fault_apps:slow")``).

The subprocess reads its configuration from the environment the test sets before starting it:
``FAULT_DB`` (the SQLite file shared with the test), ``FAULT_CHUNKS`` and ``FAULT_DELAY``.
"""

from __future__ import annotations

import os

from durable_asgi import DurableMiddleware
from durable_asgi._types import Receive, Scope, Send
from durable_asgi.stores.sqlite import SQLiteStore


def chunk(i: int) -> bytes:
    return b"slow %05d|" % i


async def _slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
    import anyio

    if scope["type"] != "http":
        return
    await receive()
    count = int(os.environ.get("FAULT_CHUNKS", "200"))
    delay = float(os.environ.get("FAULT_DELAY", "0.05"))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    for i in range(count):
        await anyio.sleep(delay)
        await send({"type": "http.response.body", "body": chunk(i), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _make() -> DurableMiddleware | None:
    path = os.environ.get("FAULT_DB")
    if not path:
        return None
    return DurableMiddleware(
        _slow_stream,
        store=SQLiteStore(path),
        lease_seconds=1.0,
        poll_interval=0.1,
        shutdown_grace=float(os.environ.get("FAULT_GRACE", "0.5")),
    )


slow = _make()
