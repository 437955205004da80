"""Mode 2 with the official TypeScript client (``@durable-streams/client`` from npm, run by
Node): create through the proxy, read with SSE, cut the connection, resume from the offset the
client reached — the bytes are the upstream's, once, and the upstream ran once."""

from __future__ import annotations

import json

import anyio
import pytest

from .harness import Serve
from .npm_clients import NODE_DIR, require_node
from .upstream import sse_body

pytestmark = pytest.mark.anyio

SECRET = "ts-client-secret"


async def client(*args: str) -> dict[str, object]:
    """One run of ``node/ds_client.mjs``: its JSON answer."""
    node = require_node()
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [node, str(NODE_DIR / "ds_client.mjs"), *args], cwd=NODE_DIR, check=False
        )
    answer: dict[str, object] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert done.returncode == 0 and answer["ok"], (answer, done.stderr.decode())
    return answer


async def test_create_read_cut_and_resume(serve: Serve) -> None:
    with serve(secret=SECRET) as s:
        cut = len(sse_body(4))
        first = await client(
            "create", f"{s.url}/v1/proxy", f"{s.upstream}/sse?n=10&pause=4", SECRET, str(cut)
        )
        assert str(first["text"]).encode() == sse_body(4)  # the upstream is paused there
        assert not first["closed"]
        assert not s.origin.stopped.is_set()  # the cut client never stops the upstream
        s.origin.release.set()
        rest = await client("resume", str(first["location"]), str(first["offset"]))
        assert str(first["text"]).encode() + str(rest["text"]).encode() == sse_body(10)
        assert rest["closed"] is True  # the client saw Stream-Closed: the upstream completed
        assert s.origin.calls["/sse"] == 1
