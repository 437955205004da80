"""Benchmark: the durable proxy against a plain httpx pass-through, per store, printed as a table.

    python bench/proxy.py                    # 3 rounds; pass-through, memory, sqlite, redis
    python bench/proxy.py --quick            # 1 round
    python bench/proxy.py --stores memory --rounds 5 --json out.json
    python bench/proxy.py --mode 2           # the Durable Streams front door (/v1/proxy)
    python bench/proxy.py --mode 2 --reference-url http://127.0.0.1:4440 --reference-pid PID

A local upstream (``bench/proxy_app.py``, its own uvicorn process) sends 200 SSE events of 40
bytes, one every 10 ms. 100 sessions, started 10 ms apart (``--ramp``, so that at most ~1 s
in all 100 run at once, and a time to first byte measures a request, not a thundering herd),
each fetch a URL of their own through one uvicorn worker (``--http httptools`` by default, as
bench/run.py) serving:

- ``pass-through``: a plain, non-durable httpx streaming relay on the same URL scheme, in the
  same kind of server: the bare limit;
- ``memory`` / ``sqlite`` / ``redis``: `DurableProxy` on that store (a fresh SQLite file per
  server; Redis: ``--redis URL``, else a private ``redis-server`` on a free port, as
  bench/load.py starts it).

With ``--mode 2`` the durable variants are driven through the Durable Streams proxy protocol
instead: each session ``POST``s ``/v1/proxy`` for its URL, then, on the same keep-alive
connection, reads the stream from its start with ``live=sse`` to its close; its TTFB runs from
the POST to its first ``data`` event, its body is the ``data`` events' payload, checked byte
for byte, and there is no joiner phase.
``--reference-url`` adds a ``reference`` row: the same mode-2 workload against another Durable
Streams proxy already running on this machine (e.g. the reference Node ``@durable-streams/proxy``;
see docs/proxy.md), with ``--reference-secret`` (default: ours) and its process, for its CPU,
``--reference-pid``. It is not restarted between rounds.

Measured per variant, in each round (fresh servers, in a rotating order, each warmed up first
by 5 sessions at once; ``--warm-up N``: N):

- server CPU µs/event: utime+stime of the proxy's uvicorn process (``/proc/<pid>/stat``, over
  the sessions' window plus the moment it takes to go quiet) / events delivered; the upstream's
  and the client's CPU are not in it;
- TTFB p50/p99: request start (before the connect) -> the first body byte, per session;
- resume TTFB p50/p99 (durable variants; a second phase): once a session's first request has
  half of its body, a second request for the same URL joins it mid-stream; time to its first
  body byte (the stored half, then live).

Every body is checked byte for byte (each first request must get its 200 events from a run of
the upstream, each joiner the same 200 events from the store); the upstream counts its calls,
which must be one per URL, joiners or not. A failure is printed loudly and makes the exit
status 1. Tables show the median of ``--rounds`` rounds (default 3; ``--quick``: 1), and
every round's values below them. Target (issue 17): durable <= 1.3 x the pass-through's CPU
per event, and <= 5 ms added TTFB p50, on every store. ``--json FILE`` writes it all.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from load import redis_server, wait_port
from proxy_app import SECRET, events_body
from run import (
    Result,
    Server,
    StreamClient,
    check,
    cpu_seconds,
    free_port,
    percentiles,
    request,
    window,
)

ROOT = Path(__file__).resolve().parent.parent
STORES = ("memory", "sqlite", "redis")
EVENTS, EVENT_BYTES, PACE = 200, 40, 0.01
EXPECTED = events_body(EVENTS)
CPU_TARGET, TTFB_TARGET_MS = 1.3, 5.0
TIMEOUT = 60.0
LOCAL = ("127.0.0.1", "localhost")


@contextlib.contextmanager
def serve(variant: str, http: str, upstream: str = "") -> Iterator[Server]:
    """A uvicorn process (one worker) serving bench/proxy_app.py as `variant`."""
    port = free_port()
    env = {**os.environ, "PROXY_VARIANT": variant, "PROXY_UPSTREAM": upstream}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT / "src")])
    command = [
        sys.executable, "-m", "uvicorn", "proxy_app:app", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--http", http,
        "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env)
    try:
        wait_port(port, proc, f"server ({variant})")
        yield Server(port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upstream_calls(port: int) -> int:
    """How many ``/sse`` requests the upstream served so far."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(json.loads(data.split(b"\r\n\r\n", 1)[1])["calls"])


