"""Mode 2, the Durable Streams proxy protocol, over HTTP against real uvicorns (every store)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from .harness import Serve, Setup
from .upstream import BINARY, binary, sse_body

pytestmark = pytest.mark.anyio

SECRET = "test-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


async def create(s: Setup, target: str, method: str = "GET", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{s.url}/v1/proxy",
            headers={
                **AUTH,
                "Upstream-URL": s.upstream + target,
                "Upstream-Method": method,
                **headers,
            },
        )


async def get(url: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(httpx.URL(url).copy_merge_params(params))


async def read_all(location: str) -> tuple[bytes, list[httpx.Response]]:
    """Catch-up reads from the start until Stream-Closed; the bytes and every response (the
    last may be a 204: a long-poll waiting at the tail is woken by the close)."""
    body, offset, responses = b"", "-1", []
    with anyio.fail_after(20):
        while True:
            response = await get(location, offset=offset, live="long-poll")
            assert response.status_code in (200, 204), response.text
            responses.append(response)
            body += response.content
            offset = response.headers["stream-next-offset"]
            if response.headers.get("stream-closed") == "true":
                return body, responses


def error(response: httpx.Response) -> str:
    data: dict[str, Any] = json.loads(response.content)
    return str(data["error"]["code"])


async def test_create_then_catch_up_read(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        created = await create(s, "/sse?n=5")
        assert created.status_code == 201, created.text
        assert created.headers["upstream-content-type"].startswith("text/event-stream")
        location = created.headers["location"]
        assert location.startswith(f"{s.url}/v1/proxy/")
        body, responses = await read_all(location)
        assert body == sse_body(5)
        last = responses[-1]
        assert last.headers["durable-state"] == "complete"
        assert last.headers["upstream-content-type"].startswith("text/event-stream")
        # never text/event-stream on a catch-up: clients would take the bytes for SSE framing
        with_data = [r for r in responses if r.status_code == 200]
        assert with_data and all(
            r.headers["content-type"].startswith("text/plain") for r in with_data
        )
        # a 204 carries no body, so no Content-Type
        assert all("content-type" not in r.headers for r in responses if r.status_code == 204)
        assert s.origin.calls["/sse"] == 1


@pytest.mark.parametrize(
    "wait", [0.45, 0.9], ids=["head-after-a-third-of-the-lease", "head-after-the-lease"]
)
async def test_an_upstream_slower_than_the_lease_to_answer_is_stored_whole(
    serve: Serve, wait: float
) -> None:
    """The stream is claimed while the upstream is asked: an upstream whose head takes longer
    than a third of the lease (renewed before the producer starts) or than the whole lease
    (claimed again) still gives a complete stream, the upstream called once."""
    with serve(secret=SECRET, lease_seconds=0.6) as s:
        created = await create(s, f"/sse?n=5&delay=0.05&wait={wait}")
        assert created.status_code == 201, created.text
        body, responses = await read_all(created.headers["location"])
        assert (body, responses[-1].headers["durable-state"]) == (sse_body(5), "complete")
        assert s.origin.calls["/sse"] == 1


async def test_sse_read(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        created = await create(s, "/sse?n=5")
        location = created.headers["location"]
        async with httpx.AsyncClient(timeout=30) as client:
            url = httpx.URL(location).copy_merge_params({"offset": "-1", "live": "sse"})
            response = await client.get(url)
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["upstream-content-type"].startswith("text/event-stream")
        events = _events(response.text)
        data = "".join(v for k, v in events if k == "data")
        assert data.encode() == sse_body(5)
        controls = [json.loads(v) for k, v in events if k == "control"]
        assert controls[-1]["streamClosed"] is True
        assert controls[-1]["durableState"] == "complete"


def _events(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, lines = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                lines.append(line[6:] if line.startswith("data: ") else line[5:])
        out.append((name, "\n".join(lines)))
    return out


def _with(url: str, **params: str) -> httpx.URL:
    return httpx.URL(url).copy_merge_params(params)


async def _wait(event: Any, timeout: float = 10.0) -> None:
    """Wait for a `threading.Event` of the origin (it runs in another thread)."""
    assert await anyio.to_thread.run_sync(event.wait, timeout)


# -- create ------------------------------------------------------------------------------


async def test_201_before_the_body_and_a_leaving_client_does_not_stop_the_upstream(
    serve: Serve,
) -> None:
    with serve(secret=SECRET) as s:
        created = await create(s, "/sse?n=6&pause=2")  # the upstream waits after 2 events
        assert created.status_code == 201
        await _wait(s.origin.paused)
        assert not s.origin.finished.is_set()
        s.origin.release.set()  # the creating client is long gone
        body, _ = await read_all(created.headers["location"])
        assert body == sse_body(6)
        assert s.origin.finished.is_set() and not s.origin.stopped.is_set()
        assert s.origin.calls["/sse"] == 1


async def test_upstream_headers(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        created = await create(
            s, "/echo", "POST", **{"Upstream-Authorization": "Bearer up", "X-Extra": "1"}
        )
        body, _ = await read_all(created.headers["location"])
        seen = json.loads(body)
        headers = dict(seen["headers"])
        assert seen["method"] == "POST"
        assert headers["authorization"] == "Bearer up"  # not the proxy's own
        assert headers["x-extra"] == "1"
        assert not {"upstream-url", "upstream-method", "upstream-authorization"} & headers.keys()
        assert created.headers["upstream-content-type"] == "application/json"


async def test_post_body_is_forwarded(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        async with httpx.AsyncClient() as client:
            created = await client.post(
                f"{s.url}/v1/proxy",
                headers={**AUTH, "Upstream-URL": s.upstream + "/echo", "Upstream-Method": "POST"},
                content=b'{"prompt": "hi"}',
            )
        body, _ = await read_all(created.headers["location"])
        assert json.loads(body)["body"] == '{"prompt": "hi"}'


@pytest.mark.parametrize("store", ["memory"], indirect=True)
async def test_create_errors(serve: Serve) -> None:
    with serve(secret=SECRET, header_timeout=0.5, allow=None) as s:
        url = f"{s.url}/v1/proxy"
        up = s.upstream
        cases: list[tuple[dict[str, str], int, str]] = [
            ({}, 401, "MISSING_SECRET"),
            ({"Authorization": "Bearer wrong"}, 401, "INVALID_SECRET"),
            (AUTH, 400, "MISSING_UPSTREAM_URL"),
            ({**AUTH, "Upstream-URL": up + "/sse"}, 400, "MISSING_UPSTREAM_METHOD"),
            (
                {**AUTH, "Upstream-URL": up + "/sse", "Upstream-Method": "TRACE"},
                400,
                "INVALID_UPSTREAM_METHOD",
            ),
            (
                {**AUTH, "Upstream-URL": "not a url", "Upstream-Method": "GET"},
                400,
                "INVALID_UPSTREAM_URL",
            ),
            (
                {**AUTH, "Upstream-URL": "https://evil.example/x", "Upstream-Method": "GET"},
                403,
                "UPSTREAM_NOT_ALLOWED",
            ),
            (
                {**AUTH, "Upstream-URL": s.url + "/v1/proxy", "Upstream-Method": "GET"},
                403,
                "UPSTREAM_NOT_ALLOWED",
            ),
            (
                {**AUTH, "Upstream-URL": up + "/status/302", "Upstream-Method": "GET"},
                400,
                "REDIRECT_NOT_ALLOWED",
            ),
            (
                {**AUTH, "Upstream-URL": up + "/hang", "Upstream-Method": "GET"},
                504,
                "UPSTREAM_TIMEOUT",
            ),
        ]
        async with httpx.AsyncClient(timeout=10) as client:
            for headers, status, code in cases:
                response = await client.post(url, headers=headers)
                assert (response.status_code, error(response)) == (status, code), headers
                assert response.headers["access-control-allow-origin"] == "*"
            # secret in the query string works too
            response = await client.post(url, params={"secret": "nope"})
            assert error(response) == "INVALID_SECRET"
            # an upstream error: 502 with its status and body
            response = await client.post(
                url, headers={**AUTH, "Upstream-URL": up + "/status/404", "Upstream-Method": "GET"}
            )
            assert response.status_code == 502
            assert response.headers["upstream-status"] == "404"
            assert response.content == b"status 404"
            # too large a body
            response = await client.post(
                url,
                headers={**AUTH, "Upstream-URL": up + "/echo", "Upstream-Method": "POST"},
                content=b"x" * ((1 << 20) + 1),
            )
            assert response.status_code == 413
            # oversized headers: never sent upstream
            response = await client.post(
                url,
                headers={
                    **AUTH,
                    "Upstream-URL": up + "/echo",
                    "Upstream-Method": "GET",
                    "X-Big": "a" * (40 << 10),
                },
            )
            assert (response.status_code, error(response)) == (431, "REQUEST_HEADERS_TOO_LARGE")
            assert s.origin.calls["/echo"] == 0
        # Nothing was stored for any of them.
        assert [info async for info in s.proxy.store.scan()] == []


@pytest.mark.parametrize("store", ["memory"], indirect=True)
async def test_unreachable_upstream_is_502(serve: Serve) -> None:
    with serve(secret=SECRET, allow=["http://127.0.0.1:1/**"]) as s:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                f"{s.url}/v1/proxy",
                headers={**AUTH, "Upstream-URL": "http://127.0.0.1:1/x", "Upstream-Method": "GET"},
            )
        assert (response.status_code, error(response)) == (502, "UPSTREAM_ERROR")


# -- reading -------------------------------------------------------------------------------


async def test_offsets_resume_and_etag(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = (await create(s, "/sse?n=10")).headers["location"]
        whole, _ = await read_all(location)
        first = await get(location)
        assert first.status_code == 200 and first.content == whole
        assert first.headers["stream-up-to-date"] == "true"
        assert first.headers["stream-closed"] == "true"
        end = first.headers["stream-next-offset"]
        assert end == f"{0:016d}_{len(whole):016d}"
        # resume from the middle: offsets sort as the bytes do
        middle = f"{0:016d}_{17:016d}"
        assert "-1" < middle < end
        resumed = await get(location, offset=middle)
        assert resumed.content == whole[17:]
        # at the tail of a closed stream: empty, closed
        tail = await get(location, offset=end)
        assert tail.content == b"" and tail.headers["stream-closed"] == "true"
        now = await get(location, offset="now")
        assert now.headers["stream-next-offset"] == end
        # long-poll at the tail of a closed stream: 204 at once, closed
        with anyio.fail_after(5):
            polled = await get(location, offset=end, live="long-poll")
        assert polled.status_code == 204
        assert polled.headers["stream-closed"] == "true"
        assert polled.headers["stream-up-to-date"] == "true"
        # ETag / If-None-Match
        async with httpx.AsyncClient() as client:
            again = await client.get(
                _with(location, offset="-1"), headers={"If-None-Match": first.headers["etag"]}
            )
        assert again.status_code == 304
        for bad in ("abc", "12", f"{0:016d}_{len(whole) + 1:016d}", f"{1:016d}_{0:016d}"):
            response = await get(location, offset=bad)
            assert (response.status_code, error(response)) == (400, "INVALID_OFFSET"), bad
        response = await get(location, live="sse")
        assert response.status_code == 400
        response = await get(location, offset="-1", live="bogus")
        assert response.status_code == 400


async def test_long_poll_waits_for_data_then_204_with_cursor(serve: Serve) -> None:
    with serve(secret=SECRET, long_poll_timeout=0.5) as s:
        location = (await create(s, "/sse?n=4&pause=2")).headers["location"]
        await _wait(s.origin.paused)
        caught_up = await get(location, offset="-1")
        offset = caught_up.headers["stream-next-offset"]
        assert caught_up.content == sse_body(2)
        assert "stream-closed" not in caught_up.headers
        timed_out = await get(location, offset=offset, live="long-poll")
        assert timed_out.status_code == 204
        assert timed_out.headers["stream-up-to-date"] == "true"
        assert timed_out.headers["stream-next-offset"] == offset
        cursor = timed_out.headers["stream-cursor"]
        # the client's cursor echoed back: the next one is larger (CDN collapsing rule)
        again = await get(location, offset=offset, live="long-poll", cursor=cursor)
        assert int(again.headers["stream-cursor"]) > int(cursor)
        async with anyio.create_task_group() as group:
            results: list[httpx.Response] = []

            async def poll() -> None:
                results.append(await get(location, offset=offset, live="long-poll"))

            s.proxy.streams.long_poll_timeout = 10  # type: ignore[union-attr]
            s.proxy.streams.reader.long_poll_timeout = 10  # type: ignore[union-attr]
            group.start_soon(poll)
            s.origin.release.set()
        assert results[0].status_code == 200
        assert results[0].content.startswith(sse_body(3)[len(sse_body(2)) :])


async def test_sse_binary_is_base64(serve: Serve) -> None:
    from ..support.servers import running_server

    with running_server(binary) as up, serve(secret=SECRET, allow=[f"{up.url}/**"]) as s:
        async with httpx.AsyncClient(timeout=30) as client:
            created = await client.post(
                f"{s.url}/v1/proxy",
                headers={**AUTH, "Upstream-URL": up.url + "/bin", "Upstream-Method": "GET"},
            )
            location = created.headers["location"]
            response = await client.get(_with(location, offset="-1", live="sse"))
        assert response.headers["stream-sse-data-encoding"] == "base64"
        import base64

        events = _events(response.text)
        data = b"".join(base64.b64decode(v.replace("\n", "")) for k, v in events if k == "data")
        assert data == BINARY
        body, _ = await read_all(location)
        assert body == BINARY


async def test_sse_resume_from_offset_and_live(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = (await create(s, "/sse?n=5&pause=2")).headers["location"]
        await _wait(s.origin.paused)
        got: list[dict[str, Any]] = []
        text = ""
        url = _with(location, offset="-1", live="sse")
        async with httpx.AsyncClient(timeout=30) as client, client.stream("GET", url) as response:
            released = False
            async for chunk in response.aiter_text():
                text += chunk
                got = [json.loads(v) for k, v in _events(text) if k == "control"]
                if not released and got and got[-1].get("upToDate"):
                    released = True
                    s.origin.release.set()
        data = "".join(v for k, v in _events(text) if k == "data")
        assert data.encode() == sse_body(5)
        assert got[-1]["streamClosed"] is True and "streamCursor" not in got[-1]
        assert all("streamCursor" in c for c in got[:-1])
        # resume mid-way from a control event's offset
        middle = got[0]["streamNextOffset"]
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(_with(location, offset=middle, live="sse"))
        rest = "".join(v for k, v in _events(response.text) if k == "data")
        assert data.encode()[int(middle.split("_")[1]) :] == rest.encode()


# -- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory"], indirect=True)
async def test_signatures(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = (await create(s, "/sse?n=2")).headers["location"]
        other = (await create(s, "/sse?n=2")).headers["location"]
        url = httpx.URL(location)
        bare = str(url.copy_with(query=None))
        expires = url.params["expires"]
        signature = url.params["signature"]
        async with httpx.AsyncClient() as client:
            r = await client.get(bare)
            assert (r.status_code, error(r)) == (401, "MISSING_SIGNATURE")
            r = await client.get(_with(bare, expires=expires, signature="0" * 64))
            assert (r.status_code, error(r)) == (401, "SIGNATURE_INVALID")
            # another stream's signature
            theirs = httpx.URL(other).params
            r = await client.get(
                _with(bare, expires=theirs["expires"], signature=theirs["signature"])
            )
            assert (r.status_code, error(r)) == (401, "SIGNATURE_INVALID")
            # a later expiry with the old signature
            r = await client.get(_with(bare, expires=str(int(expires) + 1), signature=signature))
            assert error(r) == "SIGNATURE_INVALID"
            # expired (signed right, in the past)
            from durable_asgi.proxy._ds import sign

            stream = url.path.rsplit("/", 1)[1]
            r = await client.get(_with(bare, expires="1000", signature=sign(SECRET, stream, 1000)))
            assert (r.status_code, error(r)) == (401, "SIGNATURE_EXPIRED")
            # service auth works as GET's fallback
            r = await client.get(bare, headers=AUTH)
            assert r.status_code == 200
            r = await client.get(bare, headers={"Authorization": "Bearer wrong"})
            assert error(r) == "INVALID_SECRET"
            # PATCH: signature only, no service fallback
            r = await client.patch(_with(bare, action="abort"), headers=AUTH)
            assert (r.status_code, error(r)) == (401, "MISSING_SIGNATURE")
            r = await client.patch(_with(location, action="nope"))
            assert (r.status_code, error(r)) == (400, "INVALID_ACTION")
            # HEAD and DELETE: service auth only, a signature is not enough
            r = await client.head(location)
            assert r.status_code == 401
            r = await client.delete(location)
            assert r.status_code == 401
            # unknown ids
            unknown = f"{s.url}/v1/proxy/00000000-0000-4000-8000-000000000000"
            r = await client.get(unknown, headers=AUTH)
            assert (r.status_code, error(r)) == (404, "STREAM_NOT_FOUND")
            r = await client.get(f"{s.url}/v1/proxy/not-an-id", headers=AUTH)
            assert r.status_code == 404
            # CORS preflight
            r = await client.options(f"{s.url}/v1/proxy")
            assert r.status_code == 204
            allowed = r.headers["access-control-allow-headers"]
            assert "upstream-url" in allowed and "upstream-authorization" in allowed
            exposed = r.headers["access-control-expose-headers"]
            assert "location" in exposed and "stream-next-offset" in exposed


# -- abort, delete, head --------------------------------------------------------------------


async def test_abort_keeps_the_data_and_closes_as_aborted(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = (await create(s, "/sse?n=6&pause=3")).headers["location"]
        await _wait(s.origin.paused)
        async with httpx.AsyncClient() as client:
            r = await client.patch(_with(location, action="abort"))
            assert r.status_code == 204
            await _wait(s.origin.stopped)
            r = await client.patch(_with(location, action="abort"))
            assert r.status_code == 204  # idempotent
        body, (*_, last) = await read_all(location)
        assert body == sse_body(3)
        assert last.headers["durable-state"] == "aborted"
        async with httpx.AsyncClient() as client:
            response = await client.get(_with(location, offset="-1", live="sse"))
            control = [json.loads(v) for k, v in _events(response.text) if k == "control"][-1]
            assert control["streamClosed"] is True and control["durableState"] == "aborted"
            bare = str(httpx.URL(location).copy_with(query=None))
            head = await client.head(bare, headers=AUTH)
        assert head.status_code == 200
        assert head.headers["durable-state"] == "aborted"
        assert head.headers["stream-closed"] == "true"
        assert head.headers["stream-next-offset"] == f"{0:016d}_{len(sse_body(3)):016d}"
        assert head.headers["upstream-content-type"].startswith("text/event-stream")


async def test_delete_stops_the_upstream_and_is_idempotent(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = (await create(s, "/sse?n=6&pause=3")).headers["location"]
        await _wait(s.origin.paused)
        bare = str(httpx.URL(location).copy_with(query=None))
        async with httpx.AsyncClient() as client:
            assert (await client.head(bare, headers=AUTH)).headers["durable-state"] == "running"
            assert (await client.delete(bare, headers=AUTH)).status_code == 204
            await _wait(s.origin.stopped)
            assert (await client.delete(bare, headers=AUTH)).status_code == 204
            r = await client.get(location)
            assert (r.status_code, error(r)) == (404, "STREAM_NOT_FOUND")
            assert (await client.head(bare, headers=AUTH)).status_code == 404


async def test_upstream_failing_mid_body_closes_as_failed(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        location = (await create(s, "/sse?n=6&fail=3")).headers["location"]
        body, (*_, last) = await read_all(location)
        assert body == sse_body(3)
        assert last.headers["durable-state"] == "failed"


@pytest.mark.parametrize("store", ["memory"], indirect=True)
async def test_body_inactivity_timeout_fails_the_stream(serve: Serve) -> None:
    with serve(secret=SECRET, body_timeout=0.3) as s:
        location = (await create(s, "/sse?n=6&pause=2")).headers["location"]
        body, (*_, last) = await read_all(location)
        assert body == sse_body(2)
        assert last.headers["durable-state"] == "failed"
        s.origin.release.set()


@pytest.mark.parametrize("store", ["memory"], indirect=True)
async def test_larger_than_max_response_bytes_fails(serve: Serve) -> None:
    with serve(secret=SECRET, max_response_bytes=100) as s:
        location = (await create(s, "/sse?n=10")).headers["location"]
        body, (*_, last) = await read_all(location)
        assert len(body) <= 100
        assert last.headers["durable-state"] == "failed"


async def test_mounted_in_a_host_app(serve: Serve) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from durable_asgi.proxy import DurableProxy

    def mount(proxy: DurableProxy) -> Starlette:
        return Starlette(routes=[Mount("/x", app=proxy)], lifespan=proxy.lifespan)

    with serve(secret=SECRET, mount=mount) as s:
        async with httpx.AsyncClient() as client:
            created = await client.post(
                f"{s.url}/x/v1/proxy",
                params={"secret": SECRET},  # as the reference client sends it
                headers={"Upstream-URL": s.upstream + "/sse?n=3", "Upstream-Method": "GET"},
            )
        assert created.status_code == 201, created.text
        location = created.headers["location"]
        assert location.startswith(f"{s.url}/x/v1/proxy/")
        body, (*_, last) = await read_all(location)
        assert body == sse_body(3) and last.headers["durable-state"] == "complete"
        # mode 1 still answers beside it
        async with httpx.AsyncClient() as client:
            df = await client.get(f"{s.url}/x" + s.path("/sse?n=2"))
        assert df.content == sse_body(2)


async def test_upstream_garbage_after_its_head_closes_as_failed(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        created = await create(s, "/garbage")  # claims gzip, isn't
        assert created.status_code == 201
        body, (*_, last) = await read_all(created.headers["location"])
        assert body == b"" and last.headers["durable-state"] == "failed"


@pytest.mark.parametrize("store", ["memory"], indirect=True)
async def test_cursor_rule(store: Any) -> None:
    from durable_asgi.streams import CURSOR_EPOCH, next_cursor

    assert next_cursor(None, now=CURSOR_EPOCH + 45) == "2"
    assert next_cursor("1", now=CURSOR_EPOCH + 45) == "2"  # behind: the current interval
    for _ in range(20):  # at or ahead: strictly more, by at most 3600 s of intervals
        assert 3 <= int(next_cursor("2", now=CURSOR_EPOCH + 45)) <= 2 + 180


@pytest.mark.parametrize(
    ("offset", "closed", "up_to_date", "cursor", "state"),
    [
        (0, False, False, "123", "running"),
        (55, False, True, "9", "running"),
        (99, True, True, None, "complete"),
        (5, True, True, "1", "failed"),
    ],
)
async def test_the_control_event_is_what_json_would_write(
    offset: int, closed: bool, up_to_date: bool, cursor: str | None, state: str
) -> None:
    """The hand-formatted control event of every SSE read, against json.dumps of its fields
    (PROTOCOL.md 5.8's order: offset, then cursor or closure, then up-to-date)."""
    from durable_asgi.streams import _control_event, _event, encode_offset

    control: dict[str, Any] = {"streamNextOffset": encode_offset(offset)}
    if closed:
        control.update(streamClosed=True, upToDate=True)
    else:
        control["streamCursor"] = cursor
        if up_to_date:
            control["upToDate"] = True
    control["durableState"] = state
    assert _control_event(offset, closed, up_to_date, cursor, state) == _event("control", control)
    assert json.loads(_control_event(offset, closed, up_to_date, cursor, state)[20:]) == control
