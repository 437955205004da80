"""OpenTelemetry metrics and traces, and the structured log records that go with them.

Only ``opentelemetry-api`` is used (``pip install "durable-asgi[otel]"``); the application owns
the SDK and its exporters, as with OpenTelemetry's own instrumentation libraries. A `Telemetry`
is made once per engine, when its store opens, from the providers given to the middleware (else
the global ones): each instrument is made then or is None, so the engine's hooks cost a
None check — per stream, never per chunk — when the API is absent or no provider is configured
(``OFF``). Bytes appended are counted per flush batch, bytes served per reader.

Every metric attribute is low-cardinality: the store kind, the namespace when the app named one
(``namespace=``, or a `keys.Key` namespace — the default namespace, the request path, can carry
ids, so it is never used), the final state, a stop or refusal reason, an operation, a kind.
Spans carry `stream_hash`, never the key; the producer's span context is stored with the
stream's head (`TRACEPARENT`, dropped from every replay), so a resume on any worker links to it.
``docs/operations.md`` lists every instrument.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ._protocol import TRACEPARENT
from .stores._base import Headers

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider, UpDownCounter
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._reader import Tail

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError:  # the otel extra is not installed: everything is off
    otel_metrics = otel_trace = None  # type: ignore[assignment]

__all__ = ["OFF", "TRACEPARENT", "Reading", "Telemetry", "log_fields", "stream_hash"]

logger = logging.getLogger("durable_asgi")

_T = TypeVar("_T")

NAME = "durable_asgi"
"""The instrumentation scope's name, and the namespace of every instrument."""

