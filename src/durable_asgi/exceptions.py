"""Exceptions raised by durable_asgi."""

from __future__ import annotations

from .stores._base import LeaseLost, StoreError, StoreFull

__all__ = [
    "BadRequest",
    "ClientDisconnected",
    "ConfigurationError",
    "DurableError",
    "LeaseLost",
    "RequestTooLarge",
    "StoreError",
    "StoreFull",
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
