"""Real servers on loopback, and a raw HTTP/1.1 client that can really hang up.

This is the one harness for every test that needs a real server (streaming, disconnects,
several requests racing on one key). `httpx.ASGITransport` buffers whole responses and cannot
disconnect, so it cannot test either; `tests/support/asgi.py` covers the cases that need no socket.

    with running_server(app) as server:                    # uvicorn on a free port
        async with open_stream(server.url, "/chat", headers={"Durable-Key": "k"}) as resp:
            first = await resp.read_exactly(10)
        # leaving the block closed the TCP connection mid-stream
        result = await fetch(server.url, "/chat", headers={"Durable-Key": "k"})
        assert result.complete and result.header("durable-replay") == "true"

`running_server` runs the server in a background thread with its own asyncio loop, so the same
`with` works in sync tests and in asyncio or trio tests. Leave client blocks before the server
block: the server waits for open connections when it shuts down. Given an import string
("tests.support.apps:app") instead of an app, it runs the server's CLI in a subprocess, which a test
can kill (`server.kill()`) to play a crashed machine.

The client speaks HTTP/1.1 over `anyio.connect_tcp`, one request per connection, and decodes
content-length and chunked bodies itself, so it can tell a body that ended properly from one
cut short (`IncompleteBody`). Every read has a timeout, so a test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import anyio.abc

from durable_asgi._types import ASGIApp

__all__ = [
    "TLS",
    "IncompleteBody",
    "Result",
    "RunningServer",
    "StreamResponse",
    "fetch",
    "open_stream",
    "running_server",
]

ServerName = Literal["uvicorn", "hypercorn", "granian"]
Headers = Mapping[str, str] | Sequence[tuple[str, str]]

HOST = "127.0.0.1"


# -- servers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningServer:
    """Where a server started by `running_server` listens (and its process, if it has one)."""

    host: str
    port: int
    server: ServerName
    process: subprocess.Popen[bytes] | None = None
    scheme: Literal["http", "https"] = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL the server's process and its workers at once, as a crash would.

        Only for a server started from an import string: the others share the test's process.
        """
        if self.process is None:
            raise RuntimeError("only a server started from an import string has a process")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@dataclass(frozen=True)
class TLS:
    """A server certificate (chain) and its private key, PEM files: `running_server(tls=)`.
    ``tests/support/tls.py`` makes them with a test CA."""

    certfile: str
    keyfile: str


@contextlib.contextmanager
def running_server(
    app: ASGIApp | str,
    *,
    server: ServerName = "uvicorn",
    http: Literal["h11", "httptools"] = "h11",
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    host: str = HOST,
    tls: TLS | None = None,
) -> Iterator[RunningServer]:
    """Serve `app` on a free loopback port until the block ends.

    Yields once the server accepts connections (after lifespan startup, where the app supports
    it). On exit it asks for a graceful stop, forces one after `shutdown_timeout` seconds, and
    raises `RuntimeError` if the server still runs, or if it crashed. Access logs are off.

    `app` is an ASGI app (served in a thread of this process; granian through its embedded
    server) or an import string such as ``"tests.support.apps:app"`` (served by the server's CLI
    in a subprocess: `.process` is set and `.kill()` crashes it). `http` picks uvicorn's HTTP/1.1
    parser. uvicorn and hypercorn in a thread get a socket bound here; granian and the CLIs
    bind a port found free just before. For an import string, `env` adds environment variables
    to the subprocess and `workers` > 1 runs that many worker processes (uvicorn ``--workers``).
    An app served in a thread may listen on another loopback `host` (all of 127/8 is loopback
    on Linux), and uvicorn serves HTTPS with `tls` (`.url` is then ``https://``).

        with running_server(app, server="hypercorn") as server:
            result = anyio.run(fetch, server.url, "/")
        with running_server(app, host="127.0.0.2", tls=TLS(cert, key)) as server:
            ...                                     # https://127.0.0.2:<port>
    """
    if isinstance(app, str):
        if host != HOST or tls is not None:
            raise ValueError("host= and tls= need an app served in a thread")
        with _subprocess_server(
            app, server, http, startup_timeout, shutdown_timeout, env or {}, workers
        ) as running:
            yield running
        return
    if env or workers != 1:
        raise ValueError("env= and workers= need an import string (a server in a subprocess)")
    if tls is not None and server != "uvicorn":
        raise ValueError("tls= is only supported for uvicorn")
    # Bound but not listening: connecting fails until the server itself starts accepting.
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        grace = shutdown_timeout / 2
        if server == "uvicorn":
            backend = _uvicorn(app, sock, http, grace, tls)
        elif server == "hypercorn":
            backend = _hypercorn(app, sock, (host, port), grace)
        elif server == "granian":
            sock.close()  # granian binds the port itself
            backend = _granian(app, (host, port))
        else:
            raise ValueError(f"unknown server {server!r}: use uvicorn, hypercorn or granian")
        with _in_thread(backend, server, startup_timeout, shutdown_timeout):
            yield RunningServer(host, port, server, scheme="https" if tls else "http")


