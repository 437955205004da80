"""What the proxy tests share beside their fixtures: `Setup` (a proxy in front of an `Origin`,
both serving, with the requests the tests make of it) and `cors`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from durable_asgi.proxy import DurableProxy

from ..support.servers import Result, fetch
from .upstream import Origin

__all__ = ["Serve", "Setup", "cors"]


@dataclass
class Setup:
    """A proxy in front of an `Origin`, both serving."""

    origin: Origin
    proxy: DurableProxy
    url: str
    """The proxy's base URL."""
    upstream: str
    """The origin's base URL (``http://127.0.0.1:<port>``)."""

    def path(self, target: str) -> str:
        """The proxy path that fetches `target` on the origin (durablefetch's scheme)."""
        return "/" + self.upstream.removeprefix("http://") + target

    async def control(self, name: str, payload: Any, prefix: str = "") -> tuple[int, Any]:
        """``POST /in-progress`` or ``/delete`` as the npm client sends it (text/plain)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        result = await fetch(
            self.url,
            f"{prefix}/{name}",
            method="POST",
            headers={"Content-Type": "text/plain;charset=UTF-8"},
            body=body,
        )
        return result.status, json.loads(result.body)

    async def in_progress(self, target: str, prefix: str = "") -> dict[str, Any]:
        status, answer = await self.control("in-progress", {"url": self.upstream + target}, prefix)
        assert status == 200
        return dict(answer)

    async def until_in_progress(
        self, target: str, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """``/in-progress`` once `done` holds of it: for what the proxy records just after
        the client sees it (reader counts, stored chunks)."""
        with anyio.fail_after(timeout):
            while True:
                status = await self.in_progress(target)
                if done(status):
                    return status
                await anyio.sleep(0.01)

    async def state(self, target: str) -> str:
        """The stream's state, through the middleware's own control request."""
        result = await fetch(self.url, self.path(target), headers={"Durable-Control": "status"})
        if result.status == 404:
            return "absent"
        return str(json.loads(result.body)["state"])


Serve = Callable[..., contextlib.AbstractContextManager[Setup]]


def cors(result: Result) -> bool:
    """Whether `result` carries the durablefetch CORS headers and no-store."""
    return (
        result.header("access-control-allow-origin") == "*"
        and result.header("access-control-expose-headers") == "*"
        and result.header("cache-control") == "no-store"
    )
