"""The chat model both example apps share: a fake one that streams word-sized tokens with
realistic delays (``FAKE_MODEL_DELAY`` seconds per token, default 0.06), or a real
OpenAI-compatible upstream when ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` are set.

`calls` counts how many answers were started in this process: the apps expose it at
``/api/stats`` so the browser tests can check that reloads and second tabs never add one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator

import anyio

ANSWER = (
    "Durable streams keep going when you leave. This answer is produced once by the handler, "
    "written to the store chunk by chunk, and replayed to anyone who asks for it again: reload "
    "the page, open a second tab, or drop the network, and the text continues exactly where it "
    "was, with nothing lost and nothing repeated. The handler itself never runs twice."
)


#: How many answers the model started in this process (``/api/stats``).
calls = 0


def answer_for(message: str) -> str:
    """The fake model's whole answer to `message` (deterministic: tests compare with it)."""
    return f"You said: {message.strip()[:200]}\n\n{ANSWER}"


async def fake_tokens(message: str, delay: float) -> AsyncIterator[str]:
    """Word-sized tokens with a jittered delay, like a hosted model."""
    rng = random.Random(message)
    for i, word in enumerate(answer_for(message).split(" ")):
        await anyio.sleep(delay * rng.uniform(0.5, 1.5))
        yield word if i == 0 else " " + word  # the tokens add up to exactly `answer_for`


async def openai_tokens(message: str) -> AsyncIterator[str]:  # pragma: no cover - needs a key
    import httpx

    url = os.environ["OPENAI_BASE_URL"].rstrip("/") + "/chat/completions"
    payload = {
        "model": os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
        "stream": True,
        "messages": [{"role": "user", "content": message}],
    }
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}
    async with (
        httpx.AsyncClient(timeout=None) as client,
        client.stream("POST", url, json=payload, headers=headers) as response,
    ):
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                yield delta


def tokens(message: str) -> AsyncIterator[str]:
    """Start an answer to `message`: its tokens, as they come."""
    global calls
    calls += 1
    if os.environ.get("OPENAI_BASE_URL") and os.environ.get("OPENAI_API_KEY"):
        return openai_tokens(message)
    return fake_tokens(message, float(os.environ.get("FAKE_MODEL_DELAY", "0.06")))
