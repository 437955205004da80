"""Several server processes sharing one store: SQLite (one file), Redis and PostgreSQL.

Each test runs `tests/support/mp_app.py` in real uvicorn processes
(`running_server("tests.support.mp_app:app")`) and counts handler calls across processes
through a file. Covered: a stream started on A and resumed on B from the offset reached; the
producer's process killed (kill -9) mid-stream, so B's reader ends failed within the lease time
and the next request runs the handler again; ``uvicorn --workers 2``; a finished SQLite stream
replaying after a restart; Redis and PostgreSQL restarted mid-stream (complete and intact, or
failed for readers: never silently truncated, never a hang); PostgreSQL's listening connection
killed with ``pg_terminate_backend`` mid-stream (the reader on the other worker loses nothing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from ..support import mp_app
from ..support.servers import IncompleteBody, RunningServer, fetch, open_stream, running_server

APP = "tests.support.mp_app:app"
LEASE = 1.0
POLL = 0.2
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HAVE_REDIS_SERVER = os.path.exists(REDIS_SERVER)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SQLite and Redis stores are asyncio-only; the client runs on either


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_store_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def env(store_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "MP_STORE": store_url,
        "MP_CALLS": str(tmp_path / "calls.log"),
        "MP_LEASE": str(LEASE),
        "MP_POLL": str(POLL),
    }


def durable(key: str, offset: int | None = None) -> dict[str, str]:
    headers = {"Durable-Key": key}
    if offset is not None:
        headers["Durable-Offset"] = str(offset)
    return headers


async def control(server: RunningServer, path: str, key: str) -> bytes:
    """The stream's status document (``Durable-Control: status``)."""
    result = await fetch(server.url, path, headers={**durable(key), "Durable-Control": "status"})
    assert result.status == 200
    return result.body


def handler_calls(env: dict[str, str], key: str) -> list[int]:
    return mp_app.calls(env["MP_CALLS"], key)


async def bare(server: RunningServer, n: int) -> bytes:
    """The body of the app without the middleware's involvement (no key: pass-through)."""
    result = await fetch(server.url, f"/stream?n={n}")
    assert result.complete
    assert result.header("durable-offset") is None
    return result.body


async def test_disconnect_on_a_resume_on_b(env: dict[str, str]) -> None:
    key = uuid.uuid4().hex
    path = "/stream?n=200&delay=0.01"  # ~2 s: B joins while A's handler is still running
    with running_server(APP, env=env) as a, running_server(APP, env=env) as b:
        with anyio.fail_after(20):
            async with open_stream(a.url, path, headers=durable(key)) as resp:
                assert resp.status == 200
                head = await resp.read_exactly(700)
            # Leaving the block really closed the connection, mid-stream.
            result = await fetch(b.url, path, headers=durable(key, len(head)))
            assert result.status == 200
            assert result.header("durable-replay") == "true"
            assert result.header("durable-state") == "running"  # followed live, cross-process
            assert result.header("durable-offset") == str(len(head))
            assert result.complete
            assert head + result.body == await bare(a, 200)
            assert handler_calls(env, key) == [a.process.pid]  # type: ignore[union-attr]


async def test_kill_producer_fails_readers_within_lease(env: dict[str, str]) -> None:
    key = uuid.uuid4().hex
    with running_server(APP, env=env) as a, running_server(APP, env=env) as b:
        with anyio.fail_after(30):
            async with (
                open_stream(a.url, "/stream?n=2000&delay=0.01", headers=durable(key)),
                open_stream(b.url, "/stream", headers=durable(key)) as follower,
            ):
                assert follower.header("durable-replay") == "true"
                assert await follower.read_exactly(300)  # B follows A's live stream
                a.kill()
                killed = time.monotonic()
                with pytest.raises(IncompleteBody) as ended:
                    await follower.read_all()
                detected = time.monotonic() - killed
            # B's reader got bytes A stored, then an abnormal end; never a clean one.
            assert mp_app.body(2000).startswith(ended.value.body)
            assert detected < LEASE + 2 * POLL + 1.5, f"failed after {detected:.2f} s"
            print(f"\nkill -9 of the producer -> B's reader ended in {detected:.2f} s")

            # The stream failed: the next request with that key runs the handler once more.
            status = await fetch(
                b.url, "/stream", headers={**durable(key), "Durable-Control": "status"}
            )
            assert status.status == 200 and b'"failed"' in status.body
            result = await fetch(b.url, "/stream?n=50", headers=durable(key))
            assert result.complete and result.header("durable-replay") is None
            assert result.body == await bare(b, 50)
            assert handler_calls(env, key) == [a.process.pid, b.process.pid]  # type: ignore[union-attr]


