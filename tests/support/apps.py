"""Small ASGI apps for the tests: they count their calls and can pause mid-stream on cue."""

from __future__ import annotations

import threading

import anyio

from durable_asgi._types import Receive, Scope, Send


def body_of(chunks: list[bytes]) -> bytes:
    return b"".join(chunks)


CHUNKS = [b"chunk %03d|" % i for i in range(50)]


class StreamApp:
    """A raw ASGI app streaming `chunks`.

    - `pause_at=i`: after sending chunk i-1 it sets `paused` and waits for `release`.
    - `fail_at=i`: raises `RuntimeError("boom")` instead of sending chunk i.
    - Counts `calls`, `finished` (ran to the end) and `cancelled`; records request bodies.
    Events are thread-safe (`threading.Event`) so real-server tests can wait on them too.
    """

    def __init__(
        self,
        chunks: list[bytes] | None = None,
        *,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        pause_at: int | None = None,
        fail_at: int | None = None,
        complete: bool = True,
        delay: float = 0.0,
    ) -> None:
        self.chunks = CHUNKS if chunks is None else chunks
        self.status = status
        self.headers = headers or [(b"content-type", b"text/plain")]
        self.pause_at = pause_at
        self.fail_at = fail_at
        self.complete = complete
        self.delay = delay
        self.calls = 0
        self.finished = 0
        self.cancelled = 0
        self.bodies: list[bytes] = []
        self.paused = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()

    @property
    def body(self) -> bytes:
        return body_of(self.chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        message = await receive()
        self.bodies.append(message.get("body", b""))
        try:
            await send(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
            for i, chunk in enumerate(self.chunks):
                if i == self.pause_at:
                    self.paused.set()
                    # Bounded waits, so a cancelled app leaves no thread blocked forever; long
                    # ones, so the task is almost never runnable while paused (tests use
                    # `anyio.wait_all_tasks_blocked()`, which needs every task blocked at once).
                    while not await anyio.to_thread.run_sync(
                        self.release.wait, 1.0, abandon_on_cancel=True
                    ):
                        pass
                if i == self.fail_at:
                    raise RuntimeError("boom")
                if self.delay:
                    await anyio.sleep(self.delay)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if self.complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.finished += 1
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.ended.set()


async def wait_thread_event(event: threading.Event, timeout: float = 10.0) -> None:
    """Wait for a threading.Event from async code without blocking the event loop."""
    if not await anyio.to_thread.run_sync(event.wait, timeout, abandon_on_cancel=True):
        raise TimeoutError(f"event not set within {timeout} s")
