"""The Vercel AI SDK 5 ``useChat({ resume: true })`` contract, through a real uvicorn.

The requests are the ones `DefaultChatTransport` sends: ``POST /api/chat`` with the JSON body
``{"id", "messages", "trigger", "messageId"}`` and ``GET /api/chat/{id}/stream`` (which must be
204 with no body when the chat has no running turn).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from durable_asgi import MemoryStore, ai_sdk

from ..support.apps import wait_thread_event
from ..support.servers import IncompleteBody, fetch, open_stream, running_server

pytestmark = pytest.mark.anyio

USER_AGENT = "Mozilla/5.0 ai-sdk/5.0.60 runtime/browser"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client side; the server runs its own loop


@dataclass
class Model:
    """A fake model: each turn streams ``turn <n> word <i>`` deltas; `release` paces it."""

    calls: int = 0
    words: int = 20
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    async def deltas(self, turn: int) -> AsyncIterator[str]:
        self.started.set()
        try:
            for i in range(self.words):
                if i == 3:  # hold the turn open until the test lets it finish
                    while not self.release.is_set():  # noqa: ASYNC110 (set by another thread)
                        await anyio.sleep(0.005)
                await anyio.sleep(0.002)
                yield f"turn {turn} word {i}. "
        finally:
            self.ended.set()


def chat_app(model: Model) -> FastAPI:
    app = FastAPI()
    app.add_middleware(ai_sdk.ChatMiddleware, api="/api/chat", store=MemoryStore())

    @app.post("/api/chat")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        model.calls += 1
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        stream = ai_sdk.text_stream(model.deltas(turn), message_id=f"a{turn}")
        return StreamingResponse(stream, headers=dict(ai_sdk.UI_MESSAGE_STREAM_HEADERS))

    return app


@contextlib.contextmanager
def serve(model: Model) -> Iterator[str]:
    with running_server(chat_app(model)) as server:
        yield server.url


def user_message(n: int) -> dict[str, Any]:
    return {"id": f"u{n}", "role": "user", "parts": [{"type": "text", "text": f"question {n}"}]}


def post_body(chat_id: str, turns: int) -> bytes:
    """What DefaultChatTransport.sendMessages sends for the `turns`-th user message."""
    messages: list[dict[str, Any]] = []
    for n in range(1, turns + 1):
        messages.append(user_message(n))
        if n < turns:
            messages.append({"id": f"a{n}", "role": "assistant", "parts": []})
    body = {"id": chat_id, "messages": messages, "trigger": "submit-message", "messageId": None}
    return json.dumps(body).encode()


POST_HEADERS = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
GET_HEADERS = {"User-Agent": USER_AGENT}


def events(body: bytes) -> list[Any]:
    """The `data:` payloads of a UI message stream, JSON-decoded (``[DONE]`` kept as is)."""
    out: list[Any] = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(body: bytes) -> str:
    return "".join(e["delta"] for e in events(body) if isinstance(e, dict) and "delta" in e)


def expected_text(turn: int, words: int = 20) -> str:
    return "".join(f"turn {turn} word {i}. " for i in range(words))


async def test_a_turn_streams_the_ui_message_stream() -> None:
    model = Model()
    model.release.set()
    with serve(model) as url:
        result = await fetch(url, "/api/chat", method="POST", headers=POST_HEADERS,
                             body=post_body("chat-1", 1))  # fmt: skip
    assert result.status == 200 and result.complete
    assert result.header("x-vercel-ai-ui-message-stream") == "v1"
    assert (result.header("content-type") or "").startswith("text/event-stream")
    parsed = events(result.body)
    assert parsed[0] == {"type": "start", "messageId": "a1"}
    assert parsed[-2:] == [{"type": "finish"}, "[DONE]"]
    assert text_of(result.body) == expected_text(1)
    assert model.calls == 1


async def test_resume_get_joins_the_running_turn_then_204_once_it_ended() -> None:
    model = Model()
    with serve(model) as url:
        stream_path = "/api/chat/chat-2/stream"
        # Nothing running yet: 204, no body, the app is not called.
        before = await fetch(url, stream_path, headers=GET_HEADERS)
        assert (before.status, before.body) == (204, b"")
        assert model.calls == 0

        post = open_stream(url, "/api/chat", method="POST", headers=POST_HEADERS,
                           body=post_body("chat-2", 1))  # fmt: skip
        async with post as first:
            assert first.status == 200
            head = await first.read_exactly(10)
            # The page reloads: useChat's resume GET joins the turn from its first byte.
            async with open_stream(url, stream_path, headers=GET_HEADERS) as resumed:
                assert resumed.status == 200
                assert resumed.header("durable-replay") == "true"
                assert resumed.header("x-vercel-ai-ui-message-stream") == "v1"
                model.release.set()
                resumed_body = await resumed.read_all()
            first_body = head + await first.read_all()
        assert resumed_body == first_body
        assert text_of(resumed_body) == expected_text(1)
        assert events(resumed_body)[-1] == "[DONE]"
        assert model.calls == 1

        # The turn is over: the resume endpoint has nothing to join.
        after = await fetch(url, stream_path, headers=GET_HEADERS)
        assert (after.status, after.body) == (204, b"")
        assert after.header("content-length") in (None, "0")
        assert model.calls == 1


async def test_each_post_is_a_new_turn_not_a_replay_of_the_last() -> None:
    model = Model()
    model.release.set()
    with serve(model) as url:
        first = await fetch(url, "/api/chat", method="POST", headers=POST_HEADERS,
                            body=post_body("chat-3", 1))  # fmt: skip
        second = await fetch(url, "/api/chat", method="POST", headers=POST_HEADERS,
                             body=post_body("chat-3", 2))  # fmt: skip
    assert first.complete and second.complete
    assert text_of(first.body) == expected_text(1)
    assert text_of(second.body) == expected_text(2)
    assert second.header("durable-replay") is None
    assert model.calls == 2


async def test_a_duplicate_post_of_a_running_turn_joins_it() -> None:
    model = Model()
    with serve(model) as url:
        body = post_body("chat-4", 1)
        async with open_stream(url, "/api/chat", method="POST", headers=POST_HEADERS,
                               body=body) as first:  # fmt: skip
            await wait_thread_event(model.started)
            bodies: list[bytes] = []

            async def duplicate() -> None:
                result = await fetch(url, "/api/chat", method="POST", headers=POST_HEADERS,
                                     body=body)  # fmt: skip
                assert result.complete and result.header("durable-replay") == "true"
                bodies.append(result.body)

            async with anyio.create_task_group() as tasks:
                for _ in range(3):
                    tasks.start_soon(duplicate)
                await anyio.sleep(0.05)
                model.release.set()
            first_body = await first.read_all()
        assert bodies == [first_body] * 3
        assert model.calls == 1


async def test_chats_are_separate_and_other_routes_pass_through() -> None:
    model = Model()
    model.release.set()
    with serve(model) as url:
        a = await fetch(url, "/api/chat", method="POST", headers=POST_HEADERS,
                        body=post_body("chat-a", 1))  # fmt: skip
        b = await fetch(url, "/api/chat", method="POST", headers=POST_HEADERS,
                        body=post_body("chat-b", 1))  # fmt: skip
        assert a.header("durable-replay") is None and b.header("durable-replay") is None
        assert model.calls == 2
        missing = await fetch(url, "/api/other")
        assert missing.status == 404 and missing.header("durable-state") is None


async def test_a_stop_button_aborts_the_turn_with_a_control_request() -> None:
    model = Model()
    with serve(model) as url:
        body = post_body("chat-5", 1)
        async with open_stream(url, "/api/chat", method="POST", headers=POST_HEADERS,
                               body=body) as first:  # fmt: skip
            await wait_thread_event(model.started)
            control = {**POST_HEADERS, "Durable-Control": "status"}
            status = await fetch(url, "/api/chat", method="POST", headers=control, body=body)
            assert json.loads(status.body)["state"] == "running"
            abort = {**POST_HEADERS, "Durable-Control": "abort"}
            stopped = await fetch(url, "/api/chat", method="POST", headers=abort, body=body)
            assert stopped.status == 204
            await wait_thread_event(model.ended)
            with pytest.raises(IncompleteBody):  # an aborted turn never looks complete
                await first.read_all()
        gone = await fetch(url, "/api/chat/chat-5/stream", headers=GET_HEADERS)
        assert (gone.status, gone.body) == (204, b"")
        assert model.calls == 1


def test_options_the_recipe_sets_are_refused() -> None:
    with pytest.raises(TypeError, match="on_finished"):
        ai_sdk.ChatMiddleware(FastAPI(), on_finished="replay")
