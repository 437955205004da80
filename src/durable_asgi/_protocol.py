"""The wire protocol: request headers we read, response headers we write, SSE ids.

Request: ``Durable-Offset: n`` (or ``Range: bytes=n-``, or ``Last-Event-ID`` in SSE-ids mode)
resumes from byte ``n``; ``Durable-Control: status|abort|delete`` is a control request.
Response: ``Durable-Offset``, ``Durable-State`` and, when the handler was not called,
``Durable-Replay: true``.

Intentional divergence from HTTP range requests: a resumed response keeps the stored status
(usually 200) rather than 206, because its length is unknown while the stream runs;
``Durable-Offset`` says where the body starts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from ._request import header
from ._types import Message, Send
from .exceptions import BadRequest

__all__ = [
    "Control",
    "SSEIds",
    "parse_control",
    "parse_offset",
    "replay_headers",
    "send_json",
    "stored_headers",
]

Control = Literal["status", "abort", "delete"]
RawHeaders = list[tuple[bytes, bytes]]

OFFSET = b"durable-offset"
CONTROL = b"durable-control"
REPLAY = b"durable-replay"
STATE = b"durable-state"
TRACEPARENT = b"durable-traceparent"
"""A stored response header: the W3C ``traceparent`` of the span that produced the stream
(telemetry links resumes to it). Never replayed."""

_DIGITS = re.compile(r"[0-9]{1,18}")
_RANGE = re.compile(r"bytes=([0-9]{1,18})-")

# Hop-by-hop headers (RFC 9110 §7.6.1) and cookies never go into a store.
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"set-cookie",
    }
)


def parse_offset(raw: RawHeaders, *, sse_ids: bool) -> int | None:
    """The byte offset the client asks to resume from, or None when it asks for no resume.

    An explicit offset — even 0 — is a resume: it joins or replays a stream and never starts
    the handler. Raises `BadRequest` for malformed values.
    """
    value = header(raw, OFFSET)
    if value is not None:
        text = value.decode("latin-1").strip()
        if not _DIGITS.fullmatch(text):
            raise BadRequest(f"Durable-Offset must be a decimal byte offset, got {text[:40]!r}")
        return int(text)
    value = header(raw, b"range")
    if value is not None:
        text = value.decode("latin-1").strip()
        match = _RANGE.fullmatch(text)
        if match is None:
            raise BadRequest(f"only 'Range: bytes=<n>-' is supported here, got {text[:40]!r}")
        return int(match.group(1))
    if sse_ids:
        value = header(raw, b"last-event-id")
        if value is not None:
            text = value.decode("latin-1").strip()
            if not text:
                return None
            if not _DIGITS.fullmatch(text):
                raise BadRequest(f"Last-Event-ID must be a byte offset, got {text[:40]!r}")
            return int(text)
    return None


def parse_control(raw: RawHeaders) -> Control | None:
    """The control operation asked for, if any. Raises `BadRequest` for unknown ones."""
    value = header(raw, CONTROL)
    if value is None:
        return None
    text = value.decode("latin-1").strip().lower()
    if text in ("status", "abort", "delete"):
        return text  # type: ignore[return-value]
    raise BadRequest(f"Durable-Control must be status, abort or delete, got {text[:40]!r}")


def stored_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """The response headers worth keeping: no cookies, no hop-by-hop headers."""
    return tuple(
        (bytes(k).lower(), bytes(v)) for k, v in headers if bytes(k).lower() not in _NOT_STORED
    )


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def replay_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    offset: int,
    state: str,
    replay: bool,
    total: int | None,
    rewrite_body: bool,
) -> RawHeaders:
    """The headers of a response served from the store, starting at byte `offset`.

    `total` is the body's final length when known (finished stream), else None. Content-Length
    is kept when it still holds, recomputed when resuming from an offset, and dropped when the
    body is rewritten (SSE ids) or its length is unknown.
    """
    out: RawHeaders = []
    length: int | None = None
    partial = offset > 0
    app_cache_control = False
    for key, value in headers:
        name = key.lower()
        if name == b"cache-control":
            if partial:
                continue  # a partial body must never be cached as the resource
            app_cache_control = True
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
            continue
        elif name == TRACEPARENT:
            continue
        out.append((key, value))
    if not rewrite_body:
        if total is not None:
            out.append((b"content-length", str(total - offset).encode()))
        elif length is not None and length >= offset:
            out.append((b"content-length", str(length - offset).encode()))
    if partial or not app_cache_control:
        # Durable responses vary by key and offset, which shared caches can't see.
        out.append((b"cache-control", b"no-store"))
    out.append((b"durable-offset", str(offset).encode()))
    out.append((b"durable-state", state.encode()))
    if replay:
        out.append((b"durable-replay", b"true"))
    return out


async def send_json(
    send: Send,
    status: int,
    payload: Any,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """A small complete JSON response (control answers, errors)."""
    body = b"" if payload is None else json.dumps(payload).encode()
    head = [(b"cache-control", b"no-store"), *headers]
    if payload is not None:
        head += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class SSEIds:
    """Adds ``id: <offset>`` to each server-sent event relayed, for `sse_ids=True`.

    The id is the byte offset just past the event in the *stored* body, so a browser
    `EventSource` reconnecting with ``Last-Event-ID: <id>`` resumes exactly after it. Events are
    held until their blank line arrives; comment-only events (keep-alives like ``: ping``) pass
    through without an id. Ids the app wrote itself are left in place; ours comes last, and the
    last id of an event wins in `EventSource`.
    """

    def __init__(self, offset: int) -> None:
        self._offset = offset  # stored-body offset of the first byte in `_held`
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._held + data
        out: list[bytes] = []
        start = 0
        while (found := _event_end(buffer, start)) is not None:
            end, newline = found
            event = buffer[start:end]
            start = end + len(newline)
            out.append(event)
            if _has_fields(event):
                out.append(b"id: %d%s" % (self._offset + start, newline))
            out.append(newline)
        self._offset += start
        self._held = buffer[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


_BLANK = re.compile(rb"(\r\n|\n|\r)(\r\n|\n|\r)")


def _event_end(buffer: bytes, start: int) -> tuple[int, bytes] | None:
    """(index of the blank line ending the next event, that line's ending), or None."""
    while (match := _BLANK.search(buffer, start)) is not None:
        first, second = match.group(1), match.group(2)
        if first == b"\r" and second == b"\n":
            start = match.start() + 1  # one CRLF, not two line endings
        elif second == b"\r" and match.end() == len(buffer):
            return None  # a trailing "\r" may be the first half of a CRLF still to come
        else:
            return match.start() + len(first), second
    return None


def _has_fields(event: bytes) -> bool:
    """Whether an event has any field line (not only comments), i.e. deserves an id."""
    return any(line and not line.startswith(b":") for line in re.split(rb"\r\n|\n|\r", event))


def with_headers(
    send: Send, headers: Sequence[tuple[bytes, bytes]], replace: tuple[bytes, ...]
) -> Send:
    """`send`, adding `headers` to every response head in place of those the app set whose
    lower-case name starts with one of `replace` (a front door's CORS headers, say)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [
                (name, value)
                for name, value in message.get("headers") or ()
                if not bytes(name).lower().startswith(replace)
            ]
            message = {**message, "headers": [*kept, *headers]}
        await send(message)

    return sending
