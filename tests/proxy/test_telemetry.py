"""The proxy's OpenTelemetry on every store: a proxied stream is a production like any (its
span, its counts, a resume linked to it), plus the upstream's status and time to its head."""

from __future__ import annotations

import pytest

from ..engine.test_telemetry import Otel, eventually
from ..support.servers import fetch
from .harness import Serve
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
