"""What the async and sync shells share, none of which waits on the network: making the httpx
client, `stream()`, building a request, and what a stream tells about itself.

httpx is imported only inside functions (`require_httpx`), so importing this never fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._core import Call, Cursor, Options, make_call

if TYPE_CHECKING:
    import httpx

HttpT = TypeVar("HttpT", "httpx.AsyncClient", "httpx.Client")
ClientT = TypeVar("ClientT", bound="ClientBase[Any, Any]")
StreamT = TypeVar("StreamT", bound="StreamBase[Any]")


def require_httpx() -> None:
    """Raise an ImportError that says what to install when httpx is missing."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ImportError(
            'durable_asgi.client needs httpx: pip install "durable-asgi[client]"'
        ) from None


def transient(exc: BaseException) -> bool:
    """Whether a transport error may go away by reconnecting (a drop, a timeout, a cut body)."""
    import httpx

    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


class ClientBase(Generic[HttpT, StreamT]):
    """The constructor and `stream` of both clients; see `DurableClient` for the options."""

    http: HttpT
    _stream_class: type[StreamT]
    """The shell's stream class, made by `stream`."""

    def __init__(
        self,
        base_url: str | HttpT = "",
        *,
        key_header: str | None = "Durable-Key",
        max_retries: int = 10,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 60.0,
    ) -> None:
        require_httpx()
        http_class = self._http_class()
        if isinstance(base_url, http_class):
            self.http, self._owned = base_url, False
        else:  # mypy can't narrow by a class in a variable: this is the URL
            url = cast("str", base_url)
            self.http, self._owned = http_class(base_url=url, timeout=timeout), True
        self.options = Options(key_header, max_retries, backoff_initial, backoff_max)

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
    ) -> StreamT:
        """Send a request and read its durable response, every byte once, across reconnects.

        `key` names the stream (default: a new random one, in `DurableStream.key`). `offset`
        starts from that byte of an existing stream (`StreamFailed` with state ``absent`` if
        there is none). The request is sent the same on every attempt (`json` is encoded once).
        Use the result with ``async with`` / ``with`` (closes the connection when you stop
        early) and ``async for`` / ``for``, or ``await stream.aread()`` / ``stream.read()``
        for the whole body.

        A non-2xx first answer raises `httpx.HTTPStatusError` (its body read).
        """
        cursor = self.options.cursor(key, offset)
        call = make_call(method, url, params, headers, content, json)
        return self._stream_class(self, call, cursor)

    def _http_class(self) -> type[HttpT]:
        """The shell's httpx client class (httpx is imported only once a client is made)."""
        raise NotImplementedError

    def _request(self, call: Call, headers: dict[str, str]) -> httpx.Request:
        """One attempt of `call` with `headers`; built anew each time, as httpx.request does."""
        return self.http.build_request(
            call.method, call.url, params=call.params, headers=headers, content=call.content
        )


class StreamBase(Generic[ClientT]):
    """What the async and sync streams tell about themselves."""

    status_code: int | None = None
    """The first answer's status (once connected)."""
    headers: httpx.Headers | None = None
    """The first answer's headers (once connected)."""

    def __init__(self, client: ClientT, call: Call, cursor: Cursor) -> None:
        self._client = client
        self._call = call
        self._cursor = cursor
        self._response: httpx.Response | None = None
        self._iterated = False

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

    def _claim(self) -> None:
        """Iterating twice would deliver the rest twice, or lose it: allow it once."""
        if self._iterated:
            raise RuntimeError(f"a {type(self).__name__} can be iterated only once")
        self._iterated = True

    def _attempt(self) -> httpx.Request:
        """The next attempt of the stream's request: resuming at the offset reached."""
        return self._client._request(self._call, self._cursor.headers(self._call.headers))

    def _opened(self, response: httpx.Response) -> None:
        """`response` is the one to read from now; the first one describes the stream."""
        if self.status_code is None:
            self.status_code, self.headers = response.status_code, response.headers
        self._response = response
