"""`DurableRequest`: the small request object key extractors see.

It parses lazily (a pass-through request whose key header is absent parses nothing) and buffers
the body once, up to the middleware's `max_request_body`, so the app still receives it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl

from ._types import Message, Receive, Scope
from .exceptions import ClientDisconnected, RequestTooLarge

__all__ = ["DurableRequest", "RequestHeaders", "replay_body"]


class RequestHeaders(Mapping[str, str]):
    """Case-insensitive, read-only view of the request headers (first value wins in `[]`)."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def __getitem__(self, name: str) -> str:
        wanted = name.lower().encode("latin-1")
        for key, value in self.raw:
            if key.lower() == wanted:
                return value.decode("latin-1")
        raise KeyError(name)

    def getlist(self, name: str) -> list[str]:
        wanted = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.raw if k.lower() == wanted]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.decode("latin-1").lower() for k, _ in self.raw))

    def __len__(self) -> int:
        return len({k.lower() for k, _ in self.raw})


def header(raw: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), without building a mapping."""
    for key, value in raw:
        if key == name or key.lower() == name:
            return value
    return None


class DurableRequest:
    """What a key extractor receives.

    Attributes: `method`, `path`, `headers` (case-insensitive mapping), `query_params` (first
    value per name), `cookies`, `scope`; coroutines `body()` and `json()`.

    Example extractor::

        async def chat_key(request: DurableRequest) -> str | None:
            data = await request.json()
            return f"{data['chat_id']}:{len(data['messages'])}"
    """

    def __init__(self, scope: Scope, receive: Receive, max_body: int) -> None:
        self.scope = scope
        self._receive = receive
        self._max_body = max_body
        self._body: bytes | None = None

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    @cached_property
    def headers(self) -> RequestHeaders:
        return RequestHeaders(self.scope["headers"])

    @cached_property
    def query_params(self) -> dict[str, str]:
        query = self.scope.get("query_string", b"").decode("latin-1")
        params: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            params.setdefault(name, value)
        return params

    @cached_property
    def cookies(self) -> dict[str, str]:
        cookies: dict[str, str] = {}
        for line in self.headers.getlist("cookie"):
            for pair in line.split(";"):
                name, sep, value = pair.partition("=")
                if sep and name.strip():
                    cookies.setdefault(name.strip(), value.strip().strip('"'))
        return cookies

    @property
    def body_consumed(self) -> bool:
        return self._body is not None

    async def body(self) -> bytes:
        """The whole request body (read once, then cached).

        Raises `RequestTooLarge` past the middleware's `max_request_body` (answered with 413).
        """
        if self._body is None:
            parts: list[bytes] = []
            size = 0
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._max_body:
                    raise RequestTooLarge(self._max_body)
                parts.append(chunk)
                if not message.get("more_body", False):
                    break
            self._body = b"".join(parts)
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON; raises `ValueError` when it isn't."""
        body = await self.body()
        try:
            return json.loads(body)
        except RecursionError:
            raise ValueError("JSON body nested too deeply") from None


def replay_body(body: bytes, then: Callable[[], Awaitable[Message]]) -> Receive:
    """A `receive` that answers the whole request `body` once, then whatever `then` answers
    (the real channel, or a disconnect when the producer says so)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive
