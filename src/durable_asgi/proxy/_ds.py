"""Mode 2: the Durable Streams proxy protocol (``@durable-streams/proxy``), at ``/v1/proxy``.

``PROXY_PROTOCOL.md`` of `durable-streams/durable-streams`:

- ``POST /v1/proxy`` (service auth) with ``Upstream-URL``, ``Upstream-Method`` and optionally
  ``Upstream-Authorization`` fetches the upstream; on a 2xx head it claims a fresh stream, hands
  the open response to a `Producer` (the engine's: leases, limits, flushing, every store) and
  answers ``201`` with a pre-signed ``Location`` before the body is read. The run goes on
  whatever the client does; ``PATCH ?action=abort`` and ``DELETE`` stop it.
- ``GET``/``HEAD /v1/proxy/{id}``: the read protocol of `_streams` (one module for every
  stream in the store).
- Pre-signed URLs: ``signature`` = hex HMAC-SHA256 of ``{id}:{expires}`` under the secret,
  compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

import anyio

from .._producer import Producer
from .._protocol import with_headers
from .._request import DurableRequest, header
from .._types import Receive, Scope, Send
from ..exceptions import BadRequest, ClientDisconnected, LeaseLost, StoreError, StoreFull
from ..stores._base import Lease, stream_id
from ..streams import ReadError, StreamReader, error_body, refusal_reason
from ._upstream import UpstreamError
from ._url import Upstream, request_target

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError('durable_asgi.proxy needs httpx: pip install "durable-asgi[proxy]"') from exc

if TYPE_CHECKING:
    from ._app import DurableProxy

__all__ = ["BASE_PATH", "NAMESPACE", "DurableStreams", "sign"]

logger = logging.getLogger("durable_asgi")

BASE_PATH = "/v1/proxy"
NAMESPACE = "durable-streams-proxy"
"""The store namespace of mode 2's streams (ids are server-made UUIDs)."""

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MAX_HEADER_BYTES = 32 << 10
"""Request header bytes at most (names and values): more is ``431`` (never sent upstream)."""
MAX_ERROR_BODY = 64 << 10
"""Bytes of an upstream error body relayed in a 502 (the rest is dropped)."""

_PROXY_HEADERS = frozenset(
    {b"authorization", b"upstream-url", b"upstream-method", b"upstream-authorization", b"host"}
)
_CORS = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PATCH, DELETE, HEAD, OPTIONS"),
    (
        b"access-control-allow-headers",
        b"authorization, content-type, upstream-url, upstream-method, upstream-authorization, "
        b"if-none-match, *",
    ),
    (
        b"access-control-expose-headers",
        b"location, upstream-content-type, upstream-status, stream-next-offset, "
        b"stream-up-to-date, stream-closed, stream-cursor, stream-sse-data-encoding, "
        b"stream-ttl, durable-state, etag",
    ),
    (b"access-control-max-age", b"86400"),
)


