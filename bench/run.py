"""Benchmarks: durable_asgi against the bare app, in one run, printed as a table.

    python bench/run.py            # bare vs memory (+ sqlite, redis when available)
    python bench/run.py --quick    # fewer repetitions

Each variant is the same Starlette app (`bench/app.py`) served by its own uvicorn process on a
loopback port; the client runs in this process on the other core. Measured:

- stream: a 10,000 x 32-byte StreamingResponse read to the end; chunks/s (median of runs).
  Durable variants use a fresh key per request, so the handler runs and every byte goes through
  the store and back out to the client.
- small: requests/s of a tiny non-durable endpoint over one keep-alive connection, i.e. what the
  middleware costs requests it passes through.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(store: str) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "BENCH_STORE": store, "BENCH_CHUNKS": str(CHUNKS)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT / "src")])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--http",
            "h11",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"server for {store} did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class Connection:
    """A minimal keep-alive HTTP/1.1 client: little enough overhead not to hide the server's."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def get(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode())
        status = self._line()
        assert b" 200 " in status, status
        head: dict[bytes, bytes] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            head[name.strip().lower()] = value.strip()
        if b"content-length" in head:
            return self._exactly(int(head[b"content-length"]))
        parts = []
        while size := int(self._line().split(b";")[0], 16):
            parts.append(self._exactly(size))
            self._exactly(2)
        self._exactly(2)
        return b"".join(parts)


def bench_stream(port: int, runs: int, durable: bool) -> float:
    conn = Connection(port)
    rates = []
    for _ in range(runs):
        headers = {"Durable-Key": uuid.uuid4().hex} if durable else None
        start = time.perf_counter()
        body = conn.get("/stream", headers)
        elapsed = time.perf_counter() - start
        assert len(body) == CHUNKS * 32, len(body)
        rates.append(CHUNKS / elapsed)
    return statistics.median(rates)


def bench_small(port: int, requests: int) -> float:
    conn = Connection(port)
    for _ in range(200):  # warm up
        conn.get("/small")
    start = time.perf_counter()
    for _ in range(requests):
        conn.get("/small")
    return requests / (time.perf_counter() - start)


def redis_url() -> str | None:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=1).ping()
        return url
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--stores", default="memory,sqlite,redis", help="durable variants to run")
    args = parser.parse_args()
    runs, small_requests, rounds = (3, 1000, 2) if args.quick else (7, 3000, 5)

    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-"))
    variants = {"bare": "bare"}
    wanted = args.stores.split(",")
    if "memory" in wanted:
        variants["memory"] = "memory://"
    if "sqlite" in wanted:
        try:
            import aiosqlite  # noqa: F401

            variants["sqlite"] = f"sqlite:///{tmp / 'bench.db'}"
        except ImportError:
            print("sqlite: skipped (pip install 'durable-asgi[sqlite]')")
    if "redis" in wanted:
        url = redis_url()
        if url:
            variants["redis"] = url
        else:
            print("redis: skipped (no Redis at $REDIS_URL or 127.0.0.1:6379)")

    stream: dict[str, list[float]] = {name: [] for name in variants}
    small: dict[str, list[float]] = {name: [] for name in variants}
    try:
        # Interleave rounds, rotating the order, so drift on a busy machine hits every variant
        # alike; pass-through first, on a fresh server, so the stream phase can't colour it.
        names = list(variants)
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                with serve(variants[name]) as port:
                    small[name].append(bench_small(port, small_requests))
                    stream[name].append(bench_stream(port, runs, durable=name != "bare"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bare_stream = statistics.median(stream["bare"])
    bare_small = statistics.median(small["bare"])
    print()
    columns = ("variant", "stream chunks/s", "x bare", "pass-through req/s", "overhead")
    print(f"{columns[0]:<10} {columns[1]:>16} {columns[2]:>7} {columns[3]:>19} {columns[4]:>9}")
    for name in variants:
        s, r = statistics.median(stream[name]), statistics.median(small[name])
        overhead = (bare_small - r) / bare_small * 100
        print(f"{name:<10} {s:>16,.0f} {s / bare_stream:>7.2f} {r:>19,.0f} {overhead:>8.1f}%")
    print(
        f"\n{CHUNKS:,} x 32-byte chunks per stream; medians of {rounds} rounds x {runs} runs "
        f"(stream) and {rounds} x {small_requests} requests (pass-through); uvicorn h11, loopback."
    )


if __name__ == "__main__":
    main()
