"""The clients' sans-IO core, driven directly: answers go in, decisions come out, no network.

Each test plays one conversation with a server (the status and headers it answers with, the
bytes that arrive, where the connection breaks) and checks what the core asks for next.
"""

from __future__ import annotations

import random

import httpx
import pytest

from durable_asgi.client import DurableClientError, StreamFailed
from durable_asgi.client._core import (
    Cursor,
    Options,
    control_headers,
    control_result,
    make_call,
)


def cursor(offset: int = 0, *, key: str = "k", **options: object) -> Cursor:
    settings: dict[str, object] = {
        "key_header": "Durable-Key",
        "max_retries": 10,
        "backoff_initial": 0.1,
        "backoff_max": 5.0,
        **options,
    }
    return Options(**settings).cursor(key, offset)  # type: ignore[arg-type]


def running(start: int, state: str = "running", **more: str) -> dict[str, str]:
    """The headers of a durable answer starting at byte `start` (lowercase, as the core reads)."""
    return {"durable-state": state, "durable-offset": str(start), **more}


def streaming(c: Cursor, *chunks: bytes) -> bytes:
    """Accept a fresh answer from byte 0 and feed it `chunks`; what the core lets through."""
    assert c.accept(200, running(0)) == "stream"
    return b"".join(c.take(chunk) for chunk in chunks)


# -- the request of each attempt --------------------------------------------------------------


def test_the_first_attempt_sends_the_key_and_no_offset() -> None:
    c = cursor()
    assert c.headers({"Authorization": "x"}) == {"Authorization": "x", "Durable-Key": "k"}
    assert not c.needs_probe
    assert cursor(key_header=None).headers(None) == {}


def test_starting_from_an_offset_asks_for_it() -> None:
    assert cursor(1234).headers(None) == {"Durable-Key": "k", "Durable-Offset": "1234"}
    with pytest.raises(ValueError, match="negative"):
        cursor(-1)


def test_a_generated_key_is_random_hex() -> None:
    options = Options("Durable-Key", 3, 0.1, 1.0)
    first, second = options.cursor(None, 0).key, options.cursor(None, 0).key
    assert len(first) == 32 and int(first, 16) >= 0
    assert first != second


# -- a body that breaks -----------------------------------------------------------------------


def test_a_body_dropped_mid_stream_reconnects_with_the_bytes_delivered() -> None:
    c = cursor()
    assert streaming(c, b"hello", b" world") == b"hello world"
    assert c.offset == 11

    assert c.broke(httpx.ReadError("cut")) == 0.0  # the first retry goes at once
    assert c.reconnects == 1
    assert c.headers({"X-A": "1"}) == {"X-A": "1", "Durable-Key": "k", "Durable-Offset": "11"}
    assert not c.needs_probe

    # The server resumes a little earlier than asked: the overlap is dropped, not repeated.
    assert c.accept(200, running(5)) == "stream"
    assert c.take(b" wor") == b""
    assert c.take(b"ld!") == b"!"
    assert c.offset == 12
    c.ended()  # a clean end of a running stream: done


def test_a_drop_before_any_byte_probes_the_status_first() -> None:
    c = cursor()
    assert streaming(c) == b""
    c.broke(httpx.RemoteProtocolError("no body"))
    assert c.needs_probe
    assert c.headers(None)["Durable-Offset"] == "0"  # explicit, even at 0
    c.probed({"state": "running"})  # still going: the request may be sent
    for state in ("failed", "absent"):
        with pytest.raises(StreamFailed) as failed:
            c.probed({"state": state})
        assert (failed.value.state, failed.value.offset) == (state, 0)


def test_progress_resets_the_retry_budget() -> None:
    c = cursor(max_retries=2)
    streaming(c, b"ab")
    assert c.broke(None) == 0.0
    assert c.broke(None) > 0.0
    assert c.accept(200, running(2)) == "stream"
    assert c.take(b"c") == b"c"
    assert c.broke(None) == 0.0  # a new outage: at once again, and two more allowed
    assert c.broke(None) > 0.0
    with pytest.raises(StreamFailed, match="after 2 attempts"):
        c.broke(None)


# -- answers that end the stream --------------------------------------------------------------


@pytest.mark.parametrize("state", ["failed", "aborted"])
def test_a_stream_that_ended_badly_delivers_its_bytes_then_fails(state: str) -> None:
    c = cursor()
    assert c.accept(200, running(0, state)) == "stream"
    assert c.take(b"partial") == b"partial"
    with pytest.raises(StreamFailed) as failed:
        c.ended()
    assert (failed.value.state, failed.value.key, failed.value.offset) == (state, "k", 7)

    cut = httpx.ReadError("cut")
    with pytest.raises(StreamFailed) as broken:
        c.broke(cut)  # nothing to resume: no reconnect
    assert broken.value.state == state
    assert broken.value.__cause__ is cut
    assert c.reconnects == 0


def test_a_resume_answered_with_failed_is_stream_failed() -> None:
    c = cursor()
    streaming(c, b"0123456789")
    c.broke(None)
    assert c.accept(200, running(10, "failed")) == "stream"
    with pytest.raises(StreamFailed) as failed:
        c.ended()
    assert (failed.value.state, failed.value.offset) == ("failed", 10)


