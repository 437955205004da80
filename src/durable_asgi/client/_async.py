"""The async shell: `DurableClient` and `DurableStream` send with `httpx.AsyncClient` and do
what the core's `Cursor` decides. Waits go through anyio, so they work under asyncio and trio.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from ._common import ClientBase, StreamBase, transient
from ._core import Call, Control, Request, control_headers, control_result, make_call

if TYPE_CHECKING:
    import httpx
    from typing_extensions import Self, Unpack


class _Closing:
    """Leaving ``async with`` closes: a client its httpx client, a stream its connection."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class DurableStream(StreamBase["DurableClient"], _Closing):
    """The body of one durable response, made by `DurableClient.stream`.

    Iterate it (once) for the bytes; `key`, `offset`, `reconnects`, `resumed`, `status_code`
    and `headers` describe it.

    Example::

        async with client.stream("GET", "/api/chat", key="k", offset=1234) as stream:
            async for chunk in stream:
                print(chunk.decode(), end="")
    """

    _iterator: AsyncGenerator[bytes, None] | None = None

    async def __aenter__(self) -> Self:
        if self._response is None and self.status_code is None:
            await self._connect()
        return self

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        self._claim()
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
        """The body's bytes, each once: on a break, resume where the last chunk ended."""
        cursor = self._cursor
        try:
            while True:
                if self._response is None:
                    await self._connect()
                    assert self._response is not None
                try:
                    async for data in self._response.aiter_bytes():
                        if data := cursor.take(data):
                            yield data
                except Exception as exc:
                    if not cursor.durable or not transient(exc):
                        raise  # a body that isn't durable can't be resumed: pass its error on
                    await self._close_response()
                    await anyio.sleep(cursor.broke(exc))
                    continue
                await self._close_response()
                cursor.ended()
                return
        finally:
            await self._close_response()

    async def _connect(self) -> None:
        """(Re)connect until an answer worth reading comes; the cursor says what each means."""
        cursor = self._cursor
        while True:
            try:
                if cursor.needs_probe:
                    cursor.probed(await self._client._control("status", self._call, cursor.key))
                response = await self._client.http.send(self._attempt(), stream=True)
            except Exception as exc:
                if not transient(exc):
                    raise
                await anyio.sleep(cursor.broke(exc))
                continue
            try:
                verdict = cursor.accept(response.status_code, response.headers)
                if verdict == "plain" and not response.is_success:
                    await response.aread()
                    response.raise_for_status()
            except BaseException:  # even a cancellation: don't leave the connection open
                await response.aclose()
                raise
            if verdict == "retry":
                await response.aclose()
                await anyio.sleep(cursor.broke(None))
                continue
            self._opened(response)
            return


class DurableClient(ClientBase["httpx.AsyncClient", DurableStream], _Closing):
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

    _stream_class = DurableStream

    async def status(
        self, url: str, *, key: str, method: str = "GET", **request: Unpack[Request]
    ) -> dict[str, Any]:
        """The stream's status: ``{"key", "state", "in_progress", "offset", "chunks",
        "readers", "status_code", "created_at", "updated_at", "expires_at"}``, or
        ``{"state": "absent"}`` when there is no such stream.

        A control request goes to the same URL as the stream's requests, with `key` in the key
        header. When the server reads the key from the body (``keys.json_body``), or needs
        the request's auth headers, pass the same `method`, `headers` and `json`/`content` as
        the stream's request (abort and delete take them too): `request` takes the keywords
        of `stream`, ``params``, ``headers``, ``content`` and ``json``.
        """
        return await self._control("status", make_call(method, url, **request), key)

    async def abort(
        self, url: str, *, key: str, method: str = "GET", **request: Unpack[Request]
    ) -> None:
        """Stop the stream's handler; bytes so far stay readable. Idempotent."""
        await self._control("abort", make_call(method, url, **request), key)

    async def delete(
        self, url: str, *, key: str, method: str = "GET", **request: Unpack[Request]
    ) -> None:
        """Stop the stream if it runs and remove it from the server. Idempotent."""
        await self._control("delete", make_call(method, url, **request), key)

    async def aclose(self) -> None:
        """Close the httpx client if this object made it."""
        if self._owned:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    def _http_class(self) -> type[httpx.AsyncClient]:
        import httpx

        return httpx.AsyncClient

    async def _control(self, operation: Control, call: Call, key: str) -> dict[str, Any]:
        retry = self.options.cursor(key, 0)  # only for its retry count and backoff
        headers = control_headers(key, self.options.key_header, operation, call.headers)
        while True:
            try:
                response = await self.http.send(self._request(call, headers))
            except Exception as exc:
                if not transient(exc):
                    raise
                await anyio.sleep(retry.broke(exc))
                continue
            url = str(response.request.url)
            return control_result(
                operation, response.status_code, response.headers, response.content, url
            )
