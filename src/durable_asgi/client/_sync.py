"""The blocking shell: `SyncDurableClient` and `SyncDurableStream` send with `httpx.Client`
and do what the core's `Cursor` decides, the same way as the async shell.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._common import ClientBase, StreamBase, transient
from ._core import Call, Control, Request, control_headers, control_result, make_call

if TYPE_CHECKING:
    import httpx
    from typing_extensions import Self, Unpack


class _Closing:
    """Leaving ``with`` closes: a client its httpx client, a stream its connection."""

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncDurableStream(StreamBase["SyncDurableClient"], _Closing):
    """The blocking twin of `DurableStream`: iterate it, or ``stream.read()``.

    Example::

        with client.stream("GET", "/api/chat", key="k", offset=1234) as stream:
            for chunk in stream:
                print(chunk.decode(), end="")
    """

    _iterator: Generator[bytes, None, None] | None = None

    def __enter__(self) -> Self:
        if self._response is None and self.status_code is None:
            self._connect()
        return self

    def __iter__(self) -> Generator[bytes, None, None]:
        self._claim()
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
        """The body's bytes, each once: on a break, resume where the last chunk ended."""
        cursor = self._cursor
        try:
            while True:
                if self._response is None:
                    self._connect()
                    assert self._response is not None
                try:
                    for data in self._response.iter_bytes():
                        if data := cursor.take(data):
                            yield data
                except Exception as exc:
                    if not cursor.durable or not transient(exc):
                        raise  # a body that isn't durable can't be resumed: pass its error on
                    self._close_response()
                    time.sleep(cursor.broke(exc))
                    continue
                self._close_response()
                cursor.ended()
                return
        finally:
            self._close_response()

    def _connect(self) -> None:
        """(Re)connect until an answer worth reading comes; the cursor says what each means."""
        cursor = self._cursor
        while True:
            try:
                if cursor.needs_probe:
                    cursor.probed(self._client._control("status", self._call, cursor.key))
                response = self._client.http.send(self._attempt(), stream=True)
            except Exception as exc:
                if not transient(exc):
                    raise
                time.sleep(cursor.broke(exc))
                continue
            try:
                verdict = cursor.accept(response.status_code, response.headers)
                if verdict == "plain" and not response.is_success:
                    response.read()
                    response.raise_for_status()
            except BaseException:  # even a cancellation: don't leave the connection open
                response.close()
                raise
            if verdict == "retry":
                response.close()
                time.sleep(cursor.broke(None))
                continue
            self._opened(response)
            return


class SyncDurableClient(ClientBase["httpx.Client", SyncDurableStream], _Closing):
    """The blocking twin of `DurableClient`, on `httpx.Client`: same options, same methods.

    Example::

        with SyncDurableClient("http://127.0.0.1:8000") as client:
            with client.stream("POST", "/api/chat", key="k", json={"q": "hi"}) as stream:
                for chunk in stream:
                    print(chunk.decode(), end="")
    """

    _stream_class = SyncDurableStream

    def status(
        self, url: str, *, key: str, method: str = "GET", **request: Unpack[Request]
    ) -> dict[str, Any]:
        """The stream's status, or ``{"state": "absent"}``; see `DurableClient.status`."""
        return self._control("status", make_call(method, url, **request), key)

    def abort(self, url: str, *, key: str, method: str = "GET", **request: Unpack[Request]) -> None:
        """Stop the stream's handler; bytes so far stay readable. Idempotent."""
        self._control("abort", make_call(method, url, **request), key)

    def delete(
        self, url: str, *, key: str, method: str = "GET", **request: Unpack[Request]
    ) -> None:
        """Stop the stream if it runs and remove it from the server. Idempotent."""
        self._control("delete", make_call(method, url, **request), key)

    def close(self) -> None:
        """Close the httpx client if this object made it."""
        if self._owned:
            self.http.close()

    def __enter__(self) -> Self:
        return self

    def _http_class(self) -> type[httpx.Client]:
        import httpx

        return httpx.Client

    def _control(self, operation: Control, call: Call, key: str) -> dict[str, Any]:
        retry = self.options.cursor(key, 0)  # only for its retry count and backoff
        headers = control_headers(key, self.options.key_header, operation, call.headers)
        while True:
            try:
                response = self.http.send(self._request(call, headers))
            except Exception as exc:
                if not transient(exc):
                    raise
                time.sleep(retry.broke(exc))
                continue
            url = str(response.request.url)
            return control_result(
                operation, response.status_code, response.headers, response.content, url
            )
