"""The unmodified npm ``durablefetch@0.1.0`` client, driven from Node, against the proxy.

The client is used as its README shows, ``new DurableFetchClient({ durablefetchHost })``, and
is not patched. Two things in it shape the setup (``dist/sdk.js``):

- it bypasses itself (a plain ``fetch``) for ``localhost`` and ``127.0.0.1`` upstreams, so the
  upstream listens on another loopback address, 127.0.0.2;
- ``df.fetch(url)`` keeps the upstream URL's scheme and swaps its host for the proxy's, while
  ``isInProgress``/``delete`` always speak ``https://{durablefetchHost}``: the proxy and the
  upstream both serve HTTPS, with certificates of a test CA (`trustme`) that Node trusts
  through ``NODE_EXTRA_CA_CERTS`` and the proxy's relay through ``DurableProxy(verify=)``.

Each test runs on memory, SQLite and Redis; bodies are compared byte for byte with what the
upstream (`Origin`) sends, and its calls and events are counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from durable_asgi import Store
from durable_asgi.proxy import DurableProxy

from ..support.apps import wait_thread_event
from ..support.servers import running_server
from ..support.tls import Certificates
from .npm_clients import DurableFetch, require_node
from .upstream import Origin, sse_body

pytestmark = pytest.mark.anyio

UPSTREAM_HOST = "127.0.0.2"  # not 127.0.0.1 nor localhost, which the client bypasses


@dataclass
class TLSSetup:
    """The upstream on https://127.0.0.2, the proxy in front of it on https://127.0.0.1."""

    origin: Origin
    upstream: str
    """The origin's base URL, ``https://127.0.0.2:<port>``."""
    proxy_host: str
    """The proxy's ``host:port``: the client's ``durablefetchHost``."""
    certs: Certificates


@pytest.fixture
def setup(store: Store, certs: Certificates) -> Iterator[TLSSetup]:
    require_node()  # before starting servers: skips (fails in CI) without node or the packages
    origin = Origin()
    with running_server(origin, host=UPSTREAM_HOST, tls=certs.server) as upstream:
        proxy = DurableProxy(allow=[f"{upstream.url}/**"], store=store, verify=certs.ca)
        with running_server(proxy, tls=certs.server) as server:
            yield TLSSetup(origin, upstream.url, f"{server.host}:{server.port}", certs)


@contextlib.asynccontextmanager
async def client(s: TLSSetup) -> AsyncIterator[DurableFetch]:
    """The client in a node process; afterwards, it must not have bypassed the proxy."""
    async with DurableFetch(s.proxy_host, s.certs.ca) as df:
        yield df
    assert "bypassed" not in df.stderr, df.stderr


async def until(
    df: DurableFetch, url: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """``df.isInProgress(url)`` once `done` holds of it: the proxy records reader counts and
    stored chunks just after the client sees them, and no event tells when."""
    with anyio.fail_after(10):
        while True:
            status = await df.is_in_progress(url)
            if done(status):
                return status
            await anyio.sleep(0.01)


async def test_cut_mid_stream_then_fetch_again_gives_the_same_bytes_and_one_upstream_call(
    setup: TLSSetup,
) -> None:
    s = setup
    url = f"{s.upstream}/sse?pause=3&chat=cut"
    async with client(s) as df:
        head = await df.open("first", url)
        assert head.status == 200
        assert (head.header("content-type") or "").startswith("text/event-stream")
        assert head.header("durable-state") == "running"  # the proxy answered, not the origin
        assert head.header("access-control-allow-origin") == "*"
        first = await df.read("first", until=len(sse_body(2)))
        await wait_thread_event(s.origin.paused)  # mid-stream: 3 of 20 events sent
        await until(df, url, lambda st: st["activeConnections"] == 1)
        await df.abort("first")
        # The proxy saw the client go (counted out) while the upstream still runs.
        await until(df, url, lambda st: st["activeConnections"] == 0)
        assert (await df.is_in_progress(url))["inProgress"] is True
        s.origin.release.set()
        await wait_thread_event(s.origin.finished)  # the upstream went on to its end
        assert not s.origin.stopped.is_set()

        # Joins the stream if the proxy hasn't stored its end yet, else replays it.
        again = await df.fetch(url)
        await until(df, url, lambda st: st["completed"])
        replay = await df.fetch(url)
    assert again.ok and again.done and again.status == 200
    assert again.received == sse_body()  # identical bytes, whole
    assert again.received.startswith(first.received)  # the cut one was a prefix of it
    assert len(sse_body(2)) <= len(first.received) <= len(sse_body(3))
    assert again.header("durable-replay") == "true"
    assert again.header("durable-state") in ("running", "complete")
    assert replay.ok and replay.done and replay.received == sse_body()
    assert replay.header("durable-state") == "complete"
    assert replay.header("content-length") == str(len(sse_body()))
    assert s.origin.calls["/sse"] == 1


async def test_is_in_progress_while_running_and_after_it_completed(setup: TLSSetup) -> None:
    s = setup
    url = f"{s.upstream}/sse?pause=2&chat=ip"
    async with client(s) as df:
        assert await df.is_in_progress(url) == {
            "inProgress": False,
            "activeConnections": 0,
            "chunksStored": 0,
            "completed": False,
        }
        await df.open("first", url)
        await df.read("first", until=len(sse_body(2)))
        await wait_thread_event(s.origin.paused)
        running = await until(
            df, url, lambda st: st["activeConnections"] == 1 and st["chunksStored"] >= 1
        )
        assert running["inProgress"] is True and running["completed"] is False

        s.origin.release.set()
        rest = await df.rest("first")
        assert rest.ok and rest.done and rest.received == sse_body()
        after = await df.is_in_progress(url)
    assert after["inProgress"] is False and after["completed"] is True
    assert 1 <= after["chunksStored"] <= 20
    assert s.origin.calls["/sse"] == 1


async def test_delete_during_a_stream_stops_the_upstream_and_the_next_fetch_runs_it_again(
    setup: TLSSetup,
) -> None:
    s = setup
    url = f"{s.upstream}/sse?pause=2&chat=delete"
    async with client(s) as df:
        await df.open("first", url)
        await df.read("first", until=len(sse_body(2)))
        await wait_thread_event(s.origin.paused)

        assert await df.delete(url) == {"success": True, "message": "Response deleted successfully"}
        # The proxy hung up on the upstream, which saw its client leave, and produced no more.
        await wait_thread_event(s.origin.stopped)
        cut = await df.rest("first")
        assert not cut.ok and cut.received == sse_body(2), cut.error  # ended abnormally
        assert s.origin.sent == 2 and not s.origin.finished.is_set()
        assert (await df.is_in_progress(url))["chunksStored"] == 0
        again = await df.delete(url)
        assert again == {"success": True, "message": "Nothing stored for this URL"}

        s.origin.release.set()  # the next run doesn't pause
        fresh = await df.fetch(url)
    assert fresh.ok and fresh.done and fresh.received == sse_body()
    assert fresh.header("durable-replay") is None  # it ran the upstream again
    assert s.origin.calls["/sse"] == 2 and s.origin.sent == 22
