"""OpenTelemetry through real servers, with the real SDK: every instrument of
``docs/operations.md`` moves as documented for complete, failed, aborted, resumed, joined and
refused streams on every store (memory, SQLite, Redis, PostgreSQL); a resume on a second
worker links to the producer's span; keys never become attributes; and without OpenTelemetry
the package runs unchanged.

The SDK is passed to the middleware (``meter_provider=``, ``tracer_provider=``), never set
globally, so tests don't see each other's data. The servers run in threads of this process and
report when their request tasks end, after the client has its last byte: `eventually` waits for
a metric to reach its value (bounded), it never stands in for an event.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from durable_asgi import DurableMiddleware, MemoryStore, Store
from durable_asgi._telemetry import stream_hash
from durable_asgi._types import Message, Receive, Scope, Send
from durable_asgi.exceptions import StoreError
from durable_asgi.stores import stream_id

from ..support.apps import StreamApp, wait_thread_event
from ..support.asgi import call
from ..support.servers import IncompleteBody, fetch, open_stream, running_server
from ..support.stores import store_makers

pytestmark = pytest.mark.anyio

NAMESPACE = "chat"
EVENTS = [b"data: token %02d\n\n" % i for i in range(20)]
SSE = [(b"content-type", b"text/event-stream")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client side; the servers run their own loops


@dataclass
class Otel:
    """The real SDK, in memory: a meter provider with an in-memory reader, a tracer provider
    with an in-memory exporter."""

    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    def __post_init__(self) -> None:
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def providers(self) -> dict[str, Any]:
        return {"meter_provider": self.meter_provider, "tracer_provider": self.tracer_provider}

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            point
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def value(self, name: str, **attributes: Any) -> float:
        """The sum (or, for a histogram, the count) of `name`'s points with `attributes`."""
        wanted = {
            k if k.startswith(("http.", "error.")) else f"durable_asgi.{k}": v
            for k, v in attributes.items()
        }
        total = 0.0
        for point in self.points(name):
            if wanted.items() <= dict(point.attributes).items():
                total += point.count if hasattr(point, "count") else point.value
        return total

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until `check()` holds (a server thread records after its client got the last byte)."""
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - another thread's state, no event to wait on
            await anyio.sleep(0.01)


REDIS = pytest.param("redis", marks=pytest.mark.redis)
POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)


@pytest.fixture(params=["memory", "sqlite", REDIS, POSTGRES])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Makes stores of one kind that share their data (memory: one store, made once)."""
    yield from store_makers(request, tmp_path)


@pytest.fixture(params=["sqlite", REDIS, POSTGRES])
def make_shared_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Store]]:
    """Makes stores of one kind shared between workers (processes, machines)."""
    yield from store_makers(request, tmp_path)


def durable(app: Any, store: Store, otel: Otel, **options: Any) -> DurableMiddleware:
    options = {"namespace": NAMESPACE, "sse_ids": True, **options}
    return DurableMiddleware(app, store=store, **otel.providers, **options)


