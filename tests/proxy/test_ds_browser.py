"""A chat page in real headless Chromium reading a mode-2 stream with the official client
(``@durable-streams/client``, bundled by the npm ``esbuild``: ``node/ds_chat.mjs``), reloaded
mid-answer: the page resumes from the offset it reached and ends with the whole answer exactly
once, while the upstream ran once. Without Chromium, playwright, node or the npm packages the
test skips, except with ``CI=true``, where it fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse, HTMLResponse
from starlette.routing import Route

from ..support.servers import running_server
from .harness import Serve
from .npm_clients import bundle as npm_bundle
from .upstream import sse_body

SECRET = "browser-secret"
PAGE = """<!doctype html><meta charset="utf-8"><title>answer</title>
<pre id="answer"></pre><script type="module" src="/ds_chat.js"></script>"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_bundle("ds_chat.mjs", tmp_path_factory.mktemp("bundle"))


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_reload_mid_answer_resumes_and_ends_with_the_whole_answer_once(
    serve: Serve, bundle: Path, browser: Any
) -> None:
    site = Starlette(
        routes=[
            Route("/", lambda _: HTMLResponse(PAGE)),
            Route("/ds_chat.js", lambda _: FileResponse(bundle, media_type="text/javascript")),
        ]
    )
    with serve(secret=SECRET) as s, running_server(site) as page_server:
        created = httpx.post(
            f"{s.url}/v1/proxy",
            headers={
                "Authorization": f"Bearer {SECRET}",
                "Upstream-URL": f"{s.upstream}/sse?n=10&pause=4",
                "Upstream-Method": "GET",
            },
        )
        assert created.status_code == 201, created.text
        context = browser.new_context()
        context.set_default_timeout(15_000)
        try:
            page = context.new_page()
            page.goto(
                str(
                    httpx.URL(page_server.url).copy_with(
                        params={"stream": created.headers["location"]}
                    )
                )
            )
            first = sse_body(4).decode()
            page.wait_for_function(
                "t => document.getElementById('answer').textContent === t", arg=first
            )
            page.reload()  # mid-answer: the upstream waits after 4 events
            page.wait_for_selector("body[data-resumed='true'][data-state='streaming']")
            assert page.text_content("#answer") == first  # restored, not read again from 0
            assert s.origin.paused.is_set() and not s.origin.stopped.is_set()
            s.origin.release.set()
            page.wait_for_selector("body[data-state='done']")
            assert page.evaluate("document.body.dataset.error") is None
            assert page.text_content("#answer") == sse_body(10).decode()  # whole, once
        finally:
            context.close()
        assert s.origin.calls["/sse"] == 1