@dataclass
class _Backend:
    """One server, run on a loop of its own: how to serve, stop, force a stop, see it is up."""

    serve: Callable[[], Coroutine[Any, Any, None]]
    stop: Callable[[], None]  # graceful; called on the server's loop
    force: Callable[[], None] | None  # the server's own forced stop, if it has one
    ready: Callable[[], bool]


def _uvicorn(
    app: ASGIApp, sock: socket.socket, http: str, grace: float, tls: TLS | None
) -> _Backend:
    import uvicorn

    config = uvicorn.Config(
        app,
        http=http,
        lifespan="auto",
        access_log=False,
        log_config=None,  # log through the root logger (pytest captures it); don't reconfigure
        timeout_graceful_shutdown=int(grace) or 1,
        ssl_certfile=tls.certfile if tls else None,
        ssl_keyfile=tls.keyfile if tls else None,
    )
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    def force() -> None:
        server.force_exit = True

    return _Backend(lambda: server.serve(sockets=[sock]), stop, force, lambda: server.started)


def _hypercorn(
    app: ASGIApp, sock: socket.socket, address: tuple[str, int], grace: float
) -> _Backend:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.errorlog = logging.getLogger("hypercorn.error")  # propagates to pytest's capture
    config.graceful_timeout = grace
    stopping = asyncio.Event()

    async def run() -> None:
        config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn closes the fd it is given
        await serve(app, config, shutdown_trigger=stopping.wait)  # type: ignore[arg-type]

    return _Backend(run, stopping.set, None, lambda: _accepting(*address))


def _granian(app: ASGIApp, address: tuple[str, int]) -> _Backend:
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    server = Server(
        app,
        address=address[0],
        port=address[1],
        interface=Interfaces.ASGI,
        log_level=LogLevels.error,
        # granian logs to its own stdout handlers; send its records to the root logger instead
        log_dictconfig={"loggers": {"_granian": {"propagate": True}}},
    )
    return _Backend(server.serve, server.stop, None, lambda: _accepting(*address))


@contextlib.contextmanager
def _in_thread(
    backend: _Backend, name: str, startup_timeout: float, shutdown_timeout: float
) -> Iterator[None]:
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[None] | None = None
    errors: list[BaseException] = []

    async def main() -> None:
        nonlocal loop, task
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        await backend.serve()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the main thread, which can fail the test
            errors.append(exc)

    def call_soon(callback: Callable[[], object]) -> None:
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to stop
                loop.call_soon_threadsafe(callback)

    def cancel() -> None:
        if task is not None:
            task.cancel()

    thread = threading.Thread(target=run, name=f"{name}-server", daemon=True)
    thread.start()
    try:
        _wait_until(lambda: not thread.is_alive() or backend.ready(), startup_timeout, name)
        if not thread.is_alive():
            raise RuntimeError(f"{name} stopped during startup (see the captured log)") from (
                errors[0] if errors else None
            )
        yield
    finally:
        # Ever firmer: a graceful stop, the server's own forced stop, then cancelling it.
        for step, wait in [(backend.stop, shutdown_timeout), (backend.force, 1.0), (cancel, 1.0)]:
            if step is not None and thread.is_alive():
                call_soon(step)
                thread.join(wait)
        if thread.is_alive():
            raise RuntimeError(f"{name} did not stop within {shutdown_timeout + 2.0} s")
    # Only once the block ended well: a failure of the test itself must not be masked.
    if errors and not isinstance(errors[0], asyncio.CancelledError):
        raise RuntimeError(f"{name} crashed (see the captured log)") from errors[0]


