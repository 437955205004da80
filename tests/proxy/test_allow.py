"""The allowlist matcher, strict URL parsing, and the other parts of the proxy that need no
server."""

from __future__ import annotations

from typing import Any

import pytest

from durable_asgi import keys
from durable_asgi.exceptions import BadRequest
from durable_asgi.proxy import Allowlist, DurableProxy, parse_upstream
from durable_asgi.proxy._upstream import end_to_end
from durable_asgi.proxy._url import request_target

MATCHES = [
    # (pattern, url, allowed)
    ("https://x.test/api/**", "https://x.test/api/v1/chat", True),
    ("https://x.test/api/**", "https://x.test/api/", True),
    ("https://x.test/api/**", "https://x.test/api", False),  # ** needs the slash
    ("https://x.test/api/**", "https://x.test/apix/1", False),
    ("https://x.test/api/**", "https://x.test/api/v1?q=1&r=**", True),  # the query isn't matched
    ("https://x.test/api/*", "https://x.test/api/v1", True),
    ("https://x.test/api/*", "https://x.test/api/v1/chat", False),  # one segment
    ("https://x.test/api/*", "https://x.test/api/", False),  # not an empty one
    ("https://x.test/a/**/b", "https://x.test/a/b", True),
    ("https://x.test/a/**/b", "https://x.test/a/1/2/b", True),
    ("https://x.test/a/**/b", "https://x.test/a/1/2/c", False),
    ("https://x.test/", "https://x.test", True),  # the bare host is the path /
    ("https://x.test/", "https://x.test/a", False),
    ("https://x.test/**", "https://x.test", True),
    ("https://x.test/v1/chat", "https://x.test/v1/chat", True),
    ("https://x.test/v1/chat", "https://x.test/v1/Chat", False),  # paths match exactly
    ("https://X.Test/**", "https://x.TEST/a", True),  # hosts don't
    # scheme and port are part of the match; default ports implied
    ("https://x.test/**", "http://x.test/a", False),
    ("https://x.test/**", "https://x.test:443/a", True),
    ("https://x.test/**", "https://x.test:8443/a", False),
    ("http://x.test/**", "http://x.test:80/a", True),
    ("https://x.test:8443/**", "https://x.test:8443/a", True),
    ("https://x.test:8443/**", "https://x.test/a", False),
    ("https://x.test:*/**", "https://x.test:1/a", True),
    ("https://x.test:*/**", "https://x.test/a", True),
    ("*://x.test/**", "http://x.test/a", True),
    ("*://x.test/**", "https://x.test/a", True),
    ("*://x.test/**", "http://x.test:443/a", False),  # http's default port is 80
    # host labels
    ("https://*.example.com/**", "https://api.example.com/a", True),
    ("https://*.example.com/**", "https://example.com/a", False),
    ("https://*.example.com/**", "https://a.b.example.com/a", False),
    ("https://*.example.com/**", "https://api.example.com.evil.test/a", False),
    ("https://*.example.com/**", "https://apiexample.com/a", False),
    ("https://**.example.com/**", "https://a.b.example.com/a", True),
    ("https://**.example.com/**", "https://example.com/a", False),
    ("https://**/**", "https://anything.test/a", True),
    ("https://**/**", "https://[::1]/a", False),  # IPv6 only by a literal
    ("https://[::1]:8443/**", "https://[0:0::1]:8443/a", True),
    ("http://127.0.0.*:*/**", "http://127.0.0.2:9000/a", True),
    ("http://127.0.0.*:*/**", "http://127.0.1.2:9000/a", False),
    # everything, explicitly; nothing, by default
    ("**", "https://anything.test:1234/a/b?c", True),
    ("**", "http://[::1]/", True),
]


@pytest.mark.parametrize(("pattern", "url", "allowed"), MATCHES)
def test_allowlist_matches(pattern: str, url: str, allowed: bool) -> None:
    assert Allowlist([pattern]).allows(url) is allowed
    assert Allowlist([pattern]).allows(parse_upstream(url)) is allowed


def test_empty_allowlist_allows_nothing_and_malformed_urls_are_never_allowed() -> None:
    assert not Allowlist([]).allows("https://x.test/")
    assert not Allowlist(["**"]).allows("https://user@x.test/")
    assert not Allowlist(["**"]).allows("ftp://x.test/")
    assert Allowlist(["https://a.test/**", "https://b.test/**"]).allows("https://b.test/x")
    with pytest.raises(TypeError, match="list of patterns"):
        Allowlist("https://x.test/**")


BAD_PATTERNS = [
    ("https://x.test", "no path"),
    ("x.test/**", "expected scheme://"),
    ("ftp://x.test/**", "http, https or *"),
    ("https://x.test/a*", "whole path segments"),
    ("https://a*.test/**", "not a host label"),
    ("https://x..test/**", "not a host label"),
    ("https://x.test:0/**", "from 1 to 65535"),
    ("https://x.test:http/**", "from 1 to 65535"),
    ("https://x.test/a?b", "no ?, # or @"),
    ("https://u@x.test/**", "no ?, # or @"),
    ("https://[nope]/**", "IPv6"),
]


