"""durablefetch's URL proxy (mode 1) end to end: a real upstream on uvicorn, the proxy on
another, and clients that really hang up. Bodies are compared byte for byte with what the
upstream sends; upstream calls are counted."""

from __future__ import annotations

import json
import socket

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from durable_asgi.proxy import DurableProxy

from ..support.apps import wait_thread_event
from ..support.servers import IncompleteBody, fetch, open_stream
from .harness import Serve, cors
from .upstream import sse_body, sse_event

pytestmark = pytest.mark.anyio

memory_only = pytest.mark.parametrize("store", ["memory"], indirect=True)


async def test_cut_mid_stream_then_fetch_again_gives_the_same_bytes_and_one_upstream_call(
    serve: Serve,
) -> None:
    with serve() as s:
        path = s.path("/sse?chat=1")
        async with open_stream(s.url, path) as first:
            assert first.status == 200
            assert (first.header("content-type") or "").startswith("text/event-stream")
            assert first.header("durable-state") == "running"
            assert first.header("durable-replay") is None
            assert first.header("access-control-allow-origin") == "*"
            received = await first.read_exactly(len(sse_event(0)) + len(sse_event(1)))
        # The client is gone: the upstream goes on to its end, once.
        await wait_thread_event(s.origin.finished)
        assert not s.origin.stopped.is_set()

        # Joins the stream if the proxy hasn't stored its end yet, else replays it.
        whole = await fetch(s.url, path)
        assert whole.complete and whole.body == sse_body()
        assert received == sse_body(2)
        assert whole.header("durable-replay") == "true"
        replay = await fetch(s.url, path)
        assert replay.complete and replay.body == sse_body()
        assert replay.header("durable-state") == "complete"
        assert replay.header("content-length") == str(len(sse_body()))
        assert cors(replay)

        rest = await fetch(s.url, path, headers={"Durable-Offset": str(len(received))})
        assert rest.complete and received + rest.body == sse_body()
        assert s.origin.calls["/sse"] == 1


async def test_a_concurrent_request_joins_the_running_stream(serve: Serve) -> None:
    with serve() as s:
        path = s.path("/sse?pause=3")
        async with open_stream(s.url, path) as first:
            head = await first.read_exactly(len(sse_body(3)))
            await wait_thread_event(s.origin.paused)
            async with open_stream(s.url, path) as second:
                assert second.status == 200
                assert second.header("durable-replay") == "true"
                assert second.header("durable-state") == "running"
                assert await second.read_exactly(len(head)) == head
                s.origin.release.set()
                assert head + await first.read_all() == sse_body()
                assert head + await second.read_all() == sse_body()
        assert s.origin.calls["/sse"] == 1


async def test_in_progress_while_running_and_after(serve: Serve) -> None:
    with serve() as s:
        target = "/sse?pause=2&chat=ip"
        assert await s.in_progress(target) == {
            "inProgress": False,
            "activeConnections": 0,
            "chunksStored": 0,
            "completed": False,
        }
        async with open_stream(s.url, s.path(target)) as first:
            await first.read_exactly(len(sse_body(2)))
            await wait_thread_event(s.origin.paused)
            # The first client is counted in, and the bytes stored, just after they are sent.
            status = await s.until_in_progress(
                target, lambda st: st["chunksStored"] >= 1 and st["activeConnections"] == 1
            )
            assert status["inProgress"] is True and status["completed"] is False
            s.origin.release.set()
            assert sse_body(2) + await first.read_all() == sse_body()
        after = await s.in_progress(target)
        assert after["inProgress"] is False and after["completed"] is True
        assert 1 <= after["chunksStored"] <= 20
        # The key is the normalized URL: another spelling of it names the same stream.
        code, upper = await s.control("in-progress", {"url": "HTTP" + s.upstream[4:] + target})
        assert code == 200 and upper["completed"] is True
        assert upper["chunksStored"] == after["chunksStored"]


async def test_delete_during_a_stream_stops_the_upstream(serve: Serve) -> None:
    with serve() as s:
        target = "/sse?pause=2"
        async with open_stream(s.url, s.path(target)) as first:
            await first.read_exactly(len(sse_body(2)))
            await wait_thread_event(s.origin.paused)
            answer = await s.control("delete", {"url": s.upstream + target})
            assert answer == (200, {"success": True, "message": "Response deleted successfully"})
            # The proxy hung up on the upstream, which saw its client leave.
            await wait_thread_event(s.origin.stopped)
            with pytest.raises(IncompleteBody):
                await first.read_all()
        assert s.origin.sent == 2 and not s.origin.finished.is_set()
        assert (await s.in_progress(target))["chunksStored"] == 0
        again = await s.control("delete", {"url": s.upstream + target})
        assert again == (200, {"success": True, "message": "Nothing stored for this URL"})

        s.origin.release.set()
        fresh = await fetch(s.url, s.path(target))
        assert fresh.complete and fresh.body == sse_body()
        assert fresh.header("durable-replay") is None
        assert s.origin.calls["/sse"] == 2


