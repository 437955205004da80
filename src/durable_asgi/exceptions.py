"""Every exception durable_asgi raises, in one tree under `DurableError`.

A leaf module: it imports nothing from the package, so every layer (stores, engine, middleware,
client) can raise these without importing upward.

    DurableError
    ├── ConfigurationError      set up wrongly (also a RuntimeError)
    ├── BadRequest              an invalid protocol header → 400
    │   └── RequestTooLarge     body over max_request_body → 413
    ├── ClientDisconnected      the client left before its request body arrived
    ├── StoreError              a store operation failed → 503
    │   ├── LeaseLost           the producer may no longer write (aborted, deleted, taken over)
    │   └── StoreFull           at capacity, nothing finished to evict
    └── DurableClientError      raised by `durable_asgi.client`
        └── StreamFailed        the stream really failed (not a dropped connection)
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ClientDisconnected",
    "ConfigurationError",
    "DurableClientError",
    "DurableError",
    "LeaseLost",
    "RequestTooLarge",
    "StoreError",
    "StoreFull",
    "StreamFailed",
]


class DurableError(Exception):
    """Base class of the errors durable_asgi raises itself."""


class ConfigurationError(DurableError, RuntimeError):
    """durable_asgi is set up wrongly; the message says how to fix it."""


class BadRequest(DurableError):
    """A durable request carried an invalid protocol header (answered with 400)."""

    status_code = 400

    def __init__(self, detail: str, status_code: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code


class RequestTooLarge(BadRequest):
    """The request body is larger than `max_request_body` (answered with 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than max_request_body ({limit} bytes)", 413)


class ClientDisconnected(DurableError):
    """The client went away before its request body arrived."""


class StoreError(DurableError):
    """A store operation failed (connection lost, corrupt data, ...)."""


class LeaseLost(StoreError):
    """The producer's lease is gone: the stream was aborted, deleted or taken over.

    The producer must stop: every further write is refused.
    """


class StoreFull(StoreError):
    """The store is at capacity and nothing finished could be evicted to make room."""


class DurableClientError(DurableError):
    """The server didn't answer as a durable_asgi server does (e.g. no middleware in front of
    the URL, or the key sent where the server doesn't read it)."""


class StreamFailed(DurableClientError):
    """The stream can't be read to its end.

    `state` says why: ``"failed"`` (the handler raised), ``"aborted"``, ``"absent"`` (deleted,
    expired, or never started), ``"unreachable"`` (no answer within `max_retries` reconnect
    attempts; the last network error is the ``__cause__``) or ``"protocol"`` (an answer a
    durable_asgi server doesn't give). `offset` is how many body bytes were delivered.
    """

    def __init__(self, message: str, *, key: str, state: str, offset: int) -> None:
        super().__init__(message)
        self.key = key
        self.state = state
        self.offset = offset
