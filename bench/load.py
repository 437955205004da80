"""Load test: N concurrent live streams on ONE uvicorn worker, per store, against the bare app.

    python bench/load.py                         # 1,000 streams, 20 chunks/s, 6 s; all variants
    python bench/load.py --streams 200 --duration 4 --variants bare,memory

Each stream sends ``rate`` chunks/s for ``duration`` s (``bench/load_app.py``; every chunk
carries the time it was produced). Half-way through, a *resumer* joins each durable stream with
the same key — it gets the stored bytes, then follows live (the bare app can't: no resumers).
The client is a separate asyncio process with raw sockets. Printed per variant: server CPU (%
of one core, over the run), peak RSS, chunk latency p50/p99 (producer's clock to the client's
read, same machine) for the first readers and the resumers' live chunks, resume TTFB, the share
of chunks delivered to first readers and to resumers (each resumer is owed every chunk), and how
many responses were *cut short* (ended without the chunked body's terminator: a stream that
ended failed, or a server that gave up on it).

Redis: ``--redis URL``, else a private ``redis-server`` on a free port (skipped without one).
PostgreSQL: ``$POSTGRES_URL``, else the machine's server at 127.0.0.1:5432 (database ``test``);
each server gets a fresh schema, dropped after the run (skipped when none answers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAMP = re.compile(rb"T(\d+\.\d{6}) (\d{6}) ")
DURABLE = ("memory", "sqlite", "redis", "postgres")
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
_postgres_schemas: list[tuple[str, str]] = []
READ_TIMEOUT = 30.0  # a stream silent this long counts as an error, not a hang


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"{what} did not start on port {port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str | None]:
    """`url`, else a private redis-server for the run, else None."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def postgres_url() -> str | None:
    """``$POSTGRES_URL`` or the machine's PostgreSQL, if it answers (and asyncpg imports)."""
    url = os.environ.get("POSTGRES_URL", "").strip() or POSTGRES_DEFAULT
    try:
        import asyncpg

        async def ping() -> None:
            await (await asyncpg.connect(url, timeout=3)).close()

        asyncio.run(ping())
    except Exception:
        return None
    return url


def fresh_postgres(url: str) -> str:
    """A store URL on `url` naming a new schema (dropped by `drop_postgres_schemas`)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    _postgres_schemas.append((url, schema))
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def drop_postgres_schemas() -> None:
    """Drop every schema `fresh_postgres` made."""
    import asyncpg

    async def drop() -> None:
        for url, schema in _postgres_schemas:
            connection = await asyncpg.connect(url)
            try:
                await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await connection.close()

    if _postgres_schemas:
        asyncio.run(drop())
        _postgres_schemas.clear()


@contextlib.contextmanager
def serve(variant: str, redis: str | None, workdir: Path) -> Iterator[tuple[int, int]]:
    """Run `bench/load_app.py` as `variant` on one uvicorn worker: yields (port, pid)."""
    port = free_port()
    postgres = postgres_url() if variant == "postgres" else None
    env = {
        **os.environ,
        "LOAD_VARIANT": variant,
        "LOAD_REDIS": redis or "",
        "LOAD_SQLITE": str(workdir / f"load-{uuid.uuid4().hex[:6]}.db"),
        "LOAD_POSTGRES": fresh_postgres(postgres) if postgres else "",
        "LOAD_STATS": str(workdir / "load-stats"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT / "src")]),
    }
    command = [sys.executable, "-c", _SERVER, str(port)]
    proc = subprocess.Popen(command, env=env)
    try:
        wait_port(port, proc, f"server ({variant})")
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The server raises its own open-files limit, then runs uvicorn (one worker, no access log).
_SERVER = """
import resource, sys, uvicorn
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
uvicorn.run("load_app:app", host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, backlog=8192, timeout_graceful_shutdown=3)
"""


class Sampler:
    """Samples a process's RSS (peak) and CPU time while a run lasts."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        times = self.proc.cpu_times()
        self.cpu0, self.t0 = times.user + times.system, time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        times = self.proc.cpu_times()
        self.cpu = (times.user + times.system - self.cpu0) / (time.monotonic() - self.t0)
        self._stop.set()
        self._thread.join()


# -- the client (a separate process) ------------------------------------------------------------


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # first readers
    resumer_latencies: list[float] = field(default_factory=list)  # resumers, live chunks only
    ttfb: list[float] = field(default_factory=list)  # resumers: request sent -> first chunk
    chunks: int = 0
    resumer_chunks: int = 0
    errors: int = 0
    truncated: int = 0  # responses that ended without the chunked body's clean end
    resumer_truncated: int = 0


