"""Key extractors."""

from __future__ import annotations

import re
from typing import Any

import pytest

from durable_asgi import DurableRequest, keys
from durable_asgi.exceptions import RequestTooLarge

pytestmark = pytest.mark.anyio


def make_request(
    path: str = "/chat/42/stream",
    *,
    headers: dict[str, str] | None = None,
    query: str = "",
    body: bytes = b"",
    max_body: int = 1 << 20,
) -> DurableRequest:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        assert not sent, "the body is read once"
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "scheme": "https",
        "root_path": "",
        "query_string": query.encode(),
        "server": ("example.org", 443),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return DurableRequest(scope, receive, max_body)


async def key_of(extractor: keys.Extractor, request: DurableRequest) -> Any:
    return await keys.resolve(extractor, request)


async def test_header_is_case_insensitive() -> None:
    request = make_request(headers={"Durable-Key": "abc"})
    assert await key_of(keys.header("durable-key"), request) == "abc"
    assert await key_of(keys.header("X-Other"), request) is None


async def test_query_and_cookie() -> None:
    request = make_request(query="chatId=7&x=1&chatId=8", headers={"Cookie": 'a=1; sid="s9"'})
    assert await key_of(keys.query("chatId"), request) == "7"
    assert await key_of(keys.query("nope"), request) is None
    assert await key_of(keys.cookie("sid"), request) == "s9"
    assert await key_of(keys.cookie("zzz"), request) is None


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/chat/{chat_id}/stream", "/chat/42/stream", "42"),
        ("/chat/{chat_id}/stream", "/chat/42/other", None),
        ("/u/{user}/c/{chat}", "/u/ann/c/9", "ann/9"),
        ("/files/{rest:path}", "/files/a/b/c", "a/b/c"),
        (r"/c/(\d+)", "/c/123", "123"),
        (r"/c/(\d+)", "/c/abc", None),
        (re.compile(r"/x/(?P<key>[a-z]+)/(\d)"), "/x/ab/3", "ab"),
    ],
)
async def test_path(pattern: str, path: str, expected: str | None) -> None:
    assert await key_of(keys.path(pattern), make_request(path)) == expected


def test_path_without_placeholder_or_group_is_an_error() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        keys.path("/plain")


@pytest.mark.parametrize(
    ("spec", "body", "expected"),
    [
        ("id", b'{"id": "c1"}', "c1"),
        ("id", b'{"id": 12}', "12"),
        ("id", b'{"id": true}', None),
        ("id", b'{"id": null}', None),
        ("messages[-1].id", b'{"messages": [{"id": "a"}, {"id": "b"}]}', "b"),
        ("messages[5].id", b'{"messages": [{"id": "a"}]}', None),
        ("a.b[0][1]", b'{"a": {"b": [["x", "y"]]}}', "y"),
        ("id", b"not json", None),
        ("id", b"[1, 2]", None),
        ("id", b"", None),
    ],
)
async def test_json_body(spec: str, body: bytes, expected: str | None) -> None:
    assert await key_of(keys.json_body(spec), make_request(body=body)) == expected


def test_json_body_rejects_bad_paths() -> None:
    with pytest.raises(ValueError, match="JSON path"):
        keys.json_body("a..b[")


async def test_json_body_respects_the_body_limit() -> None:
    with pytest.raises(RequestTooLarge):
        await key_of(keys.json_body("id"), make_request(body=b"x" * 20, max_body=10))


async def test_url_is_method_independent_and_namespaced() -> None:
    request = make_request("/api/chat", query="chatId=7", headers={"Host": "example.org"})
    key = await key_of(keys.url(), request)
    assert key == "https://example.org/api/chat?chatId=7"
    assert key.namespace == "url"


async def test_first_takes_the_first_key_found() -> None:
    request = make_request(query="q=2")
    extractor = keys.first(keys.header("Durable-Key"), keys.query("q"))
    assert await key_of(extractor, request) == "2"
    assert await key_of(keys.first(keys.header("nope")), request) is None


async def test_custom_sync_and_async_extractors() -> None:
    request = make_request(body=b'{"chat": 5}')

    def sync_key(request: DurableRequest) -> str:
        return request.path.rsplit("/", 2)[1]

    async def async_key(request: DurableRequest) -> keys.Key:
        return keys.Key(str((await request.json())["chat"]), namespace="chat")

    assert await key_of(sync_key, request) == "42"
    key = await key_of(async_key, request)
    assert key == "5" and key.namespace == "chat"


async def test_extractor_returning_a_non_string_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="must return str"):
        await key_of(lambda request: 42, make_request())  # type: ignore[arg-type,return-value]


async def test_namespace_option_on_builtin_extractors() -> None:
    key = await key_of(keys.header("k", namespace="ns"), make_request(headers={"k": "v"}))
    assert (key, key.namespace) == ("v", "ns")
