"""The apps `bench/proxy.py` serves, one per uvicorn process; ``PROXY_VARIANT`` picks which:

- ``upstream``: the local upstream, a pure ASGI app: ``GET /sse?n=<events>&pace=<seconds>``
  sends `n` SSE events of exactly 40 bytes (`event`), the first at once and one every `pace`
  seconds after it; ``GET /stats`` says how many ``/sse`` requests it served (``{"calls": n}``).
- ``passthrough``: the bare limit: a plain, non-durable httpx streaming pass-through on the
  proxy's URL scheme (``/{host}/{path}`` -> ``http://{host}/{path}``), through one shared
  `httpx.AsyncClient` with the proxy's pool limits and timeouts. No store, no allowlist, no
  header rewriting: what a minimal hand-written relay does.
- a store URL (``memory://``, ``sqlite:///…``, ``redis://…``): `DurableProxy` on that store,
  allowing the upstream at ``PROXY_UPSTREAM`` (``http://127.0.0.1:<port>``).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import parse_qs

VARIANT = os.environ.get("PROXY_VARIANT", "upstream")
SECRET = "bench-secret"
UPSTREAM = os.environ.get("PROXY_UPSTREAM", "http://127.0.0.1:8001")
PAD = b"x" * 19


def event(i: int) -> bytes:
    """The `i`-th (1-based) event of ``/sse``: exactly 40 bytes."""
    return b"data: tok-%08d-%s\n\n" % (i, PAD)


def events_body(n: int) -> bytes:
    return b"".join(event(i) for i in range(1, n + 1))


_calls = 0


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _calls
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/stats":
        body = json.dumps({"calls": _calls}).encode()
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    _calls += 1
    query = parse_qs(scope["query_string"].decode())
    n, pace = int(query.get("n", ["200"])[0]), float(query.get("pace", ["0.01"])[0])
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(1, n + 1):
        if i > 1:
            await asyncio.sleep(pace)
        await send({"type": "http.response.body", "body": event(i), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def passthrough_app() -> Any:
    import httpx

    from durable_asgi.proxy import DEFAULT_LIMITS, DEFAULT_TIMEOUT

    hop_by_hop = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
    client: httpx.AsyncClient | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal client
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            if client is not None:
                await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if client is None:
            client = httpx.AsyncClient(
                timeout=DEFAULT_TIMEOUT, limits=DEFAULT_LIMITS, trust_env=False
            )
        query = scope["query_string"].decode()
        url = "http://" + scope["raw_path"].decode()[1:] + (f"?{query}" if query else "")
        response = await client.send(client.build_request("GET", url), stream=True)
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower() not in hop_by_hop]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            async for chunk in response.aiter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


def durable_app(store_url: str) -> Any:
    from durable_asgi import store_from_url
    from durable_asgi.proxy import DurableProxy

    # The secret turns on mode 2 (the Durable Streams proxy protocol, /v1/proxy) beside mode 1.
    return DurableProxy(allow=[f"{UPSTREAM}/**"], store=store_from_url(store_url), secret=SECRET)


if VARIANT == "upstream":
    app: Any = upstream
elif VARIANT == "passthrough":
    app = passthrough_app()
else:
    app = durable_app(VARIANT)
