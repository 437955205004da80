"""Bad-input suite: property-based fuzzing of everything a client controls.

Durable-Offset, Range, Last-Event-ID, Durable-Control, key values (huge, control characters,
non-UTF-8 bytes: ASGI headers are bytes, decoded as latin-1), JSON bodies for
`keys.json_body`, oversized bodies. Every case gets a clear 4xx, or passes through or succeeds
— never a 500 nor an exception escaping the middleware — and the store holds nothing it
shouldn't (we scan it after each case). Mostly in process (fast); a few through uvicorn.

CI runs a small budget of examples; ``DURABLE_ASGI_SOAK=1`` runs ~20x more (see
`tests/stores/test_faults.py`).
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_asgi import DurableMiddleware, MemoryStore, keys
from durable_asgi._types import Message, Receive, Scope, Send

from ..support.apps import StreamApp
from ..support.asgi import Result, call
from ..support.servers import fetch, running_server
from ..support.soak import examples, soak_factor

pytestmark = pytest.mark.anyio

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    derandomize=not soak_factor(),
)

#: Any header value a client can put on the wire (ASGI gives bytes; CR/LF can't be in one).
header_bytes = st.binary(max_size=64).filter(lambda b: b"\r" not in b and b"\n" not in b)
digits = st.integers(0, 10**20).map(lambda n: str(n).encode())
offset_values = st.one_of(
    header_bytes,
    digits,
    st.sampled_from([b"", b" ", b"-1", b"+3", b"0x10", b"1e3", b"\xff", b"3 ", b" 3", b"9" * 19]),
)
BODY = b"".join(b"chunk %03d|" % i for i in range(20))
LENGTH = len(BODY)


async def fresh(**options: Any) -> tuple[StreamApp, DurableMiddleware]:
    """A middleware with one complete stream stored under key ``done`` at ``/s``."""
    app = StreamApp([b"chunk %03d|" % i for i in range(20)])
    mw = DurableMiddleware(app, store=MemoryStore(), **options)
    first = await call(mw, "/s", headers={"Durable-Key": "done"})
    assert first.complete
    return app, mw


async def raw_call(
    mw: DurableMiddleware,
    headers: list[tuple[bytes, bytes]],
    *,
    path: str = "/s",
    method: str = "GET",
    body: bytes = b"",
    query: bytes = b"",
) -> Result:
    """`call` with raw header bytes, exactly as a server would pass them."""
    return await call(
        mw,
        path,
        method=method,
        body=body,
        timeout=5,
        scope_extra={"headers": [(b"host", b"testserver"), *headers], "query_string": query},
    )


async def stored_ids(mw: DurableMiddleware) -> set[str]:
    return {info.id async for info in mw.store_checked.scan()}


def assert_clear_error(result: Result, *allowed: int) -> None:
    assert result.status in allowed, (result.status, result.body[:200])
    if result.status >= 400:
        payload = result.json()
        assert "error" in payload or payload == {"state": "absent"}, result.body
        assert result.complete


# -- offsets ------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(150))
@given(value=offset_values, name=st.sampled_from([b"durable-offset", b"range"]))
async def test_fuzzed_offsets_get_200_416_or_400(value: bytes, name: bytes) -> None:
    app, mw = await fresh()
    if name == b"range":
        value = b"bytes=" + value + b"-" if value.isdigit() else value
    result = await raw_call(mw, [(b"durable-key", b"done"), (name, value)])
    text = value.decode("latin-1").strip()
    number = re.fullmatch(r"bytes=([0-9]{1,18})-" if name == b"range" else r"[0-9]{1,18}", text)
    if number is None:
        assert_clear_error(result, 400)
    elif int(number.group(1) if name == b"range" else number.group(0)) > LENGTH:
        assert_clear_error(result, 416)
    else:
        n = int(number.group(1) if name == b"range" else number.group(0))
        assert result.status == 200 and result.complete
        assert result.body == BODY[n:]
    assert app.calls == 1  # an offset never starts a handler
    assert await stored_ids(mw) == {"/s#done"}


@settings(FUZZ, max_examples=examples(60))
@given(value=offset_values)
async def test_fuzzed_offsets_on_an_absent_stream_store_nothing(value: bytes) -> None:
    app = StreamApp()
    mw = DurableMiddleware(app, store=MemoryStore())
    result = await raw_call(mw, [(b"durable-key", b"nope"), (b"durable-offset", value)])
    if re.fullmatch(r"[0-9]{1,18}", value.decode("latin-1").strip()):
        assert_clear_error(result, 416)  # any explicit offset, even 0, only resumes
    else:
        assert_clear_error(result, 400)
    assert app.calls == 0
    assert await stored_ids(mw) == set()


SSE_EVENTS = [b"data: %d\n\n" % i for i in range(10)]


@settings(FUZZ, max_examples=examples(80))
@given(value=offset_values)
async def test_fuzzed_last_event_id(value: bytes) -> None:
    app = StreamApp(SSE_EVENTS, headers=[(b"content-type", b"text/event-stream")])
    mw = DurableMiddleware(app, store=MemoryStore(), sse_ids=True)
    await call(mw, "/s", headers={"Durable-Key": "sse"})
    result = await raw_call(mw, [(b"durable-key", b"sse"), (b"last-event-id", value)])
    text = value.decode("latin-1").strip()
    total = len(b"".join(SSE_EVENTS))
    if text and not re.fullmatch(r"[0-9]{1,18}", text):
        assert_clear_error(result, 400)
    elif text and int(text) > total:
        assert_clear_error(result, 416)
    else:
        assert result.status == 200 and result.complete
    assert app.calls == 1


# -- control --------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(80))
@given(
    value=st.one_of(
        header_bytes,
        st.sampled_from([b"status", b"ABORT", b" delete ", b"Status\t", b"stat us", b"\x00"]),
    )
)
async def test_fuzzed_control_values(value: bytes) -> None:
    app, mw = await fresh()
    for key in (b"done", b"absent"):
        result = await raw_call(mw, [(b"durable-key", key), (b"durable-control", value)])
        op = value.decode("latin-1").strip().lower()
        if op == "status":
            assert_clear_error(result, 200 if key == b"done" else 404)
        elif op in ("abort", "delete"):
            assert_clear_error(result, 204)
        else:
            assert_clear_error(result, 400)
    assert app.calls == 1  # control never runs the handler
    assert await stored_ids(mw) <= {"/s#done"}  # nothing created for the absent key


# -- keys -------------------------------------------------------------------------------------


key_bytes = st.one_of(
    header_bytes,
    st.binary(min_size=150, max_size=400).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=80).map(
        lambda s: s.encode("latin-1")
    ),
)


@settings(FUZZ, max_examples=examples(120))
@given(key=key_bytes)
async def test_any_key_value_is_served_and_stored_safely(key: bytes) -> None:
    app = StreamApp([b"a", b"b"])
    mw = DurableMiddleware(app, store=MemoryStore())
    first = await raw_call(mw, [(b"durable-key", key)])
    if not key.strip(b" \t") and not key:
        assert_clear_error(first, 400)
        assert await stored_ids(mw) == set()
        return
    if not key:
        return
    assert first.status == 200 and first.complete and first.body == b"ab"
    again = await raw_call(mw, [(b"durable-key", key)])
    assert again.headers.get("durable-replay") == "true" and again.body == b"ab"
    assert app.calls == 1
    (sid,) = await stored_ids(mw)
    text = key.decode("latin-1")
    if sid.startswith("sha256:"):
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", sid)
    else:  # kept readable only when short, printable ASCII
        assert sid == f"/s#{text}" and sid.isprintable() and sid.isascii() and len(sid) <= 200
    status = await raw_call(mw, [(b"durable-key", key), (b"durable-control", b"status")])
    assert status.status == 200
    assert status.json()["key"] == text  # reported as the client sent it, valid JSON


@pytest.mark.parametrize("size", [1_000, 100_000, 1_000_000])
async def test_huge_keys_are_hashed(size: int) -> None:
    app = StreamApp([b"x"])
    mw = DurableMiddleware(app, store=MemoryStore(), key=keys.query("k"))
    result = await raw_call(mw, [], query=b"k=" + b"A" * size)
    assert result.status == 200 and result.complete
    (sid,) = await stored_ids(mw)
    assert sid.startswith("sha256:") and len(sid) == 71


@settings(FUZZ, max_examples=examples(60))
@given(query=st.binary(max_size=120), cookie=header_bytes)
async def test_fuzzed_query_strings_and_cookies(query: bytes, cookie: bytes) -> None:
    app = StreamApp([b"q"])
    mw = DurableMiddleware(
        app, store=MemoryStore(), key=keys.first(keys.query("id"), keys.cookie("sid"))
    )
    result = await raw_call(mw, [(b"cookie", cookie)], query=query)
    assert_clear_error(result, 200, 400)
    for sid in await stored_ids(mw):
        assert sid.startswith(("sha256:", "/s#")) and sid.isprintable()


# -- JSON bodies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"id": json_values}), max_size=3)}
)


@settings(FUZZ, max_examples=examples(150))
@given(
    body=st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        chat_bodies.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
    )
)
async def test_fuzzed_json_bodies(body: bytes) -> None:
    app = StreamApp([b"j"])
    mw = DurableMiddleware(app, store=MemoryStore(), key=keys.json_body("messages[-1].id"))
    result = await raw_call(mw, [], method="POST", body=body)
    assert_clear_error(result, 200, 400)
    # The app sees the body unchanged (an empty key is refused with 400 before it runs).
    assert app.bodies == ([] if result.status == 400 else [body])
    ids = await stored_ids(mw)
    try:
        key = json.loads(body)["messages"][-1]["id"]
    except Exception:
        key = None
    if not isinstance(key, (str, int, float)) or isinstance(key, bool) or key == "":
        assert ids == set()  # not durable (or empty key: 400): nothing stored
    else:
        assert len(ids) == 1


async def test_deeply_nested_json_body_is_not_a_500() -> None:
    app = StreamApp([b"j"])
    mw = DurableMiddleware(app, store=MemoryStore(), key=keys.json_body("id"))
    result = await raw_call(mw, [], method="POST", body=b"[" * 100_000)  # 100 kB < 1 MiB limit
    assert result.status != 500
    assert await stored_ids(mw) == set()


# -- oversized bodies -----------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(60))
@given(parts=st.lists(st.integers(0, 600), min_size=1, max_size=6), limit=st.integers(0, 1500))
async def test_request_bodies_over_the_limit_get_413_and_store_nothing(
    parts: list[int], limit: int
) -> None:
    app = StreamApp([b"ok"])
    mw = DurableMiddleware(app, store=MemoryStore(), max_request_body=limit)
    messages: list[Message] = [
        {"type": "http.request", "body": b"x" * n, "more_body": i < len(parts) - 1}
        for i, n in enumerate(parts)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/s",
        "query_string": b"",
        "headers": [(b"durable-key", b"big")],
    }
    with anyio.fail_after(5):
        await mw(scope, receive, send)
    status = sent[0]["status"]
    if sum(parts) > limit:
        assert status == 413 and app.calls == 0
        assert await stored_ids(mw) == set()
    else:
        assert status == 200 and app.calls == 1


# -- a few through a real server --------------------------------------------------------------


def raw_request(port: int, head: bytes) -> bytes:
    """Send raw bytes (anything, not just what a client library allows) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def refusing_lifespan(app: Any) -> Any:
    async def only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        await app(scope, receive, send)

    return only


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bad_input_through_a_real_server() -> None:
    app = StreamApp([b"real"])
    mw = DurableMiddleware(refusing_lifespan(app), store=MemoryStore(), max_request_body=1000)
    cases = [
        (b"Durable-Key: \xff\xfe\xe9bin\r\n", {200}),  # not UTF-8: hashed
        (b"Durable-Key: a\x00b\r\n", {400}),  # refused by the server's parser already
        (b"Durable-Key: k\r\nDurable-Offset: \xff\r\n", {400}),
        (b"Durable-Key: k\r\nRange: bytes=5-9\r\n", {400}),
        (b"Durable-Key: k\r\nDurable-Control: \xe9\r\n", {400}),
        (b"Durable-Key: k2\r\nDurable-Offset: 999999999999999999\r\n", {416}),
        (b"Durable-Key: " + b"K" * 8000 + b"\r\n", {200}),
        (b"Durable-Key: big\r\nContent-Length: 5000\r\n", {413}),
    ]
    with running_server(mw) as server:
        for head, allowed in cases:
            body = b"y" * 5000 if b"5000" in head else b""
            request = b"POST /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n"
            response = await anyio.to_thread.run_sync(raw_request, server.port, request + body)
            assert status_of(response) in allowed, (head[:60], response[:200])
        ok = await fetch(server.url, "/s", headers={"Durable-Key": "K" * 8000})
        assert ok.header("durable-replay") == "true"
    ids = {info.id async for info in mw.store_checked.scan()}
    assert all(i.isprintable() and len(i) <= 200 for i in ids)
    assert "/s#big" not in ids
