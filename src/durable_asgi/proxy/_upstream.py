"""`Relay`: the ASGI app that fetches a request's upstream — the "handler" under the engine.

The proxy is `DurableMiddleware` wrapping this app, so everything the middleware gives a
handler, the upstream response gets: one run per key (claim, lease, fencing), a run that goes
on when every client has gone, ``max_response_bytes``, ``max_duration``, TTLs, dead-worker
detection, several workers over SQLite or Redis, ``Durable-Offset`` resumes.

What the relay decides itself:

- Requests go out through one shared `httpx.AsyncClient` (a connection pool, explicit
  timeouts, the CA bundle given), never following redirects (a redirect is the client's to
  follow, through the allowlist again) and ignoring proxy environment variables.
- Hop-by-hop headers (``Connection`` and those it names, ``Keep-Alive``, ``Proxy-*``, ``TE``,
  ``Trailer``, ``Transfer-Encoding``, ``Upgrade``) are dropped both ways; ``Host`` is the
  upstream's; the upstream's ``Date`` and ``Server`` are not kept (the server that answers
  writes its own: a stored date would be stale on a replay).
- **Bodies are relayed decoded.** The upstream is asked for the encodings httpx decodes (the
  client's ``Accept-Encoding`` is not forwarded), and a compressed answer is stored and
  relayed as identity, without ``Content-Encoding`` and ``Content-Length``: offsets then count
  the bytes the client's code sees, so a resume from any offset is a valid body.
- An upstream that fails before its head is answered here: refused or unreachable → 502,
  no head in time (connect or read timeout) → 504, connection pool full → 503. Those are
  non-2xx, so they are not kept and the next request tries again.
- An upstream that fails after its head (reset, timeout, garbage) raises `UpstreamError`: the
  stream ends ``failed`` and every reader's body ends abnormally, never like a whole one.
- Stopping the relay (``/delete``, abort, a limit, shutdown) closes the upstream connection,
  so the upstream sees its client leave.
"""

from __future__ import annotations

import math
import os
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio

from .._protocol import send_json
from .._telemetry import OFF
from .._types import Receive, Scope, Send
from ..exceptions import DurableError
from ._url import Upstream

if TYPE_CHECKING:
    from .._engine import Engine

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError('durable_asgi.proxy needs httpx: pip install "durable-asgi[proxy]"') from exc

__all__ = ["DEFAULT_LIMITS", "DEFAULT_TIMEOUT", "UPSTREAM", "Relay", "UpstreamError"]

UPSTREAM = "durable_asgi.proxy.upstream"
"""``scope[UPSTREAM]``: the `Upstream` a request is relayed to (set by the front door)."""

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0, pool=10.0)
"""Connect within 10 s; then at most 60 s between two reads (the head's included)."""

DEFAULT_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
"""A stream holds its upstream connection for as long as it runs: room for many."""

_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
#: Request headers httpx sets itself: from the upstream URL, the body, what it can decode.
_SET_BY_CLIENT = frozenset({b"host", b"content-length", b"accept-encoding", b"expect"})
#: Response headers the serving server writes itself (a stored Date would be stale).
_SET_BY_SERVER = frozenset({b"date", b"server"})
_DECODED = _SET_BY_SERVER | {b"content-encoding", b"content-length"}
_NO_BODY = frozenset({"GET", "HEAD"})


class UpstreamError(DurableError):
    """The upstream failed after its response head: the stream ends ``failed``."""


