"""Benchmarks: durable_asgi against the bare app, every variant in one run, printed as tables.

    python bench/run.py                          # all workloads; bare and every store
    python bench/run.py --quick                  # 1 round, smaller extras
    python bench/run.py --rounds 5 --stores memory --workloads token,flat --json out.json

Every variant is the same Starlette app (`bench/app.py`) served by its own uvicorn process (one
worker, ``--http httptools`` by default -- what uvicorn picks when installed as
``uvicorn[standard]``; ``--http h11`` for the pure-Python parser; the default event loop) on a
loopback port: ``bare`` (no middleware) and DurableMiddleware with the ``memory``, ``sqlite``
(a fresh database file per server), ``redis`` (`redis_url()`) and ``postgres``
(``$POSTGRES_URL`` or 127.0.0.1:5432 database ``test``; a fresh schema per server, dropped
after) stores. Durable requests carry a fresh ``Durable-Key`` per stream, so the handler runs
and every byte goes through the store and back out to the client. The client is this process:
asyncio, raw sockets, one HTTP/1.1 connection per stream, chunked decoding; nothing is pinned
to a core.

Main table (``--workloads token,flat``), a handler that awaits between events, as an LLM relay
does -- a Starlette ``StreamingResponse`` async generator yielding 20-byte SSE events
``data: tok-00000001\\n\\n``:

- token: 300 concurrent streams x 200 events, ``await asyncio.sleep(0.01)`` after each event
  (token pace: 30,000 events/s offered, more than one worker can serve once durable);
- flat: 1 stream x 20,000 events, ``await asyncio.sleep(0)`` after each (as fast as it goes;
  the SQLite and Redis stores still batch many events per store write here: see events/read).

For each workload and variant, measured over the workload window only (from just before the
first connect to the last byte of the last stream, plus the moment the server takes to go
quiet, <= 0.5 s, so work the streams left behind is counted):

- server CPU us/event: utime+stime of the uvicorn process (``/proc/<pid>/stat``, clock ticks ->
  seconds via ``SC_CLK_TCK``) over the window / events delivered; it includes each stream's
  connection, request and store round trips;
- events/s: events received by all clients / wall time of the workload (first connect -> last
  stream's last byte);
- x bare: both of the above divided by the bare app's (CPU: >1 costs more; events/s: <1 slower);
- server % / client %: CPU of the server and of this client process as % of one core over the
  window -- a server near 100% is saturated (one worker is one core; a store's threads can take
  it past 100%); a client far below it shows the box wasn't client-bound;
- events/read: events per socket read in the clients: about 1 when the server sent the events
  one by one, more when it coalesced them (the durable variants serve the client from the store,
  whose group commit batches whatever the handler produced during one store write);
- delivered: events received intact / expected. Every body is checked byte for byte (each
  client must get exactly its 200 / 20,000 events, in order); any failure is printed loudly,
  counted out of "delivered", and makes the exit status 1.

Each round starts every variant's server afresh, in a rotating order (drift on a busy machine
hits every variant alike), warms it up, then runs the selected workloads; tables show the
median of ``--rounds`` rounds (default 3), and every round's values are printed below them.

Extra rows and tables (``--workloads coalesce,passthrough,resume,replay,fanout``):

- coalesce: 10 sequential streams x 10,000 x 32-byte chunks from a handler that NEVER awaits, so
  the store's group commit coalesces them into a few big writes (why durable variants can look
  faster than bare here; not what users run). Same columns, per chunk.
- pass-through: 5,000 tiny requests without a key over one keep-alive connection: what the
  middleware costs the requests it passes through; server us/request and requests/s.
- resume TTFB: time to the first body byte resuming (``Durable-Offset`` half way) a finished
  20,000-event stream, p50/p99 of 300 requests on one keep-alive connection, per store.
- replay: time to read a whole finished stream again (same key, from offset 0; served from the
  store): the 20,000-event (400 kB) and a 200-event token-paced stream, p50/p99 of 30 each.
- fan-out latency: a stream of timestamped chunks produced on server A; a follower connected to
  server B (another process, same store) measures producer's send -> follower's receive, p50/p99,
  for the stores shared between processes (SQLite, Redis, PostgreSQL).

``--otel``: rows of the memory store with OpenTelemetry absent (``mem-noapi``), metrics on
(``mem+m``: the SDK's MeterProvider, in-memory reader) and metrics and traces on (``mem+mt``:
also a TracerProvider exporting to memory), beside ``memory`` (the API, nothing configured);
in the main table only (``docs/benchmarks.md``, OpenTelemetry).

``--quick``: 1 round (unless ``--rounds``), 5 coalescing streams, 2,000 pass-through requests,
100 resumes, 10 replays, 2 fan-out streams; the token and flat workloads keep their size.
``--json FILE`` writes every round's values, the medians and the failures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load import drop_postgres_schemas, fresh_postgres, postgres_url

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 10_000  # the coalescing stream's chunks (bench/app.py's BENCH_CHUNKS)
CHUNK = b"x" * 31 + b"\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAIN = ("token", "flat")
EXTRA = ("coalesce", "passthrough")
TABLES = ("resume", "replay", "fanout")
WORKLOADS = MAIN + EXTRA + TABLES
STORES = ("memory", "sqlite", "redis", "postgres")


def event(i: int) -> bytes:
    """The `i`-th (1-based) SSE event of ``/sse`` (as bench/app.py makes it): 20 bytes."""
    return b"data: tok-%08d\n\n" % i


def events_body(n: int) -> bytes:
    return b"".join(event(i) for i in range(1, n + 1))


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def settled_cpu(pid: int, limit: float = 0.5) -> float:
    """`pid`'s CPU seconds once it has gone quiet (no tick in 50 ms), at most `limit` s on."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now == last:
            break
        last = now
    return last


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    port: int
    pid: int


