"""Python clients for durable_asgi streams: every byte exactly once, across reconnects.

`DurableClient` (async) and `SyncDurableClient` read a durable response to its end. When the
connection drops or the body ends abnormally while the stream still runs on the server, they
reconnect with ``Durable-Offset: <bytes yielded so far>`` and go on yielding from there, so the
bytes you get are the whole body, each once. A stream that can't be finished (its handler
failed, it was aborted, deleted or expired) raises `StreamFailed`.

    async with DurableClient("http://127.0.0.1:8000") as client:
        async with client.stream("POST", "/api/chat", key="chat-42", json={"q": "hi"}) as s:
            async for chunk in s:
                print(chunk.decode(), end="")

Needs httpx: ``pip install "durable-asgi[client]"``. It is imported when a client is made, so
importing this module never fails.

Deliberate choices, so nobody "fixes" them back:

- Only a clean end of the body ends a stream. An abnormal end is never passed on as one.
- A response without a ``Durable-State`` header is not durable (no middleware, or no key for
  this request): its body is yielded as it is, and a broken one raises httpx's error, because
  a retry would run the handler again.
- Reconnecting at offset 0 asks for the stream's status first: a request at offset 0 for a
  failed stream would start its handler again, which a reconnect must never do.
"""

from __future__ import annotations

import json as jsonlib
import random
import secrets
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .exceptions import DurableClientError, StreamFailed

if TYPE_CHECKING:
    import httpx
    from typing_extensions import Self

__all__ = [
    "DurableClient",
    "DurableClientError",
    "DurableStream",
    "StreamFailed",
    "SyncDurableClient",
    "SyncDurableStream",
]

Control = Literal["status", "abort", "delete"]
Verdict = Literal["stream", "plain", "retry"]

#: Durable states after which a broken body can't go on.
_FINAL = frozenset({"failed", "aborted", "absent"})
#: Statuses worth retrying while reconnecting: the server is busy or its store is down.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _require_httpx() -> None:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ImportError(
            'durable_asgi.client needs httpx: pip install "durable-asgi[client]"'
        ) from None


def _transient(exc: BaseException) -> bool:
    """Whether a transport error may go away by reconnecting (a drop, a timeout, a cut body)."""
    import httpx

    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


_WHY = {
    "failed": "the stream failed on the server (its handler raised)",
    "aborted": "the stream was aborted",
    "absent": "the stream doesn't exist on the server (never started, deleted or expired)",
}


