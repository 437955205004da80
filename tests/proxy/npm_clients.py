"""The Node side of the proxy tests: the npm project in ``tests/proxy/node`` and `DurableFetch`,
which drives the unmodified npm ``durablefetch`` client in a ``node`` process.

    async with DurableFetch(proxy_host="127.0.0.1:8443", ca=certs.ca) as df:
        head = await df.open("a", "https://127.0.0.2:9443/sse?n=20")   # df.fetch(url) in Node
        first = await df.read("a", until=120)
        await df.abort("a")
        status = await df.is_in_progress("https://127.0.0.2:9443/sse?n=20")

The packages come from the lockfile (``npm ci`` in ``tests/proxy/node``; ``bash scripts/test``
runs it). Without node or the packages the tests skip, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from ..support.stores import in_ci

__all__ = ["NODE_DIR", "Answer", "DurableFetch", "bundle", "npm_bin", "require_node"]

NODE_DIR = Path(__file__).with_name("node")
"""The npm project: package.json pins the real clients, package-lock.json the rest."""

#: What the npm project must have installed (``npm ci``).
PACKAGES = ("durablefetch", "ai", "esbuild", "@durable-streams/client")


def require_node() -> str:
    """The ``node`` binary, once the project's packages are installed; skips (fails in CI)
    without them."""
    node = shutil.which("node")
    reason = None
    if node is None:
        reason = "node is not installed (the durablefetch client tests need Node >= 18 and npm)"
    else:
        missing = [p for p in PACKAGES if not (NODE_DIR / "node_modules" / p).is_dir()]
        if missing:
            reason = f"npm packages {missing} are not installed: run `npm ci` in {NODE_DIR}"
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason} (CI is set: the Node tests must run)")
        pytest.skip(reason)
    assert node is not None
    return node


def npm_bin(name: str) -> str:
    """A command an npm package of the project installed (``node_modules/.bin``)."""
    return str(NODE_DIR / "node_modules" / ".bin" / name)


def bundle(entry: str, out_dir: Path) -> Path:
    """`entry` (a module of ``node/``) and the npm packages it imports, bundled for the
    browser by the project's esbuild into `out_dir`."""
    require_node()
    out = out_dir / f"{Path(entry).stem}.js"
    command = [npm_bin("esbuild"), entry, "--bundle", "--format=esm", f"--outfile={out}"]
    subprocess.run([*command, "--log-level=warning"], cwd=NODE_DIR, check=True, timeout=120)
    return out


@dataclass(frozen=True)
class Answer:
    """One answer of the driver (see ``node/driver.mjs``)."""

    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.data["ok"])

    @property
    def received(self) -> bytes:
        """Every body byte the stream received so far."""
        return base64.b64decode(self.data.get("received") or "")

    @property
    def done(self) -> bool:
        """Whether the body ended properly."""
        return bool(self.data.get("done"))

    @property
    def status(self) -> int:
        return int(self.data["status"])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.data["headers"] if k == name.lower()), None)

    @property
    def error(self) -> str:
        return str(self.data.get("error", ""))


class DurableFetch:
    """The npm ``durablefetch`` client, ``new DurableFetchClient({ durablefetchHost })``, in a
    ``node`` process that trusts the test CA (``NODE_EXTRA_CA_CERTS``). Each method sends one
    command and waits (at most `timeout` s) for its answer."""

    def __init__(self, proxy_host: str, ca: Path, timeout: float = 15.0) -> None:
        self.proxy_host = proxy_host
        self.ca = ca
        self.timeout = timeout
        self.stderr = ""
        """What the client logged (e.g. durablefetch's "bypassed" warnings), once closed."""
        self._process: anyio.abc.Process | None = None
        self._stdout: BufferedByteReceiveStream | None = None

    async def __aenter__(self) -> DurableFetch:
        node = require_node()
        env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(self.ca)}
        self._process = await anyio.open_process(
            [node, str(NODE_DIR / "driver.mjs"), self.proxy_host],
            cwd=NODE_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self._process.stdout is not None
        self._stdout = BufferedByteReceiveStream(self._process.stdout)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        assert process is not None and process.stdin is not None and process.stderr is not None
        await process.stdin.aclose()  # the driver hangs up on what is open, and exits
        with anyio.move_on_after(5, shield=True) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()
        chunks = [chunk async for chunk in process.stderr]
        self.stderr = b"".join(chunks).decode(errors="replace")
        await process.aclose()

    async def _call(self, **command: Any) -> Answer:
        process, stdout = self._process, self._stdout
        assert process is not None and process.stdin is not None and stdout is not None
        with anyio.fail_after(self.timeout):
            await process.stdin.send(json.dumps(command).encode() + b"\n")
            try:
                line = await stdout.receive_until(b"\n", 1 << 24)
            except anyio.IncompleteRead:
                assert process.stderr is not None
                logged = b"".join([chunk async for chunk in process.stderr])
                raise RuntimeError(f"node exited: {logged.decode(errors='replace')}") from None
        return Answer(json.loads(line))

    async def open(self, stream: str, url: str, **init: Any) -> Answer:
        """``df.fetch(url, init)``: the response head; its body is read by `read`/`rest`."""
        answer = await self._call(op="open", stream=stream, url=url, **init)
        assert answer.ok, answer.error
        return answer

    async def read(self, stream: str, until: int) -> Answer:
        """Read `stream`'s body until at least `until` bytes came (or it ended)."""
        return await self._call(op="read", stream=stream, until=until)

    async def rest(self, stream: str) -> Answer:
        """Read `stream`'s body to its end (``ok`` is False if it ended abnormally)."""
        return await self._call(op="rest", stream=stream)

    async def abort(self, stream: str) -> None:
        """Abort the request (its ``AbortController``): the connection closes mid-body."""
        assert (await self._call(op="abort", stream=stream)).ok

    async def fetch(self, url: str, **init: Any) -> Answer:
        """``df.fetch(url, init)``, read to the end of its body."""
        return await self._call(op="fetch", url=url, **init)

    async def is_in_progress(self, url: str) -> dict[str, Any]:
        """``df.isInProgress(url)``."""
        answer = await self._call(op="isInProgress", url=url)
        assert answer.ok, answer.error
        return dict(answer.data["result"])

    async def delete(self, url: str) -> dict[str, Any]:
        """``df.delete(url)``."""
        answer = await self._call(op="delete", url=url)
        assert answer.ok, answer.error
        return dict(answer.data["result"])
