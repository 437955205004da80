"""`StreamOptions`: how durable streams behave, declared once.

One small frozen object (httpx's `Timeout` and `Limits` are the model) holds every option of a
durable stream with its default, and validates itself once, when it is made. The middleware
takes it (or its fields as keyword arguments), `@durable` records overrides of a subset of it
(`RouteOverrides`), `ai_sdk.ChatMiddleware` derives its second policy from it, and the engine
reads it. What is not per stream — the store, which methods and routes are durable, shutdown,
where the browser client is served — belongs to the middleware itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from . import keys

__all__ = ["OnAbsent", "OnFinished", "OptionFields", "RouteOverrides", "StreamOptions"]

OnFinished = Literal["replay", "rerun", "no_content"]
"""What a request for a finished stream gets (see `StreamOptions.on_finished`)."""
OnAbsent = Literal["run", "no_content"]
"""What a request for a missing stream does (see `StreamOptions.on_absent`)."""

_ON_FINISHED: tuple[OnFinished, ...] = ("replay", "rerun", "no_content")
_ON_ABSENT: tuple[OnAbsent, ...] = ("run", "no_content")
_NOT_NEGATIVE = (
    "ttl",
    "max_request_body",
    "max_response_bytes",
    "max_duration",
    "lease_seconds",
    "poll_interval",
)


def _default_key() -> keys.Extractor:
    return keys.header("Durable-Key")


@dataclass(frozen=True, eq=False)
class StreamOptions:
    """The options of a durable stream, each with its default.

    Example::

        options = StreamOptions(key=keys.query("chatId"), ttl=3600)
        app.add_middleware(DurableMiddleware, options=options)
        resume = options.replace(on_finished="no_content")     # a second policy

    Equal only to itself (extractors are functions), so it can key a cache.
    """

    key: keys.Extractor = field(default_factory=_default_key)
    """The key extractor (`durable_asgi.keys`); a request whose key is None passes through."""
    owner: keys.Extractor | None = None
    """An extractor of the caller's identity: a stream is visible only to the owner that
    started it; others get 404/416 as if it didn't exist."""
    namespace: str | None = None
    """The stream namespace of every request (default: each request's path)."""
    ttl: float = 6 * 3600
    """Seconds a finished stream is kept."""
    max_request_body: int = 1 << 20
    """Bytes of request body buffered (it is replayed to the app); larger get 413."""
    max_response_bytes: int = 100 << 20
    """A response growing past this ends ``failed`` (its handler is cancelled)."""
    max_duration: float | None = None
    """Seconds a handler may run before it is cancelled (the stream ends ``failed``)."""
    sse_ids: bool = False
    """Add ``id: <offset>`` to relayed ``text/event-stream`` events (``Last-Event-ID``)."""
    lease_seconds: float = 5.0
    """How long a producer's lease lasts unrenewed: a dead producer is detected within it."""
    poll_interval: float = 1.0
    """The longest a reader waits before re-checking a stream (stores wake it sooner)."""
    on_finished: OnFinished = "replay"
    """A request for a finished stream: ``"replay"`` it, ``"rerun"`` the handler as a new
    stream (a running one is still joined), or ``"no_content"`` (204, handler not called)."""
    on_absent: OnAbsent = "run"
    """A request for a missing stream: ``"run"`` the handler or ``"no_content"`` (204)."""

    def __post_init__(self) -> None:
        if not callable(self.key):
            raise TypeError(
                f"key must be a key extractor (see durable_asgi.keys), not {self.key!r}"
            )
        if self.owner is not None and not callable(self.owner):
            raise TypeError(f"owner must be a key extractor or None, not {self.owner!r}")
        for name in _NOT_NEGATIVE:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")
        if self.on_finished not in _ON_FINISHED:
            raise ValueError(f"on_finished must be one of {_ON_FINISHED}, not {self.on_finished!r}")
        if self.on_absent not in _ON_ABSENT:
            raise ValueError(f"on_absent must be one of {_ON_ABSENT}, not {self.on_absent!r}")

    def replace(self, **changes: object) -> StreamOptions:
        """A copy with `changes` (validated like any `StreamOptions`); itself without any."""
        if not changes:
            return self
        unknown = changes.keys() - _FIELDS
        if unknown:
            raise TypeError(f"unknown stream options {sorted(unknown)}: expected {sorted(_FIELDS)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamOptions))


class RouteOverrides(TypedDict, total=False):
    """The `StreamOptions` one `@durable` route may set for itself (the rest are the
    middleware's: leases and polling are the store's business, the body limit is checked
    before the route is known to matter)."""

    key: keys.Extractor
    owner: keys.Extractor | None
    namespace: str | None
    ttl: float
    max_response_bytes: int
    max_duration: float | None
    sse_ids: bool
    on_finished: OnFinished
    on_absent: OnAbsent


class OptionFields(RouteOverrides, total=False):
    """Every `StreamOptions` field, as keyword arguments (``DurableMiddleware(app, ttl=...)``)."""

    max_request_body: int
    lease_seconds: float
    poll_interval: float