async def test_every_instrument_moves_for_each_outcome(
    make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
) -> None:
    otel = Otel()
    store = make_store()
    kind = type(store).__name__.removesuffix("Store").lower()
    app = StreamApp(EVENTS, headers=SSE)
    body = app.body
    caplog.set_level(logging.INFO, "durable_asgi")
    with running_server(durable(app, store, otel, max_request_body=64)) as server:
        url = server.url

        async def get(key: str, **headers: str) -> Any:
            return await fetch(url, "/s", headers={"Durable-Key": key, **headers})

        # complete, then joined (same key: replayed), resumed by offset and by Last-Event-ID
        assert (await get("done")).complete
        assert (await get("done")).header("durable-replay") == "true"
        assert (await get("done", **{"Durable-Offset": "16"})).complete
        assert (await get("done", **{"Last-Event-ID": "32"})).complete
        # refused: past the end, no stream, bad input, a body too large
        assert (await get("done", **{"Durable-Offset": "99999"})).status == 416
        assert (await get("never", **{"Durable-Offset": "0"})).status == 416
        assert (await get("bad", **{"Durable-Offset": "nope"})).status == 400
        large = await fetch(url, "/s", method="POST", headers={"Durable-Key": "x"}, body=b"x" * 65)
        assert large.status == 413

        # failed
        app.fail_at = 3
        failed = await get("fails")
        assert not failed.complete

        # aborted, while a second client follows it live (a join of a running stream)
        app.fail_at, app.pause_at = None, 5
        async with open_stream(url, "/s", headers={"Durable-Key": "cut"}) as first:
            await first.read_exactly(len(b"".join(EVENTS[:2])))
            await wait_thread_event(app.paused)
            async with open_stream(url, "/s", headers={"Durable-Key": "cut"}) as joiner:
                assert joiner.header("durable-replay") == "true"
                aborted = await fetch(
                    url, "/s", headers={"Durable-Key": "cut", "Durable-Control": "abort"}
                )
                assert aborted.status == 204
                app.release.set()
                with pytest.raises(IncompleteBody):
                    await joiner.read_all()
            with pytest.raises(IncompleteBody):
                await first.read_all()

        def value(name: str, **attributes: Any) -> float:
            return otel.value(f"durable_asgi.{name}", store=kind, **attributes)

        await eventually(lambda: value("resumes", **{"resume.kind": "join"}) == 2)
        await eventually(lambda: value("readers.live") == 0 and value("streams.live") == 0)

    assert value("streams.started", namespace=NAMESPACE) == 3
    assert value("streams.finished", state="complete") == 1
    assert value("streams.finished", state="failed", reason="handler_raised") == 1
    assert value("streams.finished", state="aborted", reason="aborted") == 1
    assert value("resumes", namespace=NAMESPACE, **{"resume.kind": "offset"}) == 1
    assert value("resumes", **{"resume.kind": "last_event_id"}) == 1
    assert value("resume.time_to_first_byte") == 4  # every resume and join sent a byte
    assert value("store.appended") == len(body) + 3 * len(EVENTS[0]) + 5 * len(EVENTS[0])
    served = len(body) + (len(body) - 16) + (len(body) - 32)
    assert value("store.served") >= served  # and what the joiner of "cut" got
    for operation in ("claim", "append_batch", "read", "finish"):
        assert value("store.duration", operation=operation) >= 1, operation
    for reason, status in (
        ("offset_out_of_range", 416),
        ("not_found", 416),
        ("bad_input", 400),
        ("body_too_large", 413),
    ):
        assert value("requests.refused", reason=reason, **{"http.response.status_code": status})
    assert value("leases.lost") == 0 and value("leases.renewals_failed") == 0

    # Spans: one per production, one per resume or join, each linked to its producer's.
    produced = {
        s.attributes["durable_asgi.stream.hash"]: s for s in otel.spans("durable_asgi produce")
    }
    done, fails = (
        stream_hash(stream_id(NAMESPACE, "done")),
        stream_hash(stream_id(NAMESPACE, "fails")),
    )
    assert set(produced) == {done, fails, stream_hash(stream_id(NAMESPACE, "cut"))}
    assert produced[done].attributes["durable_asgi.state"] == "complete"
    assert [e.name for e in produced[done].events] == ["head", "finished"]
    assert produced[fails].status.status_code is StatusCode.ERROR
    assert produced[fails].attributes["durable_asgi.reason"] == "handler_raised"
    resumes = otel.spans("durable_asgi resume")
    assert len(resumes) == 4
    for span in resumes:
        producer = produced[span.attributes["durable_asgi.stream.hash"]]
        assert [link.context.span_id for link in span.links] == [producer.context.span_id]
        assert span.links[0].context.trace_id == producer.context.trace_id

    # Logs: one structured record per state change that matters, with the same stream hash.
    records = {r.__dict__.get("event"): r.__dict__ for r in caplog.records}
    assert records["stream_failed"]["stream_hash"] == fails
    assert records["stream_failed"]["reason"] == "handler_raised"
    assert records["resume_refused"]["status"] == 416


