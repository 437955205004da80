"""Fault suite: clients leaving at random points, handlers raising, SIGTERM, readers that stall.

Every case is bounded in time (``call``/``fetch`` timeouts, ``fail_after``): a failure is a
failure, never a hang. kill -9 of the producing worker and Redis restarts live in
``tests/integrations/test_multiprocess.py``.

CI runs a small budget of hypothesis examples. For a soak run::

    DURABLE_ASGI_SOAK=1 pytest tests/stores/test_faults.py tests/engine/test_bad_input.py

(``DURABLE_ASGI_SOAK=<n>`` multiplies the example counts by n; 1 means x20.)
"""

from __future__ import annotations

import contextlib
import gc
import signal
import socket
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_asgi import DurableMiddleware, MemoryStore
from durable_asgi._types import Receive, Scope, Send

from ..support.apps import StreamApp, wait_thread_event
from ..support.asgi import call
from ..support.servers import IncompleteBody, fetch, open_stream, running_server
from ..support.soak import examples, soak_factor
from ..support.stores import StoreFactory

pytestmark = pytest.mark.anyio


FAST = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    derandomize=not soak_factor(),  # CI is reproducible; soak explores
)


def http_only(app: Any) -> Any:
    """`app`, refusing lifespan (as Django does), so the middleware opens and closes the store
    itself. `StreamApp` returns silently for lifespan, which skips that."""

    async def only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        await app(scope, receive, send)

    return only


class Router:
    """One app per hypothesis example, addressed by path, behind one middleware (one store)."""

    def __init__(self) -> None:
        self.apps: dict[str, StreamApp] = {}
        self.count = 0

    def add(self, app: StreamApp) -> str:
        self.count += 1
        path = f"/e{self.count}"
        self.apps[path] = app
        return path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.apps[scope["path"]](scope, receive, send)


@pytest.fixture
async def routed(stores: StoreFactory) -> tuple[Router, DurableMiddleware]:
    """A middleware over a `Router` on the test's store; shared by all hypothesis examples."""
    router = Router()
    store = await stores.new(opened=False)
    mw = DurableMiddleware(router, store=store, lease_seconds=2.0, poll_interval=0.05)
    await mw.engine.ensure_open()
    return router, mw


chunk_lists = st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=25)


# -- random disconnects, in process -----------------------------------------------------------


@settings(FAST, max_examples=examples(30))
@given(
    chunks=chunk_lists,
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    delay=st.sampled_from([0.0, 0.0, 0.002]),
)
async def test_random_disconnects_then_resumes_rebuild_the_bare_body(
    routed: tuple[Router, DurableMiddleware], chunks: list[bytes], cuts: list[float], delay: float
) -> None:
    """A client leaves at random points and resumes from the offset it reached, again and
    again: the bytes it collects are exactly the bare body, and the handler ran once."""
    router, mw = routed
    app = StreamApp(chunks, delay=delay)
    path = router.add(app)
    bare = app.body
    got = b""
    for cut in cuts:
        headers = {"Durable-Key": "k"}
        if got:
            headers["Durable-Offset"] = str(len(got))
        leave_at = max(1, int(cut * (len(bare) - len(got))))
        result = await call(mw, path, headers=headers, disconnect_after=leave_at)
        assert result.status == 200
        assert result.headers["durable-offset"] == str(len(got))
        got += result.body
        assert bare.startswith(got)
        if result.complete:
            break
    if len(got) < len(bare):
        final = await call(mw, path, headers={"Durable-Key": "k", "Durable-Offset": str(len(got))})
        assert final.complete, "a resume of a running/complete stream must end cleanly"
        got += final.body
    assert got == bare
    replay = await call(mw, path, headers={"Durable-Key": "k"})
    assert replay.complete and replay.body == bare
    assert replay.headers["durable-replay"] == "true"
    assert app.calls == 1