def test_416_with_absent_is_absent() -> None:
    c = cursor(5)
    with pytest.raises(StreamFailed) as absent:
        c.accept(416, {"durable-state": "absent"})
    assert (absent.value.state, absent.value.offset) == ("absent", 5)
    assert "doesn't exist" in str(absent.value)

    c = cursor()
    streaming(c, b"abc")
    c.broke(None)
    with pytest.raises(StreamFailed) as gone:
        c.accept(416, {})  # deleted while we were away; no state said
    assert gone.value.state == "absent"


@pytest.mark.parametrize(
    ("status", "headers", "detail"),
    [
        (404, {}, "HTTP 404 while reconnecting"),
        (200, {"durable-state": "running", "durable-offset": "99"}, "Durable-Offset 99"),
        (200, {"durable-state": "running"}, "Durable-Offset missing"),
        (200, {"durable-offset": "3"}, "Durable-State None"),
    ],
)
def test_a_resume_answered_wrongly_is_a_protocol_error(
    status: int, headers: dict[str, str], detail: str
) -> None:
    c = cursor()
    streaming(c, b"abc")
    c.broke(None)
    with pytest.raises(StreamFailed, match=detail) as failed:
        c.accept(status, headers)
    assert failed.value.state == "protocol"


# -- retries and backoff ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retry_statuses_back_off_doubling_up_to_the_cap_then_give_up(status: int) -> None:
    c = cursor(max_retries=6, backoff_initial=0.1, backoff_max=0.5)
    c._rng = random.Random(1)
    streaming(c, b"data")
    delays = [c.broke(None)]  # the drop itself
    for _ in range(5):
        assert c.accept(status, {"durable-state": "running"}) == "retry"
        delays.append(c.broke(None))
    assert delays[0] == 0.0
    for delay, base in zip(delays[1:], [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
        assert base * 0.8 <= delay <= base * 1.2  # jittered by ±20 %
    assert c.reconnects == 6

    with pytest.raises(StreamFailed) as failed:
        c.broke(None)
    assert (failed.value.state, failed.value.offset) == ("unreachable", 4)


def test_an_unreachable_server_gives_up_with_the_last_error_as_cause() -> None:
    c = cursor(max_retries=3)
    errors = [httpx.ConnectError(f"refused {i}") for i in range(4)]
    for error in errors[:3]:
        c.broke(error)
    with pytest.raises(StreamFailed) as failed:
        c.broke(errors[3])
    assert failed.value.state == "unreachable"
    assert failed.value.__cause__ is errors[3]
    assert c.reconnects == 0  # never connected: these were not reconnects


def test_a_retry_status_on_the_first_answer_is_passed_on() -> None:
    c = cursor()
    assert c.accept(503, {"durable-state": "running"}) == "plain"
    assert c.durable is False


# -- answers that aren't durable --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers"),
    [(200, {}), (404, {"durable-state": "absent"}), (204, {"durable-state": "absent"})],
)
def test_a_first_answer_that_isnt_durable_passes_through(
    status: int, headers: dict[str, str]
) -> None:
    c = cursor()
    assert c.accept(status, headers) == "plain"
    assert c.durable is False
    assert c.take(b"as it is") == b"as it is"
    assert c.offset == 0  # not counted: it can't be resumed
    c.ended()


def test_headers_are_read_case_insensitively_from_httpx() -> None:
    c = cursor()
    answer = httpx.Headers({"Durable-State": "complete", "Durable-Offset": "0"})
    answer["Durable-Replay"] = "true"
    assert c.accept(200, answer) == "stream"
    assert (c.durable, c.state, c.resumed) == (True, "complete", True)


# -- the request as given, and control requests -----------------------------------------------


def test_json_is_encoded_once_with_its_content_type() -> None:
    call = make_call("post", "/chat", {"a": "1"}, {"X": "y"}, json={"q": "hé"})
    assert (call.method, call.url, call.params) == ("POST", "/chat", {"a": "1"})
    assert call.content == b'{"q":"h\\u00e9"}'  # compact, ASCII: as json.dumps does
    assert call.headers == {"X": "y", "Content-Type": "application/json"}
    own = make_call("POST", "/", headers={"content-type": "text/x"}, json=[1])
    assert own.headers == {"content-type": "text/x"}
    assert make_call("PUT", "/", content="é").content == "é".encode()
    with pytest.raises(TypeError, match="not both"):
        make_call("POST", "/", content=b"x", json={})


def test_control_headers() -> None:
    assert control_headers("k", "Durable-Key", "abort", {"A": "b"}) == {
        "A": "b",
        "Durable-Key": "k",
        "Durable-Control": "abort",
    }
    assert control_headers("k", None, "status", None) == {"Durable-Control": "status"}


def test_control_results() -> None:
    absent = {"durable-state": "absent"}
    assert control_result("status", 404, absent, b"", "/x") == {"state": "absent"}
    body = b'{"key": "k", "state": "running", "offset": 3}'
    status = control_result("status", 200, {"durable-state": "running"}, body, "/x")
    assert status == {"key": "k", "state": "running", "offset": 3}
    assert control_result("delete", 204, {}, b"", "/x") == {}
    with pytest.raises(DurableClientError, match=r"Durable-Control: status \(HTTP 200\) for /x"):
        control_result("status", 200, {}, b"{}", "/x")  # no middleware answered
    with pytest.raises(DurableClientError, match=r"abort \(HTTP 404\)"):
        control_result("abort", 404, absent, b"", "/x")