async def test_a_resume_on_a_second_worker_links_to_the_producers_span(
    make_shared_store: Callable[[], Store],
) -> None:
    make_store = make_shared_store
    store = make_store()
    producing, resuming = Otel(), Otel()
    app = StreamApp(EVENTS, headers=SSE)
    with (
        running_server(durable(app, store, producing, sse_ids=False)) as a,
        running_server(durable(StreamApp(), make_store(), resuming, sse_ids=False)) as b,
    ):
        key = {"Durable-Key": "shared"}
        assert (await fetch(a.url, "/s", headers=key)).body == app.body
        resumed = await fetch(b.url, "/s", headers={**key, "Durable-Offset": "5"})
        assert resumed.complete and resumed.body == app.body[5:]
        await eventually(lambda: len(resuming.spans("durable_asgi resume")) == 1)
    (producer,) = producing.spans("durable_asgi produce")
    (resume,) = resuming.spans("durable_asgi resume")
    assert [link.context.span_id for link in resume.links] == [producer.context.span_id]
    assert resume.links[0].context.trace_id == producer.context.trace_id
    # The stored traceparent is the store's business: no client ever sees it.
    assert resumed.header("durable-traceparent") is None


async def test_a_lease_revoked_elsewhere_is_counted_lost_and_logged(
    make_shared_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
) -> None:
    otel = Otel()
    app = StreamApp(EVENTS, pause_at=2)
    caplog.set_level(logging.WARNING, "durable_asgi")
    fast = {"lease_seconds": 0.6}  # renewed every 0.2 s: the revoked lease is seen soon
    with (
        running_server(durable(app, make_shared_store(), otel, **fast)) as a,
        running_server(durable(StreamApp(), make_shared_store(), Otel(), **fast)) as b,
    ):
        key = {"Durable-Key": "taken"}
        async with open_stream(a.url, "/s", headers=key) as first:
            await wait_thread_event(app.paused)
            deleted = await fetch(b.url, "/s", headers={**key, "Durable-Control": "delete"})
            assert deleted.status == 204
            await eventually(lambda: otel.value("durable_asgi.leases.lost") == 1)
            with pytest.raises(IncompleteBody):
                await first.read_all()
        await eventually(lambda: otel.value("durable_asgi.streams.live") == 0)
    assert otel.value("durable_asgi.streams.finished", state="aborted", reason="lease_lost") == 1
    (span,) = otel.spans("durable_asgi produce")
    assert "lease lost" in [event.name for event in span.events]
    (record,) = [r.__dict__ for r in caplog.records if r.__dict__.get("event") == "lease_lost"]
    assert record["stream_hash"] == span.attributes["durable_asgi.stream.hash"]


