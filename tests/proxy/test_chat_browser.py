"""durablefetch's AI SDK recipe in real headless Chromium, streaming through the proxy.

The page (``node/chat.html`` + ``node/chat.mjs``, bundled here by the npm ``esbuild``) is the
recipe with the real npm packages: the AI SDK's Chat (`AbstractChat`, what ``useChat`` wraps)
on ``new DefaultChatTransport({ api, fetch: df.fetch })``, ``df`` being the npm
``durablefetch`` client pointed at the proxy. The chat app (`ChatApp`) serves the page and its
``/api/chat`` on https://127.0.0.2 (the client bypasses 127.0.0.1), the proxy listens on
https://127.0.0.1; Chromium accepts the test CA's certificates (``ignore_https_errors``).

Send a message, reload mid-answer (the model waits on cue), and the page, finding the answer
in progress (``df.isInProgress``), sends the message again and ends with the whole answer
exactly once, while the model ran once. Without Chromium, playwright, node or the npm packages
the test skips, except with ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.common.model import answer_for

from durable_asgi import SQLiteStore
from durable_asgi.proxy import DurableProxy

from ..support.servers import running_server
from ..support.tls import Certificates
from .chat_upstream import ChatApp
from .npm_clients import bundle as npm_bundle

TIMEOUT_MS = 15_000
MESSAGE = "Does the answer survive a reload through the proxy?"
ANSWER = answer_for(MESSAGE)
PAUSE_AT = 12  # the model waits after this many tokens (words)
BEFORE_PAUSE = " ".join(ANSWER.split(" ")[:PAUSE_AT])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_bundle("chat.mjs", tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def chat(bundle: Path, certs: Certificates, tmp_path: Path) -> Iterator[tuple[ChatApp, str]]:
    """The chat app on https://127.0.0.2 and the proxy in front of it; (app, the app's URL)."""
    app = ChatApp(bundle, pause_at=PAUSE_AT)
    with running_server(app, host="127.0.0.2", tls=certs.server) as upstream:
        proxy = DurableProxy(
            allow=[f"{upstream.url}/api/chat"],
            store=SQLiteStore(tmp_path / "proxy.db"),
            verify=certs.ca,
        )
        with running_server(proxy, tls=certs.server) as server:
            app.proxy_host = f"{server.host}:{server.port}"
            yield app, upstream.url


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    context = browser.new_context(ignore_https_errors=True)  # the test CA's certificates
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


def answer_text(page: Any) -> str:
    return str(page.text_content(".assistant .text"))


def wait_answer(page: Any, text: str, state: str) -> None:
    page.wait_for_function(
        "([text, state]) => {"
        " const turn = document.querySelector('.assistant');"
        " return turn?.querySelector('.text').textContent === text && turn.dataset.state === state"
        "}",
        arg=[text, state],
    )


def test_reload_mid_answer_ends_with_the_whole_answer_once_and_one_model_call(
    chat: tuple[ChatApp, str], context: Any, certs: Certificates
) -> None:
    app, url = chat
    chat_id = uuid.uuid4().hex
    page = context.new_page()
    page.goto(f"{url}/?chat={chat_id}")
    page.wait_for_selector("body[data-checked], body[data-error]")  # df.isInProgress answered
    assert page.evaluate("document.body.dataset.error") is None
    page.fill("#input", MESSAGE)
    page.click("#send")

    # Mid-answer, on cue: the model sent PAUSE_AT tokens and waits; the page shows them.
    assert app.paused.wait(10)
    wait_answer(page, BEFORE_PAUSE, "streaming")

    page.reload()
    page.wait_for_selector("body[data-resumed]")  # df.isInProgress said so: sent again
    wait_answer(page, BEFORE_PAUSE, "streaming")  # the stored part, from the proxy
    app.release.set()
    wait_answer(page, ANSWER, "done")

    assert answer_text(page) == ANSWER  # nothing lost, nothing repeated
    assert page.locator(".assistant").count() == 1
    assert page.locator(".user").count() == 1
    assert page.text_content(".user .text") == MESSAGE
    assert page.evaluate("document.body.dataset.error") is None
    assert app.model_calls == 1
    # The proxy kept the answer, under the URL the recipe gave the chat.
    answer = httpx.post(
        f"https://{app.proxy_host}/in-progress",
        content=json.dumps({"url": f"{url}/api/chat?chatId={chat_id}"}),
        verify=ssl.create_default_context(cafile=certs.ca),
    )
    assert answer.json()["completed"] is True