# -- the client: run.py's raw-socket StreamClient, timing the first body byte -------------------


class TimedClient(StreamClient):
    """A `StreamClient` that notes when the first body byte came (or, given `first`, the body's
    first `first`) and when half the body did."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop, first: bytes = b"") -> None:
        super().__init__(request(path, None), loop.create_future())
        self.first = first
        self.started = time.perf_counter()
        self.first_body = 0.0
        self.size = 0
        self.halfway = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        if not self.first_body:
            raw = b"".join([*self.parts, data])
            end = raw.find(b"\r\n\r\n")
            if end >= 0:
                body = raw[end + 4 :]
                chunked = b"transfer-encoding: chunked" in raw[:end].lower()
                # A chunked body byte is in once it is past the chunk-size line.
                if self.first:
                    if self.first in body:
                        self.first_body = time.perf_counter()
                elif (0 <= body.find(b"\r\n") < len(body) - 2) if chunked else body:
                    self.first_body = time.perf_counter()
        if self.size >= len(EXPECTED) // 2 and not self.halfway.done():
            self.halfway.set_result(None)
        super().data_received(data)

    @property
    def ttfb_ms(self) -> float | None:
        return (self.first_body - self.started) * 1000 if self.first_body else None


async def connect(client: TimedClient, port: int) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
    except OSError as exc:
        client.error = f"connect failed: {exc!r}"
        client.done.set_result(None)


def sse_data(body: bytes, base64: bool = False) -> bytes:
    """The payload of a Durable Streams SSE read: its ``data`` events' lines, rejoined (and, if
    `base64`, decoded)."""
    out = []
    for block in body.split(b"\n\n"):
        lines = block.split(b"\n")
        if lines and lines[0] == b"event: data":
            data = [line[5:].removeprefix(b" ") for line in lines[1:] if line[:5] == b"data:"]
            out.append(binascii.a2b_base64(b"".join(data)) if base64 else b"\n".join(data))
    return b"".join(out)


class CreateAndRead(TimedClient):
    """Mode 2 on one keep-alive connection, as a client with a connection pool (a browser,
    fetch, httpx) does it: ``POST /v1/proxy`` for `target`, and once its ``201`` is in, a
    ``GET`` of its ``Location`` with ``offset=-1&live=sse`` (``Connection: close``), read as a
    `TimedClient` to the close, its time to first byte counted from the POST to the first
    ``data`` event (not a control event sent before any data, as the reference does)."""

    def __init__(self, target: str, secret: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__("/", loop, first=b"event: data")
        self.request = (
            f"POST /v1/proxy HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {secret}\r\n"
            f"Upstream-URL: {target}\r\nUpstream-Method: GET\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        self.created: bytes | None = b""  # the 201 so far; None once it is in

    def data_received(self, data: bytes) -> None:
        if self.created is None:
            super().data_received(data)
            return
        self.created += data
        end = self.created.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.created = self.created[:end], None
        location = next(
            (line[9:].strip() for line in head.split(b"\r\n") if line[:9].lower() == b"location:"),
            b"",
        ).decode()
        assert self.transport is not None
        if b" 201 " not in head.split(b"\r\n", 1)[0] or not location:
            self.error = f"create: {head[:300]!r}"
            self.transport.close()
            return
        path = "/" + location.split("://", 1)[-1].split("/", 1)[1]
        self.transport.write(request(f"{path}&offset=-1&live=sse", None))


async def create_and_read(port: int, target: str, secret: str = SECRET) -> TimedClient:
    """Mode 2: a `CreateAndRead` session; its body is made the SSE read's payload. A base64 body
    is decoded, with or without ``Stream-SSE-Data-Encoding``: the reference stores every body
    as ``application/octet-stream``, so its SSE encodes them all, and it drops that header."""
    client = CreateAndRead(target, secret, asyncio.get_running_loop())
    await connect(client, port)
    await client.done
    plain = sse_data(client.body)  # the workload's payload starts so; its base64 does not
    encoded = client.headers.get(b"stream-sse-data-encoding") == b"base64" or plain[:6] != b"data: "
    client.body = sse_data(client.body, base64=True) if encoded else plain
    return client


async def sessions(
    port: int,
    upstream_port: int,
    n: int,
    ramp: float,
    join: bool,
    mode: int = 1,
    secret: str = SECRET,
) -> list[tuple[TimedClient, TimedClient | None]]:
    """`n` sessions, `ramp` s apart, each fetching a URL of its own (and, with `join`, a second
    request for it once the first is half-way); in `mode` 2, each creates a stream and reads
    it with SSE."""
    loop = asyncio.get_running_loop()

    async def one(i: int) -> tuple[TimedClient, TimedClient | None]:
        await asyncio.sleep(i * ramp)
        path = f"/127.0.0.1:{upstream_port}/sse?n={EVENTS}&pace={PACE}&s={uuid.uuid4().hex}"
        if mode == 2:
            return await create_and_read(port, "http:/" + path, secret), None
        first = TimedClient(path, loop)
        await connect(first, port)
        joiner = None
        if join:
            await asyncio.wait([first.halfway, first.done], return_when=asyncio.FIRST_COMPLETED)
            joiner = TimedClient(path, loop)
            await connect(joiner, port)
            await joiner.done
        await first.done
        return first, joiner

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=TIMEOUT + n * ramp)
    for task in pending:
        task.cancel()
    return [t.result() for t in tasks if t in done and not t.cancelled()]


# -- one variant, one round ---------------------------------------------------------------------


@dataclass
class Round:
    """One variant in one round."""

    cpu: Result = field(default_factory=Result)
    upstream_cpu: float = 0.0
    ttfb: list[float] = field(default_factory=list)
    resume_ttfb: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        p = percentiles(self.ttfb) if self.ttfb else (float("nan"),) * 2
        r = percentiles(self.resume_ttfb) if self.resume_ttfb else (float("nan"),) * 2
        return {
            "server_us_per_event": self.cpu.us_per_unit,
            "ttfb_ms": {"p50": p[0], "p99": p[1]},
            "resume_ttfb_ms": {"p50": r[0], "p99": r[1]},
            "events": self.cpu.units,
            "expected": self.cpu.expected,
            "server_cpu_s": self.cpu.server_cpu,
            "wall_s": self.cpu.wall,
            "server_pct": self.cpu.server_cpu / self.cpu.wall * 100 if self.cpu.wall else 0.0,
            "upstream_pct": self.upstream_cpu / self.cpu.wall * 100 if self.cpu.wall else 0.0,
            "client_pct": self.cpu.client_cpu / self.cpu.wall * 100 if self.cpu.wall else 0.0,
            "failures": self.failures,
        }


def run_round(
    loop: asyncio.AbstractEventLoop,
    server: Server,
    upstream: Server,
    args: argparse.Namespace,
    durable: bool,
    secret: str = SECRET,
) -> Round:
    out = Round()
    out.cpu.expected = EVENTS * args.sessions
    upstream_port = upstream.port
    # Warm up: imports, the store's schema, the upstream connection pool; with --warm-up N as
    # many sessions as the round has, the heap grown to their size too (a cold run pays for
    # new connections and full garbage collections that a server running a while does not).
    mode, warm = (args.mode if durable else 1), args.warm_up
    if warm:
        loop.run_until_complete(
            sessions(server.port, upstream_port, warm, 0.0, join=False, mode=mode, secret=secret)
        )

    calls = upstream_calls(upstream_port)
    upstream_cpu = cpu_seconds(upstream.pid)
    with window(server, out.cpu):
        results = loop.run_until_complete(
            sessions(server.port, upstream_port, args.sessions, args.ramp, False, mode, secret)
        )
    out.upstream_cpu = cpu_seconds(upstream.pid) - upstream_cpu
    for i, (first, _) in enumerate(results):
        units, failure = check(first, EXPECTED, EVENT_BYTES, durable and mode == 1)
        out.cpu.units += units
        if failure:
            out.failures.append(f"session {i + 1}: {failure}")
        elif first.ttfb_ms is not None:
            out.ttfb.append(first.ttfb_ms)
    made = upstream_calls(upstream_port) - calls
    if len(results) != args.sessions or made != args.sessions:
        out.failures.append(f"{len(results)} sessions ended, the upstream ran {made} times")

    if durable and mode == 1:
        calls = upstream_calls(upstream_port)
        results = loop.run_until_complete(
            sessions(server.port, upstream_port, args.sessions, args.ramp, join=True)
        )
        for i, (first, joiner) in enumerate(results):
            assert joiner is not None
            for who, client in (("first", first), ("joiner", joiner)):
                _, failure = check(client, EXPECTED, EVENT_BYTES, durable=False)
                if failure:
                    out.failures.append(f"resume session {i + 1} ({who}): {failure}")
            if joiner.headers.get(b"durable-replay") != b"true":
                out.failures.append(f"resume session {i + 1}: the joiner ran the upstream")
            elif joiner.ttfb_ms is not None:
                out.resume_ttfb.append(joiner.ttfb_ms)
        made = upstream_calls(upstream_port) - calls
        if made != args.sessions:
            out.failures.append(f"{args.sessions} URLs with joiners ran the upstream {made} times")
    return out


# -- printing -----------------------------------------------------------------------------------


def medians(rounds: list[Round]) -> dict[str, float]:
    def med(values: list[float]) -> float:
        values = [v for v in values if v == v]  # not NaN
        return statistics.median(values) if values else float("nan")

    ds = [r.as_dict() for r in rounds]
    return {
        "us": med([d["server_us_per_event"] for d in ds]),
        "ttfb_p50": med([d["ttfb_ms"]["p50"] for d in ds]),
        "ttfb_p99": med([d["ttfb_ms"]["p99"] for d in ds]),
        "resume_p50": med([d["resume_ttfb_ms"]["p50"] for d in ds]),
        "resume_p99": med([d["resume_ttfb_ms"]["p99"] for d in ds]),
        "server_pct": med([d["server_pct"] for d in ds]),
        "upstream_pct": med([d["upstream_pct"] for d in ds]),
        "client_pct": med([d["client_pct"] for d in ds]),
        "events": sum(d["events"] for d in ds),
        "expected": sum(d["expected"] for d in ds),
    }


def ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"


def print_table(results: dict[str, list[Round]], args: argparse.Namespace, setup: str) -> None:
    base = medians(results["pass-through"]) if "pass-through" in results else None
    print(
        f"\nMedian of {args.rounds} round(s): {args.sessions} sessions x {EVENTS} SSE events of "
        f"{EVENT_BYTES} B, one every {PACE * 1000:g} ms, started {args.ramp * 1000:g} ms apart; "
        f"{setup}.\n"
    )
    print(
        "| variant | server µs/event | x pass-through | TTFB p50 / p99 (ms) | added TTFB p50 (ms) "
        "| resume TTFB p50 / p99 (ms) | CPU % server / upstream / client | delivered | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, rounds in results.items():
        m = medians(rounds)
        ratio = m["us"] / base["us"] if base else float("nan")
        added = m["ttfb_p50"] - base["ttfb_p50"] if base else float("nan")
        if name == "pass-through" or base is None:
            target = "-"
        else:
            ok = ratio <= CPU_TARGET and added <= TTFB_TARGET_MS
            target = "met" if ok else "MISSED"
        delivered = "ok" if m["events"] == m["expected"] else f"{m['events']}/{m['expected']}"
        print(
            f"| {name} | {m['us']:.1f} | {'-' if name == 'pass-through' else f'{ratio:.2f}'} "
            f"| {ms(m['ttfb_p50'])} / {ms(m['ttfb_p99'])} "
            f"| {'-' if name == 'pass-through' else f'{added:+.1f}'} "
            f"| {ms(m['resume_p50'])} / {ms(m['resume_p99'])} "
            f"| {m['server_pct']:.0f} / {m['upstream_pct']:.0f} / {m['client_pct']:.0f} "
            f"| {delivered} | {target} |"
        )
    print(
        f"\nTarget: durable <= {CPU_TARGET} x the pass-through's server CPU per event and "
        f"<= {TTFB_TARGET_MS:g} ms added TTFB p50. server µs/event: the proxy process's CPU / "
        "events delivered;\nTTFB: request start -> first body byte; resume TTFB: a second "
        "request for the same URL, half-way through, -> its first body byte; CPU %: of one core, "
        "over the first phase\n(the proxy's process, the upstream's, this client's: a server "
        "near 100 % is saturated, and its TTFB is mostly queueing)."
    )
    print("\nEvery round (server µs/event | TTFB p50 ms | resume TTFB p50 ms), in the order run:")
    for name, rounds in results.items():
        ds = [r.as_dict() for r in rounds]
        us = " ".join(f"{d['server_us_per_event']:6.1f}" for d in ds)
        ttfb = " ".join(f"{d['ttfb_ms']['p50']:5.1f}" for d in ds)
        resume = " ".join(f"{ms(d['resume_ttfb_ms']['p50']):>5}" for d in ds)
        print(f"  {name:<12} {us} | {ttfb} | {resume}")


# -- main ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round")
    parser.add_argument("--rounds", type=int, help="rounds per variant (default 3; --quick: 1)")
    parser.add_argument("--stores", default=",".join(STORES), help="durable variants")
    parser.add_argument("--sessions", type=int, default=100, help="sessions per round (100)")
    parser.add_argument("--ramp", type=float, default=0.01, help="seconds between session starts")
    parser.add_argument(
        "--warm-up", type=int, default=5, help="sessions run at once before each round (5)"
    )
    parser.add_argument(
        "--http", default="httptools", choices=("httptools", "h11"), help="uvicorn's --http"
    )
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"), help="a Redis URL")
    parser.add_argument(
        "--mode",
        type=int,
        default=1,
        choices=(1, 2),
        help="the durable variants' front door: 1 durablefetch (GET by URL, and joiners), "
        "2 the Durable Streams proxy protocol (POST /v1/proxy, then an SSE read)",
    )
    parser.add_argument(
        "--reference-url",
        help="with --mode 2: also run the workload against this Durable Streams proxy, already "
        "running on this machine (http://127.0.0.1:PORT)",
    )
    parser.add_argument("--reference-pid", type=int, help="its process, for its CPU")
    parser.add_argument("--reference-secret", default=SECRET, help="its service secret")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args(argv)
    if args.reference_url and (args.mode != 2 or not args.reference_pid):
        parser.error("--reference-url needs --mode 2 and --reference-pid")
    if args.reference_url and urlsplit(args.reference_url).hostname not in LOCAL:
        parser.error("--reference-url must be on this machine (127.0.0.1 or localhost)")
    args.stores = [s for s in args.stores.split(",") if s]
    unknown = set(args.stores) - set(STORES)
    if unknown:
        parser.error(f"unknown --stores {sorted(unknown)}: choose from {','.join(STORES)}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {what}", file=sys.stderr, flush=True)

    failures: list[str] = []
    results: dict[str, list[Round]] = {}
    loop = asyncio.new_event_loop()
    private_redis = redis_server(args.redis) if "redis" in args.stores else None
    with (
        private_redis or contextlib.nullcontext() as redis,
        tempfile.TemporaryDirectory(prefix="durable-proxy-bench-") as tmp,
        serve("upstream", args.http) as upstream,
    ):
        variants = {"pass-through": lambda: "passthrough"}
        if "memory" in args.stores:
            variants["memory"] = lambda: "memory://"
        if "sqlite" in args.stores:
            variants["sqlite"] = lambda: f"sqlite:///{Path(tmp) / f'{uuid.uuid4().hex[:8]}.db'}"
        if "redis" in args.stores:
            if redis:
                variants["redis"] = lambda: redis
            else:
                print("redis: skipped (no redis-server, no --redis)", file=sys.stderr)
        if args.reference_url:
            variants["reference"] = lambda: ""
        results = {name: [] for name in variants}
        names = list(variants)
        upstream_url = f"http://127.0.0.1:{upstream.port}"
        try:
            for round_ in range(args.rounds):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    progress(f"round {round_ + 1}/{args.rounds}: {name}")
                    if name == "reference":  # already running, on this machine
                        port = urlsplit(args.reference_url).port or 80
                        ref = Server(port, args.reference_pid)
                        result = run_round(loop, ref, upstream, args, True, args.reference_secret)
                    else:
                        with serve(variants[name](), args.http, upstream_url) as server:
                            result = run_round(
                                loop, server, upstream, args, durable=name != "pass-through"
                            )
                    results[name].append(result)
                    for failure in result.failures:
                        line = f"FAILED {name} / round {round_ + 1}: {failure}"
                        failures.append(line)
                        print(f"!!! {line}", file=sys.stderr, flush=True)
        finally:
            loop.close()

    loop_name = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    setup = (
        f"uvicorn --http {args.http}, 1 worker, {loop_name} loop, the upstream in another "
        f"uvicorn process; client: this process, asyncio raw sockets; {os.cpu_count()} CPUs; "
        f"durable variants through mode {args.mode}"
    )
    if args.reference_url:
        setup += f"; reference: {args.reference_url} (pid {args.reference_pid}), not restarted"
    print_table(results, args, setup)
    print(f"\n{time.monotonic() - started:.0f} s in all.")
    if failures:
        print(f"\n!!! {len(failures)} FAILURE(S):")
        for line in failures:
            print(f"!!! {line}")
    if args.json:
        payload = {
            "setup": setup,
            "sessions": args.sessions,
            "ramp_s": args.ramp,
            "rounds": args.rounds,
            "variants": {
                name: {"rounds": [r.as_dict() for r in rounds], "median": medians(rounds)}
                for name, rounds in results.items()
            },
            "failures": failures,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