async def test_a_first_client_fed_from_the_store_is_counted_in_bytes_served(
    make_store: Callable[[], Store],
) -> None:
    """The first client's connection stops taking bytes at its fifth chunk (its `send` waits):
    it falls behind, and once released is fed the rest from the store — those bytes, and only
    those, are served from the store (the ones it got inline are not)."""
    otel = Otel()
    app = StreamApp(EVENTS)
    inner = durable(app, make_store(), otel)
    stalled, release = threading.Event(), threading.Event()

    async def slow_connection(scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0

        async def stalling(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and message.get("body"):
                sent += 1
                if sent == 5:
                    stalled.set()
                    await anyio.to_thread.run_sync(release.wait)
            await send(message)

        await inner(scope, receive, stalling if scope["type"] == "http" else send)

    results: list[Any] = []
    with running_server(slow_connection) as server:

        async def first() -> None:
            results.append(await fetch(server.url, "/s", headers={"Durable-Key": "slow"}))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            await wait_thread_event(stalled)
            await wait_thread_event(app.ended)  # the handler doesn't wait for this client
            release.set()
        (whole,) = results
        assert whole.complete and whole.body == app.body
        await eventually(lambda: otel.value("durable_asgi.readers.live") == 0)
        inline = len(b"".join(EVENTS[:5]))
        await eventually(lambda: otel.value("durable_asgi.store.served") == len(app.body) - inline)
    assert otel.value("durable_asgi.resumes") == 0  # the first client is no resume


class RenewalsFail(MemoryStore):
    """A memory store whose lease renewals meet a store error."""

    async def renew(self, lease: Any, *, lease_seconds: float) -> None:
        raise StoreError("the store is unreachable")


async def test_a_failed_renewal_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    otel = Otel()
    app = StreamApp(EVENTS, pause_at=2)
    caplog.set_level(logging.WARNING, "durable_asgi")
    with running_server(durable(app, RenewalsFail(), otel, lease_seconds=0.3)) as server:
        async with open_stream(server.url, "/s", headers={"Durable-Key": "k"}):
            await wait_thread_event(app.paused)
            await eventually(lambda: otel.value("durable_asgi.leases.renewals_failed") >= 1)
            app.release.set()
    assert otel.value("durable_asgi.store.duration", operation="renew") >= 1
    events = [r.__dict__ for r in caplog.records if r.__dict__.get("event")]
    assert {"event": "store_unreachable", "operation": "renew"}.items() <= events[0].items()


async def test_the_apps_server_span_stays_the_parent() -> None:
    otel = Otel()
    tracer = otel.tracer_provider.get_tracer("app")
    stream = StreamApp(EVENTS, headers=SSE)

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await stream(scope, receive, send)
            return
        with tracer.start_as_current_span("model call"):
            await stream(scope, receive, send)

    inner = durable(handler, MemoryStore(), otel)

    async def instrumented(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        with tracer.start_as_current_span("GET /s"):
            await inner(scope, receive, send)

    with running_server(instrumented) as server:
        assert (await fetch(server.url, "/s", headers={"Durable-Key": "k"})).complete
        joined = await fetch(server.url, "/s", headers={"Durable-Key": "k"})
        assert joined.complete
        await eventually(lambda: len(otel.spans("durable_asgi resume")) == 1)
    servers = {span.context.span_id for span in otel.spans("GET /s")}
    (produce,) = otel.spans("durable_asgi produce")
    (resume,) = otel.spans("durable_asgi resume")
    assert produce.parent is not None and resume.parent is not None
    assert {produce.parent.span_id, resume.parent.span_id} == servers
    (model,) = otel.spans("model call")  # the handler's own spans: children of the production
    assert model.parent is not None and model.parent.span_id == produce.context.span_id


async def test_ten_thousand_keys_make_no_key_valued_attribute() -> None:
    otel = Otel()
    app = StreamApp([b"x"])
    middleware = durable(app, MemoryStore(max_streams=20_000), otel)
    keys = [f"user-{uuid.uuid4().hex}" for _ in range(10_000)]
    for key in keys:
        result = await call(middleware, "/s", headers={"Durable-Key": key})
        assert result.complete
    assert otel.value("durable_asgi.streams.finished", state="complete") == 10_000
    values = {
        str(value)
        for metric in ("streams.started", "streams.finished", "streams.live", "store.duration")
        for point in otel.points(f"durable_asgi.{metric}")
        for value in point.attributes.values()
    }
    assert len(values) < 10  # a handful of low-cardinality values, whatever the keys
    assert not any(key in value for value in values for key in keys[:100])
    for span in otel.exporter.get_finished_spans():
        text = json.dumps(dict(span.attributes or {}))
        assert not any(key in text for key in keys[:100])


NO_OTEL = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Blocked())
import anyio
from durable_asgi import DurableMiddleware, MemoryStore
from durable_asgi import _telemetry
from tests.support.apps import StreamApp
from tests.support.asgi import call

assert _telemetry.otel_trace is None and "opentelemetry" not in sys.modules

async def main():
    app = StreamApp()
    store = MemoryStore()
    middleware = DurableMiddleware(app, store=store)
    first = await call(middleware, "/s", headers={"Durable-Key": "k"})
    again = await call(middleware, "/s", headers={"Durable-Key": "k", "Durable-Offset": "3"})
    assert first.complete and first.body == app.body, first
    assert again.complete and again.body == app.body[3:] and app.calls == 1
    info = await store.info("/s#k")
    assert not any(name == b"durable-traceparent" for name, _ in info.headers)
    print("ok")

anyio.run(main)
"""


def test_without_opentelemetry_the_package_runs_unchanged() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])}
    done = subprocess.run(
        [sys.executable, "-c", NO_OTEL], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_the_demo_serves_prometheus_metrics_when_asked() -> None:
    env = {
        "DURABLE_ASGI_METRICS": "prometheus",
        "DURABLE_ASGI_STORE": "memory://",
        "FAKE_MODEL_DELAY": "0.001",
    }
    with running_server("examples.fastapi_app.app:app", env=env) as server:
        answer = await fetch(
            server.url,
            "/api/chat",
            method="POST",
            headers={"Durable-Key": "turn-1", "Content-Type": "application/json"},
            body=b'{"message": "hello"}',
        )
        assert answer.complete and answer.status == 200
        exposition = (await fetch(server.url, "/metrics")).body.decode()
    assert 'durable_asgi_streams_finished_total{durable_asgi_state="complete"' in exposition
    assert "durable_asgi_store_duration_seconds_bucket" in exposition