async def test_non_2xx_is_passed_through_and_not_kept(serve: Serve) -> None:
    with serve() as s:
        for calls in (1, 2):
            result = await fetch(s.url, s.path("/status/404"))
            assert (result.status, result.body, result.complete) == (404, b"status 404", True)
            assert result.header("durable-replay") is None and cors(result)
            assert s.origin.calls["/status/404"] == calls
            # Whole on the wire (Content-Length) just before the proxy records its end.
            status = await s.until_in_progress("/status/404", lambda st: not st["inProgress"])
            assert status["completed"] is False


async def test_upstream_crashing_mid_body_leaves_the_stream_failed(serve: Serve) -> None:
    with serve() as s:
        target = "/sse?fail=3"
        first = await fetch(s.url, s.path(target))
        assert first.status == 200
        assert not first.complete and first.body == sse_body(3)  # cut short, never clean
        assert await s.state(target) == "failed"
        replay = await fetch(s.url, s.path(target), headers={"Durable-Offset": "0"})
        assert not replay.complete and replay.body == sse_body(3)
        assert replay.header("durable-state") == "failed"
        assert s.origin.calls["/sse"] == 1
        # A failed stream is fetched again.
        second = await fetch(s.url, s.path(target))
        assert not second.complete and s.origin.calls["/sse"] == 2


@memory_only
async def test_upstream_sending_garbage_leaves_the_stream_failed(serve: Serve) -> None:
    with serve() as s:
        result = await fetch(s.url, s.path("/garbage"))
        assert result.status == 200 and not result.complete
        assert await s.state("/garbage") == "failed"


@memory_only
async def test_upstream_larger_than_max_response_bytes_is_stopped_and_failed(
    serve: Serve,
) -> None:
    with serve(max_response_bytes=100) as s:
        result = await fetch(s.url, s.path("/sse"))
        assert not result.complete and sse_body().startswith(result.body)
        assert len(result.body) <= 100
        await wait_thread_event(s.origin.stopped)
        assert await s.state("/sse") == "failed"


@memory_only
async def test_upstream_timeout_is_504_and_not_kept(serve: Serve) -> None:
    with serve(timeout=0.3) as s:
        for calls in (1, 2):
            result = await fetch(s.url, s.path("/hang"))
            assert result.status == 504 and cors(result)
            assert "did not answer in time" in json.loads(result.body)["error"]
            assert s.origin.calls["/hang"] == calls
            await s.until_in_progress("/hang", lambda st: not st["inProgress"])


@memory_only
async def test_refused_connection_is_502(serve: Serve) -> None:
    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with serve(allow=["http://127.0.0.1:*/**"]) as s:
            result = await fetch(s.url, f"/127.0.0.1:{port}/sse")
    assert result.status == 502 and cors(result)
    assert json.loads(result.body)["upstream"] == f"http://127.0.0.1:{port}/sse"


@memory_only
async def test_disallowed_and_self_are_403(serve: Serve) -> None:
    with serve(allow=["http://127.0.0.1:*/**", "http://localhost:*/**"]) as s:
        port = s.url.rsplit(":", 1)[1]
        for target in ("/example.com/x", f"/127.0.0.1:{port}/sse", f"/localhost:{port}/sse"):
            result = await fetch(s.url, target)
            assert result.status == 403 and cors(result), target
        assert "itself" in json.loads(result.body)["error"]
        assert sum(s.origin.calls.values()) == 0


BAD_REQUESTS = [
    # (method, target, body, status, words in the error)
    ("POST", "/", b"", 400, "missing upstream host"),
    ("GET", "//sse", b"", 400, "missing upstream host"),
    ("GET", "/user@{up}/sse", b"", 400, "malformed upstream host"),
    ("GET", "/127.0.0.1:99999/sse", b"", 400, "malformed upstream host"),
    ("GET", "/{up}/a/../sse", b"", 400, "'..' segment"),
    ("GET", "/{up}/a%2Fsse", b"", 400, "encoded slash"),
    ("PUT", "/{up}/sse", b"", 405, "PUT is not proxied"),
    ("POST", "/{up}/echo", b"x" * 2000, 413, "max_request_body"),
    ("POST", "/in-progress", b"not json", 400, '{"url"'),
    ("POST", "/in-progress", b'{"nourl": 1}', 400, '{"url"'),
    ("POST", "/delete", b'{"url": 7}', 400, '{"url"'),
    ("POST", "/delete", b'{"url": "ftp://{up}/sse"}', 400, "only http and https"),
    ("POST", "/in-progress", b'{"url": "https://elsewhere.test/"}', 403, "allowlist"),
    ("POST", "/in-progress", b"y" * 2000, 413, "max_request_body"),
]