async def read_stream(
    port: int, path: str, key: str, stats: Stats, *, resumer: bool, joined: float = 0.0
) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats.errors += 1
        return
    sent = time.perf_counter()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: load\r\nDurable-Key: {key}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    last, tail, first = -1, b"", True
    try:
        while data := await asyncio.wait_for(reader.read(1 << 16), READ_TIMEOUT):
            now = time.time()
            for match in STAMP.finditer(tail + data):
                index = int(match.group(2))
                if index <= last:
                    continue  # seen in the previous read's tail
                last = index
                produced = float(match.group(1))
                if resumer:
                    stats.resumer_chunks += 1
                    if first:
                        stats.ttfb.append(time.perf_counter() - sent)
                    if produced >= joined:
                        stats.resumer_latencies.append(now - produced)
                else:
                    stats.chunks += 1
                    stats.latencies.append(now - produced)
                first = False
            tail = (tail + data)[-40:]
        if not tail.endswith(b"\r\n0\r\n\r\n"):
            if resumer:
                stats.resumer_truncated += 1
            else:
                stats.truncated += 1
    except (OSError, asyncio.TimeoutError):
        stats.errors += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_client(args: argparse.Namespace) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = int(args.rate * args.duration)
    path = f"/live?n={n}&rate={args.rate}&size={args.size}"
    stats = Stats()
    ramp = args.ramp / max(1, args.streams)

    async def one(i: int) -> None:
        await asyncio.sleep(i * ramp)
        key = uuid.uuid4().hex
        tasks = [asyncio.create_task(read_stream(args.port, path, key, stats, resumer=False))]
        if args.resumers:
            await asyncio.sleep(args.duration / 2)
            joined = time.time()
            tasks.append(
                asyncio.create_task(
                    read_stream(args.port, path, key, stats, resumer=True, joined=joined)
                )
            )
        await asyncio.gather(*tasks)

    started = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(one(i) for i in range(args.streams))),
        timeout=args.duration * 4 + args.ramp + 60,
    )
    return {
        "elapsed": time.monotonic() - started,
        "expected": n * args.streams,
        "chunks": stats.chunks,
        "resumer_chunks": stats.resumer_chunks,
        "errors": stats.errors,
        "truncated": stats.truncated,
        "resumer_truncated": stats.resumer_truncated,
        "latency": percentiles(stats.latencies),
        "resumer_latency": percentiles(stats.resumer_latencies),
        "ttfb": percentiles(stats.ttfb),
    }


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    return {
        "p50": at(0.50),
        "p99": at(0.99),
        "max": values[-1] * 1000,
        "mean": statistics.fmean(values) * 1000,
    }


def client_process(port: int, args: argparse.Namespace, resumers: bool) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--client",
        "--port", str(port),
        "--streams", str(args.streams),
        "--rate", str(args.rate),
        "--duration", str(args.duration),
        "--size", str(args.size),
        "--ramp", str(args.ramp),
    ]  # fmt: skip
    if resumers:
        command.append("--resumers")
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run_variant(
    variant: str, args: argparse.Namespace, redis: str | None, workdir: Path
) -> dict[str, Any]:
    with serve(variant, redis, workdir) as (port, pid):
        # Warm up (imports, store schema, connections) before measuring.
        warm = argparse.Namespace(**{**vars(args), "streams": 5, "duration": 0.5, "ramp": 0.0})
        client_process(port, warm, resumers=False)
        with Sampler(pid) as sampler:
            result = client_process(port, args, resumers=variant != "bare")
    if variant == "postgres":  # written by the server as it exited (bench/load_app.py)
        stats = workdir / "load-stats"
        result["db_round_trips"] = int(stats.read_text()) if stats.exists() else None
    result.update(variant=variant, cpu=sampler.cpu * 100, rss=sampler.peak / 2**20)
    return result


def fmt(p: dict[str, float] | None, key: str) -> str:
    return "-" if p is None else f"{p[key]:.1f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        f"{args.streams} streams x {args.rate:g} chunks/s x {args.duration:g} s "
        f"({args.size} B chunks), one uvicorn worker; resumer joins each durable stream at "
        f"{args.duration / 2:g} s\n\n"
        "| variant | server CPU (% of a core) | peak RSS (MiB) | chunk latency p50 / p99 (ms) "
        "| resumer live latency p50 / p99 (ms) | resume TTFB p50 / p99 (ms) "
        "| delivered (first / resumers) | cut short | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        delivered = r["chunks"] / r["expected"] if r["expected"] else 0
        resumed = "-" if r["variant"] == "bare" else f"{r['resumer_chunks'] / r['expected']:.1%}"
        lines.append(
            f"| {r['variant']} | {r['cpu']:.0f} | {r['rss']:.0f} "
            f"| {fmt(r['latency'], 'p50')} / {fmt(r['latency'], 'p99')} "
            f"| {fmt(r['resumer_latency'], 'p50')} / {fmt(r['resumer_latency'], 'p99')} "
            f"| {fmt(r['ttfb'], 'p50')} / {fmt(r['ttfb'], 'p99')} "
            f"| {delivered:.1%} / {resumed} | {r['truncated'] + r['resumer_truncated']} "
            f"| {r['errors']} |"
        )
    for r in rows:
        if r.get("db_round_trips"):
            per_chunk = r["db_round_trips"] / r["expected"] if r["expected"] else 0
            lines.append(
                f"\n{r['variant']}: {r['db_round_trips']:,} database round trips for "
                f"{r['expected']:,} chunks ({per_chunk:.3f} per chunk; claims, reads, waits, "
                "renewals and the warm-up included)"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="chunks per second per stream")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per stream")
    parser.add_argument("--size", type=int, default=64, help="bytes per chunk")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams start")
    parser.add_argument("--variants", default="bare,memory,sqlite,redis,postgres")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resumers", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.client:
        print(json.dumps(asyncio.run(run_client(args))))
        return []
    rows = []
    with redis_server(args.redis) as redis, tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            if variant in ("redis", "frs", "rs") and redis is None:
                print(f"skipping {variant}: no Redis (install redis-server or pass --redis)")
                continue
            if variant == "postgres" and postgres_url() is None:
                print("skipping postgres: no PostgreSQL (set POSTGRES_URL)")
                continue
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_variant(variant, args, redis, Path(tmp)))
            finally:
                drop_postgres_schemas()
    print(table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
