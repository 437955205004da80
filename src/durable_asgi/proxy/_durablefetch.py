"""Mode 1: durablefetch's URL scheme, for its unmodified npm client (``durablefetch`` 0.1.0).

The wire shapes are those of `remorses/durablefetch` (``src/cloudflare.ts``, ``src/sdk.ts``):

- ``METHOD /{host}/{path}?{query}`` fetches ``{scheme}://{host}/{path}?{query}``, the scheme
  being the request's. The stream key is that URL (normalized, in the namespace
  `NAMESPACE`); the method and body are not part of it.
- ``POST /in-progress`` and ``POST /delete`` with the JSON body ``{"url": ...}``, whatever its
  content type (the client sends ``text/plain``) → ``{"inProgress", "activeConnections",
  "chunksStored", "completed"}`` and ``{"success": true, "message": ...}``.
- ``OPTIONS`` anything → 204; ``GET /`` → 307 to the docs.
- Every answer carries durablefetch's CORS headers and ``Cache-Control: no-store``, which
  replace any the upstream sent.

Where this deliberately differs from durablefetch (its client doesn't notice; don't "fix" it
back):

- The upstream's real status is kept and replayed (durablefetch answers 200 to every replay).
  Non-2xx answers are relayed and not kept, so the next request fetches again.
- An upstream that fails mid-stream leaves the stream ``failed``: readers' bodies end
  abnormally (durablefetch marks it complete, so a replay looks whole).
- ``/delete`` stops a running upstream (durablefetch lets it run, and write again).
- The path is forwarded as the client sent it. durablefetch drops empty segments
  (``/a//b/`` becomes ``/a/b``), which fetches another URL than asked and makes
  ``/in-progress`` with the real URL miss the stream.
- ``Access-Control-Allow-Credentials: true`` is not sent: beside ``Allow-Origin: *`` a browser
  refuses credentialed requests either way. ``Allow-Headers`` names ``Authorization`` beside
  ``*``, which the CORS wildcard doesn't cover.
- Bad input gets a JSON 4xx (missing host 400, malformed URL 400, not allowed 403, method 405,
  body too large 413); durablefetch throws. Its demo routes are not served.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .._protocol import send_json, with_headers
from .._request import DurableRequest
from .._types import Receive, Scope, Send
from ..exceptions import BadRequest, ClientDisconnected, StoreError
from ..keys import Key
from ._upstream import UpstreamError
from ._url import request_target

if TYPE_CHECKING:
    from ._app import DurableProxy

__all__ = ["CORS_HEADERS", "NAMESPACE", "serve"]

logger = logging.getLogger("durable_asgi")

NAMESPACE = "durablefetch"
"""The namespace of durablefetch streams: an upstream URL names one stream, whatever the path
the proxy is mounted at."""

CORS_HEADERS = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS, HEAD, PATCH"),
    (b"access-control-allow-headers", b"*, authorization"),
    (b"access-control-expose-headers", b"*"),
    (b"access-control-max-age", b"86400"),
)

_CONTROLS = ("/in-progress", "/delete")


async def serve(proxy: DurableProxy, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one HTTP request of the durablefetch front door."""
    send = _with_cors(send)
    method: str = scope["method"]
    target = request_target(scope)
    try:
        if method == "OPTIONS":
            await send_json(send, 204, None)
        elif target in ("", "/"):
            if method not in ("GET", "HEAD") or proxy.docs_url is None:
                raise BadRequest("missing upstream host: request /{host}/{path}")
            await _redirect(send, proxy.docs_url)
        elif method == "POST" and target in _CONTROLS:
            await _control(proxy, target, scope, receive, send)
        elif method not in proxy.methods:
            allowed = ", ".join([*proxy.methods, "OPTIONS"]).encode()
            await send_json(send, 405, {"error": f"{method} is not proxied"}, [(b"allow", allowed)])
        else:
            upstream = proxy.upstream(_upstream_url(scope, target), scope)
            await proxy.forward(upstream, Key(upstream.url, NAMESPACE), scope, receive, send)
    except BadRequest as exc:
        await send_json(send, exc.status_code, {"error": exc.detail})
    except UpstreamError as exc:
        # The stream ended `failed` and this client's body abnormally; nothing else to do.
        logger.warning("durable_asgi.proxy: %s", exc)


def _upstream_url(scope: Scope, target: str) -> str:
    """The upstream URL of ``/{host}/{path}``: the request's scheme, path and query."""
    before, _, rest = target.partition("/")
    host, slash, rest = rest.partition("/")
    host = unquote(host)
    if before or not host:
        raise BadRequest("missing upstream host: request /{host}/{path}")
    if any(c in host for c in "/?#@\\"):
        raise BadRequest(f"malformed upstream host {host[:200]!r}")
    path = slash + rest
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return f"{scope.get('scheme', 'http')}://{host}{path}" + (f"?{query}" if query else "")


async def _control(
    proxy: DurableProxy, target: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """``/in-progress`` or ``/delete`` for the URL in the body."""
    limit = proxy.middleware.options.max_request_body
    try:
        body = await DurableRequest(scope, receive, limit).body()
    except ClientDisconnected:
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise BadRequest('the body must be JSON: {"url": "https://..."}')
    upstream = proxy.upstream(data["url"], scope)
    key = Key(upstream.url, NAMESPACE)
    try:
        if target == "/in-progress":
            payload = _in_progress(await proxy.status(key))
        else:
            existed = await proxy.delete(key)
            message = "Response deleted successfully" if existed else "Nothing stored for this URL"
            payload = {"success": True, "message": message}
    except StoreError as exc:
        logger.error("durable_asgi.proxy: store unavailable: %s", exc)
        await send_json(send, 503, {"error": "durable store unavailable"})
        return
    await send_json(send, 200, payload)


def _in_progress(status: dict[str, Any] | None) -> dict[str, Any]:
    if status is None:
        return {"inProgress": False, "activeConnections": 0, "chunksStored": 0, "completed": False}
    code = status["status_code"]
    return {
        "inProgress": status["in_progress"],
        "activeConnections": status["readers"],
        "chunksStored": status["chunks"],
        # Only a kept answer is complete: a non-2xx one is fetched again.
        "completed": status["state"] == "complete" and code is not None and 200 <= code < 300,
    }


async def _redirect(send: Send, location: str) -> None:
    headers = [(b"location", location.encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 307, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send: Send) -> Send:
    """`send`, with durablefetch's CORS headers and no-store on every response head."""
    return with_headers(
        send,
        [(b"cache-control", b"no-store"), *CORS_HEADERS],
        (b"access-control-", b"cache-control"),
    )