#: Buckets (seconds) of the latency histograms: 1 ms to 10 s.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def stream_hash(stream_id: str) -> str:
    """A stream's stable public id: the first 16 hex digits of the SHA-256 of its store id
    (namespace and key). Logs, spans and ``durable-asgi show`` print it; it never reveals
    the key."""
    return hashlib.sha256(stream_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def store_kind(store: object) -> str:
    """``memory``, ``sqlite``, ``redis`` (a class name without ``Store``, in lower case)."""
    return type(store).__name__.removesuffix("Store").lower() or "store"


def log_fields(event: str, stream_id: str | None = None, **more: Any) -> dict[str, Any]:
    """The ``extra=`` of a structured log record: its `event`, the stream's `stream_hash`,
    and `more` fields."""
    extra: dict[str, Any] = {"event": event, **more}
    if stream_id is not None:
        extra["stream_hash"] = stream_hash(stream_id)
    return extra


@dataclass(slots=True, eq=False)
class Reading:
    """What one joiner or resumer was served, filled in by the reader as it goes."""

    telemetry: Telemetry
    kind: str
    """``offset``, ``last_event_id`` or ``join`` (same key, no offset; on the read protocol,
    a live read of a running stream)."""
    started: float = field(default_factory=time.perf_counter)
    start_ns: int = field(default_factory=time.time_ns)
    headers: Headers = ()
    """The stream's stored head (its `TRACEPARENT` links the span to the producer's)."""
    refused: int = 0
    """The status answered instead of the stream (416 past its end, 502 no head)."""
    tail: Tail | None = None


def _off(provider: object, noop: tuple[str, ...]) -> bool:
    return type(provider).__name__ in noop


class Telemetry:
    """The instruments and tracer of one engine; each None when off.

    Example::

        telemetry = Telemetry("sqlite", meter_provider=provider)   # None: the global one
        telemetry.stream_started("chat")
    """

    def __init__(
        self,
        store: str,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        off: bool = False,
    ) -> None:
        self.store = store
        self.tracer: Tracer | None = None
        self.started: Counter | None = None
        self.finished: Counter | None = None
        self.live: UpDownCounter | None = None
        self.readers: UpDownCounter | None = None
        self.resumes: Counter | None = None
        self.resume_ttfb: Histogram | None = None
        self.appended: Counter | None = None
        self.served: Counter | None = None
        self.store_duration: Histogram | None = None
        self.renewals_failed: Counter | None = None
        self.leases_lost: Counter | None = None
        self.refused: Counter | None = None
        self.upstream_responses: Counter | None = None
        self.upstream_ttfb: Histogram | None = None
        self._store = {"durable_asgi.store": store}
        self._ops: dict[str, dict[str, str]] = {}
        if off or otel_metrics is None or otel_trace is None:
            return
        if tracer_provider is None:
            tracer_provider = otel_trace.get_tracer_provider()
            if _off(tracer_provider, ("ProxyTracerProvider", "NoOpTracerProvider")):
                tracer_provider = None
        if tracer_provider is not None:
            self.tracer = tracer_provider.get_tracer(NAME)
        if meter_provider is None:
            meter_provider = otel_metrics.get_meter_provider()
            if _off(meter_provider, ("_ProxyMeterProvider", "NoOpMeterProvider")):
                return
        meter = meter_provider.get_meter(NAME)

        def histogram(name: str, description: str) -> Histogram:
            return meter.create_histogram(
                name, "s", description, explicit_bucket_boundaries_advisory=_BUCKETS
            )

        self.started = meter.create_counter(
            "durable_asgi.streams.started", "{stream}", "Streams claimed: handler runs started"
        )
        self.finished = meter.create_counter(
            "durable_asgi.streams.finished",
            "{stream}",
            "Streams ended, by final state (complete, failed, aborted) and stop reason",
        )
        self.live = meter.create_up_down_counter(
            "durable_asgi.streams.live", "{stream}", "Streams this process is producing now"
        )
        self.readers = meter.create_up_down_counter(
            "durable_asgi.readers.live", "{reader}", "Clients this process is serving a stream now"
        )
        self.resumes = meter.create_counter(
            "durable_asgi.resumes",
            "{request}",
            "Requests served from the store, by kind (offset, last_event_id, join)",
        )
        self.resume_ttfb = histogram(
            "durable_asgi.resume.time_to_first_byte",
            "From a resume or join request to its first body byte",
        )
        self.appended = meter.create_counter(
            "durable_asgi.store.appended", "By", "Body bytes written to the store"
        )
        self.served = meter.create_counter(
            "durable_asgi.store.served", "By", "Body bytes read from the store to clients"
        )
        self.store_duration = histogram(
            "durable_asgi.store.duration",
            "Store operations (claim, append_batch, read, renew, finish)",
        )
        self.renewals_failed = meter.create_counter(
            "durable_asgi.leases.renewals_failed",
            "{renewal}",
            "Lease renewals the store failed (the next one retries)",
        )
        self.leases_lost = meter.create_counter(
            "durable_asgi.leases.lost",
            "{lease}",
            "Producers whose lease was revoked: aborted or deleted elsewhere, or taken over",
        )
        self.refused = meter.create_counter(
            "durable_asgi.requests.refused", "{request}", "Durable requests refused, by reason"
        )
        self.upstream_responses = meter.create_counter(
            "durable_asgi.proxy.upstream.responses",
            "{response}",
            "Upstream answers of the proxy, by status code (or error type)",
        )
        self.upstream_ttfb = histogram(
            "durable_asgi.proxy.upstream.time_to_first_byte",
            "From the proxy's upstream request to its response head",
        )

    @property
    def on(self) -> bool:
        """Whether any signal is on."""
        return self.tracer is not None or self.started is not None

    def attributes(self, namespace: str | None, **more: str) -> dict[str, str]:
        attributes = dict(self._store, **more)
        if namespace is not None:
            attributes["durable_asgi.namespace"] = namespace
        return attributes

    # -- productions ---------------------------------------------------------------------------

    def stream_started(self, stream_id: str, namespace: str | None) -> Span | None:
        """A producer claimed `stream_id`: count it, and start its span (returned) under the
        current context (the app's HTTP server span, where there is one)."""
        attributes = self.attributes(namespace)
        if self.started is not None and self.live is not None:
            self.started.add(1, attributes)
            self.live.add(1, attributes)
        if self.tracer is None:
            return None
        attributes["durable_asgi.stream.hash"] = stream_hash(stream_id)
        return self.tracer.start_span("durable_asgi produce", attributes=attributes)

    def stream_finished(
        self,
        stream_id: str,
        namespace: str | None,
        span: Span | None,
        state: str,
        reason: str,
        detail: str,
    ) -> None:
        """The producer is done: the stream ended `state`, stopped for `reason` ("" if not)."""
        attributes = self.attributes(namespace, **{"durable_asgi.state": state})
        if reason:
            attributes["durable_asgi.reason"] = reason
        if self.finished is not None and self.live is not None:
            self.finished.add(1, attributes)
            self.live.add(-1, self.attributes(namespace))
        if span is not None:
            span.set_attributes(attributes)
            span.add_event("finished", {"durable_asgi.state": state})
            if state == "failed" and otel_trace is not None:
                span.set_status(otel_trace.StatusCode.ERROR, reason)
            span.end()
        if state == "failed":
            logger.warning(
                "durable_asgi: stream %s failed: %s",
                stream_hash(stream_id),
                f"{reason} ({detail})" if detail else reason,
                extra=self.record("stream_failed", stream_id, reason=reason, detail=detail),
            )

    def record(self, event: str, stream_id: str | None = None, **more: Any) -> dict[str, Any]:
        """`log_fields`, with the store kind."""
        return log_fields(event, stream_id, store=self.store, **more)

    def lease_lost(self, stream_id: str, namespace: str | None, span: Span | None) -> None:
        if self.leases_lost is not None:
            self.leases_lost.add(1, self.attributes(namespace))
        if span is not None:
            span.add_event("lease lost")
        logger.warning(
            "durable_asgi: stream %s lost its lease",
            stream_hash(stream_id),
            extra=self.record("lease_lost", stream_id),
        )

    def renewal_failed(self, stream_id: str, error: BaseException) -> None:
        if self.renewals_failed is not None:
            self.renewals_failed.add(1, self._store)
        logger.warning(
            "durable_asgi: renewing %r failed: %s",
            stream_id,
            error,
            extra=self.record("store_unreachable", stream_id, operation="renew"),
        )

    # -- store operations ----------------------------------------------------------------------

    def _op(self, operation: str) -> dict[str, str]:
        attributes = self._ops.get(operation)
        if attributes is None:
            attributes = self._ops[operation] = dict(
                self._store, **{"durable_asgi.operation": operation}
            )
        return attributes

    async def timed(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``await call()``, its duration recorded as a store `operation`."""
        histogram = self.store_duration
        if histogram is None:
            return await call()
        start = time.perf_counter()
        try:
            return await call()
        finally:
            histogram.record(time.perf_counter() - start, self._op(operation))

    def store_op(self, operation: str, seconds: float) -> None:
        if self.store_duration is not None:
            self.store_duration.record(seconds, self._op(operation))

    def flushed(self, nbytes: int, seconds: float) -> None:
        """A batch of writes (`nbytes` of body) went to the store in `seconds`."""
        if self.appended is not None and self.store_duration is not None:
            self.appended.add(nbytes, self._store)
            self.store_duration.record(seconds, self._op("append_batch"))

    # -- readers and refusals ------------------------------------------------------------------

    def reading(self, kind: str) -> Reading | None:
        """A `Reading` for a joiner or resumer of `kind` starting now (None: all off)."""
        return Reading(self, kind) if self.on else None

    @contextlib.contextmanager
    def reader(self) -> Iterator[None]:
        """A client is being served for as long as the block runs (`readers` live)."""
        readers = self.readers
        if readers is None:
            yield
            return
        readers.add(1, self._store)
        try:
            yield
        finally:
            readers.add(-1, self._store)

    def read(self, reading: Reading, stream_id: str, namespace: str | None) -> None:
        """A joiner or resumer was served (or refused): count it, record its time to first
        byte and bytes, and its span, linked to the producer's from the stored head."""
        tail = reading.tail
        if reading.refused:
            reason = "offset_out_of_range" if reading.refused == 416 else "no_head"
            self.refuse(reason, reading.refused, stream_id)
            return
        if tail is None:
            return  # nothing was served (the store failed first: counted as refused)
        attributes = self.attributes(namespace, **{"durable_asgi.resume.kind": reading.kind})
        first = tail.first_at
        if self.resumes is not None and self.resume_ttfb is not None and self.served is not None:
            self.resumes.add(1, attributes)
            if first is not None:
                self.resume_ttfb.record(first - reading.started, attributes)
            self.fed(tail.offset - tail.start)
        if self.tracer is None or otel_trace is None:
            return
        links = []
        for name, value in reading.headers:
            if name == TRACEPARENT:
                context = _span_context(value)
                if context is not None:
                    links.append(otel_trace.Link(context))
        attributes["durable_asgi.stream.hash"] = stream_hash(stream_id)
        span = self.tracer.start_span(
            "durable_asgi resume", attributes=attributes, links=links, start_time=reading.start_ns
        )
        if first is not None:
            at = reading.start_ns + int((first - reading.started) * 1e9)
            span.add_event("first byte", timestamp=at)
        end = tail.end or "client_left"  # "": the client left before the end
        span.set_attributes({"durable_asgi.offset": tail.start, "durable_asgi.state": end})
        span.add_event("finished", {"durable_asgi.state": end})
        span.end()

    def fed(self, nbytes: int) -> None:
        """A first client that fell behind was fed `nbytes` from the store (once per reader:
        bytes it got inline, from the handler's own `send`, are not counted)."""
        if self.served is not None and nbytes > 0:
            self.served.add(nbytes, self._store)

    def refuse(self, reason: str, status: int, stream_id: str | None = None) -> None:
        """A durable request was refused with `status` for `reason`."""
        if self.refused is not None:
            self.refused.add(
                1,
                dict(self._store, **{"durable_asgi.reason": reason}, **_status(status)),
            )
        if status in (401, 404, 416):
            logger.info(
                "durable_asgi: resume refused (%s)",
                reason,
                extra=self.record("resume_refused", stream_id, reason=reason, status=status),
            )

    # -- tracing helpers -----------------------------------------------------------------------

    def traceparent(self, span: Span | None) -> Headers:
        """The stored header carrying `span`'s context (none without a valid span)."""
        if span is None:
            return ()
        context = span.get_span_context()
        if not context.is_valid:
            return ()
        value = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        return ((TRACEPARENT, value.encode()),)

    def current(self, span: Span | None) -> contextlib.AbstractContextManager[Any]:
        """`span` as the current span for the block (the handler's spans are its children)."""
        if span is None or otel_trace is None:
            return contextlib.nullcontext()
        return otel_trace.use_span(span, record_exception=False, set_status_on_exception=False)

    # -- the proxy -----------------------------------------------------------------------------

    def upstream(self, status: int | None, error: str, seconds: float) -> None:
        """The proxy's upstream answered `status` (None: failed with `error`) in `seconds`."""
        if self.upstream_responses is None or self.upstream_ttfb is None:
            return
        attributes: dict[str, Any] = dict(self._store, **_status(status))
        if status is None:
            attributes["error.type"] = error
        self.upstream_responses.add(1, attributes)
        self.upstream_ttfb.record(seconds, attributes)


def _status(status: int | None) -> Mapping[str, int]:
    return {"http.response.status_code": status} if status else {}


def _span_context(value: bytes) -> Any:
    """The span context in a stored ``traceparent``, or None."""
    try:
        _, trace_id, span_id, flags = value.decode("ascii").split("-")
        context = otel_trace.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=otel_trace.TraceFlags(int(flags, 16)),
        )
    except (ValueError, UnicodeDecodeError):
        return None
    return context if context.is_valid else None


OFF = Telemetry("none", off=True)
"""Telemetry of nothing: every instrument None (until a store is opened, and without the API)."""
