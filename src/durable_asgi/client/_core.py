"""The protocol side of the clients, with no I/O: it never sends, reads, sleeps or imports httpx.

The async and sync shells send requests and read bodies; for every step they ask a `Cursor`
what to send and tell it what came back, and it answers with the next step:

- `Cursor.headers`: the headers of the next attempt (the key, and ``Durable-Offset`` when
  resuming); `Cursor.needs_probe`: ask for the stream's status first.
- `Cursor.accept`: what a response's status and headers mean: ``"stream"`` (read its body),
  ``"plain"`` (not durable: pass it on untouched) or ``"retry"``.
- `Cursor.take`: the part of a chunk not delivered yet.
- `Cursor.ended` (done) and `Cursor.broke` (reconnect after that many seconds).

Any of them raises `StreamFailed` when the stream can't be finished. Being I/O-free, this is
tested by feeding it answers directly (``tests/clients/test_client_core.py``).
"""

from __future__ import annotations

import json as jsonlib
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from ..exceptions import DurableClientError, StreamFailed

Control = Literal["status", "abort", "delete"]
Verdict = Literal["stream", "plain", "retry"]

#: Statuses worth retrying while reconnecting: the server is busy or its store is down.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_WHY = {
    "failed": "the stream failed on the server (its handler raised)",
    "aborted": "the stream was aborted",
    "absent": "the stream doesn't exist on the server (never started, deleted or expired)",
}


@dataclass
class Cursor:
    """One stream's progress and the decisions about it: what to ask for next, what an answer
    means, when to give up.

    Headers given to it are read by lowercase name: pass `httpx.Headers` (case-insensitive)
    or a dict with lowercase keys.
    """

    key: str
    key_header: str | None
    offset: int
    max_retries: int
    backoff_initial: float
    backoff_max: float
    durable: bool | None = None
    """None until the first answer; then whether it carried durable headers."""
    state: str | None = None
    """The Durable-State of the answer being read."""
    skip: int = 0
    attempts: int = 0
    reconnects: int = 0
    resumed: bool = False
    _rng: random.Random = field(default_factory=random.Random)

    def headers(self, base: Mapping[str, str] | None) -> dict[str, str]:
        """The headers of the next attempt: `base`, the key, and where to resume from."""
        headers = dict(base or {})
        if self.key_header is not None:
            headers[self.key_header] = self.key
        if self.offset > 0 or self.durable:
            # Explicit on every reconnect, even at 0: a server that reads it as "resume only"
            # never starts the handler for it (`needs_probe` covers servers that don't).
            headers["Durable-Offset"] = str(self.offset)
        return headers

    @property
    def needs_probe(self) -> bool:
        """Reconnecting at offset 0: ask for the status first, since a request at offset 0
        for a failed stream would start its handler again, which a reconnect must never do."""
        return self.durable is True and self.offset == 0

    def probed(self, status: Mapping[str, Any]) -> None:
        """The probe's answer (a status dict): a stream that is absent or failed can't go on."""
        state = status["state"]
        if state in ("absent", "failed"):
            raise self.final(state)

    def accept(self, status: int, headers: Mapping[str, str]) -> Verdict:
        """What an answer means: stream it, pass it on untouched (``plain``), or retry.

        Raises `StreamFailed` for answers that end the stream for good."""
        state = headers.get("durable-state")
        ok = 200 <= status < 300
        if self.durable is None:
            if status == 416 and state is not None:
                raise self.final(state)
            if not ok or state is None or status in (204, 205):
                self.durable = False  # an error, a plain response, or "nothing to join"
                return "plain"
            self.resumed = headers.get("durable-replay") == "true"
        elif status == 416:
            raise self.final(state or "absent")
        elif status in RETRY_STATUSES:
            return "retry"
        elif not ok:
            raise self.final("protocol", f"HTTP {status} while reconnecting")
        start = headers.get("durable-offset", "")
        if state is None or not start.isdigit() or int(start) > self.offset:
            raise self.final(
                "protocol",
                f"a resume from byte {self.offset} was answered with Durable-Offset "
                f"{start or 'missing'} (Durable-State {state})",
            )
        self.durable = True
        self.state = state
        self.skip = self.offset - int(start)
        return "stream"

    def take(self, data: bytes) -> bytes:
        """The part of `data` not delivered yet; counts it as delivered.

        A body that isn't durable is passed on as it is, and not counted: it can't be resumed.
        """
        if not self.durable:
            return data
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
        if data:
            self.offset += len(data)
            self.attempts = 0  # progress: the retry budget is per outage
        return data

    def ended(self) -> None:
        """The body ended cleanly. Only running/complete streams do; be strict about others."""
        if self.durable and self.state not in ("running", "complete"):
            raise self.final(self.state or "failed")

    def broke(self, cause: BaseException | None) -> float:
        """The connection broke (or a retryable answer came): seconds to wait before the next
        attempt. Raises `StreamFailed` when there is nothing to wait for."""
        if self.durable and self.state not in ("running", "complete"):
            raise self.final(self.state or "failed") from cause
        self.attempts += 1
        if self.attempts > self.max_retries:
            raise StreamFailed(
                f"could not reconnect after {self.max_retries} attempts; "
                f"{self.offset} bytes were delivered",
                key=self.key,
                state="unreachable",
                offset=self.offset,
            ) from cause
        if self.durable:
            self.reconnects += 1
        if self.attempts == 1:
            return 0.0  # the usual cause is one dead connection: try again at once
        delay = min(self.backoff_max, self.backoff_initial * 2.0 ** (self.attempts - 2))
        return delay * self._rng.uniform(0.8, 1.2)

    def final(self, state: str, detail: str | None = None) -> StreamFailed:
        """The error that ends the stream in `state`."""
        why = detail or _WHY.get(state, f"the stream can't be continued (state {state})")
        return StreamFailed(
            f"{why}; {self.offset} bytes were delivered",
            key=self.key,
            state=state,
            offset=self.offset,
        )


