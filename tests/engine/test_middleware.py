"""The middleware's semantics, driven in-process on asyncio and trio (no sockets needed)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import anyio
import pytest

from durable_asgi import DurableMiddleware, Lease, MemoryStore, StoreError, keys
from durable_asgi._types import Receive, Scope, Send

from ..support.apps import CHUNKS, StreamApp, wait_thread_event
from ..support.asgi import call, http_scope

pytestmark = pytest.mark.anyio

BODY = b"".join(CHUNKS)
KEY = {"Durable-Key": "k1"}


def durable(app: object, **options: object) -> DurableMiddleware:
    return DurableMiddleware(app, store=MemoryStore(), **options)  # type: ignore[arg-type]


# -- pass-through ---------------------------------------------------------------------------


async def test_request_without_key_passes_through_untouched() -> None:
    app = StreamApp()
    mw = durable(app)
    first = await call(mw, "/s")
    second = await call(mw, "/s")
    assert (first.body, second.body) == (BODY, BODY)
    assert app.calls == 2
    assert "durable-offset" not in first.headers
    assert [s async for s in mw.store_checked.scan()] == []


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE"])
async def test_methods_not_listed_pass_through(method: str) -> None:
    app = StreamApp()
    mw = durable(app)
    for _ in range(2):
        result = await call(mw, "/s", method=method, headers=KEY)
        assert "durable-offset" not in result.headers
    assert app.calls == 2


async def test_websocket_scope_passes_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await durable(app)({"type": "websocket", "path": "/", "headers": []}, None, None)  # type: ignore[arg-type]
    assert seen == ["websocket"]


async def test_pass_through_replays_a_body_the_extractor_read() -> None:
    app = StreamApp()
    mw = durable(app, key=keys.json_body("id"))
    result = await call(mw, "/s", method="POST", body=b'{"other": 1}')
    assert result.body == BODY
    assert app.bodies == [b'{"other": 1}']


# -- first request, followers and resume ----------------------------------------------------


async def test_first_request_streams_and_is_stored() -> None:
    app = StreamApp()
    mw = durable(app)
    first = await call(mw, "/s", headers=KEY)
    assert first.complete and first.body == BODY
    assert first.headers["durable-offset"] == "0"
    assert first.headers["durable-state"] == "running"
    assert "durable-replay" not in first.headers

    replay = await call(mw, "/s", headers=KEY)
    assert replay.complete and replay.body == BODY
    assert replay.headers["durable-replay"] == "true"
    assert replay.headers["durable-state"] == "complete"
    assert replay.headers["content-length"] == str(len(BODY))
    assert app.calls == 1


async def test_handler_runs_to_the_end_after_the_client_leaves() -> None:
    app = StreamApp()
    mw = durable(app)
    first = await call(mw, "/s", headers=KEY, disconnect_after=30)
    assert first.disconnected and not first.complete
    assert app.finished == 1 and app.cancelled == 0

    offset = len(first.body)
    resumed = await call(mw, "/s", headers={**KEY, "Durable-Offset": str(offset)})
    assert first.body + resumed.body == BODY
    assert resumed.headers["durable-offset"] == str(offset)
    assert resumed.headers["content-length"] == str(len(BODY) - offset)
    assert app.calls == 1


async def test_followers_join_a_running_stream_and_see_every_byte() -> None:
    app = StreamApp(pause_at=10)
    mw = durable(app)
    results: list[bytes] = []

    async def client() -> None:
        results.append((await call(mw, "/s", headers=KEY)).body)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client)
        await wait_thread_event(app.paused)
        for _ in range(5):
            tasks.start_soon(client)
        # A follower from mid-stream sees live bytes too.
        resumed = anyio.Event()

        async def resumer() -> None:
            result = await call(mw, "/s", headers={**KEY, "Durable-Offset": "20"})
            assert result.headers["durable-state"] == "running"
            results.append(b"x" * 20 + result.body)
            resumed.set()

        tasks.start_soon(resumer)
        status = await mw.status("k1", namespace="/s")
        assert status is not None and status["state"] == "running"
        app.release.set()
        await resumed.wait()
    assert app.calls == 1
    assert results.count(BODY) == 6
    assert b"x" * 20 + BODY[20:] in results


async def test_concurrent_requests_with_one_key_run_the_handler_once() -> None:
    app = StreamApp()
    mw = durable(app)
    bodies: list[bytes] = []

    async def client() -> None:
        bodies.append((await call(mw, "/s", headers=KEY)).body)

    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(client)
    assert app.calls == 1
    assert bodies == [BODY] * 20


async def test_post_body_is_replayed_to_the_handler() -> None:
    app = StreamApp()
    mw = durable(app, key=keys.json_body("id"))
    payload = b'{"id": "c1", "text": "hello"}'
    result = await call(mw, "/s", method="POST", body=payload)
    assert result.body == BODY and app.bodies == [payload]
    again = await call(mw, "/s", method="POST", body=payload)
    assert again.headers["durable-replay"] == "true" and app.calls == 1


async def test_get_resumes_what_post_started_in_a_shared_namespace() -> None:
    app = StreamApp()
    mw = durable(
        app,
        key=keys.first(
            keys.json_body("id", namespace="chat"), keys.path("/chat/{id}", namespace="chat")
        ),
    )
    await call(mw, "/chat", method="POST", body=b'{"id": "7"}')
    resumed = await call(mw, "/chat/7", headers={"Durable-Offset": "5"})
    assert resumed.body == BODY[5:]
    assert app.calls == 1


async def test_streams_in_different_paths_never_collide() -> None:
    app = StreamApp()
    mw = durable(app)
    await call(mw, "/a", headers=KEY)
    await call(mw, "/b", headers=KEY)
    assert app.calls == 2


async def test_set_cookie_goes_to_the_first_client_only() -> None:
    headers = [(b"content-type", b"text/plain"), (b"set-cookie", b"session=secret")]
    app = StreamApp(headers=headers)
    mw = durable(app)
    first = await call(mw, "/s", headers=KEY)
    assert (b"set-cookie", b"session=secret") in first.raw_headers
    replay = await call(mw, "/s", headers=KEY)
    assert all(name != b"set-cookie" for name, _ in replay.raw_headers)


async def test_content_length_is_recomputed_when_resuming() -> None:
    body = b"0123456789"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
        )
        await send({"type": "http.response.body", "body": body})

    mw = durable(app)
    first = await call(mw, "/s", headers=KEY)
    assert first.headers["content-length"] == "10" and first.body == body
    resumed = await call(mw, "/s", headers={**KEY, "Range": "bytes=4-"})
    assert resumed.headers["content-length"] == "6" and resumed.body == body[4:]
    at_end = await call(mw, "/s", headers={**KEY, "Durable-Offset": "10"})
    assert at_end.status == 200 and at_end.body == b"" and at_end.complete


# -- failure, limits and retention ----------------------------------------------------------


async def test_handler_failure_ends_readers_abnormally_and_next_request_reruns() -> None:
    app = StreamApp(fail_at=10)
    mw = durable(app)
    with pytest.raises(RuntimeError, match="boom"):
        await call(mw, "/s", headers=KEY)
    status = await mw.status("k1", namespace="/s")
    assert status is not None and status["state"] == "failed"

    app.fail_at = None
    second = await call(mw, "/s", headers=KEY)
    assert second.complete and second.body == BODY
    assert app.calls == 2


async def test_follower_of_a_failing_stream_gets_a_truncated_response() -> None:
    app = StreamApp(pause_at=5, fail_at=8)
    mw = durable(app)
    follower_result = []

    async def first() -> None:
        with pytest.raises(RuntimeError):
            await call(mw, "/s", headers=KEY)

    async def follower() -> None:
        follower_result.append(await call(mw, "/s", headers=KEY))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await wait_thread_event(app.paused)
        tasks.start_soon(follower)
        await anyio.wait_all_tasks_blocked()  # the follower is attached and waiting
        app.release.set()
    (result,) = follower_result
    assert not result.complete
    assert result.body == b"".join(CHUNKS[:8])


async def test_handler_failing_before_responding_gives_500_through_the_framework() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("no response")

    mw = durable(app)
    with pytest.raises(ValueError, match="no response"):
        await call(mw, "/s", headers=KEY)
    status = await mw.status("k1", namespace="/s")
    assert status is not None and status["state"] == "failed"


async def test_non_2xx_responses_are_delivered_but_not_kept() -> None:
    app = StreamApp(status=503, chunks=[b"busy"])
    mw = durable(app)
    first = await call(mw, "/s", headers=KEY)
    assert first.status == 503 and first.body == b"busy"
    second = await call(mw, "/s", headers=KEY)
    assert second.status == 503 and "durable-replay" not in second.headers
    assert app.calls == 2


async def test_response_over_max_response_bytes_fails() -> None:
    app = StreamApp()
    mw = durable(app, max_response_bytes=100)
    result = await call(mw, "/s", headers=KEY)
    assert not result.complete and len(result.body) <= 100
    status = await mw.status("k1", namespace="/s")
    assert status is not None and status["state"] == "failed"
    assert app.cancelled == 1


async def test_max_duration_cancels_the_handler() -> None:
    app = StreamApp(pause_at=3)
    mw = durable(app, max_duration=0.2)
    result = await call(mw, "/s", headers=KEY)
    assert not result.complete and result.body == b"".join(CHUNKS[:3])
    assert app.cancelled == 1
    status = await mw.status("k1", namespace="/s")
    assert status is not None and status["state"] == "failed"


async def test_app_returning_without_completing_its_response_is_failed() -> None:
    app = StreamApp(complete=False)
    mw = durable(app)
    result = await call(mw, "/s", headers=KEY)
    assert not result.complete and result.body == BODY
    status = await mw.status("k1", namespace="/s")
    assert status is not None and status["state"] == "failed"


async def test_finished_stream_expires_after_ttl() -> None:
    app = StreamApp(chunks=[b"x"])
    mw = durable(app, ttl=0.05)
    await call(mw, "/s", headers=KEY)
    await anyio.sleep(0.1)  # the TTL itself is what is being tested
    assert await mw.status("k1", namespace="/s") is None
    await call(mw, "/s", headers=KEY)
    assert app.calls == 2


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Durable-Offset": "abc"}, 400),
        ({"Durable-Offset": "-1"}, 400),
        ({"Durable-Offset": "1.5"}, 400),
        ({"Range": "bytes=0-10"}, 400),
        ({"Range": "items=1-"}, 400),
        ({"Durable-Control": "explode"}, 400),
        ({"Durable-Key": ""}, 400),
    ],
)
async def test_bad_protocol_headers_get_400_and_store_nothing(
    headers: dict[str, str], status: int
) -> None:
    app = StreamApp()
    mw = durable(app)
    result = await call(mw, "/s", headers={**KEY, **headers})
    assert result.status == status
    assert "error" in result.json()
    assert app.calls == 0
    assert [s async for s in mw.store_checked.scan()] == []


async def test_oversized_request_body_gets_413_and_stores_nothing() -> None:
    app = StreamApp()
    mw = durable(app, max_request_body=10)
    result = await call(mw, "/s", method="POST", headers=KEY, body=b"x" * 11)
    assert result.status == 413 and app.calls == 0
    assert [s async for s in mw.store_checked.scan()] == []


async def test_offset_past_the_end_of_a_finished_stream_is_416() -> None:
    app = StreamApp()
    mw = durable(app)
    await call(mw, "/s", headers=KEY)
    result = await call(mw, "/s", headers={**KEY, "Durable-Offset": str(len(BODY) + 1)})
    assert result.status == 416
    assert result.headers["content-range"] == f"bytes */{len(BODY)}"


async def test_resume_of_an_absent_stream_is_416_and_runs_nothing() -> None:
    app = StreamApp()
    mw = durable(app)
    result = await call(mw, "/s", headers={**KEY, "Durable-Offset": "5"})
    assert result.status == 416 and result.headers["durable-state"] == "absent"
    assert app.calls == 0


async def test_offset_beyond_a_running_stream_waits_for_the_bytes() -> None:
    app = StreamApp(pause_at=2)
    mw = durable(app)
    out = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(partial(call, mw, "/s", headers=KEY))
        await wait_thread_event(app.paused)

        async def resumer() -> None:
            out.append(await call(mw, "/s", headers={**KEY, "Durable-Offset": "100"}))

        tasks.start_soon(resumer)
        app.release.set()
    assert out[0].body == BODY[100:]


# -- control --------------------------------------------------------------------------------


async def test_status_control_reports_the_stream() -> None:
    app = StreamApp()
    mw = durable(app)
    absent = await call(mw, "/s", headers={**KEY, "Durable-Control": "status"})
    assert absent.status == 404 and absent.json() == {"state": "absent"}
    await call(mw, "/s", headers=KEY)
    status = await call(mw, "/s", headers={**KEY, "Durable-Control": "status"})
    data = status.json()
    assert data["key"] == "k1" and data["state"] == "complete"
    assert data["in_progress"] is False and data["offset"] == len(BODY)
    assert data["chunks"] == len(CHUNKS) and data["status_code"] == 200
    assert data["expires_at"] > data["updated_at"] >= data["created_at"]
    assert app.calls == 1


async def test_abort_stops_the_handler_and_keeps_the_bytes() -> None:
    app = StreamApp(pause_at=5)
    mw = durable(app)
    results = []

    async def first() -> None:
        results.append(await call(mw, "/s", headers=KEY))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await wait_thread_event(app.paused)
        aborted = await call(mw, "/s", headers={**KEY, "Durable-Control": "abort"})
        assert aborted.status == 204
    assert app.cancelled == 1 and app.finished == 0
    assert not results[0].complete and results[0].body == b"".join(CHUNKS[:5])

    replay = await call(mw, "/s", headers=KEY)
    assert replay.headers["durable-state"] == "aborted"
    assert replay.body == b"".join(CHUNKS[:5]) and not replay.complete
    again = await call(mw, "/s", headers={**KEY, "Durable-Control": "abort"})
    assert again.status == 204 and app.calls == 1


async def test_delete_removes_the_stream_and_the_next_request_reruns() -> None:
    app = StreamApp()
    mw = durable(app)
    await call(mw, "/s", headers=KEY)
    for _ in range(2):  # idempotent
        deleted = await call(mw, "/s", headers={**KEY, "Durable-Control": "delete"})
        assert deleted.status == 204
    assert await mw.status("k1", namespace="/s") is None
    await call(mw, "/s", headers=KEY)
    assert app.calls == 2


async def test_python_control_api() -> None:
    app2 = StreamApp(pause_at=3)
    mw = durable(app2, namespace="chat")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(partial(call, mw, "/any", headers=KEY))
        await wait_thread_event(app2.paused)
        status = await mw.status("k1")
        assert status is not None and status["in_progress"] is True
        assert await mw.abort("k1") is True
        assert await mw.abort("k1") is False
    assert app2.cancelled == 1
    assert await mw.delete("k1") is True
    assert await mw.delete("k1") is False
    with pytest.raises(TypeError, match="namespace"):
        await durable(app2).status("k1")


# -- owner binding --------------------------------------------------------------------------


async def test_owner_bound_streams_are_invisible_to_other_owners() -> None:
    app = StreamApp()
    mw = durable(app, owner=keys.header("X-User"))
    alice = {**KEY, "X-User": "alice"}
    bob = {**KEY, "X-User": "bob"}
    await call(mw, "/s", headers=alice)
    assert (await call(mw, "/s", headers={**bob, "Durable-Control": "status"})).status == 404
    assert (await call(mw, "/s", headers={**bob, "Durable-Offset": "3"})).status == 416
    assert (await call(mw, "/s", headers={**bob, "Durable-Control": "delete"})).status == 204
    mine = await call(mw, "/s", headers={**alice, "Durable-Control": "status"})
    assert mine.status == 200
    # Bob's own request runs his own handler call, never reads Alice's stream.
    await call(mw, "/s", headers=bob)
    assert app.calls == 2
    # Stored ids never hold the owner or key raw.
    ids = [info.id async for info in mw.store_checked.scan()]
    assert all(i.startswith("sha256:") and "alice" not in i for i in ids)


# -- SSE ids --------------------------------------------------------------------------------


SSE = [b"data: one\n\n", b": ping\n\n", b"data: two\r\n\r\n", b"event: x\ndata: 3\n\n"]


async def test_sse_ids_are_offsets_and_last_event_id_resumes() -> None:
    app = StreamApp(chunks=SSE, headers=[(b"content-type", b"text/event-stream")])
    mw = durable(app, sse_ids=True)
    first = await call(mw, "/s", headers=KEY)
    assert first.body == (
        b"data: one\nid: 11\n\n: ping\n\ndata: two\r\nid: 32\r\n\r\nevent: x\ndata: 3\nid: 50\n\n"
    )
    assert "content-length" not in first.headers
    resumed = await call(mw, "/s", headers={**KEY, "Last-Event-ID": "11"})
    assert resumed.body == b": ping\n\ndata: two\r\nid: 32\r\n\r\nevent: x\ndata: 3\nid: 50\n\n"
    assert app.calls == 1


async def test_last_event_id_is_ignored_without_sse_ids() -> None:
    app = StreamApp(chunks=SSE, headers=[(b"content-type", b"text/event-stream")])
    mw = durable(app)
    await call(mw, "/s", headers=KEY)
    resumed = await call(mw, "/s", headers={**KEY, "Last-Event-ID": "app-id-7"})
    assert resumed.body == b"".join(SSE)


# -- lifespan -------------------------------------------------------------------------------


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    async def open(self) -> None:
        self.events.append("open")

    async def close(self) -> None:
        self.events.append("close")


async def run_lifespan(mw: DurableMiddleware) -> list[str]:
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return next(incoming)

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)  # type: ignore[arg-type]
    return sent


async def test_lifespan_opens_and_closes_the_store_for_apps_without_lifespan() -> None:
    async def django_like(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ValueError("Django can only handle ASGI/HTTP connections")

    store = RecordingStore()
    mw = DurableMiddleware(django_like, store=store)
    sent = await run_lifespan(mw)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert store.events == ["open", "close"]


async def test_lifespan_is_forwarded_to_apps_that_speak_it() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    store = RecordingStore()
    sent = await run_lifespan(DurableMiddleware(app, store=store))
    assert seen == ["lifespan.startup", "lifespan.shutdown"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert store.events == ["open", "close"]


async def test_shutdown_stops_running_producers_after_the_grace_period() -> None:
    app = StreamApp(pause_at=3)
    mw = durable(app, shutdown_grace=0.1)
    results = []

    async def first() -> None:
        results.append(await call(mw, "/s", headers=KEY))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await wait_thread_event(app.paused)
        await mw._shutdown()
    assert app.cancelled == 1
    assert not results[0].complete
    info = await mw.store_checked.info(next(iter([i.id async for i in mw.store_checked.scan()])))
    assert info is not None and info.state == "failed"


async def test_status_json_is_valid_json_for_hashed_keys() -> None:
    app = StreamApp(chunks=[b"x"])
    mw = durable(app)
    weird = "k\u00e9y with spaces " + "x" * 300
    await call(mw, "/s", headers={"Durable-Key": weird.encode().decode("latin-1")})
    ids = [info.id async for info in mw.store_checked.scan()]
    assert len(ids) == 1 and ids[0].startswith("sha256:")
    assert json.dumps(ids)


# -- per-endpoint policies (the AI SDK's "new turn per POST" and "resume only what runs") ----


async def test_on_finished_rerun_starts_a_new_stream_but_joins_a_running_one() -> None:
    app = StreamApp(pause_at=3)
    mw = durable(app, on_finished="rerun")
    bodies: list[bytes] = []

    async def client() -> None:
        bodies.append((await call(mw, "/s", headers=KEY)).body)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client)
        await wait_thread_event(app.paused)
        tasks.start_soon(client)
        await anyio.wait_all_tasks_blocked()
        app.release.set()
    assert app.calls == 1 and bodies == [BODY, BODY]
    await call(mw, "/s", headers=KEY)  # finished: a new turn runs the handler again
    assert app.calls == 2


async def test_no_content_policies_only_join_running_streams() -> None:
    app = StreamApp(pause_at=3)
    mw = durable(app, on_finished="no_content", on_absent="no_content")
    nothing = await call(mw, "/s", headers=KEY)
    assert nothing.status == 204 and nothing.body == b""
    assert nothing.headers["durable-state"] == "absent" and app.calls == 0

    starter = durable(app)  # another endpoint (same store) starts the stream
    starter.store, starter.engine = mw.store, mw.engine
    results = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(partial(call, starter, "/s", headers=KEY))
        await wait_thread_event(app.paused)

        async def joiner() -> None:
            results.append(await call(mw, "/s", headers=KEY))

        tasks.start_soon(joiner)
        await anyio.wait_all_tasks_blocked()
        app.release.set()
    assert results[0].body == BODY and results[0].headers["durable-replay"] == "true"
    done = await call(mw, "/s", headers=KEY)
    assert done.status == 204 and done.headers["durable-state"] == "complete"
    assert app.calls == 1


class FailingReads(MemoryStore):
    """A store whose reads fail once a reader got its first 10 bytes (a Redis gone away)."""

    failing = False

    async def read(self, stream_id: str, offset: int, limit: int) -> tuple[Any, bytes]:
        if self.failing and offset >= 10:
            raise StoreError("connection lost")
        return await super().read(stream_id, offset, 10 - offset if self.failing else limit)


class FailingWrites(MemoryStore):
    """A store whose appends fail once it holds some bytes of a stream."""

    async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
        info = await self.info(lease.stream_id)
        if info is not None and info.offset > 0:
            raise StoreError("connection lost")
        await super().append(lease, data, chunks=chunks)


async def test_a_store_failing_mid_stream_ends_the_response_abnormally() -> None:
    """For a reader fed from the store (a replay here; the first client once behind)."""
    app = StreamApp()
    store = FailingReads()
    mw = DurableMiddleware(app, store=store)
    assert (await call(mw, "/s", headers=KEY)).body == BODY
    store.failing = True
    result = await call(mw, "/s", headers=KEY)
    assert result.status == 200
    assert not result.complete
    assert result.body == BODY[:10]
    assert app.finished == 1  # the handler itself was not disturbed


async def test_a_store_failing_to_write_ends_the_first_clients_response_abnormally() -> None:
    """The first client, fed inline, never gets a clean end the store didn't record: it gets
    what the handler sent up to the failure, then a truncated body."""
    app = StreamApp(delay=0.001)  # a write per chunk
    mw = DurableMiddleware(app, store=FailingWrites())
    result = await call(mw, "/s", headers=KEY)
    assert result.status == 200
    assert not result.complete
    assert BODY.startswith(result.body) and result.body


async def test_lifespan_is_spoken_for_apps_that_return_without_reading_it() -> None:
    async def quiet(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # ignores lifespan without raising

    store = RecordingStore()
    sent = await run_lifespan(DurableMiddleware(quiet, store=store))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert store.events == ["open", "close"]


async def test_an_explicit_offset_of_zero_only_resumes() -> None:
    app = StreamApp()
    mw = durable(app, on_finished="rerun")
    absent = await call(mw, "/s", headers={**KEY, "Durable-Offset": "0"})
    assert absent.status == 416 and app.calls == 0
    await call(mw, "/s", headers=KEY)
    # A reconnect at byte 0 replays the finished turn; it never starts a new one.
    again = await call(mw, "/s", headers={**KEY, "Durable-Offset": "0"})
    assert again.body == BODY and again.headers["durable-replay"] == "true"
    assert app.calls == 1


async def test_resuming_a_failed_stream_serves_its_bytes_then_fails() -> None:
    app = StreamApp(fail_at=10)
    mw = durable(app)
    with pytest.raises(RuntimeError):
        await call(mw, "/s", headers=KEY)
    resumed = await call(mw, "/s", headers={**KEY, "Durable-Offset": "30"})
    assert resumed.headers["durable-state"] == "failed"
    assert resumed.body == b"".join(CHUNKS[:10])[30:]
    assert not resumed.complete
    assert app.calls == 1


async def test_a_store_that_falls_behind_slows_the_handler_not_memory() -> None:
    """Backpressure: once more than the buffer's bound is pending, the handler's `send` waits
    for the writer; when the store catches up, everything lands byte-for-byte."""
    from durable_asgi._write_behind import HIGH_WATER

    class SlowStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.release = anyio.Event()
            self.appending = anyio.Event()

        async def append(self, lease: Lease, data: bytes, *, chunks: int) -> None:
            self.appending.set()
            await self.release.wait()
            await super().append(lease, data, chunks=chunks)

    piece = b"p" * 4096
    pieces = 4 * HIGH_WATER // len(piece)
    sent = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal sent
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    store = SlowStore()
    mw = DurableMiddleware(app, store=store)
    async with anyio.create_task_group() as tg:
        results: list[Any] = []

        async def first() -> None:
            results.append(await call(mw, "/slow", headers=KEY))

        tg.start_soon(first)
        await store.appending.wait()
        await anyio.wait_all_tasks_blocked()
        # The writer is stuck on its first append: the handler sent about HIGH_WATER, then waited.
        assert sent * len(piece) <= HIGH_WATER + len(piece)
        store.release.set()
    assert sent == pieces
    assert results[0].complete and results[0].body == piece * pieces


@pytest.mark.parametrize(("server", "handler"), [("2.3", "2.4"), ("2.4", "2.4"), ("2.5", "2.5")])
async def test_the_handler_is_told_a_send_never_fails(server: str, handler: str) -> None:
    """The handler's `send` can't fail (no client can leave it), which ASGI 2.4 allows, so it
    sees at least 2.4 and frameworks skip their per-response disconnect watcher. Requests
    that pass through keep the server's version."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["asgi"]["spec_version"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = durable(app)
    asgi = {"asgi": {"version": "3.0", "spec_version": server}}
    assert (await call(mw, "/s", headers=KEY, scope_extra=asgi)).body == b"ok"
    assert (await call(mw, "/s", scope_extra=asgi)).body == b"ok"
    assert seen == [handler, server]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_finished_stream_leaves_no_reference_cycle_behind() -> None:
    """Everything a stream made is freed when it ends, not at the next full collection: on
    asyncio a task that anyio cancels leaves a cycle that holds the event loop's frame, and
    with it whatever that frame referenced (other requests' connections among them)."""
    import gc

    from durable_asgi._producer import Producer

    app = StreamApp()
    mw = durable(app)
    await call(mw, "/s", headers=KEY)  # the first stream also makes what stays (the store, ...)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        first = await call(mw, "/s", headers={"Durable-Key": "k2"})
        resumed = await call(mw, "/s", headers={"Durable-Key": "k2"})
        gc.collect()
        # Ours only: under load another test's server thread may leave garbage of its own
        # (a CancelledError, anyio's WouldBlock) that this collection also finds.
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, Producer) or _raised_in_us(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert first.body == resumed.body == BODY
    assert left == []


def _raised_in_us(obj: object) -> bool:
    """An exception whose traceback passes through durable_asgi's code."""
    if not isinstance(obj, BaseException):
        return False
    tb = obj.__traceback__
    while tb is not None:
        if "durable_asgi" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_clients_that_leave_mid_stream_leave_no_reference_cycle_behind() -> None:
    """The same when the first client and a resumer leave before the end: their readers stop
    through cancel scopes of their own, never by anyio cancelling a task from its group."""
    import gc

    from durable_asgi._producer import Producer

    paused, release = anyio.Event(), anyio.Event()
    finished = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal finished
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        paused.set()
        await release.wait()
        await send({"type": "http.response.body", "body": b"second"})
        finished += 1

    mw = durable(app)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def first() -> None:
                result = await call(mw, "/s", headers=KEY, disconnect_after=1)
                results.append(result)

            tg.start_soon(first)
            await paused.wait()
            results.append(await call(mw, "/s", headers=KEY, disconnect_after=1))
            await anyio.wait_all_tasks_blocked()
            release.set()
        gc.collect()
        # Ours only: what other tests left running in this process (anyio's worker threads,
        # say) may leave exceptions in cycles of their own meanwhile.
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, Producer) or _raised_in_us(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert [r.disconnected for r in results] == [True, True]
    assert [r.body for r in results] == [b"first", b"first"]
    assert finished == 1
    assert left == []


async def test_a_first_client_that_stops_reading_does_not_hold_the_stream_open() -> None:
    """The stream is done (final, no longer this process's to abort or shut down) when its
    handler and the store are, however far its first client has read; and cancelling that
    client's request stops its reader (the handler's task group is shielded, the reader's not)."""
    app = StreamApp()
    mw = durable(app)
    head_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal head_sent
        if not head_sent:
            head_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await anyio.sleep_forever()  # the client stopped reading after the head

    scope = http_scope("/s", headers={"Durable-Key": "k1"})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, scope, receive, send)
            await anyio.wait_all_tasks_blocked()
            assert app.finished == 1
            assert mw.engine.producers == {}
            status = await mw.status("k1", namespace="/s")
            assert status is not None and status["state"] == "complete"
            tg.cancel_scope.cancel()  # the request is cancelled: its stuck reader must go
    assert app.calls == 1
