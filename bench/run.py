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
- resume TTFB: time to the first body byte of a resume (``Durable-Offset`` half-way) of a
  finished stream, p50/p99, per store.
- fan-out latency: a stream of timestamped chunks produced on server A; a follower connected to
  server B (another process, same store) measures producer's send -> follower's receive, p50/p99,
  for the stores shared between processes (SQLite, Redis).
"""

from __future__ import annotations

import argparse
import os
import re
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

    def head(self, path: str, headers: dict[str, str] | None = None) -> dict[bytes, bytes]:
        """Send a GET and read the response head; the body is left to read."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode())
        status = self._line()
        assert b" 200 " in status, status
        head: dict[bytes, bytes] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            head[name.strip().lower()] = value.strip()
        return head

    def get(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        first_byte: list[float] | None = None,
    ) -> bytes:
        """The body of a GET. `first_byte` gets the perf_counter() when its first byte came."""
        head = self.head(path, headers)
        if first_byte is not None:
            # With chunked framing, a body byte is in once it is past the chunk-size line.
            chunked = b"content-length" not in head
            while not self.buf or (chunked and not 0 <= self.buf.find(b"\r\n") < len(self.buf) - 2):
                self._fill()
            first_byte.append(time.perf_counter())
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


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of `samples`."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_resume(port: int, requests: int) -> tuple[float, float]:
    """Time to first byte (ms) of resuming a finished stream half-way; (p50, p99)."""
    conn = Connection(port)
    key = uuid.uuid4().hex
    full = conn.get("/stream", {"Durable-Key": key})  # runs the handler once, to the end
    offset = len(full) // 2
    headers = {"Durable-Key": key, "Durable-Offset": str(offset)}
    times: list[float] = []
    for i in range(requests + 20):
        first: list[float] = []
        start = time.perf_counter()
        body = conn.get("/stream", headers, first_byte=first)
        assert body == full[offset:]
        if i >= 20:  # warm-up
            times.append((first[0] - start) * 1000)
    return percentiles(times)


TICK = re.compile(rb"T(\d{19})\n")


def bench_fanout(port_a: int, port_b: int, runs: int, ticks: int) -> tuple[float, float, int]:
    """Latency (ms) from the producer's send on server A to a follower on server B (another
    process sharing the store): (p50, p99, samples)."""
    latencies: list[float] = []
    path = f"/ticks?n={ticks}&interval=0.005"
    for _ in range(runs):
        key = uuid.uuid4().hex
        producer = Connection(port_a)
        producer.head(path, {"Durable-Key": key})  # claimed, head stored: the stream is live
        follower = Connection(port_b)
        head = follower.head(path, {"Durable-Key": key})
        assert head.get(b"durable-replay") == b"true", "the follower must not run the handler"
        joined = time.time_ns()
        seen, pos = 0, 0
        while seen < ticks:
            follower._fill()
            now = time.time_ns()
            for match in TICK.finditer(follower.buf, pos):
                sent = int(match.group(1))
                pos = match.end()
                seen += 1
                if sent > joined:  # produced while the follower was tailing live
                    latencies.append((now - sent) / 1e6)
            follower.buf, pos = follower.buf[pos:], 0
        producer.sock.close()
        follower.sock.close()
    p50, p99 = percentiles(latencies)
    return p50, p99, len(latencies)


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
    resumes, fanout_runs = (100, 2) if args.quick else (300, 5)

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
    ttfb: dict[str, tuple[float, float]] = {}
    fanout: dict[str, tuple[float, float, int]] = {}
    try:
        # Interleave rounds, rotating the order, so drift on a busy machine hits every variant
        # alike; pass-through first, on a fresh server, so the stream phase can't colour it.
        names = list(variants)
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                with serve(variants[name]) as port:
                    small[name].append(bench_small(port, small_requests))
                    stream[name].append(bench_stream(port, runs, durable=name != "bare"))
        for name in names[1:]:
            with serve(variants[name]) as port:
                ttfb[name] = bench_resume(port, resumes)
            if name != "memory":  # shared between processes
                with serve(variants[name]) as port_a, serve(variants[name]) as port_b:
                    fanout[name] = bench_fanout(port_a, port_b, fanout_runs, 200)
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
    if ttfb:
        print(f"\n{'store':<10} {'resume TTFB p50':>16} {'p99':>8}")
        for name, (p50, p99) in ttfb.items():
            print(f"{name:<10} {p50:>13.2f} ms {p99:>5.2f} ms")
        print(
            f"Time to the first body byte resuming a finished {CHUNKS * 32:,}-byte stream from its "
            f"middle (Durable-Offset), {resumes} requests on one keep-alive connection."
        )
    if fanout:
        print(f"\n{'store':<10} {'fan-out p50':>16} {'p99':>8} {'samples':>8}")
        for name, (p50, p99, n) in fanout.items():
            print(f"{name:<10} {p50:>13.2f} ms {p99:>5.2f} ms {n:>8}")
        print(
            "Producer's send on server A -> a follower's receive on server B (another process, "
            f"same store); {fanout_runs} streams of 200 chunks, one every 5 ms."
        )


if __name__ == "__main__":
    main()