def sign(secret: str, stream: str, expires: int) -> str:
    """The pre-signed URL's signature for `stream` until `expires` (Unix seconds)."""
    message = f"{stream}:{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class _Error(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class DurableStreams:
    """The mode-2 front door of a `DurableProxy` (``secret=`` enables it)."""

    def __init__(
        self,
        proxy: DurableProxy,
        *,
        secret: str,
        signature_ttl: float = 24 * 3600,
        header_timeout: float = 60.0,
        body_timeout: float = 600.0,
        long_poll_timeout: float = 30.0,
    ) -> None:
        if not secret:
            raise ValueError("the Durable Streams proxy needs a non-empty secret")
        self.proxy = proxy
        self.secret = secret
        self.signature_ttl = signature_ttl
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        options = proxy.middleware.options
        self.reader = StreamReader(
            proxy.store,
            poll=options.poll_interval,
            long_poll_timeout=long_poll_timeout,
            upstream_content_type=True,
            engine=proxy.middleware.engine,
            namespace=NAMESPACE,
        )

    def stream_id(self, stream: str) -> str:
        return stream_id(NAMESPACE, stream)

    async def serve(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        """Answer one request whose path below the mount point is `route` (``/v1/proxy...``)."""
        send = _with_cors(send)
        method: str = scope["method"]
        rest = route[len(BASE_PATH) :]
        sid: str | None = None  # a request on one stream (/v1/proxy/{id}): refusals counted
        try:
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > MAX_HEADER_BYTES:
                raise _Error(
                    431,
                    "REQUEST_HEADERS_TOO_LARGE",
                    f"request headers over {MAX_HEADER_BYTES} bytes",
                )
            if method == "OPTIONS":
                await _empty(send, 204)
            elif rest in ("", "/"):
                if method != "POST":
                    raise _Error(405, "METHOD_NOT_ALLOWED", f"{method} {BASE_PATH} is not served")
                self._service_auth(scope)
                await self._create(scope, receive, send)
            else:
                stream = rest[1:]
                sid = self.stream_id(stream)
                if not stream or "/" in stream or not _is_uuid(stream):
                    raise _Error(404, "STREAM_NOT_FOUND", "no such stream")
                await self._stream_op(method, stream, scope, receive, send)
        except _Error as exc:
            self._refused(sid, refusal_reason(exc.status), exc.status)
            await _send_error(send, exc.status, exc.code, exc.message, exc.headers)
        except ReadError as exc:
            self._refused(sid, exc.reason, exc.status)
            await _send_error(send, exc.status, exc.code, exc.message)
        except StoreFull as exc:
            self._refused(sid, "store_full", 503)
            await _send_error(send, 503, "STORAGE_ERROR", str(exc), ((b"retry-after", b"5"),))
        except StoreError as exc:
            self._refused(sid, "store_unavailable", 502)
            logger.error("durable_asgi.proxy: store unavailable: %s", exc)
            await _send_error(send, 502, "STORAGE_ERROR", "durable store unavailable")

    def _refused(self, sid: str | None, reason: str, status: int) -> None:
        """Count a refused request on one stream (`sid`; None: a create, whose failures are
        mostly its upstream's, counted in ``proxy.upstream.responses``)."""
        if sid is not None:
            self.proxy.middleware.engine.telemetry.refuse(reason, status, sid)

    # -- auth ---------------------------------------------------------------------------------

    def _service_secret(self, scope: Scope) -> str | None:
        value = header(scope["headers"], b"authorization")
        if value is not None:
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else value.decode("latin-1")
        secret = _query(scope).get("secret")
        return secret[-1] if secret else None

    def _service_auth(self, scope: Scope) -> None:
        given = self._service_secret(scope)
        if given is None:
            raise _Error(401, "MISSING_SECRET", "service authentication is required")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            raise _Error(401, "INVALID_SECRET", "the service secret is not valid")

    def _signature_auth(self, scope: Scope, stream: str, *, fallback: bool) -> None:
        query = _query(scope)
        expires, signature = query.get("expires"), query.get("signature")
        if not expires or not signature:
            if fallback and self._service_secret(scope) is not None:
                self._service_auth(scope)
                return
            raise _Error(401, "MISSING_SIGNATURE", "a pre-signed URL is required")
        text = expires[-1]
        expected = sign(self.secret, stream, int(text)) if text.isdigit() else ""
        if not hmac.compare_digest(expected.encode(), signature[-1].encode("utf-8", "replace")):
            raise _Error(401, "SIGNATURE_INVALID", "the pre-signed URL's signature is not valid")
        if int(text) < time.time():
            raise _Error(401, "SIGNATURE_EXPIRED", "the pre-signed URL has expired")

    def location(self, scope: Scope, stream: str) -> str:
        """The pre-signed URL of `stream`, absolute, on the request's own origin."""
        expires = int(time.time() + self.signature_ttl)
        host = header(scope["headers"], b"host")
        if host is None:
            server = scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}".encode() if server[1] else str(server[0]).encode()
        root = scope.get("root_path", "") or ""
        scheme = scope.get("scheme", "http")
        base = f"{scheme}://{host.decode('latin-1')}{quote(root)}{BASE_PATH}/{stream}"
        return f"{base}?expires={expires}&signature={sign(self.secret, stream, expires)}"

    # -- create -------------------------------------------------------------------------------

    def _upstream(self, scope: Scope) -> tuple[Upstream, str]:
        raw = scope["headers"]
        url = header(raw, b"upstream-url")
        if url is None or not url.strip():
            raise _Error(400, "MISSING_UPSTREAM_URL", "the Upstream-URL header is required")
        method = header(raw, b"upstream-method")
        if method is None or not method.strip():
            raise _Error(400, "MISSING_UPSTREAM_METHOD", "the Upstream-Method header is required")
        verb = method.decode("latin-1").strip().upper()
        if verb not in METHODS:
            raise _Error(
                400,
                "INVALID_UPSTREAM_METHOD",
                f"Upstream-Method must be one of GET, POST, PUT, PATCH, DELETE, not {verb[:20]!r}",
            )
        try:
            upstream = self.proxy.upstream(url.decode("latin-1").strip(), scope)
        except BadRequest as exc:
            code = "UPSTREAM_NOT_ALLOWED" if exc.status_code == 403 else "INVALID_UPSTREAM_URL"
            raise _Error(exc.status_code, code, exc.detail) from exc
        return upstream, verb

    def _upstream_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        headers = [(bytes(k).lower(), bytes(v)) for k, v in raw]
        out = [(k, v) for k, v in headers if k not in _PROXY_HEADERS]
        auth = header(raw, b"upstream-authorization")
        if auth is not None:
            out.append((b"authorization", auth))
        return out

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream, method = self._upstream(scope)
        options = self.proxy.middleware.options
        try:
            body = await DurableRequest(scope, receive, options.max_request_body).body()
        except BadRequest as exc:
            raise _Error(exc.status_code, "PAYLOAD_TOO_LARGE", exc.detail) from exc
        except ClientDisconnected:
            return
        stream = str(uuid.uuid4())
        sid = self.stream_id(stream)
        # The claim runs while the upstream is asked, so a store round trip isn't added to
        # the time to first byte. Its fresh id is handed out only with a 2xx upstream head:
        # on any other outcome the stream is deleted, never seen by anyone.
        claimed: list[Lease | BaseException] = []
        failed: _Error | None = None
        handed_over = False
        claimed_at = anyio.current_time()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._claim, sid, claimed)
                try:
                    response = await self._open(upstream, method, scope, body)
                except _Error as exc:
                    failed = exc
            if failed is not None:
                raise failed
            if not 200 <= response.status_code < 300:
                await self._refuse(response, send)
                return
            lease = claimed[0]
            if isinstance(lease, Lease):
                lease = await self._fresh(lease, claimed_at)
            if not isinstance(lease, Lease):
                with anyio.move_on_after(5, shield=True):
                    await response.aclose()
                raise lease
            handed_over = True
            await self._produce(upstream, stream, lease, response, scope, send)
        finally:
            if not handed_over and claimed and isinstance(claimed[0], Lease):
                with anyio.move_on_after(5, shield=True):
                    with contextlib.suppress(StoreError):
                        await self.proxy.middleware.store.delete(sid)

    async def _claim(self, sid: str, claimed: list[Lease | BaseException]) -> None:
        """Claim the fresh stream `sid`: its lease, or what the store raised, in `claimed`.
        Shielded: a request cancelled meanwhile still learns of the lease, and deletes it."""
        mw = self.proxy.middleware
        with anyio.CancelScope(shield=True):
            try:
                await mw.engine.ensure_open()
                lease = await mw.engine.telemetry.timed(
                    "claim", lambda: mw.store.claim(sid, lease_seconds=mw.options.lease_seconds)
                )
                assert isinstance(lease, Lease), "a fresh UUID is always claimable"
                claimed.append(lease)
            except Exception as exc:
                claimed.append(exc)

    async def _fresh(self, lease: Lease, claimed_at: float) -> Lease | BaseException:
        """`lease`, renewed if the upstream's head took a third of it or more (the producer's
        renewals start from now), or claimed again if it ran out meanwhile."""
        mw = self.proxy.middleware
        seconds = mw.options.lease_seconds
        if anyio.current_time() - claimed_at < seconds / 3:
            return lease
        try:
            await mw.store.renew(lease, lease_seconds=seconds)
        except LeaseLost:
            again: list[Lease | BaseException] = []
            await self._claim(lease.stream_id, again)
            return again[0]
        except StoreError as exc:
            return exc
        return lease

    async def _open(
        self, upstream: Upstream, method: str, scope: Scope, body: bytes
    ) -> httpx.Response:
        """The upstream's response, once its head is in (within `header_timeout`)."""
        relay = self.proxy.relay
        # The head within `header_timeout`; then up to `body_timeout` between chunks.
        timeout = relay.timeout
        read = max(self.header_timeout, self.body_timeout)
        try:
            with anyio.fail_after(self.header_timeout):
                return await relay.open(
                    upstream,
                    method,
                    self._upstream_headers(scope),
                    body,
                    timeout=httpx.Timeout(
                        connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
                    ),
                )
        except TimeoutError as exc:
            raise _Error(
                504, "UPSTREAM_TIMEOUT", f"the upstream sent no response head in time: {upstream}"
            ) from exc
        except httpx.TimeoutException as exc:
            raise _Error(504, "UPSTREAM_TIMEOUT", f"the upstream did not answer: {exc}") from exc
        except httpx.HTTPError as exc:
            raise _Error(
                502, "UPSTREAM_ERROR", f"the upstream could not be reached: {exc!r}"
            ) from exc

    async def _refuse(self, response: httpx.Response, send: Send) -> None:
        """A 3xx or an error head from upstream: no stream, the spec's answer."""
        status = response.status_code
        try:
            if 300 <= status < 400:
                raise _Error(400, "REDIRECT_NOT_ALLOWED", "Proxy cannot follow redirects")
            parts: list[bytes] = []
            size = 0
            try:
                with anyio.fail_after(self.header_timeout):
                    async for chunk in response.aiter_bytes():
                        parts.append(chunk)
                        size += len(chunk)
                        if size >= MAX_ERROR_BODY:
                            break
            except (httpx.HTTPError, TimeoutError):
                pass  # the error body is informational: relay what came
            body = b"".join(parts)[:MAX_ERROR_BODY]
            ctype = response.headers.get("content-type", "application/octet-stream")
            headers = [
                (b"upstream-status", str(status).encode()),
                (b"content-type", ctype.encode("latin-1")),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ]
            await send({"type": "http.response.start", "status": 502, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            with anyio.move_on_after(5, shield=True):
                await response.aclose()

    async def _produce(
        self,
        upstream: Upstream,
        stream: str,
        lease: Lease,
        response: httpx.Response,
        scope: Scope,
        send: Send,
    ) -> None:
        """Hand the open `response` to a producer of the claimed stream, answer 201."""
        mw = self.proxy.middleware
        producer = Producer(mw.engine, lease, mw.options, NAMESPACE)
        relay, inactivity = self.proxy.relay, self.body_timeout

        async def pipe(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await relay.relay(upstream, response, send, inactivity=inactivity)
            except UpstreamError as exc:
                logger.warning("durable_asgi.proxy: %s", exc)
                raise

        run_scope = {**scope, "method": "GET", "path": f"{BASE_PATH}/{stream}"}
        async with anyio.create_task_group() as group:
            # The 201 goes out now, not once the producer's task has run (a loop turn later,
            # and many under load): that task, scheduled first, runs before anything the
            # client can send next, and a read waits for the stored head anyway.
            group.start_soon(producer.run, pipe, run_scope, b"", None)
            ctype = response.headers.get("content-type", "application/octet-stream")
            headers = [
                (b"location", self.location(scope, stream).encode()),
                (b"upstream-content-type", ctype.encode("latin-1")),
                (b"stream-id", stream.encode()),
                (b"content-length", b"0"),
                (b"cache-control", b"no-store"),
            ]
            try:
                await send({"type": "http.response.start", "status": 201, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
            except OSError:
                pass  # the client left: the upstream goes on (read it later by id)
        # `producer.run` returns when the upstream ended, was stopped, or hit a limit.

    # -- one stream ---------------------------------------------------------------------------

    async def _stream_op(
        self, method: str, stream: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        sid = self.stream_id(stream)
        if method == "GET":
            self._signature_auth(scope, stream, fallback=True)
            await self.reader.get(sid, scope, receive, send)
        elif method == "HEAD":
            self._service_auth(scope)
            await self.reader.head(sid, send)
        elif method == "PATCH":
            self._signature_auth(scope, stream, fallback=False)
            action = _query(scope).get("action")
            if not action or action[-1] != "abort":
                raise _Error(400, "INVALID_ACTION", "the only action is abort")
            if await self.proxy.store.info(sid) is None:
                raise _Error(404, "STREAM_NOT_FOUND", "the stream does not exist")
            await self.proxy.middleware.engine.abort(sid, ttl=self.proxy.middleware.options.ttl)
            await _empty(send, 204)
        elif method == "DELETE":
            self._service_auth(scope)
            await self.proxy.middleware.engine.delete(sid)
            await _empty(send, 204)
        else:
            raise _Error(405, "METHOD_NOT_ALLOWED", f"{method} is not served on a stream")


def is_route(route: str) -> bool:
    return route == BASE_PATH or route.startswith(BASE_PATH + "/")


def route_of(scope: Scope) -> str:
    return request_target(scope)


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))


async def _empty(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    body = error_body(code, message)
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _with_cors(send: Send) -> Send:
    """`send`, with the protocol's CORS headers on every response head."""
    return with_headers(send, _CORS, (b"access-control-",))