@dataclass(frozen=True)
class Options:
    """A client's reconnect settings."""

    key_header: str | None
    max_retries: int
    backoff_initial: float
    backoff_max: float

    def cursor(self, key: str | None, offset: int) -> Cursor:
        """A cursor for the stream `key` (a new random key if None), starting at `offset`."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        return Cursor(
            key=key if key is not None else secrets.token_hex(16),
            key_header=self.key_header,
            offset=offset,
            max_retries=self.max_retries,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
        )


class Request(TypedDict, total=False):
    """What a request sends besides its method and URL (the keywords of the client methods)."""

    params: Mapping[str, str] | None
    headers: Mapping[str, str] | None
    content: bytes | str | None
    json: Any


@dataclass
class Call:
    """One request as given: resent unchanged (plus key and offset) on every attempt."""

    method: str
    url: str
    params: Mapping[str, str] | None
    headers: Mapping[str, str] | None
    content: bytes | None


def make_call(
    method: str,
    url: str,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    content: bytes | str | None = None,
    json: Any = None,
) -> Call:
    """The request to send on every attempt, its body encoded once."""
    headers = dict(headers or {})
    if json is not None:
        if content is not None:
            raise TypeError("pass content= or json=, not both")
        # Encoded once, so every attempt sends the very same bytes.
        content = jsonlib.dumps(json, separators=(",", ":")).encode()
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
    if isinstance(content, str):
        content = content.encode()
    return Call(method.upper(), url, params, headers, content)


def control_headers(
    key: str, key_header: str | None, operation: Control, headers: Mapping[str, str] | None
) -> dict[str, str]:
    """The headers of a ``Durable-Control`` request: the call's own, the key, the operation."""
    out = dict(headers or {})
    if key_header is not None:
        out[key_header] = key
    out["Durable-Control"] = operation
    return out


def control_result(
    operation: Control, status: int, headers: Mapping[str, str], body: bytes, url: str
) -> dict[str, Any]:
    """The answer to a control request (`body` read whole): the status dict for ``status``,
    ``{}`` for the others. Raises `DurableClientError` when no durable_asgi server answered."""
    state = headers.get("durable-state")
    if operation == "status":
        if status == 404 and state == "absent":
            return {"state": "absent"}
        if status == 200 and state is not None:
            result: dict[str, Any] = jsonlib.loads(body)
            return result
    elif 200 <= status < 300:
        return {}
    raise DurableClientError(
        f"the server did not answer Durable-Control: {operation} "
        f"(HTTP {status}) for {url}: is DurableMiddleware in "
        "front of it, and is the key sent where it reads it?"
    )