@pytest.mark.parametrize(("pattern", "words"), BAD_PATTERNS)
def test_malformed_patterns_say_what_is_wrong(pattern: str, words: str) -> None:
    with pytest.raises(ValueError, match="invalid allowlist pattern") as info:
        Allowlist([pattern])
    assert words in str(info.value)


NORMALIZED = [
    ("https://x.test/a?b=1", "https://x.test/a?b=1"),
    ("HTTPS://X.Test:443/a", "https://x.test/a"),
    ("http://x.test:80", "http://x.test/"),
    ("http://x.test:8080/a/", "http://x.test:8080/a/"),
    ("https://x.test/a?", "https://x.test/a"),
    ("https://x.test/a#fragment", "https://x.test/a"),
    ("https://x.test/%7Euser/a%20b?q=%2F", "https://x.test/%7Euser/a%20b?q=%2F"),  # kept as sent
    ("https://[0:0::1]:8443/", "https://[::1]:8443/"),
    ("http://127.0.0.2:9/sse", "http://127.0.0.2:9/sse"),
]


@pytest.mark.parametrize(("url", "normalized"), NORMALIZED)
def test_upstream_urls_are_spelled_one_way(url: str, normalized: str) -> None:
    assert parse_upstream(url).url == normalized


MALFORMED = [
    ("https://user:pw@x.test/", "credentials"),
    ("https://@x.test/", "credentials"),
    ("ftp://x.test/", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("//x.test/a", "not an absolute"),
    ("https://x test/", "printable ASCII"),
    ("https://x.test/a\tb", "printable ASCII"),
    ("https://exämple.test/", "printable ASCII"),
    ("https:///a", "malformed upstream host"),
    ("https://x..test/", "malformed upstream host"),
    ("https://x.test:/", "malformed upstream host"),
    ("https://x.test:65536/", "malformed upstream host"),
    ("https://x.test:0/", "malformed upstream host"),
    ("https://[::1%25eth0]/", "malformed upstream host"),
    ("https://[1.2.3]/", "malformed upstream host"),
    ("https://x.test/a/../b", "'..' segment"),
    ("https://x.test/a/./b", "'..' segment"),
    ("https://x.test/a/%2e%2E/b", "'..' segment"),
    ("https://x.test/a%2fb", "encoded slash"),
    ("https://x.test/a%5Cb", "encoded slash"),
    ("https://x.test/a\\b", "backslash"),
    ("https://x.test/a%zz", "bad % escape"),
]


@pytest.mark.parametrize(("url", "words"), MALFORMED)
def test_malformed_upstream_urls_are_400(url: str, words: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_upstream(url)
    assert info.value.status_code == 400 and words in info.value.detail


def test_end_to_end_drops_hop_by_hop_headers_and_those_connection_names() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Foo", b"1"),
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Host", b"proxy.test"),
    ]
    assert end_to_end(headers, frozenset({b"host"})) == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
    ]


TARGETS: list[tuple[dict[str, Any], str]] = [
    ({"path": "/x.test/a b", "raw_path": b"/x.test/a%20b"}, "/x.test/a%20b"),
    # Starlette's Mount and uvicorn --root-path: path and raw_path both hold the mount point
    (
        {"path": "/df/x.test/a b", "root_path": "/df", "raw_path": b"/df/x.test/a%20b"},
        "/x.test/a%20b",
    ),
    ({"path": "/a b/x.test/c", "root_path": "/a b", "raw_path": b"/a%20b/x.test/c"}, "/x.test/c"),
    ({"path": "/df", "root_path": "/df", "raw_path": b"/df"}, ""),
    # a server whose raw_path lacks the mount point, or has none
    ({"path": "/df/x.test/a", "root_path": "/df", "raw_path": b"/x.test/a"}, "/x.test/a"),
    ({"path": "/x.test/a b"}, "/x.test/a%20b"),
]


@pytest.mark.parametrize(("scope", "target"), TARGETS)
def test_request_target_is_below_the_mount_point_as_sent(
    scope: dict[str, Any], target: str
) -> None:
    assert request_target(scope) == target


@pytest.mark.parametrize(
    "option", [{"key": keys.url()}, {"namespace": "chat"}, {"owner": keys.cookie("session")}]
)
def test_the_proxy_names_its_streams_itself(option: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="the proxy's own"):
        DurableProxy(allow=["**"], **option)


def test_head_and_options_are_never_proxied() -> None:
    with pytest.raises(ValueError, match="never proxied"):
        DurableProxy(allow=["**"], methods=["GET", "head"])