_CLI = {
    "uvicorn": "uvicorn {target} --host {host} --port {port} --http {http} --lifespan auto"
    " --no-access-log --timeout-graceful-shutdown {grace}",
    "hypercorn": "hypercorn {target} --bind {host}:{port} --graceful-timeout {grace}",
    "granian": "granian --interface asgi --host {host} --port {port} --no-access-log {target}",
}


@contextlib.contextmanager
def _subprocess_server(
    target: str,
    server: ServerName,
    http: str,
    startup_timeout: float,
    shutdown_timeout: float,
    extra_env: Mapping[str, str],
    workers: int,
) -> Iterator[RunningServer]:
    if server not in _CLI:
        raise ValueError(f"unknown server {server!r}: use uvicorn, hypercorn or granian")
    with socket.socket() as sock:  # the CLIs bind by themselves: find a free port, let it go
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    grace = max(1, int(shutdown_timeout / 2))
    args = _CLI[server].format(target=target, host=HOST, port=port, http=http, grace=grace)
    if workers != 1:
        if server != "uvicorn":
            raise ValueError("workers= is only supported for uvicorn")
        args += f" --workers {workers}"
    # The child imports `target` as the tests do: same sys.path, same working directory.
    env = {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join(sys.path)}
    # A session of its own: hypercorn and granian serve from worker processes, and `kill()` and
    # the clean-up below must reach those too.
    command = [sys.executable, "-m", *args.split()]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        _wait_until(
            lambda: process.poll() is not None or _accepting(HOST, port), startup_timeout, server
        )
        if process.poll() is not None:
            raise RuntimeError(f"{server} exited with {process.returncode} during startup")
        yield RunningServer(HOST, port, server, process)
    finally:
        process.terminate()  # SIGTERM: the main process stops its workers gracefully
        try:
            process.wait(shutdown_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{server} did not stop within {shutdown_timeout} s") from None
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing of it may outlive the test
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _accepting(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _wait_until(ready: Callable[[], bool], timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not start accepting connections within {timeout} s")
        time.sleep(0.005)


# -- client ---------------------------------------------------------------------------------


class IncompleteBody(Exception):
    """The connection ended before the response body did.

    `body` holds every body byte that arrived, including those already returned by reads.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__(f"connection closed after {len(body)} body bytes, before the body ended")
        self.body = body


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((value for key, value in headers if key == name), None)


class StreamResponse:
    """A response read straight off the socket; made by `open_stream`.

    `status`, `headers` (lower-case names, in order) are there when the block starts; the body
    is read, decoded, with `read_some`/`read_exactly`/`read_all`. `complete` turns True once
    the body has really ended (the zero-size chunk, or all of Content-Length).
    """

    def __init__(self, stream: anyio.abc.SocketStream, timeout: float) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.complete = False
        self._stream = stream
        self._timeout = timeout
        self._raw = bytearray()  # bytes off the socket, not decoded yet
        self._body = bytearray()  # every decoded body byte
        self._read = 0  # how much of `_body` the reads have returned
        self._eof = False
        self._framing: Literal["length", "chunked", "close"] = "close"
        self._chunk: Literal["size", "data", "data-end", "trailer"] = "size"
        self._left = 0  # bytes left in the body (length) or in this chunk (chunked)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        return _header(self.headers, name)

    async def read_some(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" once the body has ended."""
        while self._read == len(self._body) and not self.complete:
            await self._more()
        return self._take(len(self._body))

    async def read_exactly(self, n: int) -> bytes:
        """The next `n` body bytes. `anyio.IncompleteRead` if the body ends properly first."""
        while len(self._body) - self._read < n and not self.complete:
            await self._more()
        if len(self._body) - self._read < n:
            raise anyio.IncompleteRead
        return self._take(self._read + n)

    async def read_all(self) -> bytes:
        """The rest of the body, up to its proper end."""
        while not self.complete:
            await self._more()
        return self._take(len(self._body))

    async def disconnect(self) -> None:
        """Close the TCP connection now, wherever the response is."""
        await self._stream.aclose()

    def _take(self, end: int) -> bytes:
        data = bytes(self._body[self._read : end])
        self._read = end
        return data

    async def _fill(self) -> None:
        with anyio.move_on_after(self._timeout) as scope:
            try:
                self._raw += await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                self._eof = True
        if scope.cancelled_caught:
            raise TimeoutError(f"no bytes from the server for {self._timeout} s")

    async def _more(self) -> None:
        """Read and decode more of the body; IncompleteBody if the connection already ended."""
        if self._eof:
            raise IncompleteBody(bytes(self._body))
        await self._fill()
        self._decode()
        if self._eof and self._framing == "close":
            self.complete = True

    async def _start(self, method: str) -> None:
        while (end := self._raw.find(b"\r\n\r\n")) < 0:
            if self._eof:
                raise ConnectionError("the server closed the connection before the headers")
            await self._fill()
        status_line, *lines = self._raw[:end].decode("latin-1").split("\r\n")
        del self._raw[: end + 4]
        self.status = int(status_line.split(" ", 2)[1])
        self.headers = [
            (name.strip().lower(), value.strip())
            for name, value in (line.split(":", 1) for line in lines)
        ]
        length = self.header("content-length")
        if method == "HEAD" or self.status in (204, 304):
            self._framing = "length"  # and no bytes left
        elif "chunked" in (self.header("transfer-encoding") or "").lower():
            self._framing = "chunked"
        elif length is not None:
            self._framing, self._left = "length", int(length)
        self._decode()

    def _decode(self) -> None:
        """Move body bytes from the raw buffer to the body, as far as they go."""
        raw = self._raw
        if self._framing == "close":
            self._body += raw
            raw.clear()
        elif self._framing == "length":
            data = raw[: self._left]
            self._body += data
            self._left -= len(data)
            del raw[: len(data)]
            self.complete = self._left == 0
        else:
            self._decode_chunks()

    def _decode_chunks(self) -> None:
        raw = self._raw
        while not self.complete:
            if self._chunk == "data":
                data = raw[: self._left]
                self._body += data
                self._left -= len(data)
                del raw[: len(data)]
                if self._left:
                    return
                self._chunk = "data-end"
            end = raw.find(b"\r\n")
            if end < 0:
                return
            line = bytes(raw[:end])
            del raw[: end + 2]
            if self._chunk == "size":
                self._left = int(line.split(b";", 1)[0], 16)
                self._chunk = "data" if self._left else "trailer"
            elif self._chunk == "data-end":
                if line:
                    raise ValueError(f"malformed chunked body: {line!r} after a chunk")
                self._chunk = "size"
            elif not line:  # the blank line after the trailers: the body is over
                self.complete = True


def _request(method: str, target: str, netloc: str, headers: Headers | None, body: bytes) -> bytes:
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or [])
    names = {name.lower() for name, _ in pairs}
    if "host" not in names:
        pairs.insert(0, ("Host", netloc))
    if (body or method in ("POST", "PUT", "PATCH")) and "content-length" not in names:
        pairs.append(("Content-Length", str(len(body))))
    if "connection" not in names:
        pairs.append(("Connection", "close"))  # one request per connection
    head = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in pairs)]
    return "\r\n".join([*head, "", ""]).encode("latin-1") + body


