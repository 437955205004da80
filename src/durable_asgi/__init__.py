"""durable_asgi: durable, resumable streaming HTTP responses for any ASGI app.

Wrap an app (or mark routes) and its streaming responses survive the client leaving: the
handler runs to its end, every byte is kept in a store, and any later request with the same key
is served from the store — from any byte offset, then live — without calling the handler again.

Example::

    from fastapi import FastAPI
    from durable_asgi import DurableMiddleware, keys

    app = FastAPI()
    app.add_middleware(DurableMiddleware, key=keys.query("chatId"))
"""

from typing import TYPE_CHECKING, Any

from . import keys
from ._decorator import durable
from ._middleware import DurableMiddleware
from ._options import StreamOptions
from ._request import DurableRequest
from .exceptions import (
    BadRequest,
    ClientDisconnected,
    ConfigurationError,
    DurableClientError,
    DurableError,
    LeaseLost,
    RequestTooLarge,
    StoreError,
    StoreFull,
    StreamFailed,
)
from .keys import Key
from .stores import Lease, MemoryStore, Store, StreamInfo, store_from_url

if TYPE_CHECKING:
    from .stores.postgres import PostgresStore
    from .stores.redis import RedisStore
    from .stores.sqlite import SQLiteStore


def __getattr__(name: str) -> Any:
    # SQLiteStore, RedisStore and PostgresStore need optional extras: import on first use.
    if name in ("SQLiteStore", "RedisStore", "PostgresStore"):
        from . import stores

        return getattr(stores, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadRequest",
    "ClientDisconnected",
    "ConfigurationError",
    "DurableClientError",
    "DurableError",
    "DurableMiddleware",
    "DurableRequest",
    "Key",
    "Lease",
    "LeaseLost",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "RequestTooLarge",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreFull",
    "StreamFailed",
    "StreamInfo",
    "StreamOptions",
    "durable",
    "keys",
    "store_from_url",
]

__version__ = "0.1.0"