async def test_workers_share_one_stream(env: dict[str, str]) -> None:
    key = uuid.uuid4().hex
    path = "/stream?n=100&delay=0.01"
    pids: set[str] = set()
    bodies: list[bytes] = []
    with running_server(APP, env=env, workers=2) as server:
        expected = await bare(server, 100)

        async def one() -> None:
            result = await fetch(server.url, path, headers=durable(key))
            assert result.status == 200 and result.complete
            bodies.append(result.body)
            pids.add(result.header("x-worker-pid") or "")

        with anyio.fail_after(30):
            # Waves of concurrent requests with one key until both workers answered some
            # (the kernel picks the worker per connection).
            for _ in range(10):
                async with anyio.create_task_group() as tasks:
                    for _ in range(8):
                        tasks.start_soon(one)
                if len(pids) >= 2:
                    break
    assert len(pids) == 2, f"only worker {pids} answered"
    assert len(handler_calls(env, key)) == 1
    assert all(body == expected for body in bodies)


async def test_sqlite_stream_replays_after_restart(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    env = {"MP_STORE": f"sqlite:///{tmp_path / 'kept.db'}", "MP_CALLS": str(tmp_path / "calls")}
    with anyio.fail_after(30):
        with running_server(APP, env=env) as server:
            first = await fetch(server.url, "/stream?n=300", headers=durable(key))
            assert first.complete and first.header("durable-replay") is None
        # The process exited (gracefully, closing the store); a new one opens the same file.
        with running_server(APP, env=env) as server:
            again = await fetch(server.url, "/stream?n=300", headers=durable(key))
            tail = await fetch(server.url, "/stream", headers=durable(key, 1000))
            expected = await bare(server, 300)
    assert first.body == again.body == expected
    assert again.header("durable-replay") == "true" and again.header("durable-state") == "complete"
    assert tail.complete and tail.body == expected[1000:]
    assert len(handler_calls(env, key)) == 1


# -- Redis restarted mid-stream ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


class _RedisServer:
    """A redis-server on `port` without persistence: a restart loses everything."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _listening(self.port):  # a process starting up: no event to wait on
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


async def restart_mid_stream(
    store_url: str, tmp_path: Path, restart: Callable[[], None], *, kept: bool
) -> dict[str, tuple[bool, bytes]]:
    """A stream on worker A followed from worker B; 200 bytes into it the store's server is
    restarted. Checks that no reader's body is truncated as if complete and that the next
    request works (a replay or a fresh run); `kept`: the store keeps its data across the
    restart, so the stream must first turn final (the producer records `failed`, or its lease
    runs out). Returns each reader's (ended complete, bytes got)."""
    key = uuid.uuid4().hex
    env = {
        "MP_STORE": store_url,
        "MP_CALLS": str(tmp_path / "calls"),
        "MP_LEASE": str(LEASE),
        "MP_POLL": str(POLL),
    }
    n = 300
    expected = mp_app.body(n)
    outcomes: dict[str, tuple[bool, bytes]] = {}
    with running_server(APP, env=env) as a, running_server(APP, env=env) as b:
        with anyio.fail_after(60):
            path = f"/stream?n={n}&delay=0.01"
            async with (
                open_stream(a.url, path, headers=durable(key)) as first,
                open_stream(b.url, path, headers=durable(key)) as follower,
            ):
                got = {"first": await first.read_exactly(200)}
                got["follower"] = await follower.read_exactly(200)
                restart()
                for name, resp in (("first", first), ("follower", follower)):
                    try:
                        outcomes[name] = (True, got[name] + await resp.read_all())
                    except IncompleteBody as exc:
                        outcomes[name] = (False, exc.body)
            if kept:  # polled: no event crosses the processes
                deadline = time.monotonic() + LEASE + 3
                while b'"running"' in (status := await control(b, path, key)):
                    assert time.monotonic() < deadline, status
                    await anyio.sleep(0.05)
                complete = all(done for done, _ in outcomes.values())
                assert complete == (b'"complete"' in status)
            again = await fetch(b.url, path, headers=durable(key))
            assert again.complete and again.body == expected
    for name, (complete, data) in outcomes.items():
        assert expected.startswith(data), name
        if complete:
            assert data == expected, f"{name}: a truncated body ended as if complete"
    return outcomes


@pytest.mark.redis
async def test_redis_restart_mid_stream_never_truncates_silently(
    tmp_path: Path, redis_url: str
) -> None:
    # `redis_url` only for its verdict: skip (or, under CI, fail) when there is no Redis.
    if not HAVE_REDIS_SERVER:
        pytest.skip("needs the redis-server binary to restart a server of its own")
    redis = _RedisServer(_free_port())
    redis.start()

    def restart() -> None:
        redis.stop()  # and start again, empty: every key is gone
        redis.start()

    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        outcomes = await restart_mid_stream(url, tmp_path, restart, kept=False)
    finally:
        redis.stop()
    print(f"\nRedis restart mid-stream: { ({k: v[0] for k, v in outcomes.items()}) } complete")


# -- PostgreSQL restarted mid-stream, its listening connection killed ---------------------------

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


class _PostgresServer:
    """A PostgreSQL cluster of the test's own on `port` (trust auth), run as user postgres,
    so that it can be restarted without touching the machine's server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bin = PG_BIN[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="durable-pg-"))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self._as_postgres(
            [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        )

    def _as_postgres(self, command: list[str]) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            [str(self.bin / "pg_ctl"), action, "-D", str(self.data), "-w", "-o", options, *extra]
        )

    def start(self) -> None:
        self._pg_ctl("start", "-l", str(self.dir / "log"))

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")  # every connection is cut; committed data stays

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres(postgres_url: str) -> Iterator[_PostgresServer]:
    # `postgres_url` only for its verdict: skip (or, under CI, fail) without PostgreSQL.
    if not PG_BIN or shutil.which("runuser") is None:
        pytest.skip("needs PostgreSQL's server binaries (Debian package postgresql) and runuser")
    server = _PostgresServer(_free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.postgres
async def test_postgres_restart_mid_stream_never_truncates_silently(
    tmp_path: Path, own_postgres: _PostgresServer
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{own_postgres.port}/postgres"
    outcomes = await restart_mid_stream(url, tmp_path, own_postgres.restart, kept=True)
    print(f"\nPostgreSQL restart mid-stream: { ({k: v[0] for k, v in outcomes.items()}) } complete")


@pytest.mark.postgres
async def test_postgres_listener_killed_mid_stream_loses_nothing(
    tmp_path: Path, postgres_url: str, postgres_store_url: str
) -> None:
    import asyncpg

    from durable_asgi.stores.postgres._listener import PING

    env = {"MP_STORE": postgres_store_url, "MP_CALLS": str(tmp_path / "calls")}
    key = uuid.uuid4().hex
    n = 300
    path = f"/stream?n={n}&delay=0.01"  # ~3 s
    with running_server(APP, env=env) as a, running_server(APP, env=env) as b:
        with anyio.fail_after(30):
            async with (
                open_stream(a.url, path, headers=durable(key)),
                open_stream(b.url, path, headers=durable(key)) as follower,
            ):
                head = await follower.read_exactly(500)  # B follows A's stream by LISTEN
                admin = await asyncpg.connect(postgres_url)
                try:
                    killed = await admin.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'durable_asgi' AND query = $1",
                        PING,
                    )
                finally:
                    await admin.close()
                assert killed >= 1  # B's listening connection (A produces: it needs none)
                rest = await follower.read_all()
    assert head + rest == mp_app.body(n)
    assert handler_calls(env, key) == [a.process.pid]  # type: ignore[union-attr]