@contextlib.asynccontextmanager
async def open_stream(
    url: str,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Headers | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> AsyncIterator[StreamResponse]:
    """Send one request and yield the response once its headers are in.

    Leaving the block (or `await resp.disconnect()`) closes the TCP connection, mid-body or
    not: a client that really goes away. Connecting and each read wait at most `timeout` s.

        async with open_stream(server.url, "/s", headers={"Durable-Key": "k"}) as resp:
            assert resp.status == 200
            head = await resp.read_exactly(5)
    """
    parts = urlsplit(url)
    host, port = parts.hostname or HOST, parts.port or 80
    with anyio.fail_after(timeout):
        stream = await anyio.connect_tcp(host, port)
    async with stream:
        response = StreamResponse(stream, timeout)
        target = parts.path.rstrip("/") + path
        await stream.send(_request(method, target, parts.netloc, headers, body))
        await response._start(method)
        yield response


@dataclass(frozen=True)
class Result:
    """A whole response, as `fetch` read it. `complete` is False if the body was cut short."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        return _header(self.headers, name)


async def fetch(
    url: str,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Headers | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> Result:
    """Read a whole response. A body cut short comes back with ``complete=False``.

    Options are `open_stream`'s; a server silent for `timeout` s raises TimeoutError.

        result = await fetch(server.url, "/s", headers={"Durable-Key": "k"})
        assert (result.status, result.complete) == (200, True)
    """
    stream = open_stream(url, path, method=method, headers=headers, body=body, timeout=timeout)
    async with stream as response:
        try:
            data = await response.read_all()
        except IncompleteBody as exc:
            data = exc.body
        return Result(response.status, response.headers, data, response.complete)
