"""The operator CLI (`durable-asgi`) against real stores: SQLite files and a redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from durable_asgi.cli import main
from durable_asgi.stores import Lease, Store, store_from_url

BODY = bytes(range(256)) * 40  # binary, 10 KiB


def run(capsysbinary: pytest.CaptureFixture[bytes], *argv: str) -> tuple[int, bytes, str]:
    """`durable-asgi *argv` in this process: (exit status, stdout bytes, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsysbinary.readouterr()
    return int(exited.value.code or 0), out, err.decode()


async def _seed(store: Store, prefix: str) -> None:
    """Three streams: complete, running (lease held for a minute) and failed."""
    await store.open()
    try:
        lease = await store.claim(f"{prefix}#done", lease_seconds=60)
        assert isinstance(lease, Lease)
        await store.start(lease, 200, ((b"content-type", b"application/octet-stream"),))
        await store.append(lease, BODY[:4000], chunks=3)
        await store.append(lease, BODY[4000:], chunks=2)
        await store.finish(lease, "complete", ttl=3600, retain=True)
        lease = await store.claim(f"{prefix}#live", lease_seconds=60)
        assert isinstance(lease, Lease)
        await store.start(lease, 200, ())
        await store.append(lease, b"so far", chunks=1)
        lease = await store.claim(f"{prefix}#old", lease_seconds=60)
        assert isinstance(lease, Lease)
        await store.finish(lease, "complete", ttl=0.01, retain=True)
    finally:
        await store.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cli.db'}"
    elif request.param == "postgres":
        yield str(request.getfixturevalue("postgres_store_url"))
    else:
        yield str(request.getfixturevalue("redis_url"))


@pytest.fixture
def seeded(url: str) -> str:
    """A namespace of three fresh streams in the store at `url`."""
    prefix = f"/cli-{uuid.uuid4().hex[:8]}"
    anyio.run(_seed, store_from_url(url), prefix, backend="asyncio")
    time.sleep(0.02)  # let `old` expire (a wall-clock TTL: nothing to wait on)
    return prefix


def test_list(capsysbinary: pytest.CaptureFixture[bytes], url: str, seeded: str) -> None:
    code, out, _ = run(capsysbinary, "--store", url, "list")
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.decode().splitlines()}
    assert lines["ID"] == ["ID", "STATE", "SIZE", "CHUNKS", "READERS", "AGE", "STATUS"]
    assert lines[f"{seeded}#done"][1:5] == ["complete", "10.0", "KiB", "5"]
    assert lines[f"{seeded}#live"][1:5] == ["running", "6", "B", "1"]
    assert f"{seeded}#old" not in lines  # expired: not listed

    code, out, _ = run(capsysbinary, "--store", url, "list", "--json")
    rows = {row["id"]: row for row in map(json.loads, out.decode().splitlines())}
    assert rows[f"{seeded}#done"]["offset"] == len(BODY)
    assert rows[f"{seeded}#live"]["state"] == "running"