@settings(FAST, max_examples=examples(15))
@given(chunks=chunk_lists, data=st.data(), follower_offset=st.floats(0.0, 1.0))
async def test_handler_raising_at_random_points(
    routed: tuple[Router, DurableMiddleware],
    chunks: list[bytes],
    data: st.DataObject,
    follower_offset: float,
) -> None:
    """The handler raises after a random number of chunks: readers get exactly the bytes sent
    before it, never a clean end; the stream is ``failed``; the next request reruns it."""
    router, mw = routed
    fail_at = data.draw(st.integers(0, len(chunks) - 1), label="fail_at")
    app = StreamApp(chunks, fail_at=fail_at, pause_at=fail_at)
    path = router.add(app)
    sent = b"".join(chunks[:fail_at])
    key = {"Durable-Key": "k"}
    results: dict[str, Any] = {}

    async def first() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            results["first"] = await call(mw, path, headers=key)

    async def follower() -> None:
        offset = int(follower_offset * len(sent))
        headers = {**key, "Durable-Offset": str(offset)} if offset else key
        results["follower"] = (offset, await call(mw, path, headers=headers))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            await wait_thread_event(app.paused)
            await anyio.sleep(0.02)  # let the writer store what was sent
            tasks.start_soon(follower)
            await anyio.sleep(0.02)
            app.release.set()
    offset, seen = results["follower"]
    assert seen.status == 200 and not seen.complete
    assert seen.body == sent[offset:]
    status = await mw.status("k", namespace=path)
    assert status is not None and status["state"] == "failed"
    assert status["offset"] == len(sent)
    # A replay of a failed stream is not served: the next request runs the handler again.
    app.fail_at = app.pause_at = None
    again = await call(mw, path, headers=key)
    assert again.complete and again.body == app.body
    assert app.calls == 2


# -- random disconnects through a real server ----------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_real_server_disconnects_and_resumes(kind: str, tmp_path: Path) -> None:
    """Fewer cases, real sockets: the client closes its TCP connection mid-body at random points
    (including while the handler still runs), then resumes from the offset it reached."""
    import random

    from durable_asgi.stores.sqlite import SQLiteStore

    rng = random.Random(6)
    router = Router()
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "d.db")
    mw = DurableMiddleware(http_only(router), store=store, poll_interval=0.05)
    cases = examples(6)
    with running_server(mw) as server:
        for case in range(cases):
            chunks = [
                bytes([65 + i % 26]) * rng.randint(1, 3000) for i in range(rng.randint(2, 40))
            ]
            app = StreamApp(chunks, delay=rng.choice([0.0, 0.002]))
            path = router.add(app)
            key = {"Durable-Key": f"real-{case}"}
            got = b""
            for _ in range(rng.randint(1, 3)):
                headers = {**key, "Durable-Offset": str(len(got))} if got else key
                async with open_stream(server.url, path, headers=headers) as response:
                    assert response.status == 200
                    want = rng.randint(1, max(1, len(app.body) - len(got)))
                    try:
                        got += await response.read_exactly(want)
                    except (anyio.IncompleteRead, IncompleteBody):
                        pytest.fail("the body ended before the bytes that exist")
                    await response.disconnect()
                if len(got) == len(app.body):
                    break
            rest = await fetch(server.url, path, headers={**key, "Durable-Offset": str(len(got))})
            assert rest.complete, rest
            assert got + rest.body == app.body
            assert app.calls == 1


# -- SIGTERM with streams in flight --------------------------------------------------------------


