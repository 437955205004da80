"""Python clients for durable_asgi streams: every byte exactly once, across reconnects.

`DurableClient` (async) and `SyncDurableClient` read a durable response to its end. When the
connection drops or the body ends abnormally while the stream still runs on the server, they
reconnect with ``Durable-Offset: <bytes yielded so far>`` and go on yielding from there, so the
bytes you get are the whole body, each once. A stream that can't be finished (its handler
failed, it was aborted, deleted or expired) raises `StreamFailed`.

    async with DurableClient("http://127.0.0.1:8000") as client:
        async with client.stream("POST", "/api/chat", key="chat-42", json={"q": "hi"}) as s:
            async for chunk in s:
                print(chunk.decode(), end="")

Needs httpx: ``pip install "durable-asgi[client]"``. It is imported when a client is made, so
importing this module never fails.

Deliberate choices, so nobody "fixes" them back:

- Only a clean end of the body ends a stream. An abnormal end is never passed on as one.
- A response without a ``Durable-State`` header is not durable (no middleware, or no key for
  this request): its body is yielded as it is, and a broken one raises httpx's error, because
  a retry would run the handler again.
- Reconnecting at offset 0 asks for the stream's status first: a request at offset 0 for a
  failed stream would start its handler again, which a reconnect must never do.

Inside: `_core` is the protocol with no I/O (what to send on each attempt, what an answer
means, when to retry or give up); `_async` and `_sync` are thin shells that send with httpx
and do what it says; `_common` holds what they share.
"""

from ..exceptions import DurableClientError, StreamFailed
from ._async import DurableClient, DurableStream
from ._sync import SyncDurableClient, SyncDurableStream

__all__ = [
    "DurableClient",
    "DurableClientError",
    "DurableStream",
    "StreamFailed",
    "SyncDurableClient",
    "SyncDurableStream",
]
