"""The wire protocol helpers: offsets, control, replay headers, SSE ids."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable_asgi._protocol import (
    SSEIds,
    parse_control,
    parse_offset,
    replay_headers,
    stored_headers,
)
from durable_asgi.exceptions import BadRequest
from durable_asgi.stores import stream_id


def h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]


@pytest.mark.parametrize(
    ("headers", "sse", "expected"),
    [
        ({}, False, None),
        ({"Durable_Offset": "0"}, False, 0),
        ({"Durable_Offset": "12"}, False, 12),
        ({"Durable_Offset": " 7 "}, False, 7),
        ({"Range": "bytes=30-"}, False, 30),
        ({"Durable_Offset": "5", "Range": "bytes=30-"}, False, 5),
        ({"Last_Event_ID": "40"}, True, 40),
        ({"Last_Event_ID": "40"}, False, None),
        ({"Last_Event_ID": ""}, True, None),
    ],
)
def test_parse_offset(headers: dict[str, str], sse: bool, expected: int | None) -> None:
    assert parse_offset(h(**headers), sse_ids=sse) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"Durable_Offset": "x"},
        {"Durable_Offset": "-3"},
        {"Durable_Offset": "1e3"},
        {"Durable_Offset": "9" * 30},
        {"Range": "bytes=1-2"},
        {"Range": "bytes=-5"},
        {"Range": "bytes=1-,5-"},
        {"Last_Event_ID": "abc"},
    ],
)
def test_parse_offset_rejects_malformed_values(headers: dict[str, str]) -> None:
    with pytest.raises(BadRequest) as info:
        parse_offset(h(**headers), sse_ids=True)
    assert info.value.status_code == 400


def test_parse_control() -> None:
    assert parse_control(h()) is None
    assert parse_control(h(Durable_Control="Status")) == "status"
    with pytest.raises(BadRequest):
        parse_control(h(Durable_Control="drop"))


def test_stored_headers_drop_cookies_and_hop_by_hop() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"keep-alive"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Id", b"1"),
    ]
    assert stored_headers(raw) == ((b"content-type", b"text/plain"), (b"x-id", b"1"))


def test_replay_headers_content_length() -> None:
    base = [(b"content-type", b"text/plain"), (b"content-length", b"100")]

    def length(**kw: object) -> str | None:
        out = dict(replay_headers(base, state="running", replay=True, **kw))  # type: ignore[arg-type]
        value = out.get(b"content-length")
        return None if value is None else value.decode()

    assert length(offset=0, total=None, rewrite_body=False) == "100"
    assert length(offset=30, total=None, rewrite_body=False) == "70"
    assert length(offset=30, total=90, rewrite_body=False) == "60"
    assert length(offset=0, total=None, rewrite_body=True) is None
    out = dict(
        replay_headers(base, offset=3, state="complete", replay=True, total=100, rewrite_body=False)
    )
    assert out[b"durable-offset"] == b"3" and out[b"durable-state"] == b"complete"
    assert out[b"durable-replay"] == b"true"


EVENT = st.sampled_from(
    [b"data: a\n\n", b": ping\n\n", b"data: b\r\n\r\n", b"event: e\ndata: c\n\n", b"data: d\r\rx"]
)


@given(st.lists(EVENT, max_size=8), st.lists(st.integers(1, 7), max_size=20))
def test_sse_ids_do_not_depend_on_chunking(events: list[bytes], cuts: list[int]) -> None:
    body = b"".join(events)
    whole = SSEIds(0)
    expected = whole.feed(body) + whole.flush()
    pieces, pos = SSEIds(0), 0
    out = b""
    for cut in cuts:
        out += pieces.feed(body[pos : pos + cut])
        pos += cut
    out += pieces.feed(body[pos:]) + pieces.flush()
    assert out == expected
    # Removing our id lines gives back the original bytes.
    import re

    assert re.sub(rb"id: \d+(\r\n|\n|\r)", b"", out) == body


def test_sse_ids_skip_comment_only_events() -> None:
    ids = SSEIds(100)
    assert ids.feed(b": keep-alive\n\ndata: x\n\n") == b": keep-alive\n\ndata: x\nid: 123\n\n"


def test_stream_ids_are_readable_or_hashed() -> None:
    assert stream_id("/chat", "42") == "/chat#42"
    assert stream_id("/chat", "x" * 300).startswith("sha256:")
    assert stream_id("/chat", "tab\there").startswith("sha256:")
    assert stream_id("/chat", "42", owner="alice").startswith("sha256:")
    assert stream_id("/chat", "42", "alice") != stream_id("/chat", "42", "bob")
    assert stream_id("/a#b", "c") != stream_id("/a", "b#c")


def test_store_urls_carry_options(tmp_path: object) -> None:
    from durable_asgi.stores import MemoryStore, store_from_url

    memory = store_from_url("memory://?max_streams=5&max_bytes=1000")
    assert isinstance(memory, MemoryStore)
    assert (memory.max_streams, memory.max_bytes) == (5, 1000)
    sqlite = store_from_url("sqlite:////tmp/durable%20x.db?poll_interval=0.01")
    assert (sqlite.path, sqlite.poll_interval) == ("/tmp/durable x.db", 0.01)  # type: ignore[attr-defined]
    assert store_from_url("sqlite:///rel.db").path == "rel.db"  # type: ignore[attr-defined]
    redis = store_from_url("redis://127.0.0.1:6379/0?prefix=chat&socket_timeout=3")
    assert redis.prefix == "chat"  # type: ignore[attr-defined]
    for bad in ("memory://?nope=1", "sqlite:///x.db?poll_interval=abc", "ftp://x", "sqlite://"):
        with pytest.raises(ValueError, match=r"option|valid|unknown store|names no file"):
            store_from_url(bad)


def test_replay_headers_keep_durable_responses_out_of_shared_caches() -> None:
    def cache(headers: list[tuple[bytes, bytes]], offset: int) -> list[bytes]:
        out = replay_headers(
            headers, offset=offset, state="complete", replay=True, total=9, rewrite_body=False
        )
        return [v for k, v in out if k.lower() == b"cache-control"]

    assert cache([], 0) == [b"no-store"]
    assert cache([(b"Cache-Control", b"private, max-age=60")], 0) == [b"private, max-age=60"]
    assert cache([(b"cache-control", b"public, max-age=60")], 3) == [b"no-store"]
