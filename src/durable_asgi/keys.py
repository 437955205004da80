"""Key extractors: which requests are durable, and which stream each one belongs to.

An extractor is any callable, sync or async, taking a `DurableRequest` and returning the
request's key (`str`), a `Key` (a key with an explicit namespace), or `None` for "not durable:
pass straight through". Stream identity is ``(namespace, key)``; the namespace is the request
path unless the extractor (or the middleware's ``namespace=``) sets one, so two endpoints never
share a stream by accident, while ``namespace="chat"`` on two routes lets a ``GET`` resume what a
``POST`` started.

Example::

    from durable_asgi import keys

    key = keys.first(keys.header("Durable-Key"), keys.query("chatId"))
    key = keys.json_body("messages[-1].id", namespace="chat")
    key = keys.path("/api/chat/{chat_id}/stream", namespace="chat")
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, Union

from ._request import DurableRequest

__all__ = [
    "Extractor",
    "Key",
    "cookie",
    "first",
    "header",
    "json_body",
    "path",
    "query",
    "resolve",
    "url",
]


class Key(str):
    """A key with an explicit namespace: ``Key("42", namespace="chat")``.

    A plain `str` from an extractor means "namespace = the request path".
    """

    namespace: str | None

    def __new__(cls, value: str, namespace: str | None = None) -> Key:
        key = super().__new__(cls, value)
        key.namespace = namespace
        return key

    def __repr__(self) -> str:
        return f"Key({str(self)!r}, namespace={self.namespace!r})"


KeyResult = Union[str, Key, None]  # noqa: UP007 (a runtime alias, evaluated on 3.10)
Extractor = Callable[[DurableRequest], KeyResult | Awaitable[KeyResult]]


def _key(value: object, namespace: str | None) -> Key | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return Key(str(value), namespace)


def header(name: str, *, namespace: str | None = None) -> Extractor:
    """The value of request header `name` (case-insensitive): ``keys.header("Durable-Key")``."""
    wanted = name.lower().encode("latin-1")

    def extract(request: DurableRequest) -> Key | None:
        for key, value in request.scope["headers"]:
            if key == wanted or key.lower() == wanted:
                return Key(value.decode("latin-1"), namespace)
        return None

    extract.__qualname__ = f"keys.header({name!r})"
    return extract


def query(name: str, *, namespace: str | None = None) -> Extractor:
    """The query parameter `name`: ``keys.query("chatId")`` for ``/api/chat?chatId=42``."""

    def extract(request: DurableRequest) -> Key | None:
        if not request.scope.get("query_string"):
            return None
        return _key(request.query_params.get(name), namespace)

    extract.__qualname__ = f"keys.query({name!r})"
    return extract


def cookie(name: str, *, namespace: str | None = None) -> Extractor:
    """The cookie `name`: ``keys.cookie("chat_session")``."""

    def extract(request: DurableRequest) -> Key | None:
        return _key(request.cookies.get(name), namespace)

    extract.__qualname__ = f"keys.cookie({name!r})"
    return extract


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::path)?\}")


def _compile_template(template: str) -> re.Pattern[str]:
    pattern, last = "", 0
    for match in _PLACEHOLDER.finditer(template):
        pattern += re.escape(template[last : match.start()])
        part = ".+" if match.group(0).endswith(":path}") else "[^/]+"
        pattern += f"(?P<{match.group(1)}>{part})"
        last = match.end()
    return re.compile(pattern + re.escape(template[last:]))


def path(pattern: str | re.Pattern[str], *, namespace: str | None = None) -> Extractor:
    """A part of the request path.

    - a template: ``keys.path("/chat/{chat_id}/stream")`` (``{name:path}`` spans slashes; with
      several placeholders the key is their values joined by ``/``);
    - a regex (a compiled pattern, or a string with a group): ``keys.path(r"^/c/(\\d+)$")``; the
      key is the group named ``key``, else group 1.

    The whole path must match; otherwise the request is not durable.
    """
    if isinstance(pattern, re.Pattern) or not _PLACEHOLDER.search(pattern):
        regex = re.compile(pattern)
        if regex.groups == 0:
            raise ValueError(f"keys.path({pattern!r}) needs a {{name}} placeholder or a group")

        def extract_regex(request: DurableRequest) -> Key | None:
            match = regex.fullmatch(request.path)
            if match is None:
                return None
            return _key(match.group("key" if "key" in regex.groupindex else 1), namespace)

        extract_regex.__qualname__ = f"keys.path({regex.pattern!r})"
        return extract_regex

    template = _compile_template(pattern)

    def extract(request: DurableRequest) -> Key | None:
        match = template.fullmatch(request.path)
        return None if match is None else Key("/".join(match.groups()), namespace)

    extract.__qualname__ = f"keys.path({pattern!r})"
    return extract


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def _parse_json_path(spec: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in spec.split("."):
        pos = 0
        while pos < len(part):
            match = _SEGMENT.match(part, pos)
            if match is None:
                raise ValueError(f"invalid JSON path {spec!r}: expected name, [index] or .name")
            steps.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
            pos = match.end()
    if not steps:
        raise ValueError("empty JSON path")
    return steps


def json_body(spec: str, *, namespace: str | None = None) -> Extractor:
    """A value from the JSON request body: ``keys.json_body("id")``,
    ``keys.json_body("messages[-1].id")``.

    A body that isn't JSON, or has no such value (or a value that isn't a string or number),
    means "not durable". The body is buffered (up to ``max_request_body``) and replayed to the
    app unchanged.
    """
    steps = _parse_json_path(spec)

    async def extract(request: DurableRequest) -> Key | None:
        try:
            value: Any = await request.json()
        except ValueError:
            return None
        for step in steps:
            if isinstance(step, int):
                if not isinstance(value, list) or not -len(value) <= step < len(value):
                    return None
            elif not isinstance(value, dict) or step not in value:
                return None
            value = value[step]
        return _key(value, namespace)

    extract.__qualname__ = f"keys.json_body({spec!r})"
    return extract


def url(*, namespace: str = "url") -> Extractor:
    """The full request URL (scheme, host, path and query), whatever the method: every request
    to the same URL shares one stream, as with durablefetch. Make such URLs unguessable."""

    def extract(request: DurableRequest) -> Key:
        scope = request.scope
        host = request.headers.get("host")
        if host is None:
            server = scope.get("server") or ("localhost", None)
            host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
        query_string = scope.get("query_string", b"").decode("latin-1")
        target = scope.get("root_path", "") + scope["path"]
        value = f"{scope.get('scheme', 'http')}://{host}{target}"
        return Key(f"{value}?{query_string}" if query_string else value, namespace)

    extract.__qualname__ = "keys.url()"
    return extract


def first(*extractors: Extractor) -> Extractor:
    """The first key any extractor finds: ``keys.first(keys.header("X"), keys.query("x"))``."""
    if not extractors:
        raise ValueError("keys.first() needs at least one extractor")

    async def extract(request: DurableRequest) -> KeyResult:
        for extractor in extractors:
            key = await resolve(extractor, request)
            if key is not None:
                return key
        return None

    extract.__qualname__ = "keys.first(...)"
    return extract


async def resolve(extractor: Extractor, request: DurableRequest) -> KeyResult:
    """Call `extractor` (sync or async) and return its key."""
    result = extractor(request)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, str):
        raise TypeError(
            f"key extractor {extractor!r} returned {type(result).__name__}: "
            "it must return str, keys.Key or None"
        )
    return result
