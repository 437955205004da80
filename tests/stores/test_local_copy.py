"""`LocalCopy`: the newest bytes of a stream this process produces, which its readers here read
instead of the shared store (SQLite, Redis, PostgreSQL)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from durable_asgi.stores._base import LocalCopy, StreamInfo


def info(offset: int, state: str = "running") -> StreamInfo:
    return StreamInfo(
        id="s",
        state=state,  # type: ignore[arg-type]
        generation="g",
        version=1,
        offset=offset,
        chunks=0,
        readers=0,
        status_code=200,
        headers=(),
        created_at=0.0,
        updated_at=0.0,
        expires_at=None,
        lease_expires_at=None,
    )


writes = st.lists(st.lists(st.binary(min_size=1, max_size=9), min_size=1, max_size=3), max_size=30)


@given(writes=writes, keep=st.sampled_from([1, 16, 64, 1 << 16]), limit=st.integers(0, 40))
def test_every_read_is_the_body_from_its_offset_or_none_when_not_held(
    writes: list[list[bytes]], keep: int, limit: int
) -> None:
    copy, body = LocalCopy(info(0), keep=keep), b""
    for parts in writes:
        body += b"".join(parts)
        copy.update(info(len(body)), parts)
    assert copy.base + copy.size == len(body)
    assert copy.size <= keep or len(copy.parts) == 1  # only the newest bytes
    for offset in range(-1, len(body) + 2):
        got = copy.read(offset, limit)
        if copy.base <= offset <= len(body):
            assert got == body[offset : offset + limit]
        else:
            assert got is None


def test_a_gap_starts_afresh_and_a_finished_stream_keeps_no_bytes() -> None:
    copy = LocalCopy(info(0))
    copy.update(info(3), [b"abc"])
    copy.update(info(10), [b"hij"])  # 3..7 were stored elsewhere: not contiguous
    assert (copy.read(2, 10), copy.read(7, 10), copy.read(8, 2)) == (None, b"hij", b"ij")
    copy.settle(info(10, "complete"))
    assert (copy.read(7, 10), copy.read(10, 10)) == (None, b"")