def test_list_uses_the_environment(
    capsysbinary: pytest.CaptureFixture[bytes],
    url: str,
    seeded: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DURABLE_ASGI_STORE", url)
    code, out, _ = run(capsysbinary, "list")
    assert code == 0 and f"{seeded}#done".encode() in out


def test_show(capsysbinary: pytest.CaptureFixture[bytes], url: str, seeded: str) -> None:
    code, out, _ = run(capsysbinary, "--store", url, "show", f"{seeded}#done")
    assert code == 0
    text = out.decode()
    assert "state:" in text and "complete" in text
    assert "content-type: application/octet-stream" in text

    code, out, _ = run(capsysbinary, "--store", url, "show", f"{seeded}#done", "--json")
    assert json.loads(out)["chunks"] == 5

    code, out, _ = run(capsysbinary, "--store", url, "show", f"{seeded}#done", "--body")
    assert (code, out) == (0, BODY)
    code, out, _ = run(
        capsysbinary, "--store", url, "show", f"{seeded}#done", "--body", "--offset", "3"
    )
    assert (code, out) == (0, BODY[3:])
    code, out, _ = run(capsysbinary, "--store", url, "show", f"{seeded}#live", "--body")
    assert (code, out) == (0, b"so far")


def test_show_errors(capsysbinary: pytest.CaptureFixture[bytes], url: str, seeded: str) -> None:
    code, out, err = run(capsysbinary, "--store", url, "show", f"{seeded}#nope")
    assert (code, out) == (1, b"")
    assert "no stream" in err
    end = str(len(BODY) + 1)
    code, _, err = run(
        capsysbinary, "--store", url, "show", f"{seeded}#done", "--body", "--offset", end
    )
    assert code == 1 and "past the end" in err
    code, _, err = run(capsysbinary, "--store", url, "show", f"{seeded}#done", "--offset", "-1")
    assert code == 2 and "negative" in err


def test_delete_and_purge(
    capsysbinary: pytest.CaptureFixture[bytes], url: str, seeded: str
) -> None:
    code, out, _ = run(capsysbinary, "--store", url, "delete", f"{seeded}#live")
    assert code == 0 and b"deleted" in out
    code, _, err = run(capsysbinary, "--store", url, "delete", f"{seeded}#live")
    assert code == 1 and "no stream" in err
    code, out, _ = run(capsysbinary, "--store", url, "show", f"{seeded}#live")
    assert code == 1

    code, out, _ = run(capsysbinary, "--store", url, "purge")
    assert code == 0 and out.startswith(b"purged ")
    code, out, _ = run(capsysbinary, "--store", url, "list")
    assert f"{seeded}#done".encode() in out and f"{seeded}#live".encode() not in out


def test_memory_store_is_empty(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    # A memory:// store lives in its process: the CLI's own is empty (but it works).
    code, out, _ = run(capsysbinary, "--store", "memory://", "list")
    assert (code, out.decode().splitlines()[-1]) == (0, "0 stream(s)")
    code, _, _ = run(capsysbinary, "--store", "memory://", "show", "/x#1")
    assert code == 1


def test_usage_errors(
    capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABLE_ASGI_STORE", raising=False)
    code, _, err = run(capsysbinary, "list")
    assert code == 2 and "DURABLE_ASGI_STORE" in err
    code, _, err = run(capsysbinary, "--store", "ftp://x", "list")
    assert code == 2 and "unknown store URL" in err
    code, _, _ = run(capsysbinary, "--store", "memory://", "frobnicate")
    assert code == 2
    code, _, _ = run(capsysbinary, "--store", "memory://", "show")
    assert code == 2
    # A missing SQLite file is reported, not created empty.
    missing = tmp_path / "missing.db"
    code, _, err = run(capsysbinary, "--store", f"sqlite:///{missing}", "list")
    assert code == 1 and "no SQLite store" in err
    assert not missing.exists()


def test_entry_point(tmp_path: Path) -> None:
    """The installed script's module runs as a program with its exit codes."""
    env = {**os.environ, "DURABLE_ASGI_STORE": f"sqlite:///{tmp_path / 'none.db'}"}
    command = [sys.executable, "-m", "durable_asgi.cli", "list"]
    done = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 1 and b"no SQLite store" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "durable_asgi.cli", "--help"], capture_output=True, timeout=30
    )
    assert done.returncode == 0 and b"list" in done.stdout


def test_stats_counts_streams_by_state_and_bytes_store_side(
    capsysbinary: pytest.CaptureFixture[bytes], url: str, seeded: str
) -> None:
    code, out, _ = run(capsysbinary, "--store", url, "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    exact = not url.startswith("redis")  # a Redis database may hold other tests' streams too
    seen = (stats["streams"].get("running", 0), stats["streams"].get("complete", 0))
    assert seen == (1, 1) if exact else seen >= (1, 1)
    assert stats["bytes"] == len(BODY) + 6 if exact else stats["bytes"] >= len(BODY) + 6
    assert stats["oldest_running"] <= time.time()
    code, out, _ = run(capsysbinary, "--store", url, "stats")
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.decode().splitlines())
    assert lines.keys() >= {"running", "complete", "failed", "aborted", "bytes", "oldest running"}


def test_stats_of_a_memory_store_says_it_cannot(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    code, _, err = run(capsysbinary, "--store", "memory://", "stats")
    assert code == 1 and "can't count its streams" in err


def test_show_prints_the_hash_logs_and_traces_use(
    capsysbinary: pytest.CaptureFixture[bytes], url: str, seeded: str
) -> None:
    from durable_asgi._telemetry import stream_hash

    code, out, _ = run(capsysbinary, "--store", url, "show", f"{seeded}#done", "--json")
    assert code == 0
    assert json.loads(out)["hash"] == stream_hash(f"{seeded}#done")