@contextmanager
def serve(store: str, http: str, otel: str = "") -> Iterator[Server]:
    """A uvicorn process (one worker) serving bench/app.py with `store` (``bare`` or a URL)
    and OpenTelemetry `otel` (``BENCH_OTEL``: "", ``absent``, ``metrics``, ``traces``)."""
    port = free_port()
    env = {**os.environ, "BENCH_STORE": store, "BENCH_CHUNKS": str(CHUNKS), "BENCH_OTEL": otel}
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
            http,
            "--timeout-graceful-shutdown",
            "5",
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
        yield Server(port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the async client: one raw-socket HTTP/1.1 connection per stream ---------------------------


class StreamClient(asyncio.Protocol):
    """Sends one GET (``Connection: close``) and keeps what comes back, doing as little as it
    can per read: the response is parsed once its end is in (chunked terminator, or EOF)."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.parts: list[bytes] = []
        self.status = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = False
        self.error = ""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)
        if data.endswith(b"0\r\n\r\n") and self._parse():  # maybe the last chunk
            self.transport.close()  # type: ignore[union-attr]
            self._resolve()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and not self._parse():
            self.error = self.error or f"connection closed before the end of the body ({exc!r})"
        self._resolve()

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _parse(self) -> bool:
        """Parse what came so far; whether it is a whole response (then `complete`)."""
        raw = b"".join(self.parts)
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = raw[:end].split(b"\r\n")
        self.status = lines[0]
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if b"chunked" not in self.headers.get(b"transfer-encoding", b"").lower():
            self.body = raw[pos:]
            length = self.headers.get(b"content-length")
            self.complete = length is not None and len(self.body) == int(length)
            return self.complete
        parts = []
        while (nl := raw.find(b"\r\n", pos)) >= 0:
            size = int(raw[pos:nl].split(b";", 1)[0], 16)
            if size == 0:
                self.complete = raw[nl + 2 : nl + 4] == b"\r\n"  # no trailers from uvicorn
                break
            parts.append(raw[nl + 2 : nl + 2 + size])
            pos = nl + 4 + size
        self.body = b"".join(parts)
        return self.complete


def request(path: str, key: str | None) -> bytes:
    extra = f"Durable-Key: {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}Connection: close\r\n\r\n".encode()


async def fetch_all(port: int, path: str, keys: list[str | None], timeout: float) -> list[Any]:
    """GET `path` once per key, all at once, each on its own connection."""
    loop = asyncio.get_running_loop()
    clients = [StreamClient(request(path, key), loop.create_future()) for key in keys]

    async def one(client: StreamClient) -> None:
        try:
            await loop.create_connection(lambda: client, "127.0.0.1", port)
        except OSError as exc:
            client.error = f"connect failed: {exc!r}"
            return
        await client.done

    try:
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), timeout)
    except asyncio.TimeoutError:
        for client in clients:
            if not client.complete and not client._parse():
                client.error = client.error or f"timed out after {timeout:g} s"
                if client.transport is not None:
                    client.transport.abort()
    return clients


# -- the workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    streams: int  # concurrent streams per batch
    batches: int  # batches, one after the other
    unit_bytes: int  # bytes per event (or chunk)
    expected: bytes  # each stream's body
    timeout: float

    @property
    def units(self) -> int:
        return len(self.expected) // self.unit_bytes


@dataclass
class Result:
    """One workload on one variant in one round."""

    units: int = 0  # events (chunks, requests) delivered intact
    expected: int = 0
    wall: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    reads: int = 0  # the clients' socket reads (data_received calls); 0: not counted
    failures: list[str] = field(default_factory=list)

    @property
    def us_per_unit(self) -> float:
        return self.server_cpu / self.units * 1e6 if self.units else float("nan")

    @property
    def rate(self) -> float:
        return self.units / self.wall if self.wall else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_us_per_unit": self.us_per_unit,
            "units_per_s": self.rate,
            "delivered": self.units,
            "expected": self.expected,
            "wall_s": self.wall,
            "server_cpu_s": self.server_cpu,
            "client_cpu_s": self.client_cpu,
            "client_reads": self.reads,
            "server_cpu_pct": self.server_cpu / self.wall * 100 if self.wall else 0.0,
            "client_cpu_pct": self.client_cpu / self.wall * 100 if self.wall else 0.0,
            "failures": self.failures,
        }


@contextmanager
def window(server: Server, result: Result) -> Iterator[None]:
    """Measure wall time and server/client CPU over the block into `result`."""
    server0, client0 = cpu_seconds(server.pid), cpu_seconds(os.getpid())
    start = time.perf_counter()
    yield
    result.wall = time.perf_counter() - start
    result.client_cpu = cpu_seconds(os.getpid()) - client0
    result.server_cpu = settled_cpu(server.pid) - server0


def check(client: StreamClient, expected: bytes, unit: int, durable: bool) -> tuple[int, str]:
    """(units received intact, the failure or ""): the body must be `expected`, byte for byte."""
    body = client.body
    if body == expected and client.complete:
        if b" 200 " not in client.status:
            return 0, f"status {client.status.decode(errors='replace')!r}"
        if durable and client.headers.get(b"durable-replay") == b"true":
            return 0, "served from the store: the handler did not run"
        return len(expected) // unit, ""
    pairs = enumerate(zip(body, expected, strict=False))
    same = next((i for i, (a, b) in pairs if a != b), min(len(body), len(expected)))
    problem = client.error or ("incomplete body" if not client.complete else "wrong body")
    return same // unit, (
        f"{problem}: status {client.status.decode(errors='replace')!r}, {len(body):,} of "
        f"{len(expected):,} bytes, first {same:,} right"
    )


def run_streams(
    loop: asyncio.AbstractEventLoop, server: Server, w: Workload, durable: bool
) -> Result:
    result = Result(expected=w.units * w.streams * w.batches)
    batches = [
        [uuid.uuid4().hex if durable else None for _ in range(w.streams)] for _ in range(w.batches)
    ]
    outcomes = []
    with window(server, result):
        for keys in batches:
            clients = loop.run_until_complete(fetch_all(server.port, w.path, keys, w.timeout))
            outcomes += [check(c, w.expected, w.unit_bytes, durable) for c in clients]
            result.reads += sum(len(c.parts) for c in clients)
    for i, (units, failure) in enumerate(outcomes):
        result.units += units
        if failure:
            result.failures.append(f"stream {i + 1}: {failure}")
    return result


class Connection:
    """A minimal blocking keep-alive HTTP/1.1 client, for one request at a time."""

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

    def close(self) -> None:
        self.sock.close()


def run_passthrough(server: Server, requests: int) -> Result:
    result = Result(expected=requests)
    conn = Connection(server.port)
    for _ in range(200):  # warm up
        conn.get("/small")
    with window(server, result):
        for _ in range(requests):
            if conn.get("/small") == b"ok":
                result.units += 1
    conn.close()
    if result.units != requests:
        result.failures.append(f"{requests - result.units} of {requests} bodies were not 'ok'")
    return result


def warm_up(loop: asyncio.AbstractEventLoop, server: Server, durable: bool) -> None:
    """Imports, store schema and connections, before anything is measured."""
    for path, n, expected in (
        ("/sse?n=20&pace=0.001", 20, events_body(20)),
        ("/sse?n=500&pace=0", 1, events_body(500)),
        ("/stream", 1, CHUNK * CHUNKS),
    ):
        keys = [uuid.uuid4().hex if durable else None for _ in range(n)]
        for client in loop.run_until_complete(fetch_all(server.port, path, keys, 60)):
            _, failure = check(client, expected, 1, durable)
            if failure:
                raise RuntimeError(f"warm-up {path} failed: {failure}")
    conn = Connection(server.port)
    for _ in range(100):
        conn.get("/small")
    conn.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of `samples`."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_resume_replay(
    server: Server, flat_events: int, resumes: int, replays: int
) -> tuple[tuple[float, float], dict[str, tuple[float, float]]]:
    """Resume TTFB (ms, p50/p99) from half way of a finished `flat_events`-event stream, and
    the time (ms, p50/p99) to replay it and a finished 200-event token-paced stream."""
    conn = Connection(server.port)
    flat_key, token_key = uuid.uuid4().hex, uuid.uuid4().hex
    flat_path, token_path = f"/sse?n={flat_events}&pace=0", "/sse?n=200&pace=0.01"
    flat = conn.get(flat_path, {"Durable-Key": flat_key})  # runs the handler once, to the end
    token = conn.get(token_path, {"Durable-Key": token_key})
    assert flat == events_body(flat_events) and token == events_body(200)
    offset = len(flat) // 2
    headers = {"Durable-Key": flat_key, "Durable-Offset": str(offset)}
    ttfb: list[float] = []
    for i in range(resumes + 20):
        first: list[float] = []
        start = time.perf_counter()
        body = conn.get(flat_path, headers, first_byte=first)
        assert body == flat[offset:], "resumed body differs"
        if i >= 20:  # warm-up
            ttfb.append((first[0] - start) * 1000)
    replay: dict[str, tuple[float, float]] = {}
    for name, path, key, full in (
        (f"{flat_events:,} events", flat_path, flat_key, flat),
        ("200 events", token_path, token_key, token),
    ):
        times: list[float] = []
        for i in range(replays + 3):
            start = time.perf_counter()
            body = conn.get(path, {"Durable-Key": key})
            elapsed = time.perf_counter() - start
            assert body == full, "replayed body differs"
            if i >= 3:
                times.append(elapsed * 1000)
        replay[name] = percentiles(times)
    conn.close()
    return percentiles(ttfb), replay


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
        producer.close()
        follower.close()
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


# -- printing -----------------------------------------------------------------------------------


def median_of(rounds: list[Result]) -> dict[str, float]:
    def med(f: Callable[[Result], float]) -> float:
        return statistics.median(f(r) for r in rounds)

    return {
        "us": med(lambda r: r.us_per_unit),
        "rate": med(lambda r: r.rate),
        "server_pct": med(lambda r: r.server_cpu / r.wall * 100 if r.wall else 0.0),
        "client_pct": med(lambda r: r.client_cpu / r.wall * 100 if r.wall else 0.0),
        "per_read": med(lambda r: r.units / r.reads if r.reads else 0.0),
        "delivered": sum(r.units for r in rounds),
        "expected": sum(r.expected for r in rounds),
    }


def print_table(
    title: str, unit: str, results: dict[str, dict[str, list[Result]]], labels: dict[str, str]
) -> None:
    columns = (
        f"{'workload':<12} {'variant':<9} {f'server µs/{unit}':>17} {'x bare':>7} "
        f"{f'{unit}s/s':>11} {'x bare':>7} {'server %':>9} {'client %':>9} "
        f"{f'{unit}s/read':>12}  delivered"
    )
    print(f"\n{title}\n{columns}")
    for workload, by_variant in results.items():
        bare = median_of(by_variant["bare"]) if "bare" in by_variant else None
        for variant, rounds in by_variant.items():
            m = median_of(rounds)
            cpu_x = f"{m['us'] / bare['us']:.2f}" if bare else "-"
            rate_x = f"{m['rate'] / bare['rate']:.2f}" if bare and bare["rate"] else "-"
            per_read = f"{m['per_read']:.1f}" if m["per_read"] else "-"
            ok = "ok" if m["delivered"] == m["expected"] else "FAILED"
            print(
                f"{labels[workload]:<12} {variant:<9} {m['us']:>17.1f} {cpu_x:>7} "
                f"{m['rate']:>11,.0f} {rate_x:>7} {m['server_pct']:>8.0f}% "
                f"{m['client_pct']:>8.0f}% {per_read:>12}  "
                f"{m['delivered']:,}/{m['expected']:,} {ok}"
            )


def print_rounds(results: dict[str, dict[str, list[Result]]], labels: dict[str, str]) -> None:
    print("\nEvery round (server µs/event | events/s), in the order run:")
    for workload, by_variant in results.items():
        for variant, rounds in by_variant.items():
            us = " ".join(f"{r.us_per_unit:6.1f}" for r in rounds)
            rate = " ".join(f"{r.rate:8,.0f}" for r in rounds)
            print(f"  {labels[workload]:<12} {variant:<8} {us} | {rate}")


# -- main ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round, smaller extras")
    parser.add_argument("--rounds", type=int, help="rounds per variant (default 3; --quick: 1)")
    parser.add_argument(
        "--stores", default=",".join(STORES), help="durable variants (bare always runs)"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="what to measure")
    parser.add_argument(
        "--http", default="httptools", choices=("httptools", "h11"), help="uvicorn's --http"
    )
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument(
        "--otel",
        action="store_true",
        help="add memory-store rows with OpenTelemetry absent, metrics on, metrics+traces on",
    )
    args = parser.parse_args(argv)
    for option, allowed in (("stores", STORES), ("workloads", WORKLOADS)):
        chosen = [x for x in getattr(args, option).split(",") if x]
        unknown = set(chosen) - set(allowed)
        if unknown:
            parser.error(f"unknown --{option} {sorted(unknown)}: choose from {','.join(allowed)}")
        setattr(args, option, chosen)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def main_workloads(flat_events: int = 20_000) -> dict[str, Workload]:
    """The main table's workloads: token pace and flat out (also `bench/profile.py`'s)."""
    return {
        "token": Workload("token", "/sse?n=200&pace=0.01", 300, 1, 20, events_body(200), 120),
        "flat": Workload(
            "flat", f"/sse?n={flat_events}&pace=0", 1, 1, 20, events_body(flat_events), 120
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    quick = args.quick
    flat_events = 20_000
    coalesce_streams = 5 if quick else 10
    small_requests = 2000 if quick else 5000
    resumes, replays, fanout_runs = (100, 10, 2) if quick else (300, 30, 5)
    workloads = {
        **main_workloads(flat_events),
        "coalesce": Workload("coalesce", "/stream", 1, coalesce_streams, 32, CHUNK * CHUNKS, 60),
    }
    labels = {
        "token": "token pace",
        "flat": "flat out",
        "coalesce": "coalescing",
        "passthrough": "pass-through",
    }

    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-"))
    variants: dict[str, Callable[[], str]] = {"bare": lambda: "bare"}
    otel: dict[str, str] = {}  # variant -> BENCH_OTEL
    if "memory" in args.stores:
        variants["memory"] = lambda: "memory://"
    if args.otel:
        # The memory store, with OpenTelemetry absent (its import blocked), and with the SDK
        # configured (in-memory reader, exporter): metrics, then metrics and traces.
        for name, mode in (("mem-noapi", "absent"), ("mem+m", "metrics"), ("mem+mt", "traces")):
            variants[name] = lambda: "memory://"
            otel[name] = mode
    if "sqlite" in args.stores:  # a fresh database per server (sqlite3: standard library)
        variants["sqlite"] = lambda: f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
    if "redis" in args.stores:
        redis = redis_url()
        if redis:
            variants["redis"] = lambda: redis
        else:
            print("redis: skipped (no Redis at $REDIS_URL or 127.0.0.1:6379)", file=sys.stderr)
    if "postgres" in args.stores:
        postgres = postgres_url()
        if postgres:
            variants["postgres"] = lambda: fresh_postgres(postgres)
        else:
            print("postgres: skipped (no PostgreSQL at $POSTGRES_URL or :5432)", file=sys.stderr)

    per_round = [w for w in (*MAIN, *EXTRA) if w in args.workloads]
    results: dict[str, dict[str, list[Result]]] = {
        w: {name: [] for name in variants} for w in per_round
    }
    failures: list[str] = []
    ttfb: dict[str, tuple[float, float]] = {}
    replay: dict[str, dict[str, tuple[float, float]]] = {}
    fanout: dict[str, tuple[float, float, int]] = {}
    loop = asyncio.new_event_loop()
    started = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {what}", file=sys.stderr, flush=True)

    try:
        # Interleave rounds, rotating the order, so drift on a busy machine hits every variant
        # alike; pass-through first, on a freshly warmed server, so the streams can't colour it.
        names = list(variants)
        for round_ in range(args.rounds if per_round else 0):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                progress(f"round {round_ + 1}/{args.rounds}: {name}")
                durable = name != "bare"
                with serve(variants[name](), args.http, otel.get(name, "")) as server:
                    warm_up(loop, server, durable)
                    for w in per_round:
                        if w == "passthrough":
                            result = run_passthrough(server, small_requests)
                        else:
                            result = run_streams(loop, server, workloads[w], durable)
                        results[w][name].append(result)
                        for failure in result.failures:
                            line = f"FAILED {labels[w]} / {name} / round {round_ + 1}: {failure}"
                            failures.append(line)
                            print(f"!!! {line}", file=sys.stderr, flush=True)
        for name in names[1:]:
            if name in otel:
                continue  # the main table's rows only
            if {"resume", "replay"} & set(args.workloads):
                progress(f"resume/replay: {name}")
                with serve(variants[name](), args.http) as server:
                    ttfb[name], replay[name] = bench_resume_replay(
                        server, flat_events, resumes, replays
                    )
            if "fanout" in args.workloads and name != "memory":  # shared between processes
                progress(f"fan-out: {name}")
                shared = variants[name]()  # both servers on one store (one SQLite file)
                with serve(shared, args.http) as a, serve(shared, args.http) as b:
                    fanout[name] = bench_fanout(a.port, b.port, fanout_runs, 200)
    finally:
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)
        drop_postgres_schemas()
    elapsed = time.monotonic() - started

    loop_name = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    setup = (
        f"uvicorn --http {args.http}, 1 worker, {loop_name} loop; client: this process, asyncio "
        f"raw sockets, loopback; {os.cpu_count()} CPUs, nothing pinned"
    )
    main_results = {w: results[w] for w in MAIN if w in results}
    extra_results = {w: results[w] for w in EXTRA if w in results}
    if main_results:
        print_table(
            f"Median of {args.rounds} round(s); {setup}.",
            "event",
            main_results,
            labels,
        )
        if "token" in main_results:
            print(
                "token pace: 300 concurrent streams x 200 SSE events of 20 B, the handler "
                "awaiting asyncio.sleep(0.01) after each."
            )
        if "flat" in main_results:
            print(
                f"flat out:   1 stream x {flat_events:,} SSE events of 20 B, "
                "asyncio.sleep(0) after each."
            )
        print(
            "server µs/event: server CPU over the workload / events delivered; events/s: "
            "events delivered / wall time; server %, client %: CPU as % of one core;\n"
            "events/read: events per client socket read (about 1: sent one by one; more: the "
            "server coalesced them)."
        )
    for w, by_variant in extra_results.items():
        unit = "request" if w == "passthrough" else "chunk"
        print_table("Extra:", unit, {w: by_variant}, labels)
        if w == "coalesce":
            print(
                f"coalescing: {coalesce_streams} streams one after another x {CHUNKS:,} chunks "
                "of 32 B from a handler that NEVER awaits: group commit coalesces the store's "
                "writes (durable may beat bare; not what users run)."
            )
        else:
            print(
                f"pass-through: {small_requests:,} tiny requests without a Durable-Key, one "
                "keep-alive connection: what the middleware costs the requests it passes by."
            )
    if main_results:
        print_rounds(main_results, labels)
    if ttfb and "resume" in args.workloads:
        print(f"\n{'store':<10} {'resume TTFB p50':>16} {'p99':>8}")
        for name, (p50, p99) in ttfb.items():
            print(f"{name:<10} {p50:>13.2f} ms {p99:>5.2f} ms")
        print(
            f"Time to the first body byte resuming a finished {flat_events:,}-event "
            f"({flat_events * 20:,} B) stream from its middle (Durable-Offset), {resumes} "
            "requests on one keep-alive connection."
        )
    if replay and "replay" in args.workloads:
        kinds = list(next(iter(replay.values())))
        heads = "".join(f" {f'replay {k} p50':>26} {'p99':>9}" for k in kinds)
        print(f"\n{'store':<10}{heads}")
        for name, by_kind in replay.items():
            cells = "".join(f" {by_kind[k][0]:>23.2f} ms {by_kind[k][1]:>6.2f} ms" for k in kinds)
            print(f"{name:<10}{cells}")
        print(
            "Time to read a whole finished stream again (same key, served from the store), "
            f"{replays} times each on one keep-alive connection: the flat-out stream and a "
            "200-event token-paced one."
        )
    if fanout:
        print(f"\n{'store':<10} {'fan-out p50':>16} {'p99':>8} {'samples':>8}")
        for name, (p50, p99, n) in fanout.items():
            print(f"{name:<10} {p50:>13.2f} ms {p99:>5.2f} ms {n:>8}")
        print(
            "Producer's send on server A -> a follower's receive on server B (another process, "
            f"same store); {fanout_runs} streams of 200 chunks, one every 5 ms."
        )
    print(f"\n{elapsed:.0f} s in all.")
    if failures:
        print(f"\n!!! {len(failures)} FAILURE(S) -- not every body arrived intact:")
        for line in failures:
            print(f"!!! {line}")

    if args.json:
        payload = {
            "setup": setup,
            "http": args.http,
            "rounds": args.rounds,
            "quick": quick,
            "elapsed_s": elapsed,
            "workloads": {
                w: {
                    name: {
                        "rounds": [r.as_dict() for r in rounds],
                        "median": median_of(rounds),
                    }
                    for name, rounds in by_variant.items()
                }
                for w, by_variant in results.items()
            },
            "resume_ttfb_ms": {n: {"p50": a, "p99": b} for n, (a, b) in ttfb.items()},
            "replay_ms": {
                n: {k: {"p50": a, "p99": b} for k, (a, b) in by_kind.items()}
                for n, by_kind in replay.items()
            },
            "fanout_ms": {n: {"p50": a, "p99": b, "samples": s} for n, (a, b, s) in fanout.items()},
            "failures": failures,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
