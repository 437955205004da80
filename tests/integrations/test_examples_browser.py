"""The two example chat apps in real headless Chromium (Debian's ``chromium`` via Playwright).

For the FastAPI and the Django example, served by uvicorn in a subprocess with a fast fake model:
send a message, reload mid-answer, and the page ends with the whole answer exactly once while the
model ran once; a second tab shows the same answer live. Without Chromium (or the playwright
package) the tests skip, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.common.model import answer_for

from ..support.browser import launched_chromium
from ..support.servers import RunningServer, running_server

APPS = {
    "fastapi": "examples.fastapi_app.app:app",
    "django": "examples.django_app.asgi:application",
}
TIMEOUT_MS = 15_000
MESSAGE = "Does the answer survive a reload?"
ANSWER = answer_for(MESSAGE)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launched_chromium() as chromium:
        yield chromium


@pytest.fixture(params=list(APPS))
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    env = {
        "DURABLE_ASGI_STORE": f"sqlite:///{tmp_path / 'durable.db'}",
        "FAKE_MODEL_DELAY": "0.02",  # ~70 tokens: an answer takes about 1.5 s
        "OPENAI_BASE_URL": "",  # always the fake model, whatever the developer's shell has
    }
    with running_server(APPS[request.param], env=env, startup_timeout=20) as running:
        yield running


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


def model_calls(server: RunningServer) -> int:
    with urllib.request.urlopen(f"{server.url}/api/stats", timeout=5) as response:
        return int(json.load(response)["model_calls"])


def send(page: Any, message: str) -> None:
    page.fill("#input", message)
    page.click("#send")


def answer_text(page: Any) -> str:
    return str(page.text_content(".assistant .text"))


def wait_done(page: Any) -> None:
    page.wait_for_selector('.assistant[data-state="done"]')


def test_reload_mid_answer_continues_it_exactly_once(server: RunningServer, context: Any) -> None:
    page = context.new_page()
    page.goto(server.url)
    send(page, MESSAGE)
    # Mid-answer: some text is there, the turn is still streaming.
    page.wait_for_function(
        "document.querySelector('.assistant .text')?.textContent.length > 60"
        " && document.querySelector('.assistant').dataset.state === 'streaming'"
    )
    before = answer_text(page)
    assert 60 < len(before) < len(ANSWER)

    page.reload()
    page.wait_for_selector(".assistant[data-resumed]")
    wait_done(page)
    assert answer_text(page) == ANSWER  # nothing lost, nothing repeated
    assert answer_text(page).startswith(before)
    assert page.locator(".assistant").count() == 1
    assert page.locator(".user").count() == 1
    assert model_calls(server) == 1

    # And once more after it finished: the answer comes from the page's history, still once.
    page.reload()
    wait_done(page)
    assert answer_text(page) == ANSWER
    assert page.locator(".assistant").count() == 1
    assert model_calls(server) == 1


def test_a_second_tab_shows_the_same_answer_live(server: RunningServer, context: Any) -> None:
    first = context.new_page()
    first.goto(server.url)
    watcher = context.new_page()  # open before the message is sent
    watcher.goto(server.url)
    send(first, MESSAGE)

    # The watcher picks the turn up while it streams (not from history once it's done).
    watcher.wait_for_selector('.assistant[data-state="streaming"]')
    watcher.wait_for_function("document.querySelector('.assistant .text').textContent.length")
    late = context.new_page()  # and a tab opened mid-answer joins it too
    late.goto(server.url)
    for page in (first, watcher, late):
        wait_done(page)
        assert answer_text(page) == ANSWER
        assert page.locator(".assistant").count() == 1
    assert model_calls(server) == 1
