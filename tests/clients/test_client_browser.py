"""The browser client in real headless Chromium, through a proxy that cuts connections.

The page (tests/support/pages/client.html) loads the client the middleware serves at
``/_durable/durable-fetch.js`` and renders answers into ``#out``. The proxy kills every open
connection several times during one answer; the rendered text must still equal the model's
output exactly once, and the model's call count proves reconnects and reloads never ran it
again.

Needs Debian's chromium (``apt-get install chromium``) and the playwright package. Locally a
missing one skips these tests; with ``CI=true`` it fails them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from durable_asgi import DurableMiddleware, MemoryStore
from durable_asgi._types import Receive, Scope, Send

from ..support.browser import launched_chromium
from ..support.proxy import CuttingProxy, running_proxy
from ..support.servers import running_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

PAGE = (Path(__file__).parent.parent / "support" / "pages" / "client.html").read_bytes()
#: The model's answer: multi-byte characters, so cuts land inside UTF-8 sequences too.
TOKENS = [f"{word}{i} " for i, word in enumerate(["durable", "résumé", "→", "😀", "stream"] * 14)]
MODEL_TEXT = "".join(TOKENS)
TOKEN_DELAY = 0.015  # the whole answer takes about a second
TIMEOUT_MS = 15_000


class Model:
    """A raw ASGI app: the test page at ``/``, a streaming model at ``/api/chat``.

    ``{"prompt": "fail"}`` makes the model raise after 10 tokens. Counts calls, runs that
    finished and runs that were cancelled (thread-safe enough: one server thread writes).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.finished = 0
        self.cancelled = 0
        self.ended = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/":
            await self._respond(send, 200, "text/html; charset=utf-8", PAGE)
        elif scope["path"] == "/api/chat":
            await self._chat(receive, send)
        else:
            await self._respond(send, 404, "text/plain", b"not found")

    async def _respond(self, send: Send, status: int, content_type: str, body: bytes) -> None:
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _chat(self, receive: Receive, send: Send) -> None:
        self.calls += 1
        message = await receive()
        prompt = json.loads(message.get("body") or b"{}").get("prompt", "")
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            for i, token in enumerate(TOKENS):
                if prompt == "fail" and i == 10:
                    raise RuntimeError("the model crashed")
                await anyio.sleep(TOKEN_DELAY)
                await send(
                    {"type": "http.response.body", "body": token.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
            self.finished += 1
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.ended.set()


def test_the_middleware_serves_the_client_and_its_declarations() -> None:
    """No browser needed: the files ship in the package and are served at ``/_durable/``."""
    import httpx

    with running_server(DurableMiddleware(Model(), store=MemoryStore())) as server:
        script = httpx.get(f"{server.url}/_durable/durable-fetch.js")
        types = httpx.get(f"{server.url}/_durable/durable-fetch.d.ts")
    assert script.status_code == types.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    for name in ("DurableFetchClient", "DurableStreamError", "MemoryStorage"):
        assert f"export class {name}" in script.text
        assert f"export class {name}" in types.text


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_chromium() as chromium:
        yield chromium


@dataclass
class Site:
    model: Model
    proxy: CuttingProxy
    page: Page

    def open(self) -> None:
        self.page.goto(f"{self.proxy.url}/")
        self.page.wait_for_function("window.ready === true")

    def text(self) -> str:
        return str(self.page.evaluate("document.getElementById('out').textContent"))

    def wait_for_text(self, length: int) -> None:
        self.page.wait_for_function(
            f"document.getElementById('out').textContent.length >= {length}"
        )

    def wait_for_result(self) -> dict[str, Any]:
        self.page.wait_for_function("window.result !== null")
        result: dict[str, Any] = self.page.evaluate("window.result")
        return result

    def evaluate(self, script: str) -> Any:
        return self.page.evaluate(script)


@pytest.fixture
def site(browser: Browser) -> Iterator[Site]:
    model = Model()
    app = DurableMiddleware(model, store=MemoryStore())
    with running_server(app) as server, running_proxy(server.url, seed=3) as proxy:
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        try:
            yield Site(model, proxy, page)
        finally:
            context.close()


def test_connection_killed_four_times_mid_answer_renders_it_exactly_once(site: Site) -> None:
    site.open()
    site.evaluate("ask('hello')")
    cuts = 0
    for fraction in (0.15, 0.35, 0.55, 0.75):
        site.wait_for_text(int(len(MODEL_TEXT) * fraction))
        cuts += site.proxy.cut_all()
    result = site.wait_for_result()
    assert result["ok"], result
    assert site.text() == MODEL_TEXT
    assert cuts >= 4
    assert result["reconnects"] >= 4
    offsets = site.evaluate("window.reconnects")
    assert offsets == sorted(offsets) and offsets[0] > 0  # each resumed from the byte it had
    assert (site.model.calls, site.model.finished) == (1, 1)
    assert site.evaluate("client.status('/api/chat')") == {"state": "absent"}  # key forgotten


def test_cuts_at_random_bytes_even_inside_headers_render_it_exactly_once(site: Site) -> None:
    site.open()
    site.proxy.cut_all()  # no idle connection left: every request from here opens a new one
    rng = random.Random(11)
    site.proxy.plan([rng.randint(1, 400) for _ in range(8)])  # a response is ~1.3 kB on the wire
    site.evaluate("ask('hello')")
    result = site.wait_for_result()
    assert result["ok"], result
    # Failed about once in 90 runs with an empty #out and ok=True; say what the client saw.
    seen = (result, site.evaluate("window.reconnects"), site.proxy.cuts, site.model.calls)
    assert site.text() == MODEL_TEXT, seen
    assert site.proxy.cuts >= 4  # the answer may end before the plan does
    assert (site.model.calls, site.model.finished) == (1, 1)


def test_reload_mid_answer_and_resume_continues_it(site: Site) -> None:
    site.open()
    site.evaluate("ask('hello')")
    site.wait_for_text(len(MODEL_TEXT) // 4)
    site.page.reload()
    site.page.wait_for_function("window.ready === true")
    status = site.evaluate("client.status('/api/chat')")
    assert status["state"] == "running"

    site.evaluate("resumeChat()")
    result = site.wait_for_result()
    assert result["ok"] and result["resumed"], result
    assert site.text() == MODEL_TEXT
    assert site.model.calls == 1

    # Done and read to the end: nothing left to resume, and the key is forgotten.
    site.evaluate("resumeChat()")
    assert site.wait_for_result() == {"ok": False, "none": True}
    after = site.evaluate(
        "client.fetch('/api/chat', {headers: {'Durable-Resume': 'true'}}).then(r => r.status)"
    )
    assert after == 204  # what the AI SDK's reconnectToStream reads as "no stream"


def test_reload_and_send_the_same_request_again_joins_the_running_answer(site: Site) -> None:
    site.open()
    site.evaluate("ask('same question')")
    site.wait_for_text(len(MODEL_TEXT) // 3)
    site.page.reload()
    site.page.wait_for_function("window.ready === true")
    site.evaluate("ask('same question')")  # same method, URL and body: the same kept key
    result = site.wait_for_result()
    assert result["ok"] and result["resumed"], result
    assert site.text() == MODEL_TEXT
    assert site.model.calls == 1

    site.evaluate("ask('same question')")  # the first was read to its end: a new answer
    result = site.wait_for_result()
    assert result["ok"] and not result["resumed"], result
    assert site.model.calls == 2


def test_abort_stops_the_model_and_ends_the_body_as_aborted(site: Site) -> None:
    site.open()
    site.evaluate("ask('hello')")
    site.wait_for_text(len(MODEL_TEXT) // 4)
    site.evaluate("client.abort('/api/chat')")
    result = site.wait_for_result()
    assert result["error"] == {
        "name": "AbortError",  # what UIs (the AI SDK among them) treat as a stop, not a crash
        "state": "aborted",
        "offset": len(site.text().encode()),
        "durable": True,
    }
    assert MODEL_TEXT.startswith(site.text()) and site.text() != MODEL_TEXT
    assert site.model.ended.wait(5)
    assert (site.model.calls, site.model.cancelled, site.model.finished) == (1, 1, 0)

    site.evaluate("client.delete('/api/chat', {durableKey: window.result.durableKey})")
    status = site.evaluate("client.status('/api/chat', {durableKey: window.result.durableKey})")
    assert status == {"state": "absent"}


def test_the_signal_stops_reading_but_not_the_model(site: Site) -> None:
    site.open()
    site.evaluate("ask('hello')")
    site.wait_for_text(len(MODEL_TEXT) // 4)
    site.evaluate("window.stop.abort()")
    result = site.wait_for_result()
    assert result["error"]["name"] == "AbortError"
    assert not result["error"]["durable"]  # the signal's own reason, as with fetch
    assert site.model.ended.wait(5)
    assert (site.model.calls, site.model.finished) == (1, 1)  # it ran to its end regardless

    site.evaluate("resumeChat()")  # ...and the whole answer is there to read
    result = site.wait_for_result()
    assert result["ok"] and result["resumed"], result
    assert site.text() == MODEL_TEXT
    assert site.model.calls == 1


def test_abort_on_signal_stops_the_model_too(site: Site) -> None:
    site.open()
    site.evaluate("askAndStopTheModel('hello')")
    site.wait_for_text(len(MODEL_TEXT) // 4)
    site.evaluate("window.stop.abort()")
    result = site.wait_for_result()
    assert result["error"]["name"] == "AbortError"
    assert site.model.ended.wait(5)
    assert (site.model.calls, site.model.cancelled, site.model.finished) == (1, 1, 0)


def test_the_ai_sdk_reconnect_request_continues_a_running_answer_or_gets_204(site: Site) -> None:
    site.open()
    site.evaluate("ask('hello')")
    site.wait_for_text(len(MODEL_TEXT) // 4)
    site.page.reload()
    site.page.wait_for_function("window.ready === true")
    site.evaluate("reconnectLikeTheAISDK()")
    result = site.wait_for_result()
    assert result["ok"] and result["resumed"], result
    assert site.text() == MODEL_TEXT
    assert site.model.calls == 1

    site.evaluate("reconnectLikeTheAISDK()")  # finished: nothing running to reconnect to
    assert site.wait_for_result() == {"ok": False, "none": True}


def test_a_failed_answer_surfaces_as_an_error_and_is_not_rerun(site: Site) -> None:
    site.open()
    site.evaluate("ask('fail')")
    result = site.wait_for_result()
    assert result["error"]["name"] == "DurableStreamError"
    assert result["error"]["state"] == "failed"
    # What the model sent before it crashed, once. Chromium may drop the last chunk when the
    # connection's abnormal end follows right behind it (an errored ReadableStream discards
    # its queue), and the server answers a resume of a failed stream with 416 instead of its
    # stored bytes: see test_client_python's xfail on resuming a failed stream.
    sent = "".join(TOKENS[:10])
    assert sent.startswith(site.text()) and len(site.text()) >= len("".join(TOKENS[:8]))
    assert result["error"]["offset"] == len(site.text().encode())
    assert site.model.calls == 1
    time.sleep(0.2)  # nothing retries behind our back
    assert site.model.calls == 1