@dataclass
class _Cursor:
    """One stream's progress and the decisions about it, without I/O (shared by the async and
    sync streams): what to ask for next, what an answer means, when to give up."""

    key: str
    key_header: str | None
    offset: int
    max_retries: int
    backoff_initial: float
    backoff_max: float
    durable: bool | None = None
    """None until the first answer; then whether it carried durable headers."""
    state: str | None = None
    """The Durable-State of the answer being read."""
    skip: int = 0
    attempts: int = 0
    reconnects: int = 0
    resumed: bool = False
    _rng: random.Random = field(default_factory=random.Random)

    def headers(self, base: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(base or {})
        if self.key_header is not None:
            headers[self.key_header] = self.key
        if self.offset > 0 or self.durable:
            # Explicit on every reconnect, even at 0: a server that reads it as "resume only"
            # never starts the handler for it (`needs_probe` covers servers that don't).
            headers["Durable-Offset"] = str(self.offset)
        return headers

    @property
    def needs_probe(self) -> bool:
        """Reconnecting at offset 0: ask for the status first (see the module docstring)."""
        return self.durable is True and self.offset == 0

    def probed(self, state: str) -> None:
        if state in ("absent", "failed"):
            raise self.final(state)

    def accept(self, status: int, headers: httpx.Headers) -> Verdict:
        """What an answer means: stream it, pass it on untouched (``plain``), or retry.

        Raises `StreamFailed` for answers that end the stream for good."""
        state = headers.get("durable-state")
        ok = 200 <= status < 300
        if self.durable is None:
            if status == 416 and state is not None:
                raise self.final(state)
            if not ok or state is None or status in (204, 205):
                self.durable = False  # an error, a plain response, or "nothing to join"
                return "plain"
            self.resumed = headers.get("durable-replay") == "true"
        elif status == 416:
            raise self.final(state or "absent")
        elif status in _RETRY_STATUSES:
            return "retry"
        elif not ok:
            raise self.final("protocol", f"HTTP {status} while reconnecting")
        start = headers.get("durable-offset", "")
        if state is None or not start.isdigit() or int(start) > self.offset:
            raise self.final(
                "protocol",
                f"a resume from byte {self.offset} was answered with Durable-Offset "
                f"{start or 'missing'} (Durable-State {state})",
            )
        self.durable = True
        self.state = state
        self.skip = self.offset - int(start)
        return "stream"

    def take(self, data: bytes) -> bytes:
        """The part of `data` not delivered yet; counts it as delivered."""
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
        if data:
            self.offset += len(data)
            self.attempts = 0  # progress: the retry budget is per outage
        return data

    def ended(self) -> None:
        """The body ended cleanly. Only running/complete streams do; be strict about others."""
        if self.durable and self.state not in ("running", "complete"):
            raise self.final(self.state or "failed")

    def broke(self, cause: BaseException | None) -> float:
        """The connection broke (or a retryable answer came): seconds to wait before the next
        attempt. Raises `StreamFailed` when there is nothing to wait for."""
        if self.durable and self.state not in ("running", "complete"):
            raise self.final(self.state or "failed") from cause
        self.attempts += 1
        if self.attempts > self.max_retries:
            raise StreamFailed(
                f"could not reconnect after {self.max_retries} attempts; "
                f"{self.offset} bytes were delivered",
                key=self.key,
                state="unreachable",
                offset=self.offset,
            ) from cause
        if self.durable:
            self.reconnects += 1
        if self.attempts == 1:
            return 0.0  # the usual cause is one dead connection: try again at once
        delay = min(self.backoff_max, self.backoff_initial * 2.0 ** (self.attempts - 2))
        return delay * self._rng.uniform(0.8, 1.2)

    def final(self, state: str, detail: str | None = None) -> StreamFailed:
        why = detail or _WHY.get(state, f"the stream can't be continued (state {state})")
        return StreamFailed(
            f"{why}; {self.offset} bytes were delivered",
            key=self.key,
            state=state,
            offset=self.offset,
        )


@dataclass(frozen=True)
class _Options:
    """A client's reconnect settings."""

    key_header: str | None
    max_retries: int
    backoff_initial: float
    backoff_max: float

    def cursor(self, key: str | None, offset: int) -> _Cursor:
        if offset < 0:
            raise ValueError("offset must not be negative")
        return _Cursor(
            key=key if key is not None else secrets.token_hex(16),
            key_header=self.key_header,
            offset=offset,
            max_retries=self.max_retries,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
        )


@dataclass
class _Call:
    """One request as given: resent unchanged (plus key and offset) on every attempt."""

    method: str
    url: str
    params: Mapping[str, str] | None
    headers: Mapping[str, str] | None
    content: bytes | None


def _call(
    method: str,
    url: str,
    params: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
    content: bytes | str | None,
    json: Any,
) -> _Call:
    headers = dict(headers or {})
    if json is not None:
        if content is not None:
            raise TypeError("pass content= or json=, not both")
        # Encoded once, so every attempt sends the very same bytes.
        content = jsonlib.dumps(json, separators=(",", ":")).encode()
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
    if isinstance(content, str):
        content = content.encode()
    return _Call(method.upper(), url, params, headers, content)


def _control_result(operation: Control, response: httpx.Response) -> dict[str, Any] | None:
    state = response.headers.get("durable-state")
    if operation == "status":
        if response.status_code == 404 and state == "absent":
            return {"state": "absent"}
        if response.status_code == 200 and state is not None:
            result: dict[str, Any] = response.json()
            return result
    elif response.is_success:
        return None
    raise DurableClientError(
        f"the server did not answer Durable-Control: {operation} "
        f"(HTTP {response.status_code}) for {response.request.url}: is DurableMiddleware in "
        "front of it, and is the key sent where it reads it?"
    )


def _control_headers(
    key: str, key_header: str | None, operation: Control, headers: Mapping[str, str] | None
) -> dict[str, str]:
    out = dict(headers or {})
    if key_header is not None:
        out[key_header] = key
    out["Durable-Control"] = operation
    return out


class DurableClient:
    """An async client for durable streams, on httpx.

    `base_url` is the server's URL, or an `httpx.AsyncClient` to use (you close it; a client
    made here is closed by `aclose` or ``async with``). `key_header` is the header carrying
    the key (None when the server takes keys from the URL or body). A broken stream is retried
    up to `max_retries` times in a row without receiving a byte, waiting ``backoff_initial``
    seconds, then twice as long each time, up to `backoff_max` (the first retry goes at once).
    `timeout` is the httpx timeout of a client made here (a silent connection for that long is
    treated as dropped).

    Example::

        async with DurableClient("http://127.0.0.1:8000") as client:
            body = await client.stream("POST", "/api/chat", key="k", json={"q": "hi"}).aread()
            print(await client.status("/api/chat", key="k"))
    """

    def __init__(
        self,
        base_url: str | httpx.AsyncClient = "",
        *,
        key_header: str | None = "Durable-Key",
        max_retries: int = 10,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 60.0,
    ) -> None:
        _require_httpx()
        import httpx

        if isinstance(base_url, httpx.AsyncClient):
            self.http, self._owned = base_url, False
        else:
            self.http, self._owned = httpx.AsyncClient(base_url=base_url, timeout=timeout), True
        self.options = _Options(key_header, max_retries, backoff_initial, backoff_max)

    def stream(
        self,
        method: str,
        url: str,
        *,
        key: str | None = None,
        offset: int = 0,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> DurableStream:
        """Send a request and read its durable response, every byte once, across reconnects.

        `key` names the stream (default: a new random one, in `DurableStream.key`). `offset`
        starts from that byte of an existing stream (`StreamFailed` with state ``absent`` if
        there is none). Use the result with ``async with`` (closes the connection when you
        stop early) and ``async for``, or ``await stream.aread()`` for the whole body.

        A non-2xx first answer raises `httpx.HTTPStatusError` (its body read).
        """
        cursor = self.options.cursor(key, offset)
        call = _call(method, url, params, headers, content, json)
        return DurableStream(self, call, cursor)

    async def status(
        self,
        url: str,
        *,
        key: str,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> dict[str, Any]:
        """The stream's status: ``{"key", "state", "in_progress", "offset", "chunks",
        "readers", "status_code", "created_at", "updated_at", "expires_at"}``, or
        ``{"state": "absent"}`` when there is no such stream.

        A control request goes to the same URL as the stream's requests, with `key` in the key
        header. When the server reads the key from the body (``keys.json_body``), or needs
        the request's auth headers, pass the same `method`, `headers` and `json`/`content` as
        the stream's request (abort and delete take them too).
        """
        result = await self._control(
            "status", _call(method, url, params, headers, content, json), key
        )
        assert result is not None
        return result

    async def abort(
        self,
        url: str,
        *,
        key: str,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> None:
        """Stop the stream's handler; bytes so far stay readable. Idempotent."""
        await self._control("abort", _call(method, url, params, headers, content, json), key)

    async def delete(
        self,
        url: str,
        *,
        key: str,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> None:
        """Stop the stream if it runs and remove it from the server. Idempotent."""
        await self._control("delete", _call(method, url, params, headers, content, json), key)

    async def aclose(self) -> None:
        """Close the httpx client if this object made it."""
        if self._owned:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _control(self, operation: Control, call: _Call, key: str) -> dict[str, Any] | None:
        cursor = self.options.cursor(key, 0)
        request_headers = _control_headers(key, self.options.key_header, operation, call.headers)
        while True:
            try:
                response = await self.http.request(
                    call.method,
                    call.url,
                    params=call.params,
                    headers=request_headers,
                    content=call.content,
                )
            except Exception as exc:
                if not _transient(exc):
                    raise
                await anyio.sleep(cursor.broke(exc))
                continue
            return _control_result(operation, response)


class _StreamState:
    """What the async and sync streams tell about themselves."""

    _cursor: _Cursor
    _iterated = False
    status_code: int | None = None
    """The first answer's status (once connected)."""
    headers: httpx.Headers | None = None
    """The first answer's headers (once connected)."""

    @property
    def key(self) -> str:
        """The stream's key (the one given, or the one generated)."""
        return self._cursor.key

    @property
    def offset(self) -> int:
        """Bytes of the stream delivered so far, counted from its start."""
        return self._cursor.offset

    @property
    def reconnects(self) -> int:
        """Reconnect attempts made after the connection broke mid-stream."""
        return self._cursor.reconnects

    @property
    def durable(self) -> bool | None:
        """Whether the server answered with durable headers (None before the first answer).
        A body that isn't durable is passed on as it is and can't be resumed."""
        return self._cursor.durable

    @property
    def resumed(self) -> bool:
        """Served from the store: the handler had already been started by an earlier request."""
        return self._cursor.resumed


class DurableStream(_StreamState):
    """The body of one durable response, made by `DurableClient.stream`.

    Iterate it (once) for the bytes; `key`, `offset`, `reconnects`, `resumed`, `status_code`
    and `headers` describe it.
    """

    def __init__(self, client: DurableClient, call: _Call, cursor: _Cursor) -> None:
        self._client = client
        self._call = call
        self._cursor = cursor
        self._response: httpx.Response | None = None
        self._iterator: AsyncGenerator[bytes, None] | None = None

    async def __aenter__(self) -> Self:
        if self._response is None and self.status_code is None:
            await self._connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        if self._iterated:
            raise RuntimeError("a DurableStream can be iterated only once")
        self._iterated = True
        self._iterator = self._iterate()
        return self._iterator

    async def aread(self) -> bytes:
        """The whole body (the rest of it, from `offset`)."""
        async with self:
            return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Close the connection (nothing on the server changes: the stream goes on)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            await iterator.aclose()
        await self._close_response()

    async def _close_response(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()

    async def _iterate(self) -> AsyncGenerator[bytes, None]:
        cursor = self._cursor
        try:
            while True:
                if self._response is None:
                    await self._connect()
                    assert self._response is not None
                try:
                    async for data in self._response.aiter_bytes():
                        if cursor.durable:
                            data = cursor.take(data)
                        if data:
                            yield data
                except Exception as exc:
                    if not cursor.durable or not _transient(exc):
                        raise
                    await self._close_response()
                    await anyio.sleep(cursor.broke(exc))
                    continue
                await self._close_response()
                cursor.ended()
                return
        finally:
            await self._close_response()

    async def _connect(self) -> None:
        client, call, cursor = self._client, self._call, self._cursor
        while True:
            try:
                if cursor.needs_probe:
                    status = await client._control("status", call, cursor.key)
                    assert status is not None
                    cursor.probed(status["state"])
                request = client.http.build_request(
                    call.method,
                    call.url,
                    params=call.params,
                    headers=cursor.headers(call.headers),
                    content=call.content,
                )
                response = await client.http.send(request, stream=True)
            except Exception as exc:
                if not _transient(exc):
                    raise
                await anyio.sleep(cursor.broke(exc))
                continue
            try:
                verdict = cursor.accept(response.status_code, response.headers)
                if verdict == "plain" and not response.is_success:
                    await response.aread()
                    response.raise_for_status()
            except BaseException:
                await response.aclose()
                raise
            if verdict == "retry":
                await response.aclose()
                await anyio.sleep(cursor.broke(None))
                continue
            if self.status_code is None:
                self.status_code, self.headers = response.status_code, response.headers
            self._response = response
            return


class SyncDurableClient:
    """The blocking twin of `DurableClient`, on `httpx.Client`: same options, same methods.

    Example::

        with SyncDurableClient("http://127.0.0.1:8000") as client:
            with client.stream("POST", "/api/chat", key="k", json={"q": "hi"}) as stream:
                for chunk in stream:
                    print(chunk.decode(), end="")
    """

    def __init__(
        self,
        base_url: str | httpx.Client = "",
        *,
        key_header: str | None = "Durable-Key",
        max_retries: int = 10,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 60.0,
    ) -> None:
        _require_httpx()
        import httpx

        if isinstance(base_url, httpx.Client):
            self.http, self._owned = base_url, False
        else:
            self.http, self._owned = httpx.Client(base_url=base_url, timeout=timeout), True
        self.options = _Options(key_header, max_retries, backoff_initial, backoff_max)

    def stream(
        self,
        method: str,
        url: str,
        *,
        key: str | None = None,
        offset: int = 0,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> SyncDurableStream:
        """Send a request and read its durable response; see `DurableClient.stream`."""
        cursor = self.options.cursor(key, offset)
        call = _call(method, url, params, headers, content, json)
        return SyncDurableStream(self, call, cursor)

    def status(
        self,
        url: str,
        *,
        key: str,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> dict[str, Any]:
        """The stream's status, or ``{"state": "absent"}``; see `DurableClient.status`."""
        result = self._control("status", _call(method, url, params, headers, content, json), key)
        assert result is not None
        return result

    def abort(
        self,
        url: str,
        *,
        key: str,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> None:
        """Stop the stream's handler; bytes so far stay readable. Idempotent."""
        self._control("abort", _call(method, url, params, headers, content, json), key)

    def delete(
        self,
        url: str,
        *,
        key: str,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | str | None = None,
        json: Any = None,
    ) -> None:
        """Stop the stream if it runs and remove it from the server. Idempotent."""
        self._control("delete", _call(method, url, params, headers, content, json), key)

    def close(self) -> None:
        """Close the httpx client if this object made it."""
        if self._owned:
            self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _control(self, operation: Control, call: _Call, key: str) -> dict[str, Any] | None:
        cursor = self.options.cursor(key, 0)
        request_headers = _control_headers(key, self.options.key_header, operation, call.headers)
        while True:
            try:
                response = self.http.request(
                    call.method,
                    call.url,
                    params=call.params,
                    headers=request_headers,
                    content=call.content,
                )
            except Exception as exc:
                if not _transient(exc):
                    raise
                time.sleep(cursor.broke(exc))
                continue
            return _control_result(operation, response)


class SyncDurableStream(_StreamState):
    """The blocking twin of `DurableStream`: iterate it, or ``stream.read()``."""

    def __init__(self, client: SyncDurableClient, call: _Call, cursor: _Cursor) -> None:
        self._client = client
        self._call = call
        self._cursor = cursor
        self._response: httpx.Response | None = None
        self._iterator: Generator[bytes, None, None] | None = None

    def __enter__(self) -> Self:
        if self._response is None and self.status_code is None:
            self._connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Generator[bytes, None, None]:
        if self._iterated:
            raise RuntimeError("a SyncDurableStream can be iterated only once")
        self._iterated = True
        self._iterator = self._iterate()
        return self._iterator

    def read(self) -> bytes:
        """The whole body (the rest of it, from `offset`)."""
        with self:
            return b"".join(list(self))

    def close(self) -> None:
        """Close the connection (nothing on the server changes: the stream goes on)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator.close()
        self._close_response()

    def _close_response(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()

    def _iterate(self) -> Generator[bytes, None, None]:
        cursor = self._cursor
        try:
            while True:
                if self._response is None:
                    self._connect()
                    assert self._response is not None
                try:
                    for data in self._response.iter_bytes():
                        if cursor.durable:
                            data = cursor.take(data)
                        if data:
                            yield data
                except Exception as exc:
                    if not cursor.durable or not _transient(exc):
                        raise
                    self._close_response()
                    time.sleep(cursor.broke(exc))
                    continue
                self._close_response()
                cursor.ended()
                return
        finally:
            self._close_response()

    def _connect(self) -> None:
        client, call, cursor = self._client, self._call, self._cursor
        while True:
            try:
                if cursor.needs_probe:
                    status = client._control("status", call, cursor.key)
                    assert status is not None
                    cursor.probed(status["state"])
                request = client.http.build_request(
                    call.method,
                    call.url,
                    params=call.params,
                    headers=cursor.headers(call.headers),
                    content=call.content,
                )
                response = client.http.send(request, stream=True)
            except Exception as exc:
                if not _transient(exc):
                    raise
                time.sleep(cursor.broke(exc))
                continue
            try:
                verdict = cursor.accept(response.status_code, response.headers)
                if verdict == "plain" and not response.is_success:
                    response.read()
                    response.raise_for_status()
            except BaseException:
                response.close()
                raise
            if verdict == "retry":
                response.close()
                time.sleep(cursor.broke(None))
                continue
            if self.status_code is None:
                self.status_code, self.headers = response.status_code, response.headers
            self._response = response
            return
