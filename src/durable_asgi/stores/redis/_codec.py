"""Key names and the wire formats: how a stream's keys are named, how its head is packed into
the ``meta`` hash, and how a script's snapshot reply becomes a `StreamInfo`."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from typing import Any

from .._base import MAX_RAW_ID, Headers, StreamInfo, effective

__all__ = [
    "DATA",
    "batch_entry",
    "batch_replies",
    "glob_escape",
    "key_base",
    "key_names",
    "ms",
    "pack_headers",
    "snapshot",
    "tag",
]

#: Longest ttl we store (Redis and Lua doubles are happy with it).
MAX_TTL = 10 * 365 * 86400.0
#: Where ``read.lua`` puts the data in its reply: after ``now`` and the 14 fields.
DATA = 15


def tag(stream_id: str) -> str:
    """The stream's hash tag: the id itself when short printable ASCII without braces, else
    ``#`` + its SHA-256 (a raw tag never starts with ``#``, so the forms cannot collide)."""
    if (
        len(stream_id) <= MAX_RAW_ID
        and stream_id.isascii()
        and stream_id.isprintable()
        and not stream_id.startswith("#")
        and "{" not in stream_id
        and "}" not in stream_id
    ):
        return stream_id
    return "#" + hashlib.sha256(stream_id.encode("utf-8", "surrogatepass")).hexdigest()


@functools.lru_cache(maxsize=4096)  # asked for at every write of a running stream
def key_base(prefix: str, stream_id: str) -> str:
    """What the stream's key names start with (``batch.lua`` is given this, and adds the rest)."""
    return f"{prefix}:{{{tag(stream_id)}}}:"


def key_names(prefix: str, stream_id: str) -> tuple[str, str, str]:
    """The stream's ``meta``, ``body`` and ``ev`` keys (the KEYS of every script but
    ``batch.lua``)."""
    base = key_base(prefix, stream_id)
    return base + "meta", base + "body", base + "ev"


def batch_entry(
    want: int, chunks: int, status: int | None, token: str, headers: bytes, data: bytes
) -> bytes:
    """One stream's argument of ``batch.lua``: ``"<want> <chunks> <status> <len(token)>
    <len(headers)>\n"``, then the token, the packed headers and the data, as they are (status
    empty: no head; data empty: no append). One argument, not one per field: redis-py packs a
    command argument by argument, in Python."""
    tok = token.encode()
    line = b"%d %d %s %d %d\n" % (
        want,
        chunks,
        b"" if status is None else b"%d" % status,
        len(tok),
        len(headers),
    )
    return b"".join((line, tok, headers, data))


def glob_escape(text: str) -> str:
    """`text` matched literally in a ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds for a script, rounded up and clamped to ``[0, MAX_TTL]``."""
    return math.ceil(min(max(seconds, 0.0), MAX_TTL) * 1000)


def pack_headers(headers: Headers) -> bytes:
    """Headers as one byte string: length-prefixed names and values."""
    out = bytearray()
    for name, value in headers:
        out += len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def batch_replies(raw: bytes) -> list[list[bytes]]:
    """``batch.lua``'s reply (a line per write) as the replies its writes' own scripts give:
    ``[b"ok", version, size]`` (numbers as digits, which `int` reads), ``[b"lost", why]``,
    ``[b"err", message]``."""
    replies = []
    for line in raw.split(b"\n"):
        kind, _, rest = line.partition(b" ")
        replies.append([kind, *rest.split(b" ")] if kind == b"ok" else [kind, rest])
    return replies


def unpack_headers(raw: bytes) -> Headers:
    """The inverse of `pack_headers`."""
    headers = []
    i = 0
    while i < len(raw):
        n = int.from_bytes(raw[i : i + 4], "big")
        name = raw[i + 4 : i + 4 + n]
        i += 4 + n
        n = int.from_bytes(raw[i : i + 4], "big")
        headers.append((name, raw[i + 4 : i + 4 + n]))
        i += 4 + n
    return tuple(headers)


def snapshot(reply: Sequence[Any]) -> StreamInfo:
    """The `StreamInfo` in a script's reply ``{now, fields...}`` (prelude.lua's ``load``)."""
    (
        now,
        sid,
        state,
        gen,
        ver,
        off,
        chunks,
        readers,
        status,
        headers,
        created,
        updated,
        exp,
        lease,
        retain,
    ) = reply[:DATA]
    info = StreamInfo(
        id=sid.decode("utf-8", "surrogatepass"),
        state=state.decode(),
        generation=gen.decode(),
        version=int(ver),
        offset=int(off),
        chunks=int(chunks),
        readers=int(readers or 0),
        status_code=None if status is None else int(status),
        headers=None if headers is None else unpack_headers(headers),
        created_at=int(created) / 1000,
        updated_at=int(updated) / 1000,
        expires_at=None if exp is None else int(exp) / 1000,
        lease_expires_at=None if lease is None else int(lease) / 1000,
        retain=retain != b"0",
    )
    # Judge the lease by the server's clock, like the scripts do.
    return effective(info, int(now) / 1000)