@pytest.fixture
def fault_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "fault.db"
    monkeypatch.setenv("FAULT_DB", str(db))
    monkeypatch.setenv("FAULT_CHUNKS", "400")
    monkeypatch.setenv("FAULT_DELAY", "0.025")  # ~10 s of stream: SIGTERM lands mid-way
    return db


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sigterm_with_streams_in_flight_ends_them_in_a_defined_state(
    fault_env: Path,
) -> None:
    """SIGTERM a uvicorn worker while streams run: every reader ends within bounded time —
    complete or visibly truncated — the server exits, and after a restart no stream is left
    ``running``: each is ``complete`` or ``failed`` and a new request for it gets a defined
    answer."""
    from ..support.fault_apps import chunk

    whole = b"".join(chunk(i) for i in range(400))
    outcomes: list[tuple[str, bytes]] = []
    with running_server("tests.support.fault_apps:slow", shutdown_timeout=6.0) as server:
        assert server.process is not None

        async def reader(key: str) -> None:
            async with open_stream(server.url, "/s", headers={"Durable-Key": key}) as response:
                try:
                    outcomes.append(("complete", await response.read_all()))
                except IncompleteBody as exc:
                    outcomes.append(("truncated", exc.body))
                except (ConnectionError, OSError):
                    outcomes.append(("reset", b""))

        started = time.monotonic()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                for i in range(6):
                    tasks.start_soon(reader, f"k{i % 3}")  # 3 streams, 2 readers each
                await anyio.sleep(1.0)
                server.process.send_signal(signal.SIGTERM)
        ended = time.monotonic() - started
        exited = await anyio.to_thread.run_sync(server.process.wait, 10)
    assert exited is not None
    assert len(outcomes) == 6
    for outcome, body in outcomes:
        assert whole.startswith(body)
        if outcome == "complete":
            assert body == whole
        else:
            assert len(body) < len(whole)
    assert ended < 15

    # Restart on the same database: nothing stays running; truncated streams rerun.
    with running_server("tests.support.fault_apps:slow") as server:
        deadline = time.monotonic() + 6  # lease (1 s) + poll slack
        for i in range(3):
            while True:
                status = await fetch(
                    server.url, "/s", headers={"Durable-Key": f"k{i}", "Durable-Control": "status"}
                )
                state = status.header("durable-state")
                if state != "running" or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.2)
            assert state in ("complete", "failed", "aborted", "absent"), state


# -- a reader that never reads ---------------------------------------------------------------


def stalled_reader(port: int, path: str, key: str) -> socket.socket:
    """A client that sends its request and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nDurable-Key: {key}\r\nConnection: close\r\n"
    sock.sendall(request.encode() + b"\r\n")
    return sock


BIG = [bytes([i % 251]) * 65536 for i in range(256)]  # 16 MiB


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_reader_that_never_reads_slows_nobody_and_holds_no_copy(
    kind: str, tmp_path: Path
) -> None:
    """Three clients stop reading right after their request. The handler still runs in about
    its own time, another reader gets the whole body, and the server's Python heap grows by
    about one copy of the body at most (the memory store's) — no per-reader buffers."""
    from durable_asgi.stores.sqlite import SQLiteStore

    app = StreamApp(BIG, delay=0.002)  # ~0.5 s of handler time on its own
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "d.db")
    mw = DurableMiddleware(http_only(app), store=store)
    body = app.body
    gc.collect()
    tracemalloc.start()
    try:
        with running_server(mw) as server:
            base = tracemalloc.get_traced_memory()[0]
            sockets = []
            try:
                started = time.monotonic()
                sockets = [stalled_reader(server.port, "/big", "big") for _ in range(3)]
                await wait_thread_event(app.ended, timeout=30)
                handler_time = time.monotonic() - started
                await anyio.sleep(0.2)  # the stalled readers have filled their buffers
                # Measured before the next reader, whose client (in this process) holds the body.
                peak = tracemalloc.get_traced_memory()[1] - base
                tracemalloc.stop()
                other = await fetch(server.url, "/big", headers={"Durable-Key": "big"}, timeout=30)
                assert other.complete and other.body == body
            finally:
                for sock in sockets:
                    with contextlib.suppress(OSError):
                        sock.close()
    finally:
        tracemalloc.stop()
    assert app.calls == 1
    # The handler sleeps 256 x 2 ms; the store (and tracemalloc) add to that, readers must not.
    assert handler_time < 15, handler_time
    copies = 1.6 if kind == "memory" else 0.6  # memory keeps the body itself; SQLite on disk
    assert peak < copies * len(body), f"heap peak grew {peak / len(body):.2f}x the body"