def end_to_end(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones (and those ``Connection`` names) nor `drop`."""
    pairs = [(bytes(k).lower(), bytes(v)) for k, v in headers]
    named = {
        token.strip()
        for name, value in pairs
        if name == b"connection"
        for token in value.lower().split(b",")
    }
    return [
        (name, value)
        for name, value in pairs
        if name not in _HOP_BY_HOP
        and name not in named
        and name not in drop
        and not name.startswith(b"proxy-")
    ]


class Relay:
    """Relays the request in ``scope[UPSTREAM]`` to its upstream, streaming the answer back.

    Example (what `DurableProxy` does)::

        relay = Relay(timeout=httpx.Timeout(30.0), verify="/etc/ssl/ca.pem")
        proxy = DurableMiddleware(relay, key=..., client_path=None)
        ...
        await relay.aclose()    # at shutdown

    Args:
        timeout: httpx's timeouts (a number: every one of them).
        verify: `True` (the default CA bundle), `False` (no verification), a CA bundle file to
            trust instead, or an `ssl.SSLContext`.
        limits: the connection pool's limits.
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if isinstance(verify, (str, os.PathLike)):
            verify = ssl.create_default_context(cafile=os.fspath(verify))
        self.verify: bool | ssl.SSLContext = verify
        self.limits = limits
        self._client: httpx.AsyncClient | None = None
        self.engine: Engine | None = None
        """The engine whose telemetry upstream answers are reported to (`DurableProxy`'s)."""

    def __repr__(self) -> str:
        return f"Relay(timeout={self.timeout!r}, limits={self.limits!r})"

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared client, made on first use (in the server's event loop)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                verify=self.verify,
                limits=self.limits,
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the shared client (a later request makes a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream: Upstream = scope[UPSTREAM]
        method: str = scope["method"]
        body = await _read_body(receive)
        try:
            response = await self.open(upstream, method, scope["headers"], body)
        except httpx.HTTPError as exc:
            status, error = _answer_for(exc)
            await send_json(send, status, {"error": f"{error}: {exc}", "upstream": upstream.url})
            return
        await self.relay(upstream, response, send)

    async def open(
        self,
        upstream: Upstream,
        method: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send the request upstream (hop-by-hop headers dropped) and return the response
        once its head is in, its body unread. Raises `httpx.HTTPError`."""
        client = self.client
        request = client.build_request(
            method,
            upstream.url,
            headers=end_to_end(headers, _SET_BY_CLIENT),
            content=None if method in _NO_BODY else body,
            timeout=timeout if timeout is not None else self.timeout,
        )
        telemetry = OFF if self.engine is None else self.engine.telemetry
        if telemetry.upstream_responses is None:
            return await client.send(request, stream=True)
        start = time.perf_counter()
        try:
            response = await client.send(request, stream=True)
        except BaseException as exc:
            telemetry.upstream(None, type(exc).__name__, time.perf_counter() - start)
            raise
        telemetry.upstream(response.status_code, "", time.perf_counter() - start)
        return response

    async def relay(
        self,
        upstream: Upstream,
        response: httpx.Response,
        send: Send,
        *,
        inactivity: float | None = None,
    ) -> None:
        """Send `response` as an ASGI response (decoded, hop-by-hop headers dropped) and
        close it. A failure mid-body raises `UpstreamError`; so does `inactivity` seconds
        without a chunk."""
        try:
            encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
            headers = end_to_end(response.headers.raw, _DECODED if encoded else _SET_BY_SERVER)
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            chunks = response.aiter_bytes()
            if inactivity is None:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                # One cancel scope for the body, its deadline moved per chunk (half the cost of
                # a scope per chunk), and off while `send` runs: only the upstream is timed.
                with anyio.CancelScope() as idle:
                    chunks = chunks.__aiter__()
                    while True:
                        idle.deadline = anyio.current_time() + inactivity
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            break
                        idle.deadline = math.inf
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if idle.cancelled_caught:
                    raise TimeoutError
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{upstream.url} failed mid-response: {exc!r}") from exc
        except TimeoutError as exc:
            raise UpstreamError(
                f"{upstream.url} sent nothing for {inactivity} s mid-response"
            ) from exc
        finally:
            # Also when stopped: closing the connection is how the upstream learns of it.
            with anyio.move_on_after(5, shield=True):
                await response.aclose()


def _answer_for(exc: httpx.HTTPError) -> tuple[int, str]:
    """The status and message for an upstream that failed before its head."""
    if isinstance(exc, httpx.PoolTimeout):
        return 503, "too many upstream connections"
    if isinstance(exc, httpx.TimeoutException):
        return 504, "the upstream did not answer in time"
    return 502, "the upstream could not be reached"


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)
