"""The proxy's OpenTelemetry on every store: a proxied stream is a production like any (its
span, its counts, a resume linked to it), plus the upstream's status and time to its head;
mode 2's reads (the Durable Streams read protocol) are joins and resumes like mode 1's."""

from __future__ import annotations

import uuid

import httpx
import pytest

from durable_asgi.streams import encode_offset

from ..engine.test_telemetry import Otel, eventually
from ..support.servers import fetch
from .harness import Serve
from .test_ds_protocol import SECRET, _events, _wait, _with, create, get
from .upstream import sse_body

pytestmark = pytest.mark.anyio


async def test_upstream_status_and_time_to_first_byte_and_the_stream_itself(
    serve: Serve,
) -> None:
    otel = Otel()
    with serve(**otel.providers) as s:
        path = s.path("/sse?chat=telemetry")
        assert (await fetch(s.url, path)).body == sse_body()
        assert (await fetch(s.url, path, headers={"Durable-Offset": "3"})).complete
        assert (await fetch(s.url, s.path("/status/404"))).status == 404
        await eventually(lambda: len(otel.spans("durable_asgi resume")) == 1)

    def value(name: str, **attributes: object) -> float:
        return otel.value(f"durable_asgi.{name}", **attributes)

    assert value("proxy.upstream.responses", **{"http.response.status_code": 200}) == 1
    assert value("proxy.upstream.responses", **{"http.response.status_code": 404}) == 1
    assert value("proxy.upstream.time_to_first_byte") == 2
    assert value("streams.started", namespace="durablefetch") == 2  # the 404 ran, not kept
    assert value("streams.finished", state="complete", namespace="durablefetch") == 2
    assert value("resumes", **{"resume.kind": "offset"}) == 1
    (resume,) = otel.spans("durable_asgi resume")
    produced = {span.context.span_id for span in otel.spans("durable_asgi produce")}
    assert len(resume.links) == 1 and resume.links[0].context.span_id in produced


async def test_mode_2_reads_are_joins_and_resumes_linked_to_the_producer(serve: Serve) -> None:
    """The read protocol (``/v1/proxy/{id}``): a live read of the running stream (long-poll,
    SSE) is a join, a catch-up from an offset a resume; each counted, timed, its bytes served
    and its span linked to the producer's; refused reads counted by reason."""
    otel = Otel()
    with serve(secret=SECRET, **otel.providers) as s:
        created = await create(s, "/sse?n=5&pause=2")
        assert created.status_code == 201, created.text
        location = created.headers["location"]
        await _wait(s.origin.paused)  # running, and stays so until released
        polled = await get(location, offset="-1", live="long-poll")
        assert polled.status_code == 200 and polled.content
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "GET", _with(location, offset=polled.headers["stream-next-offset"], live="sse")
            ) as sse,
        ):
            assert otel.value("durable_asgi.readers.live") == 1  # counted in before the head
            s.origin.release.set()
            events = _events((await sse.aread()).decode())
        followed = "".join(v for k, v in events if k == "data").encode()
        assert polled.content + followed == sse_body(5)
        caught_up = await get(location, offset=encode_offset(10))
        assert caught_up.content == sse_body(5)[10:]

        unknown = f"{s.url}/v1/proxy/{uuid.uuid4()}"
        assert (await get(unknown, offset="-1", secret=SECRET)).status_code == 404
        assert (await get(location, offset="garbage")).status_code == 400
        assert (await get(location, offset=encode_offset(10**6))).status_code == 400
        forged = location.replace("signature=", "signature=0")
        assert (await get(forged, offset="-1")).status_code == 401

        def value(name: str, **attributes: object) -> float:
            return otel.value(f"durable_asgi.{name}", **attributes)

        await eventually(lambda: value("resumes") == 3 and value("readers.live") == 0)

    ns = {"namespace": "durable-streams-proxy"}
    assert value("resumes", **ns, **{"resume.kind": "join"}) == 2
    assert value("resumes", **ns, **{"resume.kind": "offset"}) == 1
    assert value("resume.time_to_first_byte", **ns) == 3  # every read sent a byte
    served = len(polled.content) + len(followed) + len(caught_up.content)
    assert value("store.served") == served
    for reason, status in (
        ("not_found", 404),
        ("bad_input", 400),
        ("offset_out_of_range", 400),
        ("unauthorized", 401),
    ):
        refused = value("requests.refused", reason=reason, **{"http.response.status_code": status})
        assert refused == 1, reason
    (producer,) = otel.spans("durable_asgi produce")
    resumes = otel.spans("durable_asgi resume")
    assert len(resumes) == 3
    for span in resumes:
        assert [link.context.span_id for link in span.links] == [producer.context.span_id]
        assert span.links[0].context.trace_id == producer.context.trace_id
    states = sorted(str(span.attributes["durable_asgi.state"]) for span in resumes)
    assert states == ["complete", "complete", "running"]  # the long-poll ended mid-stream