@memory_only
async def test_bad_input_gets_a_clear_4xx_and_reaches_no_upstream(serve: Serve) -> None:
    with serve(max_request_body=1000) as s:
        up = s.upstream.removeprefix("http://")
        for method, target, body, status, words in BAD_REQUESTS:
            target, body = target.replace("{up}", up), body.replace(b"{up}", up.encode())
            result = await fetch(s.url, target, method=method, body=body)
            assert result.status == status and cors(result), (method, target)
            assert words in json.loads(result.body)["error"], (method, target)
        assert sum(s.origin.calls.values()) == 0


@memory_only
async def test_options_is_204_with_cors_and_root_redirects_to_the_docs(serve: Serve) -> None:
    with serve(docs_url="https://docs.example/proxy") as s:
        for target in ("/", "/anything/at/all", "/in-progress"):
            preflight = await fetch(s.url, target, method="OPTIONS")
            assert preflight.status == 204 and cors(preflight)
            assert "POST" in (preflight.header("access-control-allow-methods") or "")
        root = await fetch(s.url, "/")
        assert root.status == 307 and cors(root)
        assert root.header("location") == "https://docs.example/proxy"


@memory_only
async def test_headers_are_forwarded_without_hop_by_hop_ones(serve: Serve) -> None:
    with serve() as s:
        headers = {
            "Connection": "close, X-Hop",
            "X-Hop": "only for the next hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eDp5",
            "Accept-Encoding": "br",
            "Authorization": "Bearer secret",
            "X-Test": "kept",
        }
        result = await fetch(
            s.url, s.path("/echo"), method="POST", headers=headers, body=b'{"q": 1}'
        )
        assert result.complete and result.status == 200
        seen = json.loads(result.body)
        sent = dict(seen["headers"])
        assert (seen["method"], seen["body"]) == ("POST", '{"q": 1}')
        assert sent["host"] == s.upstream.removeprefix("http://")
        assert sent["x-test"] == "kept" and sent["authorization"] == "Bearer secret"
        assert not {"x-hop", "keep-alive", "te", "proxy-authorization"} & set(sent)
        assert "br" not in sent["accept-encoding"]  # what the proxy decodes, not the client's

        answer = await fetch(s.url, s.path("/headers"))
        assert answer.header("x-kept") == "1" and answer.header("set-cookie") == "session=1"
        assert [v for k, v in answer.headers if k == "cache-control"] == ["no-store"]
        assert [k for k, _ in answer.headers].count("date") == 1  # the proxy's own, not stored
        assert [v for k, v in answer.headers if k == "access-control-allow-origin"] == ["*"]
        replay = await fetch(s.url, s.path("/headers"))
        assert replay.header("durable-replay") == "true" and replay.body == b"ok"
        assert replay.header("set-cookie") is None  # never stored
        assert [v for k, v in replay.headers if k == "access-control-allow-origin"] == ["*"]


@memory_only
async def test_a_compressed_upstream_is_relayed_decoded(serve: Serve) -> None:
    with serve() as s:
        for replayed in (None, "true"):
            result = await fetch(s.url, s.path("/gzip"))
            assert result.complete and result.body == sse_body()
            assert result.header("content-encoding") is None
            assert result.header("durable-replay") == replayed
        assert s.origin.calls["/gzip"] == 1


@memory_only
async def test_mounted_under_a_prefix(serve: Serve) -> None:
    def mount(proxy: DurableProxy) -> Starlette:
        return Starlette(routes=[Mount("/df", app=proxy)], lifespan=proxy.lifespan)

    with serve(mount=mount, docs_url="https://docs.example/proxy") as s:
        path = "/df" + s.path("/sse?chat=mounted")
        async with open_stream(s.url, path) as first:
            received = await first.read_exactly(len(sse_body(1)))
        await wait_thread_event(s.origin.finished)
        whole = await fetch(s.url, path)
        assert whole.complete and whole.body == sse_body() and received == sse_body(1)
        status = await s.in_progress("/sse?chat=mounted", prefix="/df")
        assert status["completed"] is True
        root = await fetch(s.url, "/df/")
        assert root.status == 307 and root.header("location") == "https://docs.example/proxy"
        deleted = await s.control("delete", {"url": s.upstream + "/sse?chat=mounted"}, "/df")
        assert deleted[1]["message"] == "Response deleted successfully"
        assert s.origin.calls["/sse"] == 1
    # The host app ran the proxy's lifespan: the upstream client is closed.
    assert s.proxy.relay._client is None
