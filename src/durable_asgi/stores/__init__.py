"""Stores: where durable streams live. One module or package per backend, all behind `Store`.

- `MemoryStore` — this process only; the default.
- `SQLiteStore` — one file; survives restarts; shared by the workers of one machine (the
  standard library's ``sqlite3``).
- `RedisStore` — many workers on many machines (``pip install "durable-asgi[redis]"``).
- `PostgresStore` — many workers on many machines, in the PostgreSQL database the app already
  runs (``pip install "durable-asgi[postgres]"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ._base import (
    Headers,
    Lease,
    LeaseLost,
    State,
    Store,
    StoreError,
    StoreFull,
    StoreStats,
    StreamInfo,
    Write,
    stream_id,
    write_all,
)
from .memory import MemoryStore

if TYPE_CHECKING:
    from .postgres import PostgresStore
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = [
    "ENV_VAR",
    "Headers",
    "Lease",
    "LeaseLost",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "State",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreStats",
    "StreamInfo",
    "Write",
    "default_store",
    "store_from_url",
    "stream_id",
    "write_all",
]

#: The environment variable naming the default store's URL.
ENV_VAR = "DURABLE_ASGI_STORE"


def __getattr__(name: str) -> Any:
    # Loaded on first use: RedisStore and PostgresStore need their extras, and none is
    # needed by all.
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def boolean(text: str) -> bool:
    """A yes/no store option in a URL: 1/true/on/yes or 0/false/off/no."""
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(text)


# Store options a URL may carry as query parameters, with their types.
_URL_OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "memory": {"max_streams": int, "max_bytes": int},
    "sqlite": {"poll_interval": float, "busy_timeout": float, "purge_interval": float},
    "redis": {"prefix": str, "block_seconds": float, "orphan_ttl": float, "max_connections": int},
    "postgres": {
        "schema": str,
        "prefix": str,
        "min_connections": int,
        "max_connections": int,
        "command_timeout": float,
        "purge_interval": float,
        "orphan_ttl": float,
        "synchronous_commit": boolean,
    },
}


def _options(url: str, kind: str) -> tuple[str, dict[str, Any]]:
    """Split our options out of `url`'s query; the rest stays (redis-py and asyncpg read
    their own, e.g. ``sslmode``)."""
    parts = urlsplit(url)
    known = _URL_OPTIONS[kind]
    options: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in known:
            try:
                options[name] = known[name](value)
            except ValueError:
                raise ValueError(
                    f"{name}={value!r} in {url!r} is not a valid {known[name].__name__}"
                ) from None
        elif kind in ("redis", "postgres"):
            rest.append((name, value))
        else:
            raise ValueError(f"unknown option {name!r} in {url!r}: expected one of {sorted(known)}")
    return urlunsplit(parts._replace(query=urlencode(rest))), options


def store_from_url(url: str) -> Store:
    """Build a store from a URL; query parameters set the store's options.

    - ``memory://`` → `MemoryStore()` (``?max_streams=…&max_bytes=…``)
    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` → `SQLiteStore(path)`
      (``?poll_interval=0.01&busy_timeout=5``)
    - ``redis://host:6379/0``, ``rediss://…``, ``unix:///path/redis.sock`` → `RedisStore(url)`
      (``?prefix=chat&block_seconds=1``; other parameters go to redis-py)
    - ``postgresql://user@host:5432/db`` or ``postgres://…`` → `PostgresStore(url)`
      (``?schema=durable&max_connections=20``; other parameters, e.g. ``sslmode``, go to asyncpg)

    Example::

        store = store_from_url(os.environ.get("DURABLE_ASGI_STORE", "sqlite:///durable.db"))
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        _, options = _options(url, "memory")
        return MemoryStore(**options)
    if scheme == "sqlite":
        _, options = _options(url, "sqlite")
        # SQLAlchemy's form: sqlite:///a.db -> "a.db"; sqlite:////var/a.db -> "/var/a.db"
        rest = url.split("?", 1)[0][len("sqlite://") :]
        path = unquote(rest[1:] if rest.startswith("/") else rest)
        if not path:
            raise ValueError(f"{url!r} names no file: use sqlite:///path/to/file.db")
        from .sqlite import SQLiteStore

        return SQLiteStore(path, **options)
    if scheme in ("redis", "rediss", "unix"):
        url, options = _options(url, "redis")
        from .redis import RedisStore

        return RedisStore(url, **options)
    if scheme in ("postgresql", "postgres"):
        url, options = _options(url, "postgres")
        from .postgres import PostgresStore

        return PostgresStore(url, **options)
    raise ValueError(
        f"unknown store URL {url!r}: expected memory://, sqlite:///path.db, redis://host:port/db "
        "or postgresql://user@host/db"
    )


def default_store() -> Store:
    """The store named by ``$DURABLE_ASGI_STORE``, else a `MemoryStore`."""
    url = os.environ.get(ENV_VAR, "").strip()
    return store_from_url(url) if url else MemoryStore()
