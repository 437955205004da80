"""Stores: where durable streams live. One module per backend, all behind `Store`.

- `MemoryStore` — this process only; the default.
- `SQLiteStore` — one file; survives restarts; shared by the workers of one machine
  (``pip install "durable-asgi[sqlite]"``).
- `RedisStore` — many workers on many machines (``pip install "durable-asgi[redis]"``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ._base import (
    Headers,
    Lease,
    LeaseLost,
    State,
    Store,
    StoreError,
    StoreFull,
    StreamInfo,
    stream_id,
)
from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = [
    "ENV_VAR",
    "Headers",
    "Lease",
    "LeaseLost",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "State",
    "Store",
    "StoreError",
    "StoreFull",
    "StreamInfo",
    "default_store",
    "store_from_url",
    "stream_id",
]

#: The environment variable naming the default store's URL.
ENV_VAR = "DURABLE_ASGI_STORE"


def __getattr__(name: str) -> Any:
    # The SQLite and Redis stores import optional dependencies: load them on first use.
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def store_from_url(url: str) -> Store:
    """Build a store from a URL.

    - ``memory://`` → `MemoryStore()`
    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` → `SQLiteStore(path)`
    - ``redis://host:6379/0``, ``rediss://…``, ``unix:///path/redis.sock`` → `RedisStore(url)`

    Example::

        store = store_from_url(os.environ.get("DURABLE_ASGI_STORE", "sqlite:///durable.db"))
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        # SQLAlchemy's form: sqlite:///a.db -> "a.db"; sqlite:////var/a.db -> "/var/a.db"
        rest = url[len("sqlite://") :]
        path = unquote(rest[1:] if rest.startswith("/") else rest)
        if not path:
            raise ValueError(f"{url!r} names no file: use sqlite:///path/to/file.db")
        from .sqlite import SQLiteStore

        return SQLiteStore(path)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    raise ValueError(
        f"unknown store URL {url!r}: expected memory://, sqlite:///path.db or redis://host:port/db"
    )


def default_store() -> Store:
    """The store named by ``$DURABLE_ASGI_STORE``, else a `MemoryStore`."""
    url = os.environ.get(ENV_VAR, "").strip()
    return store_from_url(url) if url else MemoryStore()
