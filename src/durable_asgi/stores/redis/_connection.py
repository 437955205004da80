"""The store's Redis clients: one for commands and one for the follower's blocking reads,
opened lazily from a URL, or one client (``Redis`` or ``RedisCluster``) the caller owns."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ...exceptions import ConfigurationError

__all__ = ["Client", "Connection"]

Client = Redis | RedisCluster


def _connection_kwargs(client: Client) -> Mapping[str, Any]:
    if isinstance(client, RedisCluster):
        return client.get_connection_kwargs()
    return client.connection_pool.connection_kwargs


def _checked(client: Client) -> Client:
    if _connection_kwargs(client).get("decode_responses"):
        raise ValueError(
            "RedisStore needs a client with decode_responses=False: stream bodies are bytes"
        )
    return client


class Connection:
    """Where the store's commands go.

    From a URL, two clients on pools of their own, made on first use and closed by `aclose`:
    commands share a bounded pool, and each followed stream's ``XREAD BLOCK`` holds a
    connection of the other pool, so followers never starve commands. A passed client serves
    both and is never closed here.
    """

    __slots__ = ("block_seconds", "client", "max_connections", "tail_client", "url")

    def __init__(
        self, url_or_client: str | Client, *, block_seconds: float, max_connections: int
    ) -> None:
        self.block_seconds = block_seconds
        self.max_connections = max_connections
        self.url: str | None = None
        self.client: Client | None = None
        self.tail_client: Client | None = None
        if isinstance(url_or_client, str):
            self.url = url_or_client
        else:
            self.client = self.tail_client = _checked(url_or_client)

    def commands(self) -> Client:
        """The client for commands (connecting lazily, on asyncio only)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "RedisStore runs on asyncio only (redis-py is asyncio-only); under trio use "
                "SQLiteStore or MemoryStore"
            ) from None
        if self.client is None:
            assert self.url is not None
            options: dict[str, Any] = {
                "socket_timeout": max(5.0, 2 * self.block_seconds + 1),
                "socket_connect_timeout": 5.0,
                # Few, quick retries: an outage should surface as StoreError, not a hang.
                "retry": Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            }
            # Commands share a bounded pool and queue for it (redis-py's default pool raises
            # once 100 connections are busy); tails get their own, so they never starve it.
            commands = BlockingConnectionPool.from_url(
                self.url, max_connections=self.max_connections, timeout=10.0, **options
            )
            tails = ConnectionPool.from_url(self.url, max_connections=1 << 20, **options)
            self.client = _checked(Redis.from_pool(commands))
            self.tail_client = Redis.from_pool(tails)
        return self.client

    def tails(self) -> Client:
        """The client for the follower's ``XREAD BLOCK`` (connecting lazily)."""
        self.commands()
        assert self.tail_client is not None
        return self.tail_client

    @property
    def block_ms(self) -> int:
        """How long one ``XREAD BLOCK`` waits: `block_seconds`, under half the socket timeout."""
        timeout = _connection_kwargs(self.commands()).get("socket_timeout")
        seconds = self.block_seconds
        if timeout:
            seconds = min(seconds, float(timeout) / 2)
        return max(1, int(seconds * 1000))

    async def aclose(self) -> None:
        """Close the clients made from the URL (the next command opens new ones)."""
        if self.url is not None and self.client is not None:
            clients = (self.client, self.tail_client)
            self.client = self.tail_client = None
            for client in clients:
                if client is not None:
                    await client.aclose()
